//! The listeners: what each checks before a request reaches its handler, and the serving
//! loop with its bounds (see `connections`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::telemetry::metrics::Metrics;
use crate::transport::connections::{self, AcceptBackoff, Activity, Limits, Tracked};
use crate::transport::frontdoor::HostRules;
use crate::transport::http::{ReqBody, RespBody};

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

/// Accepts connections until `shutdown` resolves, then lets in-flight ones finish.
///
/// Each connection gets the listener's bounds: a request head must arrive within
/// `header_read`, a body within `body_read` of its head, and a connection with no request
/// in flight is closed after `idle` (a waiting call or an open stream is in flight). Over
/// `max_connections`, a connection gets 503 and is closed. A failed accept (out of file
/// descriptors…) is followed by a pause (10 ms doubling to 1 s) and logged at most once a
/// second.
pub async fn serve<S, F, Fut>(
    listener: TcpListener,
    listen: Listen,
    state: Arc<S>,
    metrics: Arc<Metrics>,
    handler: F,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, Conn, Request<ReqBody>) -> Fut + Copy + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<RespBody>, Infallible>> + Send + 'static,
{
    let Listen { name, limits, front } = listen;
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
            let state = state.clone();
            let activity = activity.clone();
            let conn = Conn { peer, front: front.clone() };
            let body_read = limits.body_read;
            hyper::service::service_fn(move |req: Request<Incoming>| {
                let in_flight = activity.begin();
                // Boxed: the handler's state machine is several KiB, and hyper moves the
                // future it is given (a memcpy of all of it per request, ~12 k instructions).
                let fut = Box::pin(handler(state.clone(), conn.clone(), req.map(|b| ReqBody::new(b, body_read))));
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
