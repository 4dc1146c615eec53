//! Prometheus metrics of the proxy. Every label value comes from a bounded set: tool
//! names are those the policy names or the upstream listed (capped), everything else is
//! reported as `_other`, so a client calling a million random tool names creates no
//! new series.

use std::collections::HashSet;
use std::sync::{Mutex, RwLock};

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

/// Most label sets of `toolgate_decisions_total` whose handles are kept.
const RECENT_DECISIONS: usize = 64;
/// Most `(method, code)` pairs whose handles are kept.
const RECENT_REQUESTS: usize = 32;

/// Handles of the series of recently used label sets, so a hot series is counted without
/// allocating its label strings and hashing them into the family's map. A handle shares
/// its value with the family's series (these families are never cleared), so counting
/// through it is counting the series; it creates no series of its own. At most `cap`
/// entries, the oldest replaced first; looked up by a linear scan (short keys, few entries),
/// the last hit first.
#[derive(Debug)]
struct Recent<K, V> {
    entries: Vec<(K, V)>,
    cap: usize,
    /// The slot replaced next when full.
    next: usize,
    /// The slot of the last hit.
    last: usize,
}

impl<K, V> Recent<K, V> {
    fn new(cap: usize) -> Self {
        Self { entries: Vec::with_capacity(cap), cap, next: 0, last: 0 }
    }

    fn find(&mut self, is: impl Fn(&K) -> bool) -> Option<&V> {
        if !self.entries.get(self.last).is_some_and(|(k, _)| is(k)) {
            self.last = self.entries.iter().position(|(k, _)| is(k))?;
        }
        self.entries.get(self.last).map(|(_, v)| v)
    }

