//! toolgate-operator: the `McpPolicy` controller, the sidecar-injecting admission webhook
//! and the policy push to sidecars.
//!
//! The CRD types themselves live in `toolgate_policy::crd` (feature `crd`) so that the
//! CLI can use them without depending on this crate. The modules are layers, each
//! importing only those below it (`operator/tests/layering.rs`; docs/operator.md, "Code
//! layout").
#![forbid(unsafe_code)]

pub mod admission;
pub mod approvals;
pub mod auth;
pub mod cli;
pub mod crdgen;
pub mod http;
pub mod inject;
pub mod leader;
pub mod metrics;
pub mod push;
pub mod router;
pub mod run;
pub mod status;
pub mod tls;

pub use run::run;
pub use toolgate_policy::crd::{McpPolicy, McpPolicySpec, McpPolicyStatus, Mode};
