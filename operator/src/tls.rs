//! Serving certificates for the webhook and the policy stream.
//!
//! `operator` mode: the operator keeps a CA and a serving certificate in a Secret of its
//! namespace (`ca.crt` = trust bundle, current CA first; `ca.key`; `tls.crt`; `tls.key`).
//! Any replica creates it when absent (creation is atomic); the leader renews the serving
//! certificate when a third of its lifetime is left and the CA when a quarter is left
//! (the old CA stays in the trust bundle until it expires, so nothing in flight breaks),
//! patches the webhook's `caBundle` and publishes the bundle to namespaces with injected
//! pods as the `toolgate-ca` ConfigMap. Every replica reloads the Secret and swaps its
//! certificate without restarting.
//!
//! `files` mode: cert-manager (or anything else) writes the files; they are re-read.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

/// Lifetimes of what the operator issues.
#[derive(Clone, Debug)]
pub struct Lifetimes {
    pub ca: Duration,
    pub serving: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self { ca: Duration::from_secs(5 * 365 * 86_400), serving: Duration::from_secs(90 * 86_400) }
    }
}

/// The contents of the TLS Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    /// Trust bundle: the current CA first, then a previous one still valid.
    pub ca_bundle: String,
    pub ca_key: String,
    pub cert: String,
    pub key: String,
}

impl Bundle {
    fn from_secret(secret: &Secret) -> Option<Self> {
        let data = secret.data.as_ref()?;
        let get = |k: &str| data.get(k).and_then(|b| String::from_utf8(b.0.clone()).ok());
        Some(Self { ca_bundle: get("ca.crt")?, ca_key: get("ca.key")?, cert: get("tls.crt")?, key: get("tls.key")? })
    }

    fn to_data(&self) -> BTreeMap<String, ByteString> {
        [("ca.crt", &self.ca_bundle), ("ca.key", &self.ca_key), ("tls.crt", &self.cert), ("tls.key", &self.key)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), ByteString(v.clone().into_bytes())))
            .collect()
    }

    /// The current CA certificate (first of the bundle).
    fn current_ca(&self) -> Option<String> {
        pem_certs(&self.ca_bundle).into_iter().next()
    }
}

/// The PEM certificates of a bundle, each as its own PEM text.
pub fn pem_certs(bundle: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    bundle
        .split_inclusive(END)
        .filter_map(|chunk| chunk.find("-----BEGIN CERTIFICATE-----").map(|i| format!("{}\n", chunk[i..].trim())))
        .collect()
}

/// `notAfter` of a PEM certificate.
pub fn not_after(pem: &str) -> Option<OffsetDateTime> {
    let der = pem::parse(pem).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.contents()).ok()?;
    OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp()).ok()
}

fn not_before(pem: &str) -> Option<OffsetDateTime> {
    let der = pem::parse(pem).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.contents()).ok()?;
    OffsetDateTime::from_unix_timestamp(cert.validity().not_before.timestamp()).ok()
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "toolgate");
    dn.push(DnType::CommonName, cn);
    dn
}

