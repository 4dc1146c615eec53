//! Upstream sessions the proxy holds on its clients' behalf, one per client session: a child
//! process speaking JSON-RPC lines over stdio (`-- CMD`), or a connection to a server that
//! speaks the 2024-11-05 HTTP+SSE transport (GET an SSE stream whose first event,
//! `endpoint`, names the URL to POST messages to; everything the server says arrives as
//! `message` events on that stream).
//!
//! Either way the client speaks Streamable HTTP to the proxy: the proxy gives out the
//! `Mcp-Session-Id`, answers each POST with the answers to its requests (matched by
//! JSON-RPC id), and delivers everything else the server sends (its requests to the
//! client, notifications) on the session's GET stream. Checks happen before any of this
//! (mcp_http::post): what reaches a session was already decided.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use serde_json::Value;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::{mpsc, oneshot};

use crate::mcp::headers as mcp_headers;
use crate::mcp::jsonrpc::{self, code};
use crate::mcp::sse;
use crate::transport::client::{ChildCommand, HttpClient, UpstreamError, spawn_server};
use crate::transport::http::{BoxError, RespBody, json_response, status_only, strip_hop_by_hop, with_session};

/// Requests of one session waiting for their answers at once.
pub const MAX_PENDING: usize = 256;
/// Server messages queued for a session's GET stream; more are dropped while nobody reads.
const EVENTS_QUEUE: usize = 256;
/// Longest wait for a 2024-11-05 server's `endpoint` event (it sends it at once).
const ENDPOINT_WAIT: Duration = Duration::from_secs(10);
/// A session without a waiting request or an open GET stream for this long may be ended to
/// make room for a new one (its identity's, when that identity is at its share).
const RECLAIM_AFTER: Duration = Duration::from_secs(30);
/// Largest line a child may write (one JSON-RPC message).
const MAX_LINE_BYTES: usize = sse::MAX_EVENT_BYTES;

/// How a session reaches its MCP server.
#[derive(Debug)]
pub enum Opener {
    /// Run this command, one process per session.
    Command(ChildCommand),
    /// Open an SSE stream at this URL (2024-11-05 HTTP+SSE transport).
    Sse(Box<SseTarget>),
}

#[derive(Clone, Debug)]
pub struct SseTarget {
    pub uri: Uri,
    pub client: HttpClient,
    /// For each HTTP exchange's response head.
    pub timeout: Duration,
}

/// Random 128-bit hex id (session ids the proxy gives out).
pub fn new_session_id() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        // No entropy source is a broken host; a time-based id still works but is guessable,
        // so make that visible.
        tracing::error!("no OS randomness for session ids");
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        b[..16].copy_from_slice(&t.as_nanos().to_le_bytes());
    }
    crate::mcp::canonical::hex(&b)
}

#[derive(Debug)]
enum Link {
    Child { stdin: tokio::sync::Mutex<ChildStdin>, child: Mutex<Option<Child>> },
    Sse { endpoint: Uri, client: HttpClient, reader: Mutex<Option<tokio::task::AbortHandle>> },
}

#[derive(Debug, Default)]
struct Pending {
    next: u64,
    /// Keyed by the id's JSON text; the number tells registrations of one id apart.
    waiters: HashMap<String, (u64, oneshot::Sender<Value>)>,
}

#[derive(Debug)]
struct Session {
    link: Link,
    /// The identity whose `initialize` opened it.
    owner: String,
    pending: Mutex<Pending>,
    /// Server messages for the GET stream; one GET reads at a time, a later one takes over
    /// when it ends.
    events: Arc<tokio::sync::Mutex<mpsc::Receiver<Value>>>,
    last_used: Mutex<Instant>,
    ended: AtomicBool,
}

