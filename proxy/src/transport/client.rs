//! The upstream's plumbing shared by its HTTP and child-process transports: the HTTP/1.1
//! connection pool, the upstream error, and starting a child MCP server.

use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, Uri};
use hyper_util::rt::TokioIo;
use tokio::process::{Child, Command};

use crate::telemetry::metrics::UpstreamFailure;
use crate::transport::http::RespBody;

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

/// How long opening a connection to the upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections kept per upstream; more are closed once their exchange is over.
const MAX_IDLE: usize = 32;

type Sender = SendRequest<Full<Bytes>>;

/// HTTP/1.1 connections to one upstream origin (`http://host:port`), each a direct
/// `hyper::client::conn::http1` connection (TCP_NODELAY) with a task driving it.
///
/// A request takes an idle connection that is ready, or opens one. A connection goes back
/// to the idle list once its response body has been read to its end (an SSE stream keeps
/// its connection until the stream ends); at most [`MAX_IDLE`] wait there, and closed ones
/// are dropped. No idle timer: the upstream closes the idle connections it does not want.
/// If the upstream closed a reused connection before the request was written (hyper hands
/// the request back), it is sent once more on a new connection; a request that may have
/// been written is never sent again ([`UpstreamError::Lost`]: it could run twice).
#[derive(Clone)]
pub struct HttpClient {
    inner: Arc<Pool>,
}

struct Pool {
    /// The origin requests must name (absolute-form URIs are checked against it).
    origin: Option<hyper::http::uri::Authority>,
    /// What to connect to: the host without IPv6 brackets, and the port.
    host: String,
    port: u16,
    /// `Host` of every request: the host, and the port unless it is 80.
    host_header: Option<HeaderValue>,
    idle: Mutex<Vec<Sender>>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("host", &self.inner.host)
            .field("port", &self.inner.port)
            .field("idle", &self.inner.lock().len())
            .finish()
    }
}

impl HttpClient {
    /// Connections to the origin of `upstream` (an `http://` URL; other schemes are refused
    /// at start, and a URL without a host fails every request with `Connect`).
    pub fn new(upstream: &Uri) -> Self {
        let origin = upstream.authority().cloned();
        let raw_host = upstream.host().unwrap_or("");
        let host = raw_host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = upstream.port_u16().unwrap_or(80);
        let host_header = match upstream.port_u16() {
            Some(p) if p != 80 => HeaderValue::from_str(&format!("{raw_host}:{p}")).ok(),
            _ => HeaderValue::from_str(raw_host).ok(),
        };
        Self { inner: Arc::new(Pool { origin, host, port, host_header, idle: Mutex::new(Vec::new()) }) }
    }

    /// Sends `req` (origin-form `/path?query`, or absolute-form on this client's origin)
    /// and returns the response once its head is here. The body is the caller's to read;
    /// the connection is reused once the body has been read to its end.
    ///
    /// `Connect`: the request was not sent (no connection, or the upstream closed a new
    /// one before the request went out). `Lost`: it may have been sent.
    pub async fn send(&self, mut req: Request<Full<Bytes>>) -> Result<Response<RespBody>, UpstreamError> {
        let pool = &self.inner;
        if req.uri().authority().is_some() {
            if req.uri().scheme_str() != Some("http") || req.uri().authority() != pool.origin.as_ref() {
                return Err(UpstreamError::Protocol("a request to another origin than the upstream's"));
            }
            let path = req.uri().path_and_query().map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
            *req.uri_mut() = path;
        }
        let Some(host) = &pool.host_header else {
            return Err(UpstreamError::Connect("the upstream URL names no valid host".into()));
        };
        req.headers_mut().insert(header::HOST, host.clone());
        match pool.checkout() {
            Some(tx) => self.send_on(tx, true, req).await,
            None => self.send_on(pool.connect().await?, false, req).await,
        }
    }

    /// Sends `req` on `tx` (`reused`: an idle connection, which the upstream may have
    /// closed meanwhile; then a request it hands back unsent goes on a new connection).
    async fn send_on(
        &self,
        mut tx: Sender,
        mut reused: bool,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<RespBody>, UpstreamError> {
        let pool = &self.inner;
        loop {
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok(self.answer(resp, tx)),
                Err(mut e) => {
                    let Some(back) = e.take_message() else {
                        // Written, or partly: the upstream may act on it.
                        return Err(UpstreamError::Lost(e.into_error().to_string()));
                    };
                    if !reused {
                        return Err(UpstreamError::Connect(format!(
                            "the upstream closed a new connection before the request was sent: {}",
                            e.into_error()
                        )));
                    }
                    // The upstream closed an idle connection first; the request never left.
                    tracing::debug!(error = %e.error(), "an idle upstream connection was closed: sending on a new one");
                    req = back;
                    tx = pool.connect().await?;
                    reused = false;
                }
            }
        }
    }

    /// The response, its connection going back to the pool when its body has been read.
    fn answer(&self, resp: Response<Incoming>, tx: Sender) -> Response<RespBody> {
        let (parts, body) = resp.into_parts();
        if body.is_end_stream() {
            self.inner.put(tx);
            return Response::from_parts(parts, body.map_err(std::io::Error::other).boxed());
        }
        Response::from_parts(parts, PooledBody { body, back: Some((tx, self.inner.clone())) }.boxed())
    }
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, Vec<Sender>> {
        // Pushes and removals leave the list whole: a panic elsewhere cannot corrupt it.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle connection that is ready; closed ones are dropped.
    /// One not yet ready (its connection task has not caught up) stays for later.
    fn checkout(&self) -> Option<Sender> {
        let mut idle = self.lock();
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            if idle[i].is_ready() {
                return Some(idle.swap_remove(i));
            }
            if idle[i].is_closed() {
                idle.swap_remove(i);
            }
        }
        None
    }

