//! The policy chooses how its limits are counted (`counters.store`, `counters.on_store_failure`)
//! on real `toolgate-proxy` processes sharing one real Redis, in front of the in-process mock
//! MCP server: with Redis killed, `on_store_failure: local` admits max / replicas on each
//! replica, `open` admits uncounted (and counts it in a metric), the flag's `closed` refuses
//! with -32015; `store: local` never needs Redis; a policy asking for the shared store on a
//! sidecar without one is refused (-32015), never counted locally.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mock_mcp.rs"]
mod mock_mcp;
mod support;

use std::time::{Duration, Instant};

use mock_mcp::{Client, MockMcp, error_code};
use serde_json::Value;
use support::{Proxy, http, metrics, proxy, sample, write_policy};
use toolgate_tests::redis::RedisServer;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// `start-pod` limited to `max` an hour (global), with this `counters:` block.
fn policy(max: u64, counters: &str) -> String {
    format!(
        r#"
version: "1"
default: deny
{counters}
tools:
  echo: {{}}
  start-pod:
    limits:
      - {{counter: starts, window: hour, max: {max}, scope: global}}
"#
    )
}

fn with_store(
    dir: &std::path::Path,
    name: &str,
    text: &str,
    mock: &MockMcp,
    redis: &RedisServer,
    extra: &[&str],
) -> Proxy {
    let p = write_policy(dir, name, text);
    let mut tail: Vec<String> = vec![
        "--upstream".into(),
        mock.url(),
        "--counter-store".into(),
        redis.url(),
        "--counter-store-prefix".into(),
        format!("{name}:"),
        "--counter-store-timeout-ms".into(),
        "2000".into(),
    ];
    tail.extend(extra.iter().map(|s| s.to_string()));
    proxy(&[&p], &tail, &[])
}

/// Calls `start-pod` until it is refused (at most `bound` times): (admitted, the refusal).
fn start_until_refused(p: &Proxy, bound: usize) -> (usize, Value) {
    let mut c = Client::initialize(p.proc.port, "agent");
    for n in 0..bound {
        let a = c.call("start-pod");
        if error_code(&a).is_some() {
            return (n, a);
        }
    }
    panic!("start-pod was never refused in {bound} calls");
}

