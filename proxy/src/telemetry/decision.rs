//! One decision, recorded once: a sample of `toolgate_decisions_total` and an audit line
//! (ztunnel's recorder). The gate and the approval flow both record through
//! [`Telemetry::decision`]; neither goes through the other.

use std::sync::Arc;
use std::time::{Duration, Instant};

use toolgate_policy::{Call, Decision, DecisionKind};

use crate::mcp::canonical;
use crate::telemetry::audit::{self, AuditSink};
use crate::telemetry::metrics::Metrics;

/// What was decided about one call: the `decision` label and the fields of its audit line.
#[derive(Debug, Default)]
pub struct DecisionEvent<'a> {
    /// `allow`, `deny`, `approval`, `would_deny`, … (the metric's `decision` label).
    pub decision: &'static str,
    pub policy: Option<&'a str>,
    pub rule: Option<&'a str>,
    pub grant: Option<&'a str>,
    pub reason: Option<&'a str>,
    pub retry_after: Option<Duration>,
    pub approval: Option<audit::Approval<'a>>,
}

impl<'a> DecisionEvent<'a> {
    /// The event of a policy decision, labelled `decision`.
    pub fn of(decision: &'static str, d: &'a Decision) -> Self {
        Self {
            decision,
            policy: d.policy.as_deref(),
            rule: d.rule.as_deref(),
            grant: d.grant.as_deref(),
            reason: d.reason.as_deref(),
            retry_after: d.retry_after,
            approval: None,
        }
    }

    /// An event with no policy fields (e.g. `allow` when only dry-run documents exist).
    pub fn bare(decision: &'static str) -> Self {
        Self { decision, ..Self::default() }
    }
}

/// The label of a dry-run document's refusal: what it would have done.
pub fn would(kind: DecisionKind) -> &'static str {
    match kind {
        DecisionKind::Allow => "allow",
        DecisionKind::Deny | DecisionKind::Hidden => "would_deny",
        DecisionKind::RateLimited => "would_rate_limit",
        DecisionKind::StoreUnavailable => "would_store_unavailable",
        DecisionKind::Approval => "would_require_approval",
    }
}

/// Whole seconds to wait, at least 1 (`Retry-After`, `retryAfterSeconds`).
pub fn retry_secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

/// Metrics and the audit sink, shared by everything that records decisions.
#[derive(Debug)]
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    pod: Option<String>,
    audit_arguments: bool,
    sink: Arc<AuditSink>,
}

impl Telemetry {
    /// `pod`: written in every audit line; `audit_arguments`: write argument values too
    /// (`--audit-arguments`); `sink`: where audit lines go.
    pub fn new(metrics: Arc<Metrics>, pod: Option<String>, audit_arguments: bool, sink: Arc<AuditSink>) -> Self {
        Self { metrics, pod, audit_arguments, sink }
    }

    /// Writes the audit line of a decision and, if `count`, counts it in
    /// `toolgate_decisions_total`.
    pub fn decision(&self, call: &Call<'_>, e: &DecisionEvent<'_>, revision: &str, started: Instant, count: bool) {
        if count {
            self.metrics.decision(call.tool, e.decision, e.policy, e.rule);
        }
        let record = audit::Record {
            ts: audit::Ts::now(),
            kind: "decision",
            pod: self.pod.as_deref(),
            session: call.caller.session.as_deref(),
            identity: &call.caller.identity,
            grant: e.grant,
            tool: call.tool,
            decision: e.decision,
            policy: e.policy,
            rule: e.rule,
            revision,
            reason: e.reason,
            retry_after_seconds: e.retry_after.map(retry_secs),
            argument_keys: audit::ArgumentKeys(call.arguments),
            arguments_sha256: canonical::arguments_digest(call.arguments),
            arguments: self.audit_arguments.then_some(call.arguments),
            approval: e.approval,
            latency_us: started.elapsed().as_micros() as u64,
        };
        // Anything but an admitted call is written at once: a refusal's line is out
        // before its answer.
        self.sink.write(&record, e.decision != "allow");
    }
}
