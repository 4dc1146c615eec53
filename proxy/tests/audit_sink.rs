//! The audit sink buffers lines (one `write` per burst of calls, not one per call) and
//! loses none: every decided call has its line, refusals and admissions alike, and a
//! SIGTERM right after a burst of calls still writes every line before the proxy exits.
//!
//! The real binary in front of an in-process MCP server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mock_mcp.rs"]
mod mock_mcp;
mod support;

use std::time::{Duration, Instant};

use mock_mcp::{MockMcp, error_code};
use serde_json::{Value, json};
use support::{http, proxy, write_policy};

const DENIED: i64 = -32010;

fn post(port: u16, session: Option<&str>, msg: &Value) -> (u16, String, Value) {
    let mut headers = vec![
        ("Content-Type", "application/json"),
        ("Accept", "application/json, text/event-stream"),
        ("Authorization", "Bearer audit-test"),
    ];
    if let Some(s) = session {
        headers.push(("Mcp-Session-Id", s));
    }
    let (status, head, body) = http(port, "POST", "/mcp", &headers, msg.to_string().as_bytes());
    (status, head, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// An initialized MCP session through the proxy on `port`: its id.
fn open_session(port: u16) -> String {
    let (status, head, body) = post(
        port,
        None,
        &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}),
    );
    assert_eq!(status, 200, "{head} {body}");
    let sid = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case("mcp-session-id").then(|| v.trim().to_owned())
        })
        .expect("a session id");
    let _ = post(port, Some(&sid), &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    sid
}

/// The proxy (policy: `start-pod` allowed, anything else denied) in front of a mock MCP
/// server; the test binds every field, so the runtime and the policy live as long as it.
struct Setup {
    p: support::Proxy,
    mcp: MockMcp,
    _dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
}

fn setup() -> Setup {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mcp = MockMcp::start(&rt);
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), "policy.yaml", "version: '1'\ndefault: deny\ntools:\n  start-pod: {}\n");
    let p = proxy(&[&policy], &["--upstream".into(), mcp.url()], &[]);
    Setup { p, mcp, _dir: dir, _rt: rt }
}

#[test]
fn every_decision_has_its_line_and_sigterm_loses_none() {
    let Setup { mut p, mcp, _dir, _rt } = setup();
    let port = p.proc.port;

    let sid = open_session(port);

    // Admitted and refused calls interleaved; a refusal's line is written before its answer.
    let (mut allowed, mut denied) = (0, 0);
    for id in 1..=125u64 {
        let tool = if id % 10 == 0 { "delete-pod" } else { "start-pod" };
        let (status, head, body) = post(
            port,
            Some(&sid),
            &json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": {"n": id}}}),
        );
        assert_eq!(status, 200, "{head} {body}");
        if tool == "delete-pod" {
            assert_eq!(error_code(&body), Some(DENIED), "{body}");
            denied += 1;
        } else {
            assert_eq!(error_code(&body), None, "{body}");
            allowed += 1;
        }
    }
    assert_eq!(mcp.called("start-pod"), allowed);

    // Stop it at once: the lines still buffered are written on the way out.
    let pid = p.proc.child.id().to_string();
    let killed = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.proc.child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "the proxy did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The reader thread drains the pipe until EOF.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = p.audit.lock().unwrap().len();
        if n >= allowed + denied || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let audit = p.audit.lock().unwrap().clone();
    let count = |d: &str| audit.iter().filter(|a| a["decision"] == d).count();
    assert_eq!((count("allow"), count("deny")), (allowed, denied), "one line per decision: {audit:?}");
    // In order: the lines come out as the calls were decided.
    let decisions: Vec<&str> = audit.iter().filter_map(|a| a["decision"].as_str()).collect();
    let expected: Vec<&str> = (1..=125u64).map(|id| if id % 10 == 0 { "deny" } else { "allow" }).collect();
    assert_eq!(decisions, expected);
}

#[test]
fn an_admitted_calls_line_is_written_while_the_proxy_keeps_running() {
    let Setup { mut p, mcp: _mcp, _dir, _rt } = setup();
    let sid = open_session(p.proc.port);
    let (status, head, body) = post(
        p.proc.port,
        Some(&sid),
        &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "start-pod", "arguments": {}}}),
    );
    assert_eq!((status, error_code(&body)), (200, None), "{head} {body}");
    // Nothing else happens: the buffered line is written on its own (50 ms after it was
    // appended), not only when the proxy stops.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.audit.lock().unwrap().iter().any(|a| a["decision"] == "allow" && a["tool"] == "start-pod") {
        assert!(Instant::now() < deadline, "no audit line while the proxy runs: {:?}", p.audit.lock().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(p.proc.child.try_wait().expect("wait").is_none(), "the proxy is still running");
}
