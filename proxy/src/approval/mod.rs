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

use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use toolgate_policy::push::{ApprovalPhase, ApprovalRequest, ApprovalUpdate, ClosePhase};
use toolgate_policy::{Caller, DenialStyle};

use crate::gate::{self, ApprovalRefusal, Approver, Hold, Outcome, Refusal, Reusable, ReuseKey};
use crate::mcp::jsonrpc::code;
use crate::telemetry::metrics::ApprovalOutcome;
use crate::telemetry::{DecisionEvent, Telemetry, audit};

/// Why the operator could not be asked (shown in the refusal and the log).
pub type DeskError = Box<dyn std::error::Error + Send + Sync>;

/// Where approvals are requested and closed: the operator (`crate::control::Link`).
pub trait ApprovalDesk: std::fmt::Debug + Send + Sync {
    /// This proxy's instance id (approvals it requests carry it).
    fn instance(&self) -> &str;
    /// Creates an McpApproval for `request`: its name.
    fn request<'a>(&'a self, request: &'a ApprovalRequest) -> BoxFuture<'a, Result<String, DeskError>>;
    /// Tells the operator this proxy stopped waiting for `name` (`Expired`, `Cancelled`).
    fn close<'a>(&'a self, name: &'a str, phase: ClosePhase) -> BoxFuture<'a, Result<(), DeskError>>;
}

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

/// The `decision` label of `toolgate_approval_decisions_total` for a final phase.
fn phase_label(phase: ApprovalPhase) -> ApprovalOutcome {
    match phase {
        ApprovalPhase::Pending => ApprovalOutcome::Error,
        ApprovalPhase::Approved => ApprovalOutcome::Approved,
        ApprovalPhase::Denied => ApprovalOutcome::Denied,
        ApprovalPhase::Expired => ApprovalOutcome::Expired,
        ApprovalPhase::Cancelled => ApprovalOutcome::Cancelled,
        ApprovalPhase::Abandoned => ApprovalOutcome::Abandoned,
    }
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
    desk: Arc<dyn ApprovalDesk>,
    telemetry: Arc<Telemetry>,
    state: Mutex<State>,
}

