//! Authenticated callers: the front door verifies a caller's bearer credential once per
//! request ([`Authn::verify`], async: an issuer's keys may have to be fetched), and the
//! gate reads who it is ([`Authn::principal`], sync) when it identifies the caller.
//!
//! Verified tokens are remembered by the SHA-256 of the whole `Authorization` value until
//! their `exp` (at most [`VERIFIED_FOR`]), so a token is not re-verified on every call and
//! the legacy `/sse` pump, which replays a request's headers later, finds its caller. A
//! token nobody verified is never in the table: the gate refuses such a caller.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper::HeaderMap;
use serde_json::Value;
use sha2::{Digest, Sha256};
use toolgate_identity::{AuthError, Authenticator, Principal, ProtectedResource};

/// Longest a verification is reused.
pub const VERIFIED_FOR: Duration = Duration::from_secs(60);
/// Most remembered verifications (the table is emptied when full: callers are then just
/// verified again).
pub const MAX_VERIFIED: usize = 10_000;

/// Caller authentication, when configured.
#[derive(Debug)]
pub struct Authn {
    authenticator: Authenticator,
    /// RFC 9728 metadata, served and named in `WWW-Authenticate`.
    pub resource: Option<ProtectedResource>,
    verified: Mutex<HashMap<[u8; 32], (Principal, Instant)>>,
    allow_anonymous: bool,
}

/// Why a request is refused at the door: the status, the `WWW-Authenticate` value, the
/// metric label and the message.
#[derive(Debug)]
pub struct AuthRefusal {
    pub error: AuthError,
    pub www_authenticate: Option<String>,
}

impl AuthRefusal {
    /// 401, or 503 when the issuer's keys cannot be had.
    pub fn status(&self) -> hyper::StatusCode {
        if self.error.is_unavailable() {
            hyper::StatusCode::SERVICE_UNAVAILABLE
        } else {
            hyper::StatusCode::UNAUTHORIZED
        }
    }
}

fn key(authorization: &[u8]) -> [u8; 32] {
    Sha256::digest(authorization).into()
}

/// When the principal's token expires, if it says.
fn expiry(p: &Principal) -> Option<Instant> {
    let claims = match p {
        Principal::Token { claims, .. } | Principal::ServiceAccount { claims, .. } => claims,
        Principal::ApiKey { .. } => return None,
    };
    let exp = claims.get("exp").and_then(Value::as_u64)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Instant::now() + Duration::from_secs(exp.saturating_sub(now)))
}

impl Authn {
    pub fn new(authenticator: Authenticator, resource: Option<ProtectedResource>, allow_anonymous: bool) -> Self {
        Authn { authenticator, resource, verified: Mutex::default(), allow_anonymous }
    }

    fn refusal(&self, error: AuthError) -> AuthRefusal {
        let invalid = !matches!(error, AuthError::Missing | AuthError::KeysUnavailable(_));
        let www_authenticate = match &self.resource {
            Some(r) => Some(r.www_authenticate(invalid)),
            None => Some(if invalid { "Bearer error=\"invalid_token\"".into() } else { "Bearer".into() }),
        };
        AuthRefusal { error, www_authenticate }
    }

    /// Checks the request's credential; on success the gate will find its caller.
    pub async fn verify(&self, headers: &HeaderMap) -> Result<(), AuthRefusal> {
        let mut all = headers.get_all(hyper::header::AUTHORIZATION).iter();
        let (Some(value), None) = (all.next(), all.next()) else {
            return match headers.get(hyper::header::AUTHORIZATION) {
                // Repeated: the gate answers 400 (ambiguous caller).
                Some(_) => Ok(()),
                None if self.allow_anonymous => Ok(()),
                None => Err(self.refusal(AuthError::Missing)),
            };
        };
        let k = key(value.as_bytes());
        if self.lookup(&k).is_some() {
            return Ok(());
        }
        match self.authenticator.authenticate(Some(value.as_bytes())).await {
            Ok(Some(p)) => {
                let until = expiry(&p).map_or(Instant::now() + VERIFIED_FOR, |e| e.min(Instant::now() + VERIFIED_FOR));
                let mut v = self.verified.lock().unwrap_or_else(|p| p.into_inner());
                if v.len() >= MAX_VERIFIED {
                    let now = Instant::now();
                    v.retain(|_, (_, until)| *until > now);
                    if v.len() >= MAX_VERIFIED {
                        v.clear();
                    }
                }
                v.insert(k, (p, until));
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(self.refusal(e)),
        }
    }

    fn lookup(&self, k: &[u8; 32]) -> Option<Principal> {
        let mut v = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        match v.get(k) {
            Some((p, until)) if *until > Instant::now() => Some(p.clone()),
            Some(_) => {
                v.remove(k);
                None
            }
            None => None,
        }
    }

    /// Who sent `authorization`, as verified at the door: `Ok(None)` for an allowed
    /// anonymous caller; `Err` when the credential was not (or is no longer) verified.
    pub fn principal(&self, authorization: Option<&[u8]>) -> Result<Option<Principal>, AuthError> {
        match authorization {
            None if self.allow_anonymous => Ok(None),
            None => Err(AuthError::Missing),
            Some(a) => self.lookup(&key(a)).map(Some).ok_or(AuthError::Expired),
        }
    }
}
