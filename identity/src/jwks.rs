//! One trusted token issuer: its configuration and its signing keys, fetched from its key
//! set (JWKS), cached, refreshed when a token names a key id it does not know (at most
//! once per [`MIN_REFRESH`]) and when older than [`MAX_AGE`]; the last good keys are kept
//! while the issuer cannot be reached.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

use crate::AuthError;
use crate::fetch::{self, FetchOptions};

/// Least time between two fetches of one issuer's keys (unknown key ids cannot make the
/// proxy hammer the issuer).
pub const MIN_REFRESH: Duration = Duration::from_secs(10);
/// Keys older than this are fetched again on the next token (and kept if that fails).
pub const MAX_AGE: Duration = Duration::from_secs(15 * 60);
/// Most keys taken from one key set.
pub const MAX_KEYS: usize = 64;

/// What kind of principal the issuer's tokens name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IssuerKind {
    /// An OAuth 2.1 / OIDC authorization server: the principal is the token's `sub`.
    Oidc,
    /// A Kubernetes cluster's service-account issuer: the principal is the service
    /// account (and pod) in the token's `kubernetes.io` claim.
    Kubernetes,
}

/// A trusted issuer, as configured.
#[derive(Clone, Debug)]
pub struct IssuerConfig {
    /// The issuer exactly as tokens carry it in `iss`.
    pub issuer: String,
    /// Accepted audiences (`aud` must name one). Never empty.
    pub audiences: Vec<String>,
    /// The key set's URL; default: `jwks_uri` of `<issuer>/.well-known/openid-configuration`.
    pub jwks_uri: Option<String>,
    /// Accepted signature algorithms (never `none` nor HMAC).
    pub algorithms: Vec<Algorithm>,
    /// OIDC or Kubernetes.
    pub kind: IssuerKind,
    /// TLS trust and credentials for the key fetch.
    pub fetch: FetchOptions,
}

/// The algorithms accepted when none are configured: every asymmetric one.
pub const DEFAULT_ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

impl IssuerConfig {
    /// Checks the configuration: an issuer URL, an audience, no symmetric algorithm, a
    /// fetchable key-set URL.
    pub fn validate(&self) -> Result<(), String> {
        if self.issuer.is_empty() {
            return Err("an issuer must be named".into());
        }
        if self.audiences.is_empty() || self.audiences.iter().any(String::is_empty) {
            return Err(format!(
                "issuer {}: at least one audience is required (tokens must be meant for this proxy)",
                self.issuer
            ));
        }
        if self.algorithms.is_empty() {
            return Err(format!("issuer {}: no algorithm is accepted", self.issuer));
        }
        if let Some(a) =
            self.algorithms.iter().find(|a| matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512))
        {
            return Err(format!("issuer {}: {a:?} is symmetric; only public-key algorithms are accepted", self.issuer));
        }
        let url = self.jwks_uri.clone().unwrap_or_else(|| discovery_url(&self.issuer));
        fetch::check_url(&url).map(|_| ()).map_err(|e| format!("issuer {}: {e}", self.issuer))
    }
}

fn discovery_url(issuer: &str) -> String {
    format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'))
}

#[derive(Default)]
struct Keys {
    by_kid: HashMap<String, Jwk>,
    /// Keys without a `kid`.
    unnamed: Vec<Jwk>,
    fetched_at: Option<Instant>,
}

/// An issuer with its cached keys.
pub struct Issuer {
    config: IssuerConfig,
    keys: RwLock<Arc<Keys>>,
    /// Held while fetching; remembers the last attempt.
    fetching: tokio::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("issuer", &self.config.issuer)
            .field("kind", &self.config.kind)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Discovery {
    jwks_uri: String,
}

impl Issuer {
    /// An issuer whose keys are fetched on first use.
    pub fn new(config: IssuerConfig) -> Self {
        Issuer { config, keys: RwLock::new(Arc::default()), fetching: tokio::sync::Mutex::new(None) }
    }

