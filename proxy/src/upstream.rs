//! Upstream MCP servers: a Streamable-HTTP URL, or a command run as a child process
//! over stdio (one child per MCP session, bounded, reaped when the session ends).

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use crate::jsonrpc::{self, code};
use crate::server::{BoxError, RespBody, full, json_response, strip_hop_by_hop};

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
}

impl UpstreamError {
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "connect",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Protocol(_) => "protocol",
            UpstreamError::Spawn(_) => "spawn",
            UpstreamError::TooManySessions(_) => "sessions",
        }
    }
}

#[derive(Debug)]
pub enum Upstream {
    Http(Box<HttpUpstream>),
    Stdio(Arc<StdioSessions>),
}

impl Upstream {
    pub async fn send(
        &self,
        method: &Method,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Response<RespBody>, UpstreamError> {
        match self {
            Upstream::Http(h) => h.send(method, headers, body).await,
            Upstream::Stdio(s) => s.send(method, headers, body).await,
        }
    }
}

#[derive(Debug)]
pub struct HttpUpstream {
    uri: Uri,
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl HttpUpstream {
    pub fn new(uri: Uri, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(connector);
        Self { uri, client, timeout }
    }

    async fn send(
        &self,
        method: &Method,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Response<RespBody>, UpstreamError> {
        let mut req = Request::builder().method(method.clone()).uri(self.uri.clone());
        if let Some(h) = req.headers_mut() {
            for (k, v) in headers {
                if k != header::HOST && k != header::CONTENT_LENGTH && k != header::ACCEPT_ENCODING {
                    h.append(k.clone(), v.clone());
                }
            }
            strip_hop_by_hop(h);
            // The answer must be readable to be inspected.
            h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        }
        let req = req.body(Full::new(body)).map_err(|_| UpstreamError::Protocol("cannot build the request"))?;
        // The timeout covers the response head; SSE bodies may stream for long.
        let resp = tokio::time::timeout(self.timeout, self.client.request(req))
            .await
            .map_err(|_| UpstreamError::Timeout)?
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        Ok(resp.map(|b| b.map_err(std::io::Error::other).boxed()))
    }
}

/// Children keyed by the session id the proxy gave out.
#[derive(Debug)]
pub struct StdioSessions {
    command: Vec<String>,
    max_sessions: usize,
    idle_timeout: Duration,
    call_timeout: Duration,
    sessions: Mutex<HashMap<String, Arc<ChildSession>>>,
}

#[derive(Debug)]
struct ChildSession {
    stdin: tokio::sync::Mutex<ChildStdin>,
    pending: Mutex<HashMap<String, oneshot::Sender<Value>>>,
    /// Server-to-client messages for the GET stream (taken by the first GET).
    events_rx: Mutex<Option<mpsc::Receiver<Value>>>,
    child: Mutex<Option<Child>>,
    last_used: Mutex<Instant>,
}

impl ChildSession {
    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn kill(&self) {
        if let Some(mut c) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = c.start_kill();
        }
    }
}

fn new_session_id() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        // No entropy source is a broken host; a time-based id still works but is guessable,
        // so make that visible.
        tracing::error!("no OS randomness for session ids");
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        b[..16].copy_from_slice(&t.as_nanos().to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl StdioSessions {
    pub fn new(command: Vec<String>, max_sessions: usize, idle_timeout: Duration, call_timeout: Duration) -> Arc<Self> {
        let s = Arc::new(Self { command, max_sessions, idle_timeout, call_timeout, sessions: Mutex::default() });
        let weak = Arc::downgrade(&s);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tick.tick().await;
                let Some(s) = weak.upgrade() else { return };
                s.reap();
            }
        });
        s
    }

