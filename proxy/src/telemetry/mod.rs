//! What the proxy reports: Prometheus metrics and audit lines.

pub mod audit;
pub mod metrics;
