//! Policy from the operator ("push", wire types in `toolgate_policy::push`).
//!
//! One task holds one long-lived HTTPS stream, `GET {operator}/v1/stream` with the pod's
//! projected token, and reads newline-delimited [`Message`]s. Every [`PolicySet`] is
//! checked (its revision must be the hash of its content), compiled, swapped in for the
//! next call, persisted to the state directory and acknowledged (`POST /v1/ack`); a set
//! that does not compile is acknowledged with its error and the previous policy stays.
//!
//! Nothing the stream does can loosen the policy: a malformed or over-long line, a set
//! whose revision does not match, a refused token, a dead stream (three heartbeat
//! intervals without a line) or an unreachable operator only end the stream; the task
//! reconnects with jittered exponential backoff while the last good policy stays
//! enforced. At start the set persisted by a previous run is enforced before the first
//! connection is tried.
//!
//! The stream also carries approval updates (`Message::Approval`), handed to
//! [`Approvals`]; approval requests and closes are POSTed through the [`Link`] on the
//! stream's own connection (see crate::approval).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;
use toolgate_policy::push::{
    self, Ack, ApprovalClose, ApprovalCreated, ApprovalRequest, ClosePhase, Message, PolicySet,
};

use crate::approval::{ApprovalDesk, Approvals, DeskError};
use crate::live::Effective;
use crate::live::set::{compile_set, persist, verify};
use crate::telemetry::metrics::Metrics;
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures_util::future::BoxFuture;

/// Connecting, the TLS handshake and the response head must each finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect backoff: doubles from the first to the last, jittered, reset after a
/// healthy stream.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Heartbeat interval assumed until the operator announces its own.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);
/// Announced intervals are clamped to 1 s ..= this, so a dead stream is always noticed.
const MAX_HEARTBEAT_SECONDS: u64 = 300;
/// The stream is dead after this many heartbeat intervals without a line.
const MISSED_HEARTBEATS: u32 = 3;
/// Acknowledgements are tried this often (unless a newer one supersedes them).
const ACK_ATTEMPTS: u32 = 5;
const MAX_TOKEN_BYTES: u64 = 64 * 1024;
/// Largest error body read from a refusal.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Why talking to the operator failed. The message is what logs, refusals of held calls
/// and acknowledgements show; [`ControlError::metric_label`] is its stable kind.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A bad `--operator` URL.
    #[error("{0}")]
    Endpoint(String),
    /// The token file cannot be read or holds no bearer token.
    #[error("{0}")]
    Token(String),
    /// The CA file, the TLS configuration or the TLS handshake.
    #[error("{0}")]
    Tls(String),
    /// Connecting or speaking HTTP to the operator failed.
    #[error("{0}")]
    Connect(String),
    /// The operator did not answer (or the stream went silent) in time.
    #[error("{0}")]
    Timeout(String),
    /// Approvals need the policy stream (decisions arrive on it).
    #[error("the policy stream from the operator is not connected")]
    NotConnected,
    /// The operator answered with an error status.
    #[error("the operator answered {status}{hint}: {why}")]
    Refused { status: StatusCode, hint: &'static str, why: String },
    /// A malformed line, message or answer, or the operator closed the stream.
    #[error("{0}")]
    Protocol(String),
    /// A policy set that must not be trusted (its revision does not match its content).
    #[error("{0}")]
    Policy(String),
}

impl ControlError {
    /// A stable, low-cardinality name of the kind of failure (the `kind` log field).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Endpoint(_) => "endpoint",
            Self::Token(_) => "token",
            Self::Tls(_) => "tls",
            Self::Connect(_) => "connect",
            Self::Timeout(_) => "timeout",
            Self::NotConnected => "not_connected",
            Self::Refused { .. } => "refused",
            Self::Protocol(_) => "protocol",
            Self::Policy(_) => "policy",
        }
    }
}

/// Where the operator listens: an `https://` URL, possibly with a path prefix.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Host for the TCP connection and the TLS server name (no brackets around IPv6).
    host: String,
    port: u16,
    /// `Host` header.
    authority: String,
    /// Path prefix without a trailing slash (usually empty).
    prefix: String,
}

