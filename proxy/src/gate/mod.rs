//! The enforcement layer: decides every `tools/call` of a request before anything is
//! forwarded, answers refusals itself, and inspects the upstream's answers to commit or
//! roll back reserved quota and to filter `tools/list` results per caller.
//!
//! The live policy is read from a `watch` channel per request, so a new policy applies
//! to the next call, mid-connection.
//!
//! What is live is an [`Effective`] set: the enforcing documents decide every call; the
//! dry-run documents (McpPolicy `mode: dryRun`) are evaluated too, but their refusals are
//! only recorded (`would_deny`, `would_rate_limit`, `would_require_approval`) and never
//! answer a call. With only dry-run documents calls pass; with no document at all every
//! call is refused (fail closed).
//!
//! A call whose decision is `Approval` is held (see crate::approval) when there is an
//! operator to ask; otherwise it is refused with `-32012`, saying why.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;
use toolgate_policy::{
    ApprovalMemory, Call, Caller, CounterStore, Decision, DecisionKind, Limiter, LocalOnly, RememberedApproval,
    Reservation,
};

use crate::live::Effective;
use crate::mcp::canonical;
use crate::mcp::jsonrpc::{self, Body, Kind, code, id_key};
use crate::telemetry::decision::would;
use crate::telemetry::{DecisionEvent, Telemetry, audit};

mod account;
pub mod authn;
mod caller;
mod hold;
#[cfg(test)]
mod proptests;
mod refusal;

pub use account::{Held, Keep, Tracker};
pub use caller::{CallerError, IdentitySource};
pub use hold::{Approver, Approvers, Hold, Outcome, OwnedCall, Reusable, ReuseKey};
pub use refusal::{ApprovalRefusal, Refusal};

/// Everything the enforcement layer needs, shared by all connections.
#[derive(Debug)]
pub struct Gate {
    pub policy: watch::Receiver<Arc<Effective>>,
    pub limiter: Limiter,
    /// Where enforcing documents' limits are counted: `limiter` (refusing documents that
    /// ask for the shared store), or a shared store.
    pub counters: Arc<dyn CounterStore>,
    /// Counters of dry-run documents, apart from the enforcing ones.
    pub dry_run_limiter: Limiter,
    pub telemetry: Arc<Telemetry>,
    pub identity: IdentitySource,
    pub approver: Approvers,
    /// Approvals given with `reuse_for`, shared by the replicas (the counter store).
    pub approval_memory: Option<Arc<dyn ApprovalMemory>>,
    epoch: Instant,
    /// Credential fingerprints of recent callers (`IdentitySource::Authorization`).
    fingerprints: canonical::FingerprintCache,
}

impl Gate {
    pub fn new(
        policy: watch::Receiver<Arc<Effective>>,
        telemetry: Arc<Telemetry>,
        identity: IdentitySource,
        approver: Approvers,
    ) -> Self {
        let limiter = Limiter::default();
        Self {
            policy,
            counters: Arc::new(LocalOnly(limiter.clone())),
            limiter,
            dry_run_limiter: Limiter::default(),
            telemetry,
            identity,
            approver,
            approval_memory: None,
            epoch: Instant::now(),
            fingerprints: canonical::FingerprintCache::default(),
        }
    }

    /// Counts the enforcing documents' limits in `counters` (a shared store) instead.
    pub fn with_counters(mut self, counters: Arc<dyn CounterStore>) -> Self {
        self.counters = counters;
        self
    }

    /// Remembers approvals given with `reuse_for` in `memory` too, so that other replicas
    /// reuse them.
    pub fn with_approval_memory(mut self, memory: Arc<dyn ApprovalMemory>) -> Self {
        self.approval_memory = Some(memory);
        self
    }

    /// An approval covering `key`: this proxy's own memory, else the shared one (which
    /// answers `None` when it cannot: the call is asked about again).
    fn reusable(&self, a: &dyn Approver, key: &ReuseKey) -> Option<(String, Option<String>)> {
        if let Some(r) = a.reusable(key) {
            return Some((r.name, r.decided_by));
        }
        let found = self.approval_memory.as_ref()?.recall(&key.shared_id())?;
        Some((found.name, found.decided_by))
    }

    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    pub fn current(&self) -> Arc<Effective> {
        self.policy.borrow().clone()
    }

    /// Who is calling (see [`caller::identify`]).
    pub fn caller(&self, headers: &hyper::HeaderMap, policy: &Effective) -> Result<Caller, CallerError> {
        caller::identify(&self.identity, &self.fingerprints, headers, policy)
    }

    /// Inspects one message the upstream sent back. Returns a replacement when the
    /// message must change (a filtered tools/list result).
    pub fn inspect_answer(&self, msg: &Value, tracker: &mut Tracker, caller: &Caller) -> Option<Value> {
        self.inspector().inspect_answer(msg, tracker, caller)
    }

    /// Inspects a JSON answer body (one message or a batch). None = unchanged.
    pub fn inspect_body(&self, body: &[u8], tracker: &mut Tracker, caller: &Caller) -> Option<Vec<u8>> {
        self.inspector().inspect_body(body, tracker, caller)
    }

