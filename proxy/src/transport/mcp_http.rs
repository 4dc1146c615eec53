//! MCP over Streamable HTTP towards the client: a POST is parsed once, checked by the
//! gate, held for approval if it must be, forwarded, and its answers inspected; GET and
//! DELETE go straight through (SSE answers still inspected).

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderMap};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use toolgate_policy::Caller;

use crate::gate::{Checked, Gate, Tracker};
use crate::mcp::headers;
use crate::mcp::jsonrpc::{self, code};
use crate::mcp::sse;
use crate::telemetry::metrics::{CallerRefusal, Metrics, UpstreamFailure};
use crate::transport::http::{
    BoxError, ReqBody, RespBody, full, header_str, json_response, rpc_error, strip_hop_by_hop,
};
use crate::transport::owners::{Owners, Verdict};
use crate::transport::upstream::Upstream;

/// Largest upstream JSON answer the proxy reads to inspect.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug)]
pub struct App {
    pub gate: Arc<Gate>,
    pub upstream: Upstream,
    pub max_body: usize,
    /// Which caller opened which session.
    pub owners: Owners,
}

impl App {
    /// The caller of a request, bound to its session: `Err` is the answer that refuses it
    /// (a repeated identity header: 400; a session that is not this caller's: 404).
    /// For a stateless upstream a session id means nothing and is dropped, so a
    /// `scope: session` limit counts under the caller's identity.
    #[expect(clippy::result_large_err, reason = "the refusal is the response itself, built at most once per request")]
    fn bound_caller(&self, headers: &HeaderMap, policy: &crate::live::Effective) -> Result<Caller, Response<RespBody>> {
        let mut caller = self.gate.caller(headers, policy).map_err(|e| {
            self.gate.telemetry.metrics.caller_refused(CallerRefusal::AmbiguousCaller);
            json_response(StatusCode::BAD_REQUEST, &e.answer())
        })?;
        if let Some(sid) = &caller.session {
            match self.owners.check(sid, &caller.identity) {
                Verdict::Own => {}
                Verdict::Stateless => caller.session = None,
                Verdict::NotFound => {
                    self.gate.telemetry.metrics.caller_refused(CallerRefusal::Session);
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

/// A client's POST: parsed and checked, then forwarded (or answered by the proxy).
pub async fn post(app: &App, req: Request<ReqBody>) -> (Response<RespBody>, &'static str) {
    let (parts, body) = req.into_parts();
    let ct = header_str(&parts.headers, header::CONTENT_TYPE).unwrap_or("");
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
    if header_str(&parts.headers, header::CONTENT_LENGTH)
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
        header_str(&parts.headers, headers::METHOD),
        header_str(&parts.headers, headers::NAME),
    );
    // Over Streamable HTTP the upstream matches answers to requests by id within the
    // session: two waiting requests with one id are refused here (child processes and
    // 2024-11-05 upstreams are the proxy's own sessions, which refuse them themselves).
    let claim_ids: Vec<String> = match (&caller.session, &app.upstream) {
        (Some(_), Upstream::Http(_)) if matches!(checked, Checked::Forward(_) | Checked::Hold(_)) => parsed
            .messages
            .iter()
            .filter_map(|m| match m.kind() {
                jsonrpc::Kind::Request { key, .. } => Some(key.to_owned()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    drop(parsed);
    let mut tracker = match checked {
        Checked::Refuse(r) => return (json_response(r.http_status(), &r.into_answer()), method),
        Checked::Forward(t) => t,
        // Waits (this request stays open) until a person decides; dropping this future
        // (the client went away) cancels the approval.
        Checked::Hold(h) => match app.gate.wait_approval(h).await {
            Ok(t) => t,
            Err(r) => return (json_response(r.http_status(), &r.into_answer()), method),
        },
    };
    if let Some(sid) = &caller.session
        && !claim_ids.is_empty()
    {
        match app.owners.claim(sid, claim_ids) {
            Some(claim) => tracker.keep_until_settled(claim),
            None => {
                tracker.rollback_all();
                app.gate.telemetry.metrics.caller_refused(CallerRefusal::DuplicateId);
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
            app.gate.telemetry.metrics.upstream_error(e.kind());
            tracing::warn!(error = %e, "upstream request failed");
            return (
                rpc_error(StatusCode::BAD_GATEWAY, code::UPSTREAM, format!("upstream MCP server failed: {e}")),
                method,
            );
        }
    };
    if caller.session.is_none()
        && resp.status().is_success()
        && let Some(sid) = resp.headers().get(headers::SESSION_ID).and_then(|v| v.to_str().ok())
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
                app.gate.telemetry.metrics.upstream_error(UpstreamFailure::Status);
            }
        }
        return Response::from_parts(parts, body);
    }
    let ct = header_str(&parts.headers, header::CONTENT_TYPE).unwrap_or("").to_ascii_lowercase();
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
            app.gate.telemetry.metrics.upstream_error(UpstreamFailure::Body);
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
                    gate.telemetry.metrics.upstream_error(UpstreamFailure::Stream);
                    let _ = tx.send(Err(e)).await;
                    break;
                }
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    let events = match splitter.push(&data) {
                        Ok(ev) => ev,
                        Err(e) => {
                            gate.telemetry.metrics.upstream_error(UpstreamFailure::Stream);
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
pub async fn forward_stream(app: &App, req: Request<ReqBody>) -> Response<RespBody> {
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
            app.gate.telemetry.metrics.upstream_error(e.kind());
            rpc_error(StatusCode::BAD_GATEWAY, code::UPSTREAM, format!("upstream MCP server failed: {e}"))
        }
    }
}
