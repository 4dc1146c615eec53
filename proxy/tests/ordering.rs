//! A session's order through toolgate-proxy with a Streamable-HTTP upstream: a client opens
//! its GET stream and at once calls a tool that asks it back (sampling, elicitation) on that
//! stream. The proxy must not let the POST overtake the GET upstream, or the server has no
//! stream for its request yet and the call hangs.
//!
//! The client is the official SDK's (tests/node/callback-client.mjs, `--rounds`: a new
//! session per round, in one process); it opens its GET stream once connected and does not
//! wait for its answer before the script's first POST. The upstream is
//! tests/node/test-server.mjs; with `--get-delay` it opens each GET stream only after a
//! delay, as a slow upstream does, so a POST that overtakes the GET loses the server's
//! request in every round (without it, in a few per cent of the rounds).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/callbacks.rs"]
mod callbacks;
mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use callbacks::{records, test_server_http_with};
use serde_json::{Value, json};
use support::*;

const POLICY: &str = r#"
version: "1"
default: deny
tools:
  echo: {}
  ask: {}
  elicit: {}
"#;

/// How long the test server holds each GET before it opens the stream (or refuses it).
const GET_DELAY_MS: &str = "200";

/// This worktree's tests/node (the scripts' options are new: `toolgate_tests::mcp::node_dir`
/// names the directory of the checkout that built that crate, which a shared target
/// directory may make another one).
fn node_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/node");
    assert!(dir.join("node_modules/@modelcontextprotocol/sdk").is_dir(), "run `make node` first");
    dir.canonicalize().unwrap()
}

/// Runs `rounds` SDK sessions of `script` one after the other; returns the round lines and
/// the summary `{"run","failed"}`. A lost server request makes its round fail once the
/// call times out (`timeout_ms`); the client stops after three failed rounds.
fn rounds(url: &str, rounds: u32, timeout_ms: u32, script: &Value) -> (Vec<Value>, Value) {
    let mut child = Command::new("node")
        .current_dir(node_dir())
        .arg("callback-client.mjs")
        .args(["--url", url, "--sampling", "sampled-here", "--elicit", r#"{"name":"ada"}"#])
        .args(["--rounds", &rounds.to_string(), "--max-failed", "3"])
        .args(["--timeout", &timeout_ms.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn callback-client");
    child.stdin.take().unwrap().write_all(script.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "callback-client failed: {:?}", out.status);
    let mut lines: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let summary = lines.pop().expect("a summary line");
    assert_eq!(summary["op"], "rounds", "{summary}");
    (lines, summary)
}

fn failed_rounds(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|r| r["ok"] != true).collect()
}

fn step_text(step: &Value) -> &str {
    step["result"]["content"][0]["text"].as_str().unwrap_or_else(|| panic!("no text result: {step}"))
}

#[test]
fn server_requests_right_after_connecting_reach_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record.jsonl");
    let server = test_server_http_with(&["--get-delay", GET_DELAY_MS], &record);
    let policy = write_policy(dir.path(), "policy.yaml", POLICY);
    let upstream = format!("http://127.0.0.1:{}/mcp", server.port);
    let proxy = proxy(&[&policy], &["--upstream".into(), upstream], &[]);

    // `via: get-once`: the server sends its request once, on the session's GET stream.
    let cases = [
        (
            "ask",
            json!({"prompt": "2+2?", "via": "get-once"}),
            "sampling/createMessage",
            "sampled: sampled-here <- 2+2? (model callback-model)",
        ),
        (
            "elicit",
            json!({"message": "name?", "via": "get-once"}),
            "elicitation/create",
            r#"elicited: accept {"name":"ada"}"#,
        ),
    ];
    let mut sessions = 0;
    for (tool, args, method, want) in cases {
        let n = 40;
        let script = json!([{"op": "call", "tool": tool, "args": args}]);
        let (lines, summary) = rounds(&proxy.url(), n, 10_000, &script);
        let failed = failed_rounds(&lines);
        assert!(failed.is_empty(), "{tool}: {} of {} rounds lost: {:?}", failed.len(), summary["run"], failed.first());
        assert_eq!(summary["run"], n, "{summary}");
        assert_eq!(summary["failed"], 0, "{summary}");
        for round in &lines {
            assert_eq!(step_text(&round["steps"][0]), want, "{round}");
            let served = round["served"].as_array().unwrap();
            assert_eq!(served.len(), 1, "{round}");
            assert_eq!(served[0]["method"], method, "{round}");
        }
        sessions += n as usize;
    }
    // Every session reached the server and its tool ran (once).
    let recs = records(&record);
    assert_eq!(recs.iter().filter(|r| r["kind"] == "open").count(), sessions);
    assert_eq!(recs.iter().filter(|r| r["kind"] == "call").count(), sessions);
}

/// The same without a slow upstream: the POST overtook the GET in a few per cent of the
/// rounds (7 of 200 when measured), so in nearly every run of 150 rounds.
#[test]
fn server_requests_right_after_connecting_reach_the_client_at_full_speed() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record.jsonl");
    let server = test_server_http_with(&[], &record);
    let policy = write_policy(dir.path(), "policy.yaml", POLICY);
    let upstream = format!("http://127.0.0.1:{}/mcp", server.port);
    let proxy = proxy(&[&policy], &["--upstream".into(), upstream], &[]);
    let script = json!([{"op": "call", "tool": "ask", "args": {"prompt": "2+2?", "via": "get-once"}}]);
    let (lines, summary) = rounds(&proxy.url(), 150, 10_000, &script);
    let failed = failed_rounds(&lines);
    assert!(failed.is_empty(), "{} of {} rounds lost: {:?}", failed.len(), summary["run"], failed.first());
    assert_eq!(summary["run"], 150, "{summary}");
}

/// A server without GET streams answers each GET 405: once it has, the session's POSTs do
/// not wait for anything (the proxy keeps no GET of the session pending).
#[test]
fn a_refused_get_stream_does_not_hold_the_sessions_posts() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record.jsonl");
    let server = test_server_http_with(&["--get-delay", GET_DELAY_MS, "--no-get-stream"], &record);
    let policy = write_policy(dir.path(), "policy.yaml", POLICY);
    let upstream = format!("http://127.0.0.1:{}/mcp", server.port);
    let proxy = proxy(&[&policy], &["--upstream".into(), upstream], &[]);

    let calls = 10;
    let mut script = vec![json!({"op": "call", "tool": "ask", "args": {"prompt": "hi"}})];
    script.extend((0..calls).map(|i| json!({"op": "call", "tool": "echo", "args": {"text": format!("t{i}")}})));
    let (lines, summary) = rounds(&proxy.url(), 5, 10_000, &Value::Array(script));
    assert!(failed_rounds(&lines).is_empty(), "{lines:?}");
    assert_eq!(summary["run"], 5, "{summary}");
    for round in &lines {
        // The request tied to the call travels on the POST's own stream.
        assert_eq!(step_text(&round["steps"][0]), "sampled: sampled-here <- hi (model callback-model)", "{round}");
        assert_eq!(step_text(&round["steps"][calls]), format!("echo: t{}", calls - 1), "{round}");
        // Had the refused GET stayed pending, each of the 11 POSTs would have waited the
        // whole bound (2 s): 22 s. Unloaded, a round takes well under a second.
        let ms = round["ms"].as_u64().unwrap();
        assert!(ms < 11_000, "a round took {ms} ms: POSTs waited for a GET that was refused");
    }
}