impl Session {
    fn new(link: Link, owner: &str) -> (Arc<Self>, mpsc::Sender<Value>) {
        let (tx, rx) = mpsc::channel(EVENTS_QUEUE);
        let s = Arc::new(Self {
            link,
            owner: owner.to_owned(),
            pending: Mutex::default(),
            events: Arc::new(tokio::sync::Mutex::new(rx)),
            last_used: Mutex::new(Instant::now()),
            ended: AtomicBool::new(false),
        });
        (s, tx)
    }

    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn last_used(&self) -> Instant {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The server side is gone: waiting requests fail (their senders drop).
    fn end(&self) {
        self.ended.store(true, Ordering::Release);
        self.pending().waiters.clear();
    }

    fn kill(&self) {
        match &self.link {
            Link::Child { child, .. } => {
                if let Some(mut c) = child.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    let _ = c.start_kill();
                }
            }
            Link::Sse { reader, .. } => {
                if let Some(r) = reader.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    r.abort();
                }
            }
        }
        self.end();
    }

    fn is_dead(&self) -> bool {
        if self.ended.load(Ordering::Acquire) {
            return true;
        }
        match &self.link {
            Link::Child { child, .. } => child
                .lock()
                .ok()
                .and_then(|mut c| c.as_mut().map(|c| c.try_wait().ok().flatten().is_some()))
                .unwrap_or(true),
            Link::Sse { .. } => false,
        }
    }

    /// Idle: no POST for `timeout`, nothing waiting, and no GET stream attached.
    fn is_idle(&self, timeout: Duration) -> bool {
        let idle = self.last_used.lock().map(|t| t.elapsed()).unwrap_or_default() >= timeout;
        idle && self.pending().waiters.is_empty() && self.events.try_lock().is_ok()
    }

    /// Routes one message from the server: an answer to its waiting request, anything
    /// else to the GET stream.
    fn deliver(&self, msg: Value, events: &mpsc::Sender<Value>) {
        if let Value::Array(items) = msg {
            for m in items {
                self.deliver(m, events);
            }
            return;
        }
        if msg.get("method").is_none()
            && let Some(id) = msg.get("id")
        {
            let waiter = self.pending().waiters.remove(&jsonrpc::id_key(id));
            match waiter {
                Some((_, w)) => {
                    if w.send(msg).is_err() {
                        tracing::debug!("an answer arrived for a request whose client left");
                    }
                }
                // Answers belong to a request; one nobody waits for (its client timed out)
                // is not sent anywhere else.
                None => tracing::debug!("dropping an answer no request waits for"),
            }
            return;
        }
        // Requests and notifications from the server go to the GET stream; dropped while
        // the queue is full (nobody reads), as the spec allows for a missing stream.
        if events.try_send(msg).is_err() {
            tracing::debug!("dropping a server message: no GET stream reads this session's messages");
        }
    }

    /// Registers the request ids of one POST. Refuses ids already waiting (two requests
    /// with one id would get each other's answers) and more than [`MAX_PENDING`] at once.
    fn register(&self, ids: &[&Value]) -> Result<Registration<'_>, (StatusCode, Value)> {
        let mut p = self.pending();
        if let Some(dup) = ids.iter().find(|id| p.waiters.contains_key(&jsonrpc::id_key(id))) {
            return Err((
                StatusCode::BAD_REQUEST,
                jsonrpc::error(
                    (*dup).clone(),
                    code::INVALID_REQUEST,
                    "a request with this id is already waiting for its answer in this session",
                    None,
                ),
            ));
        }
        if p.waiters.len() + ids.len() > MAX_PENDING {
            return Err((
                StatusCode::TOO_MANY_REQUESTS,
                jsonrpc::error(
                    Value::Null,
                    code::INVALID_REQUEST,
                    format!("too many requests waiting in this session (limit {MAX_PENDING})"),
                    None,
                ),
            ));
        }
        let mut reg = Registration { session: self, entries: Vec::new(), answers: Vec::new() };
        for id in ids {
            p.next += 1;
            let n = p.next;
            let (tx, rx) = oneshot::channel();
            let key = jsonrpc::id_key(id);
            p.waiters.insert(key.clone(), (n, tx));
            reg.entries.push((key, n));
            reg.answers.push(rx);
        }
        Ok(reg)
    }
}

