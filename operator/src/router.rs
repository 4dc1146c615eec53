//! The routes of the operator's two listeners: HTTPS (admission webhooks `/inject` and
//! `/approval`, sidecar policy stream `/v1/stream`, `/v1/ack` and `/v1/approvals`;
//! HTTP/1.1 and h2) and plain HTTP admin (`/metrics`, `/healthz`, `/readyz`).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use toolgate_policy::push::{ACK_PATH, APPROVALS_PATH, STREAM_PATH};

use crate::admission::{self, Admission};
use crate::http::{Body, error, full};
use crate::metrics::Metrics;
use crate::push::server::{self, Server};

/// Everything the handlers need.
#[derive(Debug)]
pub struct Ctx {
    pub admission: Admission,
    pub push: Server,
    pub metrics: Arc<Metrics>,
    /// Caches synced and a serving certificate loaded.
    pub ready: AtomicBool,
}

/// Routes of the HTTPS listener.
pub async fn handle(ctx: Arc<Ctx>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let response = match (req.method(), req.uri().path()) {
        (&Method::POST, "/inject") => admission::handle(&ctx.admission, req).await,
        (&Method::GET, STREAM_PATH) => server::stream(&ctx.push, req).await,
        (&Method::POST, ACK_PATH) => server::ack(&ctx.push, req).await,
        (&Method::POST, "/approval") => admission::handle_approval(&ctx.admission, req).await,
        (&Method::POST, APPROVALS_PATH) => server::approval_create(&ctx.push, req).await,
        (&Method::POST, path) if path.starts_with(APPROVALS_PATH) && path.ends_with("/close") => {
            let name = path[APPROVALS_PATH.len()..].trim_start_matches('/').trim_end_matches("/close").to_owned();
            server::approval_close(&ctx.push, req, &name).await
        }
        (_, "/inject" | "/approval" | STREAM_PATH | ACK_PATH | APPROVALS_PATH) => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(StatusCode::NOT_FOUND, "not found"),
    };
    Ok(response)
}

/// Routes of the admin listener.
pub async fn admin(ctx: Arc<Ctx>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let response = match req.uri().path() {
        "/metrics" => {
            let mut r = Response::new(full(ctx.metrics.encode()));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            r
        }
        "/healthz" => Response::new(full("ok\n")),
        "/readyz" if ctx.ready.load(Ordering::Relaxed) => Response::new(full("ready\n")),
        "/readyz" => {
            let mut r = Response::new(full("not ready: caches or certificate not loaded yet\n"));
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            r
        }
        _ => error(StatusCode::NOT_FOUND, "not found"),
    };
    Ok(response)
}
