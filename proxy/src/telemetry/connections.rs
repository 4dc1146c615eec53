//! The listeners' metrics: open connections, refusals, time bounds, accept errors
//! (the serving loop in `crate::transport` records them).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TimeoutLabels {
    listener: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Listener names, the `listener` label values.
pub const LISTENERS: [&str; 2] = ["mcp", "admin"];
/// The `kind` label values of `toolgate_connection_timeouts_total`.
pub const TIMEOUT_KINDS: [&str; 3] = ["header", "body", "idle"];
/// The `reason` label values of `toolgate_requests_refused_total`.
pub const REFUSAL_REASONS: [&str; 3] = ["host", "origin", "admin_policy"];

/// The listeners' metrics (registered into the proxy's registry by `Metrics::new`).
#[derive(Debug, Clone, Default)]
pub struct ConnMetrics {
    open: Family<ListenerLabels, Gauge>,
    refused: Family<ListenerLabels, Counter>,
    timeouts: Family<TimeoutLabels, Counter>,
    accept_errors: Family<ListenerLabels, Counter>,
    requests_refused: Family<ReasonLabels, Counter>,
}

impl ConnMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "toolgate_connections_open",
            "Open client connections, by listener (mcp, admin)",
            m.open.clone(),
        );
        registry.register(
            "toolgate_connections_refused",
            "Connections refused because the listener had --max-connections open (503, then closed)",
            m.refused.clone(),
        );
        registry.register(
            "toolgate_connection_timeouts",
            "Connections closed by a time bound, by listener and kind (header: request head too slow, body: request body too slow, idle: no request for --idle-connection-timeout-seconds)",
            m.timeouts.clone(),
        );
        registry.register(
            "toolgate_accept_errors",
            "Failed accepts (e.g. out of file descriptors), by listener; each is followed by a back-off",
            m.accept_errors.clone(),
        );
        registry.register(
            "toolgate_requests_refused",
            "Requests refused before anything else, by reason (host: Host not allowed, origin: Origin not allowed, admin_policy: /policy asked from a non-loopback peer)",
            m.requests_refused.clone(),
        );
        for listener in LISTENERS {
            let _ = m.open.get_or_create(&ListenerLabels { listener });
            let _ = m.refused.get_or_create(&ListenerLabels { listener });
            let _ = m.accept_errors.get_or_create(&ListenerLabels { listener });
            for kind in TIMEOUT_KINDS {
                let _ = m.timeouts.get_or_create(&TimeoutLabels { listener, kind });
            }
        }
        for reason in REFUSAL_REASONS {
            let _ = m.requests_refused.get_or_create(&ReasonLabels { reason });
        }
        m
    }

    pub fn opened(&self, listener: &'static str, delta: i64) {
        self.open.get_or_create(&ListenerLabels { listener }).inc_by(delta);
    }

    pub fn refused(&self, listener: &'static str) {
        self.refused.get_or_create(&ListenerLabels { listener }).inc();
    }

    pub fn timeout(&self, listener: &'static str, kind: &'static str) {
        self.timeouts.get_or_create(&TimeoutLabels { listener, kind }).inc();
    }

    pub fn accept_error(&self, listener: &'static str) {
        self.accept_errors.get_or_create(&ListenerLabels { listener }).inc();
    }

    pub fn request_refused(&self, reason: &'static str) {
        self.requests_refused.get_or_create(&ReasonLabels { reason }).inc();
    }
}