impl Endpoint {
    pub fn parse(uri: &Uri) -> Result<Self, ControlError> {
        if uri.scheme_str() != Some("https") {
            return Err(ControlError::Endpoint(format!(
                "--operator must be an https:// URL (the policy stream is always TLS), not {uri:?}"
            )));
        }
        let Some(authority) = uri.authority() else {
            return Err(ControlError::Endpoint(format!("--operator {uri:?} has no host")));
        };
        if authority.as_str().contains('@') {
            return Err(ControlError::Endpoint(
                "--operator must not carry credentials in the URL; use --token-file".into(),
            ));
        }
        if uri.query().is_some() {
            return Err(ControlError::Endpoint(format!("--operator {uri:?} must not have a query")));
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
        Ok(Self {
            host,
            port: authority.port_u16().unwrap_or(443),
            authority: authority.as_str().to_owned(),
            prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    fn path(&self, path: &str) -> String {
        format!("{}{path}", self.prefix)
    }
}

/// How to reach the operator and where to keep the last good set.
#[derive(Debug)]
pub struct Config {
    pub endpoint: Endpoint,
    /// Read on every connect and every ack: projected tokens rotate.
    pub token_file: PathBuf,
    /// PEM roots for the operator's certificate; the platform's roots without it. Read on
    /// every connect, so a rotated CA is picked up.
    pub ca_file: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
}

/// Reads the bearer token (trimmed; must not be empty).
fn read_token(path: &Path) -> Result<HeaderValue, ControlError> {
    let meta =
        std::fs::metadata(path).map_err(|e| ControlError::Token(format!("token file {}: {e}", path.display())))?;
    if meta.len() > MAX_TOKEN_BYTES {
        return Err(ControlError::Token(format!("token file {}: larger than {MAX_TOKEN_BYTES} bytes", path.display())));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| ControlError::Token(format!("token file {}: {e}", path.display())))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(ControlError::Token(format!("token file {} is empty", path.display())));
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| ControlError::Token(format!("token file {}: not a valid bearer token", path.display())))?;
    value.set_sensitive(true);
    Ok(value)
}

/// Aborts the connection task when the connection is no longer used.
#[derive(Debug)]
struct Driver(tokio::task::JoinHandle<()>);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One connection to the operator. HTTP/2 (offered first) carries the stream and its
/// acknowledgements on the same connection, so an acknowledgement reaches the operator
/// replica that holds the stream; HTTP/1.1 needs a connection per request.
#[derive(Debug)]
enum Conn {
    H1 { sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>, _driver: Driver },
    H2(H2Conn),
}

/// An HTTP/2 connection, shared by the stream and its acknowledgements.
#[derive(Clone, Debug)]
struct H2Conn {
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    _driver: Arc<Driver>,
}

impl Conn {
    async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, ControlError> {
        let sent = match self {
            Conn::H1 { sender, .. } => sender.send_request(req).await,
            Conn::H2(c) => c.sender.send_request(req).await,
        };
        sent.map_err(|e| ControlError::Connect(e.to_string()))
    }
}

/// The stream's connection, as requests other than the stream see it.
#[derive(Clone, Debug)]
enum StreamConn {
    /// No stream is up.
    Down,
    /// The stream runs over HTTP/1.1: other requests need a connection of their own.
    H1,
    /// The stream runs over HTTP/2: other requests share its connection.
    H2(H2Conn),
}

/// The operator as the approval flow uses it: how to reach it, the stream's current
/// connection and the id of this proxy process (sent as [`push::INSTANCE_HEADER`]).
#[derive(Debug)]
pub struct Link {
    config: Arc<Config>,
    instance: String,
    stream: std::sync::Mutex<StreamConn>,
}

/// Longest McpApproval name accepted from the operator (a Kubernetes object name).
const MAX_NAME_BYTES: usize = 253;

impl Link {
    pub fn new(config: Config) -> Arc<Self> {
        Arc::new(Self { config: Arc::new(config), instance: new_instance(), stream: StreamConn::Down.into() })
    }

    /// The random id of this proxy process.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn set_stream(&self, conn: StreamConn) {
        *self.stream.lock().unwrap_or_else(|p| p.into_inner()) = conn;
    }

    fn stream(&self) -> StreamConn {
        self.stream.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// POSTs JSON on the stream's HTTP/2 connection (a new connection when the stream is
    /// on HTTP/1.1). Without a stream: an error when `need_stream`, else a new connection.
    async fn post(&self, path: &str, body: Vec<u8>, need_stream: bool) -> Result<Response<Incoming>, ControlError> {
        let token = read_token(&self.config.token_file)?;
        let mut conn = match self.stream() {
            StreamConn::H2(c) => Conn::H2(c),
            StreamConn::H1 => self.config.connect().await?,
            StreamConn::Down if need_stream => {
                return Err(ControlError::NotConnected);
            }
            StreamConn::Down => self.config.connect().await?,
        };
        let mut req = self.config.request(&conn, Method::POST, path, token, Bytes::from(body));
        req.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        tokio::time::timeout(CONNECT_TIMEOUT, conn.send(req))
            .await
            .map_err(|_| ControlError::Timeout("the operator did not answer in time".into()))?
    }

    /// Asks for a person's decision: `201` with the name of the McpApproval, or why not.
    /// Needs the stream (a decision could not reach this process without it).
    pub async fn request_approval(&self, request: &ApprovalRequest) -> Result<String, ControlError> {
        let body = serde_json::to_vec(request).map_err(|e| ControlError::Protocol(e.to_string()))?;
        let resp = self.post(push::APPROVALS_PATH, body, true).await?;
        if resp.status() != StatusCode::CREATED {
            return Err(refusal(resp).await);
        }
        let bytes =
            match tokio::time::timeout(CONNECT_TIMEOUT, Limited::new(resp.into_body(), MAX_ERROR_BODY).collect()).await
            {
                Ok(Ok(c)) => c.to_bytes(),
                Ok(Err(e)) => {
                    return Err(ControlError::Protocol(format!("the operator's answer could not be read: {e}")));
                }
                Err(_) => return Err(ControlError::Timeout("the operator's answer did not arrive in time".into())),
            };
        let created: ApprovalCreated = serde_json::from_slice(&bytes)
            .map_err(|e| ControlError::Protocol(format!("the operator answered 201 without an approval name: {e}")))?;
        if !valid_name(&created.name) {
            return Err(ControlError::Protocol(format!(
                "the operator named the approval {:?}, which is not an object name",
                created.name
            )));
        }
        Ok(created.name)
    }

    /// Tells the operator this process stopped waiting for approval `name` (`Expired` or
    /// `Cancelled`). Uses a new connection when no stream is up.
    pub async fn close_approval(&self, name: &str, phase: ClosePhase) -> Result<(), ControlError> {
        let body = serde_json::to_vec(&ApprovalClose { phase }).map_err(|e| ControlError::Protocol(e.to_string()))?;
        let resp = self.post(&format!("{}/{name}/close", push::APPROVALS_PATH), body, false).await?;
        if resp.status().is_success() {
            return Ok(());
        }
        Err(refusal(resp).await)
    }
}

impl ApprovalDesk for Link {
    fn instance(&self) -> &str {
        &self.instance
    }

    fn request<'a>(&'a self, request: &'a ApprovalRequest) -> BoxFuture<'a, Result<String, DeskError>> {
        Box::pin(async move { self.request_approval(request).await.map_err(DeskError::from) })
    }

    fn close<'a>(&'a self, name: &'a str, phase: ClosePhase) -> BoxFuture<'a, Result<(), DeskError>> {
        Box::pin(async move { self.close_approval(name, phase).await.map_err(DeskError::from) })
    }
}

/// A Kubernetes object name (DNS subdomain): it becomes part of a request path.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
}

/// 32 random hex digits, new for every start of the process.
fn new_instance() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // No randomness source: fall back to time and pid, still distinct per start.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        bytes[..8].copy_from_slice(&(nanos as u64).to_le_bytes());
        bytes[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    crate::mcp::canonical::hex(&bytes)
}

impl Config {
    fn tls(&self) -> Result<Arc<rustls::ClientConfig>, ControlError> {
        let mut config =
            toolgate_identity::client_tls(self.ca_file.as_deref(), "give --ca-file").map_err(ControlError::Tls)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// One connection over TLS to the operator (HTTP/2 if it speaks it).
    async fn connect(&self) -> Result<Conn, ControlError> {
        let tls = self.tls()?;
        let ep = &self.endpoint;
        let name = ServerName::try_from(ep.host.clone())
            .map_err(|e| ControlError::Endpoint(format!("--operator host {:?}: {e}", ep.host)))?;
        let connecting = async {
            let tcp = tokio::net::TcpStream::connect((ep.host.as_str(), ep.port))
                .await
                .map_err(|e| ControlError::Connect(format!("cannot connect to {}: {e}", ep.authority)))?;
            let _ = tcp.set_nodelay(true);
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| ControlError::Tls(format!("TLS with {}: {e}", ep.authority)))?;
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            let io = TokioIo::new(stream);
            let failed = |e: hyper::Error| ControlError::Connect(format!("HTTP with {}: {e}", ep.authority));
            if h2 {
                let (sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.map_err(failed)?;
                Ok(Conn::H2(H2Conn { sender, _driver: Arc::new(drive(conn)) }))
            } else {
                let (sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(failed)?;
                Ok(Conn::H1 { sender, _driver: drive(conn) })
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| ControlError::Timeout(format!("connecting to {} timed out", ep.authority)))?
    }

    fn request(
        &self,
        conn: &Conn,
        method: Method,
        path: &str,
        token: HeaderValue,
        body: Bytes,
    ) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        let path = self.endpoint.path(path);
        // HTTP/2 needs the scheme and authority; HTTP/1.1 gets the origin form and Host.
        let target = match conn {
            Conn::H2(..) => format!("https://{}{path}", self.endpoint.authority),
            Conn::H1 { .. } => path,
        };
        // Built from a parsed URI and a constant: always valid.
        *req.uri_mut() = target.parse().unwrap_or_else(|_| Uri::from_static("/"));
        let h = req.headers_mut();
        if let (Conn::H1 { .. }, Ok(host)) = (conn, HeaderValue::from_str(&self.endpoint.authority)) {
            h.insert(header::HOST, host);
        }
        h.insert(header::AUTHORIZATION, token);
        h.insert(header::USER_AGENT, HeaderValue::from_static(concat!("toolgate-proxy/", env!("CARGO_PKG_VERSION"))));
        req
    }

    /// Sends one acknowledgement: on the stream's HTTP/2 connection when there is one,
    /// else on a new connection.
    async fn post_ack(&self, ack: &Ack, via: Option<&H2Conn>) -> Result<(), ControlError> {
        let token = read_token(&self.token_file)?;
        let mut conn = match via {
            Some(c) => Conn::H2(c.clone()),
            None => self.connect().await?,
        };
        let body = serde_json::to_vec(ack).map_err(|e| ControlError::Protocol(e.to_string()))?;
        let mut req = self.request(&conn, Method::POST, push::ACK_PATH, token, Bytes::from(body));
        req.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let resp = tokio::time::timeout(CONNECT_TIMEOUT, conn.send(req))
            .await
            .map_err(|_| ControlError::Timeout("the operator did not answer the acknowledgement in time".into()))?
            .map_err(|e| ControlError::Connect(format!("acknowledgement failed: {e}")))?;
        if resp.status().is_success() {
            return Ok(());
        }
        Err(refusal(resp).await)
    }
}

/// Runs a connection until it ends or its last user is gone.
fn drive<F>(conn: F) -> Driver
where
    F: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    Driver(tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "operator connection ended");
        }
    }))
}

