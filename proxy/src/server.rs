//! The client-facing MCP endpoint (`/mcp`, Streamable HTTP) and the admin listener.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use toolgate_policy::Caller;

use crate::connections::{self, AcceptBackoff, Activity, Limits, Tracked};
use crate::frontdoor::{self, HostRules};
use crate::gate::{Checked, Gate, Tracker};
use crate::jsonrpc::{self, code};
use crate::legacy_clients::{self, LegacyClients};
use crate::metrics::Metrics;
use crate::owners::{Owners, Verdict};
use crate::sse;
use crate::upstream::Upstream;

/// A concrete body error type: boxed trait objects trip a higher-ranked lifetime
/// limitation of the compiler inside hyper's service bounds.
pub type BoxError = std::io::Error;
pub type RespBody = BoxBody<Bytes, BoxError>;
/// A client's request body: reading it past `--body-read-timeout-seconds` fails.
pub type ReqBody = connections::ReqBody;

/// Largest upstream JSON answer the proxy reads to inspect.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug)]
pub struct App {
    pub gate: Arc<Gate>,
    pub upstream: Upstream,
    pub max_body: usize,
    /// Clients of the 2024-11-05 HTTP+SSE transport (`/sse`, `/messages`).
    pub legacy: LegacyClients,
    /// Which caller opened which session.
    pub owners: Owners,
}

impl App {
    /// The caller of a request, bound to its session: `Err` is the answer that refuses it
    /// (a repeated identity header: 400; a session that is not this caller's: 404).
    /// For a stateless upstream a session id means nothing and is dropped, so a
    /// `scope: session` limit counts under the caller's identity.
    #[expect(clippy::result_large_err, reason = "the refusal is the response itself, built at most once per request")]
    fn bound_caller(&self, headers: &HeaderMap, policy: &crate::gate::Effective) -> Result<Caller, Response<RespBody>> {
        let mut caller = self.gate.caller(headers, policy).map_err(|e| {
            self.gate.metrics.caller_refused("ambiguous_caller");
            json_response(StatusCode::BAD_REQUEST, &e.answer())
        })?;
        if let Some(sid) = &caller.session {
            match self.owners.check(sid, &caller.identity) {
                Verdict::Own => {}
                Verdict::Stateless => caller.session = None,
                Verdict::NotFound => {
                    self.gate.metrics.caller_refused("session");
                    return Err(rpc_error(
                        StatusCode::NOT_FOUND,
                        code::INVALID_REQUEST,
                        "unknown session, or not this caller's: initialize again",
                    ));
                }
            }
        }
        Ok(caller)
    }
}

/// What the listeners check before a request reaches its handler.
#[derive(Debug)]
pub struct Front {
    /// Host and Origin allow-lists of the MCP listener.
    pub hosts: HostRules,
    /// Serve `/policy` to any peer of the admin listener, not only loopback ones.
    pub admin_policy_public: bool,
}

/// One listener: its name (the `listener` metric label), bounds and checks.
#[derive(Debug, Clone)]
pub struct Listen {
    pub name: &'static str,
    pub limits: Limits,
    pub front: Arc<Front>,
}

/// The connection a request came on.
#[derive(Debug, Clone)]
pub struct Conn {
    pub peer: SocketAddr,
    pub front: Arc<Front>,
}

pub fn full(bytes: impl Into<Bytes>) -> RespBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

