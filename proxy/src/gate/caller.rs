//! Who is calling: the identity a request is decided and counted under, read from its
//! headers (a credential's fingerprint, a trusted gateway's header, a verified principal,
//! or one shared identity), and the session and grant headers the policy asks for.

use std::sync::Arc;

use hyper::HeaderMap;
use hyper::header::{AsHeaderName, HeaderName, HeaderValue};
use serde_json::Value;
use toolgate_policy::Caller;

use super::authn;
use crate::live::Effective;
use crate::mcp::canonical::FingerprintCache;
use crate::mcp::headers;
use crate::mcp::jsonrpc::{self, code};

/// How callers are identified.
#[derive(Clone, Debug)]
pub enum IdentitySource {
    /// SHA-256 fingerprint of the `Authorization` header value.
    Authorization,
    /// The value of a header set by a trusted gateway.
    Header(hyper::header::HeaderName),
    /// Nobody authenticates callers (a child process that uses its own key and never sees
    /// the caller's `Authorization`): every caller is one identity, so a limit holds for
    /// the whole server instead of per header value a client picks.
    Shared,
    /// Callers prove who they are (a verified bearer token or API key): the identity is
    /// the principal's stable key, and grants can match it.
    Authenticated(Arc<authn::Authn>),
}

/// Who is calling. Refused (the request is answered 400, nothing forwarded) when a
/// header that identifies the caller or its session is repeated: which copy counts
/// would be the caller's choice, and the upstream may read another one than the
/// proxy did.
pub fn identify(
    source: &IdentitySource,
    fingerprints: &FingerprintCache,
    headers: &HeaderMap,
    policy: &Effective,
) -> Result<Caller, CallerError> {
    let single = |name: &HeaderName| single(headers, name);
    let authorization = single(&hyper::header::AUTHORIZATION)?;
    let mut principal = None;
    let identity = match source {
        IdentitySource::Authenticated(authn) => match authn.principal(authorization.map(|v| v.as_bytes())) {
            Ok(Some(p)) => {
                let key = p.key();
                principal = Some(p);
                key
            }
            Ok(None) => String::new(),
            Err(e) => return Err(CallerError(format!("{e}: send the request again"))),
        },
        IdentitySource::Authorization => {
            authorization.map(|v| fingerprints.fingerprint(v.as_bytes())).unwrap_or_default()
        }
        IdentitySource::Header(name) => match single(name)? {
            None => String::new(),
            Some(v) => v
                .to_str()
                .map(|s| s.trim().to_owned())
                .map_err(|_| CallerError(format!("the {name} header is not visible ASCII")))?,
        },
        IdentitySource::Shared => String::new(),
    };
    let session = match single(&headers::SESSION_ID)? {
        None => None,
        Some(v) => Some(
            v.to_str().map_err(|_| CallerError("the Mcp-Session-Id header is not visible ASCII".into()))?.to_owned(),
        ),
    };
    let wanted = policy.header_names();
    let mut matched = Vec::new();
    for n in wanted {
        if let Some(v) = self::single(headers, n.as_str())?
            && let Ok(v) = v.to_str()
        {
            matched.push((n.clone(), v.to_owned()));
        }
    }
    Ok(Caller { identity, session, headers: matched, principal })
}

/// The one value of header `name`, if any; a repeated header is refused.
fn single<K: AsHeaderName + Copy + std::fmt::Display>(
    headers: &HeaderMap,
    name: K,
) -> Result<Option<&HeaderValue>, CallerError> {
    let mut all = headers.get_all(name).iter();
    let first = all.next();
    if all.next().is_some() {
        return Err(CallerError(format!("the {name} header is repeated: send it once")));
    }
    Ok(first)
}

/// A request whose caller cannot be told unambiguously (see [`Gate::caller`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CallerError(pub String);

impl CallerError {
    /// The JSON-RPC answer (sent with HTTP 400).
    pub fn answer(&self) -> Value {
        jsonrpc::error(Value::Null, code::INVALID_REQUEST, format!("toolgate: {}", self.0), None)
    }
}