    fn inspector(&self) -> account::Inspector<'_> {
        account::Inspector { policy: &self.policy, metrics: &self.telemetry.metrics }
    }
}

/// The outcome of checking a POST body.
#[derive(Debug)]
pub enum Checked {
    /// Forward the original bytes; inspect answers with the tracker.
    Forward(Tracker),
    /// Answer with this refusal (nothing is forwarded).
    Refuse(Refusal),
    /// The body's one call waits for a person's approval ([`Gate::wait_approval`]); then the
    /// original bytes are forwarded or a refusal is answered.
    Hold(Box<Hold>),
}

/// What [`Gate::decide`] made of one call.
enum Decided {
    Forward(Held),
    Refuse(Refusal),
    Hold(Box<Hold>),
}

impl Gate {
    /// Decides every message of a body. A batch with any refused element is refused
    /// whole (no element is forwarded), so nothing unchecked ever reaches the upstream.
    pub fn check(
        &self,
        body: &Body,
        caller: &Caller,
        policy: &Effective,
        header_method: Option<&str>,
        header_name: Option<&str>,
    ) -> Checked {
        if let Some(refusal) = check_headers(body, header_method, header_name) {
            return Checked::Refuse(refusal);
        }
        let mut tracker = Tracker::default();
        let mut answers: Vec<Option<Refusal>> = Vec::with_capacity(body.messages.len());
        let mut refused = false;
        let mut hold = None;
        // Canonical keys of the batch's request ids so far (at most MAX_BATCH).
        let mut seen_ids: Vec<&str> = Vec::new();
        for msg in &body.messages {
            let answer = match msg.kind() {
                Kind::Request { id, key, method } => {
                    let answer = if body.batch && seen_ids.contains(&key) {
                        Some(Refusal::invalid(id.clone(), code::INVALID_REQUEST, "duplicate request id in batch"))
                    } else if method == "tools/call" {
                        match jsonrpc::tool_call(msg) {
                            Err(e) => Some(Refusal::invalid(id.clone(), code::INVALID_PARAMS, e)),
                            Ok(tc) => {
                                let call = Call { tool: tc.name, arguments: tc.arguments, caller };
                                match self.decide(id, &call, policy, !body.batch) {
                                    Decided::Forward(held) => {
                                        tracker.calls.insert(key.to_owned(), held);
                                        None
                                    }
                                    Decided::Refuse(answer) => Some(answer),
                                    Decided::Hold(h) => {
                                        hold = Some(h);
                                        None
                                    }
                                }
                            }
                        }
                    } else {
                        if method == "tools/list" {
                            tracker.lists.insert(key.to_owned(), ());
                        }
                        None
                    };
                    if body.batch {
                        seen_ids.push(key);
                    }
                    answer
                }
                Kind::Notification { method: "tools/call" } => Some(Refusal::invalid(
                    Value::Null,
                    code::INVALID_REQUEST,
                    "tools/call must be a request with an id",
                )),
                Kind::Notification { method: "notifications/cancelled" } => {
                    // Also forwarded: the upstream may be working on that request.
                    self.cancel_held(msg, caller);
                    None
                }
                Kind::Notification { .. } | Kind::Response => None,
                Kind::Invalid => {
                    Some(Refusal::invalid(msg.id(), code::INVALID_REQUEST, "not a valid JSON-RPC 2.0 message"))
                }
            };
            refused |= answer.is_some();
            answers.push(answer);
        }
        if !refused {
            // Only a body of one message holds (`!body.batch` above): that message.
            return match hold {
                Some(h) => Checked::Hold(h),
                None => Checked::Forward(tracker),
            };
        }
        tracker.rollback_all();
        if !body.batch {
            return match answers.into_iter().flatten().next() {
                Some(r) => Checked::Refuse(r),
                // Cannot happen (`refused`): an empty batch answer all the same.
                None => Checked::Refuse(Refusal::Batch(Vec::new())),
            };
        }
        let out: Vec<Refusal> = body
            .messages
            .iter()
            .zip(answers)
            .filter_map(|(msg, a)| match (a, msg.kind()) {
                (Some(a), _) => Some(a),
                (None, Kind::Request { id, .. }) => Some(Refusal::Sibling { id: id.clone() }),
                _ => None,
            })
            .collect();
        Checked::Refuse(Refusal::Batch(out))
    }

    /// `notifications/cancelled` for a held call of this caller ends its wait.
    fn cancel_held(&self, msg: &jsonrpc::Message, caller: &Caller) {
        if let Approvers::Operator(a) = &self.approver
            && let Some(id) = msg.request_id()
            && (id.is_string() || id.is_number())
        {
            a.cancel(caller, &id_key(id));
        }
    }

