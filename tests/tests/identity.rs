//! The proxy's authentication of callers against a real OIDC issuer on loopback (HTTPS,
//! discovery, JWKS): valid tokens name their subject; expired, wrong-audience,
//! wrong-issuer, unknown-key, `alg: none`, HMAC-confusion and tampered tokens are refused
//! with their reason; keys rotate; an issuer that goes down keeps its last good keys.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use serde_json::json;
use toolgate_identity::{
    AuthConfig, AuthError, Authenticator, DEFAULT_ALGORITHMS, FetchOptions, IssuerConfig, IssuerKind, Principal,
};
use toolgate_tests::oidc::{TestIssuer, now};

const AUD: &str = "https://mcp.test/mcp";

fn ca_file(dir: &tempfile::TempDir, issuer: &TestIssuer) -> PathBuf {
    let p = dir.path().join("issuer-ca.pem");
    std::fs::write(&p, issuer.ca_pem()).unwrap();
    p
}

fn config(issuer: &TestIssuer, ca: PathBuf) -> IssuerConfig {
    IssuerConfig {
        issuer: issuer.issuer(),
        audiences: vec![AUD.into()],
        jwks_uri: None,
        algorithms: DEFAULT_ALGORITHMS.to_vec(),
        kind: IssuerKind::Oidc,
        fetch: FetchOptions { ca_file: Some(ca), bearer_token_file: None },
    }
}

fn auth(issuers: Vec<IssuerConfig>) -> Authenticator {
    Authenticator::new(AuthConfig { issuers, api_keys: None, allow_anonymous: false }).unwrap()
}

async fn check(a: &Authenticator, token: &str) -> Result<Option<Principal>, AuthError> {
    a.authenticate(Some(format!("Bearer {token}").as_bytes())).await
}

#[tokio::test]
async fn a_valid_token_names_its_subject_and_every_forgery_is_refused_with_its_reason() {
    let idp = TestIssuer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = auth(vec![config(&idp, ca_file(&dir, &idp))]);

    let mut claims = idp.claims("agent-a", AUD);
    claims["groups"] = json!(["platform"]);
    let good = idp.mint(&claims).unwrap();
    match check(&a, &good).await.unwrap() {
        Some(Principal::Token { issuer, subject, claims }) => {
            assert_eq!((issuer.as_str(), subject.as_str()), (idp.issuer().as_str(), "agent-a"));
            assert_eq!(claims["groups"], json!(["platform"]));
        }
        other => panic!("expected a token principal, got {other:?}"),
    }

    let t = now();
    let cases: Vec<(&str, String, AuthError)> = vec![
        (
            "expired",
            idp.mint(&json!({"iss": idp.issuer(), "sub": "a", "aud": AUD, "exp": t - 120})).unwrap(),
            AuthError::Expired,
        ),
        (
            "not yet valid",
            idp.mint(&json!({"iss": idp.issuer(), "sub": "a", "aud": AUD, "nbf": t + 600, "exp": t + 1200})).unwrap(),
            AuthError::NotYetValid,
        ),
        ("wrong audience", idp.mint(&idp.claims("a", "https://other.example")).unwrap(), AuthError::WrongAudience),
        (
            "wrong issuer",
            idp.mint(&json!({"iss": "https://evil.example", "sub": "a", "aud": AUD, "exp": t + 600})).unwrap(),
            AuthError::UnknownIssuer,
        ),
        ("unpublished key", idp.mint_unpublished(&idp.claims("a", AUD)).unwrap(), AuthError::UnknownKeyId),
        ("alg none", idp.forge_none(&idp.claims("a", AUD)), AuthError::AlgorithmNotAllowed),
        ("HMAC with the public key", idp.forge_hmac(&idp.claims("a", AUD)).unwrap(), AuthError::AlgorithmNotAllowed),
        ("tampered payload", idp.tamper(&good, &idp.claims("admin", AUD)), AuthError::BadSignature),
        (
            "no sub",
            idp.mint(&json!({"iss": idp.issuer(), "aud": AUD, "exp": t + 600})).unwrap(),
            AuthError::InvalidClaims("sub".into()),
        ),
        (
            "no exp",
            idp.mint(&json!({"iss": idp.issuer(), "sub": "a", "aud": AUD})).unwrap(),
            AuthError::InvalidClaims("exp".into()),
        ),
    ];
    for (what, token, want) in cases {
        assert_eq!(check(&a, &token).await, Err(want), "{what}");
    }
    assert_eq!(a.authenticate(None).await, Err(AuthError::Missing));
    assert!(matches!(a.authenticate(Some(b"Basic YTpi")).await, Err(AuthError::Malformed(_))));
    assert!(matches!(check(&a, "opaque-key").await, Err(AuthError::Malformed(_))));
}

