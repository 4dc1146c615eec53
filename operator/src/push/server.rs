//! The HTTPS endpoints sidecars call: the policy stream (`/v1/stream`), acknowledgements
//! (`/v1/ack`) and approvals (`/v1/approvals`, `/v1/approvals/NAME/close`). Every request is
//! authenticated as a pod's injected sidecar first ([`caller`]).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::watch;
use toolgate_policy::push::{
    Ack, ApprovalClose, ApprovalCreated, ApprovalRequest, ApprovalUpdate, INSTANCE_HEADER, Message, PolicySet,
};
use tracing::instrument;

use crate::approvals::ApprovalError;
use crate::auth::{AuthError, Authenticator, ConnAuth, PodIdentity, bearer};
use crate::http::{Body, PeerAddr, error, json_response, no_content, read_body, stopped};
use crate::inject::InjectConfig;
use crate::metrics::Metrics;
use crate::push::streams::{Hub, StreamGuard};

/// The pod's IP addresses (`status.podIP` and `status.podIPs`), as reported by its kubelet.
fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else { return Vec::new() };
    status
        .pod_ip
        .iter()
        .chain(status.pod_ips.iter().flatten().map(|p| &p.ip))
        .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .collect()
}

/// What the sidecar endpoints need.
pub struct Server {
    pub client: kube::Client,
    pub hub: Arc<Hub>,
    pub auth: Authenticator,
    /// The sidecar the webhook injects: only a pod holding it gets a stream.
    pub inject: InjectConfig,
    pub heartbeat: Duration,
    /// Accept a sidecar's requests only from its pod's IP address (`status.podIP(s)`).
    pub bind_pod_ip: bool,
    pub metrics: Arc<Metrics>,
    pub shutdown: watch::Receiver<bool>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").finish_non_exhaustive()
    }
}

