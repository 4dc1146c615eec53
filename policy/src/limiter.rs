//! Exact sliding-window counters with reserve → commit/rollback.
//!
//! Each counter key keeps the admissions of the last `window` (time, units). A call is
//! admitted only if the units admitted in `(now - window, now]` plus its own stay within
//! `max`, so no interval `[t, t + window)` ever holds more than `max` units. The common
//! fixed-window limiters reset at a boundary and admit up to 2 × max around it; this one
//! does not. Memory per key is bounded by `max` entries, keys whose entries all expired
//! are swept, and the number of keys is capped (new keys are refused past the cap:
//! failing closed beats unbounded memory).
//!
//! Time is passed in as a [`Duration`] since an arbitrary origin, so tests inject it.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;

// foldhash is randomly seeded per process, so callers cannot aim collisions at one
// bucket, and it is several times cheaper than SipHash on these short keys.
use foldhash::fast::RandomState;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub use crate::store::{CounterStore, Hold, StoreRefusal};

const SHARDS: usize = 32;
/// Sweep a shard for idle keys every this many reservations on it.
const SWEEP_EVERY: u32 = 4096;
/// Default cap on live counter keys.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

/// Identifies one counter: document, counter name and scope key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CounterKey {
    /// Policy document name.
    pub policy: Arc<str>,
    /// Counter name within the document.
    pub counter: Arc<str>,
    /// Scope key (grant name, identity, session id, or empty for global).
    pub scope: Box<str>,
}

/// One limit to reserve against.
#[derive(Clone, Debug)]
pub struct Demand {
    /// Which counter.
    pub key: CounterKey,
    /// Window length.
    pub window: Duration,
    /// Units allowed per window.
    pub max: u64,
    /// Units this call spends.
    pub amount: u64,
    /// The document's choice of store and failure behaviour (`counters`): stores that
    /// count in one place ignore it; the proxy's shared store routes by it.
    pub counters: crate::CounterSettings,
}

/// Why a reservation was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Index of the refusing demand in the slice given to [`Limiter::reserve`].
    pub index: usize,
    /// When a call of the same size could pass again; `None` when it never can
    /// (it is larger than `max`) or the limiter is full.
    pub retry_after: Option<Duration>,
}

#[derive(Debug, Default)]
struct Window {
    entries: VecDeque<Entry>,
    sum: u64,
    window: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    at: Duration,
    amount: u64,
    id: u64,
}

impl Window {
    fn expire(&mut self, now: Duration) {
        while let Some(front) = self.entries.front() {
            if front.at + self.window <= now {
                self.sum -= front.amount;
                self.entries.pop_front();
            } else {
                break;
            }
        }
    }

    /// Time until enough units expire for `amount` more to fit under `max`.
    fn retry_after(&self, now: Duration, amount: u64, max: u64) -> Option<Duration> {
        if amount > max {
            return None;
        }
        let mut excess = (self.sum + amount).saturating_sub(max);
        for e in &self.entries {
            excess = excess.saturating_sub(e.amount);
            if excess == 0 {
                return Some((e.at + self.window).saturating_sub(now).max(Duration::from_millis(1)));
            }
        }
        None
    }
}

#[derive(Debug, Default)]
struct Shard {
    map: HashMap<CounterKey, Window, RandomState>,
    ops: u32,
}

/// Shared, thread-safe counter state. Cheap to clone (an `Arc`).
#[derive(Clone, Debug)]
pub struct Limiter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
    next_id: AtomicU64,
    keys: AtomicUsize,
    max_keys: usize,
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_KEYS)
    }
}

