//! Benchmarks of the policy engine (`make bench`; numbers in docs/benchmarks.md).
//!
//! - `decide/100_rules_*`: one decision against a 100-rule document whose rules carry
//!   argument conditions (target: p50 ≤ 1 µs).
//! - `limiter/*`: one rate-limit reservation (target ≤ 200 ns), and the seed policy's
//!   whole decision with its limit.
//! - `tools_list/68_tools`: filtering the RunPod MCP 4.0.0 `tools/list` (68 tools)
//!   through its policy pack.
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};
use toolgate_policy::{Call, Caller, CounterKey, Demand, Limiter, Policy, fingerprint};

/// 90 exact keys and 10 globs, each rule with two `require` and three `deny_if`
/// conditions (regex, numbers, lists, nested paths), and an `all_tools` check.
fn hundred_rules() -> Policy {
    let mut tools = serde_json::Map::new();
    for i in 0..100 {
        let key = if i < 90 { format!("tool-{i:03}") } else { format!("glob-{i:03}-*") };
        tools.insert(
            key,
            json!({
                "require": [
                    {"path": "args.name", "op": "regex", "value": "^[a-z][a-z0-9-]{0,62}$"},
                    {"path": "args.count", "op": "lte", "value": 10}
                ],
                "deny_if": [
                    {"path": "args.cloud", "op": "not_in", "value": ["SECURE", "COMMUNITY"]},
                    {"path": "args.spec.gpu.count", "op": "gt", "value": 2},
                    {"path": "args.tags", "op": "contains", "value": "forbidden"}
                ]
            }),
        );
    }
    let doc = json!({
        "version": "1",
        "default": "deny",
        "hide": ["internal-*"],
        "all_tools": {"deny_if": [{"path": "args.dryRun", "op": "eq", "value": false}]},
        "tools": tools,
    });
    let (doc, _) = toolgate_policy::document_from_value(doc).unwrap();
    Policy::compile(vec![("bench".into(), doc)]).unwrap()
}

fn args() -> Value {
    json!({
        "name": "train-job-7",
        "count": 4,
        "cloud": "SECURE",
        "spec": {"gpu": {"count": 1, "type": "A100"}},
        "tags": ["nightly", "ml"],
        "image": "runpod/pytorch:2.4.0"
    })
}

fn decide(c: &mut Criterion) {
    let policy = hundred_rules();
    let limiter = Limiter::default();
    let caller = Caller { identity: fingerprint("Bearer agent"), ..Caller::default() };
    let args = args();
    let mut g = c.benchmark_group("decide");
    for (name, tool) in [("100_rules_exact_allow", "tool-057"), ("100_rules_glob_allow", "glob-095-run")] {
        let call = Call { tool, arguments: &args, caller: &caller };
        assert!(policy.decide(&limiter, &call, Duration::ZERO).kind.is_allow());
        g.bench_function(name, |b| {
            b.iter(|| {
                let d = policy.decide(&limiter, black_box(&call), Duration::ZERO);
                if let Some(r) = d.reservation {
                    r.commit();
                }
            });
        });
    }
    let denied = json!({"name": "train-job-7", "count": 4, "cloud": "ON-DEMAND"});
    let call = Call { tool: "tool-057", arguments: &denied, caller: &caller };
    assert!(!policy.decide(&limiter, &call, Duration::ZERO).kind.is_allow());
    g.bench_function("100_rules_condition_deny", |b| {
        b.iter(|| policy.decide(&limiter, black_box(&call), Duration::ZERO))
    });
    let call = Call { tool: "unknown-tool", arguments: &args, caller: &caller };
    g.bench_function("100_rules_default_deny", |b| {
        b.iter(|| policy.decide(&limiter, black_box(&call), Duration::ZERO))
    });
    g.finish();
}

fn limiter(c: &mut Criterion) {
    let mut g = c.benchmark_group("limiter");
    // Steady state: the clock moves 1 ms per call through a 1 s window, so each
    // reservation also expires one old entry.
    let limiter = Limiter::default();
    let demand = [Demand {
        key: CounterKey { policy: "bench".into(), counter: "start-pod_rate".into(), scope: "id:sha256:abc".into() },
        window: Duration::from_secs(1),
        max: 10_000,
        amount: 1,
        counters: Default::default(),
    }];
    let mut now = Duration::ZERO;
    g.bench_function("reserve_commit", |b| {
        b.iter(|| {
            now += Duration::from_millis(1);
            limiter.reserve(black_box(&demand), now).unwrap().commit();
        });
    });
    // A full counter: the refusal path, with retry_after computed.
    let full = Limiter::default();
    let one = [Demand { max: 1, window: Duration::from_secs(3600), ..demand[0].clone() }];
    full.reserve(&one, Duration::ZERO).unwrap().commit();
    g.bench_function("reserve_refused", |b| b.iter(|| full.reserve(black_box(&one), Duration::from_secs(1)).is_err()));

    // The seed policy end to end: decision plus its limit (max 10/minute per credential).
    let seed = Policy::from_text(
        "seed",
        r#"{"version":"1","default":"deny","tools":{"start-pod":{"limits":[{"counter":"start-pod_rate","window":"minute","max":1000000,"scope":"grant"}]}}}"#,
    )
    .unwrap();
    let limiter = Limiter::default();
    let caller = Caller { identity: fingerprint("Bearer agent"), ..Caller::default() };
    let args = json!({"podId": "p1"});
    let call = Call { tool: "start-pod", arguments: &args, caller: &caller };
    let mut now = Duration::ZERO;
    g.bench_function("seed_decide_with_limit", |b| {
        b.iter(|| {
            now += Duration::from_micros(100);
            seed.decide(&limiter, black_box(&call), now).reservation.unwrap().commit();
        });
    });
    g.finish();
}

fn tools_list(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let pack = std::fs::read_to_string(root.join("examples/policies/runpod-4.0.0.yaml")).unwrap();
    let policy = Policy::from_text("runpod-4.0.0", &pack).unwrap();
    let dump: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("tests/fixtures/runpod-4.0.0-tools.json")).unwrap())
            .unwrap();
    let names: Vec<&str> = dump["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 68);
    let caller = Caller { identity: fingerprint("Bearer agent"), ..Caller::default() };
    c.bench_function("tools_list/68_tools", |b| {
        b.iter(|| black_box(&names).iter().filter(|n| policy.lists_tool(n, &caller)).count());
    });
}

criterion_group!(benches, decide, limiter, tools_list);
criterion_main!(benches);
