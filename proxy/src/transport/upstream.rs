//! Upstream MCP servers: a URL speaking Streamable HTTP or the 2024-11-05 HTTP+SSE
//! transport (detected, or chosen with `--upstream-transport`), or a command run as a child
//! process over stdio (one child per MCP session, bounded, reaped when the session ends).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, Uri};
use serde_json::Value;

pub use crate::mcp::headers::SESSION_ID;
use crate::transport::client::{HttpClient, UpstreamError};
use crate::transport::http::{RespBody, is_hop_by_hop};
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
    /// `uri` in origin form (`/path?query`), as requests name it on the wire.
    path: Uri,
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
        let client = HttpClient::new(&uri);
        let path = uri.path_and_query().map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
        let target = SseTarget { uri: uri.clone(), client: client.clone(), timeout };
        let legacy = Sessions::new(Opener::Sse(Box::new(target)), max_sessions, per_identity, idle_timeout, timeout);
        let transport = match transport {
            Transport::Auto => UNKNOWN,
            Transport::Streamable => STREAMABLE,
            Transport::Sse => SSE,
        };
        Self {
            uri,
            path,
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
        let sid = headers.get(&SESSION_ID).and_then(|v| v.to_str().ok());
        let held = sid.is_some_and(|id| self.legacy.contains(id));
        let transport = self.transport.load(Ordering::Acquire);
        if !held && transport == STREAMABLE {
            // The hot path: `forward` applies the custody while it copies the headers.
            return self.forward(method, headers, sid, body).await;
        }
        let replaced;
        let custodied = if self.custody.applies() {
            replaced = self.custody.outgoing(headers);
            &replaced
        } else {
            headers
        };
        if held || transport == SSE {
            return self.legacy.send(method, custodied, body, owner).await;
        }
        let probe = *method == Method::POST && sid.is_none() && is_initialize(&body);
        let resp = self.forward(method, headers, sid, body.clone()).await?;
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
        match sessions::open_sse(&target, custodied).await {
            Ok(SseOpen::Open(opened)) => {
                if self.transport.swap(SSE, Ordering::AcqRel) != SSE {
                    tracing::info!(upstream = %self.uri, "the upstream speaks the 2024-11-05 HTTP+SSE transport: translating");
                }
                self.legacy.start_opened(opened, custodied, body, owner).await
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

    /// The headers of a request upstream: the caller's, without the hop-by-hop ones and
    /// the body's framing, the credential custody applied (the caller's `Authorization`
    /// removed, the proxy's own set), and `Accept-Encoding: identity`. One copy, in one
    /// pass (the same result as [`Custody::outgoing`] followed by the filter).
    fn outgoing(&self, headers: &HeaderMap) -> HeaderMap {
        let passes = |k: &HeaderName| {
            k != header::HOST && k != header::CONTENT_LENGTH && k != header::ACCEPT_ENCODING && !is_hop_by_hop(k)
        };
        let set = self.custody.set.as_ref();
        let mut h = HeaderMap::with_capacity(headers.len() + 2);
        for (k, v) in headers {
            let custodied =
                (self.custody.strip_caller && k == header::AUTHORIZATION) || set.is_some_and(|(name, _)| name == k);
            if !custodied && passes(k) {
                h.append(k.clone(), v.clone());
            }
        }
        if let Some((name, value)) = set
            && passes(name)
        {
            h.insert(name.clone(), value.clone());
        }
        // The answer must be readable to be inspected.
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        h
    }

    /// Forwards a request as Streamable HTTP, keeping a session's order: its POSTs go only
    /// once its GET (the server→client stream), in flight or expected, has been answered
    /// upstream ([`Order`]). `headers` are the caller's (custody is applied here); `sid`
    /// is their `Mcp-Session-Id`.
    async fn forward(
        &self,
        method: &Method,
        headers: &HeaderMap,
        sid: Option<&str>,
        body: Bytes,
    ) -> Result<Response<RespBody>, UpstreamError> {
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
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method.clone();
        *req.uri_mut() = self.path.clone();
        *req.headers_mut() = self.outgoing(headers);
        // The timeout covers the response head; SSE bodies may stream for long.
        // Only a request that never left is a definite "not delivered" (`Connect`); a
        // timeout or an error after the request went out leaves the outcome unknown.
        let resp = tokio::time::timeout(self.timeout, self.client.send(req))
            .await
            .map_err(|_| UpstreamError::Lost("timed out waiting for the answer".into()))??;
        // The head is here: the upstream has registered the stream (or refused it).
        drop(get_in_flight);
        if let Some(id) = sid
            && initialized
            && resp.status().is_success()
        {
            self.order.initialized(id);
        }
        Ok(resp)
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
/// are read: the SDKs send it alone. Only a body that names it is parsed (a body that is
/// not UTF-8 is no JSON either); `str::contains` searches with SIMD.
fn is_initialized(body: &[u8]) -> bool {
    if body.len() > 4096 || !std::str::from_utf8(body).is_ok_and(|s| s.contains("notifications/initialized")) {
        return false;
    }
    let is = |m: &Value| m.get("method").and_then(Value::as_str) == Some("notifications/initialized");
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(items)) => items.iter().any(is),
        Ok(v) => is(&v),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initialized_is_found_where_it_is_named() {
        assert!(is_initialized(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#));
        assert!(is_initialized(
            br#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"notifications/initialized"}]"#
        ));
        // Named, but not as the method; a slash too early in the body for the name.
        assert!(!is_initialized(br#"{"jsonrpc":"2.0","method":"ping","params":{"x":"notifications/initialized"}}"#));
        assert!(!is_initialized(br#"/{"jsonrpc":"2.0","method":"notifications/cancelled"}"#));
        assert!(!is_initialized(b"notifications/initialize"));
        assert!(!is_initialized(b""));
    }

    #[tokio::test]
    async fn the_outgoing_headers_are_the_custodied_filtered_ones() {
        let uri: Uri = "http://127.0.0.1:9/mcp".parse().expect("uri");
        let up = |custody: Custody| {
            HttpUpstream::new(uri.clone(), Duration::from_secs(1), Transport::Streamable, 1, 1, Duration::from_secs(1))
                .with_custody(custody)
        };
        let mut caller = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer caller"),
            ("host", "proxy"),
            ("content-length", "3"),
            ("accept-encoding", "gzip"),
            ("connection", "keep-alive"),
            ("te", "trailers"),
            ("x-api-key", "caller-key"),
            ("accept", "application/json"),
            ("accept", "text/event-stream"),
            ("mcp-session-id", "s1"),
        ] {
            caller.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        // The old way: custody on a clone, then the filter and the hop-by-hop strip.
        let old = |custody: &Custody| {
            let c = if custody.applies() { custody.outgoing(&caller) } else { caller.clone() };
            let mut h = HeaderMap::new();
            for (k, v) in &c {
                if k != header::HOST && k != header::CONTENT_LENGTH && k != header::ACCEPT_ENCODING {
                    h.append(k.clone(), v.clone());
                }
            }
            crate::transport::http::strip_hop_by_hop(&mut h);
            h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
            h
        };
        let key =
            |name: &'static str, v: &'static str| Some((HeaderName::from_static(name), HeaderValue::from_static(v)));
        for custody in [
            Custody::default(),
            Custody { strip_caller: true, set: None },
            Custody { strip_caller: true, set: key("authorization", "Bearer proxy") },
            Custody { strip_caller: false, set: key("x-api-key", "proxy-key") },
            Custody { strip_caller: true, set: key("te", "hop") },
            Custody { strip_caller: false, set: key("host", "elsewhere") },
        ] {
            let new = up(custody.clone()).outgoing(&caller);
            assert_eq!(new, old(&custody), "{custody:?}");
            if custody.strip_caller {
                assert!(new.get_all(header::AUTHORIZATION).iter().all(|v| v != "Bearer caller"), "{custody:?}");
            }
        }
    }
}
