//! toolgate-operator: the `McpPolicy` CRD generation, and (in progress) the controller,
//! the sidecar-injecting admission webhook and the policy push to sidecars.
//!
//! The CRD types themselves live in `toolgate_policy::crd` (feature `crd`) so that the
//! CLI can use them without depending on this crate.
#![forbid(unsafe_code)]

pub mod crdgen;
pub mod inject;

pub use toolgate_policy::crd::{McpPolicy, McpPolicySpec, McpPolicyStatus, Mode};
