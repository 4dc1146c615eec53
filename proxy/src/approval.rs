//! Human approval of held calls (operator mode, over HTTP).
//!
//! A `tools/call` whose decision is `Approval` is held: the HTTP request stays open and
//! nothing is forwarded. The proxy POSTs an [`ApprovalRequest`] to the operator (on the
//! stream's connection), which creates an McpApproval and answers `201` with its name. A
//! person approves or denies it; the operator pushes the new phase on the stream
//! (`Message::Approval`). Then the call is forwarded (approved; its limits are reserved
//! only now) or answered with a refusal (denied, expired, cancelled, abandoned).
//!
//! Every held call runs as its own task ([`Approvals::wait`] spawns it), so held calls
//! never block other calls. The task ends the wait on the first of: a final phase on the
//! stream, the policy's `approval.timeout` (the approval is then closed as `Expired`), the
//! client going away or sending `notifications/cancelled` for the request (closed as
//! `Cancelled`). At most [`MAX_HELD`] calls are held at once. Anything that goes wrong
//! while asking refuses the call (fail closed).
//!
//! With `approval.reuse_for`, an approved (policy, rule, tool, grant, identity, canonical
//! arguments) is remembered for that long: an identical call in that window is decided as
//! approved at once (its limits still apply).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::oneshot;
use toolgate_policy::push::{ApprovalRequest, ApprovalUpdate};
use toolgate_policy::{Caller, DenialStyle};

use crate::audit;
use crate::gate::{self, Fields, Gate, Hold, Tracker};
use crate::jsonrpc::code;
use crate::metrics::Metrics;
use crate::operator::Link;

/// Most calls held for approval at once (more are refused at once).
pub const MAX_HELD: usize = 64;
/// Decided approvals whose name is not (yet) waited for, kept in case the decision
/// overtakes the operator's `201` (oldest dropped first).
const MAX_EARLY: usize = 64;
/// Most remembered approvals for `reuse_for` (beyond it, calls are simply asked again).
const MAX_REUSE: usize = 4096;
/// Closing an approval is tried this often.
const CLOSE_ATTEMPTS: u32 = 3;
/// `approval.timeout` when a decision has none (the policy crate's default).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The phase of an McpApproval, as the stream sends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Approved,
    Denied,
    Expired,
    Cancelled,
    Abandoned,
}

impl Phase {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "Pending" => Self::Pending,
            "Approved" => Self::Approved,
            "Denied" => Self::Denied,
            "Expired" => Self::Expired,
            "Cancelled" => Self::Cancelled,
            "Abandoned" => Self::Abandoned,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Approved => "Approved",
            Self::Denied => "Denied",
            Self::Expired => "Expired",
            Self::Cancelled => "Cancelled",
            Self::Abandoned => "Abandoned",
        }
    }

    /// The `decision` label of `toolgate_approval_decisions_total`.
    fn label(self) -> &'static str {
        match self {
            Self::Pending => "error",
            Self::Approved => "approved",
            Self::Denied => "denied",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
            Self::Abandoned => "abandoned",
        }
    }
}

/// SHA-256 (64 hex digits) of the canonical JSON of a call's arguments (absent arguments
/// are `{}`): the same digest as the audit line's `argumentsSha256`
/// ([`crate::audit::arguments_sha256_hex`]), so an approval and the call's audit lines
/// correlate.
pub fn arguments_digest(arguments: &Value) -> String {
    crate::audit::arguments_sha256_hex(arguments)
}

/// What an approval given once covers with `reuse_for`: the same tool, canonical
/// arguments, grant and caller, decided by the same rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ReuseKey {
    policy: String,
    rule: String,
    tool: String,
    grant: Option<String>,
    identity: String,
    digest: String,
}

impl ReuseKey {
    pub fn new(
        hold_policy: Option<&str>,
        rule: Option<&str>,
        tool: &str,
        grant: Option<&str>,
        identity: &str,
        digest: &str,
    ) -> Self {
        Self {
            policy: hold_policy.unwrap_or("").to_owned(),
            rule: rule.unwrap_or("").to_owned(),
            tool: tool.to_owned(),
            grant: grant.map(str::to_owned),
            identity: identity.to_owned(),
            digest: digest.to_owned(),
        }
    }
}

/// An approval that still covers identical calls.
#[derive(Clone, Debug)]
pub struct Reusable {
    pub name: String,
    pub decided_by: Option<String>,
    until: Instant,
}