fn issue_ca(now: OffsetDateTime, lifetime: Duration) -> Result<(String, String)> {
    let key = KeyPair::generate().context("generating the CA key")?;
    let mut params = CertificateParams::default();
    // A unique name per CA, so that an old and a new CA in one bundle are told apart.
    params.distinguished_name = dn(&format!("toolgate CA {}", now.unix_timestamp()));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + lifetime;
    let cert = params.self_signed(&key).context("self-signing the CA")?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn issue_serving(
    ca_pem: &str,
    ca_key_pem: &str,
    names: &[String],
    now: OffsetDateTime,
    lifetime: Duration,
) -> Result<(String, String)> {
    let ca_key = KeyPair::from_pem(ca_key_pem).context("parsing the CA key")?;
    let issuer = Issuer::from_ca_cert_pem(ca_pem, ca_key).context("parsing the CA certificate")?;
    let key = KeyPair::generate().context("generating the serving key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(names.first().map_or("toolgate-operator", String::as_str));
    params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n.clone().try_into().map(SanType::DnsName).map_err(|e| anyhow!("bad DNS name {n:?}: {e}")),
        })
        .collect::<Result<_>>()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + lifetime;
    let cert = params.signed_by(&key, &issuer).context("signing the serving certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Whether less than `1/divisor` of a certificate's lifetime is left at `now`.
fn due(pem: &str, now: OffsetDateTime, divisor: i32) -> bool {
    match (not_before(pem), not_after(pem)) {
        (Some(from), Some(until)) => until - now < (until - from) / divisor,
        _ => true,
    }
}

/// What the Secret should hold at `now`: `None` when `current` is fine as it is.
///
/// Pure, for tests: a missing or unreadable bundle gets a new CA and certificate; a CA
/// with less than a quarter of its life left is replaced (the old one stays trusted until
/// it expires); a serving certificate with less than a third left, or for other names, is
/// reissued.
pub fn plan(
    current: Option<&Bundle>,
    names: &[String],
    now: OffsetDateTime,
    life: &Lifetimes,
) -> Result<Option<Bundle>> {
    let Some(current) = current.filter(|b| b.current_ca().is_some() && KeyPair::from_pem(&b.ca_key).is_ok()) else {
        let (ca, ca_key) = issue_ca(now, life.ca)?;
        let (cert, key) = issue_serving(&ca, &ca_key, names, now, life.serving)?;
        return Ok(Some(Bundle { ca_bundle: ca, ca_key, cert, key }));
    };
    let mut next = current.clone();
    let ca = current.current_ca().unwrap_or_default();
    let mut new_ca = false;
    if due(&ca, now, 4) {
        let (fresh, fresh_key) = issue_ca(now, life.ca)?;
        next.ca_bundle = fresh;
        next.ca_key = fresh_key;
        new_ca = true;
    }
    // Keep every CA of the bundle that is still valid (the one in use by clients that
    // have not picked up the new bundle yet).
    let still_valid: Vec<String> =
        pem_certs(&current.ca_bundle).into_iter().filter(|c| not_after(c).is_some_and(|t| t > now)).collect();
    let mut bundle = pem_certs(&next.ca_bundle).into_iter().take(1).collect::<Vec<_>>();
    for c in still_valid {
        if !bundle.contains(&c) {
            bundle.push(c);
        }
    }
    next.ca_bundle = bundle.concat();
    let wrong_names = !serving_names_match(&current.cert, names);
    if new_ca || wrong_names || due(&current.cert, now, 3) || !signed_by(&current.cert, &ca) {
        let current_ca = next.current_ca().unwrap_or_default();
        let (cert, key) = issue_serving(&current_ca, &next.ca_key, names, now, life.serving)?;
        next.cert = cert;
        next.key = key;
    }
    Ok((next != *current).then_some(next))
}

fn serving_names_match(cert: &str, names: &[String]) -> bool {
    let Ok(der) = pem::parse(cert) else { return false };
    let Ok((_, x509)) = x509_parser::parse_x509_certificate(der.contents()) else { return false };
    let Ok(Some(san)) = x509.subject_alternative_name() else { return false };
    let mut have: Vec<String> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
            x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b).ok().map(|a| std::net::IpAddr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*b).ok().map(|a| std::net::IpAddr::from(a).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    let mut want = names.to_vec();
    have.sort();
    want.sort();
    have == want
}

fn signed_by(cert: &str, ca: &str) -> bool {
    let parse = |p: &str| pem::parse(p).ok();
    let (Some(cert), Some(ca)) = (parse(cert), parse(ca)) else { return false };
    let (Ok((_, cert)), Ok((_, ca))) =
        (x509_parser::parse_x509_certificate(cert.contents()), x509_parser::parse_x509_certificate(ca.contents()))
    else {
        return false;
    };
    cert.issuer() == ca.subject() && cert.verify_signature(Some(ca.public_key())).is_ok()
}

/// Reads the Secret and, when `may_write` (the leader, or anyone when it is absent),
/// creates or renews it. Returns what it holds afterwards.
pub async fn reconcile_secret(
    api: &Api<Secret>,
    name: &str,
    names: &[String],
    life: &Lifetimes,
    may_write: bool,
) -> Result<(Bundle, bool)> {
    let existing = api.get_opt(name).await.with_context(|| format!("reading Secret {name}"))?;
    let current = existing.as_ref().and_then(Bundle::from_secret);
    if existing.is_some() && !may_write {
        return current.map(|b| (b, false)).ok_or_else(|| anyhow!("Secret {name} lacks ca.crt/ca.key/tls.crt/tls.key"));
    }
    let Some(next) = plan(current.as_ref(), names, OffsetDateTime::now_utc(), life)? else {
        return current.map(|b| (b, false)).ok_or_else(|| anyhow!("Secret {name} unreadable"));
    };
    let mut secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([("app.kubernetes.io/managed-by".into(), "toolgate-operator".into())])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(next.to_data()),
        ..Secret::default()
    };
    let written = match existing {
        None => api.create(&PostParams::default(), &secret).await,
        Some(old) => {
            // Optimistic concurrency: a concurrent writer makes this fail, and we re-read.
            secret.metadata.resource_version = old.metadata.resource_version;
            secret.metadata.labels = old.metadata.labels.or(secret.metadata.labels);
            api.replace(name, &PostParams::default(), &secret).await
        }
    };
    match written {
        Ok(_) => Ok((next, true)),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let s = api.get(name).await.with_context(|| format!("re-reading Secret {name}"))?;
            Bundle::from_secret(&s).map(|b| (b, false)).ok_or_else(|| anyhow!("Secret {name} unreadable"))
        }
        Err(e) => Err(e).with_context(|| format!("writing Secret {name}")),
    }
}

