//! The operator's two listeners: HTTPS (admission webhook `/inject`, sidecar policy stream
//! `/v1/stream` and `/v1/ack`; HTTP/1.1 and h2) and plain HTTP admin (`/metrics`,
//! `/healthz`, `/readyz`).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::Api;
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use toolgate_policy::push::{
    ACK_PATH, APPROVALS_PATH, Ack, ApprovalClose, ApprovalCreated, ApprovalRequest, ApprovalUpdate, INSTANCE_HEADER,
    Message, PolicySet, STREAM_PATH,
};

use crate::auth::{AuthError, Authenticator, ConnAuth, PodIdentity, bearer};
use crate::hub::{Hub, StreamGuard};
use crate::inject::InjectConfig;
use crate::metrics::Metrics;
use crate::webhook;

pub type Body = BoxBody<Bytes, std::io::Error>;

/// HTTP/2 keepalive of the HTTPS listener.
#[derive(Clone, Copy, Debug)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self { interval: Duration::from_secs(10), timeout: Duration::from_secs(10) }
    }
}

/// The TCP peer of a request's connection (a request extension).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

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

/// Everything the handlers need.
pub struct Ctx {
    pub client: kube::Client,
    pub hub: Arc<Hub>,
    pub auth: Authenticator,
    pub namespaces: Store<Namespace>,
    pub namespace_api: Api<Namespace>,
    pub inject: InjectConfig,
    /// Who may create and decide McpApprovals.
    pub deciders: crate::approvals::Deciders,
    pub heartbeat: Duration,
    /// Accept a sidecar's requests only from its pod's IP address (`status.podIP(s)`).
    pub bind_pod_ip: bool,
    /// HTTP/2 keepalive: ping every `interval`; a connection that does not answer within
    /// `timeout` is closed (and its stream no longer counts as enforcing).
    pub keepalive: Keepalive,
    pub metrics: Arc<Metrics>,
    pub shutdown: watch::Receiver<bool>,
    /// Caches synced and a serving certificate loaded.
    pub ready: AtomicBool,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx").finish_non_exhaustive()
    }
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(value.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<Body> {
    json_response(status, &json!({"error": message.to_string()}))
}

/// Reads a body up to `max` bytes.
pub async fn read_body(body: Incoming, max: usize) -> Result<Bytes, Response<Body>> {
    match Limited::new(body, max).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(error(StatusCode::PAYLOAD_TOO_LARGE, format!("body larger than {max} bytes")))
        }
        Err(e) => Err(error(StatusCode::BAD_REQUEST, format!("cannot read the body: {e}"))),
    }
}

/// Routes of the HTTPS listener.
pub async fn handle(ctx: Arc<Ctx>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let response = match (req.method(), req.uri().path()) {
        (&Method::POST, "/inject") => webhook::handle(&ctx, req).await,
        (&Method::GET, STREAM_PATH) => stream(&ctx, req).await,
        (&Method::POST, ACK_PATH) => ack(&ctx, req).await,
        (&Method::POST, "/approval") => webhook::handle_approval(&ctx, req).await,
        (&Method::POST, APPROVALS_PATH) => approval_create(&ctx, req).await,
        (&Method::POST, path) if path.starts_with(APPROVALS_PATH) && path.ends_with("/close") => {
            let name = path[APPROVALS_PATH.len()..].trim_start_matches('/').trim_end_matches("/close").to_owned();
            approval_close(&ctx, req, &name).await
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

/// The caller's pod, authenticated and found in the cache of injected pods.
async fn caller(ctx: &Ctx, req: &Request<Incoming>) -> Result<(PodIdentity, Arc<Pod>), Response<Body>> {
    let refuse = |ctx: &Ctx, result: &'static str, status: StatusCode, message: String| {
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
    // A pod that was just created may not be in the cache yet, or have no IP address
    // reported yet: wait a little for it.
    let key = ObjectRef::new(&id.pod_name).within(&id.namespace);
    let deadline = Instant::now() + Duration::from_secs(3);
    let pod = loop {
        let found =
            ctx.hub.pods.get(&key).filter(|pod| {
                pod.metadata.uid.as_deref() == Some(id.pod_uid.as_str()) && ctx.hub.governs(&id.namespace)
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

async fn stream(ctx: &Ctx, req: Request<Incoming>) -> Response<Body> {
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
    ctx: &Ctx,
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

fn no_content() -> Response<Body> {
    Response::builder().status(StatusCode::NO_CONTENT).body(full("")).unwrap_or_default()
}

fn from_code(code: u16, message: String) -> Response<Body> {
    error(StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY), message)
}

async fn ack(ctx: &Ctx, req: Request<Incoming>) -> Response<Body> {
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

async fn approval_create(ctx: &Ctx, req: Request<Incoming>) -> Response<Body> {
    let (id, request) = match sidecar_json::<ApprovalRequest>(ctx, req, 1024 * 1024, "an approval request").await {
        Ok(v) => v,
        Err(r) => return r,
    };
    match crate::approvals::create(&ctx.client, &id, request).await {
        Ok(name) => {
            json_response(StatusCode::CREATED, &serde_json::to_value(ApprovalCreated { name }).unwrap_or_default())
        }
        Err((code, message)) => from_code(code, message),
    }
}

async fn approval_close(ctx: &Ctx, req: Request<Incoming>, name: &str) -> Response<Body> {
    let (id, close) = match sidecar_json::<ApprovalClose>(ctx, req, 64 * 1024, "an approval close").await {
        Ok(v) => v,
        Err(r) => return r,
    };
    match crate::approvals::close(&ctx.client, &id, name, close.phase.as_str()).await {
        Ok(()) => no_content(),
        Err((code, message)) => from_code(code, message),
    }
}

/// Resolves once `shutdown` turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Serves `listener` (with TLS when `tls` is given) until `shutdown` turns true.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    ctx: Arc<Ctx>,
    handler: F,
    mut shutdown: watch::Receiver<bool>,
) where
    F: Fn(Arc<Ctx>, Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let _ = tcp.set_nodelay(true);
        let ctx = ctx.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // Per connection: what a token proved here (see `ConnAuth`).
            let conn_auth = Arc::new(ConnAuth::default());
            let keepalive = ctx.keepalive;
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(conn_auth.clone());
                req.extensions_mut().insert(PeerAddr(peer));
                handler(ctx.clone(), req)
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // A sidecar that stops answering pings (frozen, partitioned, its node gone) is
            // dropped: its stream ends and it no longer counts as enforcing.
            builder
                .http2()
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(Some(keepalive.interval))
                .keep_alive_timeout(keepalive.timeout);
            let result = match tls {
                Some(acceptor) => {
                    let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                    watcher.watch(conn).await
                }
                None => {
                    let conn = builder.serve_connection(TokioIo::new(tcp), service).into_owned();
                    watcher.watch(conn).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    // Streams end on shutdown by themselves; give in-flight requests a bounded time.
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
}
