//! HTTP helpers every part of the transport shares (a leaf: imports nothing of the
//! transport but the request body type).

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::Value;

use crate::mcp::jsonrpc::{self, code};
use crate::transport::connections;

/// A concrete body error type: boxed trait objects trip a higher-ranked lifetime
/// limitation of the compiler inside hyper's service bounds.
pub type BoxError = std::io::Error;
pub type RespBody = BoxBody<Bytes, BoxError>;
/// A client's request body: reading it past `--body-read-timeout-seconds` fails.
pub type ReqBody = connections::ReqBody;

pub fn full(bytes: impl Into<Bytes>) -> RespBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

pub fn json_response(status: StatusCode, value: &Value) -> Response<RespBody> {
    let mut r = Response::new(full(serde_json::to_vec(value).unwrap_or_default()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub fn rpc_error(status: StatusCode, code: i64, message: impl Into<String>) -> Response<RespBody> {
    json_response(status, &jsonrpc::error(Value::Null, code, message, None))
}

pub fn not_allowed(allow: &'static str) -> Response<RespBody> {
    let mut r = rpc_error(StatusCode::METHOD_NOT_ALLOWED, code::INVALID_REQUEST, format!("use {allow}"));
    r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// The value of header `name` as text (a typed name: a `&str` is parsed on every call).
pub fn header_str<K: header::AsHeaderName>(h: &HeaderMap, name: K) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// An empty response with `status`.
pub fn status_only(status: StatusCode) -> Response<RespBody> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = status;
    r
}

/// `r` with the `Mcp-Session-Id` header `id`, if any.
pub fn with_session(mut r: Response<RespBody>, id: Option<String>) -> Response<RespBody> {
    if let Some(id) = id
        && let Ok(v) = HeaderValue::from_str(&id)
    {
        r.headers_mut().insert(crate::mcp::headers::SESSION_ID, v);
    }
    r
}

/// Typed names: removing by `&str` parses the name again on every call.
const HOP_BY_HOP: [header::HeaderName; 9] = [
    header::CONNECTION,
    header::HeaderName::from_static("keep-alive"),
    header::HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether `name` is a hop-by-hop header (one [`strip_hop_by_hop`] removes).
pub fn is_hop_by_hop(name: &header::HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Usually none is there: one pass over the few names present (standard names compare
    // as tags) instead of nine hashed removals.
    if !h.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    for name in &HOP_BY_HOP {
        h.remove(name);
    }
}