/// A place among the [`MAX_HELD`] held calls; given back when dropped.
#[derive(Debug)]
struct Slot(Arc<Approvals>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.lock().held -= 1;
        self.0.telemetry.metrics.approvals_pending(-1);
    }
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
    pub fn new(desk: Arc<dyn ApprovalDesk>, telemetry: Arc<Telemetry>) -> Arc<Self> {
        Arc::new(Self { desk, telemetry, state: Mutex::default() })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A phase change from the stream. Final phases end the wait of the call holding that
    /// approval; `Pending`, unknown phases and names nobody waits for are ignored (a
    /// decision that overtook the operator's `201` is kept briefly for its waiter).
    pub fn update(&self, update: ApprovalUpdate) {
        match update.phase {
            ApprovalPhase::Pending => {}
            _ => {
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
    fn cancel_request(&self, caller: &Caller, id: &str) {
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
        self.telemetry.metrics.approvals_pending(1);
        Some(Slot(self.clone()))
    }

    /// An approval that covers this call now (`reuse_for`), if any.
    fn reusable_now(&self, key: &ReuseKey) -> Option<Reusable> {
        let now = Instant::now();
        self.lock().reuse.get(key).filter(|r| r.until > now).cloned()
    }

    /// Remembers an approval for identical calls during `window`.
    fn remember_for(&self, key: ReuseKey, name: &str, decided_by: Option<&str>, window: Duration) {
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

    /// Holds the call of `ctx` until its approval is decided (the wait runs as its own
    /// task, so the client going away is noticed).
    async fn decide(self: Arc<Self>, ctx: Ctx) -> Outcome {
        let Some(slot) = self.admit() else {
            let reason = format!("too many calls waiting for approval (at most {MAX_HELD}); try again later");
            ctx.emit(&self.telemetry, "approval", Some(&reason), None, true);
            self.telemetry.metrics.approval_decision(ApprovalOutcome::Error, None);
            return Outcome::Refused(Refusal::Approval(ctx.refusal(
                code::APPROVAL_REQUIRED,
                "approval required",
                "approval",
                &reason,
                None,
            )));
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
        tokio::spawn(self.clone().held(ctx, slot, gone_rx, result_tx));
        result_rx.await.unwrap_or(Outcome::Refused(Refusal::Approval(fallback)))
    }

    /// The task of one held call: ask, wait, answer, close.
    async fn held(
        self: Arc<Self>,
        ctx: Ctx,
        slot: Slot,
        mut gone: oneshot::Receiver<()>,
        result: oneshot::Sender<Outcome>,
    ) {
        let (cancel_n, mut cancelled) = self.watch_cancel(ctx.cancel_key.clone());
        let requested = match self.desk.request(&ctx.request).await {
            Ok(name) => match self.wait_for(&name) {
                Some(decision) => Ok((name, decision)),
                None => Err(format!("the operator named another held call {name} too").into()),
            },
            Err(e) => Err(e),
        };
        let (name, decision) = match requested {
            Ok(r) => r,
            Err(e) => {
                self.unwatch_cancel(&ctx.cancel_key, cancel_n);
                let reason = format!("cannot request approval: {e}");
                tracing::warn!(tool = ctx.request.tool, error = %e, "cannot request approval; the call is refused");
                ctx.emit(&self.telemetry, "approval", Some(&reason), None, true);
                self.telemetry.metrics.approval_decision(ApprovalOutcome::Error, None);
                drop(slot);
                let refusal = ctx.refusal(code::APPROVAL_REQUIRED, "approval required", "approval", &reason, None);
                let _ = result.send(Outcome::Refused(Refusal::Approval(refusal)));
                return;
            }
        };
        tracing::info!(approval = name, tool = ctx.request.tool, "call held for approval");
        ctx.emit(
            &self.telemetry,
            "approval",
            ctx.request.reason.as_deref(),
            Some(approval(&name, ApprovalPhase::Pending, None)),
            true,
        );
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
            Ended::Update(ref u) => (u.phase, Some(u.clone()), None),
            Ended::Timeout => (ApprovalPhase::Expired, None, Some(ClosePhase::Expired)),
            Ended::Gone | Ended::Cancelled => (ApprovalPhase::Cancelled, None, Some(ClosePhase::Cancelled)),
        };
        self.telemetry.metrics.approval_decision(phase_label(phase), Some(waited));
        drop(slot);
        let decided_by = update.as_ref().and_then(|u| u.decided_by.clone());
        let decider_reason = update.as_ref().and_then(|u| u.reason.clone());
        let outcome = match phase {
            ApprovalPhase::Approved => {
                tracing::info!(approval = name, decided_by, "approved; forwarding the held call");
                Outcome::Approved { name: name.clone(), decided_by, reason: decider_reason }
            }
            ApprovalPhase::Denied => {
                let mut reason = format!("McpApproval {name} was denied");
                if let Some(by) = &decided_by {
                    reason.push_str(&format!(" by {by}"));
                }
                if let Some(why) = &decider_reason {
                    reason.push_str(&format!(": {why}"));
                }
                let a = approval(&name, phase, decided_by.as_deref());
                ctx.emit(&self.telemetry, "deny", Some(&reason), Some(a), true);
                let mut refusal = ctx.refusal(code::DENIED, "denied", "deny", &reason, Some(&name));
                refusal.decided_by = decided_by;
                Outcome::Refused(Refusal::Approval(refusal))
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
                    (_, ApprovalPhase::Cancelled) => {
                        ("approval cancelled", format!("McpApproval {name} was cancelled"))
                    }
                    (_, ApprovalPhase::Abandoned) => {
                        ("approval abandoned", format!("McpApproval {name} was abandoned"))
                    }
                    _ => ("approval expired", format!("McpApproval {name} expired")),
                };
                let reason = match &decider_reason {
                    Some(why) => format!("{reason}: {why}"),
                    None => reason,
                };
                tracing::info!(approval = name, phase = phase.as_str(), "held call refused: {reason}");
                ctx.emit(
                    &self.telemetry,
                    "approval",
                    Some(&reason),
                    Some(approval(&name, phase, decided_by.as_deref())),
                    false,
                );
                Outcome::Refused(Refusal::Approval(ctx.refusal(
                    code::APPROVAL_REQUIRED,
                    kind,
                    "approval",
                    &reason,
                    Some(&name),
                )))
            }
        };
        if result.send(outcome).is_err() && phase == ApprovalPhase::Approved {
            tracing::warn!(approval = name, "approved, but the client went away; the call was not forwarded");
        }
        if let Some(phase) = close {
            self.close(&name, phase).await;
        }
    }

    /// Tells the operator this proxy stopped waiting (best effort, a few attempts).
    async fn close(&self, name: &str, phase: ClosePhase) {
        let mut wait = Duration::from_millis(200);
        for attempt in 1..=CLOSE_ATTEMPTS {
            match self.desk.close(name, phase).await {
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

impl Approver for Approvals {
    fn reusable(&self, key: &ReuseKey) -> Option<Reusable> {
        self.reusable_now(key)
    }

    fn remember(&self, key: ReuseKey, name: &str, decided_by: Option<&str>, window: Duration) {
        self.remember_for(key, name, decided_by, window);
    }

    fn cancel(&self, caller: &Caller, id: &str) {
        self.cancel_request(caller, id);
    }

    fn wait(self: Arc<Self>, hold: &Hold) -> BoxFuture<'static, Outcome> {
        let ctx = Ctx::new(hold, self.desk.instance());
        Box::pin(self.decide(ctx))
    }
}

fn approval<'a>(name: &'a str, phase: ApprovalPhase, decided_by: Option<&'a str>) -> audit::Approval<'a> {
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
        telemetry: &Telemetry,
        decision: &'static str,
        reason: Option<&str>,
        approval: Option<audit::Approval<'_>>,
        count: bool,
    ) {
        let event = DecisionEvent {
            decision,
            policy: self.policy.as_deref(),
            rule: self.rule.as_deref(),
            grant: self.grant.as_deref(),
            reason,
            retry_after: None,
            approval,
        };
        telemetry.decision(&self.call.as_call(), &event, &self.revision, self.started, count);
    }

    /// The refusal of this call: JSON-RPC error `code` (or a tool result, as the policy
    /// wants), naming the approval when there is one.
    fn refusal(
        &self,
        code: i64,
        kind: &'static str,
        decision: &'static str,
        reason: &str,
        name: Option<&str>,
    ) -> Box<ApprovalRefusal> {
        Box::new(ApprovalRefusal {
            id: self.id.clone(),
            denial: self.denial,
            code,
            kind,
            decision,
            policy: self.policy.clone(),
            rule: self.rule.clone(),
            reason: reason.to_owned(),
            name: name.map(str::to_owned),
            decided_by: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::canonical::arguments_sha256_hex as arguments_digest;

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
    fn final_phases_have_their_own_labels_and_durations_read_well() {
        let labels: std::collections::HashSet<&str> = [
            ApprovalPhase::Approved,
            ApprovalPhase::Denied,
            ApprovalPhase::Expired,
            ApprovalPhase::Cancelled,
            ApprovalPhase::Abandoned,
        ]
        .into_iter()
        .map(|p| phase_label(p).label())
        .collect();
        assert_eq!(labels.len(), 5, "every final phase has its own label");
        assert!(!labels.contains(ApprovalOutcome::Error.label()), "a final phase is never counted as an error");
        assert_eq!(fmt_duration(Duration::from_secs(2)), "2s");
        assert_eq!(fmt_duration(Duration::from_secs(600)), "10m");
        assert_eq!(fmt_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(fmt_duration(Duration::from_secs(90)), "90s");
    }

    /// A desk nobody answers at.
    #[derive(Debug)]
    struct Closed;

    impl ApprovalDesk for Closed {
        fn instance(&self) -> &str {
            "test"
        }

        fn request<'a>(&'a self, _: &'a ApprovalRequest) -> BoxFuture<'a, Result<String, DeskError>> {
            Box::pin(async { Err("closed".into()) })
        }

        fn close<'a>(&'a self, _: &'a str, _: ClosePhase) -> BoxFuture<'a, Result<(), DeskError>> {
            Box::pin(async { Err("closed".into()) })
        }
    }

    fn approvals() -> Arc<Approvals> {
        Approvals::new(Arc::new(Closed), crate::gate::tests::telemetry())
    }

    fn update(name: &str, phase: &str) -> ApprovalUpdate {
        let phase = serde_json::from_value(json!(phase)).expect("a phase");
        ApprovalUpdate { name: name.into(), phase, reason: None, decided_by: None }
    }

    #[test]
    fn at_most_max_held_calls_are_admitted_and_slots_come_back() {
        let a = approvals();
        let slots: Vec<Slot> = (0..MAX_HELD).map(|_| a.admit().expect("room")).collect();
        assert!(a.admit().is_none(), "the {}th call is refused", MAX_HELD + 1);
        assert!(a.telemetry.metrics.encode().contains(&format!("toolgate_approvals_pending {MAX_HELD}")));
        drop(slots);
        assert!(a.admit().is_some());
        assert!(a.telemetry.metrics.encode().contains("toolgate_approvals_pending 0"));
    }

    #[test]
    fn decisions_reach_their_waiter_even_before_it_waits_and_others_are_ignored() {
        let a = approvals();
        let mut waiting = a.wait_for("a-1").expect("first waiter");
        assert!(a.wait_for("a-1").is_none(), "one name, one held call");
        a.update(update("a-1", "Pending"));
        a.update(update("other", "Approved"));
        assert!(waiting.try_recv().is_err(), "pending and unknown names do not end the wait");
        a.update(update("a-1", "Denied"));
        assert_eq!(waiting.try_recv().expect("decided").phase, ApprovalPhase::Denied);
        // A decision that arrives before its waiter registers is kept for it.
        a.update(update("a-2", "Approved"));
        let mut late = a.wait_for("a-2").expect("first waiter");
        assert_eq!(late.try_recv().expect("kept").phase, ApprovalPhase::Approved);
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
        a.cancel_request(&caller("sha256:b", "s1"), "7");
        a.cancel_request(&caller("sha256:a", "s2"), "7");
        a.cancel_request(&caller("sha256:a", "s1"), "\"7\"");
        assert!(rx.try_recv().is_err(), "another caller, session or id does not cancel");
        a.cancel_request(&caller("sha256:a", "s1"), "7");
        assert!(rx.try_recv().is_ok());
        a.unwatch_cancel(&key("sha256:a", Some("s1"), "7"), n);
        assert!(a.lock().cancels.is_empty());
    }

    #[test]
    fn reuse_is_remembered_for_its_window_and_bounded() {
        let a = approvals();
        let key = |digest: &str| ReuseKey::new(Some("p"), Some("tools.x"), "x", None, "sha256:a", digest);
        assert!(a.reusable_now(&key("d1")).is_none());
        a.remember_for(key("d1"), "a-1", Some("alice"), Duration::from_secs(60));
        let r = a.reusable_now(&key("d1")).expect("remembered");
        assert_eq!((r.name.as_str(), r.decided_by.as_deref()), ("a-1", Some("alice")));
        assert!(a.reusable_now(&key("d2")).is_none(), "other arguments are not covered");
        a.remember_for(key("d3"), "a-3", None, Duration::ZERO);
        assert!(a.reusable_now(&key("d3")).is_none(), "an elapsed window covers nothing");
        for i in 0..MAX_REUSE + 5 {
            a.remember_for(key(&format!("n{i}")), "a", None, Duration::from_secs(60));
        }
        assert_eq!(a.lock().reuse.len(), MAX_REUSE);
    }
}
