//! One bounded GET of an issuer's discovery document or key set.
//!
//! HTTPS with the platform's roots or a given CA bundle; plain HTTP only to a loopback
//! address (a local test issuer), never across a network, since whoever answers the key
//! fetch decides which tokens are valid.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// Largest discovery document or key set read.
pub const MAX_BODY: usize = 256 * 1024;
/// Whole fetch: connect, TLS, request, body.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how to fetch.
#[derive(Clone, Debug, Default)]
pub struct FetchOptions {
    /// PEM bundle of the CAs to trust for HTTPS (default: the platform's roots).
    pub ca_file: Option<std::path::PathBuf>,
    /// A file holding a bearer token sent with the fetch (the cluster's key set needs one).
    pub bearer_token_file: Option<std::path::PathBuf>,
}

/// Whether `uri` may be fetched: `https://`, or `http://` to a loopback host.
pub fn check_url(uri: &str) -> Result<Uri, String> {
    let parsed: Uri = uri.parse().map_err(|e| format!("{uri:?} is not a URL: {e}"))?;
    let host = parsed.host().ok_or_else(|| format!("{uri:?} has no host"))?;
    match parsed.scheme_str() {
        Some("https") => Ok(parsed),
        Some("http") if is_loopback(host) => Ok(parsed),
        Some("http") => Err(format!("{uri:?}: keys are fetched over https (plain http only to a loopback address)")),
        _ => Err(format!("{uri:?} is not an https URL")),
    }
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare == "localhost" || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// GET `uri`, at most [`MAX_BODY`] bytes, within [`FETCH_TIMEOUT`]; any status but 200 is
/// an error.
pub async fn get(uri: &str, opts: &FetchOptions) -> Result<Bytes, String> {
    match tokio::time::timeout(FETCH_TIMEOUT, get_unbounded_in_time(uri, opts)).await {
        Ok(r) => r,
        Err(_) => Err(format!("GET {uri}: no answer within {FETCH_TIMEOUT:?}")),
    }
}

async fn get_unbounded_in_time(uri: &str, opts: &FetchOptions) -> Result<Bytes, String> {
    let parsed = check_url(uri)?;
    let host = parsed.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
    let https = parsed.scheme_str() == Some("https");
    let port = parsed.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("GET {uri}: cannot connect: {e}"))?;
    let bearer = match &opts.bearer_token_file {
        Some(p) => Some(read_token(p)?),
        None => None,
    };
    let authority = parsed.authority().map(|a| a.as_str().to_owned()).unwrap_or_default();
    let path = parsed.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let mut req = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .header("accept", "application/json, application/jwk-set+json");
    if let Some(token) = bearer {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| format!("GET {uri}: {e}"))?;
    let resp = if https {
        let tls = tls_config(opts.ca_file.as_deref())?;
        let name = ServerName::try_from(host.clone()).map_err(|e| format!("GET {uri}: host {host:?}: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("GET {uri}: TLS: {e}"))?;
        send(uri, TokioIo::new(stream), req).await?
    } else {
        send(uri, TokioIo::new(tcp), req).await?
    };
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("GET {uri}: body: {e} (at most {MAX_BODY} bytes are read)"))?
        .to_bytes();
    if status != hyper::StatusCode::OK {
        return Err(format!("GET {uri}: HTTP {status}"));
    }
    Ok(body)
}

async fn send<T>(
    uri: &str,
    io: TokioIo<T>,
    req: hyper::Request<Empty<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("GET {uri}: HTTP: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await.map_err(|e| format!("GET {uri}: {e}"))
}

fn read_token(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("token file {}: not a token", path.display()));
    }
    Ok(token.to_owned())
}

fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    client_tls(ca_file, "give a CA file").map(Arc::new)
}

/// A TLS client configuration (ring, safe default versions, no client certificate) that
/// trusts the certificates of `ca_file` (PEM; at least one) or, without one, the
/// platform's roots. `hint` ends the error when the platform has no roots ("give --ca-file").
/// The proxy's operator link uses it too.
pub fn client_tls(ca_file: Option<&Path>, hint: &str) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("CA file {}: {e}", path.display()))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("CA file {}: {e}", path.display()))?;
                roots.add(cert).map_err(|e| format!("CA file {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("CA file {}: no CERTIFICATE in it", path.display()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::debug!(error = %e, "a platform root certificate could not be loaded");
            }
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(format!("no platform root certificates found: {hint}"));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http() {
        assert!(check_url("https://idp.example/jwks").is_ok());
        assert!(check_url("http://127.0.0.1:8080/jwks").is_ok());
        assert!(check_url("http://[::1]:8080/jwks").is_ok());
        assert!(check_url("http://localhost/jwks").is_ok());
        assert!(check_url("http://idp.example/jwks").is_err());
        assert!(check_url("http://127.0.0.1.evil.example/jwks").is_err());
        assert!(check_url("ftp://idp.example/jwks").is_err());
        assert!(check_url("not a url").is_err());
    }
}