/// Describes a non-success answer, with the operator's `{"error": ...}` when there is one.
async fn refusal(resp: Response<Incoming>) -> ControlError {
    let status = resp.status();
    let body =
        match tokio::time::timeout(CONNECT_TIMEOUT, Limited::new(resp.into_body(), MAX_ERROR_BODY).collect()).await {
            Ok(Ok(c)) => c.to_bytes(),
            _ => Bytes::new(),
        };
    let why = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
    let hint = match status {
        StatusCode::UNAUTHORIZED => " (the token was refused: missing, expired, or not for audience toolgate)",
        StatusCode::FORBIDDEN => " (the token is not bound to a pod the operator knows)",
        _ => "",
    };
    ControlError::Refused { status, hint, why }
}

/// Splits a byte stream into lines of at most `max` bytes (without the newline; a
/// trailing `\r` is dropped).
#[derive(Debug)]
struct Lines {
    buf: Vec<u8>,
    max: usize,
}

impl Lines {
    fn new(max: usize) -> Self {
        Self { buf: Vec::new(), max }
    }

    fn push(&mut self, mut data: &[u8]) -> Result<Vec<Vec<u8>>, ControlError> {
        let mut out = Vec::new();
        while let Some(i) = data.iter().position(|b| *b == b'\n') {
            self.check(i)?;
            self.buf.extend_from_slice(&data[..i]);
            let mut line = std::mem::take(&mut self.buf);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            out.push(line);
            data = &data[i + 1..];
        }
        self.check(data.len())?;
        self.buf.extend_from_slice(data);
        Ok(out)
    }