    /// Its configuration.
    pub fn config(&self) -> &IssuerConfig {
        &self.config
    }

    fn snapshot(&self) -> Arc<Keys> {
        match self.keys.read() {
            Ok(k) => k.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The key that verifies a token signed with `alg` under `kid`.
    pub async fn key(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, AuthError> {
        let keys = self.snapshot();
        let stale = keys.fetched_at.is_none_or(|t| t.elapsed() >= MAX_AGE);
        let found = pick(&keys, kid, alg);
        if !stale && let Some(r) = found {
            return r;
        }
        // Unknown key id, or old keys: fetch again (bounded), then look once more.
        let refreshed = self.refresh().await;
        let keys = self.snapshot();
        match pick(&keys, kid, alg) {
            Some(r) => r,
            None if keys.fetched_at.is_none() => Err(AuthError::KeysUnavailable(
                refreshed.err().unwrap_or_else(|| "the issuer's key set is empty".into()),
            )),
            None => Err(AuthError::UnknownKeyId),
        }
    }

    /// Fetches the key set unless another fetch ran within [`MIN_REFRESH`]. On failure
    /// the keys in hand are kept.
    async fn refresh(&self) -> Result<(), String> {
        let mut last = self.fetching.lock().await;
        if last.is_some_and(|t| t.elapsed() < MIN_REFRESH) {
            return Ok(());
        }
        *last = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
                let n = keys.by_kid.len() + keys.unnamed.len();
                tracing::info!(issuer = %self.config.issuer, keys = n, "fetched the issuer's keys");
                match self.keys.write() {
                    Ok(mut k) => *k = Arc::new(keys),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(keys),
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!(issuer = %self.config.issuer, error = %e, "cannot fetch the issuer's keys; keeping the last good ones");
                Err(e)
            }
        }
    }

    async fn fetch(&self) -> Result<Keys, String> {
        let url = match &self.config.jwks_uri {
            Some(u) => u.clone(),
            None => {
                let body = fetch::get(&discovery_url(&self.config.issuer), &self.config.fetch).await?;
                let d: Discovery = serde_json::from_slice(&body).map_err(|e| format!("discovery document: {e}"))?;
                d.jwks_uri
            }
        };
        let body = fetch::get(&url, &self.config.fetch).await?;
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| format!("key set {url}: {e}"))?;
        let mut keys = Keys { fetched_at: Some(Instant::now()), ..Keys::default() };
        for jwk in set.keys.into_iter().take(MAX_KEYS) {
            match jwk.common.key_id.clone() {
                Some(kid) => {
                    keys.by_kid.insert(kid, jwk);
                }
                None => keys.unnamed.push(jwk),
            }
        }
        if keys.by_kid.is_empty() && keys.unnamed.is_empty() {
            return Err(format!("key set {url} has no keys"));
        }
        Ok(keys)
    }
}

/// The key for `kid`: `None` when it is not known. A token without `kid` may use the
/// key set's only key.
fn pick(keys: &Keys, kid: Option<&str>, alg: Algorithm) -> Option<Result<DecodingKey, AuthError>> {
    let jwk = match kid {
        Some(kid) => keys.by_kid.get(kid)?,
        None => match (keys.by_kid.len() + keys.unnamed.len(), keys.unnamed.first()) {
            (1, Some(only)) => only,
            (1, None) => keys.by_kid.values().next()?,
            _ => return None,
        },
    };
    // A key that says which algorithm it is for is used for that one only.
    if let Some(key_alg) = jwk.common.key_algorithm
        && key_alg.to_string() != format!("{alg:?}")
    {
        return Some(Err(AuthError::AlgorithmNotAllowed));
    }
    Some(DecodingKey::from_jwk(jwk).map_err(|e| AuthError::Malformed(format!("the issuer's key is unusable: {e}"))))
}
