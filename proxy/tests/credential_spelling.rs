//! One credential is one caller: the spellings of an `Authorization` header that the
//! upstream takes for the same key (`Bearer T`, `bearer T`, ` BEARER   T `) share one
//! identity, so they share one rate limit and one grant.
//!
//! The real binary in front of an in-process MCP server that records what reached it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mock_mcp.rs"]
mod mock_mcp;
mod support;

use mock_mcp::{MockMcp, error_code};
use serde_json::{Value, json};
use support::{http, proxy, write_policy};

const RATE_LIMITED: i64 = -32011;
const DENIED: i64 = -32010;

fn post(port: u16, auth: &str, session: Option<&str>, msg: &Value) -> (u16, String, Value) {
    let mut headers = vec![
        ("Content-Type", "application/json"),
        ("Accept", "application/json, text/event-stream"),
        ("Authorization", auth),
    ];
    if let Some(s) = session {
        headers.push(("Mcp-Session-Id", s));
    }
    let (status, head, body) = http(port, "POST", "/mcp", &headers, msg.to_string().as_bytes());
    (status, head, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// `initialize` with this spelling; the session id the server gave.
fn initialize(port: u16, auth: &str) -> String {
    let (status, head, body) = post(
        port,
        auth,
        None,
        &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}),
    );
    assert_eq!(status, 200, "initialize as {auth:?}: {head} {body}");
    let sid = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case("mcp-session-id").then(|| v.trim().to_owned())
        })
        .expect("a session id");
    let _ = post(port, auth, Some(&sid), &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    sid
}

fn call(port: u16, auth: &str, session: &str, id: u64, tool: &str) -> Value {
    let (status, head, body) = post(
        port,
        auth,
        Some(session),
        &json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": {}}}),
    );
    assert_eq!(status, 200, "{head} {body}");
    body
}

#[test]
fn three_spellings_of_one_credential_share_one_limit() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mcp = MockMcp::start(&rt);
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(
        dir.path(),
        "policy.yaml",
        "version: '1'\ndefault: deny\ntools:\n  start-pod:\n    limits: [{window: minute, max: 2, scope: identity}]\n",
    );
    let p = proxy(&[&policy], &["--upstream".into(), mcp.url()], &[]);
    let port = p.proc.port;

    let spellings = ["Bearer key-Abc", "bearer key-Abc", " BEARER \t  key-Abc "];
    let sessions: Vec<String> = spellings.iter().map(|a| initialize(port, a)).collect();
    let answers: Vec<Value> = spellings
        .iter()
        .zip(&sessions)
        .enumerate()
        .map(|(i, (a, s))| call(port, a, s, 10 + i as u64, "start-pod"))
        .collect();
    assert_eq!(error_code(&answers[0]), None, "{}", answers[0]);
    assert_eq!(error_code(&answers[1]), None, "{}", answers[1]);
    assert_eq!(error_code(&answers[2]), Some(RATE_LIMITED), "the third call of one key: {}", answers[2]);
    assert_eq!(mcp.called("start-pod"), 2, "two starts reached the server, not three");

    // Another credential (the same letters in another case) is another caller.
    let other = "Bearer KEY-ABC";
    let s = initialize(port, other);
    assert_eq!(error_code(&call(port, other, &s, 20, "start-pod")), None);
    assert_eq!(mcp.called("start-pod"), 3);

    // The audit lines name one identity for the three spellings.
    let audit = p.audit_when("four start-pod lines", |a| a.iter().filter(|l| l["tool"] == "start-pod").count() >= 4);
    let ids: Vec<&str> =
        audit.iter().filter(|l| l["tool"] == "start-pod").filter_map(|l| l["identity"].as_str()).collect();
    assert_eq!(ids.len(), 4, "{audit:?}");
    assert!(ids[..3].iter().all(|i| *i == toolgate_policy::fingerprint("Bearer key-Abc")), "{ids:?}");
    assert_ne!(ids[3], ids[0]);
}

#[test]
fn a_grant_fingerprint_matches_every_spelling() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mcp = MockMcp::start(&rt);
    let dir = tempfile::tempdir().unwrap();
    let fp = toolgate_policy::fingerprint("Bearer ops-key");
    let policy = write_policy(
        dir.path(),
        "policy.yaml",
        &format!(
            "version: '1'\ngrants:\n  - {{name: ops, match: {{fingerprints: ['{fp}']}}, tools: {{delete-pod: {{}}}}}}\n"
        ),
    );
    let p = proxy(&[&policy], &["--upstream".into(), mcp.url()], &[]);
    let port = p.proc.port;
    for (i, auth) in ["Bearer ops-key", "bearer ops-key", "BEARER\tops-key "].into_iter().enumerate() {
        let s = initialize(port, auth);
        assert_eq!(error_code(&call(port, auth, &s, i as u64 + 1, "delete-pod")), None, "{auth:?}");
    }
    let s = initialize(port, "Bearer someone-else");
    assert_eq!(error_code(&call(port, "Bearer someone-else", &s, 9, "delete-pod")), Some(DENIED));
    assert_eq!(mcp.called("delete-pod"), 3);
}
