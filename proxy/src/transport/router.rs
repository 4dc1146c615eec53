//! The MCP listener's routes: `/mcp` (Streamable HTTP) and the 2024-11-05 HTTP+SSE
//! endpoints `/sse` and `/messages`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use crate::gate::IdentitySource;
use crate::mcp::jsonrpc::code;
use crate::telemetry::metrics::Metrics;
use crate::transport::http::{ReqBody, RespBody, json_response, not_allowed, rpc_error};
use crate::transport::legacy::{self, LegacyClients};
use crate::transport::listener::Conn;
use crate::transport::mcp_http::{App, forward_stream, post};

/// What the MCP listener serves.
#[derive(Debug)]
pub struct Router {
    pub app: Arc<App>,
    /// Clients of the 2024-11-05 HTTP+SSE transport (`/sse`, `/messages`).
    pub legacy: Arc<LegacyClients>,
}

/// Routes `/mcp` (Streamable HTTP) and the 2024-11-05 HTTP+SSE endpoints `/sse` and
/// `/messages`; everything else is 404. Before anything else, `Host` and `Origin` must be
/// allowed (DNS-rebinding protection); a request whose body did not arrive in time gets 408
/// and the connection is closed.
pub async fn handle(router: Arc<Router>, conn: Conn, req: Request<ReqBody>) -> Result<Response<RespBody>, Infallible> {
    let app = &router.app;
    let started = Instant::now();
    if let Err(refusal) = conn.front.hosts.check(req.headers(), req.uri().authority().map(|a| a.as_str())) {
        app.gate.telemetry.metrics.connections.request_refused(refusal.reason);
        let resp = rpc_error(StatusCode::FORBIDDEN, code::INVALID_REQUEST, refusal.message);
        app.gate.telemetry.metrics.request(
            Metrics::method_label(""),
            resp.status().as_u16(),
            started.elapsed().as_secs_f64(),
        );
        return Ok(resp);
    }
    if let IdentitySource::Authenticated(authn) = &app.gate.identity {
        let path = req.uri().path();
        if let Some(r) = authn.resource.as_ref().filter(|r| r.metadata_path() == path) {
            let resp = match *req.method() {
                Method::GET => json_response(StatusCode::OK, &serde_json::to_value(r).unwrap_or_default()),
                _ => not_allowed("GET"),
            };
            app.gate.telemetry.metrics.request(
                Metrics::method_label(""),
                resp.status().as_u16(),
                started.elapsed().as_secs_f64(),
            );
            return Ok(resp);
        }
        if let Err(refusal) = authn.verify(req.headers()).await {
            app.gate.telemetry.metrics.auth_refused(refusal.error.reason());
            let mut resp = rpc_error(refusal.status(), code::INVALID_REQUEST, format!("toolgate: {}", refusal.error));
            if let Some(v) = refusal.www_authenticate.and_then(|v| HeaderValue::from_str(&v).ok()) {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            app.gate.telemetry.metrics.request(
                Metrics::method_label(""),
                resp.status().as_u16(),
                started.elapsed().as_secs_f64(),
            );
            return Ok(resp);
        }
    }
    let body_timed_out = req.body().timed_out();
    let (mut resp, method) = match (req.uri().path(), req.method()) {
        ("/mcp", &Method::POST) => post(app, req).await,
        ("/mcp", &Method::GET) => (forward_stream(app, req).await, "get"),
        ("/mcp", &Method::DELETE) => (forward_stream(app, req).await, "delete"),
        ("/mcp", _) => (not_allowed("POST, GET, DELETE"), Metrics::method_label("")),
        ("/sse", &Method::GET) => (legacy::open(&router.legacy, req.headers()), "get"),
        ("/sse", _) => (not_allowed("GET"), Metrics::method_label("")),
        ("/messages", &Method::POST) => legacy::message(&router.legacy, req).await,
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
        app.gate.telemetry.metrics.connections.timeout("mcp", "body");
        resp = rpc_error(
            StatusCode::REQUEST_TIMEOUT,
            code::INVALID_REQUEST,
            "the request body did not arrive in time (--body-read-timeout-seconds)",
        );
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    app.gate.telemetry.metrics.request(method, resp.status().as_u16(), started.elapsed().as_secs_f64());
    Ok(resp)
}