/// The certificate the HTTPS listener presents; swapped in place on rotation.
#[derive(Debug)]
pub struct CertStore {
    current: RwLock<Option<Arc<CertifiedKey>>>,
    /// The trust bundle (PEM) sidecars and the apiserver need.
    ca_bundle: RwLock<String>,
    served: RwLock<String>,
}

impl Default for CertStore {
    fn default() -> Self {
        Self { current: RwLock::new(None), ca_bundle: RwLock::new(String::new()), served: RwLock::new(String::new()) }
    }
}

impl CertStore {
    /// Installs a certificate (PEM chain + PKCS#8 key); `false` when unchanged.
    pub fn install(&self, cert_pem: &str, key_pem: &str, ca_bundle: &str) -> Result<bool> {
        if *self.served.read().expect("cert lock") == cert_pem
            && *self.ca_bundle.read().expect("cert lock") == ca_bundle
        {
            return Ok(false);
        }
        let certs = pem_certs(cert_pem)
            .iter()
            .map(|p| pem::parse(p).map(|d| rustls::pki_types::CertificateDer::from(d.into_contents())))
            .collect::<Result<Vec<_>, _>>()
            .context("parsing the serving certificate")?;
        if certs.is_empty() {
            return Err(anyhow!("no certificate in the serving certificate PEM"));
        }
        let key = rustls::pki_types::PrivateKeyDer::try_from(
            pem::parse(key_pem).context("parsing the serving key")?.into_contents(),
        )
        .map_err(|e| anyhow!("serving key: {e}"))?;
        let provider = rustls::crypto::ring::default_provider();
        let certified = CertifiedKey::from_der(certs, key, &provider).context("serving key and certificate")?;
        *self.current.write().expect("cert lock") = Some(Arc::new(certified));
        *self.served.write().expect("cert lock") = cert_pem.to_owned();
        *self.ca_bundle.write().expect("cert lock") = ca_bundle.to_owned();
        Ok(true)
    }

    pub fn loaded(&self) -> bool {
        self.current.read().expect("cert lock").is_some()
    }

    pub fn ca_bundle(&self) -> String {
        self.ca_bundle.read().expect("cert lock").clone()
    }

