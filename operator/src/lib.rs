//! toolgate-operator: the `McpPolicy` controller, the sidecar-injecting admission webhook
//! and the policy push to sidecars.
//!
//! The CRD types themselves live in `toolgate_policy::crd` (feature `crd`) so that the
//! CLI can use them without depending on this crate.
#![forbid(unsafe_code)]

pub mod acks;
pub mod approvals;
pub mod auth;
pub mod controller;
pub mod crdgen;
pub mod hub;
pub mod inject;
pub mod leader;
pub mod metrics;
pub mod server;
pub mod tls;
pub mod webhook;

pub use toolgate_policy::crd::{McpPolicy, McpPolicySpec, McpPolicyStatus, Mode};