    fn reap(&self) {
        let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|id, s| {
            let idle = s.last_used.lock().map(|t| t.elapsed()).unwrap_or_default();
            let exited =
                s.child.lock().ok().and_then(|mut c| c.as_mut().map(|c| c.try_wait().ok().flatten().is_some()));
            let keep = idle < self.idle_timeout && exited != Some(true);
            if !keep {
                tracing::info!(session = %id, "reaping MCP server process");
                s.kill();
            }
            keep
        });
    }

    pub fn session_count(&self) -> usize {
        self.sessions.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn shutdown(&self) {
        for (_, s) in self.sessions.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            s.kill();
        }
    }

    fn spawn(&self) -> Result<Arc<ChildSession>, UpstreamError> {
        let mut child = spawn_server(&self.command).map_err(|e| UpstreamError::Spawn(e.to_string()))?;
        let stdin = child.stdin.take().ok_or(UpstreamError::Spawn("no stdin".into()))?;
        let stdout = child.stdout.take().ok_or(UpstreamError::Spawn("no stdout".into()))?;
        let (events_tx, events_rx) = mpsc::channel(256);
        let session = Arc::new(ChildSession {
            stdin: tokio::sync::Mutex::new(stdin),
            pending: Mutex::default(),
            events_rx: Mutex::new(Some(events_rx)),
            child: Mutex::new(Some(child)),
            last_used: Mutex::new(Instant::now()),
        });
        let reader = session.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                    tracing::debug!("ignoring non-JSON line from the MCP server");
                    continue;
                };
                let is_answer = msg.get("method").is_none() && msg.get("id").is_some();
                if is_answer {
                    let key = msg["id"].to_string();
                    let waiter = reader.pending.lock().ok().and_then(|mut p| p.remove(&key));
                    if let Some(w) = waiter {
                        let _ = w.send(msg);
                        continue;
                    }
                }
                // Requests and notifications from the server go to the GET stream; dropped
                // when nobody listens (as the spec allows for a missing stream).
                let _ = events_tx.try_send(msg);
            }
            // The process ended: pending calls fail (their senders drop).
            reader.pending.lock().map(|mut p| p.clear()).ok();
        });
        Ok(session)
    }

    async fn send(
        &self,
        method: &Method,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Response<RespBody>, UpstreamError> {
        let sid = headers.get("mcp-session-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let existing = sid.as_ref().and_then(|id| self.sessions.lock().ok().and_then(|m| m.get(id).cloned()));
        match *method {
            Method::DELETE => {
                let removed = sid.and_then(|id| self.sessions.lock().ok().and_then(|mut m| m.remove(&id)));
                Ok(match removed {
                    Some(s) => {
                        s.kill();
                        status_only(StatusCode::OK)
                    }
                    None => status_only(StatusCode::NOT_FOUND),
                })
            }
            Method::GET => {
                let Some(s) = existing else { return Ok(status_only(StatusCode::NOT_FOUND)) };
                s.touch();
                let rx = s.events_rx.lock().ok().and_then(|mut r| r.take());
                let Some(rx) = rx else { return Ok(status_only(StatusCode::CONFLICT)) };
                let stream = futures_util::StreamExt::map(ReceiverStream::new(rx), |msg: Value| {
                    Ok::<_, BoxError>(Frame::data(Bytes::from(format!("event: message\ndata: {msg}\n\n"))))
                });
                let mut r = Response::new(StreamBody::new(stream).boxed());
                r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
                r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                Ok(r)
            }
            _ => self.post(sid, existing, body).await,
        }
    }

    async fn post(
        &self,
        sid: Option<String>,
        existing: Option<Arc<ChildSession>>,
        body: Bytes,
    ) -> Result<Response<RespBody>, UpstreamError> {
        // The gate already parsed and checked this body.
        let value: Value = serde_json::from_slice(&body).map_err(|_| UpstreamError::Protocol("body is not JSON"))?;
        let messages: Vec<&Value> = match &value {
            Value::Array(items) => items.iter().collect(),
            v => vec![v],
        };
        let is_init = messages.iter().any(|m| m.get("method").and_then(Value::as_str) == Some("initialize"));
        let (session, new_id) = match (existing, sid) {
            (Some(s), _) => (s, None),
            (None, Some(_)) => {
                return Ok(json_response(
                    StatusCode::NOT_FOUND,
                    &jsonrpc::error(
                        Value::Null,
                        code::INVALID_REQUEST,
                        "unknown or ended session: initialize again",
                        None,
                    ),
                ));
            }
            (None, None) if is_init => {
                if self.session_count() >= self.max_sessions {
                    self.reap();
                    if self.session_count() >= self.max_sessions {
                        return Err(UpstreamError::TooManySessions(self.max_sessions));
                    }
                }
                let s = self.spawn()?;
                let id = new_session_id();
                self.sessions.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), s.clone());
                (s, Some(id))
            }
            (None, None) => {
                return Ok(json_response(
                    StatusCode::BAD_REQUEST,
                    &jsonrpc::error(
                        Value::Null,
                        code::INVALID_REQUEST,
                        "missing Mcp-Session-Id: send initialize first",
                        None,
                    ),
                ));
            }
        };
        session.touch();
        let mut waits = Vec::new();
        for m in &messages {
            if m.get("method").is_some()
                && let Some(id) = m.get("id")
            {
                let (tx, rx) = oneshot::channel();
                session.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string(), tx);
                waits.push(rx);
            }
        }
        {
            let mut stdin = session.stdin.lock().await;
            let mut line = serde_json::to_vec(&value).map_err(|_| UpstreamError::Protocol("cannot encode"))?;
            line.push(b'\n');
            stdin.write_all(&line).await.map_err(|e| UpstreamError::Connect(format!("MCP server stdin: {e}")))?;
            stdin.flush().await.map_err(|e| UpstreamError::Connect(format!("MCP server stdin: {e}")))?;
        }
        if waits.is_empty() {
            return Ok(with_session(status_only(StatusCode::ACCEPTED), new_id));
        }
        let mut answers = Vec::with_capacity(waits.len());
        for w in waits {
            match tokio::time::timeout(self.call_timeout, w).await {
                Ok(Ok(v)) => answers.push(v),
                Ok(Err(_)) => return Err(UpstreamError::Connect("the MCP server process exited".into())),
                Err(_) => return Err(UpstreamError::Timeout),
            }
        }
        let out = if value.is_array() { Value::Array(answers) } else { answers.pop().unwrap_or(Value::Null) };
        Ok(with_session(json_response(StatusCode::OK, &out), new_id))
    }
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

fn status_only(status: StatusCode) -> Response<RespBody> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = status;
    r
}

fn with_session(mut r: Response<RespBody>, id: Option<String>) -> Response<RespBody> {
    if let Some(id) = id
        && let Ok(v) = HeaderValue::from_str(&id)
    {
        r.headers_mut().insert("mcp-session-id", v);
    }
    r
}
