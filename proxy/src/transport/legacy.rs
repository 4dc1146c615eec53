//! The 2024-11-05 HTTP+SSE transport towards clients. `GET /sse` opens a session: the
//! first event, `endpoint`, names `/messages?sessionId=ID`; the client POSTs each message
//! there and gets every answer and every server message as an SSE `message` event on its
//! `/sse` stream.
//!
//! Each POSTed message goes through exactly what a POST to `/mcp` goes through
//! ([`mcp_http::post`]: the same parsing, checks, refusals, quota and tools/list filtering);
//! what would have been the HTTP answer is turned into events. Towards the upstream the
//! proxy acts as a Streamable-HTTP client would: it keeps the `Mcp-Session-Id` the upstream
//! gave and holds the session's GET stream, whose messages also go to `/sse`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::gate::Tracker;
use crate::mcp::headers as mcp_headers;
use crate::mcp::jsonrpc::{self, code};
use crate::mcp::sse;
use crate::telemetry::metrics::CallerRefusal;
use crate::transport::http::{BoxError, ReqBody, RespBody, full, json_response};
use crate::transport::mcp_http::{self, App};
use crate::transport::sessions::new_session_id;

/// Events queued for one client's `/sse` stream before senders wait.
const QUEUE: usize = 64;
/// A comment is sent on an idle `/sse` stream this often, so dead clients are noticed.
const KEEPALIVE: Duration = Duration::from_secs(30);
/// Largest JSON answer turned into events (as for `/mcp`).
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// Open `/sse` sessions.
#[derive(Debug)]
pub struct LegacyClients {
    /// What their messages go through, as POSTs to `/mcp` do.
    pub app: Arc<App>,
    map: Mutex<HashMap<String, Arc<ClientSession>>>,
    max: usize,
}

#[derive(Debug)]
struct ClientSession {
    /// The identity that opened the `/sse` stream: only it may post messages to it.
    owner: String,
    /// Events for the client's `/sse` stream.
    tx: mpsc::Sender<Bytes>,
    /// The upstream's `Mcp-Session-Id`, once it gave one.
    upstream_session: Mutex<Option<HeaderValue>>,
    /// Headers of the client's last message (credentials for the GET stream and DELETE).
    headers: Mutex<HeaderMap>,
    pump_started: AtomicBool,
    pump: Mutex<Option<tokio::task::AbortHandle>>,
}

