//! Who is calling: a sidecar presents its projected service-account token (audience
//! `toolgate`); the apiserver's TokenReview says whether it is valid and which pod it is
//! bound to. Nothing the sidecar asserts about itself is trusted.
//!
//! Successful reviews are cached by the token's SHA-256 for at most a minute and never
//! past the token's own `exp`, so that reconnect storms do not become TokenReview storms.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};

/// Audience of the tokens sidecars present.
pub const AUDIENCE: &str = "toolgate";
const POD_NAME_CLAIM: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_CLAIM: &str = "authentication.kubernetes.io/pod-uid";
const CACHE_TTL: Duration = Duration::from_secs(60);
const CACHE_MAX: usize = 20_000;

/// The pod a token is bound to, as the apiserver says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
}

/// Why a caller is refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("token refused: {0}")]
    Invalid(String),
    #[error("token is not bound to a pod (a projected service-account token with audience \"toolgate\" is needed)")]
    NotPodBound,
    #[error("cannot review the token: {0}")]
    Unavailable(String),
}

/// TokenReview with a small cache.
pub struct Authenticator {
    api: Api<TokenReview>,
    cache: Mutex<HashMap<[u8; 32], (PodIdentity, Instant)>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").finish_non_exhaustive()
    }
}

/// The token of an `Authorization: Bearer` header value.
pub fn bearer(header: Option<&hyper::header::HeaderValue>) -> Result<&str, AuthError> {
    let value = header.and_then(|v| v.to_str().ok()).ok_or(AuthError::Missing)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::Missing);
    }
    Ok(token.trim())
}

/// The `exp` claim of a JWT, read without verifying it (only to bound the cache; the
/// apiserver verifies).
fn expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(claims.get("exp")?.as_u64()?))
}

/// The identity a token proved on one connection: later requests on the same connection
/// (a sidecar's acks travel on its stream's HTTP/2 connection) with the same token skip
/// the TokenReview until the token expires. A rotated token is reviewed again.
#[derive(Debug, Default)]
pub struct ConnAuth(Mutex<Option<([u8; 32], PodIdentity, SystemTime)>>);

impl ConnAuth {
    fn get(&self, key: &[u8; 32]) -> Option<PodIdentity> {
        let guard = self.0.lock().expect("connection auth lock");
        let (k, id, until) = guard.as_ref()?;
        (k == key && *until > SystemTime::now()).then(|| id.clone())
    }

    fn remember(&self, key: [u8; 32], id: &PodIdentity, until: SystemTime) {
        *self.0.lock().expect("connection auth lock") = Some((key, id.clone(), until));
    }
}

impl Authenticator {
    pub fn new(client: kube::Client) -> Self {
        Self { api: Api::all(client), cache: Mutex::default() }
    }

    /// [`Authenticator::authenticate`], remembering the result on the connection.
    pub async fn authenticate_on(&self, conn: Option<&ConnAuth>, token: &str) -> Result<PodIdentity, AuthError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(id) = conn.and_then(|c| c.get(&key)) {
            return Ok(id);
        }
        let id = self.authenticate(token).await?;
        if let (Some(conn), Some(exp)) = (conn, expiry(token)) {
            conn.remember(key, &id, exp);
        }
        Ok(id)
    }

    /// Reviews `token` and returns the pod it is bound to.
    pub async fn authenticate(&self, token: &str) -> Result<PodIdentity, AuthError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((id, until)) = self.cache.lock().expect("auth cache lock").get(&key)
            && *until > Instant::now()
        {
            return Ok(id.clone());
        }
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: Some(vec![AUDIENCE.to_owned()]) },
            ..TokenReview::default()
        };
        let answer = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::Invalid(status.error.unwrap_or_else(|| "not authenticated".into())));
        }
        if !status.audiences.unwrap_or_default().iter().any(|a| a == AUDIENCE) {
            return Err(AuthError::Invalid(format!("audience is not {AUDIENCE:?}")));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let mut parts = username.strip_prefix("system:serviceaccount:").unwrap_or_default().splitn(2, ':');
        let (Some(namespace), Some(service_account)) = (parts.next(), parts.next()) else {
            return Err(AuthError::NotPodBound);
        };
        let extra = user.extra.unwrap_or_default();
        let claim = |k: &str| extra.get(k).and_then(|v| v.first()).filter(|v| !v.is_empty()).cloned();
        let (Some(pod_name), Some(pod_uid)) = (claim(POD_NAME_CLAIM), claim(POD_UID_CLAIM)) else {
            return Err(AuthError::NotPodBound);
        };
        let id = PodIdentity {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            pod_name,
            pod_uid,
        };
        let mut ttl = CACHE_TTL;
        if let Some(exp) = expiry(token) {
            ttl = ttl.min(exp.duration_since(SystemTime::now()).unwrap_or_default());
        }
        let mut cache = self.cache.lock().expect("auth cache lock");
        if cache.len() >= CACHE_MAX {
            let now = Instant::now();
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (id.clone(), Instant::now() + ttl));
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_needs_the_scheme_and_a_token() {
        let h = |s: &str| hyper::header::HeaderValue::from_str(s).expect("header");
        assert_eq!(bearer(Some(&h("Bearer abc"))).ok(), Some("abc"));
        assert_eq!(bearer(Some(&h("bearer  abc "))).ok(), Some("abc"));
        assert!(bearer(Some(&h("Basic abc"))).is_err());
        assert!(bearer(Some(&h("Bearer "))).is_err());
        assert!(bearer(None).is_err());
    }

    #[test]
    fn a_connection_remembers_only_the_same_unexpired_token() {
        let conn = ConnAuth::default();
        let id = PodIdentity {
            namespace: "ns".into(),
            service_account: "sa".into(),
            pod_name: "p".into(),
            pod_uid: "u".into(),
        };
        let key = |t: &str| -> [u8; 32] { Sha256::digest(t.as_bytes()).into() };
        conn.remember(key("t1"), &id, SystemTime::now() + Duration::from_secs(60));
        assert_eq!(conn.get(&key("t1")), Some(id.clone()));
        assert_eq!(conn.get(&key("t2")), None, "another (e.g. rotated) token is reviewed again");
        conn.remember(key("t1"), &id, SystemTime::now() - Duration::from_secs(1));
        assert_eq!(conn.get(&key("t1")), None, "an expired token is reviewed again");
    }

    #[test]
    fn expiry_reads_the_exp_claim_and_ignores_garbage() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"exp":2000000000}"#);
        assert_eq!(expiry(&format!("h.{payload}.s")), Some(UNIX_EPOCH + Duration::from_secs(2_000_000_000)));
        assert_eq!(expiry("not-a-jwt"), None);
        assert_eq!(expiry("a.%%%.c"), None);
    }
}