    fn insert(&mut self, key: K, value: V) {
        if self.entries.len() < self.cap {
            self.last = self.entries.len();
            self.entries.push((key, value));
        } else {
            self.last = self.next;
            self.entries[self.next] = (key, value);
            self.next = (self.next + 1) % self.cap;
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
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
    /// Handles of recently counted `toolgate_decisions_total` series (known tools only).
    recent_decisions: Mutex<Recent<DecisionLabels, Counter>>,
    /// Handles of recently used `toolgate_requests_total` and duration series.
    recent_requests: Mutex<Recent<RequestLabels, (Counter, Histogram)>>,
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
            recent_decisions: Mutex::new(Recent::new(RECENT_DECISIONS)),
            recent_requests: Mutex::new(Recent::new(RECENT_REQUESTS)),
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

    /// Counts a decision in `toolgate_decisions_total`. A label set seen recently is counted
    /// through its cached handle: no label strings allocated, nothing hashed. Only sets whose
    /// tool is a known label are cached (a known tool stays known, while an unknown one may
    /// become known and must then leave `_other`); the rest take the family's map.
    pub fn decision(&self, tool: &str, decision: &'static str, policy: Option<&str>, rule: Option<&str>) {
        let (policy, rule) = (policy.unwrap_or(""), rule.unwrap_or(""));
        let is = |l: &DecisionLabels| l.decision == decision && l.tool == tool && l.policy == policy && l.rule == rule;
        let mut recent = self.recent_decisions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(counter) = recent.find(is) {
            counter.inc();
            return;
        }
        let labels =
            DecisionLabels { tool: self.tool_label(tool), decision, policy: policy.to_owned(), rule: rule.to_owned() };
        let counter = self.decisions.get_or_create_owned(&labels);
        counter.inc();
        if labels.tool == tool {
            recent.insert(labels, counter);
        }
    }

    pub fn method_label(method: &str) -> &'static str {
        KNOWN_METHODS.iter().find(|m| **m == method).copied().unwrap_or(OTHER)
    }

    /// Counts a request in `toolgate_requests_total` and its duration; a recent
    /// `(method, code)` through its cached handles.
    pub fn request(&self, method: &'static str, code: u16, seconds: f64) {
        let mut recent = self.recent_requests.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((count, duration)) = recent.find(|l| l.code == code && l.method == method) {
            count.inc();
            duration.observe(seconds);
            return;
        }
        let labels = RequestLabels { method, code };
        let (count, duration) =
            (self.requests.get_or_create_owned(&labels), self.duration.get_or_create_owned(&MethodLabels { method }));
        count.inc();
        duration.observe(seconds);
        recent.insert(labels, (count, duration));
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

    /// The value of the one line of `text` that starts with `series`.
    fn sample(text: &str, series: &str) -> Option<u64> {
        let mut found = text.lines().filter_map(|l| l.strip_prefix(series)?.strip_prefix(' '));
        let v = found.next()?.parse().ok();
        assert!(found.next().is_none(), "{series} twice in {text}");
        v
    }

    type Sample = (&'static str, &'static str, Option<&'static str>, Option<&'static str>);
    const HOT: [Sample; 5] = [
        ("tool-0", "deny", None, None),
        ("tool-1", "deny", None, None),
        ("tool-0", "allow", None, None),
        ("tool-0", "deny", Some("p"), None),
        ("tool-0", "deny", None, Some("r")),
    ];

    #[test]
    fn decisions_counted_through_cached_handles_are_the_series_counts() {
        let m = Metrics::new();
        let tools: Vec<String> = (0..3 * RECENT_DECISIONS / 2).map(|i| format!("tool-{i}")).collect();
        m.learn_tools(tools.iter().map(String::as_str));
        // More label sets than the cache holds, each counted i % 7 + 1 times, interleaved
        // with a hot one, in rounds (so handles are replaced and found again).
        for round in 0..7 {
            for (i, t) in tools.iter().enumerate() {
                if round < i % 7 + 1 {
                    m.decision(t, "allow", Some("p"), Some(&format!("tools.{t}")));
                }
                // Hot sets, each differing from the first in one label.
                for (tool, decision, policy, rule) in HOT {
                    m.decision(tool, decision, policy, rule);
                }
            }
        }
        let text = m.encode();
        for (i, t) in tools.iter().enumerate() {
            let series =
                format!(r#"toolgate_decisions_total{{tool="{t}",decision="allow",policy="p",rule="tools.{t}"}}"#);
            assert_eq!(sample(&text, &series), Some(i as u64 % 7 + 1), "{series}");
        }
        for (tool, decision, policy, rule) in HOT {
            let (policy, rule) = (policy.unwrap_or(""), rule.unwrap_or(""));
            let series = format!(
                r#"toolgate_decisions_total{{tool="{tool}",decision="{decision}",policy="{policy}",rule="{rule}"}}"#
            );
            assert_eq!(sample(&text, &series), Some(7 * tools.len() as u64), "{series}");
        }
        assert!(m.recent_decisions.lock().is_ok_and(|r| r.len() <= RECENT_DECISIONS));
    }

    #[test]
    fn a_tool_learned_later_leaves_the_other_series() {
        let m = Metrics::new();
        for _ in 0..3 {
            m.decision("late", "deny", Some("p"), Some("default"));
        }
        m.learn_tools(["late"]);
        for _ in 0..2 {
            m.decision("late", "deny", Some("p"), Some("default"));
        }
        let text = m.encode();
        let series = |tool: &str| {
            format!(r#"toolgate_decisions_total{{tool="{tool}",decision="deny",policy="p",rule="default"}}"#)
        };
        assert_eq!(sample(&text, &series("_other")), Some(3), "{text}");
        assert_eq!(sample(&text, &series("late")), Some(2), "{text}");
    }

    #[test]
    fn requests_counted_through_cached_handles_are_the_series_counts() {
        let m = Metrics::new();
        let codes: Vec<u16> = (200..200 + 2 * RECENT_REQUESTS as u16).collect();
        for round in 0..3u64 {
            for &code in &codes {
                if round <= u64::from(code % 3) {
                    m.request("tools/call", code, 0.001);
                }
                m.request("ping", 200, 0.001);
            }
        }
        let text = m.encode();
        for &code in &codes {
            let series = format!(r#"toolgate_requests_total{{method="tools/call",code="{code}"}}"#);
            assert_eq!(sample(&text, &series), Some(u64::from(code % 3) + 1), "{series}");
        }
        let calls: u64 = codes.iter().map(|c| u64::from(c % 3) + 1).sum();
        assert_eq!(sample(&text, r#"toolgate_requests_total{method="ping",code="200"}"#), Some(3 * codes.len() as u64));
        assert_eq!(
            sample(&text, r#"toolgate_request_duration_seconds_count{method="tools/call"}"#),
            Some(calls),
            "{text}"
        );
        assert_eq!(
            sample(&text, r#"toolgate_request_duration_seconds_count{method="ping"}"#),
            Some(3 * codes.len() as u64)
        );
        assert!(m.recent_requests.lock().is_ok_and(|r| r.len() <= RECENT_REQUESTS));
    }

    #[test]
    fn tool_labels_are_capped() {
        let m = Metrics::new();
        let names: Vec<String> = (0..MAX_TOOL_LABELS + 50).map(|i| format!("t{i}")).collect();
        m.learn_tools(names.iter().map(String::as_str));
        assert_eq!(m.known_tools.read().map(|k| k.len()).unwrap_or(0), MAX_TOOL_LABELS);
    }
}
