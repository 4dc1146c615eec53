//! Where limits are counted: the [`CounterStore`] trait.
//!
//! A store reserves **all** of one call's limits at once, or none (an atomic decision);
//! the [`Reservation`] it gives back is committed when the call succeeded upstream and
//! rolled back when it failed, so failed calls spend nothing. The in-process
//! [`Limiter`](crate::Limiter) is one store; `toolgate-counters` keeps the same counts in
//! Redis/Valkey so that every replica of a sidecar shares them.
//!
//! The trait is synchronous on purpose: a decision is pure and synchronous (this crate does
//! no I/O and has no async runtime), the local limiter answers in well under a microsecond
//! without boxing a future, and the proxy's gate decides inline. A store that does I/O
//! implements it with an adapter that waits for its own bounded-time async call (see
//! `toolgate-counters`), and answers [`StoreRefusal::Unavailable`] when it cannot decide,
//! which the policy turns into a `store_unavailable` refusal: never an admission.

use std::fmt;
use std::time::Duration;

use crate::StoreKind;
use crate::limiter::{Demand, Limiter, Refusal, Reservation};

/// Why a store did not admit a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreRefusal {
    /// A limit has no room (as [`crate::Limiter::reserve`] refuses).
    Limit(Refusal),
    /// The store could not decide (unreachable, slow past its bound, bad answer): the
    /// call is refused, with this text for the log and the agent.
    Unavailable(String),
}

/// Counts admissions for limits: reserve every demand of one call atomically, or none.
pub trait CounterStore: Send + Sync + fmt::Debug {
    /// Reserves every demand or none, at `now` (the caller's clock, a [`Duration`] since an
    /// arbitrary origin; stores with a clock of their own may ignore it). On success the
    /// units count immediately; the caller commits or rolls back the [`Reservation`].
    ///
    /// Demands of amount 0 are admitted without being recorded; a demand larger than its
    /// `max` is refused with no retry time. `retry_after` is exact: the earliest time at
    /// which the same demand fits.
    fn reserve(&self, demands: &[Demand], now: Duration) -> Result<Reservation, StoreRefusal>;
}

/// The units one reservation holds in some store.
pub trait Hold: Send + Sync + fmt::Debug {
    /// Keep the units spent.
    fn commit(self: Box<Self>);
    /// Give the units back.
    fn rollback(self: Box<Self>);
}

/// The store of a sidecar without a shared one: every limit is counted in `0` (this
/// process), except those of documents that ask for the shared store (`counters.store:
/// shared`): such a call is refused as [`StoreRefusal::Unavailable`] (fail closed), since
/// counting it here would let every replica admit `max` on its own.
#[derive(Clone, Debug, Default)]
pub struct LocalOnly(pub Limiter);

impl CounterStore for LocalOnly {
    fn reserve(&self, demands: &[Demand], now: Duration) -> Result<Reservation, StoreRefusal> {
        if let Some(d) = demands.iter().find(|d| d.amount > 0 && d.counters.store == Some(StoreKind::Shared)) {
            return Err(StoreRefusal::Unavailable(format!(
                "policy {:?} counts its limits in the shared store (counters.store: shared), and this sidecar has \
                 none: start it with --counter-store redis://…",
                d.key.policy
            )));
        }
        self.0.reserve(demands, now).map_err(StoreRefusal::Limit)
    }
}

/// An approval given with `reuse_for`, as remembered for identical calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RememberedApproval {
    /// The McpApproval's name.
    pub name: String,
    /// Who approved it, when known.
    pub decided_by: Option<String>,
}

/// Where approvals given with `reuse_for` are remembered so that every replica enforcing
/// the same policy reuses them (the proxy keeps its own memory besides). `key` identifies
/// what the approval covers (policy identity, rule, tool, grant, caller, argument digest);
/// stores hash it and never put its text in a key name.
pub trait ApprovalMemory: Send + Sync + fmt::Debug {
    /// Remembers `approval` under `key` for `window` (best effort: a store that cannot
    /// write it only means the call is asked about again elsewhere).
    fn remember(&self, key: &str, approval: &RememberedApproval, window: Duration);
    /// The approval remembered under `key` within its window. `None` when there is none
    /// **or the store cannot answer**: the call is then asked about again (fail closed).
    fn recall(&self, key: &str) -> Option<RememberedApproval>;
}
