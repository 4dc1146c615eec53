//! The kubelet's part for an injected pod: a real `toolgate-proxy` process started with the
//! arguments and environment of the pod's `toolgate-proxy` container, as the webhook
//! injected it.
//!
//! There is no kubelet in the harness, so only what a pod would provide differently is
//! adapted: the listen addresses become free loopback ports (every pod has its own network
//! namespace; here all share one), the upstream port is the port the test's MCP server
//! really listens on (same host and path), and the mounted token, CA and state paths become
//! files in a directory of the test. Everything else — the operator URL, every other flag,
//! the environment (`valueFrom.fieldRef` resolved from the pod like the downward API) — is
//! passed as injected.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod};

use crate::mcp::{Proc, http, workspace_binary};
use crate::process::free_port;

/// Name of the container the operator injects.
pub const SIDECAR_CONTAINER: &str = "toolgate-proxy";

/// How long the sidecar may take to answer `/healthz`.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// A running sidecar (killed when dropped).
#[derive(Debug)]
pub struct Sidecar {
    /// The process; `proc.port` is its MCP port (the pod's `toolgate-mcp`).
    pub proc: Proc,
    /// Its admin port (the pod's `toolgate-admin`): `/metrics`, `/healthz`, `/readyz`, `/policy`.
    pub admin: u16,
    /// The arguments it was started with (the injected ones, adapted as described above).
    pub args: Vec<String>,
    /// The environment it was given from the container's `env`, resolved.
    pub env: BTreeMap<String, String>,
    dir: PathBuf,
}

/// The injected `toolgate-proxy` container of `pod` (a native sidecar: an init container).
pub fn sidecar_container(pod: &Pod) -> &Container {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .and_then(|c| c.iter().find(|c| c.name == SIDECAR_CONTAINER))
        .unwrap_or_else(|| panic!("pod {:?} has no {SIDECAR_CONTAINER} init container", pod.metadata.name))
}

/// The value of a `fieldRef` path of `pod`, as the downward API would give it.
fn field(pod: &Pod, path: &str) -> String {
    let value = match path {
        "metadata.name" => pod.metadata.name.clone(),
        "metadata.namespace" => pod.metadata.namespace.clone(),
        "metadata.uid" => pod.metadata.uid.clone(),
        "spec.serviceAccountName" => {
            Some(pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into()))
        }
        "spec.nodeName" => pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        "status.podIP" => pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
        "status.hostIP" => pod.status.as_ref().and_then(|s| s.host_ip.clone()),
        other => {
            let (kind, key) = other.split_once('[').unwrap_or((other, ""));
            let key = key.trim_end_matches(']').trim_matches('\'');
            let map = match kind {
                "metadata.labels" => pod.metadata.labels.as_ref(),
                "metadata.annotations" => pod.metadata.annotations.as_ref(),
                _ => panic!("fieldRef {other:?} is not supported by the test's downward API"),
            };
            map.and_then(|m| m.get(key).cloned())
        }
    };
    value.unwrap_or_default()
}

/// The container's `env`, resolved against `pod` (literal values and `fieldRef`s; any other
/// source fails the test, since it would need a kubelet).
pub fn container_env(pod: &Pod, container: &Container) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => match &from.field_ref {
                Some(f) => field(pod, &f.field_path),
                None => panic!("env {} of {}: only value and fieldRef are supported here", var.name, container.name),
            },
            (None, None) => String::new(),
        };
        env.insert(var.name.clone(), value);
    }
    env
}

/// The injected arguments with the pod-specific parts replaced (see the module docs).
pub fn adapt_args(args: &[String], port: u16, admin: u16, upstream_port: u16, dir: &Path) -> Vec<String> {
    args.iter()
        .map(|a| match a.split_once('=') {
            Some(("--listen", _)) => format!("--listen=127.0.0.1:{port}"),
            Some(("--admin-listen", _)) => format!("--admin-listen=127.0.0.1:{admin}"),
            Some(("--upstream", url)) => {
                // http://127.0.0.1:<port>/<path>: keep the host and path, change the port.
                let path = url.splitn(4, '/').nth(3).unwrap_or("mcp");
                format!("--upstream=http://127.0.0.1:{upstream_port}/{path}")
            }
            Some(("--token-file", _)) => format!("--token-file={}", dir.join("token").display()),
            Some(("--ca-file", _)) => format!("--ca-file={}", dir.join("ca.crt").display()),
            Some(("--state-dir", _)) => format!("--state-dir={}", dir.join("state").display()),
            _ => a.clone(),
        })
        .collect()
}

