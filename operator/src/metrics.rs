//! Prometheus metrics of the operator (`/metrics` on the admin listener). Label values
//! come from fixed sets, except `namespace`/`policy` on the per-policy gauges, which are
//! bounded by the McpPolicy objects that exist.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    namespace: String,
    policy: String,
}

/// All operator metrics, registered once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ResultLabels, Counter>,
    reconcile_errors: Family<ReasonLabels, Counter>,
    reconcile_duration: Histogram,
    approvals: Family<ResultLabels, Counter>,
    connected: Gauge,
    push_latency: Histogram,
    streams: Family<ResultLabels, Counter>,
    webhook: Family<ResultLabels, Counter>,
    webhook_latency: Histogram,
    leader: Gauge,
    targets: Family<PolicyLabels, Gauge>,
    enforcing: Family<PolicyLabels, Gauge>,
    unprotected: Family<PolicyLabels, Gauge>,
    left_selection: Family<PolicyLabels, Counter>,
    cert_rotations: Counter,
    reported: Mutex<HashSet<(String, String)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let reconciles = Family::<ResultLabels, Counter>::default();
        registry.register(
            "toolgate_operator_reconciles",
            "McpPolicy reconciles by result (ok, invalid, error)",
            reconciles.clone(),
        );
        let reconcile_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "toolgate_operator_reconcile_errors",
            "Failed McpPolicy reconciles by reason (status_patch, event, ...)",
            reconcile_errors.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.000_5, 2.0, 14));
        registry.register(
            "toolgate_operator_reconcile_duration_seconds",
            "Time to reconcile one McpPolicy (status computed and, when it changed, written)",
            reconcile_duration.clone(),
        );
        let approvals = Family::<ResultLabels, Counter>::default();
        registry.register(
            "toolgate_operator_approval_requests",
            "Sidecar approval requests and closes by result (created, closed, bad_request, not_found, forbidden, \
             unavailable)",
            approvals.clone(),
        );
        let connected = Gauge::default();
        registry.register(
            "toolgate_operator_sidecars_connected",
            "Sidecars holding a policy stream to this replica",
            connected.clone(),
        );
        let push_latency = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "toolgate_operator_push_latency_seconds",
            "Time from sending a policy set to a sidecar to its acknowledgement",
            push_latency.clone(),
        );
        let streams = Family::<ResultLabels, Counter>::default();
        registry.register(
            "toolgate_operator_stream_requests",
            "Policy stream and ack requests by result (ok, unauthenticated, forbidden, unknown_pod, ...)",
            streams.clone(),
        );
        let webhook = Family::<ResultLabels, Counter>::default();
        registry.register(
            "toolgate_operator_webhook_requests",
            "Admission requests by result (injected, skip reasons, error)",
            webhook.clone(),
        );
        let webhook_latency = Histogram::new(exponential_buckets(0.000_1, 2.0, 14));
        registry.register(
            "toolgate_operator_webhook_duration_seconds",
            "Time to answer an admission request",
            webhook_latency.clone(),
        );
        let leader = Gauge::default();
        registry.register("toolgate_operator_leader", "1 when this replica holds the leader lease", leader.clone());
        let targets = Family::<PolicyLabels, Gauge>::default();
        registry.register("toolgate_operator_policy_targets", "Pods an McpPolicy selects", targets.clone());
        let enforcing = Family::<PolicyLabels, Gauge>::default();
        registry.register(
            "toolgate_operator_policy_enforcing",
            "Selected sidecars that acknowledged the current generation of an McpPolicy",
            enforcing.clone(),
        );
        let unprotected = Family::<PolicyLabels, Gauge>::default();
        registry.register(
            "toolgate_operator_policy_unprotected",
            "Pods an McpPolicy selects that run without the injected toolgate sidecar",
            unprotected.clone(),
        );
        let left_selection = Family::<PolicyLabels, Counter>::default();
        registry.register(
            "toolgate_operator_policy_pods_left",
            "Running pods that left an McpPolicy's selection (relabelled, or the selector changed)",
            left_selection.clone(),
        );
        let cert_rotations = Counter::default();
        registry.register(
            "toolgate_operator_certificate_rotations",
            "Serving certificates (or CAs) issued by this replica",
            cert_rotations.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            approvals,
            connected,
            push_latency,
            streams,
            webhook,
            webhook_latency,
            leader,
            targets,
            enforcing,
            unprotected,
            left_selection,
            cert_rotations,
            reported: Mutex::default(),
        }
    }

    pub fn reconciled(&self, result: &'static str) {
        self.reconciles.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn reconcile_error(&self, reason: &'static str) {
        self.reconcile_errors.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Observes the time until it is dropped in the reconcile-duration histogram.
    pub fn reconcile_timer(&self) -> ReconcileTimer {
        ReconcileTimer { histogram: self.reconcile_duration.clone(), started: Instant::now() }
    }

    /// A sidecar's approval request or close, by result.
    pub fn approval_request(&self, result: &'static str) {
        self.approvals.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn sidecars_connected(&self, n: usize) {
        self.connected.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn push_acked(&self, latency: Duration) {
        self.push_latency.observe(latency.as_secs_f64());
    }

    pub fn stream_request(&self, result: &'static str) {
        self.streams.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn webhook(&self, result: &'static str, took: Duration) {
        self.webhook.get_or_create(&ResultLabels { result }).inc();
        self.webhook_latency.observe(took.as_secs_f64());
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    pub fn policy_status(&self, namespace: &str, policy: &str, targets: usize, enforcing: usize, unprotected: usize) {
        self.reported.lock().expect("metrics lock").insert((namespace.to_owned(), policy.to_owned()));
        let labels = PolicyLabels { namespace: namespace.to_owned(), policy: policy.to_owned() };
        self.targets.get_or_create(&labels).set(i64::try_from(targets).unwrap_or(i64::MAX));
        self.enforcing.get_or_create(&labels).set(i64::try_from(enforcing).unwrap_or(i64::MAX));
        self.unprotected.get_or_create(&labels).set(i64::try_from(unprotected).unwrap_or(i64::MAX));
    }

    /// `n` running pods left the selection of a policy.
    pub fn pods_left_selection(&self, namespace: &str, policy: &str, n: usize) {
        self.reported.lock().expect("metrics lock").insert((namespace.to_owned(), policy.to_owned()));
        let labels = PolicyLabels { namespace: namespace.to_owned(), policy: policy.to_owned() };
        self.left_selection.get_or_create(&labels).inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    /// Drops the per-policy gauges of policies not in `live` (namespace, name).
    pub fn retain_policies(&self, live: &HashSet<(String, String)>) {
        let mut known = self.reported.lock().expect("metrics lock");
        known.retain(|(namespace, policy)| {
            let keep = live.contains(&(namespace.clone(), policy.clone()));
            if !keep {
                let labels = PolicyLabels { namespace: namespace.clone(), policy: policy.clone() };
                self.targets.remove(&labels);
                self.enforcing.remove(&labels);
                self.unprotected.remove(&labels);
                self.left_selection.remove(&labels);
            }
            keep
        });
    }

    pub fn certificate_issued(&self) {
        self.cert_rotations.inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Measures one reconcile (see [`Metrics::reconcile_timer`]).
#[derive(Debug)]
pub struct ReconcileTimer {
    histogram: Histogram,
    started: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconcile_is_observed_when_its_timer_drops() {
        let metrics = Metrics::new();
        let count = |m: &Metrics| {
            m.encode()
                .lines()
                .find_map(|l| l.strip_prefix("toolgate_operator_reconcile_duration_seconds_count "))
                .map(str::to_owned)
        };
        assert_eq!(count(&metrics).as_deref(), Some("0"));
        drop(metrics.reconcile_timer());
        assert_eq!(count(&metrics).as_deref(), Some("1"));
    }
}
