//! A policy's `counters` block: parsed and validated, carried by its demands, and refused
//! (fail closed) by a sidecar without a shared store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::json;
use toolgate_policy::{
    Call, Caller, CounterSettings, DecisionKind, Limiter, LocalOnly, OnStoreFailure, Policy, StoreKind,
};

fn doc(counters: &str) -> String {
    format!(
        r#"{{"version":"1","default":"deny",{counters}"tools":{{"start-pod":{{"limits":[{{"counter":"c","window":"minute","max":2,"scope":"global"}}]}},"echo":{{}}}}}}"#
    )
}

#[test]
fn counters_block_parses_and_validates() {
    let p = Policy::from_text("p", &doc(r#""counters":{"store":"shared","on_store_failure":"open"},"#)).unwrap();
    let (_, d) = p.documents().next().unwrap();
    assert_eq!(
        d.counters,
        Some(CounterSettings { store: Some(StoreKind::Shared), on_store_failure: Some(OnStoreFailure::Open) })
    );
    assert_eq!(p.wanting_shared_store().collect::<Vec<_>>(), ["p"]);
    let e = Policy::from_text("p", &doc(r#""counters":{"store":"local","on_store_failure":"open"},"#)).unwrap_err();
    assert!(e.to_string().contains("counters.on_store_failure"), "{e}");
    for bad in [r#""counters":{"store":"redis"},"#, r#""counters":{"onStoreFailure":"open"},"#] {
        assert!(Policy::from_text("p", &doc(bad)).is_err(), "{bad}");
    }
    // Without the block: no shared store asked for, and the revision of old documents
    // does not change (the field is not serialized when absent).
    let plain = Policy::from_text("p", &doc("")).unwrap();
    assert_eq!(plain.wanting_shared_store().count(), 0);
    assert!(!serde_json::to_string(plain.documents().next().unwrap().1).unwrap().contains("counters"));
}

#[test]
fn a_sidecar_without_a_shared_store_refuses_documents_that_ask_for_it() {
    let caller = Caller::default();
    let args = json!({});
    let call = Call { tool: "start-pod", arguments: &args, caller: &caller };
    let shared = Policy::from_text("p", &doc(r#""counters":{"store":"shared"},"#)).unwrap();
    let store = LocalOnly(Limiter::default());
    let d = shared.decide(&store, &call, Duration::ZERO);
    assert_eq!(d.kind, DecisionKind::StoreUnavailable, "{d:?}");
    assert!(d.reason.unwrap().contains("counters.store: shared"));
    let echo = Call { tool: "echo", ..call };
    assert_eq!(shared.decide(&store, &echo, Duration::ZERO).kind, DecisionKind::Allow, "no limit, no store");
    // `local` and no block are counted here.
    for counters in [r#""counters":{"store":"local"},"#, ""] {
        let p = Policy::from_text("p", &doc(counters)).unwrap();
        let store = LocalOnly(Limiter::default());
        for _ in 0..2 {
            p.decide(&store, &call, Duration::ZERO).reservation.unwrap().commit();
        }
        assert_eq!(p.decide(&store, &call, Duration::ZERO).kind, DecisionKind::RateLimited);
    }
}

#[test]
fn counter_keys_name_the_namespace_of_mcp_policies() {
    let limiter = Limiter::default();
    let caller = Caller::default();
    let args = json!({});
    let call = Call { tool: "start-pod", arguments: &args, caller: &caller };
    let a = Policy::from_text("seed", &doc("")).unwrap().with_counter_namespace("team-a");
    let b = Policy::from_text("seed", &doc("")).unwrap().with_counter_namespace("team-b");
    assert_eq!(a.counter_id("seed"), Some("team-a/seed"));
    for _ in 0..2 {
        a.decide(&limiter, &call, Duration::ZERO).reservation.unwrap().commit();
    }
    assert_eq!(a.decide(&limiter, &call, Duration::ZERO).kind, DecisionKind::RateLimited);
    // Same McpPolicy name in another namespace: its own counter.
    let d = b.decide(&limiter, &call, Duration::ZERO);
    assert_eq!(d.kind, DecisionKind::Allow, "{d:?}");
    assert_eq!(d.policy.as_deref(), Some("seed"), "decisions and metrics keep the name");
}