impl Sidecar {
    /// Starts the sidecar of `pod` in front of the MCP server on `upstream_port`, with
    /// `token` as its projected service-account token and `ca` (PEM) as the mounted
    /// `ca.crt`; files, the audit log (`audit.jsonl`, its stdout) and its log
    /// (`sidecar.log`) go to `dir`. Waits until `/healthz` answers.
    pub fn start(pod: &Pod, upstream_port: u16, dir: &Path, token: &str, ca: &str) -> Sidecar {
        let container = sidecar_container(pod);
        std::fs::write(dir.join("token"), token).expect("writing the token file");
        std::fs::write(dir.join("ca.crt"), ca).expect("writing ca.crt");
        std::fs::create_dir_all(dir.join("state")).expect("creating the state directory");
        let port = free_port().expect("a free port");
        let admin = free_port().expect("a free port");
        let args = adapt_args(container.args.as_deref().unwrap_or_default(), port, admin, upstream_port, dir);
        let env = container_env(pod, container);
        let log = File::create(dir.join("sidecar.log")).expect("creating sidecar.log");
        let audit = File::create(dir.join("audit.jsonl")).expect("creating audit.jsonl");
        let child = Command::new(workspace_binary("toolgate-proxy", "toolgate-proxy"))
            .args(&args)
            // A container's environment is its `env` (the image sets none for the proxy).
            .env_clear()
            .envs(&env)
            .env("TOOLGATE_LOG", "info")
            .stdout(audit)
            .stderr(log)
            .spawn()
            .expect("spawn toolgate-proxy");
        let sidecar =
            Sidecar { proc: Proc { child, port, name: "toolgate-proxy" }, admin, args, env, dir: dir.to_owned() };
        let deadline = Instant::now() + START_TIMEOUT;
        while http(admin, "GET", "/healthz", &[], b"").0 != 200 {
            assert!(
                Instant::now() < deadline,
                "the sidecar did not start: see {}:\n{}",
                sidecar.log_path().display(),
                crate::log_tail(&sidecar.log_path(), 20)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        sidecar
    }

    /// `mcp-client.mjs` arguments that reach the MCP server through this sidecar, sending
    /// `Authorization: Bearer <token>`.
    pub fn client(&self, token: &str) -> Vec<String> {
        vec![
            "--url".into(),
            format!("http://127.0.0.1:{}/mcp", self.proc.port),
            "--header".into(),
            format!("Authorization: Bearer {token}"),
        ]
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics(&self) -> String {
        String::from_utf8_lossy(&http(self.admin, "GET", "/metrics", &[], b"").2).into_owned()
    }

    /// The HTTP status of `/readyz` (200 once a policy is enforced).
    pub fn ready(&self) -> u16 {
        http(self.admin, "GET", "/readyz", &[], b"").0
    }

    /// The sidecar's log (stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("sidecar.log")
    }

    /// The audit lines written so far (stdout), parsed.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injected_arguments_keep_everything_but_ports_and_mounts() {
        let injected: Vec<String> = [
            "--listen=0.0.0.0:15080",
            "--admin-listen=0.0.0.0:15090",
            "--upstream=http://127.0.0.1:3000/mcp",
            "--operator=https://toolgate-operator.toolgate-system.svc:8443",
            "--token-file=/var/run/secrets/toolgate/token",
            "--state-dir=/var/lib/toolgate",
            "--ca-file=/var/run/secrets/toolgate/ca.crt",
        ]
        .map(String::from)
        .into();
        let got = adapt_args(&injected, 1, 2, 3, Path::new("/d"));
        assert_eq!(
            got,
            [
                "--listen=127.0.0.1:1",
                "--admin-listen=127.0.0.1:2",
                "--upstream=http://127.0.0.1:3/mcp",
                "--operator=https://toolgate-operator.toolgate-system.svc:8443",
                "--token-file=/d/token",
                "--state-dir=/d/state",
                "--ca-file=/d/ca.crt",
            ]
        );
    }

    #[test]
    fn env_resolves_field_refs_like_the_downward_api() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "labels": {"app": "a"}},
            "spec": {"containers": [], "initContainers": [{"name": SIDECAR_CONTAINER, "env": [
                {"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "B", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "C", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                {"name": "D", "value": "literal"},
            ]}]},
        }))
        .expect("a pod");
        let env = container_env(&pod, sidecar_container(&pod));
        assert_eq!(
            env,
            BTreeMap::from([
                ("A".into(), "p".into()),
                ("B".into(), "n".into()),
                ("C".into(), "a".into()),
                ("D".into(), "literal".into())
            ])
        );
    }
}