/// Request ids waiting for answers; unregistered when dropped (answered or not).
struct Registration<'a> {
    session: &'a Session,
    entries: Vec<(String, u64)>,
    answers: Vec<oneshot::Receiver<Value>>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut p = self.session.pending();
        for (key, n) in &self.entries {
            if p.waiters.get(key).is_some_and(|(m, _)| m == n) {
                p.waiters.remove(key);
            }
        }
    }
}

/// A 2024-11-05 server's SSE stream, open and past its `endpoint` event.
#[derive(Debug)]
pub struct SseOpened {
    endpoint: Uri,
    body: RespBody,
    splitter: sse::Splitter,
    /// Events that arrived together with the endpoint event.
    first: Vec<Bytes>,
}

/// What a GET to a 2024-11-05 server's SSE endpoint gave.
#[derive(Debug)]
pub enum SseOpen {
    Open(SseOpened),
    /// The server refused (non-2xx): its answer, for the client.
    Refused(Response<RespBody>),
}

/// Headers of a client request that go upstream: not hop-by-hop ones, not the proxy's own
/// session id, not the body's framing.
fn upstream_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (k, v) in from {
        if k != header::HOST
            && k != header::CONTENT_LENGTH
            && k != header::ACCEPT_ENCODING
            && k != header::ACCEPT
            && k != header::CONTENT_TYPE
            && k.as_str() != "mcp-session-id"
            && k.as_str() != "last-event-id"
        {
            to.append(k.clone(), v.clone());
        }
    }
    strip_hop_by_hop(to);
    // Answers must be readable.
    to.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
}

/// GETs a 2024-11-05 server's SSE endpoint (with the client's credentials) and reads up to
/// its `endpoint` event. `Err(Protocol)`: it answered, but not as such a server does.
pub async fn open_sse(t: &SseTarget, headers: &HeaderMap) -> Result<SseOpen, UpstreamError> {
    let mut req = Request::get(t.uri.clone());
    if let Some(h) = req.headers_mut() {
        upstream_headers(headers, h);
        h.insert(header::ACCEPT, HeaderValue::from_static("text/event-stream"));
    }
    let req = req.body(Full::new(Bytes::new())).map_err(|_| UpstreamError::Protocol("cannot build the request"))?;
    let resp = tokio::time::timeout(t.timeout, t.client.send(req)).await.map_err(|_| UpstreamError::Timeout)?;
    // A GET: sent or not, nothing was acted on.
    let resp = resp.map_err(|e| if let UpstreamError::Lost(m) = e { UpstreamError::Connect(m) } else { e })?;
    if !resp.status().is_success() {
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        return Ok(SseOpen::Refused(Response::from_parts(parts, body)));
    }
    let is_sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/event-stream"));
    if !is_sse {
        return Err(UpstreamError::Protocol("the upstream's SSE endpoint did not answer with text/event-stream"));
    }
    let mut body: RespBody = resp.into_body();
    let mut splitter = sse::Splitter::default();
    let deadline = tokio::time::Instant::now() + ENDPOINT_WAIT.min(t.timeout);
    loop {
        let frame = tokio::time::timeout_at(deadline, body.frame()).await.map_err(|_| UpstreamError::Timeout)?;
        let data = match frame {
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
            _ => return Err(UpstreamError::Protocol("the upstream's SSE stream ended before its endpoint event")),
        };
        let events = splitter.push(&data).map_err(|_| UpstreamError::Protocol("oversized SSE event"))?;
        let mut events = events.into_iter();
        while let Some(ev) = events.next() {
            // Comments and retry hints carry no data.
            let Some(data) = sse::data(&ev) else { continue };
            if sse::event_type(&ev).as_deref() != Some("endpoint") {
                return Err(UpstreamError::Protocol("the upstream's SSE stream did not begin with an endpoint event"));
            }
            let endpoint = resolve_endpoint(&t.uri, data.trim())?;
            return Ok(SseOpen::Open(SseOpened { endpoint, body, splitter, first: events.collect() }));
        }
    }
}

