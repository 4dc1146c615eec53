//! Upstream MCP servers: a URL speaking Streamable HTTP or the 2024-11-05 HTTP+SSE
//! transport (detected, or chosen with `--upstream-transport`), or a command run as a child
//! process over stdio (one child per MCP session, bounded, reaped when the session ends).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, Uri};
use serde_json::Value;

use crate::transport::client::http_client;
pub use crate::transport::client::{HttpClient, UpstreamError};
use crate::transport::http::{RespBody, strip_hop_by_hop};
use crate::transport::ordering::Order;
use crate::transport::sessions::{self, Opener, Sessions, SseOpen, SseTarget};

#[derive(Debug)]
pub enum Upstream {
    Http(Box<HttpUpstream>),
    Stdio(Arc<Sessions>),
}

impl Upstream {
    pub async fn send(
        &self,
        method: &Method,
        headers: &HeaderMap,
        body: Bytes,
        owner: &str,
    ) -> Result<Response<RespBody>, UpstreamError> {
        match self {
            Upstream::Http(h) => h.send(method, headers, body, owner).await,
            Upstream::Stdio(s) => s.send(method, headers, body, owner).await,
        }
    }

    /// Ends every session the proxy holds upstream (child processes, SSE connections).
    pub fn shutdown(&self) {
        match self {
            Upstream::Http(h) => h.legacy.shutdown(),
            Upstream::Stdio(s) => s.shutdown(),
        }
    }
}

/// Which transport an `--upstream` URL speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// Detect it as the MCP spec's backwards-compatibility section says: POST `initialize`
    /// to the URL; a 4xx answer means GET it, expecting an SSE stream that begins with an
    /// `endpoint` event (the 2024-11-05 HTTP+SSE transport).
    Auto,
    /// Streamable HTTP (revisions 2025-03-26 and later).
    Streamable,
    /// The 2024-11-05 HTTP+SSE transport (the URL is the SSE endpoint).
    Sse,
}

const UNKNOWN: u8 = 0;
const STREAMABLE: u8 = 1;
const SSE: u8 = 2;

/// A Streamable-HTTP upstream, or a 2024-11-05 HTTP+SSE one whose sessions the proxy holds
/// (one SSE connection per client session, [`Sessions`]).
#[derive(Debug)]
pub struct HttpUpstream {
    uri: Uri,
    client: HttpClient,
    timeout: Duration,
    /// What the upstream speaks: UNKNOWN until detected (with `Transport::Auto`).
    transport: AtomicU8,
    legacy: Arc<Sessions>,
    /// Each session's GET that is on its way upstream, which that session's POSTs wait for.
    order: Arc<Order>,
    /// What the proxy does to the caller's credential on the way upstream.
    custody: Custody,
}

/// Credential custody: the caller's own `Authorization` is removed before forwarding when
/// the proxy authenticates callers (an agent's token never reaches the server), and the
/// proxy can set the upstream's credential itself (a key only the sidecar holds).
#[derive(Clone, Debug, Default)]
pub struct Custody {
    /// Remove the caller's `Authorization`.
    pub strip_caller: bool,
    /// A header the proxy sets on every request upstream (its value is secret: never logged).
    pub set: Option<(header::HeaderName, HeaderValue)>,
}

impl Custody {
    fn applies(&self) -> bool {
        self.strip_caller || self.set.is_some()
    }

    fn outgoing(&self, headers: &HeaderMap) -> HeaderMap {
        let mut h = headers.clone();
        if self.strip_caller {
            h.remove(header::AUTHORIZATION);
        }
        if let Some((name, value)) = &self.set {
            h.remove(name);
            h.insert(name.clone(), value.clone());
        }
        h
    }
}

impl HttpUpstream {
    pub fn new(
        uri: Uri,
        timeout: Duration,
        transport: Transport,
        max_sessions: usize,
        per_identity: usize,
        idle_timeout: Duration,
    ) -> Self {
        let client = http_client();
        let target = SseTarget { uri: uri.clone(), client: client.clone(), timeout };
        let legacy = Sessions::new(Opener::Sse(Box::new(target)), max_sessions, per_identity, idle_timeout, timeout);
        let transport = match transport {
            Transport::Auto => UNKNOWN,
            Transport::Streamable => STREAMABLE,
            Transport::Sse => SSE,
        };
        Self {
            uri,
            client,
            timeout,
            transport: AtomicU8::new(transport),
            legacy,
            order: Arc::default(),
            custody: Custody::default(),
        }
    }

    /// Sets what happens to the caller's credential on the way upstream.
    #[must_use]
    pub fn with_custody(mut self, custody: Custody) -> Self {
        self.custody = custody;
        self
    }

