//! Three real `toolgate-proxy` processes sharing one Redis (`--counter-store`) in front of
//! the real RunPod MCP server 4.0.0 (npm, tests/node) and the fake RunPod API that records
//! what reached it: 32 concurrent callers spread over the three get exactly `max` starts
//! through; Redis killed mid-run → limited calls fail closed with the documented error
//! (-32015, `store_unavailable`) while unlimited ones still pass; Redis restarted → counting
//! resumes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;
use toolgate_tests::redis::RedisServer;

const POLICY: &str = r#"
version: "1"
default: deny
tools:
  list-pods: {}
  pod-action:
    require:
      - {path: args.body.action, op: eq, value: start}
    limits:
      - {counter: starts, window: hour, max: 10, scope: global}
"#;

const MAX: usize = 10;

fn start(id: usize) -> Value {
    json!({"op": "call", "tool": "pod-action", "args": {"id": format!("pod-{id}"), "body": {"action": "start"}}})
}

fn starts_reached(fake: &Proc) -> usize {
    fake_requests(fake).iter().filter(|(m, p, _)| m == "POST" && p.ends_with("/action")).count()
}

fn store_up(p: &Proxy) -> bool {
    String::from_utf8(http(p.admin, "GET", "/readyz", &[], b"").2).unwrap().contains("counter store: up")
}

fn code(step: &Value) -> Option<i64> {
    step["error"]["code"].as_i64()
}

#[test]
fn three_proxies_share_one_redis_exactly_and_fail_closed_without_it() {
    let fake = fake_runpod();
    let server = runpod_http(&fake);
    let mut redis = RedisServer::start().expect("redis-server (apt-get install redis-server)");
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), "shared.yaml", POLICY);
    let upstream = format!("http://127.0.0.1:{}/mcp", server.port);
    let proxies: Vec<Proxy> = (0..3)
        .map(|_| {
            proxy(
                &[&policy],
                &[
                    "--upstream".into(),
                    upstream.clone(),
                    "--counter-store".into(),
                    redis.url(),
                    "--counter-store-prefix".into(),
                    "e2e:".into(),
                    // Generous on a loaded 2-core machine; a dead store is refused at once.
                    "--counter-store-timeout-ms".into(),
                    "2000".into(),
                ],
                &[],
            )
        })
        .collect();

    // 32 callers at once, spread over the three proxies, two starts each.
    let outcomes: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..32)
            .map(|c| {
                let target = over_http(&proxies[c % 3], "agent");
                s.spawn(move || mcp_client(&target, &json!([start(c), start(c + 100)])))
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("caller thread")).collect()
    });
    assert_eq!(outcomes.len(), 64);
    let summary: Vec<String> = outcomes
        .iter()
        .map(|o| if o["ok"] == true { "ok".into() } else { format!("{}", o["error"]["code"]) })
        .collect();
    let ok = outcomes.iter().filter(|o| o["ok"] == true).count();
    let limited = outcomes.iter().filter(|o| code(o) == Some(-32011)).count();
    assert_eq!(ok, MAX, "exactly max admitted over three replicas: {summary:?}");
    assert_eq!(limited, 64 - MAX, "every other call rate-limited: {summary:?}");
    assert_eq!(starts_reached(&fake), MAX, "the RunPod API saw exactly max starts");
    for p in &proxies {
        let m = metrics(p);
        assert_eq!(sample(&m, "toolgate_counter_store_up "), 1.0, "{m}");
    }
    // One script call per limited decision, none for the rest (the metric is refreshed
    // every 2 s): 64 decisions, 64 calls over the three proxies.
    let trips =
        || -> f64 { proxies.iter().map(|p| sample(&metrics(p), "toolgate_counter_store_round_trips_total ")).sum() };
    let deadline = Instant::now() + Duration::from_secs(30);
    while trips() < 64.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(trips(), 64.0, "one store round trip per limited call");

    // Redis killed mid-run: limited calls fail closed on every proxy, with the documented
    // error; calls without limits never needed the store and still pass.
    redis.kill();
    for (i, p) in proxies.iter().enumerate() {
        let out = mcp_client(
            &over_http(p, "agent"),
            &json!([start(200 + i), {"op": "call", "tool": "list-pods", "args": {}}]),
        );
        assert_eq!(code(&out[0]), Some(-32015), "{}", out[0]);
        assert_eq!(out[0]["error"]["data"]["decision"], "store_unavailable", "{}", out[0]);
        assert_eq!(out[1]["ok"], true, "an unlimited call passes without the store: {}", out[1]);
        let m = metrics(p);
        assert_eq!(
            sample(&m, r#"toolgate_decisions_total{tool="pod-action",decision="store_unavailable""#),
            1.0,
            "{m}"
        );
        let page = String::from_utf8(http(p.admin, "GET", "/readyz", &[], b"").2).unwrap();
        assert!(page.contains("counter store: unreachable"), "{page}");
    }
    assert_eq!(starts_reached(&fake), MAX, "nothing reached RunPod while the store was down");

    // Restarted (empty, as after a failover without persistence): counting resumes at max.
    redis.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut first = 0;
    loop {
        assert!(Instant::now() < deadline, "limited calls never passed again after the restart");
        let out = mcp_client(&over_http(&proxies[first % 3], "agent"), &json!([start(300)]));
        if out[0]["ok"] == true {
            break;
        }
        assert_eq!(code(&out[0]), Some(-32015), "only store errors until it is back: {}", out[0]);
        first += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    // Every proxy reconnects on its own (back-off, and a PING every 2 s).
    for p in &proxies {
        while !store_up(p) {
            assert!(Instant::now() < deadline, "a proxy never reconnected");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let more: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|c| {
                let target = over_http(&proxies[c % 3], "agent");
                s.spawn(move || mcp_client(&target, &json!([start(400 + c), start(500 + c)])))
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("caller thread")).collect()
    });
    let ok_after = 1 + more.iter().filter(|o| o["ok"] == true).count();
    let codes: Vec<&Value> = more.iter().map(|o| &o["error"]["code"]).collect();
    assert_eq!(ok_after, MAX, "max again after the restart: {codes:?}");
    assert_eq!(starts_reached(&fake), 2 * MAX);
}