pub fn json_response(status: StatusCode, value: &Value) -> Response<RespBody> {
    let mut r = Response::new(full(serde_json::to_vec(value).unwrap_or_default()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn rpc_error(status: StatusCode, code: i64, message: impl Into<String>) -> Response<RespBody> {
    json_response(status, &jsonrpc::error(Value::Null, code, message, None))
}

/// Routes `/mcp` (Streamable HTTP) and the 2024-11-05 HTTP+SSE endpoints `/sse` and
/// `/messages`; everything else is 404. Before anything else, `Host` and `Origin` must be
/// allowed (DNS-rebinding protection); a request whose body did not arrive in time gets 408
/// and the connection is closed.
pub async fn handle(app: Arc<App>, conn: Conn, req: Request<ReqBody>) -> Result<Response<RespBody>, Infallible> {
    let started = Instant::now();
    if let Err(refusal) = conn.front.hosts.check(req.headers(), req.uri().authority().map(|a| a.as_str())) {
        app.gate.metrics.connections.request_refused(refusal.reason);
        let resp = rpc_error(StatusCode::FORBIDDEN, code::INVALID_REQUEST, refusal.message);
        app.gate.metrics.request(Metrics::method_label(""), resp.status().as_u16(), started.elapsed().as_secs_f64());
        return Ok(resp);
    }
    let body_timed_out = req.body().timed_out();
    let (mut resp, method) = match (req.uri().path(), req.method()) {
        ("/mcp", &Method::POST) => post(&app, req).await,
        ("/mcp", &Method::GET) => (forward_stream(&app, req).await, "get"),
        ("/mcp", &Method::DELETE) => (forward_stream(&app, req).await, "delete"),
        ("/mcp", _) => (not_allowed("POST, GET, DELETE"), Metrics::method_label("")),
        ("/sse", &Method::GET) => (legacy_clients::open(&app, req.headers()), "get"),
        ("/sse", _) => (not_allowed("GET"), Metrics::method_label("")),
        ("/messages", &Method::POST) => legacy_clients::message(&app, req).await,
        ("/messages", _) => (not_allowed("POST"), Metrics::method_label("")),
        _ => (
            rpc_error(
                StatusCode::NOT_FOUND,
                code::INVALID_REQUEST,
                "not found: the MCP endpoint is /mcp (and /sse, /messages for 2024-11-05 clients)",
            ),
            Metrics::method_label(""),
        ),
    };
    if body_timed_out.load(Ordering::Relaxed) {
        app.gate.metrics.connections.timeout("mcp", "body");
        resp = rpc_error(
            StatusCode::REQUEST_TIMEOUT,
            code::INVALID_REQUEST,
            "the request body did not arrive in time (--body-read-timeout-seconds)",
        );
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    app.gate.metrics.request(method, resp.status().as_u16(), started.elapsed().as_secs_f64());
    Ok(resp)
}

fn not_allowed(allow: &'static str) -> Response<RespBody> {
    let mut r = rpc_error(StatusCode::METHOD_NOT_ALLOWED, code::INVALID_REQUEST, format!("use {allow}"));
    r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// A client's POST: parsed and checked, then forwarded (or answered by the proxy).
pub async fn post(app: &App, req: Request<ReqBody>) -> (Response<RespBody>, &'static str) {
    let (parts, body) = req.into_parts();
    let ct = header_str(&parts.headers, "content-type").unwrap_or("");
    if !ct.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")) {
        return (
            rpc_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                code::INVALID_REQUEST,
                "Content-Type must be application/json",
            ),
            "_other",
        );
    }
    // Encoded bodies would be checked as bytes the upstream reads differently: refuse.
    if let Some(enc) = parts.headers.get(header::CONTENT_ENCODING)
        && !enc.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        return (
            rpc_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                code::INVALID_REQUEST,
                "Content-Encoding is not supported: send the body uncompressed",
            ),
            "_other",
        );
    }
    let too_large = || {
        rpc_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            code::INVALID_REQUEST,
            format!("body larger than {} bytes", app.max_body),
        )
    };
    if header_str(&parts.headers, "content-length")
        .and_then(|l| l.parse::<u64>().ok())
        .is_some_and(|l| l > app.max_body as u64)
    {
        return (too_large(), "_other");
    }
    let bytes = match Limited::new(body, app.max_body).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return (too_large(), "_other"),
    };
    let parsed = match jsonrpc::parse_body(&bytes) {
        Ok(b) => b,
        Err(e) => return (rpc_error(StatusCode::BAD_REQUEST, e.code(), e.to_string()), "_other"),
    };
    let method = if parsed.batch {
        "batch"
    } else {
        match parsed.messages[0].kind() {
            jsonrpc::Kind::Request { method, .. } | jsonrpc::Kind::Notification { method } => {
                Metrics::method_label(method)
            }
            jsonrpc::Kind::Response => "response",
            jsonrpc::Kind::Invalid => "_other",
        }
    };
    let policy = app.gate.current();
    let caller = match app.bound_caller(&parts.headers, &policy) {
        Ok(c) => c,
        Err(refusal) => return (refusal, method),
    };
    let checked = app.gate.check(
        &parsed,
        &caller,
        &policy,
        header_str(&parts.headers, "mcp-method"),
        header_str(&parts.headers, "mcp-name"),
    );
    // Over Streamable HTTP the upstream matches answers to requests by id within the
    // session: two waiting requests with one id are refused here (child processes and
    // 2024-11-05 upstreams are the proxy's own sessions, which refuse them themselves).
    let claim_ids: Vec<String> = match (&caller.session, &app.upstream) {
        (Some(_), Upstream::Http(_)) if matches!(checked, Checked::Forward(_) | Checked::Hold(_)) => parsed
            .messages
            .iter()
            .filter_map(|m| match m.kind() {
                jsonrpc::Kind::Request { id, .. } => Some(jsonrpc::id_key(id)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    drop(parsed);
    let mut tracker = match checked {
        Checked::Answer(v) => {
            let status = if v.get("error").is_some_and(|e| e["code"] == code::INVALID_REQUEST) && !v.is_array() {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::OK
            };
            return (json_response(status, &v), method);
        }
        Checked::Forward(t) => t,
        // Waits (this request stays open) until a person decides; dropping this future
        // (the client went away) cancels the approval.
        Checked::Hold(h) => match h.approvals.clone().wait(app.gate.clone(), h).await {
            Ok(t) => t,
            Err(v) => return (json_response(StatusCode::OK, &v), method),
        },
    };
    if let Some(sid) = &caller.session
        && !claim_ids.is_empty()
    {
        match app.owners.claim(sid, claim_ids) {
            Some(claim) => tracker.keep_until_settled(claim),
            None => {
                tracker.rollback_all();
                app.gate.metrics.caller_refused("duplicate_id");
                return (
                    rpc_error(
                        StatusCode::BAD_REQUEST,
                        code::INVALID_REQUEST,
                        "a request with this id is already waiting for its answer in this session",
                    ),
                    method,
                );
            }
        }
    }
    let resp = match app.upstream.send(&parts.method, &parts.headers, bytes, &caller.identity).await {
        Ok(r) => r,
        Err(e) => {
            if e.maybe_delivered() {
                tracker.keep_spent();
            } else {
                tracker.rollback_all();
            }
            app.gate.metrics.upstream_error(e.kind());
            tracing::warn!(error = %e, "upstream request failed");
            return (
                rpc_error(StatusCode::BAD_GATEWAY, code::UPSTREAM, format!("upstream MCP server failed: {e}")),
                method,
            );
        }
    };
    if caller.session.is_none()
        && resp.status().is_success()
        && let Some(sid) = resp.headers().get("mcp-session-id").and_then(|v| v.to_str().ok())
    {
        app.owners.opened(sid, &caller.identity);
    }
    (answer(app, resp, tracker, caller).await, method)
}

/// Passes an upstream answer to the client, inspecting what must be inspected.
pub async fn answer(app: &App, resp: Response<RespBody>, mut tracker: Tracker, caller: Caller) -> Response<RespBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if !parts.status.is_success() {
        if parts.status.is_client_error() {
            // Refused as a request (bad session, credentials, shape…): nothing ran.
            tracker.rollback_all();
        } else {
            // A server error may come after the work began: the units stay spent.
            tracker.keep_spent();
            if parts.status.is_server_error() {
                app.gate.metrics.upstream_error("status");
            }
        }
        return Response::from_parts(parts, body);
    }
    let ct = header_str(&parts.headers, "content-type").unwrap_or("").to_ascii_lowercase();
    if ct.starts_with("text/event-stream") {
        // Events may be rewritten, so the upstream's length no longer holds.
        parts.headers.remove(header::CONTENT_LENGTH);
        return Response::from_parts(parts, sse_body(app, body, tracker, caller));
    }
    if tracker.is_empty() || !ct.starts_with("application/json") {
        // Nothing to inspect (202 for notifications, etc.). A call accepted without an
        // answer here may still complete (answered on another stream): it stays spent.
        tracker.keep_spent();
        return Response::from_parts(parts, body);
    }
    let bytes = match Limited::new(body, MAX_ANSWER_BYTES).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            // The upstream accepted the request (2xx) and may have acted on it.
            tracker.keep_spent();
            app.gate.metrics.upstream_error("body");
            return rpc_error(StatusCode::BAD_GATEWAY, code::UPSTREAM, format!("upstream answer unreadable: {e}"));
        }
    };
    let out = match app.gate.inspect_body(&bytes, &mut tracker, &caller) {
        Some(v) => Bytes::from(v),
        None => bytes,
    };
    tracker.keep_spent();
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, full(out))
}

