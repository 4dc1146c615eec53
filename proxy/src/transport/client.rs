//! The upstream's plumbing shared by its HTTP and child-process transports: the pooled
//! HTTP client, the upstream error, and starting a child MCP server.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::process::{Child, Command};

use crate::telemetry::metrics::UpstreamFailure;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot reach the upstream: {0}")]
    Connect(String),
    #[error("upstream timed out")]
    Timeout,
    #[error("upstream protocol error: {0}")]
    Protocol(&'static str),
    #[error("cannot start the MCP server process: {0}")]
    Spawn(String),
    #[error("too many MCP sessions (limit {0})")]
    TooManySessions(usize),
    #[error(
        "this caller already holds its share of MCP sessions ({0}, --max-sessions-per-identity): end one (DELETE /mcp) or let one go idle"
    )]
    TooManySessionsFor(usize),
    /// The request reached the MCP server but its answer never came (it timed out, the
    /// process exited, the stream ended): the call may have run.
    #[error("no answer from the upstream: {0}")]
    Lost(String),
}

impl UpstreamError {
    pub fn kind(&self) -> UpstreamFailure {
        match self {
            UpstreamError::Connect(_) => UpstreamFailure::Connect,
            UpstreamError::Timeout => UpstreamFailure::Timeout,
            UpstreamError::Protocol(_) => UpstreamFailure::Protocol,
            UpstreamError::Spawn(_) => UpstreamFailure::Spawn,
            UpstreamError::TooManySessions(_) | UpstreamError::TooManySessionsFor(_) => UpstreamFailure::Sessions,
            UpstreamError::Lost(_) => UpstreamFailure::Lost,
        }
    }

    /// Whether the request may have been acted on upstream: then its quota stays spent
    /// (never admit more than a limit allows); otherwise it is given back.
    pub fn maybe_delivered(&self) -> bool {
        matches!(self, UpstreamError::Lost(_))
    }
}

pub fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(connector)
}

/// A child MCP server: its command line, and the credential the proxy hands it.
#[derive(Clone, Debug, Default)]
pub struct ChildCommand {
    pub argv: Vec<String>,
    /// Set in the child's environment (its upstream key: the caller never holds it).
    pub credential: Option<ChildCredential>,
}

impl ChildCommand {
    pub fn new(argv: Vec<String>) -> Self {
        Self { argv, credential: None }
    }
}

/// The upstream credential a child process gets as an environment variable (custody in
/// child mode). A file (a mounted Secret) is read again for every child, so a rotated
/// Secret reaches the next session; an unreadable or empty one starts no child.
#[derive(Clone)]
pub struct ChildCredential {
    var: String,
    source: CredentialSource,
}

#[derive(Clone)]
enum CredentialSource {
    File(PathBuf),
    Value(String),
}

impl std::fmt::Debug for ChildCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = match &self.source {
            CredentialSource::File(p) => format!("file {}", p.display()),
            CredentialSource::Value(_) => "a value (redacted)".to_owned(),
        };
        f.debug_struct("ChildCredential").field("var", &self.var).field("source", &source).finish()
    }
}

impl ChildCredential {
    /// The credential in `path`, as `var`. Read once here, so a missing or empty file
    /// stops the proxy at start.
    pub fn from_file(var: &str, path: PathBuf) -> Result<Self, String> {
        let c = Self { var: checked_var(var)?, source: CredentialSource::File(path) };
        c.value()?;
        Ok(c)
    }

    /// A credential given as a value (from the proxy's own environment), as `var`.
    pub fn from_value(var: &str, value: &str) -> Result<Self, String> {
        let c = Self { var: checked_var(var)?, source: CredentialSource::Value(value.trim().to_owned()) };
        c.value()?;
        Ok(c)
    }

    pub fn var(&self) -> &str {
        &self.var
    }

    /// The credential now (the file read again), trimmed; never empty.
    fn value(&self) -> Result<String, String> {
        let value = match &self.source {
            CredentialSource::File(p) => std::fs::read_to_string(p)
                .map_err(|e| format!("the upstream credential file {}: {e}", p.display()))?
                .trim()
                .to_owned(),
            CredentialSource::Value(v) => v.clone(),
        };
        if value.is_empty() {
            return Err("the upstream credential is empty".to_owned());
        }
        if value.contains('\0') {
            return Err("the upstream credential holds a NUL byte".to_owned());
        }
        Ok(value)
    }
}

/// An environment variable name a child can be given: letters, digits and `_`, not
/// starting with a digit.
fn checked_var(var: &str) -> Result<String, String> {
    let ok = !var.is_empty()
        && !var.starts_with(|c: char| c.is_ascii_digit())
        && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok { Ok(var.to_owned()) } else { Err(format!("{var:?} is not an environment variable name")) }
}

/// Starts an MCP server process speaking JSON-RPC lines on stdin/stdout; its stderr is
/// ours, and it dies with the proxy. With a credential, the child gets it in its
/// environment (and nothing of the caller's: a child sees no request headers).
pub fn spawn_server(command: &ChildCommand) -> std::io::Result<Child> {
    let (prog, args) = command
        .argv
        .split_first()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no command after --"))?;
    let mut cmd = Command::new(prog);
    if let Some(credential) = &command.credential {
        let value = credential.value().map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        cmd.env(&credential.var, value);
    }
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| std::io::Error::new(e.kind(), format!("{prog}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_credentials_are_checked_and_never_printed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key");
        std::fs::write(&path, "rp-secret\n").expect("write");
        let c = ChildCredential::from_file("RUNPOD_API_KEY", path.clone()).expect("valid");
        assert_eq!(c.value().as_deref(), Ok("rp-secret"));
        assert!(!format!("{c:?}").contains("rp-secret"));
        let v = ChildCredential::from_value("K", " rp-secret ").expect("valid");
        assert!(!format!("{v:?}").contains("rp-secret"));
        // A rotated Secret is read again; an emptied one starts no child.
        std::fs::write(&path, "rp-rotated").expect("write");
        assert_eq!(c.value().as_deref(), Ok("rp-rotated"));
        std::fs::write(&path, "\n").expect("write");
        assert!(c.value().is_err());
        assert!(ChildCredential::from_file("K", path).is_err(), "empty at start");
        assert!(ChildCredential::from_file("K", dir.path().join("missing")).is_err());
        for bad in ["", "1KEY", "A=B", "A B", "A\0"] {
            assert!(ChildCredential::from_value(bad, "x").is_err(), "{bad:?}");
        }
    }
}
