//! Test support for toolgate's end-to-end tests: a real Kubernetes API (etcd and
//! kube-apiserver as local processes, like controller-runtime's envtest), kubectl, helm and
//! Prometheus, plus small loopback servers for webhooks and metrics targets.
//!
//! The binaries come from `make testbin` (tests/cluster/testbin.sh), which writes
//! `$TESTBIN_CACHE/env.sh`; see docs/testing.md. Typical use in an integration test:
//!
//! ```no_run
//! use toolgate_tests::TestCluster;
//!
//! #[tokio::test]
//! async fn something_in_a_cluster() {
//!     let cluster = TestCluster::shared();
//!     cluster
//!         .with_temp_namespace(|ns| async move {
//!             let client = cluster.client();
//!             // ... create objects in `ns`, assert ...
//!             let _ = (client, ns);
//!         })
//!         .await;
//! }
//! ```
#![forbid(unsafe_code)]

mod certs;
mod cluster;
pub mod images;
pub mod layering;
pub mod mcp;
pub mod node;
pub mod oci;
pub mod oidc;
mod process;
mod prometheus;
pub mod redis;
mod serve;
pub mod sidecar;
mod tools;

pub use certs::{CertPair, TestCa, pem_blocks, to_pem};
pub use cluster::{SERVICE_ACCOUNT_ISSUER, TEST_NAMESPACE_LABEL, TOOLGATE_AUDIENCE, TestCluster};
pub use node::TestNode;
pub use process::{PROXY_ENV, Supervised, free_port, log_tail};
pub use prometheus::Prometheus;
pub use serve::{TestServer, http_get, response, serve_http, serve_https, url_encode};
pub use tools::{Tool, command, run_ok, run_output, testbin_cache, tool_path};

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Installs rustls' ring crypto provider as the process default (kube's rustls client and
/// the test servers need one); harmless when one is installed already.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Polls `check` until it returns `Some`, at most `timeout` (then panics with `what`).
/// Use this instead of sleeps: the apiserver's caches (RBAC, webhook configurations, bound
/// token checks) take a moment to see new objects, longer on a loaded machine.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(50);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// The repository's root (the test crate sits in `tests/`).
pub fn repo_root() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("repository root")
}

/// Every document of a multi-document YAML text (empty documents left out).
pub fn yaml_docs(text: &str) -> Vec<serde_json::Value> {
    use serde::Deserialize as _;
    serde_norway::Deserializer::from_str(text)
        .map(|doc| serde_json::Value::deserialize(doc).unwrap_or_else(|e| panic!("invalid YAML: {e}\n{text}")))
        .filter(|doc| !doc.is_null())
        .collect()
}