/// The URL an `endpoint` event names, resolved against the SSE URL. It must be on the same
/// origin: the client's credentials go there.
pub fn resolve_endpoint(base: &Uri, reference: &str) -> Result<Uri, UpstreamError> {
    const OTHER_ORIGIN: UpstreamError =
        UpstreamError::Protocol("the upstream's endpoint event names another origin (refused)");
    const INVALID: UpstreamError = UpstreamError::Protocol("the upstream's endpoint event is not a valid URL");
    let scheme = base.scheme_str().unwrap_or("http");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or("");
    let text = if reference.contains("://") {
        reference.to_owned()
    } else if let Some(rest) = reference.strip_prefix("//") {
        format!("{scheme}://{rest}")
    } else if reference.starts_with('/') {
        format!("{scheme}://{authority}{reference}")
    } else if reference.starts_with('?') {
        format!("{scheme}://{authority}{}{reference}", base.path())
    } else {
        let path = base.path();
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        let dir = if dir.is_empty() { "/" } else { dir };
        format!("{scheme}://{authority}{dir}{reference}")
    };
    let uri: Uri = text.parse().map_err(|_| INVALID)?;
    if uri.scheme_str() != Some(scheme) || uri.authority().map(|a| a.as_str()) != Some(authority) {
        return Err(OTHER_ORIGIN);
    }
    Ok(uri)
}

/// Sessions keyed by the id the proxy gave out.
#[derive(Debug)]
pub struct Sessions {
    opener: Opener,
    max_sessions: usize,
    /// Sessions one identity may hold at once (its fair share of `max_sessions`).
    per_identity: usize,
    idle_timeout: Duration,
    call_timeout: Duration,
    map: Mutex<HashMap<String, Arc<Session>>>,
    /// Sessions being opened (counted against the limit).
    opening: AtomicUsize,
}

