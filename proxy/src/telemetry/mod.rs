//! What the proxy reports: Prometheus metrics and audit lines.

pub mod audit;
pub mod connections;
pub mod decision;
pub mod metrics;

pub use decision::{DecisionEvent, Telemetry};