/// A held request, as `notifications/cancelled` names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CancelKey {
    identity: String,
    session: Option<String>,
    /// The request id's JSON text.
    id: String,
}

#[derive(Debug, Default)]
struct State {
    held: usize,
    waiters: HashMap<String, oneshot::Sender<ApprovalUpdate>>,
    early: VecDeque<ApprovalUpdate>,
    cancels: HashMap<CancelKey, Vec<(u64, oneshot::Sender<()>)>>,
    next_cancel: u64,
    reuse: HashMap<ReuseKey, Reusable>,
}

/// Calls held for approval, shared by the gate and the operator stream.
#[derive(Debug)]
pub struct Approvals {
    link: Arc<Link>,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
}

/// A place among the [`MAX_HELD`] held calls; given back when dropped.
#[derive(Debug)]
struct Slot(Arc<Approvals>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.lock().held -= 1;
        self.0.metrics.approvals_pending(-1);
    }
}

/// How the wait for a decision ended.
#[derive(Debug)]
enum Outcome {
    Approved {
        name: String,
        decided_by: Option<String>,
        reason: Option<String>,
    },
    /// The answer to send instead of forwarding.
    Refused(Value),
}

/// Why a held call stopped waiting.
enum Ended {
    Update(ApprovalUpdate),
    Timeout,
    /// The client went away (its request was dropped).
    Gone,
    /// `notifications/cancelled` for the request.
    Cancelled,
}

impl Approvals {
    pub fn new(link: Arc<Link>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { link, metrics, state: Mutex::default() })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A phase change from the stream. Final phases end the wait of the call holding that
    /// approval; `Pending`, unknown phases and names nobody waits for are ignored (a
    /// decision that overtook the operator's `201` is kept briefly for its waiter).
    pub fn update(&self, update: ApprovalUpdate) {
        match Phase::parse(&update.phase) {
            None => {
                tracing::debug!(name = update.name, phase = update.phase, "ignoring an unknown approval phase");
            }
            Some(Phase::Pending) => {}
            Some(_) => {
                let mut s = self.lock();
                match s.waiters.remove(&update.name) {
                    Some(tx) => {
                        let _ = tx.send(update);
                    }
                    None => {
                        if s.early.len() >= MAX_EARLY {
                            s.early.pop_front();
                        }
                        s.early.push_back(update);
                    }
                }
            }
        }
    }

    /// The decision on `name` when it comes. `None` if another held call waits for that
    /// name already (an operator must name every approval differently).
    fn wait_for(&self, name: &str) -> Option<oneshot::Receiver<ApprovalUpdate>> {
        let (tx, rx) = oneshot::channel();
        let mut s = self.lock();
        if s.waiters.contains_key(name) {
            return None;
        }
        match s.early.iter().position(|u| u.name == name).and_then(|i| s.early.remove(i)) {
            Some(u) => {
                let _ = tx.send(u);
            }
            None => {
                s.waiters.insert(name.to_owned(), tx);
            }
        }
        Some(rx)
    }

    fn forget(&self, name: &str) {
        self.lock().waiters.remove(name);
    }

    /// `notifications/cancelled` from `caller` for request `id` (its JSON text): ends the
    /// wait of that held call, if there is one.
    pub fn cancel(&self, caller: &Caller, id: &str) {
        let key = CancelKey { identity: caller.identity.clone(), session: caller.session.clone(), id: id.to_owned() };
        if let Some(waiting) = self.lock().cancels.remove(&key) {
            for (_, tx) in waiting {
                let _ = tx.send(());
            }
        }
    }

    fn watch_cancel(&self, key: CancelKey) -> (u64, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let mut s = self.lock();
        s.next_cancel += 1;
        let n = s.next_cancel;
        s.cancels.entry(key).or_default().push((n, tx));
        (n, rx)
    }