/// A place among the sessions, held while one is opened.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Sessions {
    pub fn new(
        opener: Opener,
        max_sessions: usize,
        per_identity: usize,
        idle_timeout: Duration,
        call_timeout: Duration,
    ) -> Arc<Self> {
        let s = Arc::new(Self {
            opener,
            max_sessions,
            per_identity: per_identity.clamp(1, max_sessions.max(1)),
            idle_timeout,
            call_timeout,
            map: Mutex::default(),
            opening: AtomicUsize::new(0),
        });
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

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reap(&self) {
        self.sessions().retain(|id, s| {
            let keep = !s.is_dead() && !s.is_idle(self.idle_timeout);
            if !keep {
                tracing::info!(session = %id, "ending upstream session (idle or gone)");
                s.kill();
            }
            keep
        });
    }

    pub fn session_count(&self) -> usize {
        self.sessions().len()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.sessions().contains_key(id)
    }

    pub fn shutdown(&self) {
        for (_, s) in self.sessions().drain() {
            s.kill();
        }
    }

    /// A place for a new session of `owner`. When `owner` holds its share, its least
    /// recently used idle session is ended to make room (else: refused); when every place
    /// is taken, anyone's least recently used idle session is (else: refused). Idle: no
    /// request waiting, no GET stream open, unused for [`RECLAIM_AFTER`].
    fn slot(&self, owner: &str) -> Result<Slot<'_>, UpstreamError> {
        if self.session_count() + self.opening.load(Ordering::Acquire) >= self.max_sessions {
            self.reap();
        }
        let mut map = self.sessions();
        if map.values().filter(|s| s.owner == owner).count() >= self.per_identity
            && !self.reclaim(&mut map, Some(owner))
        {
            return Err(UpstreamError::TooManySessionsFor(self.per_identity));
        }
        if map.len() + self.opening.load(Ordering::Acquire) >= self.max_sessions && !self.reclaim(&mut map, None) {
            return Err(UpstreamError::TooManySessions(self.max_sessions));
        }
        self.opening.fetch_add(1, Ordering::AcqRel);
        Ok(Slot(&self.opening))
    }

    /// Ends the least recently used idle session (of `owner`, if given). False: none.
    fn reclaim(&self, map: &mut HashMap<String, Arc<Session>>, owner: Option<&str>) -> bool {
        let after = RECLAIM_AFTER.min(self.idle_timeout);
        let victim = map
            .iter()
            .filter(|(_, s)| owner.is_none_or(|o| s.owner == o) && s.is_idle(after))
            .min_by_key(|(_, s)| s.last_used())
            .map(|(id, _)| id.clone());
        let Some(id) = victim.and_then(|id| map.remove_entry(&id)) else { return false };
        tracing::info!(session = %id.0, "ending an idle upstream session to make room for a new one");
        id.1.kill();
        true
    }

    /// One client request of session-holding transports; `owner` is the caller's
    /// identity (a new session is counted against its share).
    pub async fn send(
        &self,
        method: &Method,
        headers: &HeaderMap,
        body: Bytes,
        owner: &str,
    ) -> Result<Response<RespBody>, UpstreamError> {
        let sid = headers.get(mcp_headers::SESSION_ID).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let existing = sid.as_ref().and_then(|id| {
            let mut map = self.sessions();
            let s = map.get(id).cloned()?;
            if s.is_dead() {
                // The server side is gone (process exited, SSE stream ended): the session
                // is over, the client must initialize again.
                map.remove(id);
                s.kill();
                return None;
            }
            Some(s)
        });
        match *method {
            Method::DELETE => {
                let removed = sid.and_then(|id| self.sessions().remove(&id));
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
                let Ok(guard) = s.events.clone().try_lock_owned() else {
                    // One GET stream per session at a time.
                    return Ok(status_only(StatusCode::CONFLICT));
                };
                let stream = futures_util::stream::unfold(guard, |mut rx| async move {
                    let msg = rx.recv().await?;
                    let frame = Frame::data(Bytes::from(format!("event: message\ndata: {msg}\n\n")));
                    Some((Ok::<_, BoxError>(frame), rx))
                });
                let mut r = Response::new(StreamBody::new(stream).boxed());
                r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
                r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                Ok(r)
            }
            _ => self.post(sid, existing, headers, body, None, owner).await,
        }
    }

    /// A POST `initialize` whose 2024-11-05 SSE stream is already open (the transport was
    /// detected with it): starts the session on that stream.
    pub async fn start_opened(
        &self,
        opened: SseOpened,
        headers: &HeaderMap,
        body: Bytes,
        owner: &str,
    ) -> Result<Response<RespBody>, UpstreamError> {
        self.post(None, None, headers, body, Some(opened), owner).await
    }

    async fn post(
        &self,
        sid: Option<String>,
        existing: Option<Arc<Session>>,
        headers: &HeaderMap,
        body: Bytes,
        opened: Option<SseOpened>,
        owner: &str,
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
                let slot = self.slot(owner)?;
                let session = match (opened, &self.opener) {
                    (Some(o), Opener::Sse(t)) => start_sse(t, o, owner),
                    (_, Opener::Command(cmd)) => spawn_child(cmd, owner)?,
                    (None, Opener::Sse(t)) => match open_sse(t, headers).await? {
                        SseOpen::Open(o) => start_sse(t, o, owner),
                        SseOpen::Refused(resp) => return Ok(resp),
                    },
                };
                let id = new_session_id();
                self.sessions().insert(id.clone(), session.clone());
                drop(slot);
                (session, Some(id))
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
        let result = self.exchange(&session, headers, &body, &value, &messages).await;
        // A session whose initialize did not go through is nobody's: end it.
        if let Some(id) = &new_id
            && !result.as_ref().is_ok_and(|r| r.status().is_success())
            && let Some(s) = self.sessions().remove(id)
        {
            s.kill();
        }
        Ok(with_session(result?, new_id))
    }

    /// Sends one checked body to the session's server and waits for the answers to its
    /// requests.
    async fn exchange(
        &self,
        session: &Session,
        headers: &HeaderMap,
        body: &Bytes,
        value: &Value,
        messages: &[&Value],
    ) -> Result<Response<RespBody>, UpstreamError> {
        session.touch();
        let ids: Vec<&Value> =
            messages.iter().filter(|m| m.get("method").is_some()).filter_map(|m| m.get("id")).collect();
        let mut reg = match session.register(&ids) {
            Ok(r) => r,
            Err((status, refusal)) => return Ok(json_response(status, &refusal)),
        };
        match &session.link {
            Link::Child { stdin, .. } => {
                // One line per message: the body may have been pretty-printed.
                let mut line = serde_json::to_vec(value).map_err(|_| UpstreamError::Protocol("cannot encode"))?;
                line.push(b'\n');
                // A failed write may have delivered part or all of the line (the child may
                // act on it): the outcome is unknown, so its quota stays spent.
                let mut stdin = stdin.lock().await;
                stdin.write_all(&line).await.map_err(|e| UpstreamError::Lost(format!("MCP server stdin: {e}")))?;
                stdin.flush().await.map_err(|e| UpstreamError::Lost(format!("MCP server stdin: {e}")))?;
            }
            Link::Sse { endpoint, client, .. } => {
                if let Some(refused) = post_message(client, endpoint, headers, body.clone(), self.call_timeout).await? {
                    return Ok(refused);
                }
            }
        }
        if reg.answers.is_empty() {
            return Ok(status_only(StatusCode::ACCEPTED));
        }
        let deadline = tokio::time::Instant::now() + self.call_timeout;
        let mut answers = Vec::with_capacity(reg.answers.len());
        for rx in std::mem::take(&mut reg.answers) {
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(v)) => answers.push(v),
                Ok(Err(_)) => {
                    return Err(UpstreamError::Lost(match session.link {
                        Link::Child { .. } => "the MCP server process exited".into(),
                        Link::Sse { .. } => "the upstream's SSE stream ended".into(),
                    }));
                }
                Err(_) => return Err(UpstreamError::Lost("timed out waiting for the answer".into())),
            }
        }
        let out = if value.is_array() { Value::Array(answers) } else { answers.pop().unwrap_or(Value::Null) };
        Ok(json_response(StatusCode::OK, &out))
    }
}