impl Limiter {
    /// A limiter holding at most `max_keys` live counters.
    pub fn new(max_keys: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
                hasher: RandomState::default(),
                next_id: AtomicU64::new(1),
                keys: AtomicUsize::new(0),
                max_keys,
            }),
        }
    }

    /// Live counter keys (for metrics and tests).
    pub fn len(&self) -> usize {
        self.inner.keys.load(Ordering::Relaxed)
    }

    /// Whether no counter is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &CounterKey) -> MutexGuard<'_, Shard> {
        let i = (self.inner.hasher.hash_one(key) as usize) % SHARDS;
        // A poisoned lock only means another thread panicked mid-update of plain data
        // whose invariants are re-established by `expire`; keep serving.
        self.inner.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves every demand or none. On success the units count immediately; call
    /// [`Reservation::rollback`] if the call did not complete, so it spends nothing.
    pub fn reserve(&self, demands: &[Demand], now: Duration) -> Result<Reservation, Refusal> {
        let mut held = Vec::with_capacity(demands.len());
        for (index, d) in demands.iter().enumerate() {
            match self.reserve_one(d, now) {
                Ok(Some(id)) => held.push((d.key.clone(), id)),
                Ok(None) => {}
                Err(retry_after) => {
                    for (key, id) in held {
                        self.release(&key, id);
                    }
                    return Err(Refusal { index, retry_after });
                }
            }
        }
        if held.is_empty() {
            return Ok(Reservation::none());
        }
        Ok(Reservation::new(Box::new(LocalHold { limiter: self.clone(), held })))
    }

    /// Ok(Some(id)) admitted with an entry; Ok(None) admitted, nothing to record (0 units).
    fn reserve_one(&self, d: &Demand, now: Duration) -> Result<Option<u64>, Option<Duration>> {
        if d.amount > d.max {
            return Err(None);
        }
        if d.amount == 0 {
            return Ok(None);
        }
        let mut shard = self.shard(&d.key);
        shard.ops = shard.ops.wrapping_add(1);
        if shard.ops.is_multiple_of(SWEEP_EVERY) {
            self.sweep(&mut shard, now);
        }
        let w = match shard.map.get_mut(&d.key) {
            Some(w) => w,
            None => {
                if self.inner.keys.load(Ordering::Relaxed) >= self.inner.max_keys {
                    return Err(None);
                }
                self.inner.keys.fetch_add(1, Ordering::Relaxed);
                shard.map.entry(d.key.clone()).or_insert_with(|| Window { window: d.window, ..Window::default() })
            }
        };
        // Counters shared by name always have one window (validated at compile time);
        // after a policy change the newest window applies.
        w.window = d.window;
        w.expire(now);
        if w.sum + d.amount > d.max {
            return Err(w.retry_after(now, d.amount, d.max));
        }
        // Entries stay ordered by time even if callers' clocks interleave: a late
        // caller's entry is recorded at the newest time, which only keeps it longer.
        let at = w.entries.back().map_or(now, |b| b.at.max(now));
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        w.entries.push_back(Entry { at, amount: d.amount, id });
        w.sum += d.amount;
        Ok(Some(id))
    }

    fn release(&self, key: &CounterKey, id: u64) {
        let mut shard = self.shard(key);
        if let Some(w) = shard.map.get_mut(key)
            && let Some(pos) = w.entries.iter().rposition(|e| e.id == id)
            && let Some(e) = w.entries.remove(pos)
        {
            w.sum -= e.amount;
        }
    }

    fn sweep(&self, shard: &mut Shard, now: Duration) {
        let before = shard.map.len();
        shard.map.retain(|_, w| {
            w.expire(now);
            !w.entries.is_empty()
        });
        let removed = before - shard.map.len();
        self.inner.keys.fetch_sub(removed, Ordering::Relaxed);
    }

    /// Drops every counter whose admissions have all expired.
    pub fn sweep_all(&self, now: Duration) {
        for s in &self.inner.shards {
            let mut shard = s.lock().unwrap_or_else(|p| p.into_inner());
            self.sweep(&mut shard, now);
        }
    }

    /// Units currently counted for `key` at `now` (for tests and `/policy` debugging).
    pub fn used(&self, key: &CounterKey, now: Duration) -> u64 {
        let mut shard = self.shard(key);
        shard.map.get_mut(key).map_or(0, |w| {
            w.expire(now);
            w.sum
        })
    }
}

/// Units held for one admitted call, by whichever [`CounterStore`] admitted it. Dropping
/// it keeps them spent (the safe default); [`Reservation::rollback`] gives them back when
/// the upstream call failed.
#[derive(Debug)]
#[must_use = "a reservation should be rolled back if the call fails"]
pub struct Reservation {
    hold: Option<Box<dyn Hold>>,
}

impl Reservation {
    /// A reservation holding nothing (no limits applied). The argument is kept for
    /// compatibility; any store's empty reservation is the same.
    pub fn empty(_limiter: &Limiter) -> Self {
        Self::none()
    }

    /// A reservation holding nothing.
    pub fn none() -> Self {
        Self { hold: None }
    }

    /// A reservation whose units `hold` gives back on rollback (for [`CounterStore`]s
    /// outside this crate).
    pub fn new(hold: Box<dyn Hold>) -> Self {
        Self { hold: Some(hold) }
    }

    /// Keeps the units spent.
    pub fn commit(self) {
        if let Some(h) = self.hold {
            h.commit();
        }
    }

    /// Gives the units back: the call did not complete upstream.
    pub fn rollback(self) {
        if let Some(h) = self.hold {
            h.rollback();
        }
    }
}

