//! Who is calling: the proxy's authentication of callers.
//!
//! A caller presents `Authorization: Bearer <credential>`. The credential is
//! - a static API key listed (by its SHA-256) in the key file → [`Principal::ApiKey`];
//! - or a JWT from a trusted issuer, its signature checked against the issuer's published
//!   keys (JWKS), `iss`, `aud`, `exp` and `nbf` checked, the algorithm allow-listed →
//!   [`Principal::Token`], or [`Principal::ServiceAccount`] for a Kubernetes cluster's
//!   service-account issuer.
//!
//! Anything else is refused with an [`AuthError`] whose [`AuthError::reason`] is a bounded
//! metric label. Nothing here forwards or logs a credential.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod apikeys;
mod fetch;
mod jwks;
mod metadata;

use std::sync::Arc;

use jsonwebtoken::Validation;
use jsonwebtoken::errors::ErrorKind;
use serde_json::{Map, Value};

pub use apikeys::{ApiKeys, KeyTable};
pub use fetch::{FetchOptions, client_tls};
pub use jsonwebtoken::Algorithm;
pub use jwks::{DEFAULT_ALGORITHMS, Issuer, IssuerConfig, IssuerKind};
pub use metadata::ProtectedResource;
pub use toolgate_policy::Principal;

/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECONDS: u64 = 30;
/// Longest bearer credential read.
pub const MAX_CREDENTIAL_BYTES: usize = 16 * 1024;

/// Why a caller was refused. Each variant is one bounded metric label.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credential, and anonymous callers are not allowed.
    #[error("a credential is required: send Authorization: Bearer <token>")]
    Missing,
    /// Not `Bearer <credential>`, or not a token.
    #[error("malformed credential: {0}")]
    Malformed(String),
    /// An opaque credential that is no listed API key (and not a JWT).
    #[error("unknown API key")]
    UnknownApiKey,
    /// A JWT whose `iss` is no trusted issuer.
    #[error("the token's issuer is not trusted here")]
    UnknownIssuer,
    /// A key id the issuer does not publish (after a refresh).
    #[error("the token is signed with a key its issuer does not publish")]
    UnknownKeyId,
    /// `alg` not allowed (`none`, HMAC, or not configured), or not the key's algorithm.
    #[error("the token's signature algorithm is not accepted")]
    AlgorithmNotAllowed,
    /// The signature does not verify.
    #[error("the token's signature does not verify")]
    BadSignature,
    /// Past `exp`.
    #[error("the token has expired")]
    Expired,
    /// Before `nbf`.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `aud` names no accepted audience.
    #[error("the token is not meant for this server (audience)")]
    WrongAudience,
    /// A required claim is missing or has the wrong shape.
    #[error("the token lacks a required claim: {0}")]
    InvalidClaims(String),
    /// The issuer's keys could not be fetched and none are cached.
    #[error("the issuer's keys cannot be fetched: {0}")]
    KeysUnavailable(String),
}

impl AuthError {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed(_) => "malformed",
            AuthError::UnknownApiKey => "unknown_api_key",
            AuthError::UnknownIssuer => "unknown_issuer",
            AuthError::UnknownKeyId => "unknown_key_id",
            AuthError::AlgorithmNotAllowed => "algorithm_not_allowed",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::InvalidClaims(_) => "invalid_claims",
            AuthError::KeysUnavailable(_) => "keys_unavailable",
        }
    }

    /// Every label, for metrics that start at zero.
    pub const REASONS: [&'static str; 12] = [
        "missing",
        "malformed",
        "unknown_api_key",
        "unknown_issuer",
        "unknown_key_id",
        "algorithm_not_allowed",
        "bad_signature",
        "expired",
        "not_yet_valid",
        "wrong_audience",
        "invalid_claims",
        "keys_unavailable",
    ];

    /// Whether the issuer (not the caller) is at fault: answer 503, not 401.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, AuthError::KeysUnavailable(_))
    }
}