    /// A connection whose exchange is over: kept if it is open. With [`MAX_IDLE`] waiting
    /// already, closed ones are dropped, and if none is, the first in the list, an old one (a
    /// connection that never became ready again cannot hold a place for good).
    fn put(&self, tx: Sender) {
        if tx.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() >= MAX_IDLE {
            idle.retain(|t| !t.is_closed());
            if idle.len() >= MAX_IDLE {
                idle.remove(0);
            }
        }
        idle.push(tx);
    }

    async fn connect(&self) -> Result<Sender, UpstreamError> {
        let addr = (self.host.as_str(), self.port);
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| UpstreamError::Connect(format!("connecting to {}:{} timed out", self.host, self.port)))?
            .map_err(|e| UpstreamError::Connect(format!("{}:{}: {e}", self.host, self.port)))?;
        stream.set_nodelay(true).map_err(|e| UpstreamError::Connect(format!("TCP_NODELAY: {e}")))?;
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "an upstream connection ended with an error");
            }
        });
        Ok(tx)
    }
}

/// A response body whose connection goes back to the pool once the body has been read to
/// its end. Dropped before that (or failed), the connection is dropped with it.
struct PooledBody {
    body: Incoming,
    back: Option<(Sender, Arc<Pool>)>,
}

impl PooledBody {
    fn give_back(&mut self) {
        if let Some((tx, pool)) = self.back.take() {
            pool.put(tx);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => this.give_back(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.give_back(),
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        frame.map(|f| f.map(|r| r.map_err(std::io::Error::other)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
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
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An upstream that closes its first and third connections at once and answers `ok` to
    /// every request on the others; it counts connections and requests.
    async fn upstream() -> (Uri, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let uri: Uri = format!("http://{}/mcp", listener.local_addr().expect("addr")).parse().expect("uri");
        let (accepted, requests) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, r) = (accepted.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                if matches!(a.fetch_add(1, Ordering::SeqCst), 0 | 2) {
                    continue; // dropped: closed before any request
                }
                let r = r.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while let Ok(n) = s.read(&mut chunk).await {
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            r.fetch_add(1, Ordering::SeqCst);
                            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
                        }
                    }
                });
            }
        });
        (uri, accepted, requests)
    }

    #[test]
    fn the_host_to_connect_to_and_the_host_header() {
        let cases = [
            ("http://127.0.0.1:8080/mcp", "127.0.0.1", 8080, "127.0.0.1:8080"),
            ("http://runpod-mcp.agents/mcp", "runpod-mcp.agents", 80, "runpod-mcp.agents"),
            ("http://runpod-mcp:80/mcp", "runpod-mcp", 80, "runpod-mcp"),
            ("http://[::1]:9000/", "::1", 9000, "[::1]:9000"),
        ];
        for (uri, host, port, header) in cases {
            let c = HttpClient::new(&uri.parse().expect("uri"));
            assert_eq!((c.inner.host.as_str(), c.inner.port), (host, port), "{uri}");
            assert_eq!(c.inner.host_header.as_ref().map(|h| h.to_str().expect("ascii")), Some(header), "{uri}");
        }
    }

    #[tokio::test]
    async fn a_request_for_another_origin_is_refused_before_it_is_sent() {
        let (uri, accepted, _) = upstream().await;
        let client = HttpClient::new(&uri);
        // Another port; the same authority over another scheme.
        for other in ["http://127.0.0.1:1/mcp".to_owned(), uri.to_string().replace("http://", "https://")] {
            let req = Request::get(other.as_str()).body(Full::new(Bytes::new())).expect("request");
            let err = client.send(req).await.expect_err("refused");
            assert!(matches!(err, UpstreamError::Protocol(_)), "{other}: {err:?}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 0, "nothing connected");
    }

    async fn wait_closed(tx: &Sender) {
        for _ in 0..1000 {
            if tx.is_closed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(tx.is_closed(), "the upstream closed it");
    }

    #[tokio::test]
    async fn a_request_handed_back_by_a_closed_idle_connection_goes_on_a_new_one() {
        let (uri, accepted, requests) = upstream().await;
        let client = HttpClient::new(&uri);
        // An idle connection the upstream has closed (as if it closed it after its
        // keep-alive timeout while the request was on its way to it).
        let stale = client.inner.connect().await.expect("connect");
        wait_closed(&stale).await;
        let req = Request::get("/mcp").body(Full::new(Bytes::new())).expect("request");
        let resp = client.send_on(stale, true, req).await.expect("sent again on a new connection");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"ok");
        assert_eq!(requests.load(Ordering::SeqCst), 1, "sent once");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // The new connection went back to the pool and serves the next request.
        let resp = client.send(Request::get("/mcp").body(Full::new(Bytes::new())).expect("request")).await;
        assert_eq!(resp.expect("answer").status(), 200);
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "reused");
        // Handed back by a new connection (the upstream's third, closed at once): not
        // delivered, so `Connect` (its quota is given back), and not tried again.
        let new = client.inner.connect().await.expect("connect");
        wait_closed(&new).await;
        let req = Request::get("/mcp").body(Full::new(Bytes::new())).expect("request");
        let err = client.send_on(new, false, req).await.expect_err("not sent");
        assert!(matches!(err, UpstreamError::Connect(_)) && !err.maybe_delivered(), "{err:?}");
        assert_eq!(requests.load(Ordering::SeqCst), 2);
        assert_eq!(accepted.load(Ordering::SeqCst), 3, "no other connection tried");
    }

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
