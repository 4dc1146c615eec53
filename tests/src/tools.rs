//! Locating the pinned binaries that `make testbin` (tests/cluster/testbin.sh) provides, and
//! running command-line tools from async tests.

use std::path::{Path, PathBuf};
use std::process::Output;

/// A binary that the real-cluster tests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// `kube-apiserver` (Kubernetes 1.34).
    KubeApiserver,
    /// `etcd` (3.6).
    Etcd,
    /// `kubectl` (same version as the apiserver).
    Kubectl,
    /// `helm` (v3).
    Helm,
    /// `prometheus` (Debian's package).
    Prometheus,
    /// `promtool` (Debian's package).
    Promtool,
    /// `kubelet` (`make testbin-node`).
    Kubelet,
    /// `kube-proxy` (`make testbin-node`).
    KubeProxy,
    /// `kube-controller-manager` (`make testbin-node`).
    KubeControllerManager,
    /// `kube-scheduler` (`make testbin-node`).
    KubeScheduler,
    /// `coredns` with the plugins a test cluster needs (`make testbin-node`).
    Coredns,
    /// The pod sandbox process (`make testbin-node`).
    Pause,
}

impl Tool {
    /// The make target that provides it.
    pub fn make_target(self) -> &'static str {
        match self {
            Tool::Kubelet
            | Tool::KubeProxy
            | Tool::KubeControllerManager
            | Tool::KubeScheduler
            | Tool::Coredns
            | Tool::Pause => "make testbin-node",
            _ => "make testbin",
        }
    }

    /// The environment variable that holds the binary's absolute path.
    pub fn env_var(self) -> &'static str {
        match self {
            Tool::KubeApiserver => "TOOLGATE_KUBE_APISERVER",
            Tool::Etcd => "TOOLGATE_ETCD",
            Tool::Kubectl => "TOOLGATE_KUBECTL",
            Tool::Helm => "TOOLGATE_HELM",
            Tool::Prometheus => "TOOLGATE_PROMETHEUS",
            Tool::Promtool => "TOOLGATE_PROMTOOL",
            Tool::Kubelet => "TOOLGATE_KUBELET",
            Tool::KubeProxy => "TOOLGATE_KUBE_PROXY",
            Tool::KubeControllerManager => "TOOLGATE_KUBE_CONTROLLER_MANAGER",
            Tool::KubeScheduler => "TOOLGATE_KUBE_SCHEDULER",
            Tool::Coredns => "TOOLGATE_COREDNS",
            Tool::Pause => "TOOLGATE_PAUSE",
        }
    }
}

/// The testbin cache directory, as the Makefile and testbin.sh compute it.
pub fn testbin_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("TESTBIN_CACHE").filter(|d| !d.is_empty()) {
        return dir.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"));
    cache.join("toolgate-testbin")
}

/// The absolute path of `tool`: from its environment variable (`make test` sources
/// `$TESTBIN_CACHE/env.sh`), else from `$TESTBIN_CACHE/env.sh` itself, so that a plain
/// `cargo test` works after `make testbin`. Panics, telling the user to run `make testbin`,
/// when neither has it: a skipped real-cluster test would pass without testing anything.
pub fn tool_path(tool: Tool) -> PathBuf {
    let env_sh = testbin_cache().join("env.sh");
    let env_sh_text = std::fs::read_to_string(&env_sh).ok();
    resolve(tool, std::env::var(tool.env_var()).ok(), &env_sh, env_sh_text.as_deref())
        .unwrap_or_else(|message| panic!("{message}"))
}

fn resolve(tool: Tool, from_env: Option<String>, env_sh: &Path, env_sh_text: Option<&str>) -> Result<PathBuf, String> {
    let var = tool.env_var();
    let (path, origin) = match from_env.filter(|v| !v.is_empty()) {
        Some(v) => (PathBuf::from(v), format!("${var}")),
        None => {
            let found = env_sh_text.and_then(|text| export_value(text, var));
            match found {
                Some(v) => (PathBuf::from(v), format!("{var} in {}", env_sh.display())),
                None => {
                    return Err(format!(
                        "{var} is not set and {} does not define it: run `{}` \
                         (it builds or installs the pinned binaries once, into a cache), then rerun the tests with `make test` \
                         or after `source {}`",
                        env_sh.display(),
                        tool.make_target(),
                        env_sh.display()
                    ));
                }
            }
        }
    };
    if !path.is_absolute() || !path.is_file() {
        return Err(format!(
            "{origin} = {} is not an existing absolute path to a file: run `{}` again",
            path.display(),
            tool.make_target()
        ));
    }
    Ok(path)
}

/// The value of `export NAME='value'` (or `"value"`, or bare) in a shell file.
fn export_value(text: &str, name: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("export ")?.trim_start();
        let value = rest.strip_prefix(name)?.strip_prefix('=')?;
        let value = value
            .strip_prefix('\'')
            .and_then(|v| v.strip_suffix('\''))
            .or_else(|| value.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
            .unwrap_or(value);
        Some(value.to_owned())
    })
}

/// A `tokio` command for `tool` (see [`tool_path`]).
pub fn command(tool: Tool) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(tool_path(tool));
    cmd.kill_on_drop(true);
    cmd
}

/// Runs `cmd` to completion and returns its output, whatever its exit status.
pub async fn run_output(cmd: &mut tokio::process::Command) -> Output {
    cmd.stdin(std::process::Stdio::null()).output().await.unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `cmd`, panics with its stdout and stderr unless it succeeds, and returns its stdout.
pub async fn run_ok(cmd: &mut tokio::process::Command) -> String {
    let out = run_output(cmd).await;
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binaries_tell_the_user_to_run_make_testbin() {
        let err = resolve(Tool::Etcd, None, Path::new("/nonexistent/env.sh"), None).expect_err("no path anywhere");
        assert!(err.contains("TOOLGATE_ETCD"), "{err}");
        assert!(err.contains("make testbin"), "{err}");

        let err = resolve(Tool::Helm, Some("/nonexistent/helm".into()), Path::new("/x/env.sh"), None)
            .expect_err("file missing");
        assert!(err.contains("make testbin"), "{err}");
    }

    #[test]
    fn env_sh_is_read_when_the_variable_is_unset() {
        let sh = std::env::current_exe().expect("test binary path");
        let text = format!("# generated\nexport TOOLGATE_ETCD='/nope'\nexport TOOLGATE_HELM='{}'\n", sh.display());
        let found = resolve(Tool::Helm, None, Path::new("/x/env.sh"), Some(&text)).expect("found");
        assert_eq!(found, sh);
        // The environment variable wins over env.sh.
        let err = resolve(Tool::Helm, Some("/also/missing".into()), Path::new("/x/env.sh"), Some(&text))
            .expect_err("env var wins");
        assert!(err.contains("$TOOLGATE_HELM"), "{err}");
        assert_eq!(export_value(&text, "TOOLGATE_ETCD").as_deref(), Some("/nope"));
        assert_eq!(export_value(&text, "TOOLGATE_KUBECTL"), None);
    }
}
