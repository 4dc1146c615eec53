//! An in-process fake of the operator's policy distribution endpoint (toolgate_policy::push):
//! HTTPS on loopback with a throwaway CA (rcgen), bearer-token check, `GET /v1/stream`
//! (NDJSON lines pushed by the test), `POST /v1/ack` (recorded), `POST /v1/approvals`
//! (recorded, answered `201` with a new name) and `POST /v1/approvals/{name}/close`
//! (recorded). Approval decisions are pushed by the test ([`FakeOperator::decide`]). Like
//! the real operator it offers h2 and http/1.1; every connection gets an id so a test can
//! check that acknowledgements and approval requests travel on the stream's connection.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use serde_json::json;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use toolgate_policy::push::{
    Ack, ApprovalClose, ApprovalCreated, ApprovalRequest, ApprovalUpdate, INSTANCE_HEADER, Message, PolicySet,
};

type Body = BoxBody<Bytes, Infallible>;

/// A CA and a serving certificate for 127.0.0.1.
pub struct Certs {
    pub ca_pem: String,
    pub server: Arc<rustls::ServerConfig>,
}

pub fn certs(alpn: &[&[u8]]) -> Certs {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "fake toolgate operator CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "127.0.0.1");
    let cert = params.signed_by(&key, &issuer).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .unwrap();
    server.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Certs { ca_pem: ca_cert.pem(), server: Arc::new(server) }
}

/// One recorded acknowledgement.
#[derive(Clone, Debug)]
pub struct AckSeen {
    pub ack: Ack,
    /// The connection it came on.
    pub conn: u64,
    /// Whether a stream was served on that same connection.
    pub on_stream_connection: bool,
}

/// One recorded approval request and the name it was given.
#[derive(Clone, Debug)]
pub struct ApprovalSeen {
    pub request: ApprovalRequest,
    pub name: String,
    pub on_stream_connection: bool,
}

/// One recorded close of an approval.
#[derive(Clone, Debug, PartialEq)]
pub struct CloseSeen {
    pub name: String,
    pub close: ApprovalClose,
}

#[derive(Default)]
struct State {
    token: String,
    /// The first line of every new stream.
    current: String,
    /// Announce this heartbeat interval after the first line; keep beating if `beat`.
    heartbeat: Option<(u64, bool)>,
    live: Vec<mpsc::Sender<Bytes>>,
    stream_conns: Vec<u64>,
    refused: usize,
    tokens_seen: Vec<String>,
    acks: Vec<AckSeen>,
    /// The `toolgate-instance` header of every stream request.
    instances: Vec<Option<String>>,
    approvals: Vec<ApprovalSeen>,
    closes: Vec<CloseSeen>,
    /// Answer approval requests with this status and body instead of `201`.
    approval_refusal: Option<(StatusCode, String)>,
}

pub struct FakeOperator {
    pub port: u16,
    pub ca_pem: String,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<Mutex<State>>,
    task: Option<JoinHandle<()>>,
    handle: tokio::runtime::Handle,
}

pub fn line(message: &Message) -> String {
    serde_json::to_string(message).unwrap() + "\n"
}

impl FakeOperator {
    /// Serves on a free loopback port with h2 and http/1.1.
    pub fn start(rt: &Runtime, token: &str, first: &PolicySet) -> Self {
        Self::start_with(rt, token, first, &[b"h2", b"http/1.1"])
    }

    pub fn start_with(rt: &Runtime, token: &str, first: &PolicySet, alpn: &[&[u8]]) -> Self {
        let c = certs(alpn);
        let state =
            State { token: token.to_owned(), current: line(&Message::Policies(first.clone())), ..State::default() };
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut op = Self {
            port,
            ca_pem: c.ca_pem,
            tls: c.server,
            state: Arc::new(Mutex::new(state)),
            task: None,
            handle: rt.handle().clone(),
        };
        op.serve(listener);
        op
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.clone());
        let state = self.state.clone();
        static CONN_IDS: AtomicU64 = AtomicU64::new(1);
        self.task = Some(self.handle.spawn(async move {
            // Connections live in this set: aborting the accept task closes them all.
            let mut conns = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let acceptor = acceptor.clone();
                let state = state.clone();
                let conn = CONN_IDS.fetch_add(1, Ordering::Relaxed);
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let svc = hyper::service::service_fn(move |req| handle(state.clone(), conn, req));
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                });
                while conns.try_join_next().is_some() {}
            }
        }));
    }

    /// Stops listening and drops every connection (the operator is gone).
    pub fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = self.handle.block_on(t);
        }
        self.state.lock().unwrap().live.clear();
    }

    /// Listens again on the same port.
    pub fn restart(&mut self) {
        let listener = self.handle.block_on(tokio::net::TcpListener::bind(("127.0.0.1", self.port))).unwrap();
        self.serve(listener);
    }

    /// The set every new stream starts with, also sent to the streams open now.
    pub fn publish(&self, set: &PolicySet) {
        let l = line(&Message::Policies(set.clone()));
        self.state.lock().unwrap().current = l.clone();
        self.send_raw(&l);
    }

    /// Sends a raw line (it should end in `\n`) to the streams open now only.
    pub fn send_raw(&self, text: &str) {
        let senders = self.state.lock().unwrap().live.clone();
        for s in senders {
            let _ = s.try_send(Bytes::from(text.to_owned()));
        }
    }

    pub fn set_token(&self, token: &str) {
        self.state.lock().unwrap().token = token.to_owned();
    }

    /// Announce `seconds` as the heartbeat interval on new streams; `beat`: keep beating.
    pub fn set_heartbeat(&self, seconds: u64, beat: bool) {
        self.state.lock().unwrap().heartbeat = Some((seconds, beat));
    }

    pub fn acks(&self) -> Vec<AckSeen> {
        self.state.lock().unwrap().acks.clone()
    }

    /// Streams served so far (each is one connect of the sidecar).
    pub fn streams(&self) -> usize {
        self.state.lock().unwrap().stream_conns.len()
    }

    pub fn tokens_seen(&self) -> Vec<String> {
        self.state.lock().unwrap().tokens_seen.clone()
    }

    pub fn refused(&self) -> usize {
        self.state.lock().unwrap().refused
    }

    /// The `toolgate-instance` header of every stream request so far.
    pub fn instances(&self) -> Vec<Option<String>> {
        self.state.lock().unwrap().instances.clone()
    }

    pub fn approvals(&self) -> Vec<ApprovalSeen> {
        self.state.lock().unwrap().approvals.clone()
    }

    pub fn closes(&self) -> Vec<CloseSeen> {
        self.state.lock().unwrap().closes.clone()
    }

    /// Answer approval requests with `status` and `{"error": why}` from now on.
    pub fn refuse_approvals(&self, status: StatusCode, why: &str) {
        self.state.lock().unwrap().approval_refusal = Some((status, json!({"error": why}).to_string()));
    }

    /// Pushes a phase change of approval `name` to the streams open now.
    pub fn decide(&self, name: &str, phase: &str, decided_by: Option<&str>, reason: Option<&str>) {
        self.send_raw(&line(&Message::Approval(ApprovalUpdate {
            name: name.to_owned(),
            phase: serde_json::from_value(json!(phase)).expect("an approval phase"),
            reason: reason.map(str::to_owned),
            decided_by: decided_by.map(str::to_owned),
        })));
    }
}

