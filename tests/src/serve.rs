//! Tiny HTTP and HTTPS servers on loopback for tests (admission webhooks, metrics targets,
//! fake upstreams), plus a plain HTTP GET client.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// A running test server; dropping it stops it (and its open connections).
#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    scheme: &'static str,
    task: JoinHandle<()>,
}

impl TestServer {
    /// The address it listens on (127.0.0.1 and a free port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves plain HTTP (1.1 and h2c) on a free loopback port. The handler gets each request
/// with its body collected.
pub async fn serve_http<F, Fut>(handler: F) -> TestServer
where
    F: Fn(Request<Bytes>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    serve(None, handler).await
}

/// Serves HTTPS on a free loopback port with the given rustls configuration (e.g. from
/// [`crate::CertPair::rustls_server_config`] of a certificate issued by
/// [`crate::TestCluster::test_ca`], which the test apiserver trusts via `caBundle`).
pub async fn serve_https<F, Fut>(tls: Arc<rustls::ServerConfig>, handler: F) -> TestServer
where
    F: Fn(Request<Bytes>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    serve(Some(tls), handler).await
}

async fn serve<F, Fut>(tls: Option<Arc<rustls::ServerConfig>>, handler: F) -> TestServer
where
    F: Fn(Request<Bytes>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding a loopback port");
    let addr = listener.local_addr().expect("local address");
    let scheme = if tls.is_some() { "https" } else { "http" };
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let handler = Arc::new(handler);
    let task = tokio::spawn(async move {
        // Connections live in this set, so aborting the accept task closes them too.
        let mut connections = JoinSet::new();
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    eprintln!("test server {addr}: accept failed: {e}");
                    continue;
                }
            };
            let handler = handler.clone();
            let acceptor = acceptor.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let handler = handler.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let response = match body.collect().await {
                            Ok(body) => handler(Request::from_parts(parts, body.to_bytes())).await,
                            Err(e) => Response::builder()
                                .status(StatusCode::BAD_REQUEST)
                                .body(Full::new(Bytes::from(format!("reading the body: {e}"))))
                                .expect("static response"),
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let result = match acceptor {
                    Some(acceptor) => match acceptor.accept(stream).await {
                        Ok(tls) => builder.serve_connection(TokioIo::new(tls), service).await,
                        Err(e) => {
                            eprintln!("test server {addr}: TLS handshake failed: {e}");
                            return;
                        }
                    },
                    None => builder.serve_connection(TokioIo::new(stream), service).await,
                };
                if let Err(e) = result {
                    eprintln!("test server {addr}: connection error: {e}");
                }
            });
            // Reap finished connections without waiting.
            while connections.try_join_next().is_some() {}
        }
    });
    TestServer { addr, scheme, task }
}

/// A `200 OK` response with the given content type and body.
pub fn response(content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("valid response")
}

/// A plain-HTTP GET; returns the status and the body as text.
pub async fn http_get(url: &str) -> Result<(StatusCode, String)> {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let uri: hyper::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
    let response = client.get(uri).await.with_context(|| format!("GET {url}"))?;
    let status = response.status();
    let body =
        response.into_body().collect().await.with_context(|| format!("reading the body of GET {url}"))?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Percent-encodes a query parameter value.
pub fn url_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