/// Which credentials are accepted.
#[derive(Clone, Debug, Default)]
pub struct AuthConfig {
    /// Trusted token issuers (OIDC and Kubernetes).
    pub issuers: Vec<IssuerConfig>,
    /// The API key file, if any.
    pub api_keys: Option<ApiKeys>,
    /// Whether callers without a credential are let through (as anonymous).
    pub allow_anonymous: bool,
}

/// Authenticates callers. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Authenticator {
    issuers: Arc<[Issuer]>,
    api_keys: Option<ApiKeys>,
    allow_anonymous: bool,
}

impl Authenticator {
    /// Checks the configuration; keys are fetched on first use.
    pub fn new(config: AuthConfig) -> Result<Self, String> {
        for i in &config.issuers {
            i.validate()?;
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = config.issuers.iter().find(|i| !seen.insert(i.issuer.as_str())) {
            return Err(format!("issuer {} is configured twice", dup.issuer));
        }
        if config.issuers.is_empty() && config.api_keys.is_none() {
            return Err("no identity source: configure an issuer or an API key file".into());
        }
        Ok(Authenticator {
            issuers: config.issuers.into_iter().map(Issuer::new).collect(),
            api_keys: config.api_keys,
            allow_anonymous: config.allow_anonymous,
        })
    }

    /// Who presents `authorization` (the raw header value, if any). `Ok(None)`: an
    /// anonymous caller, allowed by configuration.
    pub async fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Option<Principal>, AuthError> {
        let Some(raw) = authorization else {
            return if self.allow_anonymous { Ok(None) } else { Err(AuthError::Missing) };
        };
        let credential = bearer(raw)?;
        if let Some(keys) = &self.api_keys
            && let Some(name) = keys.table().name_of(credential.as_bytes())
        {
            return Ok(Some(Principal::ApiKey { name: name.to_owned() }));
        }
        if credential.split('.').count() != 3 || self.issuers.is_empty() {
            return Err(if self.api_keys.is_some() {
                AuthError::UnknownApiKey
            } else {
                AuthError::Malformed("not a JWT".into())
            });
        }
        self.verify_jwt(credential).await.map(Some)
    }

    async fn verify_jwt(&self, token: &str) -> Result<Principal, AuthError> {
        // `alg: none` and names the library does not know are refused as algorithms, not
        // as malformed tokens: the metric says what the caller tried.
        let alg = segment(token, 0)?.get("alg").and_then(Value::as_str).map(str::to_owned);
        let header = jsonwebtoken::decode_header(token).map_err(|e| match (e.kind(), alg) {
            (ErrorKind::InvalidAlgorithmName, _) => AuthError::AlgorithmNotAllowed,
            (_, Some(a)) if a.parse::<Algorithm>().is_err() => AuthError::AlgorithmNotAllowed,
            _ => AuthError::Malformed(format!("token header: {e}")),
        })?;
        // The issuer is read before the signature is checked only to pick whose keys
        // check it; every claim is validated after.
        let iss = unverified_issuer(token)?;
        let issuer = self.issuers.iter().find(|i| i.config().issuer == iss).ok_or(AuthError::UnknownIssuer)?;
        let cfg = issuer.config();
        if !cfg.algorithms.contains(&header.alg) {
            return Err(AuthError::AlgorithmNotAllowed);
        }
        let key = issuer.key(header.kid.as_deref(), header.alg).await?;
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        validation.set_issuer(&[cfg.issuer.as_str()]);
        validation.set_audience(&cfg.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidAudience => AuthError::WrongAudience,
                ErrorKind::InvalidIssuer => AuthError::UnknownIssuer,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => AuthError::AlgorithmNotAllowed,
                ErrorKind::MissingRequiredClaim(c) => AuthError::InvalidClaims(c.clone()),
                _ => AuthError::Malformed(format!("token: {e}")),
            })?;
        principal(cfg, data.claims)
    }
}

