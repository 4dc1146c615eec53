//! The mutating admission webhook: parses the `AdmissionReview`, finds the namespace's
//! labels and answers with the patch of [`crate::inject::inject`] (or none).
//!
//! Fail closed: when the namespace's labels cannot be known, the pod is refused rather
//! than admitted without its sidecar (the webhook configuration only sends opted-in
//! pods, so nothing else is affected). A selected pod that cannot get the sidecar
//! (host network, no port, a fake marker, a foreign `toolgate-proxy` container, an opt-out
//! its namespace does not allow) is refused with the reason and the fix.
//!
//! Also the `/approval` webhook: the HTTP side here, the decision in [`approval_review`].

pub mod approval_review;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::ResourceExt;
use kube::api::Api;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::runtime::reflector::{ObjectRef, Store};
use tracing::instrument;

use crate::http::{Body, json_response, read_body};
use crate::inject::{InjectConfig, inject};
use crate::metrics::Metrics;
use crate::push::streams::Hub;
use approval_review::Deciders;

/// Pods are at most a few MiB (etcd's object limit is 1.5 MiB by default).
const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;

/// What the admission webhooks need.
pub struct Admission {
    pub hub: Arc<Hub>,
    pub namespaces: Store<Namespace>,
    pub namespace_api: Api<Namespace>,
    pub inject: InjectConfig,
    /// Who may create and decide McpApprovals.
    pub deciders: Deciders,
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").finish_non_exhaustive()
    }
}

/// Why a namespace's labels could not be read (the pod is then refused).
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("{0}")]
    Api(#[from] kube::Error),
    #[error("timed out")]
    Timeout,
}

impl NamespaceError {
    /// A stable, low-cardinality label.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Api(_) => "namespace_api",
            Self::Timeout => "namespace_timeout",
        }
    }
}

/// `POST /inject`: the sidecar injection webhook.
#[instrument(name = "inject_webhook", skip_all, fields(namespace = tracing::field::Empty, pod = tracing::field::Empty))]
pub async fn handle(ctx: &Admission, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let body = match read_body(req.into_body(), MAX_REVIEW_BYTES).await {
        Ok(b) => b,
        Err(r) => {
            ctx.metrics.webhook("error", started.elapsed());
            return r;
        }
    };
    let review: AdmissionReview<Pod> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            ctx.metrics.webhook("error", started.elapsed());
            return json_response(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": format!("not an AdmissionReview of a Pod: {e}")}),
            );
        }
    };
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            ctx.metrics.webhook("error", started.elapsed());
            return json_response(StatusCode::BAD_REQUEST, &serde_json::json!({"error": e.to_string()}));
        }
    };
    let (result, response) = decide(ctx, &request).await;
    ctx.metrics.webhook(result, started.elapsed());
    json_response(StatusCode::OK, &serde_json::to_value(response.into_review()).unwrap_or_default())
}

async fn decide(ctx: &Admission, request: &AdmissionRequest<Pod>) -> (&'static str, AdmissionResponse) {
    let response = AdmissionResponse::from(request);
    let Some(pod) = &request.object else {
        return ("no_object", response);
    };
    let namespace = request.namespace.clone().or_else(|| pod.namespace()).unwrap_or_default();
    let span = tracing::Span::current();
    span.record("namespace", namespace.as_str());
    if !ctx.hub.index.governs(&namespace) && ctx.namespaces.get(&ObjectRef::new(&namespace)).is_some() {
        return ("not_governed", response);
    }
    let mut labels = match namespace_labels(ctx, &namespace).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%namespace, error = %e, kind = e.metric_label(), "cannot read the namespace; refusing the pod rather than admitting it unprotected");
            return ("error", response.deny(format!("toolgate: cannot read namespace {namespace}: {e}")));
        }
    };
    // The request's namespace names the pod's shared counters (the API server sets this
    // label on every namespace to its name; the request is the authority either way).
    if !namespace.is_empty() {
        labels.insert("kubernetes.io/metadata.name".to_owned(), namespace.clone());
    }
    let pod_name = if pod.metadata.name.is_some() {
        pod.name_any()
    } else {
        pod.metadata.generate_name.clone().unwrap_or_default()
    };
    span.record("pod", pod_name.as_str());
    match inject(pod, &labels, &ctx.inject) {
        Ok(patch) => match response.with_patch(patch) {
            Ok(r) => {
                tracing::info!(%namespace, pod = %pod_name, dry_run = request.dry_run, "sidecar injected");
                ("injected", r)
            }
            Err(e) => {
                ("error", AdmissionResponse::from(request).deny(format!("toolgate: cannot encode the patch: {e}")))
            }
        },
        Err(skip) if skip.refused() => {
            tracing::info!(%namespace, pod = %pod_name, reason = skip.as_str(), "pod refused: it cannot get the sidecar");
            let mut response = response.deny(skip.message());
            response.result.code = StatusCode::FORBIDDEN.as_u16();
            response.result.reason = "Forbidden".into();
            response.result.status = Some(kube::core::response::StatusSummary::Failure);
            (skip.metric_label(), response)
        }
        Err(skip) => {
            tracing::debug!(%namespace, pod = %pod_name, reason = skip.as_str(), "not injected");
            (skip.metric_label(), response)
        }
    }
}

async fn namespace_labels(ctx: &Admission, namespace: &str) -> Result<BTreeMap<String, String>, NamespaceError> {
    if let Some(ns) = ctx.namespaces.get(&ObjectRef::new(namespace)) {
        return Ok(ns.labels().clone());
    }
    // A namespace created a moment ago may not be cached yet.
    match tokio::time::timeout(Duration::from_secs(2), ctx.namespace_api.get(namespace)).await {
        Ok(Ok(ns)) => Ok(ns.labels().clone()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(NamespaceError::Timeout),
    }
}

/// The `/approval` webhook: only the operator creates McpApprovals; records who decided
/// one and refuses deciders it does not trust (see [`approval_review::review`]).
#[instrument(name = "approval_webhook", skip_all)]
pub async fn handle_approval(ctx: &Admission, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let body = match read_body(req.into_body(), MAX_REVIEW_BYTES).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let review: AdmissionReview<toolgate_policy::crd::McpApproval> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": format!("not an AdmissionReview of an McpApproval: {e}")}),
            );
        }
    };
    let request: AdmissionRequest<toolgate_policy::crd::McpApproval> = match review.try_into() {
        Ok(r) => r,
        Err(e) => return json_response(StatusCode::BAD_REQUEST, &serde_json::json!({"error": e.to_string()})),
    };
    let (result, response) = approval_review::review(&ctx.hub.index, &ctx.deciders, &request);
    ctx.metrics.webhook(result, started.elapsed());
    json_response(StatusCode::OK, &serde_json::to_value(response.into_review()).unwrap_or_default())
}
