//! Prometheus metrics of the proxy. Every label value comes from a bounded set: tool
//! names are those the policy names or the upstream listed (capped), everything else is
//! reported as `_other`, so a client calling a million random tool names creates no
//! new series.

use std::collections::HashSet;
use std::sync::RwLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Most distinct tool names used as label values.
pub const MAX_TOOL_LABELS: usize = 512;
/// Label value for anything outside the bounded sets.
pub const OTHER: &str = "_other";

const KNOWN_METHODS: &[&str] = &[
    "initialize",
    "ping",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/read",
    "resources/templates/list",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
    "notifications/initialized",
    "notifications/cancelled",
    "notifications/progress",
    "notifications/roots/list_changed",
    "response",
    "batch",
    "get",
    "delete",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    tool: String,
    decision: &'static str,
    policy: String,
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RevisionLabels {
    revision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApprovalLabels {
    decision: &'static str,
}

/// Closed label sets as types: a call site names a variant, never a string, and each
/// variant's label is written once, here (docs/metrics.md lists the same values; a unit
/// test holds them together).
macro_rules! label_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $label:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every value, in the documented order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The label value.
            pub const fn label(self) -> &'static str {
                match self { $($name::$variant => $label),+ }
            }
        }
    };
}

label_enum! {
    /// `toolgate_caller_refusals_total{reason}`: why a request was refused before any decision.
    CallerRefusal {
        AmbiguousCaller => "ambiguous_caller",
        Session => "session",
        DuplicateId => "duplicate_id",
    }
}

label_enum! {
    /// `toolgate_upstream_errors_total{kind}`: how talking to the MCP server failed.
    UpstreamFailure {
        Connect => "connect",
        Timeout => "timeout",
        Protocol => "protocol",
        Spawn => "spawn",
        Sessions => "sessions",
        Status => "status",
        Body => "body",
        Stream => "stream",
        Lost => "lost",
    }
}

label_enum! {
    /// `toolgate_approval_decisions_total{decision}`: the outcome of a held call.
    ApprovalOutcome {
        Approved => "approved",
        Denied => "denied",
        Expired => "expired",
        Cancelled => "cancelled",
        Abandoned => "abandoned",
        Error => "error",
    }
}

type HistogramFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs … ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// All proxy metrics, registered once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily,
    upstream_errors: Family<KindLabels, Counter>,
    /// Requests refused before any decision because of who or which session they name.
    caller_refusals: Family<ReasonLabels, Counter>,
    /// Requests refused at the door because their credential did not authenticate.
    auth_refusals: Family<ReasonLabels, Counter>,
    policy_loaded: Gauge,
    policy_info: Family<RevisionLabels, Gauge>,
    reload_errors: Counter,
    policy_updates: Family<ResultLabels, Counter>,
    operator_connected: Gauge,
    approvals_pending: Gauge,
    approval_decisions: Family<ApprovalLabels, Counter>,
    approval_wait: Histogram,
    known_tools: RwLock<HashSet<String>>,
    /// The listeners' connection and front-door metrics.
    pub connections: crate::telemetry::connections::ConnMetrics,
    /// The shared counter store's state.
    pub store: crate::telemetry::store::StoreMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "toolgate_decisions",
            "Policy decisions on tools/call, by tool, decision (allow, deny, hidden, approval, rate_limited; for dry-run documents would_deny, would_rate_limit, would_require_approval), policy and rule",
            decisions.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "toolgate_requests",
            "MCP HTTP requests by JSON-RPC method and HTTP status",
            requests.clone(),
        );
        let duration: HistogramFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            "toolgate_request_duration_seconds",
            "Time from request to response head, by JSON-RPC method",
            duration.clone(),
        );
        let upstream_errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "toolgate_upstream_errors",
            "Failures talking to the upstream MCP server, by kind",
            upstream_errors.clone(),
        );
        let caller_refusals = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "toolgate_caller_refusals",
            "Requests refused before any decision: a repeated identity or session header (ambiguous_caller), a session that is unknown or another caller's (session), a request id already waiting in its session (duplicate_id)",
            caller_refusals.clone(),
        );
        let auth_refusals = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "toolgate_auth_refusals",
            "Requests refused (401, or 503 when an issuer's keys cannot be fetched) because the caller's credential did not authenticate, by reason: missing, malformed, unknown_api_key, unknown_issuer, unknown_key_id, algorithm_not_allowed, bad_signature, expired, not_yet_valid, wrong_audience, invalid_claims, keys_unavailable",
            auth_refusals.clone(),
        );
        let policy_loaded = Gauge::default();
        registry.register(
            "toolgate_policy_loaded",
            "1 when a valid policy is enforced, 0 otherwise",
            policy_loaded.clone(),
        );
        let policy_info = Family::<RevisionLabels, Gauge>::default();
        registry.register(
            "toolgate_policy_info",
            "The enforced policy revision (value 1): the files' content hash or the operator's policy set revision",
            policy_info.clone(),
        );
        let reload_errors = Counter::default();
        registry.register(
            "toolgate_policy_reload_errors",
            "Policy updates that were refused (the last good policy stays enforced)",
            reload_errors.clone(),
        );
        let policy_updates = Family::<ResultLabels, Counter>::default();
        registry.register(
            "toolgate_policy_updates",
            "Policy updates (edited files, sets from the operator) by result: applied, or rejected (the last good policy stays)",
            policy_updates.clone(),
        );
        let operator_connected = Gauge::default();
        registry.register(
            "toolgate_operator_connected",
            "1 while the policy stream from the operator is up, 0 otherwise (always 0 with --policy files)",
            operator_connected.clone(),
        );
        let approvals_pending = Gauge::default();
        registry.register(
            "toolgate_approvals_pending",
            "tools/call requests held for a person's approval right now",
            approvals_pending.clone(),
        );
        let approval_decisions = Family::<ApprovalLabels, Counter>::default();
        registry.register(
            "toolgate_approval_decisions",
            "Outcomes of calls held for approval: approved, denied, expired, cancelled, abandoned, or error (the approval could not be requested)",
            approval_decisions.clone(),
        );
        // Every outcome is a series from the start, so rates over it are defined.
        for outcome in ApprovalOutcome::ALL {
            let _ = approval_decisions.get_or_create(&ApprovalLabels { decision: outcome.label() });
        }
        // 0.5 s … ~68 min
        let approval_wait = Histogram::new(exponential_buckets(0.5, 2.0, 14));
        registry.register(
            "toolgate_approval_wait_seconds",
            "Time a call was held for approval, from the decision to hold it until its outcome",
            approval_wait.clone(),
        );
        let connections = crate::telemetry::connections::ConnMetrics::register(&mut registry);
        let store = crate::telemetry::store::StoreMetrics::register(&mut registry);
        Self {
            registry,
            decisions,
            requests,
            duration,
            upstream_errors,
            caller_refusals,
            auth_refusals,
            policy_loaded,
            policy_info,
            reload_errors,
            policy_updates,
            operator_connected,
            approvals_pending,
            approval_decisions,
            approval_wait,
            known_tools: RwLock::default(),
            connections,
            store,
        }
    }

    /// Makes `names` valid tool label values (up to [`MAX_TOOL_LABELS`]).
    pub fn learn_tools<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let mut known = self.known_tools.write().unwrap_or_else(|p| p.into_inner());
        for n in names {
            if known.len() >= MAX_TOOL_LABELS {
                break;
            }
            if n.len() <= 128 && !known.contains(n) {
                known.insert(n.to_owned());
            }
        }
    }

    fn tool_label(&self, tool: &str) -> String {
        let known = self.known_tools.read().unwrap_or_else(|p| p.into_inner());
        if known.contains(tool) { tool.to_owned() } else { OTHER.to_owned() }
    }

    pub fn decision(&self, tool: &str, decision: &'static str, policy: Option<&str>, rule: Option<&str>) {
        self.decisions
            .get_or_create(&DecisionLabels {
                tool: self.tool_label(tool),
                decision,
                policy: policy.unwrap_or("").to_owned(),
                rule: rule.unwrap_or("").to_owned(),
            })
            .inc();
    }

    pub fn method_label(method: &str) -> &'static str {
        KNOWN_METHODS.iter().find(|m| **m == method).copied().unwrap_or(OTHER)
    }

    pub fn request(&self, method: &'static str, code: u16, seconds: f64) {
        self.requests.get_or_create(&RequestLabels { method, code }).inc();
        self.duration.get_or_create(&MethodLabels { method }).observe(seconds);
    }

    /// A request refused before any decision; `reason` is one of the documented labels.
    pub fn caller_refused(&self, reason: CallerRefusal) {
        self.caller_refusals.get_or_create(&ReasonLabels { reason: reason.label() }).inc();
    }

    /// A request refused at the door; `reason` is an `AuthError::reason` label.
    pub fn auth_refused(&self, reason: &'static str) {
        self.auth_refusals.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn upstream_error(&self, kind: UpstreamFailure) {
        self.upstream_errors.get_or_create(&KindLabels { kind: kind.label() }).inc();
    }

    /// Records the policy now enforced and makes the tool names its documents name valid
    /// label values. Without any document nothing is enforced (every call is refused):
    /// `toolgate_policy_loaded` is 0; the revision is still shown when there is one (an
    /// empty set from the operator has one).
    pub fn policy_enforced<'a>(&self, revision: &str, loaded: bool, tools: impl IntoIterator<Item = &'a str>) {
        self.policy_info.clear();
        if !revision.is_empty() {
            self.policy_info.get_or_create(&RevisionLabels { revision: revision.to_owned() }).set(1);
        }
        self.policy_loaded.set(i64::from(loaded));
        self.learn_tools(tools);
    }

    /// A new policy (files or operator set) was applied.
    pub fn policy_applied(&self) {
        self.policy_updates.get_or_create(&ResultLabels { result: "applied" }).inc();
    }

    /// A policy update was refused; the last good policy stays.
    pub fn reload_error(&self) {
        self.reload_errors.inc();
        self.policy_updates.get_or_create(&ResultLabels { result: "rejected" }).inc();
    }

    pub fn operator_connected(&self, up: bool) {
        self.operator_connected.set(i64::from(up));
    }

    /// One more (`+1`) or one fewer (`-1`) call held for approval.
    pub fn approvals_pending(&self, delta: i64) {
        self.approvals_pending.inc_by(delta);
    }

    /// The outcome of a held call  and how long it waited
    /// (`None` when it never waited: the approval could not be requested).
    pub fn approval_decision(&self, outcome: ApprovalOutcome, waited: Option<std::time::Duration>) {
        self.approval_decisions.get_or_create(&ApprovalLabels { decision: outcome.label() }).inc();
        if let Some(w) = waited {
            self.approval_wait.observe(w.as_secs_f64());
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {

    /// The documented label values (docs/metrics.md) are exactly the typed ones.
    #[test]
    fn typed_label_sets_are_the_documented_ones() {
        let doc = include_str!("../../../docs/metrics.md");
        let row = |metric: &str| -> String {
            doc.lines()
                .find(|l| l.starts_with(&format!("| `{metric}`")))
                .unwrap_or_else(|| panic!("{metric} row"))
                .to_owned()
        };
        let backticked =
            |text: &str| -> Vec<String> { text.split('`').skip(1).step_by(2).map(str::to_owned).collect() };
        for (metric, labels) in [
            ("toolgate_caller_refusals_total", CallerRefusal::ALL.iter().map(|l| l.label()).collect::<Vec<_>>()),
            ("toolgate_upstream_errors_total", UpstreamFailure::ALL.iter().map(|l| l.label()).collect()),
            ("toolgate_approval_decisions_total", ApprovalOutcome::ALL.iter().map(|l| l.label()).collect()),
        ] {
            let line = row(metric);
            // The last column lists the values, each in backticks.
            let documented = backticked(line.rsplit('|').nth(1).expect("description column"));
            let documented: Vec<&str> = documented
                .iter()
                .map(String::as_str)
                .filter(|v| v.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
                .collect();
            assert_eq!(documented, labels, "{metric}: docs/metrics.md lists other values than the code");
        }
    }

    use super::*;

    #[test]
    fn unknown_tools_share_one_series() {
        let m = Metrics::new();
        m.learn_tools(["start-pod"]);
        for i in 0..1000 {
            m.decision(&format!("random-{i}"), "deny", Some("p"), Some("default"));
        }
        m.decision("start-pod", "allow", Some("p"), Some("tools.start-pod"));
        let text = m.encode();
        let series = text.lines().filter(|l| l.starts_with("toolgate_decisions_total{")).count();
        assert_eq!(series, 2, "{text}");
        assert!(text.contains(r#"tool="_other",decision="deny""#), "{text}");
        assert!(text.contains(
            r#"toolgate_decisions_total{tool="start-pod",decision="allow",policy="p",rule="tools.start-pod"} 1"#
        ));
    }

    #[test]
    fn tool_labels_are_capped() {
        let m = Metrics::new();
        let names: Vec<String> = (0..MAX_TOOL_LABELS + 50).map(|i| format!("t{i}")).collect();
        m.learn_tools(names.iter().map(String::as_str));
        assert_eq!(m.known_tools.read().map(|k| k.len()).unwrap_or(0), MAX_TOOL_LABELS);
    }
}