impl ClientSession {
    fn upstream_session(&self) -> Option<HeaderValue> {
        self.upstream_session.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl LegacyClients {
    pub fn new(app: Arc<App>, max: usize) -> Self {
        Self { app, map: Mutex::default(), max }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ClientSession>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Removes the session when its `/sse` stream goes away (the client left): stops its GET
/// stream upstream and ends the upstream session.
struct Closer {
    legacy: Arc<LegacyClients>,
    id: String,
}

impl Drop for Closer {
    fn drop(&mut self) {
        let Some(session) = self.legacy.sessions().remove(&self.id) else { return };
        if let Some(p) = session.pump.lock().unwrap_or_else(|p| p.into_inner()).take() {
            p.abort();
        }
        let (Some(sid), Ok(rt)) = (session.upstream_session(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        let mut headers = session.headers.lock().unwrap_or_else(|p| p.into_inner()).clone();
        headers.insert(mcp_headers::SESSION_ID, sid);
        let app = self.legacy.app.clone();
        rt.spawn(async move {
            let owner = app.gate.caller(&headers, &app.gate.current()).map(|c| c.identity).unwrap_or_default();
            if let Some(sid) = headers.get(mcp_headers::SESSION_ID).and_then(|v| v.to_str().ok()) {
                app.owners.closed(sid);
            }
            if let Err(e) = app.upstream.send(&Method::DELETE, &headers, Bytes::new(), &owner).await {
                tracing::debug!(error = %e, "could not end the upstream session of a closed /sse stream");
            }
        });
    }
}

/// `GET /sse`: a new session of the caller; its stream begins with the `endpoint` event.
pub fn open(legacy: &Arc<LegacyClients>, headers: &HeaderMap) -> Response<RespBody> {
    let app = &legacy.app;
    let owner = match app.gate.caller(headers, &app.gate.current()) {
        Ok(c) => c.identity,
        Err(e) => {
            app.gate.telemetry.metrics.caller_refused(CallerRefusal::AmbiguousCaller);
            return json_response(StatusCode::BAD_REQUEST, &e.answer());
        }
    };
    let (tx, rx) = mpsc::channel::<Bytes>(QUEUE);
    let id = new_session_id();
    {
        let mut map = legacy.sessions();
        if map.len() >= legacy.max {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &jsonrpc::error(
                    Value::Null,
                    code::INVALID_REQUEST,
                    format!("too many /sse sessions (limit {})", legacy.max),
                    None,
                ),
            );
        }
        let session = ClientSession {
            owner,
            tx: tx.clone(),
            upstream_session: Mutex::default(),
            headers: Mutex::default(),
            pump_started: AtomicBool::new(false),
            pump: Mutex::default(),
        };
        map.insert(id.clone(), Arc::new(session));
    }
    // The queue is empty: this cannot fail.
    let _ = tx.try_send(Bytes::from(format!("event: endpoint\ndata: /messages?sessionId={id}\n\n")));
    drop(tx);
    let closer = Closer { legacy: legacy.clone(), id };
    let stream = futures_util::stream::unfold((rx, closer), |(mut rx, closer)| async move {
        let frame = match tokio::time::timeout(KEEPALIVE, rx.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => return None,
            Err(_) => Bytes::from_static(b": keepalive\n\n"),
        };
        Some((Ok::<_, BoxError>(Frame::data(frame)), (rx, closer)))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `POST /messages?sessionId=ID`: checked and forwarded exactly as a POST to `/mcp`. A
/// refusal at the HTTP level (415, 413, 400 for unparsable bodies, 502…) answers the POST
/// itself; otherwise the POST gets 202 and the JSON-RPC answers (the proxy's refusals
/// included) arrive on `/sse`.
pub async fn message(legacy: &Arc<LegacyClients>, mut req: Request<ReqBody>) -> (Response<RespBody>, &'static str) {
    let app = &legacy.app;
    let id = req.uri().query().and_then(session_param);
    let session = id.and_then(|id| legacy.sessions().get(&id).cloned());
    // Another identity's session is as unknown as a closed one: it cannot post into it
    // (its answers would go to the owner's stream).
    let caller = app.gate.caller(req.headers(), &app.gate.current()).map(|c| c.identity).ok();
    let session = session.filter(|s| {
        let own = caller.as_deref() == Some(s.owner.as_str());
        if !own {
            app.gate.telemetry.metrics.caller_refused(CallerRefusal::Session);
        }
        own
    });
    let Some(session) = session else {
        return (
            json_response(
                StatusCode::NOT_FOUND,
                &jsonrpc::error(Value::Null, code::INVALID_REQUEST, "unknown session: open /sse again", None),
            ),
            "_other",
        );
    };
    // The client's session is the proxy's; upstream, the one the upstream gave.
    let headers = req.headers_mut();
    headers.remove(mcp_headers::SESSION_ID);
    if let Some(sid) = session.upstream_session() {
        headers.insert(mcp_headers::SESSION_ID, sid);
    }
    // As a Streamable-HTTP client: both answer kinds are understood (turned into events).
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json, text/event-stream"));
    let client_headers = headers.clone();
    let (resp, method) = mcp_http::post(app, req).await;
    if !resp.status().is_success() {
        return (resp, method);
    }
    if let Some(sid) = resp.headers().get(mcp_headers::SESSION_ID) {
        let mut s = session.upstream_session.lock().unwrap_or_else(|p| p.into_inner());
        if s.is_none() {
            *s = Some(sid.clone());
        }
    }
    *session.headers.lock().unwrap_or_else(|p| p.into_inner()) = client_headers;
    // The upstream session's GET stream (its own requests and notifications), once it is
    // initialized. A server that gives no session id has no such stream.
    if method != "initialize"
        && session.upstream_session().is_some()
        && !session.pump_started.swap(true, Ordering::AcqRel)
    {
        let task = tokio::spawn(pump(app.clone(), Arc::downgrade(&session)));
        *session.pump.lock().unwrap_or_else(|p| p.into_inner()) = Some(task.abort_handle());
    }
    let (parts, body) = resp.into_parts();
    let ct = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    if ct.starts_with("text/event-stream") {
        let tx = session.tx.clone();
        tokio::spawn(async move {
            forward_events(body, &tx).await;
        });
    } else if ct.starts_with("application/json") {
        match Limited::new(body, MAX_ANSWER_BYTES).collect().await {
            Ok(c) => {
                if let Ok(v) = serde_json::from_slice::<Value>(&c.to_bytes()) {
                    send_messages(v, &session.tx).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "an upstream answer could not be read for an /sse client"),
        }
    }
    let mut r = Response::new(full("Accepted"));
    *r.status_mut() = StatusCode::ACCEPTED;
    (r, method)
}

/// The `sessionId` of a `/messages` query, percent-decoded; none when it is missing or
/// given more than once (which copy counts would be the client's choice).
fn session_param(query: &str) -> Option<String> {
    let mut ids = form_urlencoded::parse(query.as_bytes()).filter(|(k, _)| k == "sessionId").map(|(_, v)| v);
    let id = ids.next()?;
    ids.next().is_none().then(|| id.into_owned())
}

/// Sends a JSON-RPC message, or each message of a batch, as `message` events.
async fn send_messages(v: Value, tx: &mpsc::Sender<Bytes>) -> bool {
    let items = match v {
        Value::Array(items) => items,
        v => vec![v],
    };
    for m in items {
        if tx.send(sse::message_event(&m.to_string())).await.is_err() {
            return false;
        }
    }
    true
}

/// Turns an SSE answer (already inspected) into `message` events, until it ends or the
/// client leaves. False when the client left.
async fn forward_events(mut body: RespBody, tx: &mpsc::Sender<Bytes>) -> bool {
    let mut splitter = sse::Splitter::default();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        let Ok(data) = frame.into_data() else { continue };
        let Ok(events) = splitter.push(&data) else { break };
        for ev in events {
            if !matches!(sse::event_type(&ev).as_deref(), None | Some("message")) {
                continue;
            }
            let Some(Ok(v)) = sse::data(&ev).map(|d| serde_json::from_str::<Value>(&d)) else { continue };
            if !send_messages(v, tx).await {
                return false;
            }
        }
    }
    true
}

/// Holds the upstream session's GET stream for a `/sse` client, reconnecting while the
/// upstream offers one.
async fn pump(app: Arc<App>, session: Weak<ClientSession>) {
    loop {
        let Some((tx, mut headers)) =
            session.upgrade().map(|s| (s.tx.clone(), s.headers.lock().unwrap_or_else(|p| p.into_inner()).clone()))
        else {
            return;
        };
        for h in [header::CONTENT_TYPE, header::CONTENT_LENGTH] {
            headers.remove(h);
        }
        headers.remove("mcp-method");
        headers.remove("mcp-name");
        headers.insert(header::ACCEPT, HeaderValue::from_static("text/event-stream"));
        let policy = app.gate.current();
        // The headers of a POST that passed the same check.
        let Ok(caller) = app.gate.caller(&headers, &policy) else { return };
        let resp = match app.upstream.send(&Method::GET, &headers, Bytes::new(), &caller.identity).await {
            Ok(r) if r.status().is_success() => r,
            // No GET stream offered (405, a stateless server) or none any more.
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(error = %e, "the upstream GET stream for an /sse client failed");
                return;
            }
        };
        // The same inspection as a client's own GET stream on /mcp.
        let resp = mcp_http::answer(&app, resp, Tracker::default(), caller).await;
        if !forward_events(resp.into_body(), &tx).await {
            return;
        }
        drop(tx);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_id_is_read_once_and_decoded() {
        assert_eq!(session_param("sessionId=abc").as_deref(), Some("abc"));
        assert_eq!(session_param("x=1&sessionId=a%2Fb").as_deref(), Some("a/b"));
        assert_eq!(session_param("sessionId=a&sessionId=b"), None, "which copy counts must not be the client's choice");
        assert_eq!(session_param("sessionid=a"), None);
        assert_eq!(session_param(""), None);
    }
}
