//! Property tests of the sliding-window limiter with an injected clock.
//!
//! A random sequence of (time advance, amount, commit/rollback) runs against one limit and
//! against a naive reference that keeps the full history. After every step:
//! - no half-open interval `[t, t + window)` holds more than `max` counted units
//!   (committed plus outstanding reservations; rolled-back ones count nothing), and
//! - the limiter refuses a call only if admitting it would break that bound, i.e. it agrees
//!   with the reference on every admission, and its `retry_after` is exactly when the same
//!   call would fit again.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use proptest::prelude::*;
use toolgate_policy::{CounterKey, Demand, Limiter, Reservation};

#[derive(Clone, Debug)]
enum Op {
    /// Advance the clock by this many ms, then try to reserve `amount`; the reservation
    /// is committed at once, rolled back at once, or kept outstanding.
    Reserve { advance_ms: u64, amount: u64, then: Then },
    /// Commit or roll back one outstanding reservation (index modulo their number).
    Resolve { index: usize, commit: bool },
    /// Only advance the clock.
    Advance { ms: u64 },
}

#[derive(Clone, Copy, Debug)]
enum Then {
    Commit,
    Rollback,
    Keep,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    Outstanding,
    Committed,
    RolledBack,
}

/// Full history of admissions: (time, amount, state).
#[derive(Default)]
struct Reference {
    history: Vec<(Duration, u64, State)>,
}

impl Reference {
    fn counted(&self) -> impl Iterator<Item = (Duration, u64)> + '_ {
        self.history.iter().filter(|(_, _, s)| *s != State::RolledBack).map(|(t, a, _)| (*t, *a))
    }

    /// Units counted in the interval `(now - window, now]`: every interval of length
    /// `window` that contains `now` holds at most these past units.
    fn used(&self, now: Duration, window: Duration) -> u64 {
        self.counted().filter(|(t, _)| *t + window > now && *t <= now).map(|(_, a)| a).sum()
    }

    fn admits(&self, now: Duration, window: Duration, max: u64, amount: u64) -> bool {
        self.used(now, window) + amount <= max
    }

    /// The invariant itself, checked on the whole history: intervals starting at an
    /// admission time are the fullest ones.
    fn check_bound(&self, window: Duration, max: u64) -> Result<(), TestCaseError> {
        let counted: Vec<_> = self.counted().collect();
        for (start, _) in &counted {
            let sum: u64 = counted.iter().filter(|(t, _)| t >= start && *t < *start + window).map(|(_, a)| a).sum();
            prop_assert!(sum <= max, "{sum} units in [{start:?}, +{window:?}) > max {max}");
        }
        Ok(())
    }
}

fn op() -> impl Strategy<Value = Op> {
    let then = prop_oneof![Just(Then::Commit), Just(Then::Rollback), Just(Then::Keep)];
    prop_oneof![
        6 => (0u64..700, 0u64..=6, then).prop_map(|(advance_ms, amount, then)| Op::Reserve { advance_ms, amount, then }),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(index, commit)| Op::Resolve { index, commit }),
        1 => (0u64..2_500).prop_map(|ms| Op::Advance { ms }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn exact_sliding_window(max in 1u64..=5, window_ms in 1u64..=2_000, ops in prop::collection::vec(op(), 1..80)) {
        let window = Duration::from_millis(window_ms);
        let limiter = Limiter::default();
        let key = CounterKey { policy: "p".into(), counter: "c".into(), scope: "k".into() };
        let mut reference = Reference::default();
        let mut outstanding: Vec<(Reservation, usize)> = Vec::new();
        let mut now = Duration::ZERO;

        for op in ops {
            match op {
                Op::Advance { ms } => now += Duration::from_millis(ms),
                Op::Resolve { index, commit } => {
                    if !outstanding.is_empty() {
                        let (r, h) = outstanding.swap_remove(index % outstanding.len());
                        if commit {
                            r.commit();
                            reference.history[h].2 = State::Committed;
                        } else {
                            r.rollback();
                            reference.history[h].2 = State::RolledBack;
                        }
                    }
                }
                Op::Reserve { advance_ms, amount, then } => {
                    now += Duration::from_millis(advance_ms);
                    let demand = Demand { key: key.clone(), window, max, amount, counters: Default::default() };
                    let expected = reference.admits(now, window, max, amount);
                    match limiter.reserve(std::slice::from_ref(&demand), now) {
                        Ok(r) => {
                            prop_assert!(expected, "admitted {amount} at {now:?} but the reference refuses");
                            // Zero-unit calls record nothing.
                            let h = reference.history.len();
                            let state = match then {
                                Then::Commit => { r.commit(); State::Committed }
                                Then::Rollback => { r.rollback(); State::RolledBack }
                                Then::Keep => { outstanding.push((r, h)); State::Outstanding }
                            };
                            reference.history.push((now, amount, state));
                        }
                        Err(refusal) => {
                            prop_assert!(!expected, "refused {amount} at {now:?}, but admitting it breaks no interval");
                            prop_assert_eq!(refusal.index, 0);
                            if amount > max {
                                prop_assert_eq!(refusal.retry_after, None, "an oversized call never fits");
                            } else {
                                let retry = refusal.retry_after.expect("a call within max fits again later");
                                prop_assert!(reference.admits(now + retry, window, max, amount),
                                    "still no room after retry_after {retry:?}");
                                if retry > Duration::from_millis(1) {
                                    let earlier = now + retry - Duration::from_millis(1);
                                    prop_assert!(!reference.admits(earlier, window, max, amount),
                                        "retry_after {retry:?} is later than needed");
                                }
                            }
                        }
                    }
                }
            }
            reference.check_bound(window, max)?;
            prop_assert_eq!(limiter.used(&key, now), reference.used(now, window));
        }

        // Idle keys are evicted once everything expired (outstanding ones too: a dropped
        // reservation stays spent until its window passes).
        drop(outstanding);
        limiter.sweep_all(now + window);
        prop_assert_eq!(limiter.len(), 0);
    }
}

/// Two limits of different windows on one call: all or nothing, and the refusing index
/// is the one without room.
#[test]
fn reserve_is_all_or_nothing() {
    let limiter = Limiter::default();
    let minute = Demand {
        key: CounterKey { policy: "p".into(), counter: "minute".into(), scope: "".into() },
        window: Duration::from_secs(60),
        max: 2,
        amount: 1,
        counters: Default::default(),
    };
    let hour = Demand {
        key: CounterKey { policy: "p".into(), counter: "hour".into(), scope: "".into() },
        window: Duration::from_secs(3600),
        max: 3,
        amount: 1,
        counters: Default::default(),
    };
    let both = [minute.clone(), hour.clone()];
    for t in [0, 1, 61, 62] {
        let r = limiter.reserve(&both, Duration::from_secs(t));
        if t == 62 {
            let refusal = r.expect_err("the hour counter is full after 3");
            assert_eq!(refusal.index, 1);
            assert_eq!(limiter.used(&minute.key, Duration::from_secs(62)), 1, "minute unit given back");
        } else {
            r.expect("room").commit();
        }
    }
}