/// Streams SSE from the upstream, inspecting each event's JSON-RPC message.
fn sse_body(app: &App, mut body: RespBody, mut tracker: Tracker, caller: Caller) -> RespBody {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(16);
    let gate = app.gate.clone();
    tokio::spawn(async move {
        let mut splitter = sse::Splitter::default();
        loop {
            match body.frame().await {
                None => break,
                Some(Err(e)) => {
                    gate.metrics.upstream_error("stream");
                    let _ = tx.send(Err(e)).await;
                    break;
                }
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    let events = match splitter.push(&data) {
                        Ok(ev) => ev,
                        Err(e) => {
                            gate.metrics.upstream_error("stream");
                            let _ = tx.send(Err(std::io::Error::other(e))).await;
                            break;
                        }
                    };
                    for ev in events {
                        let out = rewrite_event(&gate, ev, &mut tracker, &caller);
                        if tx.send(Ok(Frame::data(out))).await.is_err() {
                            // The client left; the upstream may still complete the call,
                            // so its quota stays spent.
                            return;
                        }
                    }
                }
            }
        }
        let rest = splitter.rest();
        if !rest.is_empty() {
            let _ = tx.send(Ok(Frame::data(rest))).await;
        }
        // The upstream ended the stream without answering these calls. The client may
        // resume the stream and still get the answers, so the calls stay spent: only a
        // definite failure gives quota back.
        tracker.keep_spent();
    });
    StreamBody::new(ReceiverStream::new(rx)).boxed()
}