/// `Bearer <credential>` (scheme case-insensitive) → the credential.
fn bearer(raw: &[u8]) -> Result<&str, AuthError> {
    if raw.len() > MAX_CREDENTIAL_BYTES {
        return Err(AuthError::Malformed(format!("longer than {MAX_CREDENTIAL_BYTES} bytes")));
    }
    let text = std::str::from_utf8(raw).map_err(|_| AuthError::Malformed("not ASCII".into()))?.trim();
    let (scheme, rest) =
        text.split_once([' ', '\t']).ok_or_else(|| AuthError::Malformed("expected Bearer <token>".into()))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed(format!("the {scheme:?} scheme is not accepted; use Bearer")));
    }
    let credential = rest.trim_start_matches([' ', '\t']);
    if credential.is_empty() || !credential.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AuthError::Malformed("expected Bearer <token>".into()));
    }
    Ok(credential)
}

/// The JSON object in the token's `i`-th segment (0: header, 1: payload), unverified.
fn segment(token: &str, i: usize) -> Result<Map<String, Value>, AuthError> {
    use base64::Engine as _;
    let part = token.split('.').nth(i).unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| AuthError::Malformed("a token segment is not base64url".into()))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(AuthError::Malformed("a token segment is not a JSON object".into())),
    }
}

fn unverified_issuer(token: &str) -> Result<String, AuthError> {
    match segment(token, 1)?.remove("iss") {
        Some(Value::String(iss)) => Ok(iss),
        _ => Err(AuthError::InvalidClaims("iss".into())),
    }
}

/// The verified claims → who they name.
fn principal(cfg: &IssuerConfig, claims: Map<String, Value>) -> Result<Principal, AuthError> {
    let subject = match claims.get("sub") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(AuthError::InvalidClaims("sub".into())),
    };
    match cfg.kind {
        IssuerKind::Oidc => Ok(Principal::Token { issuer: cfg.issuer.clone(), subject, claims }),
        IssuerKind::Kubernetes => {
            let k = claims.get("kubernetes.io").ok_or_else(|| AuthError::InvalidClaims("kubernetes.io".into()))?;
            let text = |v: Option<&Value>| v.and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
            let namespace =
                text(k.get("namespace")).ok_or_else(|| AuthError::InvalidClaims("kubernetes.io.namespace".into()))?;
            let name = text(k.pointer("/serviceaccount/name"))
                .ok_or_else(|| AuthError::InvalidClaims("kubernetes.io.serviceaccount.name".into()))?;
            // The subject the apiserver writes must agree with the structured claim.
            if subject != format!("system:serviceaccount:{namespace}:{name}") {
                return Err(AuthError::InvalidClaims("sub does not name the service account".into()));
            }
            let pod = text(k.pointer("/pod/name"));
            Ok(Principal::ServiceAccount { namespace, name, pod, claims })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_spellings() {
        assert_eq!(bearer(b"Bearer abc"), Ok("abc"));
        assert_eq!(bearer(b"bearer \t abc "), Ok("abc"));
        assert!(bearer(b"Basic abc").is_err());
        assert!(bearer(b"Bearer").is_err());
        assert!(bearer(b"Bearer a b").is_err());
        assert!(bearer(b"Bearer \xff").is_err());
        assert!(bearer(&vec![b'a'; MAX_CREDENTIAL_BYTES + 1]).is_err());
    }

    #[test]
    fn every_reason_is_listed() {
        let all = [
            AuthError::Missing,
            AuthError::Malformed(String::new()),
            AuthError::UnknownApiKey,
            AuthError::UnknownIssuer,
            AuthError::UnknownKeyId,
            AuthError::AlgorithmNotAllowed,
            AuthError::BadSignature,
            AuthError::Expired,
            AuthError::NotYetValid,
            AuthError::WrongAudience,
            AuthError::InvalidClaims(String::new()),
            AuthError::KeysUnavailable(String::new()),
        ];
        let labels: Vec<_> = all.iter().map(AuthError::reason).collect();
        assert_eq!(labels, AuthError::REASONS);
    }
}
