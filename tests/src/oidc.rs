//! A real OIDC issuer on loopback for the identity tests: HTTPS (certificate from its own
//! test CA), a discovery document and a key set (JWKS) of ES256 keys it generates, and
//! tokens it mints. It can rotate keys, go down (503) and mint the malformed tokens an
//! attacker would send (`alg: none`, HMAC keyed with the public key, tampered payloads).

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::KeyPair;
use serde_json::{Value, json};

use crate::certs::TestCa;
use crate::serve::{TestServer, serve_https};

struct SigningKey {
    kid: String,
    key: KeyPair,
}

impl SigningKey {
    fn generate(kid: &str) -> Result<Self> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generating an ES256 key")?;
        Ok(SigningKey { kid: kid.to_owned(), key })
    }

    fn jwk(&self) -> Value {
        // The uncompressed point: 0x04 ‖ x ‖ y.
        let raw = self.key.public_key_raw();
        let (x, y) = raw.get(1..).unwrap_or_default().split_at(32);
        json!({"kty": "EC", "crv": "P-256", "x": B64.encode(x), "y": B64.encode(y), "kid": self.kid, "alg": "ES256", "use": "sig"})
    }
}

#[derive(Default)]
struct State {
    /// Published keys; the last one signs.
    keys: Vec<SigningKey>,
    down: bool,
    key_fetches: usize,
}

/// A running issuer; dropping it stops it.
#[allow(missing_debug_implementations)]
pub struct TestIssuer {
    server: TestServer,
    ca: TestCa,
    state: Arc<Mutex<State>>,
    /// Keys minted with but never published.
    unpublished: SigningKey,
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl TestIssuer {
    /// Starts an issuer with one key (`key-1`).
    pub async fn start() -> Result<Self> {
        crate::install_crypto_provider();
        let ca = TestCa::new("toolgate test issuer CA")?;
        let tls = ca.server_cert(&["127.0.0.1", "localhost"])?.rustls_server_config()?;
        let state = Arc::new(Mutex::new(State { keys: vec![SigningKey::generate("key-1")?], ..State::default() }));
        let shared = state.clone();
        let issuer_url = Arc::new(Mutex::new(String::new()));
        let url_for_handler = issuer_url.clone();
        let server = serve_https(tls, move |req| {
            let state = shared.clone();
            let issuer = url_for_handler.lock().map(|u| u.clone()).unwrap_or_default();
            async move {
                let mut s = match state.lock() {
                    Ok(s) => s,
                    Err(p) => p.into_inner(),
                };
                if s.down {
                    return status(StatusCode::SERVICE_UNAVAILABLE);
                }
                match req.uri().path() {
                    "/.well-known/openid-configuration" => json_response(&json!({
                        "issuer": issuer,
                        "jwks_uri": format!("{issuer}/keys"),
                        "id_token_signing_alg_values_supported": ["ES256"],
                    })),
                    "/keys" => {
                        s.key_fetches += 1;
                        json_response(&json!({"keys": s.keys.iter().map(SigningKey::jwk).collect::<Vec<_>>()}))
                    }
                    _ => status(StatusCode::NOT_FOUND),
                }
            }
        })
        .await;
        if let Ok(mut u) = issuer_url.lock() {
            *u = server.url();
        }
        Ok(TestIssuer { server, ca, state, unpublished: SigningKey::generate("never-published")? })
    }

    /// The issuer URL (`https://127.0.0.1:PORT`), as tokens carry it in `iss`.
    pub fn issuer(&self) -> String {
        self.server.url()
    }

    /// The CA bundle (PEM) that verifies the issuer's certificate.
    pub fn ca_pem(&self) -> String {
        self.ca.cert_pem().to_owned()
    }

    /// How many times the key set was fetched.
    pub fn key_fetches(&self) -> usize {
        self.lock().key_fetches
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    /// Makes the issuer answer 503 to everything (or serve again).
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
    }

    /// Publishes a new key `kid` and signs with it from now on; the old keys stay
    /// published unless `retire_old`.
    pub fn rotate(&self, kid: &str, retire_old: bool) -> Result<()> {
        let key = SigningKey::generate(kid)?;
        let mut s = self.lock();
        if retire_old {
            s.keys.clear();
        }
        s.keys.push(key);
        Ok(())
    }

    /// Standard claims for `sub` meant for `aud`, valid for ten minutes.
    pub fn claims(&self, sub: &str, aud: &str) -> Value {
        let now = now();
        json!({"iss": self.issuer(), "sub": sub, "aud": aud, "iat": now, "nbf": now, "exp": now + 600})
    }

    /// A token with these claims, signed with the current key.
    pub fn mint(&self, claims: &Value) -> Result<String> {
        let s = self.lock();
        let key = s.keys.last().context("the issuer has no key")?;
        sign(key, claims)
    }

    /// A token signed with a key the issuer never published (same `kid` shape).
    pub fn mint_unpublished(&self, claims: &Value) -> Result<String> {
        sign(&self.unpublished, claims)
    }

    /// `alg: none`, no signature.
    pub fn forge_none(&self, claims: &Value) -> String {
        let header = B64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        format!("{header}.{}.", B64.encode(claims.to_string()))
    }

    /// HS256 keyed with the current public key's JWK text: the classic key-confusion forgery.
    pub fn forge_hmac(&self, claims: &Value) -> Result<String> {
        let s = self.lock();
        let key = s.keys.last().context("the issuer has no key")?;
        let secret = key.jwk().to_string();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(key.kid.clone());
        let key = EncodingKey::from_secret(secret.as_bytes()).context("HS256 key")?;
        jsonwebtoken::encode(&header, claims, &key).context("HS256")
    }

    /// A validly signed token whose payload is then swapped for `claims`.
    pub fn tamper(&self, signed: &str, claims: &Value) -> String {
        let mut parts = signed.split('.');
        let (h, _, sig) = (parts.next().unwrap_or_default(), parts.next(), parts.next().unwrap_or_default());
        format!("{h}.{}.{sig}", B64.encode(claims.to_string()))
    }
}

fn sign(key: &SigningKey, claims: &Value) -> Result<String> {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(key.kid.clone());
    let der = key.key.serialize_der();
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(&der)).context("signing with ES256")
}

fn json_response(v: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    r
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = code;
    r
}