fn rewrite_event(gate: &Gate, event: Bytes, tracker: &mut Tracker, caller: &Caller) -> Bytes {
    let Some(data) = sse::data(&event) else { return event };
    match gate.inspect_body(data.as_bytes(), tracker, caller).and_then(|b| String::from_utf8(b).ok()) {
        Some(new) => sse::replace_data(&event, &new),
        None => event,
    }
}

/// GET (the server-to-client stream) and DELETE (end of session) go straight through;
/// SSE answers are still inspected so a replayed tools/list result is filtered.
async fn forward_stream(app: &App, req: Request<ReqBody>) -> Response<RespBody> {
    let (parts, _body) = req.into_parts();
    let policy = app.gate.current();
    let caller = match app.bound_caller(&parts.headers, &policy) {
        Ok(c) => c,
        Err(refusal) => return refusal,
    };
    match app.upstream.send(&parts.method, &parts.headers, Bytes::new(), &caller.identity).await {
        Ok(resp) => {
            if parts.method == Method::DELETE
                && resp.status().is_success()
                && let Some(sid) = &caller.session
            {
                app.owners.closed(sid);
            }
            answer(app, resp, Tracker::default(), caller).await
        }
        Err(e) => {
            app.gate.metrics.upstream_error(e.kind());
            rpc_error(StatusCode::BAD_GATEWAY, code::UPSTREAM, format!("upstream MCP server failed: {e}"))
        }
    }
}

/// Typed names: removing by `&str` parses the name again on every call.
const HOP_BY_HOP: [header::HeaderName; 9] = [
    header::CONNECTION,
    header::HeaderName::from_static("keep-alive"),
    header::HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    for name in &HOP_BY_HOP {
        h.remove(name);
    }
}