/// A metric refreshed by the store monitor (every 2 s): waits until it reaches `want`.
fn eventually_sample(p: &Proxy, name: &str, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = sample(&metrics(p), name);
        if v >= want || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_policy_chooses_what_limited_calls_get_while_the_store_is_down() {
    let rt = runtime();
    let mut redis = RedisServer::start().expect("redis-server (apt-get install redis-server)");
    let dir = tempfile::tempdir().unwrap();
    let (mock_local, mock_open, mock_closed, mock_here) =
        (MockMcp::start(&rt), MockMcp::start(&rt), MockMcp::start(&rt), MockMcp::start(&rt));
    // Two replicas of a policy that falls back to local counting: 4 / 2 each while down.
    let local_text = policy(4, "counters: {store: shared, on_store_failure: local}");
    let replicas = ["--counter-store-replicas", "2"];
    let locals = [
        with_store(dir.path(), "fallback-local", &local_text, &mock_local, &redis, &replicas),
        with_store(dir.path(), "fallback-local", &local_text, &mock_local, &redis, &replicas),
    ];
    let open = with_store(
        dir.path(),
        "fallback-open",
        &policy(1, "counters: {on_store_failure: open}"),
        &mock_open,
        &redis,
        &[],
    );
    // No `counters`: the flag's default, closed.
    let closed = with_store(dir.path(), "fallback-closed", &policy(5, ""), &mock_closed, &redis, &[]);
    // Counted in each sidecar whatever the flag says: Redis is never asked.
    let here = with_store(dir.path(), "count-here", &policy(2, "counters: {store: local}"), &mock_here, &redis, &[]);

    // While the store is up the two replicas share one count of 4.
    let mut a = Client::initialize(locals[0].proc.port, "agent");
    let mut b = Client::initialize(locals[1].proc.port, "agent");
    for _ in 0..2 {
        assert_eq!(error_code(&a.call("start-pod")), None);
        assert_eq!(error_code(&b.call("start-pod")), None);
    }
    assert_eq!(error_code(&a.call("start-pod")), Some(-32011), "4 across both replicas");
    assert_eq!(error_code(&b.call("start-pod")), Some(-32011), "4 across both replicas");
    assert_eq!(mock_local.called("start-pod"), 4);

    redis.kill();
    // local: each replica admits max / replicas = 2 on its own, then rate-limits.
    for p in &locals {
        let (n, refusal) = start_until_refused(p, 10);
        assert_eq!(n, 2, "max / --counter-store-replicas while the store is down: {refusal}");
        assert_eq!(error_code(&refusal), Some(-32011), "{refusal}");
        assert_eq!(eventually_sample(p, r#"toolgate_counter_store_fallbacks_total{mode="local"}"#, 2.0), 2.0);
    }
    assert_eq!(mock_local.called("start-pod"), 4 + 2 * 2);
    // open: admitted although the limit is 1, each one counted as an open fallback.
    let mut o = Client::initialize(open.proc.port, "agent");
    for _ in 0..3 {
        let ans = o.call("start-pod");
        assert_eq!(error_code(&ans), None, "open admits while the store is down: {ans}");
    }
    assert_eq!(mock_open.called("start-pod"), 3);
    assert_eq!(eventually_sample(&open, r#"toolgate_counter_store_fallbacks_total{mode="open"}"#, 3.0), 3.0);
    // The flag's default: refused, -32015, nothing reaches the server.
    let mut c = Client::initialize(closed.proc.port, "agent");
    let ans = c.call("start-pod");
    assert_eq!(error_code(&ans), Some(-32015), "{ans}");
    assert_eq!(ans["error"]["data"]["decision"], "store_unavailable", "{ans}");
    assert_eq!(error_code(&c.call("echo")), None, "an unlimited call needs no store");
    assert_eq!(mock_closed.called("start-pod"), 0);
    // store: local: its own count of 2, Redis up or down, and not one round trip.
    let (n, refusal) = start_until_refused(&here, 10);
    assert_eq!((n, error_code(&refusal)), (2, Some(-32011)), "{refusal}");
    let m = metrics(&here);
    assert_eq!(sample(&m, "toolgate_counter_store_round_trips_total "), 0.0, "{m}");
    assert_eq!(sample(&m, r#"toolgate_counter_store_fallbacks_total{mode="local"}"#), 0.0, "{m}");
}

#[test]
fn a_policy_asking_for_the_shared_store_on_a_sidecar_without_one_is_refused() {
    let rt = runtime();
    let mock = MockMcp::start(&rt);
    let dir = tempfile::tempdir().unwrap();
    let p = write_policy(dir.path(), "wants-shared.yaml", &policy(10, "counters: {store: shared}"));
    let proxy = proxy(&[&p], &["--upstream".into(), mock.url()], &[]);
    let mut c = Client::initialize(proxy.proc.port, "agent");
    for _ in 0..3 {
        let ans = c.call("start-pod");
        assert_eq!(error_code(&ans), Some(-32015), "never counted locally: {ans}");
        assert_eq!(ans["error"]["data"]["decision"], "store_unavailable", "{ans}");
        let reason = ans["error"]["data"]["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("counters.store: shared"), "{reason}");
    }
    assert_eq!(error_code(&c.call("echo")), None, "calls without limits pass");
    assert_eq!(mock.called("start-pod"), 0);
    assert_eq!(mock.called("echo"), 1);
    let page = String::from_utf8(http(proxy.admin, "GET", "/metrics", &[], b"").2).unwrap();
    assert_eq!(
        sample(&page, r#"toolgate_decisions_total{tool="start-pod",decision="store_unavailable""#),
        3.0,
        "{page}"
    );
}

/// The proxy on a real 3-master Redis Cluster (`redis+cluster://`) and on a master found
/// through a Sentinel (`redis+sentinel://`): two replicas loading two documents whose
/// limits live in different slots admit exactly the smaller max between them.
#[test]
fn cluster_and_sentinel_endpoints_count_across_replicas() {
    let rt = runtime();
    let mock = MockMcp::start(&rt);
    let cluster = toolgate_tests::redis::RedisCluster::start().expect("redis-server and redis-cli");
    let sentinel = toolgate_tests::redis::RedisSentinel::start().expect("redis-server --sentinel");
    let dir = tempfile::tempdir().unwrap();
    let a = write_policy(dir.path(), "doc-a.yaml", &policy(3, ""));
    let b = write_policy(dir.path(), "doc-b.yaml", &policy(5, ""));
    let replica = |url: &str| {
        let tail: Vec<String> =
            ["--upstream", &mock.url(), "--counter-store", url, "--counter-store-timeout-ms", "2000"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        proxy(&[&a, &b], &tail, &[])
    };
    for (url, what) in [(cluster.url(), "cluster"), (sentinel.url(), "sentinel")] {
        let before = mock.called("start-pod");
        let replicas = [replica(&url), replica(&url)];
        let mut clients: Vec<Client> = replicas.iter().map(|p| Client::initialize(p.proc.port, "agent")).collect();
        let mut ok = 0;
        let mut codes = Vec::new();
        for i in 0..8 {
            let ans = clients[i % 2].call("start-pod");
            match error_code(&ans) {
                None => ok += 1,
                Some(c) => codes.push(c),
            }
        }
        assert_eq!(ok, 3, "{what}: the smaller max across both replicas: {codes:?}");
        assert!(codes.iter().all(|c| *c == -32011), "{what}: {codes:?}");
        assert_eq!(mock.called("start-pod") - before, 3, "{what}");
        for p in &replicas {
            assert_eq!(eventually_sample(p, "toolgate_counter_store_up ", 1.0), 1.0, "{what}");
        }
    }
}
