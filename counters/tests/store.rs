//! The same properties against the local limiter and a real Redis (`redis-server` from
//! Debian, started on loopback by the test): exact sliding window with an injected clock,
//! reserve → commit/rollback, all-or-nothing, exact `retry_after`; then what only Redis
//! has: skewed sidecar clocks change nothing, many replicas never over-admit, a killed
//! store fails closed (or as `onStoreFailure` says) and a restarted one counts again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use proptest::prelude::*;
use tokio::runtime::Runtime;
use toolgate_counters::{OnFailure, RedisConfig, RedisCounters, SharedCounters, keys_for};
use toolgate_policy::{CounterKey, CounterStore, Demand, Limiter, Reservation, StoreRefusal};
use toolgate_tests::redis::{RedisCluster, RedisSentinel, RedisServer};

/// One multi-thread runtime driving every store of this test binary.
fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
    })
}

/// The redis shared by the tests that never stop it.
fn shared_redis() -> &'static RedisServer {
    static R: OnceLock<RedisServer> = OnceLock::new();
    R.get_or_init(|| RedisServer::start().expect("redis-server starts"))
}

static PREFIXES: AtomicU64 = AtomicU64::new(0);

/// A fresh key prefix: each case counts from zero.
fn prefix() -> String {
    format!("t{}-{}:", std::process::id(), PREFIXES.fetch_add(1, Ordering::Relaxed))
}

fn store(url: &str, test_clock: bool, on_failure: OnFailure, timeout: Duration) -> SharedCounters {
    let _g = runtime().enter();
    let cfg = RedisConfig { prefix: prefix(), timeout, test_clock, ..RedisConfig::new(url) };
    SharedCounters::new(RedisCounters::new(&cfg).expect("config"), on_failure).expect("in a runtime")
}

fn redis_store() -> SharedCounters {
    store(&shared_redis().url(), true, OnFailure::Closed, Duration::from_secs(10))
}

#[derive(Clone, Debug)]
enum Op {
    Reserve { advance_ms: u64, amount: u64, then: Then },
    Resolve { index: usize, commit: bool },
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

/// Every admission ever made, with what became of it.
#[derive(Default)]
struct Reference {
    history: Vec<(Duration, u64, State)>,
}

impl Reference {
    fn used(&self, now: Duration, window: Duration) -> u64 {
        self.history
            .iter()
            .filter(|(t, _, s)| *s != State::RolledBack && *t + window > now && *t <= now)
            .map(|(_, a, _)| a)
            .sum()
    }

    fn admits(&self, now: Duration, window: Duration, max: u64, amount: u64) -> bool {
        self.used(now, window) + amount <= max
    }