/// POSTs one message (or batch) to a 2024-11-05 server's endpoint. `Some`: it refused
/// (non-2xx), with this answer for the client.
async fn post_message(
    client: &HttpClient,
    endpoint: &Uri,
    headers: &HeaderMap,
    body: Bytes,
    timeout: Duration,
) -> Result<Option<Response<RespBody>>, UpstreamError> {
    let mut req = Request::post(endpoint.clone());
    if let Some(h) = req.headers_mut() {
        upstream_headers(headers, h);
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json, text/event-stream"));
    }
    let req = req.body(Full::new(body)).map_err(|_| UpstreamError::Protocol("cannot build the request"))?;
    let resp = tokio::time::timeout(timeout, client.send(req))
        .await
        .map_err(|_| UpstreamError::Lost("timed out posting the message".into()))??;
    let (mut parts, body) = resp.into_parts();
    if parts.status.is_success() {
        // "Accepted": the answer comes on the SSE stream. Read the body so the connection
        // can be reused.
        let _ = tokio::time::timeout(timeout, Limited::new(body, 64 * 1024).collect()).await;
        return Ok(None);
    }
    strip_hop_by_hop(&mut parts.headers);
    Ok(Some(Response::from_parts(parts, body)))
}

fn spawn_child(command: &ChildCommand, owner: &str) -> Result<Arc<Session>, UpstreamError> {
    let mut child = spawn_server(command).map_err(|e| UpstreamError::Spawn(e.to_string()))?;
    let stdin = child.stdin.take().ok_or(UpstreamError::Spawn("no stdin".into()))?;
    let stdout = child.stdout.take().ok_or(UpstreamError::Spawn("no stdout".into()))?;
    let link = Link::Child { stdin: tokio::sync::Mutex::new(stdin), child: Mutex::new(Some(child)) };
    let (session, events) = Session::new(link, owner);
    let reader = session.clone();
    tokio::spawn(async move {
        let mut out = BufReader::new(stdout);
        loop {
            match crate::mcp::lines::read_line(&mut out, MAX_LINE_BYTES).await {
                Ok(Some(Ok(line))) => match serde_json::from_slice::<Value>(&line) {
                    Ok(msg) => reader.deliver(msg, &events),
                    Err(_) => tracing::debug!("ignoring a non-JSON line from the MCP server"),
                },
                Ok(Some(Err(()))) => tracing::warn!("ignoring a line over {MAX_LINE_BYTES} bytes from the MCP server"),
                Ok(None) | Err(_) => break,
            }
        }
        // The process ended: waiting calls fail.
        reader.end();
    });
    Ok(session)
}

