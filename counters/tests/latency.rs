//! Decision latency of the Redis store against the local limiter, and Redis round trips
//! per decision (docs/benchmarks.md). Not part of `make test` (it measures, on a machine
//! others share); run it with
//! `cargo test --release -p toolgate-counters --test latency -- --ignored --nocapture`.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use toolgate_counters::{OnFailure, RedisConfig, RedisCounters, SharedCounters};
use toolgate_policy::{CounterKey, CounterStore, Demand, Limiter};

#[test]
#[ignore = "a measurement: run it on its own, in release mode"]
fn decision_latency_and_round_trips() {
    let r = toolgate_tests::redis::RedisServer::start().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let store = {
        let _g = rt.enter();
        SharedCounters::new(RedisCounters::new(&RedisConfig::new(r.url())).unwrap(), OnFailure::Closed).unwrap()
    };
    // Two limits per call, as a tool limit plus an all_tools limit; room never runs out.
    let limit = |counter: &str| Demand {
        key: CounterKey { policy: "bench".into(), counter: counter.into(), scope: "sha256:caller".into() },
        window: Duration::from_secs(1),
        max: 1_000_000,
        amount: 1,
        counters: Default::default(),
    };
    let demands = [limit("tool"), limit("all")];
    let (warmup, n) = (200u32, 3000u32);
    for _ in 0..warmup {
        store.reserve(&demands, Duration::ZERO).unwrap().commit();
    }
    let t = Instant::now();
    for _ in 0..n {
        store.reserve(&demands, Duration::ZERO).unwrap().commit();
    }
    let redis = t.elapsed() / n;
    let local = Limiter::default();
    let t = Instant::now();
    for i in 0..n {
        CounterStore::reserve(&local, &demands, Duration::from_micros(u64::from(i))).unwrap().commit();
    }
    let local = t.elapsed() / n;
    let trips = store.redis().round_trips();
    println!(
        "redis: {redis:?} per decision (2 limits); local: {local:?}; {trips} script calls for {} decisions",
        warmup + n
    );
    assert_eq!(trips, u64::from(warmup + n), "one round trip per decision");
}