    /// No interval `[t, t + window)` holds more than `max` counted units.
    fn check_bound(&self, window: Duration, max: u64) -> Result<(), TestCaseError> {
        let counted: Vec<_> = self.history.iter().filter(|(_, _, s)| *s != State::RolledBack).collect();
        for (start, _, _) in &counted {
            let sum: u64 =
                counted.iter().filter(|(t, _, _)| t >= start && *t < *start + window).map(|(_, a, _)| a).sum();
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

/// The exact-window property on any store: it agrees with the full-history reference on
/// every decision, its `retry_after` is exactly when the call fits, rollbacks spend nothing.
fn exact_window(store: &dyn CounterStore, max: u64, window_ms: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let window = Duration::from_millis(window_ms);
    let key = CounterKey { policy: "ns/p".into(), counter: "c".into(), scope: "sha256:k".into() };
    let mut reference = Reference::default();
    let mut outstanding: Vec<(Reservation, usize)> = Vec::new();
    // Not zero: a real clock's origin is far away (and Redis scores are microseconds).
    let mut now = Duration::from_secs(1_700_000_000);
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
                match store.reserve(std::slice::from_ref(&demand), now) {
                    Ok(r) => {
                        prop_assert!(expected, "admitted {amount} at {now:?} but the reference refuses");
                        let h = reference.history.len();
                        let state = match then {
                            Then::Commit => {
                                r.commit();
                                State::Committed
                            }
                            Then::Rollback => {
                                r.rollback();
                                State::RolledBack
                            }
                            Then::Keep => {
                                outstanding.push((r, h));
                                State::Outstanding
                            }
                        };
                        reference.history.push((now, amount, state));
                    }
                    Err(StoreRefusal::Unavailable(why)) => prop_assert!(false, "store unavailable: {why}"),
                    Err(StoreRefusal::Limit(refusal)) => {
                        prop_assert!(!expected, "refused {amount} at {now:?}, but admitting it breaks no interval");
                        prop_assert_eq!(refusal.index, 0);
                        if amount > max {
                            prop_assert_eq!(refusal.retry_after, None, "an oversized call never fits");
                        } else {
                            let retry = refusal.retry_after.expect("a call within max fits again later");
                            prop_assert!(
                                reference.admits(now + retry, window, max, amount),
                                "still no room after retry_after {retry:?}"
                            );
                            if retry > Duration::from_millis(1) {
                                let earlier = now + retry - Duration::from_millis(1);
                                prop_assert!(
                                    !reference.admits(earlier, window, max, amount),
                                    "retry_after {retry:?} is later than needed"
                                );
                            }
                        }
                    }
                }
            }
        }
        reference.check_bound(window, max)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn local_exact_window(max in 1u64..=5, window_ms in 1u64..=2_000, ops in prop::collection::vec(op(), 1..60)) {
        exact_window(&Limiter::default(), max, window_ms, ops)?;
    }

    #[test]
    fn redis_exact_window(max in 1u64..=5, window_ms in 1u64..=2_000, ops in prop::collection::vec(op(), 1..60)) {
        exact_window(&redis_store(), max, window_ms, ops)?;
    }
}

/// Two limits of different windows on one call: all or nothing, the refusing index is
/// the one without room, and the other limit's unit is given back.
fn all_or_nothing(store: &dyn CounterStore) {
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
    let both = [minute.clone(), hour];
    let t0 = 1_700_000_000;
    for t in [0, 1, 61, 62] {
        let r = store.reserve(&both, Duration::from_secs(t0 + t));
        if t == 62 {
            let Err(StoreRefusal::Limit(refusal)) = r else { panic!("the hour counter is full after 3") };
            assert_eq!(refusal.index, 1);
            assert_eq!(refusal.retry_after, Some(Duration::from_secs(3600 - 62)));
        } else {
            r.expect("room").commit();
        }
    }
    // The minute counter's unit of the refused call was given back: 1 used, 1 free.
    store.reserve(std::slice::from_ref(&minute), Duration::from_secs(t0 + 63)).expect("one left").commit();
    assert!(store.reserve(std::slice::from_ref(&minute), Duration::from_secs(t0 + 64)).is_err());
}

#[test]
fn local_all_or_nothing() {
    all_or_nothing(&Limiter::default());
}

#[test]
fn redis_all_or_nothing() {
    all_or_nothing(&redis_store());
}

fn one(max: u64, window: Duration) -> Demand {
    Demand {
        key: CounterKey { policy: "p".into(), counter: "c".into(), scope: "".into() },
        window,
        max,
        amount: 1,
        counters: Default::default(),
    }
}

/// Sidecars whose clocks are 30 s apart (more than the 20 s window) admit exactly `max`
/// together: the script reads the server's TIME, and what a sidecar passes as `now` changes
/// nothing. (Were the sidecars' clocks used, the one 30 s ahead would see every earlier
/// admission expired and admit `max` more.)
#[test]
fn skewed_sidecar_clocks_change_nothing() {
    let url = shared_redis().url();
    let a = store(&url, false, OnFailure::Closed, Duration::from_secs(10));
    // One key space: three replicas of one sidecar.
    let replicas = [a.clone(), a.clone(), a];
    let skew = Duration::from_secs(30);
    let d = [one(10, Duration::from_secs(20))];
    let base = Duration::from_secs(1_700_000_000);
    let mut admitted = 0;
    for round in 0..30u64 {
        let i = (round % 3) as usize;
        // Replica 0 is on time, 1 runs 30 s behind, 2 runs 30 s ahead.
        let now = match i {
            0 => base,
            1 => base - skew,
            _ => base + skew,
        };
        if let Ok(r) = replicas[i].reserve(&d, now) {
            r.commit();
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10, "exactly max over all replicas, whatever their clocks say");
}

/// 32 threads over 3 store handles (as 3 replicas would be) admit exactly `max`.
#[test]
fn concurrent_replicas_never_over_admit() {
    let url = shared_redis().url();
    let first = store(&url, false, OnFailure::Closed, Duration::from_secs(10));
    let replicas: Vec<SharedCounters> = {
        // Separate connections, one key space: build two more with the first's prefix.
        let prefix = first.redis().prefix().to_owned();
        let mk = || {
            let _g = runtime().enter();
            let cfg =
                RedisConfig { prefix: prefix.clone(), timeout: Duration::from_secs(10), ..RedisConfig::new(&url) };
            SharedCounters::new(RedisCounters::new(&cfg).unwrap(), OnFailure::Closed).unwrap()
        };
        vec![first.clone(), mk(), mk()]
    };
    let admitted = AtomicU64::new(0);
    let d = one(37, Duration::from_secs(3600));
    std::thread::scope(|s| {
        for t in 0..32usize {
            let replica = &replicas[t % 3];
            let admitted = &admitted;
            let d = &d;
            s.spawn(move || {
                for i in 0..4u64 {
                    if let Ok(r) = replica.reserve(std::slice::from_ref(d), Duration::ZERO) {
                        // Some calls fail upstream: they give their unit back.
                        if (t as u64 + i).is_multiple_of(5) {
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
    // Rollbacks outside a runtime are synchronous: every unit given back is free again.
    let mut extra = 0;
    while replicas[0].reserve(std::slice::from_ref(&d), Duration::ZERO).map(Reservation::commit).is_ok() {
        extra += 1;
        assert!(extra <= 37, "never more than max");
    }
    assert_eq!(admitted.load(Ordering::Relaxed) + extra, 37, "exactly max admitted over all replicas");
}

/// Calls without limits (or spending 0) never reach Redis, even when it is down.
#[test]
fn calls_without_limits_never_touch_redis() {
    let s = store("redis://127.0.0.1:1", false, OnFailure::Closed, Duration::from_millis(200));
    let zero = Demand { amount: 0, ..one(1, Duration::from_secs(60)) };
    s.reserve(&[], Duration::ZERO).expect("no limits").commit();
    s.reserve(&[zero], Duration::ZERO).expect("nothing to spend").commit();
    assert_eq!(s.redis().round_trips(), 0);
}

/// Keys are namespaced and expire: after a commit both keys of the limit exist with a TTL
/// no longer than the window plus a second.
#[test]
fn keys_carry_the_prefix_and_expire() {
    let r = shared_redis();
    let s = store(&r.url(), false, OnFailure::Closed, Duration::from_secs(10));
    let d = one(5, Duration::from_secs(60));
    s.reserve(std::slice::from_ref(&d), Duration::ZERO).unwrap().commit();
    let (set, sum) = keys_for(s.redis().prefix(), &d.key);
    for k in [&set, &sum] {
        let ttl = r.command(&format!("PTTL {k}")).unwrap();
        let ms: i64 = ttl.lines().next().unwrap().trim_start_matches(':').parse().unwrap();
        assert!(ms > 0 && ms <= 61_000, "{k}: PTTL {ms}");
    }
    assert!(r.command(&format!("GET {sum}")).unwrap().contains("\r\n1\r\n"));
}

/// Redis killed: limited calls fail closed within the bound (never admitted); with
/// `onStoreFailure: local` they are counted here against max / replicas; `open` admits.
/// Restarted (empty): counting resumes.
#[test]
fn killed_store_fails_closed_and_restarted_store_counts_again() {
    let mut r = RedisServer::start().unwrap();
    let timeout = Duration::from_millis(300);
    let closed = store(&r.url(), false, OnFailure::Closed, timeout);
    let local = store(&r.url(), false, OnFailure::Local { replicas: 3 }, timeout);
    let open = store(&r.url(), false, OnFailure::Open, timeout);
    let d = [one(7, Duration::from_secs(3600))];
    closed.reserve(&d, Duration::ZERO).expect("store up").commit();
    assert!(closed.redis().is_up());

    r.kill();
    for _ in 0..3 {
        match closed.reserve(&d, Duration::ZERO) {
            Err(StoreRefusal::Unavailable(why)) => assert!(!why.is_empty()),
            other => panic!("must fail closed, got {other:?}"),
        }
    }
    assert!(!closed.redis().is_up());
    assert!(closed.redis().errors() >= 3);
    // local: 7 / 3 = 2 per replica while the store is down.
    let mut n = 0;
    while local.reserve(&d, Duration::ZERO).map(Reservation::commit).is_ok() {
        n += 1;
        assert!(n <= 7);
    }
    assert_eq!(n, 2, "max / replicas, rounded down");
    for _ in 0..10 {
        open.reserve(&d, Duration::ZERO).expect("open admits").commit();
    }

    r.restart().unwrap();
    // The connection manager reconnects on its own (with back-off): poll, bounded.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut back = 0;
    while back == 0 {
        assert!(std::time::Instant::now() < deadline, "the store never came back");
        if let Ok(res) = closed.reserve(&d, Duration::ZERO) {
            res.commit();
            back = 1;
        } else {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // The restarted server is empty: 6 more fit, then the limit holds again.
    let mut more = 0;
    while closed.reserve(&d, Duration::ZERO).map(Reservation::commit).is_ok() {
        more += 1;
        assert!(more <= 7);
    }
    assert_eq!(back + more, 7, "counting resumed at max");
    assert!(closed.redis().is_up());
}

/// A password is sent (AUTH); a wrong one is an error, so limited calls fail closed.
#[test]
fn password_is_used_and_a_wrong_one_fails_closed() {
    let r = RedisServer::start_with(Some("s3cret")).unwrap();
    let mk = |pw: &str| {
        let _g = runtime().enter();
        let cfg = RedisConfig {
            password: Some(pw.into()),
            prefix: prefix(),
            timeout: Duration::from_secs(5),
            ..RedisConfig::new(r.url())
        };
        SharedCounters::new(RedisCounters::new(&cfg).unwrap(), OnFailure::Closed).unwrap()
    };
    let d = [one(1, Duration::from_secs(60))];
    mk("s3cret").reserve(&d, Duration::ZERO).expect("authenticated").commit();
    assert!(matches!(mk("wrong").reserve(&d, Duration::ZERO), Err(StoreRefusal::Unavailable(_))));
}

/// `rediss://` with the store's CA given: counts; with the platform's roots instead (which
/// do not know the test CA): the TLS handshake fails, so limited calls fail closed.
#[test]
fn tls_with_a_private_ca_and_fail_closed_on_an_unknown_certificate() {
    toolgate_tests::install_crypto_provider();
    let ca = toolgate_tests::TestCa::new("toolgate test redis CA").unwrap();
    let pair = ca.server_cert(&["localhost"]).unwrap();
    let r = RedisServer::start_tls(&pair.cert_pem, &pair.key_pem).unwrap();
    let url = r.tls_url().unwrap();
    let mk = |ca_pem: Option<Vec<u8>>| {
        let _g = runtime().enter();
        let cfg = RedisConfig { ca_pem, prefix: prefix(), timeout: Duration::from_secs(5), ..RedisConfig::new(&url) };
        SharedCounters::new(RedisCounters::new(&cfg).unwrap(), OnFailure::Closed).unwrap()
    };
    let d = [one(1, Duration::from_secs(60))];
    let trusted = mk(Some(ca.cert_pem().as_bytes().to_vec()));
    trusted.reserve(&d, Duration::ZERO).expect("TLS with the CA").commit();
    assert!(matches!(trusted.reserve(&d, Duration::ZERO), Err(StoreRefusal::Limit(_))), "counted over TLS");
    assert!(matches!(mk(None).reserve(&d, Duration::ZERO), Err(StoreRefusal::Unavailable(_))));
}

/// Inside a current-thread runtime the adapter cannot wait for Redis: it refuses
/// (`Unavailable`), never panics and never admits.
#[test]
fn current_thread_runtime_fails_closed_without_panicking() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let url = shared_redis().url();
    let outcome = rt.block_on(async move {
        let cfg = RedisConfig { prefix: prefix(), ..RedisConfig::new(url) };
        let s = SharedCounters::new(RedisCounters::new(&cfg).unwrap(), OnFailure::Closed).unwrap();
        s.reserve(&[one(5, Duration::from_secs(60))], Duration::ZERO).map(Reservation::commit)
    });
    let Err(StoreRefusal::Unavailable(why)) = outcome else { panic!("must fail closed: {outcome:?}") };
    assert!(why.contains("multi-thread"), "{why}");
}

fn limit(policy: &str, counter: &str, max: u64) -> Demand {
    Demand {
        key: CounterKey { policy: policy.into(), counter: counter.into(), scope: "".into() },
        window: Duration::from_secs(3600),
        max,
        amount: 1,
        counters: Default::default(),
    }
}

/// A real 3-master Redis Cluster (`redis+cluster://`): one document's limits share a slot
/// (one script), two documents' limits live in different slots (one script each, the
/// earlier given back when a later refuses); 16 threads over 2 handles admit exactly max.
#[test]
fn redis_cluster_counts_exactly_across_slots() {
    let cluster = RedisCluster::start().expect("redis-server and redis-cli (apt-get install redis-server)");
    let url = cluster.url();
    let a = store(&url, false, OnFailure::Closed, Duration::from_secs(10));
    let b = {
        let _g = runtime().enter();
        let cfg = RedisConfig {
            prefix: a.redis().prefix().to_owned(),
            timeout: Duration::from_secs(10),
            ..RedisConfig::new(&url)
        };
        SharedCounters::new(RedisCounters::new(&cfg).unwrap(), OnFailure::Closed).unwrap()
    };
    assert!(a.redis().is_cluster());
    let call = [limit("ns/a", "minute", 5), limit("ns/a", "hour", 7), limit("ns/b", "all", 4)];
    let slot = |d: &Demand| {
        let (k, _) = keys_for(a.redis().prefix(), &d.key);
        cluster.command(0, &format!("CLUSTER KEYSLOT {k}")).unwrap().lines().next().unwrap().to_owned()
    };
    assert_eq!(slot(&call[0]), slot(&call[1]), "one document, one slot");
    assert_ne!(slot(&call[0]), slot(&call[2]), "two documents, two slots (a single script would get CROSSSLOT)");

    let mut admitted = 0;
    for i in 0..10 {
        let s = if i % 2 == 0 { &a } else { &b };
        match s.reserve(&call, Duration::ZERO) {
            Ok(r) => {
                r.commit();
                admitted += 1;
            }
            Err(StoreRefusal::Limit(r)) => {
                assert_eq!(r.index, 2, "ns/b's limit of 4 is the one without room");
                assert!(r.retry_after.is_some());
                break;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(admitted, 4);
    // The refused call gave back what ns/a had reserved: 5 - 4 = 1 more fits there.
    let only_a = [call[0].clone(), call[1].clone()];
    a.reserve(&only_a, Duration::ZERO).expect("one unit left in ns/a's minute limit").commit();
    assert!(matches!(b.reserve(&only_a, Duration::ZERO), Err(StoreRefusal::Limit(r)) if r.index == 0));

    // Concurrent replicas on the cluster: exactly max.
    let d = limit("ns/c", "burst", 11);
    let ok = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..16usize {
            let (replica, ok, d) = (if t % 2 == 0 { &a } else { &b }, &ok, &d);
            s.spawn(move || {
                for _ in 0..3 {
                    if let Ok(r) = replica.reserve(std::slice::from_ref(d), Duration::ZERO) {
                        ok.fetch_add(1, Ordering::Relaxed);
                        r.commit();
                    }
                }
            });
        }
    });
    assert_eq!(ok.load(Ordering::Relaxed), 11, "exactly max over both handles");
}

/// One master and a Sentinel (`redis+sentinel://…/<master>`): the store is found through
/// the Sentinel and counts there; the master down → fail closed; back → counting resumes.
#[test]
fn sentinel_finds_the_master_and_a_lost_master_fails_closed() {
    let mut s = RedisSentinel::start().expect("redis-server (apt-get install redis-server)");
    assert!(!s.url().contains(&s.master.port().to_string()), "the URL names only the Sentinel");
    let st = store(&s.url(), false, OnFailure::Closed, Duration::from_secs(2));
    let d = [limit("ns/p", "starts", 3)];
    for _ in 0..3 {
        st.reserve(&d, Duration::ZERO).expect("room").commit();
    }
    assert!(matches!(st.reserve(&d, Duration::ZERO), Err(StoreRefusal::Limit(_))));
    let (_, sum) = keys_for(st.redis().prefix(), &d[0].key);
    assert!(s.master.command(&format!("GET {sum}")).unwrap().contains("\r\n3\r\n"), "counted on the master");

    s.master.kill();
    assert!(matches!(st.reserve(&d, Duration::ZERO), Err(StoreRefusal::Unavailable(_))), "fail closed");
    s.master.restart().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(std::time::Instant::now() < deadline, "never reconnected through the Sentinel");
        match st.reserve(&d, Duration::ZERO) {
            Ok(r) => {
                r.commit();
                break;
            }
            Err(StoreRefusal::Unavailable(_)) => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => panic!("{e:?}"),
        }
    }
    s.stop_sentinel();
}