    /// Decides one call: the enforcing documents decide; dry-run documents are evaluated
    /// and their refusals recorded. `Forward`: forward, holding the quota; `Refuse`: the
    /// answer refusing request `id`; `Hold`: wait for a person's approval (only when the
    /// call is `alone` in its body and there is an operator to ask).
    fn decide(&self, id: &Value, call: &Call<'_>, policy: &Effective, alone: bool) -> Decided {
        let started = Instant::now();
        let now = self.now();
        let mut held: Option<(Decision, String, Arc<dyn Approver>)> = None;
        let enforced = if policy.decides_nothing() {
            // Only dry-run documents: nothing is enforced, the call passes.
            self.record(call, "allow", None, policy, started);
            Ok(Reservation::empty(&self.limiter))
        } else {
            let d = policy.enforce.decide(&*self.counters, call, now);
            let d = if d.kind == DecisionKind::Approval {
                match self.route_approval(call, d, policy, alone, started, now) {
                    Ok(d) => Some(d),
                    Err(h) => {
                        held = Some(h);
                        None
                    }
                }
            } else {
                self.record(call, d.kind.as_str(), Some(&d), policy, started);
                Some(d)
            };
            match d {
                None => Ok(Reservation::empty(&self.limiter)),
                Some(mut d) => match d.reservation.take() {
                    Some(r) if d.kind.is_allow() => Ok(r),
                    _ => Err(d),
                },
            }
        };
        let dry_run = if policy.dry_run.is_empty() {
            None
        } else {
            let started = Instant::now();
            let mut d = policy.dry_run.decide(&self.dry_run_limiter, call, now);
            if !d.kind.is_allow() {
                self.record(call, would(d.kind), Some(&d), policy, started);
            }
            d.reservation.take()
        };
        if let Some((decision, digest, approvals)) = held {
            return Decided::Hold(Box::new(Hold {
                approvals,
                id: id.clone(),
                call: OwnedCall {
                    tool: call.tool.to_owned(),
                    arguments: call.arguments.clone(),
                    caller: call.caller.clone(),
                },
                decision,
                dry_run,
                revision: policy.revision.clone(),
                digest,
                started,
            }));
        }
        match enforced {
            Ok(enforce) => Decided::Forward(Held { enforce, dry_run }),
            Err(d) => {
                // The call does not happen, so the dry-run documents' quota is not spent.
                Held::rollback_dry_run(dry_run);
                Decided::Refuse(Refusal::Policy {
                    id: id.clone(),
                    decision: Box::new(d),
                    no_policy: policy.enforce.is_empty(),
                    approval: None,
                })
            }
        }
    }

    /// An `Approval` decision: covered by a remembered approval (`reuse_for`, decided as
    /// approved now), to be held (`Err`), or refused because nobody can approve it here.
    #[expect(clippy::result_large_err, reason = "both sides are one decision, built once per call")]
    fn route_approval(
        &self,
        call: &Call<'_>,
        mut d: Decision,
        policy: &Effective,
        alone: bool,
        started: Instant,
        now: Duration,
    ) -> Result<Decision, (Decision, String, Arc<dyn Approver>)> {
        let why = match &self.approver {
            Approvers::Operator(a) if alone => {
                let digest = canonical::arguments_sha256_hex(call.arguments);
                if d.approval_reuse.is_some() {
                    let key = reuse_key(&d, call, &digest, policy);
                    if let Some((name, decided_by)) = self.reusable(&**a, &key) {
                        let d = d.approved(&*self.counters, now);
                        let mut event = DecisionEvent::of(d.kind.as_str(), &d);
                        event.approval = Some(audit::Approval {
                            approval: &name,
                            approval_phase: "Approved",
                            decided_by: decided_by.as_deref(),
                            approval_reused: true,
                        });
                        self.telemetry.decision(call, &event, &policy.revision, started, true);
                        return Ok(d);
                    }
                }
                return Err((d, digest, a.clone()));
            }
            Approvers::Operator(_) => "a call that needs approval must be sent alone, not in a batch",
            Approvers::Unavailable(why) => why,
        };
        d.reason = Some(match d.reason.take() {
            Some(r) => format!("{why} ({r})"),
            None => why.to_owned(),
        });
        self.record(call, "approval", Some(&d), policy, started);
        Ok(d)
    }

    /// Waits for a person to decide the held call (the approver asks and waits; it never
    /// sees the gate), then finishes it: `Ok`: forward with this tracker; `Err`: the answer
    /// to send instead.
    pub async fn wait_approval(&self, hold: Box<Hold>) -> Result<Tracker, Refusal> {
        let outcome = hold.approvals.clone().wait(&hold).await;
        match outcome {
            Outcome::Approved { name, decided_by, reason } => {
                self.finish_approved(*hold, &name, decided_by.as_deref(), reason.as_deref())
            }
            Outcome::Refused(answer) => {
                self.drop_hold(*hold);
                Err(answer)
            }
        }
    }

