//! The policy's side of the `CounterStore` contract: a store that cannot decide makes a
//! limited call `store_unavailable` (refused, nothing held), and calls without limits (or
//! spending nothing) never reach the store.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use toolgate_policy::{Call, Caller, CounterStore, DecisionKind, Demand, Policy, Reservation, StoreRefusal};

/// A store that is always down, and counts how often it was asked.
#[derive(Debug, Default)]
struct Down {
    asked: AtomicUsize,
}

impl CounterStore for Down {
    fn reserve(&self, _: &[Demand], _: Duration) -> Result<Reservation, StoreRefusal> {
        self.asked.fetch_add(1, Ordering::Relaxed);
        Err(StoreRefusal::Unavailable("connection refused".into()))
    }
}

const DOC: &str = r#"
version: "1"
default: deny
tools:
  list-pods: {}
  start-pod:
    limits: [{counter: starts, window: minute, max: 10}]
  create-pod:
    limits: [{counter: gpus, window: day, max: 8, increment_from: args.gpuCount}]
"#;

#[test]
fn an_unavailable_store_refuses_limited_calls_and_is_never_asked_for_unlimited_ones() {
    let policy = Policy::from_text("p", DOC).unwrap();
    let store = Down::default();
    let caller = Caller { identity: "sha256:a".into(), ..Caller::default() };
    let decide = |tool: &str, args: serde_json::Value| {
        policy.decide(&store, &Call { tool, arguments: &args, caller: &caller }, Duration::ZERO)
    };

    let d = decide("start-pod", json!({}));
    assert_eq!(d.kind, DecisionKind::StoreUnavailable);
    assert_eq!(d.kind.as_str(), "store_unavailable");
    assert!(d.reservation.is_none(), "nothing held, nothing forwarded");
    assert_eq!(d.rule.as_deref(), Some("tools.start-pod.limits[0]"));
    assert!(d.reason.unwrap().contains("connection refused"));
    assert_eq!(store.asked.load(Ordering::Relaxed), 1);

    assert_eq!(decide("list-pods", json!({})).kind, DecisionKind::Allow, "no limits: no store needed");
    assert_eq!(decide("create-pod", json!({"gpuCount": 0})).kind, DecisionKind::Allow, "spends nothing");
    assert_eq!(decide("delete-pod", json!({})).kind, DecisionKind::Deny);
    assert_eq!(store.asked.load(Ordering::Relaxed), 1, "only the limited call reached the store");
}
