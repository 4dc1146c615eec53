//! What the proxy reports: Prometheus metrics and audit lines.

pub mod audit;
pub mod connections;
pub mod decision;
pub mod metrics;
pub mod store;

pub use decision::{DecisionEvent, Telemetry};