/// The admin listener: `/metrics`, `/healthz`, `/readyz`, `/policy` (to loopback peers
/// only, unless `--admin-policy-public`: it holds the whole policy, grants included).
pub async fn admin(app: Arc<App>, conn: Conn, req: Request<ReqBody>) -> Result<Response<RespBody>, Infallible> {
    let policy = app.gate.current();
    let text = |status: StatusCode, body: String, ct: &'static str| {
        let mut r = Response::new(full(body));
        *r.status_mut() = status;
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
        r
    };
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            app.gate.metrics.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        (&Method::GET, "/readyz") if policy.is_empty() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "no policy loaded: every tool call is refused\n".into(), "text/plain")
        }
        (&Method::GET, "/readyz") => {
            // The store's state is shown, not a reason to be taken out of the Service: calls
            // without limits still work while it is down (limited ones fail closed).
            let store = app.gate.metrics.store.readiness().map(|s| format!("{s}\n")).unwrap_or_default();
            text(StatusCode::OK, format!("ok revision {}\n{store}", policy.revision), "text/plain")
        }
        (&Method::GET, "/policy") if !frontdoor::policy_visible(conn.peer, conn.front.admin_policy_public) => {
            app.gate.metrics.connections.request_refused("admin_policy");
            text(
                StatusCode::FORBIDDEN,
                "/policy is served to loopback peers only: reach it through the pod's loopback \
                 (kubectl port-forward pod/NAME 15090, then curl http://127.0.0.1:15090/policy), \
                 or start the proxy with --admin-policy-public\n"
                    .into(),
                "text/plain",
            )
        }
        (&Method::GET, "/policy") => {
            let docs: Vec<Value> = policy
                .documents()
                .map(|(name, doc, mode)| json!({"name": name, "mode": mode, "document": doc}))
                .collect();
            json_response(
                StatusCode::OK,
                &json!({
                    "revision": policy.revision,
                    "source": policy.source.as_str(),
                    "loaded": !policy.is_empty(),
                    "documents": docs,
                }),
            )
        }
        _ => text(StatusCode::NOT_FOUND, "not found: /metrics /healthz /readyz /policy\n".into(), "text/plain"),
    })
}

/// Accepts connections until `shutdown` resolves, then lets in-flight ones finish.
///
/// Each connection gets the listener's bounds: a request head must arrive within
/// `header_read`, a body within `body_read` of its head, and a connection with no request
/// in flight is closed after `idle` (a waiting call or an open stream is in flight). Over
/// `max_connections`, a connection gets 503 and is closed. A failed accept (out of file
/// descriptors…) is followed by a pause (10 ms doubling to 1 s) and logged at most once a
/// second.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    listen: Listen,
    app: Arc<App>,
    handler: F,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) where
    F: Fn(Arc<App>, Conn, Request<ReqBody>) -> Fut + Copy + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<RespBody>, Infallible>> + Send + 'static,
{
    let Listen { name, limits, front } = listen;
    let metrics = app.gate.metrics.clone();
    let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.header_read);
    let builder = Arc::new(builder);
    let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let slots = Arc::new(Semaphore::new(max));
    let refusals = Arc::new(Semaphore::new(connections::MAX_REFUSALS_IN_FLIGHT));
    let mut backoff = AcceptBackoff::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => break,
        };
        let (stream, peer): (_, SocketAddr) = match accepted {
            Ok(a) => {
                backoff.success();
                a
            }
            Err(e) => {
                metrics.connections.accept_error(name);
                let (wait, log) = backoff.failure(e.kind(), Instant::now());
                if let Some(suppressed) = log {
                    tracing::warn!(listener = name, error = %e, suppressed, retry_in_ms = wait.as_millis() as u64, "accept failed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = shutdown.changed() => break,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.connections.refused(name);
            connections::refuse(stream, &refusals, max);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Activity::default();
        let svc = {
            let app = app.clone();
            let activity = activity.clone();
            let conn = Conn { peer, front: front.clone() };
            let body_read = limits.body_read;
            hyper::service::service_fn(move |req: Request<Incoming>| {
                let in_flight = activity.begin();
                let fut = handler(app.clone(), conn.clone(), req.map(|b| ReqBody::new(b, body_read)));
                async move {
                    let resp = fut.await?;
                    Ok::<_, Infallible>(resp.map(|b| Tracked::new(b, in_flight)))
                }
            })
        };
        let builder = builder.clone();
        let metrics = metrics.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            metrics.connections.opened(name, 1);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let mut closing = false;
            let result = loop {
                tokio::select! {
                    r = conn.as_mut() => break r,
                    _ = activity.idle_for(limits.idle), if !closing => {
                        metrics.connections.timeout(name, "idle");
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = shutdown.changed(), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            };
            if let Err(e) = result {
                if e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout) {
                    metrics.connections.timeout(name, "header");
                }
                tracing::debug!(error = %e, "connection ended with an error");
            }
            metrics.connections.opened(name, -1);
        });
    }
    drop(listener);
    // In-flight calls get a bounded time to finish (every connection holds a slot).
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(Duration::from_secs(10), slots.acquire_many(all)).await;
}