    fn check(&self, more: usize) -> Result<(), ControlError> {
        if self.buf.len() + more > self.max {
            return Err(ControlError::Protocol(format!("a line from the operator is longer than {} bytes", self.max)));
        }
        Ok(())
    }
}

/// Jittered exponential backoff (backon): each wait is uniformly in [d/2, d) for
/// d = first, 2·first, … up to max, so reconnecting proxies spread out.
#[derive(Debug)]
struct Backoff {
    builder: ExponentialBuilder,
    waits: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    fn new(first: Duration, max: Duration) -> Self {
        // backon adds a random jitter in [0, d) on top of d: start from half of each.
        let builder = ExponentialBuilder::new()
            .with_min_delay(first / 2)
            .with_max_delay(max / 2)
            .with_jitter()
            .without_max_times();
        Self { builder, waits: builder.build(), max }
    }

    /// The next wait.
    fn next(&mut self) -> Duration {
        self.waits.next().unwrap_or(self.max)
    }

    fn reset(&mut self) {
        self.waits = self.builder.build();
    }
}

/// What one line was.
enum Line {
    Heartbeat(Duration),
    /// A well-formed set (applied, already enforced, or refused by the compiler).
    Policies,
    /// An approval changed phase.
    Approval,
    /// A message type this proxy does not know (a newer operator): ignored.
    Unknown,
}