    fn unwatch_cancel(&self, key: &CancelKey, n: u64) {
        let mut s = self.lock();
        if let Some(list) = s.cancels.get_mut(key) {
            list.retain(|(m, _)| *m != n);
            if list.is_empty() {
                s.cancels.remove(key);
            }
        }
    }

    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut s = self.lock();
        if s.held >= MAX_HELD {
            return None;
        }
        s.held += 1;
        drop(s);
        self.metrics.approvals_pending(1);
        Some(Slot(self.clone()))
    }

    /// An approval that covers this call now (`reuse_for`), if any.
    pub fn reusable(&self, key: &ReuseKey) -> Option<Reusable> {
        let now = Instant::now();
        self.lock().reuse.get(key).filter(|r| r.until > now).cloned()
    }

    /// Remembers an approval for identical calls during `window`.
    pub fn remember(&self, key: ReuseKey, name: &str, decided_by: Option<&str>, window: Duration) {
        let now = Instant::now();
        let mut s = self.lock();
        s.reuse.retain(|_, r| r.until > now);
        if s.reuse.len() >= MAX_REUSE && !s.reuse.contains_key(&key) {
            tracing::warn!(
                approval = name,
                "too many approvals to remember for reuse; identical calls will be asked again"
            );
            return;
        }
        let until = now.checked_add(window).unwrap_or(now);
        s.reuse.insert(key, Reusable { name: name.to_owned(), decided_by: decided_by.map(str::to_owned), until });
    }

    /// Holds `hold` until its approval is decided. `Ok`: forward the call with this
    /// tracker (approved, limits reserved); `Err`: the answer to send instead.
    pub async fn wait(self: Arc<Self>, gate: Arc<Gate>, hold: Box<Hold>) -> Result<Tracker, Value> {
        let ctx = Ctx::new(&hold, self.link.instance());
        let Some(slot) = self.admit() else {
            let reason = format!("too many calls waiting for approval (at most {MAX_HELD}); try again later");
            ctx.emit(&gate, "approval", Some(&reason), None, true);
            self.metrics.approval_decision("error", None);
            gate.drop_hold(*hold);
            return Err(ctx.refusal(code::APPROVAL_REQUIRED, "approval required", "approval", &reason, None));
        };
        let fallback = ctx.refusal(
            code::APPROVAL_REQUIRED,
            "approval required",
            "approval",
            "the approval could not be completed",
            None,
        );
        let (result_tx, result_rx) = oneshot::channel();
        // Dropped with this future: the client went away.
        let (_gone_tx, gone_rx) = oneshot::channel::<()>();
        tokio::spawn(self.clone().held(gate.clone(), ctx, slot, gone_rx, result_tx));
        match result_rx.await {
            Ok(Outcome::Approved { name, decided_by, reason }) => {
                gate.finish_approved(*hold, &name, decided_by.as_deref(), reason.as_deref())
            }
            Ok(Outcome::Refused(answer)) => {
                gate.drop_hold(*hold);
                Err(answer)
            }
            Err(_) => {
                gate.drop_hold(*hold);
                Err(fallback)
            }
        }
    }

    /// The task of one held call: ask, wait, answer, close.
    async fn held(
        self: Arc<Self>,
        gate: Arc<Gate>,
        ctx: Ctx,
        slot: Slot,
        mut gone: oneshot::Receiver<()>,
        result: oneshot::Sender<Outcome>,
    ) {
        let (cancel_n, mut cancelled) = self.watch_cancel(ctx.cancel_key.clone());
        let requested = match self.link.request_approval(&ctx.request).await {
            Ok(name) => match self.wait_for(&name) {
                Some(decision) => Ok((name, decision)),
                None => Err(format!("the operator named another held call {name} too")),
            },
            Err(e) => Err(e),
        };
        let (name, decision) = match requested {
            Ok(r) => r,
            Err(e) => {
                self.unwatch_cancel(&ctx.cancel_key, cancel_n);
                let reason = format!("cannot request approval: {e}");
                tracing::warn!(tool = ctx.request.tool, error = %e, "cannot request approval; the call is refused");
                ctx.emit(&gate, "approval", Some(&reason), None, true);
                self.metrics.approval_decision("error", None);
                drop(slot);
                let answer = ctx.refusal(code::APPROVAL_REQUIRED, "approval required", "approval", &reason, None);
                let _ = result.send(Outcome::Refused(answer));
                return;
            }
        };
        tracing::info!(approval = name, tool = ctx.request.tool, "call held for approval");
        ctx.emit(&gate, "approval", ctx.request.reason.as_deref(), Some(approval(&name, Phase::Pending, None)), true);
        let deadline = tokio::time::Instant::from_std(ctx.started) + ctx.timeout;
        let ended = tokio::select! {
            u = decision => match u {
                Ok(u) => Ended::Update(u),
                // Cannot happen: only `forget` below removes the sender (names are unique).
                Err(_) => Ended::Timeout,
            },
            () = tokio::time::sleep_until(deadline) => Ended::Timeout,
            _ = &mut gone => Ended::Gone,
            _ = &mut cancelled => Ended::Cancelled,
        };
        self.forget(&name);
        self.unwatch_cancel(&ctx.cancel_key, cancel_n);
        let waited = ctx.started.elapsed();
        let (phase, update, close) = match ended {
            Ended::Update(ref u) => (Phase::parse(&u.phase).unwrap_or(Phase::Expired), Some(u.clone()), None),
            Ended::Timeout => (Phase::Expired, None, Some(Phase::Expired)),
            Ended::Gone | Ended::Cancelled => (Phase::Cancelled, None, Some(Phase::Cancelled)),
        };
        self.metrics.approval_decision(phase.label(), Some(waited));
        drop(slot);
        let decided_by = update.as_ref().and_then(|u| u.decided_by.clone());
        let decider_reason = update.as_ref().and_then(|u| u.reason.clone());
        let outcome = match phase {
            Phase::Approved => {
                tracing::info!(approval = name, decided_by, "approved; forwarding the held call");
                Outcome::Approved { name: name.clone(), decided_by, reason: decider_reason }
            }
            Phase::Denied => {
                let mut reason = format!("McpApproval {name} was denied");
                if let Some(by) = &decided_by {
                    reason.push_str(&format!(" by {by}"));
                }
                if let Some(why) = &decider_reason {
                    reason.push_str(&format!(": {why}"));
                }
                let a = approval(&name, phase, decided_by.as_deref());
                ctx.emit(&gate, "deny", Some(&reason), Some(a), true);
                let mut answer = ctx.refusal(code::DENIED, "denied", "deny", &reason, Some(&name));
                if let Some(by) = &decided_by {
                    gate::set_data(&mut answer, "decidedBy", json!(by));
                }
                Outcome::Refused(answer)
            }
            _ => {
                let (kind, reason) = match (&ended, phase) {
                    (Ended::Timeout, _) => (
                        "approval expired",
                        format!("McpApproval {name} expired after {} without a decision", fmt_duration(ctx.timeout)),
                    ),
                    (Ended::Gone, _) => {
                        ("approval cancelled", format!("McpApproval {name} cancelled: the client went away"))
                    }
                    (Ended::Cancelled, _) => (
                        "approval cancelled",
                        format!("McpApproval {name} cancelled: the client cancelled the request"),
                    ),
                    (_, Phase::Cancelled) => ("approval cancelled", format!("McpApproval {name} was cancelled")),
                    (_, Phase::Abandoned) => ("approval abandoned", format!("McpApproval {name} was abandoned")),
                    _ => ("approval expired", format!("McpApproval {name} expired")),
                };
                let reason = match &decider_reason {
                    Some(why) => format!("{reason}: {why}"),
                    None => reason,
                };
                tracing::info!(approval = name, phase = phase.as_str(), "held call refused: {reason}");
                ctx.emit(&gate, "approval", Some(&reason), Some(approval(&name, phase, decided_by.as_deref())), false);
                Outcome::Refused(ctx.refusal(code::APPROVAL_REQUIRED, kind, "approval", &reason, Some(&name)))
            }
        };
        if result.send(outcome).is_err() && phase == Phase::Approved {
            tracing::warn!(approval = name, "approved, but the client went away; the call was not forwarded");
        }
        if let Some(phase) = close {
            self.close(&name, phase).await;
        }
    }

    /// Tells the operator this proxy stopped waiting (best effort, a few attempts).
    async fn close(&self, name: &str, phase: Phase) {
        let mut wait = Duration::from_millis(200);
        for attempt in 1..=CLOSE_ATTEMPTS {
            match self.link.close_approval(name, phase.as_str()).await {
                Ok(()) => return,
                Err(e) if attempt == CLOSE_ATTEMPTS => {
                    tracing::warn!(approval = name, phase = phase.as_str(), error = %e, "giving up closing the approval");
                }
                Err(e) => {
                    tracing::debug!(approval = name, attempt, error = %e, "cannot close the approval; retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            }
        }
    }
}

fn approval<'a>(name: &'a str, phase: Phase, decided_by: Option<&'a str>) -> audit::Approval<'a> {
    audit::Approval { approval: name, approval_phase: phase.as_str(), decided_by, approval_reused: false }
}

/// `2s`, `10m`, `1h`, `90s`.
fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// What the task of a held call needs (owned: it outlives the client's request).
#[derive(Debug)]
struct Ctx {
    id: Value,
    call: gate::OwnedCall,
    revision: String,
    policy: Option<String>,
    rule: Option<String>,
    grant: Option<String>,
    denial: DenialStyle,
    timeout: Duration,
    started: Instant,
    request: ApprovalRequest,
    cancel_key: CancelKey,
}

impl Ctx {
    fn new(hold: &Hold, instance: &str) -> Self {
        let d = &hold.decision;
        let args = &hold.call.arguments;
        let mut argument_keys: Vec<String> = args.as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
        argument_keys.sort();
        let timeout = d.approval_timeout.unwrap_or(DEFAULT_TIMEOUT);
        let request = ApprovalRequest {
            tool: hold.call.tool.clone(),
            grant: d.grant.as_deref().map(str::to_owned),
            identity: hold.call.caller.identity.clone(),
            session: hold.call.caller.session.clone(),
            policy: d.policy.as_deref().unwrap_or("").to_owned(),
            rule: d.rule.as_deref().unwrap_or("").to_owned(),
            reason: d.reason.clone(),
            arguments_digest: hold.digest.clone(),
            argument_keys,
            arguments: d.approval_show_arguments.then(|| if args.is_null() { json!({}) } else { args.clone() }),
            timeout_seconds: timeout.as_secs_f64().ceil().max(1.0) as u64,
            instance: instance.to_owned(),
        };
        Self {
            id: hold.id.clone(),
            call: hold.call.clone(),
            revision: hold.revision.clone(),
            policy: d.policy.as_deref().map(str::to_owned),
            rule: d.rule.as_deref().map(str::to_owned),
            grant: d.grant.as_deref().map(str::to_owned),
            denial: d.denial,
            timeout,
            started: hold.started,
            cancel_key: CancelKey {
                identity: hold.call.caller.identity.clone(),
                session: hold.call.caller.session.clone(),
                id: hold.id.to_string(),
            },
            request,
        }
    }

    /// An audit line (and, if `count`, a `toolgate_decisions_total` sample) for this call.
    fn emit(
        &self,
        gate: &Gate,
        decision: &'static str,
        reason: Option<&str>,
        approval: Option<audit::Approval<'_>>,
        count: bool,
    ) {
        let fields = Fields {
            policy: self.policy.as_deref(),
            rule: self.rule.as_deref(),
            grant: self.grant.as_deref(),
            reason,
            retry_after: None,
            approval,
        };
        gate.emit(&self.call.as_call(), decision, &fields, &self.revision, self.started, count);
    }

    /// The refusal of this call: JSON-RPC error `code` (or a tool result, as the policy
    /// wants), naming the approval when there is one.
    fn refusal(&self, code: i64, kind: &str, decision: &str, reason: &str, name: Option<&str>) -> Value {
        let mut data = json!({
            "decision": decision,
            "policy": self.policy,
            "rule": self.rule,
            "reason": reason,
        });
        if let Some(n) = name {
            data["approval"] = json!(n);
        }
        gate::answer(self.id.clone(), self.denial, code, format!("toolgate: {kind}: {reason}"), data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_depends_on_content_not_key_order() {
        let a = arguments_digest(&json!({"podId": "p-1", "spec": {"gpu": 1, "image": "x"}}));
        let b = arguments_digest(&json!({"spec": {"image": "x", "gpu": 1}, "podId": "p-1"}));
        let c = arguments_digest(&json!({"podId": "p-2", "spec": {"gpu": 1, "image": "x"}}));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|x| x.is_ascii_hexdigit() && !x.is_ascii_uppercase()), "{a}");
        // Pinned: sha256 of the text `{"gpuCount":1,"podId":"p-1"}` (computed with sha256sum).
        assert_eq!(
            arguments_digest(&json!({"podId": "p-1", "gpuCount": 1})),
            "cdc4f708fae53b542e3309453399db6248586d6e5af1e2f5568da9bbaf0b16c9"
        );
        assert_eq!(arguments_digest(&Value::Null), arguments_digest(&json!({})), "absent arguments are {{}}");
    }

    #[test]
    fn phases_parse_and_label() {
        for p in [Phase::Pending, Phase::Approved, Phase::Denied, Phase::Expired, Phase::Cancelled, Phase::Abandoned] {
            assert_eq!(Phase::parse(p.as_str()), Some(p));
        }
        assert_eq!(Phase::parse("approved"), None, "phases are case-sensitive");
        assert_eq!(fmt_duration(Duration::from_secs(2)), "2s");
        assert_eq!(fmt_duration(Duration::from_secs(600)), "10m");
        assert_eq!(fmt_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(fmt_duration(Duration::from_secs(90)), "90s");
    }

    fn approvals() -> Arc<Approvals> {
        let endpoint = crate::operator::Endpoint::parse(&"https://127.0.0.1:1".parse().expect("uri")).expect("valid");
        let config =
            crate::operator::Config { endpoint, token_file: "/nonexistent".into(), ca_file: None, state_dir: None };
        Approvals::new(Link::new(config), Arc::new(Metrics::new()))
    }

    fn update(name: &str, phase: &str) -> ApprovalUpdate {
        ApprovalUpdate { name: name.into(), phase: phase.into(), reason: None, decided_by: None }
    }

    #[test]
    fn at_most_max_held_calls_are_admitted_and_slots_come_back() {
        let a = approvals();
        let slots: Vec<Slot> = (0..MAX_HELD).map(|_| a.admit().expect("room")).collect();
        assert!(a.admit().is_none(), "the {}th call is refused", MAX_HELD + 1);
        assert!(a.metrics.encode().contains(&format!("toolgate_approvals_pending {MAX_HELD}")));
        drop(slots);
        assert!(a.admit().is_some());
        assert!(a.metrics.encode().contains("toolgate_approvals_pending 0"));
    }

    #[test]
    fn decisions_reach_their_waiter_even_before_it_waits_and_others_are_ignored() {
        let a = approvals();
        let mut waiting = a.wait_for("a-1").expect("first waiter");
        assert!(a.wait_for("a-1").is_none(), "one name, one held call");
        a.update(update("a-1", "Pending"));
        a.update(update("other", "Approved"));
        a.update(update("a-1", "Sideways"));
        assert!(waiting.try_recv().is_err(), "pending, unknown names and phases do not end the wait");
        a.update(update("a-1", "Denied"));
        assert_eq!(waiting.try_recv().expect("decided").phase, "Denied");
        // A decision that arrives before its waiter registers is kept for it.
        a.update(update("a-2", "Approved"));
        let mut late = a.wait_for("a-2").expect("first waiter");
        assert_eq!(late.try_recv().expect("kept").phase, "Approved");
        // ...but only a bounded number of them.
        for i in 0..MAX_EARLY + 10 {
            a.update(update(&format!("x-{i}"), "Expired"));
        }
        assert_eq!(a.lock().early.len(), MAX_EARLY);
    }

    #[test]
    fn cancels_match_identity_session_and_request_id() {
        let a = approvals();
        let key = |identity: &str, session: Option<&str>, id: &str| CancelKey {
            identity: identity.into(),
            session: session.map(str::to_owned),
            id: id.into(),
        };
        let (n, mut rx) = a.watch_cancel(key("sha256:a", Some("s1"), "7"));
        let caller = |identity: &str, session: &str| Caller {
            identity: identity.into(),
            session: Some(session.into()),
            ..Caller::default()
        };
        a.cancel(&caller("sha256:b", "s1"), "7");
        a.cancel(&caller("sha256:a", "s2"), "7");
        a.cancel(&caller("sha256:a", "s1"), "\"7\"");
        assert!(rx.try_recv().is_err(), "another caller, session or id does not cancel");
        a.cancel(&caller("sha256:a", "s1"), "7");
        assert!(rx.try_recv().is_ok());
        a.unwatch_cancel(&key("sha256:a", Some("s1"), "7"), n);
        assert!(a.lock().cancels.is_empty());
    }

    #[test]
    fn reuse_is_remembered_for_its_window_and_bounded() {
        let a = approvals();
        let key = |digest: &str| ReuseKey::new(Some("p"), Some("tools.x"), "x", None, "sha256:a", digest);
        assert!(a.reusable(&key("d1")).is_none());
        a.remember(key("d1"), "a-1", Some("alice"), Duration::from_secs(60));
        let r = a.reusable(&key("d1")).expect("remembered");
        assert_eq!((r.name.as_str(), r.decided_by.as_deref()), ("a-1", Some("alice")));
        assert!(a.reusable(&key("d2")).is_none(), "other arguments are not covered");
        a.remember(key("d3"), "a-3", None, Duration::ZERO);
        assert!(a.reusable(&key("d3")).is_none(), "an elapsed window covers nothing");
        for i in 0..MAX_REUSE + 5 {
            a.remember(key(&format!("n{i}")), "a", None, Duration::from_secs(60));
        }
        assert_eq!(a.lock().reuse.len(), MAX_REUSE);
    }
}