#[tokio::test]
async fn keys_rotate_and_an_issuer_that_goes_down_keeps_its_last_good_keys() {
    let idp = TestIssuer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = auth(vec![config(&idp, ca_file(&dir, &idp))]);
    let old = idp.mint(&idp.claims("a", AUD)).unwrap();
    assert!(check(&a, &old).await.is_ok());
    let fetches = idp.key_fetches();
    assert!(check(&a, &old).await.is_ok());
    assert_eq!(idp.key_fetches(), fetches, "known keys are cached");

    // A new key: the first token under its kid makes the proxy fetch the key set again.
    idp.rotate("key-2", false).unwrap();
    let new = idp.mint(&idp.claims("b", AUD)).unwrap();
    // The refresh is at most once per 10 s; wait it out rather than race it.
    tokio::time::sleep(std::time::Duration::from_secs(11)).await;
    assert!(matches!(check(&a, &new).await, Ok(Some(Principal::Token { subject, .. })) if subject == "b"));
    assert!(check(&a, &old).await.is_ok(), "the old key is still published");

    // Unknown kids do not make the proxy hammer the issuer: one fetch per 10 s at most.
    let before = idp.key_fetches();
    for _ in 0..20 {
        assert_eq!(
            check(&a, &idp.mint_unpublished(&idp.claims("x", AUD)).unwrap()).await,
            Err(AuthError::UnknownKeyId)
        );
    }
    assert!(idp.key_fetches() <= before + 1, "{} fetches for 20 unknown kids", idp.key_fetches() - before);

    // Down: the last good keys still verify; a key it never published is still refused.
    idp.set_down(true);
    tokio::time::sleep(std::time::Duration::from_secs(11)).await;
    assert!(check(&a, &new).await.is_ok(), "last good keys verify while the issuer is down");
    assert_eq!(check(&a, &idp.mint_unpublished(&idp.claims("x", AUD)).unwrap()).await, Err(AuthError::UnknownKeyId));
    idp.set_down(false);

    // Retired keys stop verifying once the key set no longer has them.
    idp.rotate("key-3", true).unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(11)).await;
    let newest = idp.mint(&idp.claims("c", AUD)).unwrap();
    assert!(check(&a, &newest).await.is_ok());
    assert_eq!(check(&a, &old).await, Err(AuthError::UnknownKeyId), "a retired key no longer verifies");
}

#[tokio::test]
async fn an_issuer_never_reached_refuses_as_unavailable_and_http_is_loopback_only() {
    let idp = TestIssuer::start().await.unwrap();
    idp.set_down(true);
    let dir = tempfile::tempdir().unwrap();
    let a = auth(vec![config(&idp, ca_file(&dir, &idp))]);
    let token = idp.mint(&idp.claims("a", AUD)).unwrap();
    let err = check(&a, &token).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");

    // The wrong CA: the key fetch fails, nothing verifies.
    idp.set_down(false);
    let other = TestIssuer::start().await.unwrap();
    let wrong_ca = auth(vec![config(&idp, ca_file(&dir, &other))]);
    assert!(check(&wrong_ca, &token).await.unwrap_err().is_unavailable());

    let mut bad = config(&idp, dir.path().join("x"));
    bad.jwks_uri = Some("http://keys.example/jwks".into());
    assert!(Authenticator::new(AuthConfig { issuers: vec![bad], ..AuthConfig::default() }).is_err());
    let mut hmac = config(&idp, dir.path().join("x"));
    hmac.algorithms = vec![jsonwebtoken_alg_hs256()];
    assert!(Authenticator::new(AuthConfig { issuers: vec![hmac], ..AuthConfig::default() }).is_err());
    let mut no_aud = config(&idp, dir.path().join("x"));
    no_aud.audiences.clear();
    assert!(Authenticator::new(AuthConfig { issuers: vec![no_aud], ..AuthConfig::default() }).is_err());
}

fn jsonwebtoken_alg_hs256() -> toolgate_identity::Algorithm {
    toolgate_identity::Algorithm::HS256
}

/// A Kubernetes projected service-account token, minted by the real apiserver's
/// TokenRequest for the proxy's audience, verified against the cluster's published keys
/// (`/openid/v1/jwks`, fetched with the sidecar's own API token): the service account and
/// the pod it is bound to. A token for the API's audience, or another issuer's, is refused.
#[tokio::test]
async fn service_account_tokens_verify_against_the_clusters_keys() {
    use toolgate_tests::{SERVICE_ACCOUNT_ISSUER, TestCluster};
    let cluster = TestCluster::shared();
    let ns = cluster.create_namespace().await;
    cluster.ensure_service_account(&ns, "agent").await;
    cluster.ensure_service_account(&ns, "sidecar").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, cluster.ca_pem()).unwrap();
    // The sidecar's own API token reads the key set (system:service-account-issuer-discovery).
    let api_token = dir.path().join("token");
    std::fs::write(&api_token, cluster.mint_token(&ns, "sidecar", &[], None).await).unwrap();
    let issuer = IssuerConfig {
        issuer: SERVICE_ACCOUNT_ISSUER.into(),
        audiences: vec!["toolgate-mcp".into()],
        jwks_uri: Some(format!("{}/openid/v1/jwks", cluster.apiserver_url())),
        algorithms: DEFAULT_ALGORITHMS.to_vec(),
        kind: IssuerKind::Kubernetes,
        fetch: FetchOptions { ca_file: Some(ca), bearer_token_file: Some(api_token) },
    };
    let a = auth(vec![issuer]);

    let token = cluster.mint_token(&ns, "agent", &["toolgate-mcp"], None).await;
    match check(&a, &token).await.unwrap() {
        Some(Principal::ServiceAccount { namespace, name, pod, claims }) => {
            assert_eq!((namespace.as_str(), name.as_str(), pod), (ns.as_str(), "agent", None));
            assert_eq!(claims["sub"], format!("system:serviceaccount:{ns}:agent"));
        }
        other => panic!("expected a service account, got {other:?}"),
    }
    let api_audience = cluster.mint_token(&ns, "agent", &[], None).await;
    assert_eq!(
        check(&a, &api_audience).await,
        Err(AuthError::WrongAudience),
        "a token for the API is not for the proxy"
    );
    let idp = TestIssuer::start().await.unwrap();
    let foreign = idp.mint(&idp.claims(&format!("system:serviceaccount:{ns}:agent"), "toolgate-mcp")).unwrap();
    assert_eq!(check(&a, &foreign).await, Err(AuthError::UnknownIssuer));
    cluster.delete_namespace(&ns).await;
}