    /// A held call was approved: reserve its limits now. `Ok`: forward with this tracker;
    /// `Err`: the refusal (a limit has no room any more, or the policy in force now refuses
    /// the call).
    ///
    /// A person approves a call, not a policy: if the policy changed while the call waited,
    /// the call is decided again under the one in force now. A stricter policy refuses it
    /// (deny, hidden, a failed argument check, a full limit); one that still asks for
    /// approval takes this approval; one that no longer asks lets it pass under its own
    /// limits.
    pub fn finish_approved(
        &self,
        hold: Hold,
        name: &str,
        decided_by: Option<&str>,
        reason: Option<&str>,
    ) -> Result<Tracker, Refusal> {
        let Hold { approvals, id, call, decision, dry_run, revision, digest, started } = hold;
        let policy = self.current();
        let reuse = decision.approval_reuse.map(|w| (w, reuse_key(&decision, &call.as_call(), &digest, &policy)));
        let now = self.now();
        let (mut d, revision) = if policy.revision == revision || policy.decides_nothing() {
            (decision.approved(&*self.counters, now), revision)
        } else {
            let fresh = policy.enforce.decide(&*self.counters, &call.as_call(), now);
            let fresh = if fresh.kind == DecisionKind::Approval { fresh.approved(&*self.counters, now) } else { fresh };
            (fresh, policy.revision.clone())
        };
        let mut event = DecisionEvent::of(d.kind.as_str(), &d);
        if d.kind.is_allow() {
            event.reason = reason;
        }
        event.approval =
            Some(audit::Approval { approval: name, approval_phase: "Approved", decided_by, approval_reused: false });
        self.telemetry.decision(&call.as_call(), &event, &revision, started, true);
        if let Some((window, key)) = reuse {
            if let Some(m) = &self.approval_memory {
                let shared = RememberedApproval { name: name.to_owned(), decided_by: decided_by.map(str::to_owned) };
                m.remember(&key.shared_id(), &shared, window);
            }
            approvals.remember(key, name, decided_by, window);
        }
        match d.reservation.take() {
            Some(r) if d.kind.is_allow() => Ok(Tracker::single(&id, Held { enforce: r, dry_run })),
            _ => {
                Held::rollback_dry_run(dry_run);
                Err(Refusal::Policy {
                    id,
                    decision: Box::new(d),
                    no_policy: policy.enforce.is_empty() && !policy.decides_nothing(),
                    approval: Some(name.to_owned()),
                })
            }
        }
    }

    /// A held call that will not be forwarded: give back what it holds.
    pub fn drop_hold(&self, hold: Hold) {
        Held::rollback_dry_run(hold.dry_run);
    }

    /// Refuses a held call without asking anyone (`why` nobody can be asked).
    pub fn refuse_hold(&self, hold: Hold, why: &str) -> Refusal {
        let Hold { id, mut decision, dry_run, .. } = hold;
        Held::rollback_dry_run(dry_run);
        decision.reason = Some(format!("{why} ({})", decision.reason.take().unwrap_or_default()));
        Refusal::Policy { id, decision: Box::new(decision), no_policy: false, approval: None }
    }

    fn record(
        &self,
        call: &Call<'_>,
        decision: &'static str,
        d: Option<&Decision>,
        policy: &Effective,
        started: Instant,
    ) {
        let event = d.map_or_else(|| DecisionEvent::bare(decision), |d| DecisionEvent::of(decision, d));
        self.telemetry.decision(call, &event, &policy.revision, started, true);
    }
}

fn check_headers(body: &Body, header_method: Option<&str>, header_name: Option<&str>) -> Option<Refusal> {
    if header_method.is_none() && header_name.is_none() {
        return None;
    }
    let first = body.messages.first();
    let id = first.map(jsonrpc::Message::id).unwrap_or(Value::Null);
    let mismatch = |what: &str| {
        Some(Refusal::invalid(id.clone(), code::INVALID_REQUEST, format!("{what} header does not match the body")))
    };
    if body.batch {
        return mismatch("Mcp-Method/Mcp-Name (not allowed with a batch)");
    }
    let msg = first?;
    let method = msg.method();
    if let Some(h) = header_method
        && Some(h) != method
    {
        return mismatch("Mcp-Method");
    }
    if let Some(h) = header_name
        && method == Some("tools/call")
        && msg.tool_name() != Some(h)
    {
        return mismatch("Mcp-Name");
    }
    None
}

