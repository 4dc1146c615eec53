//! A throwaway certificate authority for the test cluster and for test servers (admission
//! webhooks, metrics endpoints) that the apiserver must trust.

use std::fmt;
use std::sync::Arc;

use anyhow::{Context, Result};
use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertPair {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// The private key (PKCS#8 PEM, ECDSA P-256).
    pub key_pem: String,
}

impl fmt::Debug for CertPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertPair").field("cert_pem", &self.cert_pem).field("key_pem", &"<redacted>").finish()
    }
}

impl CertPair {
    /// A rustls server configuration that presents this certificate (HTTP/1.1 and h2 via
    /// ALPN, like the apiserver's webhook client expects).
    pub fn rustls_server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        crate::install_crypto_provider();
        let certs = pem_blocks(&self.cert_pem, "CERTIFICATE")?
            .into_iter()
            .map(rustls::pki_types::CertificateDer::from)
            .collect();
        let key_der = pem_blocks(&self.key_pem, "PRIVATE KEY")?
            .into_iter()
            .next()
            .context("no PRIVATE KEY block in the key PEM")?;
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key_der.into());
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("building the rustls server config")?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// A certificate authority that issues serving and client certificates.
pub struct TestCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for TestCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCa").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

impl TestCa {
    /// A new self-signed CA with the given common name.
    pub fn new(common_name: &str) -> Result<Self> {
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name, &[]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        Ok(Self { cert_pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    /// The CA certificate (PEM): what a client, or the apiserver (`caBundle`), must trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate base64-encoded PEM, the form of a webhook's `caBundle` or a
    /// kubeconfig's `certificate-authority-data`.
    pub fn ca_bundle(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.cert_pem)
    }

    /// A serving certificate for the given DNS names and IP addresses
    /// (e.g. `["127.0.0.1", "localhost"]`).
    pub fn server_cert(&self, subject_alt_names: &[&str]) -> Result<CertPair> {
        let cn = subject_alt_names.first().copied().unwrap_or("server");
        self.issue(cn, &[], subject_alt_names, &[ExtendedKeyUsagePurpose::ServerAuth])
    }

    /// A client certificate; Kubernetes reads the user name from the common name and the
    /// groups from the organizations.
    pub fn client_cert(&self, user: &str, groups: &[&str]) -> Result<CertPair> {
        self.issue(user, groups, &[], &[ExtendedKeyUsagePurpose::ClientAuth])
    }

    fn issue(
        &self,
        common_name: &str,
        organizations: &[&str],
        subject_alt_names: &[&str],
        usages: &[ExtendedKeyUsagePurpose],
    ) -> Result<CertPair> {
        let key = KeyPair::generate().context("generating a key")?;
        let sans: Vec<String> = subject_alt_names.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(sans).context("subject alternative names")?;
        params.distinguished_name = dn(common_name, organizations);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = usages.to_vec();
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("signing the certificate for {common_name}"))?;
        Ok(CertPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

fn dn(common_name: &str, organizations: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for o in organizations {
        dn.push(DnType::OrganizationName, *o);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

/// The DER contents of every `-----BEGIN <label>-----` block in `pem`.
pub fn pem_blocks(pem: &str, label: &str) -> Result<Vec<Vec<u8>>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(&begin) {
        let body_start = start + begin.len();
        let stop = rest[body_start..].find(&end).with_context(|| format!("unterminated {label} block"))?;
        let body: String = rest[body_start..body_start + stop].chars().filter(|c| !c.is_whitespace()).collect();
        out.push(
            base64::engine::general_purpose::STANDARD
                .decode(body)
                .with_context(|| format!("bad base64 in a {label} block"))?,
        );
        rest = &rest[body_start + stop + end.len()..];
    }
    Ok(out)
}

/// PEM-encodes DER data under `label`.
pub fn to_pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_round_trip_through_pem() {
        let ca = TestCa::new("test-ca").expect("CA");
        let server = ca.server_cert(&["127.0.0.1", "localhost"]).expect("cert");
        let der = pem_blocks(&server.cert_pem, "CERTIFICATE").expect("parse");
        assert_eq!(der.len(), 1);
        assert_eq!(to_pem("CERTIFICATE", &der[0]), server.cert_pem);
        assert!(server.key_pem.contains("BEGIN PRIVATE KEY"));
        server.rustls_server_config().expect("rustls accepts the pair");
        assert_ne!(ca.cert_pem(), server.cert_pem);
    }
}