/// The stream task.
#[derive(Debug)]
pub struct Client {
    config: Arc<Config>,
    link: Arc<Link>,
    approvals: Arc<Approvals>,
    policy: watch::Sender<Arc<Effective>>,
    metrics: Arc<Metrics>,
    /// The revision of the set enforced now, if it came from the operator.
    applied: Option<String>,
    acks: watch::Sender<Option<PendingAck>>,
    /// The stream's connection, when acknowledgements can share it.
    via: Option<H2Conn>,
}

/// An acknowledgement and the connection to send it on (None: a new one).
#[derive(Clone, Debug)]
struct PendingAck {
    ack: Ack,
    via: Option<H2Conn>,
}

impl Client {
    /// Starts the stream and acknowledgement tasks. `applied` is the revision of the
    /// persisted set enforced at start, if any.
    pub fn spawn(
        link: Arc<Link>,
        approvals: Arc<Approvals>,
        policy: watch::Sender<Arc<Effective>>,
        metrics: Arc<Metrics>,
        applied: Option<String>,
    ) -> tokio::task::JoinHandle<()> {
        let config = link.config.clone();
        let (acks, ack_rx) = watch::channel(None);
        tokio::spawn(send_acks(config.clone(), ack_rx));
        let client = Self { config, link, approvals, policy, metrics, applied, acks, via: None };
        tokio::spawn(client.run())
    }