/// What an approval given for this call covers with `reuse_for`. The policy is named by
/// its identity in shared keys (`<namespace>/<name>` for McpPolicies), as counters are.
fn reuse_key(d: &Decision, call: &Call<'_>, digest: &str, policy: &Effective) -> ReuseKey {
    let name = d.policy.as_deref();
    let id = name.map(|n| policy.enforce.counter_id(n).unwrap_or(n));
    ReuseKey::new(id, d.rule.as_deref(), call.tool, d.grant.as_deref(), &call.caller.identity, digest)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::live::Source;
    use crate::mcp::jsonrpc::parse_body;
    use serde_json::json;
    use toolgate_policy::Policy;

    /// The answer of a refused body.
    pub(crate) fn answer_of(c: Checked) -> Option<Value> {
        match c {
            Checked::Refuse(r) => Some(r.into_answer()),
            _ => None,
        }
    }

    fn gate(policy: &str) -> (Gate, Arc<Effective>) {
        gate_for(Arc::new(Effective::files(Policy::from_text("test", policy).expect("valid"))))
    }

    /// A gate enforcing `p` (without an operator to ask for approvals).
    pub(crate) fn telemetry() -> Arc<Telemetry> {
        Arc::new(Telemetry::new(
            Arc::new(crate::telemetry::metrics::Metrics::new()),
            None,
            false,
            Arc::new(crate::telemetry::audit::AuditSink::new(crate::telemetry::audit::Target::Stdout)),
        ))
    }

    /// An approver that remembers approvals for reuse and never decides anything.
    #[derive(Debug, Default)]
    pub(crate) struct Remembers(std::sync::Mutex<std::collections::HashMap<ReuseKey, Reusable>>);

    impl Approver for Remembers {
        fn reusable(&self, key: &ReuseKey) -> Option<Reusable> {
            self.0.lock().expect("lock").get(key).filter(|r| r.until > Instant::now()).cloned()
        }

        fn remember(&self, key: ReuseKey, name: &str, decided_by: Option<&str>, window: Duration) {
            let until = Instant::now() + window;
            let r = Reusable { name: name.to_owned(), decided_by: decided_by.map(str::to_owned), until };
            self.0.lock().expect("lock").insert(key, r);
        }

        fn cancel(&self, _: &Caller, _: &str) {}

        fn wait(self: Arc<Self>, _: &Hold) -> futures_util::future::BoxFuture<'static, Outcome> {
            Box::pin(std::future::pending())
        }
    }

    pub(crate) fn gate_for(p: Arc<Effective>) -> (Gate, Arc<Effective>) {
        let (_tx, rx) = watch::channel(p.clone());
        (Gate::new(rx, telemetry(), IdentitySource::Authorization, Approvers::Unavailable("no operator to ask")), p)
    }

    /// A gate whose documents are `(name, text, dry_run)`.
    fn gate_with(docs: &[(&str, &str, bool)]) -> (Gate, Arc<Effective>) {
        let compile = |dry: bool| {
            let d: Vec<_> = docs
                .iter()
                .filter(|(_, _, dr)| *dr == dry)
                .map(|(n, t, _)| ((*n).to_owned(), toolgate_policy::parse_document(t).expect("parses")))
                .collect();
            if d.is_empty() { Policy::empty() } else { Policy::compile(d).expect("valid") }
        };
        gate_for(Arc::new(Effective::new(compile(false), compile(true), "rev".into(), Source::Operator)))
    }

    const SEED: &str = r#"{"version":"1","default":"deny","tools":{"start-pod":{"limits":[{"counter":"start-pod_rate","window":"minute","max":2,"scope":"grant"}]}}}"#;

    fn call(id: u64, tool: &str) -> String {
        format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{tool}","arguments":{{}}}}}}"#)
    }

    #[test]
    fn single_denial_is_answered() {
        let (g, p) = gate(SEED);
        let body = parse_body(call(7, "delete-pod").as_bytes()).expect("parses");
        let Some(a) = answer_of(g.check(&body, &Caller::default(), &p, None, None)) else { panic!("must refuse") };
        assert_eq!(a["id"], 7);
        assert_eq!(a["error"]["code"], code::DENIED);
        assert_eq!(a["error"]["data"]["decision"], "deny");
        assert_eq!(a["error"]["data"]["rule"], "default");
    }

    #[test]
    fn batch_with_one_refusal_is_refused_whole_and_spends_nothing() {
        let (g, p) = gate(SEED);
        let text = format!("[{},{}]", call(1, "start-pod"), call(2, "delete-pod"));
        let body = parse_body(text.as_bytes()).expect("parses");
        let Some(Value::Array(a)) = answer_of(g.check(&body, &Caller::default(), &p, None, None)) else {
            panic!("must refuse")
        };
        assert_eq!(a.len(), 2);
        assert_eq!(a[0]["error"]["code"], code::DENIED);
        // Quota was not spent by the refused batch: two calls still pass.
        for id in 3..5 {
            let b = parse_body(call(id, "start-pod").as_bytes()).expect("parses");
            assert!(matches!(g.check(&b, &Caller::default(), &p, None, None), Checked::Forward(_)));
        }
        let b = parse_body(call(9, "start-pod").as_bytes()).expect("parses");
        let Some(a) = answer_of(g.check(&b, &Caller::default(), &p, None, None)) else { panic!("limit") };
        assert_eq!(a["error"]["code"], code::RATE_LIMITED);
        assert!(a["error"]["data"]["retryAfterSeconds"].as_u64().is_some_and(|s| s > 0 && s <= 60));
    }

    #[test]
    fn error_answer_rolls_back_and_result_spends() {
        let (g, p) = gate(SEED);
        let caller = Caller::default();
        for round in 0..3 {
            let b = parse_body(call(round, "start-pod").as_bytes()).expect("parses");
            let Checked::Forward(mut t) = g.check(&b, &caller, &p, None, None) else { panic!("room") };
            let answer = json!({"jsonrpc":"2.0","id":round,"error":{"code":-32603,"message":"boom"}});
            assert!(g.inspect_answer(&answer, &mut t, &caller).is_none());
        }
        for id in 10..12 {
            let b = parse_body(call(id, "start-pod").as_bytes()).expect("parses");
            let Checked::Forward(mut t) = g.check(&b, &caller, &p, None, None) else { panic!("room") };
            let answer = json!({"jsonrpc":"2.0","id":id,"result":{"content":[],"isError":true}});
            g.inspect_answer(&answer, &mut t, &caller);
        }
        let b = parse_body(call(20, "start-pod").as_bytes()).expect("parses");
        assert!(matches!(g.check(&b, &caller, &p, None, None), Checked::Refuse(_)));
    }

    #[test]
    fn answer_bodies_settle_tracked_calls_like_the_full_path() {
        let caller = Caller::default();
        // (answer body to call id 1, whether the call's quota is spent afterwards)
        for (body, spent) in [
            (r#"{"jsonrpc":"2.0","id":1,"result":{"content":[]}}"#, true),
            (r#" {"jsonrpc":"2.0","id":1,"result":{"content":[],"isError":true}}"#, true),
            (r#"[{"jsonrpc":"2.0","id":1,"result":{}}]"#, true),
            (r#"{"jsonrpc":"2.0","id":1,"error":{"code":-32603,"message":"boom"}}"#, false),
            (r#"{"jsonrpc":"2.0","id":1,"error":null}"#, false),
            // Not an answer to this call: the caller of inspect_body rolls it back.
            (r#"{"jsonrpc":"2.0","id":"1","result":{}}"#, false),
            (r#"[1, null]"#, false),
            (r#"[1, {}]"#, false),
            (r#"{"jsonrpc":"2.0","id":1,"result":{}} x"#, false),
        ] {
            // The seed allows two start-pod calls per minute.
            let (g, p) = gate(SEED);
            let b = parse_body(call(1, "start-pod").as_bytes()).expect("parses");
            let Checked::Forward(mut t) = g.check(&b, &caller, &p, None, None) else { panic!("room") };
            assert!(g.inspect_body(body.as_bytes(), &mut t, &caller).is_none(), "{body}");
            t.rollback_all();
            let b = parse_body(call(2, "start-pod").as_bytes()).expect("parses");
            let Checked::Forward(_held) = g.check(&b, &caller, &p, None, None) else { panic!("room: {body}") };
            let b = parse_body(call(3, "start-pod").as_bytes()).expect("parses");
            let third = g.check(&b, &caller, &p, None, None);
            assert_eq!(matches!(third, Checked::Refuse(_)), spent, "{body}");
        }
    }

    #[test]
    fn unanswered_calls_stay_spent() {
        let (g, p) = gate(SEED);
        let caller = Caller::default();
        for id in 0..2 {
            let b = parse_body(call(id, "start-pod").as_bytes()).expect("parses");
            let Checked::Forward(t) = g.check(&b, &caller, &p, None, None) else { panic!("room") };
            t.keep_spent();
        }
        let b = parse_body(call(5, "start-pod").as_bytes()).expect("parses");
        let Some(a) = answer_of(g.check(&b, &caller, &p, None, None)) else { panic!("no room left") };
        assert_eq!(a["error"]["code"], code::RATE_LIMITED);
    }

    #[test]
    fn tools_list_is_filtered() {
        let (g, p) = gate(SEED);
        let caller = Caller::default();
        let b = parse_body(br#"{"jsonrpc":"2.0","id":"l","method":"tools/list"}"#).expect("parses");
        let Checked::Forward(mut t) = g.check(&b, &caller, &p, None, None) else { panic!("forward") };
        let answer = json!({"jsonrpc":"2.0","id":"l","result":{"tools":[{"name":"start-pod"},{"name":"delete-pod"}],"nextCursor":"c2"}});
        let out = g.inspect_answer(&answer, &mut t, &caller).expect("filtered");
        assert_eq!(out["result"]["tools"], json!([{"name":"start-pod"}]));
        assert_eq!(out["result"]["nextCursor"], "c2");
    }

    #[test]
    fn headers_must_match_body() {
        let (g, p) = gate(SEED);
        let b = parse_body(call(1, "start-pod").as_bytes()).expect("parses");
        assert!(matches!(
            g.check(&b, &Caller::default(), &p, Some("tools/call"), Some("delete-pod")),
            Checked::Refuse(_)
        ));
        assert!(matches!(g.check(&b, &Caller::default(), &p, Some("tools/list"), None), Checked::Refuse(_)));
        assert!(matches!(
            g.check(&b, &Caller::default(), &p, Some("tools/call"), Some("start-pod")),
            Checked::Forward(_)
        ));
    }

    #[test]
    fn malformed_tool_calls_are_refused_not_forwarded() {
        let (g, p) = gate(r#"{"version":"1","default":"allow"}"#);
        for text in [
            r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"x"}}"#,
            r#"{"jsonrpc":"2.0","id":null,"method":"tools/call","params":{"name":"x"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":"{}"}}"#,
            r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}},{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"y"}}]"#,
        ] {
            let b = parse_body(text.as_bytes()).expect("parses");
            assert!(matches!(g.check(&b, &Caller::default(), &p, None, None), Checked::Refuse(_)), "{text}");
        }
    }

    #[test]
    fn no_policy_refuses_everything() {
        let (g, p) = gate_for(Arc::new(Effective::none(Source::Operator)));
        let b = parse_body(call(1, "list-pods").as_bytes()).expect("parses");
        let Some(a) = answer_of(g.check(&b, &Caller::default(), &p, None, None)) else { panic!("refuse") };
        assert_eq!(a["error"]["code"], code::NO_POLICY);
    }

    const NEEDS_APPROVAL: &str = r#"{"version":"1","default":"deny","tools":{"start-pod":{"action":"approval","reason":"a person decides","approval":{"reuse_for":"1m"},"limits":[{"counter":"c","window":"minute","max":1,"scope":"global"}]}}}"#;

    fn operator_gate(policy: &str) -> (Gate, Arc<Effective>, Arc<Remembers>) {
        let (g, p, approvals, _tx) = live_operator_gate(policy);
        (g, p, approvals)
    }

    /// [`operator_gate`], with the sender that swaps the live policy.
    fn live_operator_gate(policy: &str) -> (Gate, Arc<Effective>, Arc<Remembers>, watch::Sender<Arc<Effective>>) {
        let p = Arc::new(Effective::files(Policy::from_text("test", policy).expect("valid")));
        let (tx, rx) = watch::channel(p.clone());
        let approvals = Arc::new(Remembers::default());
        let g = Gate::new(rx, telemetry(), IdentitySource::Authorization, Approvers::Operator(approvals.clone()));
        (g, p, approvals, tx)
    }

    /// A call approved after the policy changed is decided under the policy in force then.
    #[test]
    fn an_approved_call_is_decided_again_under_the_policy_in_force() {
        let (g, p, _approvals, tx) = live_operator_gate(NEEDS_APPROVAL);
        let caller = Caller { identity: "sha256:a".into(), session: None, ..Caller::default() };
        let hold = |id| {
            let b = parse_body(call(id, "start-pod").as_bytes()).expect("parses");
            let Checked::Hold(h) = g.check(&b, &caller, &p, None, None) else { panic!("held") };
            h
        };
        let (first, second) = (hold(1), hold(2));
        // While both wait, the policy starts denying the tool.
        let stricter = r#"{"version":"1","default":"deny","tools":{"start-pod":{"action":"deny","reason":"frozen"}}}"#;
        tx.send(Arc::new(Effective::files(Policy::from_text("test", stricter).expect("valid")))).expect("send");
        let Err(a) = g.finish_approved(*first, "a-1", Some("alice"), None) else { panic!("refused now") };
        let a = a.into_answer();
        assert_eq!(a["error"]["code"], code::DENIED, "{a}");
        assert_eq!(a["error"]["data"]["reason"], "frozen");
        assert_eq!(a["error"]["data"]["approval"], "a-1");
        // The policy is relaxed again (no approval, no limit): the approved call passes.
        let open = r#"{"version":"1","default":"allow"}"#;
        tx.send(Arc::new(Effective::files(Policy::from_text("test", open).expect("valid")))).expect("send");
        assert!(g.finish_approved(*second, "a-2", Some("alice"), None).is_ok());
    }

    #[test]
    fn without_an_operator_approval_is_refused_saying_so() {
        let (g, p) = gate(NEEDS_APPROVAL);
        let b = parse_body(call(1, "start-pod").as_bytes()).expect("parses");
        let Some(a) = answer_of(g.check(&b, &Caller::default(), &p, None, None)) else { panic!("refused") };
        assert_eq!(a["error"]["code"], code::APPROVAL_REQUIRED);
        assert_eq!(a["error"]["data"]["decision"], "approval");
        assert_eq!(a["error"]["data"]["reason"], "approval required: no operator to ask (a person decides)");
        assert_eq!(a["error"]["message"], "toolgate: approval required: no operator to ask (a person decides)");
        assert!(
            g.telemetry.metrics.encode().contains(r#"decision="approval",policy="test",rule="tools.start-pod"} 1"#)
        );
    }

    #[test]
    fn with_an_operator_a_lone_call_is_held_and_a_batched_one_refused() {
        let (g, p, _) = operator_gate(NEEDS_APPROVAL);
        let caller = Caller { identity: "sha256:a".into(), session: Some("s".into()), ..Caller::default() };
        let b = parse_body(call(1, "start-pod").as_bytes()).expect("parses");
        let Checked::Hold(h) = g.check(&b, &caller, &p, None, None) else { panic!("held") };
        assert_eq!((h.id.clone(), h.call.tool.as_str()), (json!(1), "start-pod"));
        assert_eq!(h.digest, canonical::arguments_sha256_hex(&json!({})));
        assert_eq!(h.decision.kind, DecisionKind::Approval);
        // Counted once the operator named the approval, not before.
        assert!(!g.telemetry.metrics.encode().contains(r#"decision="approval""#));

        let text = format!("[{},{}]", call(2, "start-pod"), call(3, "start-pod"));
        let b = parse_body(text.as_bytes()).expect("parses");
        let Some(Value::Array(a)) = answer_of(g.check(&b, &caller, &p, None, None)) else { panic!("refused") };
        assert_eq!(a[0]["error"]["code"], code::APPROVAL_REQUIRED);
        let reason = a[0]["error"]["data"]["reason"].as_str().expect("reason");
        assert!(reason.contains("must be sent alone"), "{reason}");
    }

    #[test]
    fn an_approval_reused_for_an_identical_call_still_obeys_limits() {
        let (g, p, approvals) = operator_gate(NEEDS_APPROVAL);
        let caller = Caller { identity: "sha256:a".into(), session: None, ..Caller::default() };
        let b = parse_body(call(1, "start-pod").as_bytes()).expect("parses");
        let Checked::Hold(h) = g.check(&b, &caller, &p, None, None) else { panic!("held") };
        // Approved: the limit (1 per minute) is reserved now, and the approval remembered.
        let Ok(t) = g.finish_approved(*h, "a-1", Some("alice"), None) else { panic!("room") };
        t.keep_spent();
        let b = parse_body(call(2, "start-pod").as_bytes()).expect("parses");
        let Some(a) = answer_of(g.check(&b, &caller, &p, None, None)) else { panic!("reused, but no room") };
        assert_eq!(a["error"]["code"], code::RATE_LIMITED, "{a}");
        let text = g.telemetry.metrics.encode();
        assert!(text.contains(r#"decision="allow",policy="test",rule="tools.start-pod"} 1"#), "{text}");
        assert!(text.contains(r#"decision="rate_limited""#), "{text}");
        // Another caller is not covered by alice's approval of this caller's call.
        let other = Caller { identity: "sha256:b".into(), session: None, ..Caller::default() };
        assert!(matches!(g.check(&b, &other, &p, None, None), Checked::Hold(_)));
        drop(approvals);
    }

    const DENY_START: &str = r#"{"version":"1","default":"allow","tools":{"start-pod":{"action":"deny"}}}"#;
    const ONE_PER_MINUTE: &str = r#"{"version":"1","default":"allow","all_tools":{"limits":[{"counter":"c","window":"minute","max":1,"scope":"global"}]}}"#;

    #[test]
    fn dry_run_refusals_are_counted_not_enforced() {
        let (g, p) = gate_with(&[("seed", SEED, false), ("strict", DENY_START, true)]);
        let b = parse_body(call(1, "start-pod").as_bytes()).expect("parses");
        let Checked::Forward(_) = g.check(&b, &Caller::default(), &p, None, None) else { panic!("enforcing allows") };
        let text = g.telemetry.metrics.encode();
        assert!(text.contains(r#"decision="allow",policy="seed""#), "{text}");
        assert!(text.contains(r#"decision="would_deny",policy="strict",rule="tools.start-pod""#), "{text}");
        // The enforcing document still refuses what it refuses, whatever the dry run says.
        let b = parse_body(call(2, "delete-pod").as_bytes()).expect("parses");
        let Some(a) = answer_of(g.check(&b, &Caller::default(), &p, None, None)) else { panic!("refuse") };
        assert_eq!(a["error"]["code"], code::DENIED);
        assert_eq!(a["error"]["data"]["policy"], "seed");
    }

    #[test]
    fn only_dry_run_documents_let_calls_pass_and_list_everything() {
        let (g, p) = gate_with(&[("strict", DENY_START, true)]);
        assert!(!p.is_empty() && p.decides_nothing());
        let b = parse_body(call(1, "start-pod").as_bytes()).expect("parses");
        assert!(matches!(g.check(&b, &Caller::default(), &p, None, None), Checked::Forward(_)));
        assert!(g.telemetry.metrics.encode().contains(r#"decision="would_deny""#));
        assert!(p.lists_tool("start-pod", &Caller::default()), "listing follows the enforcing documents");
    }

    #[test]
    fn dry_run_limits_use_their_own_counters_and_settle_with_the_call() {
        let (g, p) = gate_with(&[("seed", SEED, false), ("cap", ONE_PER_MINUTE, true)]);
        let caller = Caller::default();
        // A failed call gives the dry-run unit back too.
        let b = parse_body(call(1, "start-pod").as_bytes()).expect("parses");
        let Checked::Forward(mut t) = g.check(&b, &caller, &p, None, None) else { panic!("room") };
        let failed = json!({"jsonrpc":"2.0","id":1,"error":{"code":-32603,"message":"boom"}});
        assert!(g.inspect_answer(&failed, &mut t, &caller).is_none());
        assert!(!g.telemetry.metrics.encode().contains(r#"decision="would_rate_limit""#));
        for id in 2..4 {
            let b = parse_body(call(id, "start-pod").as_bytes()).expect("parses");
            let Checked::Forward(t) = g.check(&b, &caller, &p, None, None) else { panic!("enforcing has room") };
            t.keep_spent();
        }
        let text = g.telemetry.metrics.encode();
        assert!(text.contains(r#"decision="would_rate_limit",policy="cap""#), "{text}");
        // Real quota (2 per minute) is spent by the two forwarded calls only.
        let b = parse_body(call(9, "start-pod").as_bytes()).expect("parses");
        let Some(a) = answer_of(g.check(&b, &caller, &p, None, None)) else { panic!("real limit") };
        assert_eq!(a["error"]["code"], code::RATE_LIMITED);
    }
}
