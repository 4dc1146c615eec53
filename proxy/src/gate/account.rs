//! Accounting of forwarded calls: the quota each call holds until the upstream's answer
//! settles it (an error gives it back, a result spends it, no answer keeps it spent), and
//! the inspection of answers that settles calls and filters `tools/list` per caller.

use std::collections::HashMap;

use serde_json::Value;
use toolgate_policy::{Caller, Reservation};

use std::sync::Arc;

use tokio::sync::watch;

use crate::live::Effective;
use crate::mcp::jsonrpc::id_key;
use crate::telemetry::metrics::Metrics;

/// Quota held for one forwarded call: the enforcing documents' and, if any, the dry-run
/// documents' (kept apart, so trying a policy out never spends real quota). Both settle
/// together.
#[derive(Debug)]
pub struct Held {
    pub(super) enforce: Reservation,
    pub(super) dry_run: Option<Reservation>,
}

impl Held {
    /// Gives back everything held (the call does not happen).
    pub(super) fn rollback_dry_run(dry_run: Option<Reservation>) {
        if let Some(d) = dry_run {
            d.rollback();
        }
    }

    pub(super) fn commit(self) {
        self.enforce.commit();
        if let Some(d) = self.dry_run {
            d.commit();
        }
    }

    pub(super) fn rollback(self) {
        self.enforce.rollback();
        if let Some(d) = self.dry_run {
            d.rollback();
        }
    }
}

/// Requests of one POST whose answers must be inspected, keyed by the id's canonical
/// text ([`id_key`]).
#[derive(Debug, Default)]
pub struct Tracker {
    pub(super) calls: Ids<Held>,
    pub(super) lists: Ids<()>,
    /// Held until the answers are settled (dropped with the tracker): the claim on the
    /// requests' ids in their session.
    keep: Option<Keep>,
}

/// A map keyed by ids' canonical text (few entries, short keys: foldhash, not SipHash;
/// a batch has at most `MAX_BATCH` ids, a `--stdio` session `MAX_PENDING`).
pub(super) type Ids<V> = HashMap<String, V, foldhash::fast::RandomState>;

/// Something a [`Tracker`] holds until it is dropped.
pub struct Keep(#[allow(dead_code, reason = "held for its Drop")] Box<dyn Send + Sync>);

impl std::fmt::Debug for Keep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keep")
    }
}

impl Tracker {
    /// One forwarded call (a held call, once approved).
    pub(super) fn single(id: &Value, held: Held) -> Self {
        let mut t = Self::default();
        t.calls.insert(id_key(id), held);
        t
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty() && self.lists.is_empty()
    }

    /// Holds `k` until this tracker is dropped (its answers settled or given up).
    pub fn keep_until_settled(&mut self, k: impl Send + Sync + 'static) {
        self.keep = Some(Keep(Box::new(k)));
    }

    /// Takes over the entries of another tracker (stdio mode keeps one for the session).
    pub fn absorb(&mut self, other: Tracker) {
        self.calls.extend(other.calls);
        self.lists.extend(other.lists);
    }

    /// Calls whose outcome is unknown (no answer seen): their units stay spent, since
    /// the upstream may have acted. Failing closed never admits more than `max`.
    pub fn keep_spent(self) {
        for (_, r) in self.calls {
            r.commit();
        }
    }

    /// The call never completed upstream (transport error, error status, stream ended
    /// without its answer): give its quota back.
    pub fn rollback_all(&mut self) {
        for (_, r) in self.calls.drain() {
            r.rollback();
        }
        self.lists.clear();
    }
}

/// What inspecting answers needs of the gate: the live policy (read only when a
/// `tools/list` result is filtered) and the metrics that learn tool names.
pub(super) struct Inspector<'a> {
    pub(super) policy: &'a watch::Receiver<Arc<Effective>>,
    pub(super) metrics: &'a Metrics,
}

impl Inspector<'_> {
    /// Inspects one message the upstream sent back. Returns a replacement when the
    /// message must change (a filtered tools/list result).
    pub(super) fn inspect_answer(&self, msg: &Value, tracker: &mut Tracker, caller: &Caller) -> Option<Value> {
        // Only answers (no `method`) settle or match a request: a server's own request
        // to the client may carry any id, also one of the client's.
        let key = msg.get("id").filter(|_| msg.get("method").is_none()).map(id_key);
        if let Some(k) = &key
            && let Some(r) = tracker.calls.remove(k)
        {
            settle(r, msg.get("error").is_some());
            return None;
        }
        let tracked_list = key.as_ref().is_some_and(|k| tracker.lists.remove(k).is_some());
        // Untracked answers that look like a tools/list result (e.g. replayed on a
        // resumed stream) are filtered too: a hidden tool must never be shown.
        let tools = msg.get("result").and_then(|r| r.get("tools")).and_then(Value::as_array)?;
        if !tracked_list && !tools.iter().all(|t| t.get("name").is_some_and(Value::is_string)) {
            return None;
        }
        let policy = self.policy.borrow().clone();
        self.metrics.learn_tools(tools.iter().filter_map(|t| t.get("name").and_then(Value::as_str)));
        let kept: Vec<Value> = tools
            .iter()
            .filter(|t| t.get("name").and_then(Value::as_str).is_some_and(|n| policy.lists_tool(n, caller)))
            .cloned()
            .collect();
        let mut out = msg.clone();
        out["result"]["tools"] = Value::Array(kept);
        Some(out)
    }

    /// Inspects a JSON answer body (one message or a batch). None = unchanged.
    pub(super) fn inspect_body(&self, body: &[u8], tracker: &mut Tracker, caller: &Caller) -> Option<Vec<u8>> {
        // The common answer, one message to a tracked tools/call, only needs its id and
        // whether it is an error: read just those (the rest is validated, not built).
        // Anything else (batches, duplicate keys, untracked ids, tools/list) takes the
        // full path below.
        if !tracker.calls.is_empty()
            && body.trim_ascii_start().first() == Some(&b'{')
            && let Ok(head) = serde_json::from_slice::<AnswerHead>(body)
            && !head.method
            && let Some(id) = &head.id
            && let Some(r) = tracker.calls.remove(&id_key(id))
        {
            settle(r, head.error);
            return None;
        }
        let value: Value = serde_json::from_slice(body).ok()?;
        let replaced = match &value {
            Value::Array(items) => {
                let mut changed = false;
                let out: Vec<Value> = items
                    .iter()
                    .map(|m| match self.inspect_answer(m, tracker, caller) {
                        Some(r) => {
                            changed = true;
                            r
                        }
                        None => m.clone(),
                    })
                    .collect();
                changed.then_some(Value::Array(out))
            }
            other => self.inspect_answer(other, tracker, caller),
        };
        replaced.and_then(|v| serde_json::to_vec(&v).ok())
    }
}

/// A JSON-RPC error means the call did not happen: give the quota back. A result, even
/// one with `isError`, spent it.
pub(super) fn settle(r: Held, error: bool) {
    if error { r.rollback() } else { r.commit() }
}

/// The parts of one answer message that settle a tracked call.
#[derive(serde::Deserialize)]
struct AnswerHead {
    #[serde(default)]
    id: Option<Value>,
    /// Present at all (even `null`), as `msg.get("error").is_some()` in `inspect_answer`.
    #[serde(default, deserialize_with = "present")]
    error: bool,
    /// A request of the server (any id), not an answer.
    #[serde(default, deserialize_with = "present")]
    method: bool,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    <serde::de::IgnoredAny as serde::Deserialize>::deserialize(d).map(|_| true)
}
