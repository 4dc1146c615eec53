//! Child processes that cannot outlive the test process.
//!
//! Every server (etcd, kube-apiserver, prometheus) runs under a small `sh` wrapper whose
//! standard input is a pipe from the test process. The test process never writes to it;
//! when the test process exits for any reason (normal end, failed test, panic, `abort`,
//! SIGKILL, OOM kill) the kernel closes the write end, the wrapper's `cat` reaches end of
//! file, and the wrapper stops the server (SIGTERM, then SIGKILL after 10 s) and removes the
//! server's scratch directory. (A server that exits on its own leaves the directory, with
//! its log, for a post-mortem.)
//!
//! Why not the alternatives:
//! - `Drop` of a guard in a `static` never runs: Rust does not drop statics at exit, and a
//!   panicking or killed process runs no destructors anyway.
//! - `prctl(PR_SET_PDEATHSIG)` needs `unsafe` (`pre_exec`), which the workspace forbids, and
//!   fires when the *thread* that spawned the child exits, not the process: with libtest and
//!   tokio spawning from short-lived threads that kills servers in the middle of a run.
//! - Polling the parent pid from a wrapper can be fooled by pid reuse and adds latency.
//!
//! The pipe is created with `O_CLOEXEC` by the standard library, so other children (kubectl,
//! helm, ...) never inherit its write end and cannot keep a wrapper alive.

use std::fs::File;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// The wrapper: `sh -c WRAPPER toolgate-watchdog <dir-to-remove-or-empty> [cmd args...]`.
/// With no command it only removes the directory once the test process is gone.
const WRAPPER: &str = r#"
dir=$1
shift
exec 3<&0 </dev/null
pid=
if [ $# -gt 0 ]; then
  "$@" 3<&- &
  pid=$!
fi
stopped=0
stop() {
  stopped=1
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null
  ( sleep 10; kill -KILL "$pid" 2>/dev/null ) 3<&- &
  killer=$!
}
trap 'stop' INT TERM HUP
if [ -n "$pid" ]; then
  ( cat <&3 >/dev/null; kill -TERM $$ 2>/dev/null ) &
  watcher=$!
  exec 3<&-
  # `wait` returns early (status > 128) when a trapped signal arrives: wait again then.
  while :; do
    wait "$pid"
    status=$?
    [ "$status" -gt 128 ] && kill -0 "$pid" 2>/dev/null && continue
    break
  done
  kill "$watcher" 2>/dev/null
  [ -n "${killer:-}" ] && kill "$killer" 2>/dev/null
else
  cat <&3 >/dev/null
  stopped=1
  status=0
fi
# A server that exited on its own (crash, bad flags) leaves its directory and log behind
# for a post-mortem; the test process reports where.
[ -n "$dir" ] && [ "$stopped" = 1 ] && rm -rf "$dir"
exit $status
"#;

/// A server process under the watchdog wrapper. Dropping it (or exiting the test process)
/// stops the server.
#[derive(Debug)]
pub struct Supervised {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Supervised {
    /// Starts `program args...` with stdout and stderr appended to `log`. `remove_after`, if
    /// given, is deleted once the server has stopped.
    pub fn spawn(name: &str, program: &Path, args: &[String], log: &Path, remove_after: Option<&Path>) -> Result<Self> {
        Self::spawn_without_env(name, program, args, log, remove_after, &[])
    }

    /// [`Supervised::spawn`] with the environment variables `remove_env` unset for the
    /// server (e.g. [`PROXY_ENV`]).
    pub fn spawn_without_env(
        name: &str,
        program: &Path,
        args: &[String],
        log: &Path,
        remove_after: Option<&Path>,
        remove_env: &[&str],
    ) -> Result<Self> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating the log file handle")?;
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(WRAPPER)
            .arg("toolgate-watchdog")
            .arg(remove_after.map(Path::as_os_str).unwrap_or_default())
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err);
        for var in remove_env {
            command.env_remove(var);
        }
        let child = command.spawn().with_context(|| format!("starting {name} ({})", program.display()))?;
        Ok(Self { name: name.to_owned(), child, log: log.to_owned() })
    }

    /// Fails (with the end of the server's log) if the server has already exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!(
                "{} exited ({status}); the end of its log {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log, 40)
            ),
            Err(e) => bail!("waiting for {}: {e}", self.name),
        }
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Stops the server and waits (at most `timeout`) for the wrapper to finish cleaning up.
    pub fn stop(&mut self, timeout: Duration) {
        drop(self.child.stdin.take());
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        // Closing the pipe is the stop signal; the wrapper does the rest on its own.
        drop(self.child.stdin.take());
    }
}

/// The environment variables that route HTTP(S) through a proxy (Go's `net/http` and most
/// other clients read them). A sandbox or CI machine may set them; servers that call other
/// servers by cluster names (the apiserver calling a webhook Service) must not use them.
pub const PROXY_ENV: &[&str] =
    &["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy"];

/// Keeps `dir` until the test process exits, then removes it (see the module docs).
pub fn remove_at_exit(dir: &Path) -> Result<Child> {
    Command::new("sh")
        .arg("-c")
        .arg(WRAPPER)
        .arg("toolgate-watchdog")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the cleanup watchdog (sh)")
}

/// The last `lines` lines of a log file (or a note that it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Err(e) = File::open(path).and_then(|mut f| f.read_to_string(&mut text)) {
        return format!("(cannot read {}: {e})", path.display());
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A currently free TCP port on 127.0.0.1. Another process can take it before the caller
/// binds it; callers that start servers retry with new ports when a server fails to start.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr().context("local address")?.port())
}