    async fn send(
        &self,
        method: &Method,
        headers: &HeaderMap,
        body: Bytes,
        owner: &str,
    ) -> Result<Response<RespBody>, UpstreamError> {
        let replaced;
        let headers = if self.custody.applies() {
            replaced = self.custody.outgoing(headers);
            &replaced
        } else {
            headers
        };
        let sid = headers.get("mcp-session-id").and_then(|v| v.to_str().ok());
        if sid.is_some_and(|id| self.legacy.contains(id)) {
            return self.legacy.send(method, headers, body, owner).await;
        }
        match self.transport.load(Ordering::Acquire) {
            SSE => return self.legacy.send(method, headers, body, owner).await,
            STREAMABLE => return self.forward(method, headers, body).await,
            _ => {}
        }
        let probe = *method == Method::POST && sid.is_none() && is_initialize(&body);
        let resp = self.forward(method, headers, body.clone()).await?;
        if !probe {
            return Ok(resp);
        }
        if resp.status().is_success() {
            self.transport.store(STREAMABLE, Ordering::Release);
            tracing::info!(upstream = %self.uri, "the upstream speaks Streamable HTTP");
            return Ok(resp);
        }
        if !resp.status().is_client_error() {
            return Ok(resp);
        }
        // A 4xx to initialize: perhaps a server of the 2024-11-05 HTTP+SSE transport. If
        // GET does not open its SSE stream, the client gets the first answer.
        let target = SseTarget { uri: self.uri.clone(), client: self.client.clone(), timeout: self.timeout };
        match sessions::open_sse(&target, headers).await {
            Ok(SseOpen::Open(opened)) => {
                if self.transport.swap(SSE, Ordering::AcqRel) != SSE {
                    tracing::info!(upstream = %self.uri, "the upstream speaks the 2024-11-05 HTTP+SSE transport: translating");
                }
                self.legacy.start_opened(opened, headers, body, owner).await
            }
            Ok(SseOpen::Refused(r)) => {
                tracing::debug!(status = %resp.status(), get = %r.status(), "initialize refused; GET opened no SSE stream either");
                Ok(resp)
            }
            Err(e) => {
                tracing::info!(status = %resp.status(), error = %e, "initialize refused; GET is not a 2024-11-05 SSE stream either");
                Ok(resp)
            }
        }
    }

    /// Forwards a request as Streamable HTTP, keeping a session's order: its POSTs go only
    /// once its GET (the server→client stream), in flight or expected, has been answered
    /// upstream ([`Order`]).
    async fn forward(
        &self,
        method: &Method,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Response<RespBody>, UpstreamError> {
        let sid = headers.get("mcp-session-id").and_then(|v| v.to_str().ok());
        let get_in_flight = match (method, sid) {
            (&Method::GET, Some(id)) => self.order.get_started(id),
            (&Method::POST, Some(id)) => {
                if self.order.before_post(id).await {
                    tracing::debug!("a POST waited for its session's GET");
                }
                None
            }
            _ => None,
        };
        let initialized = *method == Method::POST && sid.is_some() && is_initialized(&body);
        let mut req = Request::builder().method(method.clone()).uri(self.uri.clone());
        if let Some(h) = req.headers_mut() {
            for (k, v) in headers {
                if k != header::HOST && k != header::CONTENT_LENGTH && k != header::ACCEPT_ENCODING {
                    h.append(k.clone(), v.clone());
                }
            }
            strip_hop_by_hop(h);
            // The answer must be readable to be inspected.
            h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        }
        let req = req.body(Full::new(body)).map_err(|_| UpstreamError::Protocol("cannot build the request"))?;
        // The timeout covers the response head; SSE bodies may stream for long.
        // Only a failed connection is a definite "not delivered"; a timeout or an error
        // after the request went out leaves the outcome unknown.
        let resp = tokio::time::timeout(self.timeout, self.client.request(req))
            .await
            .map_err(|_| UpstreamError::Lost("timed out waiting for the answer".into()))?
            .map_err(|e| {
                if e.is_connect() { UpstreamError::Connect(e.to_string()) } else { UpstreamError::Lost(e.to_string()) }
            })?;
        // The head is here: the upstream has registered the stream (or refused it).
        drop(get_in_flight);
        if let Some(id) = sid
            && initialized
            && resp.status().is_success()
        {
            self.order.initialized(id);
        }
        Ok(resp.map(|b| b.map_err(std::io::Error::other).boxed()))
    }
}

/// Whether a (checked) body is or contains an `initialize` request.
fn is_initialize(body: &[u8]) -> bool {
    let is_init = |m: &Value| m.get("method").and_then(Value::as_str) == Some("initialize");
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(items)) => items.iter().any(is_init),
        Ok(v) => is_init(&v),
        Err(_) => false,
    }
}

/// Whether a body is `notifications/initialized` (alone or in a batch). Only small bodies
/// are read: the SDKs send it alone.
fn is_initialized(body: &[u8]) -> bool {
    const NAME: &[u8] = b"notifications/initialized";
    if body.len() > 4096 || !body.windows(NAME.len()).any(|w| w == NAME) {
        return false;
    }
    let is = |m: &Value| m.get("method").and_then(Value::as_str) == Some("notifications/initialized");
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(items)) => items.iter().any(is),
        Ok(v) => is(&v),
        Err(_) => false,
    }
}
