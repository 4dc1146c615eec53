//! The admin listener (its own port): `/metrics`, `/healthz`, `/readyz` and `/policy`,
//! over the live policy and the metrics only — it needs no upstream and no gate.

use std::convert::Infallible;
use std::sync::Arc;

use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

use crate::live::PolicyRx;
use crate::telemetry::metrics::Metrics;
use crate::transport::frontdoor;
use crate::transport::http::{ReqBody, RespBody, full, json_response};
use crate::transport::listener::Conn;

/// What the admin listener shows.
#[derive(Debug)]
pub struct AdminState {
    pub policy: PolicyRx,
    pub metrics: Arc<Metrics>,
}

/// The admin listener: `/metrics`, `/healthz`, `/readyz`, `/policy` (to loopback peers
/// only, unless `--admin-policy-public`: it holds the whole policy, grants included).
pub async fn admin(
    state: Arc<AdminState>,
    conn: Conn,
    req: Request<ReqBody>,
) -> Result<Response<RespBody>, Infallible> {
    let policy = state.policy.borrow().clone();
    let text = |status: StatusCode, body: String, ct: &'static str| {
        let mut r = Response::new(full(body));
        *r.status_mut() = status;
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
        r
    };
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            text(StatusCode::OK, state.metrics.encode(), "application/openmetrics-text; version=1.0.0; charset=utf-8")
        }
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        (&Method::GET, "/readyz") if policy.is_empty() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "no policy loaded: every tool call is refused\n".into(), "text/plain")
        }
        (&Method::GET, "/readyz") => {
            // The store's state is shown, not a reason to be taken out of the Service: calls
            // without limits still work while it is down (limited ones fail closed).
            let store = state.metrics.store.readiness().map(|s| format!("{s}\n")).unwrap_or_default();
            text(StatusCode::OK, format!("ok revision {}\n{store}", policy.revision), "text/plain")
        }
        (&Method::GET, "/policy") if !frontdoor::policy_visible(conn.peer, conn.front.admin_policy_public) => {
            state.metrics.connections.request_refused("admin_policy");
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