    /// A rustls server configuration that always presents the current certificate.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default TLS versions")
                .with_no_client_auth()
                .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok()?.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["toolgate-operator.toolgate-system.svc".into(), "127.0.0.1".into()]
    }

    #[test]
    fn a_missing_bundle_gets_a_ca_and_a_serving_certificate_for_every_name() {
        let now = OffsetDateTime::now_utc();
        let b = plan(None, &names(), now, &Lifetimes::default()).expect("plan").expect("new bundle");
        assert_eq!(pem_certs(&b.ca_bundle).len(), 1);
        assert!(signed_by(&b.cert, &b.ca_bundle));
        assert!(serving_names_match(&b.cert, &names()));
        let store = CertStore::default();
        assert!(store.install(&b.cert, &b.key, &b.ca_bundle).expect("installs"));
        assert!(!store.install(&b.cert, &b.key, &b.ca_bundle).expect("installs"), "unchanged is a no-op");
        assert!(store.loaded());
        // Nothing to do right after.
        assert_eq!(plan(Some(&b), &names(), now, &Lifetimes::default()).expect("plan"), None);
    }

    #[test]
    fn serving_certificates_renew_at_two_thirds_and_cas_at_three_quarters_keeping_the_old_ca_trusted() {
        let life = Lifetimes { ca: Duration::from_secs(4000), serving: Duration::from_secs(900) };
        let t0 = OffsetDateTime::now_utc();
        let b0 = plan(None, &names(), t0, &life).expect("plan").expect("bundle");
        // 400 s later: 500 of 1200 s (900 + 5 min back-dating) left, more than a third: keep.
        assert_eq!(plan(Some(&b0), &names(), t0 + time::Duration::seconds(400), &life).expect("plan"), None);
        // 750 s later: less than a third left: new serving certificate, same CA.
        let b1 = plan(Some(&b0), &names(), t0 + time::Duration::seconds(750), &life).expect("plan").expect("renewed");
        assert_eq!(b1.ca_bundle, b0.ca_bundle);
        assert_ne!(b1.cert, b0.cert);
        assert!(signed_by(&b1.cert, &b1.ca_bundle));
        // 3200 s later: the CA has less than a quarter left: new CA first, old one kept.
        let b2 = plan(Some(&b1), &names(), t0 + time::Duration::seconds(3200), &life).expect("plan").expect("new CA");
        let cas = pem_certs(&b2.ca_bundle);
        assert_eq!(cas.len(), 2);
        assert_eq!(cas[1], b0.ca_bundle);
        assert!(signed_by(&b2.cert, &cas[0]), "the serving certificate comes from the new CA");
        // Once the old CA expired it leaves the bundle.
        let b3 = plan(Some(&b2), &names(), t0 + time::Duration::seconds(4400), &life).expect("plan").expect("pruned");
        assert_eq!(pem_certs(&b3.ca_bundle), cas[..1]);
    }

    #[test]
    fn other_names_or_a_foreign_certificate_are_reissued_and_garbage_is_replaced() {
        let now = OffsetDateTime::now_utc();
        let life = Lifetimes::default();
        let b = plan(None, &names(), now, &life).expect("plan").expect("bundle");
        let more = [names(), vec!["extra.example".into()]].concat();
        let renamed = plan(Some(&b), &more, now, &life).expect("plan").expect("reissued");
        assert!(serving_names_match(&renamed.cert, &more));
        let other = plan(None, &names(), now, &life).expect("plan").expect("bundle");
        let mixed = Bundle { cert: other.cert.clone(), key: other.key.clone(), ..b.clone() };
        let fixed = plan(Some(&mixed), &names(), now, &life).expect("plan").expect("reissued");
        assert!(signed_by(&fixed.cert, &b.ca_bundle));
        let garbage = Bundle { ca_bundle: "x".into(), ca_key: "y".into(), cert: "z".into(), key: "w".into() };
        let fresh = plan(Some(&garbage), &names(), now, &life).expect("plan").expect("replaced");
        assert!(signed_by(&fresh.cert, &fresh.ca_bundle));
    }
}