/// What the local limiter holds for one reservation.
#[derive(Debug)]
struct LocalHold {
    limiter: Limiter,
    held: Vec<(CounterKey, u64)>,
}

impl Hold for LocalHold {
    fn commit(self: Box<Self>) {}

    fn rollback(self: Box<Self>) {
        for (key, id) in &self.held {
            self.limiter.release(key, *id);
        }
    }
}

impl CounterStore for Limiter {
    fn reserve(&self, demands: &[Demand], now: Duration) -> Result<Reservation, StoreRefusal> {
        Limiter::reserve(self, demands, now).map_err(StoreRefusal::Limit)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(s: &str) -> CounterKey {
        CounterKey { policy: "p".into(), counter: "c".into(), scope: s.into() }
    }

    fn demand(max: u64, window_s: u64) -> Demand {
        Demand { key: key("k"), window: Duration::from_secs(window_s), max, amount: 1, counters: Default::default() }
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn admits_max_then_refuses_with_retry_after() {
        let l = Limiter::default();
        let d = [demand(3, 60)];
        for t in [0, 10, 20] {
            l.reserve(&d, S(t)).expect("room").commit();
        }
        let r = l.reserve(&d, S(30)).unwrap_err();
        assert_eq!(r.retry_after, Some(S(30)), "the entry at 0 expires at 60");
        l.reserve(&d, S(60)).expect("entry at 0 expired").commit();
    }

    #[test]
    fn fixed_window_boundary_burst_is_refused() {
        // A fixed-window limiter with max 10/min admits 10 at 0:59 and 10 more at 1:00.
        let l = Limiter::default();
        let d = [demand(10, 60)];
        for _ in 0..10 {
            l.reserve(&d, Duration::from_millis(59_900)).expect("room").commit();
        }
        assert!(l.reserve(&d, Duration::from_millis(60_100)).is_err());
        assert!(l.reserve(&d, Duration::from_millis(119_899)).is_err());
        assert!(l.reserve(&d, Duration::from_millis(119_900)).is_ok());
    }

    #[test]
    fn rollback_gives_units_back() {
        let l = Limiter::default();
        let d = [demand(1, 60)];
        l.reserve(&d, S(0)).expect("room").rollback();
        l.reserve(&d, S(1)).expect("rolled back").commit();
        assert!(l.reserve(&d, S(2)).is_err());
    }

    #[test]
    fn all_or_nothing_across_demands() {
        let l = Limiter::default();
        let a = Demand { key: key("a"), ..demand(5, 60) };
        let b = Demand { key: key("b"), ..demand(1, 60) };
        l.reserve(std::slice::from_ref(&b), S(0)).expect("room").commit();
        let r = l.reserve(&[a.clone(), b], S(1)).unwrap_err();
        assert_eq!(r.index, 1);
        assert_eq!(l.used(&a.key, S(1)), 0, "a was released when b refused");
    }

    #[test]
    fn oversized_amount_never_fits() {
        let l = Limiter::default();
        let d = [Demand { amount: 11, ..demand(10, 60) }];
        assert_eq!(l.reserve(&d, S(0)).unwrap_err().retry_after, None);
    }

    #[test]
    fn idle_keys_are_swept_and_key_count_is_capped() {
        let l = Limiter::new(100);
        for i in 0..100 {
            let d = [Demand { key: key(&i.to_string()), ..demand(1, 1) }];
            l.reserve(&d, S(0)).expect("room").commit();
        }
        let extra = [Demand { key: key("extra"), ..demand(1, 1) }];
        assert!(l.reserve(&extra, S(0)).is_err(), "cap reached: fail closed");
        l.sweep_all(S(5));
        assert_eq!(l.len(), 0);
        assert!(l.reserve(&extra, S(5)).is_ok());
    }

    #[test]
    fn concurrent_hammering_never_over_admits() {
        let l = Limiter::default();
        let admitted = AtomicU64::new(0);
        let d = demand(1000, 3600);
        std::thread::scope(|s| {
            for _ in 0..32 {
                s.spawn(|| {
                    for i in 0..200u64 {
                        if let Ok(r) = l.reserve(std::slice::from_ref(&d), Duration::from_millis(i)) {
                            if i % 7 == 0 {
                                r.rollback();
                            } else {
                                admitted.fetch_add(1, Ordering::Relaxed);
                                r.commit();
                            }
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 1000, "exactly max admitted, 0 over");
        assert_eq!(l.used(&d.key, S(1)), 1000);
    }
}