impl Drop for FakeOperator {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r
}

async fn handle(state: Arc<Mutex<State>>, conn: u64, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let presented = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_owned();
    {
        let mut s = state.lock().unwrap();
        s.tokens_seen.push(presented.clone());
        if presented != s.token {
            s.refused += 1;
            return Ok(full(StatusCode::UNAUTHORIZED, json!({"error": "token refused"}).to_string()));
        }
    }
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/v1/stream") => {
            let instance = req.headers().get(INSTANCE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
            let (tx, rx) = mpsc::channel::<Bytes>(64);
            let heartbeat = {
                let mut s = state.lock().unwrap();
                s.instances.push(instance);
                let _ = tx.try_send(Bytes::from(s.current.clone()));
                s.live.push(tx.clone());
                s.stream_conns.push(conn);
                s.heartbeat
            };
            if let Some((secs, beat)) = heartbeat {
                let hb = line(&Message::Heartbeat { interval_seconds: secs });
                let _ = tx.try_send(Bytes::from(hb.clone()));
                if beat {
                    tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(Duration::from_secs(secs)).await;
                            if tx.send(Bytes::from(hb.clone())).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
            let body = StreamBody::new(ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b))));
            let mut r = Response::new(BodyExt::boxed(body));
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, "application/x-ndjson".parse().unwrap());
            r
        }
        (&Method::POST, "/v1/ack") => {
            let bytes = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            match serde_json::from_slice::<Ack>(&bytes) {
                Ok(ack) => {
                    let mut s = state.lock().unwrap();
                    let on_stream_connection = s.stream_conns.contains(&conn);
                    s.acks.push(AckSeen { ack, conn, on_stream_connection });
                    full(StatusCode::NO_CONTENT, Bytes::new())
                }
                Err(e) => full(StatusCode::BAD_REQUEST, json!({"error": e.to_string()}).to_string()),
            }
        }
        (&Method::POST, "/v1/approvals") => {
            let bytes = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            match serde_json::from_slice::<ApprovalRequest>(&bytes) {
                Ok(request) => {
                    let mut s = state.lock().unwrap();
                    if let Some((status, body)) = s.approval_refusal.clone() {
                        return Ok(full(status, body));
                    }
                    let name = format!("start-pod-{}", s.approvals.len() + 1);
                    let on_stream_connection = s.stream_conns.contains(&conn);
                    s.approvals.push(ApprovalSeen { request, name: name.clone(), on_stream_connection });
                    full(StatusCode::CREATED, serde_json::to_vec(&ApprovalCreated { name }).unwrap())
                }
                Err(e) => full(StatusCode::BAD_REQUEST, json!({"error": e.to_string()}).to_string()),
            }
        }
        (&Method::POST, path) if path.starts_with("/v1/approvals/") && path.ends_with("/close") => {
            let name = path["/v1/approvals/".len()..path.len() - "/close".len()].to_owned();
            let bytes = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            match serde_json::from_slice::<ApprovalClose>(&bytes) {
                Ok(close) => {
                    state.lock().unwrap().closes.push(CloseSeen { name, close });
                    full(StatusCode::NO_CONTENT, Bytes::new())
                }
                Err(e) => full(StatusCode::BAD_REQUEST, json!({"error": e.to_string()}).to_string()),
            }
        }
        _ => full(StatusCode::NOT_FOUND, json!({"error": "not found"}).to_string()),
    })
}
