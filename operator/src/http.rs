//! Hyper helpers and the serving loop, shared by every listener. A leaf: it imports no
//! other module of the operator, so the admission webhook, the policy push and the router
//! all build on it without importing each other.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub type Body = BoxBody<Bytes, std::io::Error>;

/// HTTP/2 keepalive of a listener.
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

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(value.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    r
}

/// `{"error": message}` with `status`.
pub fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<Body> {
    json_response(status, &json!({"error": message.to_string()}))
}

pub fn no_content() -> Response<Body> {
    Response::builder().status(StatusCode::NO_CONTENT).body(full("")).unwrap_or_default()
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

/// Resolves once `shutdown` turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Serves `listener` (with TLS when `tls` is given) until `shutdown` turns true. Every
/// request carries its connection's [`PeerAddr`] and one `Arc<C>` per connection
/// (`C::default()`; the router uses it for what a token proved on that connection).
pub async fn serve<S, C, F, Fut>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<S>,
    handler: F,
    keepalive: Keepalive,
    mut shutdown: watch::Receiver<bool>,
) where
    S: Send + Sync + 'static,
    C: Default + Send + Sync + 'static,
    F: Fn(Arc<S>, Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
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
        let state = state.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let per_connection = Arc::new(C::default());
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(per_connection.clone());
                req.extensions_mut().insert(PeerAddr(peer));
                handler(state.clone(), req)
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