    async fn run(mut self) {
        let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
        loop {
            let mut healthy = false;
            let reason = self.stream(&mut healthy).await;
            self.via = None;
            self.link.set_stream(StreamConn::Down);
            self.metrics.operator_connected(false);
            if healthy {
                backoff.reset();
            }
            let wait = backoff.next();
            tracing::warn!(
                reason = %reason,
                kind = reason.metric_label(),
                retry_in_ms = wait.as_millis() as u64,
                enforcing = %self.policy.borrow().revision,
                "no policy stream from the operator; the last good policy stays enforced"
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// Holds one stream until it ends; returns why. `healthy` is set once the stream
    /// delivered a well-formed policy set.
    async fn stream(&mut self, healthy: &mut bool) -> ControlError {
        let token = match read_token(&self.config.token_file) {
            Ok(t) => t,
            Err(e) => return e,
        };
        let mut conn = match self.config.connect().await {
            Ok(c) => c,
            Err(e) => return e,
        };
        let mut req = self.config.request(&conn, Method::GET, push::STREAM_PATH, token, Bytes::new());
        req.headers_mut().insert(header::ACCEPT, HeaderValue::from_static("application/x-ndjson"));
        if let Ok(instance) = HeaderValue::from_str(self.link.instance()) {
            req.headers_mut().insert(push::INSTANCE_HEADER, instance);
        }
        let resp = match tokio::time::timeout(CONNECT_TIMEOUT, conn.send(req)).await {
            Err(_) => return ControlError::Timeout("the operator did not answer the stream request in time".into()),
            Ok(Err(e)) => return ControlError::Connect(format!("stream request failed: {e}")),
            Ok(Ok(r)) => r,
        };
        if resp.status() != StatusCode::OK {
            return refusal(resp).await;
        }
        let ct = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !ct.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/x-ndjson")) {
            return ControlError::Protocol(format!("the stream has Content-Type {ct:?}, not application/x-ndjson"));
        }
        self.metrics.operator_connected(true);
        // Acknowledgements of this stream's sets travel on its connection (HTTP/2).
        self.via = match &conn {
            Conn::H2(c) => Some(c.clone()),
            Conn::H1 { .. } => None,
        };
        // Approval requests travel on this connection too (HTTP/2), so they reach the
        // replica that pushes this pod's decisions.
        self.link.set_stream(match &self.via {
            Some(c) => StreamConn::H2(c.clone()),
            None => StreamConn::H1,
        });
        tracing::info!(
            operator = %self.config.endpoint.authority,
            h2 = self.via.is_some(),
            "policy stream from the operator connected"
        );
        let mut body = resp.into_body();
        let mut lines = Lines::new(push::MAX_LINE_BYTES);
        let mut interval = DEFAULT_HEARTBEAT;
        let mut deadline = Instant::now() + interval * MISSED_HEARTBEATS;
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => {
                    return ControlError::Timeout(format!(
                        "no line for {} s ({MISSED_HEARTBEATS} heartbeat intervals): the stream is dead",
                        (interval * MISSED_HEARTBEATS).as_secs()
                    ));
                }
                Ok(None) => return ControlError::Protocol("the operator closed the stream".into()),
                Ok(Some(Err(e))) => return ControlError::Connect(format!("the stream broke: {e}")),
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else { continue };
            let complete = match lines.push(&data) {
                Ok(l) => l,
                Err(e) => return e,
            };
            for line in complete {
                if !line.iter().all(u8::is_ascii_whitespace) {
                    match self.line(&line).await {
                        Ok(Line::Heartbeat(every)) => interval = every,
                        Ok(Line::Policies) => *healthy = true,
                        Ok(Line::Approval | Line::Unknown) => {}
                        Err(e) => return e,
                    }
                }
                deadline = Instant::now() + interval * MISSED_HEARTBEATS;
            }
        }
    }

    async fn line(&mut self, line: &[u8]) -> Result<Line, ControlError> {
        let value = toolgate_policy::from_slice_strict(line)
            .map_err(|e| ControlError::Protocol(format!("malformed line from the operator (not JSON): {e}")))?;
        match value.get("type").and_then(Value::as_str) {
            Some("policies" | "heartbeat" | "approval") => {}
            Some(other) => {
                tracing::debug!(r#type = other, "ignoring a message type this proxy does not know");
                return Ok(Line::Unknown);
            }
            None => return Err(ControlError::Protocol("malformed line from the operator: no \"type\"".into())),
        }
        let approval = value.get("type").and_then(Value::as_str) == Some("approval");
        let message = match serde_json::from_value(value) {
            Ok(m) => m,
            // An approval update this proxy cannot read (a phase a newer operator added)
            // is ignored like an unknown message type: the policy stream stays up.
            Err(e) if approval => {
                tracing::debug!(error = %e, "ignoring an approval update this proxy does not understand");
                return Ok(Line::Unknown);
            }
            Err(e) => return Err(ControlError::Protocol(format!("malformed message from the operator: {e}"))),
        };
        match message {
            Message::Heartbeat { interval_seconds } => {
                Ok(Line::Heartbeat(Duration::from_secs(interval_seconds.clamp(1, MAX_HEARTBEAT_SECONDS))))
            }
            Message::Policies(set) => self.policies(set).await.map(|()| Line::Policies),
            Message::Approval(update) => {
                tracing::debug!(name = update.name, phase = update.phase.as_str(), "approval update");
                self.approvals.update(update);
                Ok(Line::Approval)
            }
        }
    }

    /// Applies (or refuses) one set and acknowledges it. `Err` only for a set that must
    /// not be trusted at all (revision mismatch): the stream is then dropped.
    async fn policies(&mut self, set: PolicySet) -> Result<(), ControlError> {
        if let Err(e) = verify(&set) {
            self.metrics.reload_error();
            self.ack(&set.revision, Some(e.clone()));
            return Err(ControlError::Policy(format!("refused a policy set: {e}")));
        }
        let revision = set.revision.clone();
        if self.applied.as_deref() == Some(revision.as_str()) {
            // A reconnect sends the set again: it is enforced already.
            tracing::debug!(revision, "policy set unchanged");
            self.ack(&revision, None);
            return Ok(());
        }
        let compiled = tokio::task::spawn_blocking(move || compile_set(&set).map(|e| (e, set))).await;
        let (effective, set) = match compiled {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::error!(
                    revision,
                    "policy set from the operator refused; the last good policy stays enforced:\n{e}"
                );
                self.metrics.reload_error();
                self.ack(&revision, Some(e));
                return Ok(());
            }
            Err(e) => {
                self.metrics.reload_error();
                self.ack(&revision, Some(format!("compiling failed: {e}")));
                return Ok(());
            }
        };
        let enforced: Vec<&str> = effective.enforce.names().collect();
        let dry_run: Vec<&str> = effective.dry_run.names().collect();
        tracing::info!(
            revision,
            pod = %format!("{}/{}", set.pod.namespace, set.pod.name),
            ?enforced,
            ?dry_run,
            "policy set from the operator applied"
        );
        crate::live::enforced(&self.metrics, &effective);
        self.metrics.policy_applied();
        self.policy.send_replace(Arc::new(effective));
        self.applied = Some(revision.clone());
        if let Some(dir) = self.config.state_dir.clone() {
            match tokio::task::spawn_blocking(move || persist(&dir, &set)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot persist the policy set; a restart starts without it"),
                Err(e) => tracing::warn!(error = %e, "cannot persist the policy set"),
            }
        }
        self.ack(&revision, None);
        Ok(())
    }

    fn ack(&self, revision: &str, error: Option<String>) {
        let ack = Ack { revision: revision.to_owned(), error };
        self.acks.send_replace(Some(PendingAck { ack, via: self.via.clone() }));
    }
}

/// Sends acknowledgements, newest first: a newer one supersedes one still being retried.
async fn send_acks(config: Arc<Config>, mut rx: watch::Receiver<Option<PendingAck>>) {
    let mut superseded = false;
    loop {
        if !superseded && rx.changed().await.is_err() {
            return;
        }
        superseded = false;
        let Some(PendingAck { ack, via }) = rx.borrow_and_update().clone() else { continue };
        let mut backoff = Backoff::new(FIRST_BACKOFF, Duration::from_secs(5));
        for attempt in 1..=ACK_ATTEMPTS {
            match config.post_ack(&ack, via.as_ref()).await {
                Ok(()) => {
                    tracing::debug!(revision = ack.revision, error = ?ack.error, "acknowledged");
                    break;
                }
                Err(e) if attempt == ACK_ATTEMPTS => {
                    tracing::error!(revision = ack.revision, error = %e, "giving up acknowledging the policy set; the next connection acknowledges again");
                }
                Err(e) => {
                    tracing::warn!(revision = ack.revision, attempt, error = %e, "cannot acknowledge the policy set; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff.next()) => {}
                        changed = rx.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            superseded = true;
                            break;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_must_be_https() {
        let ok = Endpoint::parse(&"https://toolgate-operator.toolgate-system.svc:8443".parse().expect("uri"))
            .expect("valid");
        assert_eq!(
            (ok.host.as_str(), ok.port, ok.path(push::STREAM_PATH).as_str()),
            ("toolgate-operator.toolgate-system.svc", 8443, "/v1/stream")
        );
        let v6 = Endpoint::parse(&"https://[::1]/prefix/".parse().expect("uri")).expect("valid");
        assert_eq!((v6.host.as_str(), v6.port, v6.path(push::ACK_PATH).as_str()), ("::1", 443, "/prefix/v1/ack"));
        for bad in ["http://op:8443", "https://u:p@op:8443", "https://op/?x=1", "/v1/stream"] {
            let e = Endpoint::parse(&bad.parse().expect("uri")).expect_err(bad);
            assert!(matches!(e, ControlError::Endpoint(_)) && e.to_string().contains("--operator"), "{e}");
        }
    }

    #[test]
    fn errors_keep_their_messages_and_have_distinct_kinds() {
        let refused = ControlError::Refused { status: StatusCode::UNAUTHORIZED, hint: " (h)", why: "no".into() };
        assert_eq!(refused.to_string(), "the operator answered 401 Unauthorized (h): no");
        assert_eq!(ControlError::NotConnected.to_string(), "the policy stream from the operator is not connected");
        let all = [
            ControlError::Endpoint(String::new()),
            ControlError::Token(String::new()),
            ControlError::Tls(String::new()),
            ControlError::Connect(String::new()),
            ControlError::Timeout(String::new()),
            ControlError::NotConnected,
            refused,
            ControlError::Protocol(String::new()),
            ControlError::Policy(String::new()),
        ];
        let labels: std::collections::HashSet<&str> = all.iter().map(ControlError::metric_label).collect();
        assert_eq!(labels.len(), all.len());
    }

    #[test]
    fn lines_are_split_and_bounded() {
        let mut l = Lines::new(8);
        assert_eq!(l.push(b"ab").expect("fits"), Vec::<Vec<u8>>::new());
        assert_eq!(l.push(b"c\r\n\nde\nf").expect("fits"), vec![b"abc".to_vec(), b"".to_vec(), b"de".to_vec()]);
        assert_eq!(l.push(b"1234567\n").expect("exactly 8"), vec![b"f1234567".to_vec()]);
        assert!(l.push(b"123456789").is_err(), "9 bytes without a newline");
        let mut l = Lines::new(8);
        assert!(l.push(b"12345\n123456789\n").is_err());
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let waits: Vec<Duration> = (0..12).map(|_| b.next()).collect();
        let mut d = Duration::from_millis(200);
        for w in &waits {
            assert!(*w >= d / 2 && *w <= d, "{w:?} not in [{:?}, {d:?}]", d / 2);
            d = (d * 2).min(Duration::from_secs(30));
        }
        assert!(waits[11] >= Duration::from_secs(15));
        b.reset();
        assert!(b.next() <= Duration::from_millis(200));
    }
}