/// Starts the session of an open 2024-11-05 SSE stream: a task reads its `message` events.
fn start_sse(t: &SseTarget, o: SseOpened, owner: &str) -> Arc<Session> {
    let SseOpened { endpoint, mut body, mut splitter, first } = o;
    let link = Link::Sse { endpoint, client: t.client.clone(), reader: Mutex::new(None) };
    let (session, events) = Session::new(link, owner);
    let reader = session.clone();
    let task = tokio::spawn(async move {
        let on_event = |ev: &[u8]| {
            // Only `message` events (the default type) carry JSON-RPC messages.
            if !matches!(sse::event_type(ev).as_deref(), None | Some("message")) {
                return;
            }
            match sse::data(ev).map(|d| serde_json::from_str::<Value>(&d)) {
                Some(Ok(msg)) => reader.deliver(msg, &events),
                Some(Err(_)) => tracing::debug!("ignoring a non-JSON message event from the upstream"),
                None => {}
            }
        };
        for ev in &first {
            on_event(ev);
        }
        loop {
            match body.frame().await {
                Some(Ok(f)) => {
                    let Ok(data) = f.into_data() else { continue };
                    match splitter.push(&data) {
                        Ok(evs) => evs.iter().for_each(|ev| on_event(ev)),
                        Err(e) => {
                            tracing::warn!(error = %e, "ending the upstream SSE session");
                            break;
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::info!(error = %e, "the upstream SSE stream failed");
                    break;
                }
                None => break,
            }
        }
        tracing::info!("the upstream ended its SSE stream: the session is over");
        reader.end();
    });
    if let Link::Sse { reader, .. } = &session.link {
        *reader.lock().unwrap_or_else(|p| p.into_inner()) = Some(task.abort_handle());
    }
    session
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_resolve_on_the_same_origin_only() {
        let base: Uri = "http://127.0.0.1:3000/mcp/sse".parse().expect("uri");
        for (reference, want) in [
            ("/messages?sessionId=a", "http://127.0.0.1:3000/messages?sessionId=a"),
            ("messages?sessionId=a", "http://127.0.0.1:3000/mcp/messages?sessionId=a"),
            ("?sessionId=a", "http://127.0.0.1:3000/mcp/sse?sessionId=a"),
            ("http://127.0.0.1:3000/m?x=1", "http://127.0.0.1:3000/m?x=1"),
            ("//127.0.0.1:3000/m", "http://127.0.0.1:3000/m"),
        ] {
            assert_eq!(resolve_endpoint(&base, reference).expect(reference).to_string(), want);
        }
        for bad in [
            "http://evil.example/messages",
            "//evil.example/m",
            "https://127.0.0.1:3000/m",
            "http://127.0.0.1:3001/m",
            "/with space",
        ] {
            assert!(resolve_endpoint(&base, bad).is_err(), "{bad}");
        }
    }
}