/// The caller's pod, authenticated and found in the cache of injected pods.
async fn caller(ctx: &Server, req: &Request<Incoming>) -> Result<(PodIdentity, Arc<Pod>), Response<Body>> {
    let refuse = |ctx: &Server, result: &'static str, status: StatusCode, message: String| {
        ctx.metrics.stream_request(result);
        error(status, message)
    };
    let token = bearer(req.headers().get(hyper::header::AUTHORIZATION))
        .map_err(|e| refuse(ctx, "unauthenticated", StatusCode::UNAUTHORIZED, e.to_string()))?;
    let conn = req.extensions().get::<Arc<ConnAuth>>().cloned();
    let id = match ctx.auth.authenticate_on(conn.as_deref(), token).await {
        Ok(id) => id,
        Err(e @ AuthError::Unavailable(_)) => {
            tracing::warn!(error = %e, "TokenReview failed");
            return Err(refuse(ctx, "review_failed", StatusCode::SERVICE_UNAVAILABLE, e.to_string()));
        }
        Err(e @ AuthError::NotPodBound) => return Err(refuse(ctx, "forbidden", StatusCode::FORBIDDEN, e.to_string())),
        Err(e) => return Err(refuse(ctx, "unauthenticated", StatusCode::UNAUTHORIZED, e.to_string())),
    };
    tracing::Span::current().record("pod", tracing::field::display(format_args!("{}/{}", id.namespace, id.pod_name)));
    // A pod that was just created may not be in the cache yet, or have no IP address
    // reported yet: wait a little for it.
    let key = ObjectRef::new(&id.pod_name).within(&id.namespace);
    let deadline = Instant::now() + Duration::from_secs(3);
    let pod = loop {
        let found = ctx.hub.index.pods.get(&key).filter(|pod| {
            pod.metadata.uid.as_deref() == Some(id.pod_uid.as_str()) && ctx.hub.index.governs(&id.namespace)
        });
        match found {
            Some(pod) if !ctx.bind_pod_ip || !pod_ips(&pod).is_empty() || Instant::now() >= deadline => break pod,
            None if Instant::now() >= deadline => {
                return Err(refuse(
                    ctx,
                    "unknown_pod",
                    StatusCode::FORBIDDEN,
                    format!(
                        "pod {}/{} (uid {}) is not a pod in a namespace this operator governs",
                        id.namespace, id.pod_name, id.pod_uid
                    ),
                ));
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    // Only the sidecar this operator injects may stream: a pod that merely carries the
    // labels or annotations of an injected pod has nothing that would enforce.
    if !crate::inject::holds_injected_sidecar(&pod, &ctx.inject) {
        return Err(refuse(
            ctx,
            "not_injected",
            StatusCode::FORBIDDEN,
            format!(
                "pod {}/{} does not hold the toolgate sidecar as this operator injects it (image, args, volumes); \
                 only that sidecar gets a policy stream",
                id.namespace, id.pod_name
            ),
        ));
    }
    // The token is bound to the pod; the connection must come from the pod too, so that a
    // token minted for the pod (anyone with `edit` can) is useless elsewhere.
    if ctx.bind_pod_ip {
        let peer = req.extensions().get::<PeerAddr>().map(|p| p.0.ip().to_canonical());
        let ips = pod_ips(&pod);
        if !peer.is_some_and(|peer| ips.contains(&peer)) {
            let shown = peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
            return Err(refuse(
                ctx,
                "wrong_peer",
                StatusCode::FORBIDDEN,
                format!(
                    "the connection comes from {shown}, not from pod {}/{} ({}); a pod's token is accepted only \
                     from the pod itself",
                    id.namespace,
                    id.pod_name,
                    if ips.is_empty() { "no IP reported yet".to_owned() } else { format!("{ips:?}") }
                ),
            ));
        }
    }
    let service_account = pod.spec.as_ref().and_then(|s| s.service_account_name.as_deref()).unwrap_or("default");
    if service_account != id.service_account {
        return Err(refuse(ctx, "forbidden", StatusCode::FORBIDDEN, "token and pod service accounts differ".into()));
    }
    Ok((id, pod))
}

fn line(message: &Message) -> Bytes {
    let mut v = serde_json::to_vec(message).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

struct StreamState {
    rx: watch::Receiver<Arc<PolicySet>>,
    approvals: tokio::sync::mpsc::UnboundedReceiver<ApprovalUpdate>,
    heartbeat: tokio::time::Interval,
    interval_seconds: u64,
    first: bool,
    shutdown: watch::Receiver<bool>,
    _guard: StreamGuard,
}

/// `GET /v1/stream`: the pod's policy sets, approval decisions and heartbeats as NDJSON.
#[instrument(name = "policy_stream", skip_all, fields(pod = tracing::field::Empty))]
pub async fn stream(ctx: &Server, req: Request<Incoming>) -> Response<Body> {
    let (id, pod) = match caller(ctx, &req).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let instance: String = req
        .headers()
        .get(INSTANCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64)
        .unwrap_or("unknown")
        .to_owned();
    let (guard, rx, approvals) = match ctx.hub.register(&pod, &instance) {
        Ok(r) => r,
        Err(_held) => {
            ctx.metrics.stream_request("duplicate");
            tracing::warn!(pod = %format!("{}/{}", id.namespace, id.pod_name), %instance,
                "refused a second policy stream for a pod whose stream is alive");
            return error(
                StatusCode::CONFLICT,
                "this pod already holds a live policy stream; another is accepted once that connection closes \
                 or stops answering keepalive pings",
            );
        }
    };
    // The older instance's held calls are abandoned by the leader once no replica holds a
    // stream of it any more (`acks::abandon_replaced`), never merely because a new
    // stream arrived.
    ctx.metrics.stream_request("ok");
    tracing::info!(pod = %format!("{}/{}", id.namespace, id.pod_name), "sidecar connected");
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + ctx.heartbeat, ctx.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = StreamState {
        rx,
        approvals,
        heartbeat,
        interval_seconds: ctx.heartbeat.as_secs().max(1),
        first: true,
        shutdown: ctx.shutdown.clone(),
        _guard: guard,
    };
    let frames = futures_util::stream::unfold(state, |mut st| async move {
        if st.first {
            st.first = false;
            let set = st.rx.borrow_and_update().clone();
            return Some((line(&Message::Policies((*set).clone())), st));
        }
        enum Next {
            Approval(ApprovalUpdate),
            Changed(bool),
            Beat,
            Stop,
        }
        let next = tokio::select! {
            Some(update) = st.approvals.recv() => Next::Approval(update),
            changed = st.rx.changed() => Next::Changed(changed.is_ok()),
            _ = st.heartbeat.tick() => Next::Beat,
            _ = stopped(&mut st.shutdown) => Next::Stop,
        };
        match next {
            Next::Changed(true) => {
                let set = st.rx.borrow_and_update().clone();
                st.heartbeat.reset();
                Some((line(&Message::Policies((*set).clone())), st))
            }
            Next::Approval(update) => Some((line(&Message::Approval(update)), st)),
            Next::Beat => {
                let beat = Message::Heartbeat { interval_seconds: st.interval_seconds };
                Some((line(&beat), st))
            }
            Next::Changed(false) | Next::Stop => None,
        }
    })
    .map(|b| Ok::<_, std::io::Error>(Frame::data(b)));
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    let headers = response.headers_mut();
    headers.insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/x-ndjson"));
    headers.insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static("no-store"));
    response
}

/// An authenticated sidecar's JSON request body of type `T` (at most `max` bytes).
async fn sidecar_json<T: serde::de::DeserializeOwned>(
    ctx: &Server,
    req: Request<Incoming>,
    max: usize,
    what: &str,
) -> Result<(PodIdentity, T), Response<Body>> {
    let (id, _pod) = caller(ctx, &req).await?;
    let body = read_body(req.into_body(), max).await?;
    let value =
        serde_json::from_slice(&body).map_err(|e| error(StatusCode::BAD_REQUEST, format!("not {what}: {e}")))?;
    Ok((id, value))
}

/// An approval failure as the sidecar sees it, counted by kind.
fn approval_failed(ctx: &Server, e: &ApprovalError) -> Response<Body> {
    ctx.metrics.approval_request(e.metric_label());
    error(e.status(), e)
}

/// `POST /v1/ack`: the sidecar applied (or could not apply) a revision.
#[instrument(name = "ack", skip_all, fields(pod = tracing::field::Empty))]
pub async fn ack(ctx: &Server, req: Request<Incoming>) -> Response<Body> {
    let (id, ack) = match sidecar_json::<Ack>(ctx, req, 64 * 1024, "an ack").await {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Some(problem) = &ack.error {
        tracing::warn!(pod = %format!("{}/{}", id.namespace, id.pod_name), revision = %ack.revision, %problem,
            "sidecar could not apply its policy set; it keeps the previous one");
        ctx.metrics.stream_request("nack");
        return no_content();
    }
    if ctx.hub.ack(&id.pod_uid, &ack.revision) {
        ctx.metrics.stream_request("ack");
        no_content()
    } else {
        ctx.metrics.stream_request("ack_unknown");
        error(
            StatusCode::CONFLICT,
            "no stream of this pod holds that revision here (send acks on the stream's connection)",
        )
    }
}

/// `POST /v1/approvals`: the sidecar holds a call for a person's decision.
#[instrument(name = "approval_create", skip_all, fields(pod = tracing::field::Empty))]
pub async fn approval_create(ctx: &Server, req: Request<Incoming>) -> Response<Body> {
    let (id, request) = match sidecar_json::<ApprovalRequest>(ctx, req, 1024 * 1024, "an approval request").await {
        Ok(v) => v,
        Err(r) => return r,
    };
    match crate::approvals::create(&ctx.client, &id, request).await {
        Ok(name) => {
            ctx.metrics.approval_request("created");
            json_response(StatusCode::CREATED, &serde_json::to_value(ApprovalCreated { name }).unwrap_or_default())
        }
        Err(e) => approval_failed(ctx, &e),
    }
}

/// `POST /v1/approvals/NAME/close`: the sidecar stopped waiting.
#[instrument(name = "approval_close", skip_all, fields(pod = tracing::field::Empty, approval = %name))]
pub async fn approval_close(ctx: &Server, req: Request<Incoming>, name: &str) -> Response<Body> {
    let (id, close) = match sidecar_json::<ApprovalClose>(ctx, req, 64 * 1024, "an approval close").await {
        Ok(v) => v,
        Err(r) => return r,
    };
    match crate::approvals::close(&ctx.client, &id, name, close.phase).await {
        Ok(()) => {
            ctx.metrics.approval_request("closed");
            no_content()
        }
        Err(e) => approval_failed(ctx, &e),
    }
}
