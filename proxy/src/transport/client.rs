//! The upstream's plumbing shared by its HTTP and child-process transports: the pooled
//! HTTP client, the upstream error, and starting a child MCP server.

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::process::{Child, Command};

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
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "connect",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Protocol(_) => "protocol",
            UpstreamError::Spawn(_) => "spawn",
            UpstreamError::TooManySessions(_) | UpstreamError::TooManySessionsFor(_) => "sessions",
            UpstreamError::Lost(_) => "lost",
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

/// Starts an MCP server process speaking JSON-RPC lines on stdin/stdout; its stderr is
/// ours, and it dies with the proxy.
pub fn spawn_server(command: &[String]) -> std::io::Result<Child> {
    let (prog, args) = command
        .split_first()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no command after --"))?;
    Command::new(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| std::io::Error::new(e.kind(), format!("{prog}: {e}")))
}
