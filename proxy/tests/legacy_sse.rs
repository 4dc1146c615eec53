//! The 2024-11-05 HTTP+SSE transport through toolgate-proxy, both ways, and the server's
//! requests to the client (sampling, roots, elicitation) on every upstream kind.
//!
//! The upstream is tests/node/test-server.mjs (the official SDK's SSEServerTransport,
//! StreamableHTTPServerTransport or stdio), which records every POST body, every message
//! and every tool handler that ran; the client is tests/node/callback-client.mjs (the SDK's
//! StreamableHTTPClientTransport or SSEClientTransport), which answers the server's
//! requests with values each test picks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/callbacks.rs"]
mod callbacks;
mod support;

use std::path::Path;

use callbacks::*;
use serde_json::{Value, json};
use support::*;

const POLICY: &str = r#"
version: "1"
default: deny
hide: [secret-tool]
tools:
  echo: {}
  ask: {}
  roots: {}
  elicit: {}
  secret-tool: {}
  start-pod:
    limits:
      - {counter: starts, window: minute, max: 2, scope: grant}
"#;

/// What the policy lets a caller see, in the server's order.
const VISIBLE: [&str; 5] = ["echo", "start-pod", "ask", "roots", "elicit"];

fn call(tool: &str, args: Value) -> Value {
    json!({"op": "call", "tool": tool, "args": args})
}

fn answers(tag: &str) -> Answers {
    Answers {
        sampling: format!("sampled-by-{tag}"),
        roots: vec![format!("file:///work/{tag}"), "file:///tmp/other".into()],
        elicit: json!({"name": format!("user-{tag}")}),
    }
}

fn policy_file(dir: &Path) -> std::path::PathBuf {
    write_policy(dir, "policy.yaml", POLICY)
}

fn proxy_args(upstream: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
    v.extend(["--upstream".to_owned(), upstream.to_owned()]);
    v
}

fn tool_names(step: &Value) -> Vec<String> {
    step["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap().to_owned()).collect()
}

fn error_code(step: &Value) -> Option<i64> {
    step["error"]["code"].as_i64()
}

/// The script every client runs: listing, allowed, denied, hidden and rate-limited calls,
/// and the three tools that ask the client back.
fn policed_script(via: &str) -> Value {
    json!([
        {"op": "list"},
        call("echo", json!({"text": "hi"})),
        call("delete-pod", json!({"podId": "pod-1"})),
        call("secret-tool", json!({})),
        call("start-pod", json!({"podId": "pod-2"})),
        call("start-pod", json!({"podId": "pod-2"})),
        call("start-pod", json!({"podId": "pod-2"})),
        call("ask", json!({"prompt": "what is 2+2?", "via": via})),
        call("roots", json!({"via": via})),
        call("elicit", json!({"message": "who are you?", "via": via})),
    ])
}

/// Checks the outcome of [`policed_script`] as the client saw it, the record of what reached
/// the server, and what the client was asked.
fn assert_policed(out: &[Value], served: &[Value], tag: &str, record: &Path) {
    assert_eq!(out.len(), 10, "{out:?}");
    assert_eq!(tool_names(&out[0]), VISIBLE, "tools/list shows only what the caller may call");
    assert_eq!(result_text(&out[1]), "echo: hi", "{}", out[1]);
    assert_eq!(error_code(&out[2]), Some(-32010), "{}", out[2]);
    assert_eq!(out[2]["error"]["data"]["decision"], "deny", "{}", out[2]);
    assert_eq!(error_code(&out[3]), Some(-32010), "{}", out[3]);
    assert_eq!(out[3]["error"]["data"]["decision"], "hidden", "{}", out[3]);
    assert_eq!(result_text(&out[4]), "started pod-2", "{}", out[4]);
    assert_eq!(result_text(&out[5]), "started pod-2", "{}", out[5]);
    assert_eq!(error_code(&out[6]), Some(-32011), "{}", out[6]);
    let retry = out[6]["error"]["data"]["retryAfterSeconds"].as_u64().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(result_text(&out[7]), format!("sampled: sampled-by-{tag} <- what is 2+2? (model callback-model)"));
    assert_eq!(result_text(&out[8]), format!("roots: file:///work/{tag},file:///tmp/other"));
    assert_eq!(result_text(&out[9]), format!("elicited: accept {{\"name\":\"user-{tag}\"}}"));
    let methods: Vec<&str> = served.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(methods, ["sampling/createMessage", "roots/list", "elicitation/create"], "{served:?}");
    assert_eq!(served[0]["params"]["messages"][0]["content"]["text"], "what is 2+2?");
    assert_eq!(served[2]["params"]["message"], "who are you?");

    assert_eq!(
        called_tools(record),
        ["echo", "start-pod", "start-pod", "ask", "roots", "elicit"],
        "exactly the allowed calls reached the server"
    );
    assert!(!reached(record, "delete-pod"), "a denied call reached the server");
    assert!(!reached(record, "secret-tool"), "a hidden call reached the server");
}

fn assert_decision_metrics(proxy: &Proxy) {
    let m = metrics(proxy);
    for (prefix, want) in [
        (r#"toolgate_decisions_total{tool="echo",decision="allow""#, 1.0),
        (r#"toolgate_decisions_total{tool="start-pod",decision="allow""#, 2.0),
        (r#"toolgate_decisions_total{tool="start-pod",decision="rate_limited""#, 1.0),
        (r#"toolgate_decisions_total{tool="delete-pod",decision="deny""#, 1.0),
        (r#"toolgate_decisions_total{tool="secret-tool",decision="hidden""#, 1.0),
        (r#"toolgate_decisions_total{tool="ask",decision="allow""#, 1.0),
    ] {
        assert_eq!(sample(&m, prefix), want, "{prefix}\n{m}");
    }
}

#[test]
fn a_legacy_upstream_is_detected_and_every_call_policed() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record.jsonl");
    let server = test_server("--sse", &record);
    let sse_url = format!("http://127.0.0.1:{}/sse", server.port);
    let proxy = proxy(&[&policy_file(dir.path())], &proxy_args(&sse_url, &[]), &[]);

    let (out, served) = callback_client(&over_http(&proxy, "agent-a"), &answers("a"), &policed_script("post"));
    assert_policed(&out, &served, "a", &record);
    let recs = records(&record);
    assert_eq!(recs.iter().filter(|r| r["kind"] == "open").count(), 1, "one SSE connection for the session");
    assert!(
        recs.iter().any(|r| r["kind"] == "post" && r["path"].as_str().unwrap().starts_with("/messages?sessionId=")),
        "the proxy POSTed to the endpoint the server named"
    );
    assert_decision_metrics(&proxy);
    let audit = proxy.audit_when("9 lines", |a| a.len() >= 9);
    assert_eq!(audit.len(), 9, "one audit line per decision: {audit:?}");
    assert!(audit.iter().all(|a| a["identity"] == toolgate_policy::fingerprint("Bearer agent-a")));

    // Another caller is another grant with its own limit, on its own upstream session.
    let (out, _) = callback_client(
        &over_http(&proxy, "agent-b"),
        &answers("b"),
        &json!([call("start-pod", json!({"podId": "pod-3"}))]),
    );
    assert_eq!(result_text(&out[0]), "started pod-3", "{}", out[0]);
    assert_eq!(records(&record).iter().filter(|r| r["kind"] == "open").count(), 2);
}

/// A raw Streamable-HTTP session through the proxy (to send exactly the bytes a client
/// might).
struct Raw {
    port: u16,
    session: String,
}

impl Raw {
    fn initialize(port: u16) -> Self {
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}});
        let (status, head, body) = http(port, "POST", "/mcp", &JSON, init.to_string().as_bytes());
        assert_eq!(status, 200, "{head}{}", String::from_utf8_lossy(&body));
        let session = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("mcp-session-id:").map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| panic!("no Mcp-Session-Id: {head}"));
        let answer: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(answer["result"]["serverInfo"]["name"], "toolgate-test-server", "{answer}");
        let raw = Raw { port, session };
        let (status, _, _) = raw.post(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string());
        assert_eq!(status, 202);
        raw
    }

    fn post_with(&self, extra: &[(&str, &str)], body: &str) -> (u16, String, Value) {
        let mut headers = JSON.to_vec();
        headers.push(("Mcp-Session-Id", &self.session));
        headers.extend_from_slice(extra);
        let (status, head, body) = http(self.port, "POST", "/mcp", &headers, body.as_bytes());
        (status, head, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    fn post(&self, body: &str) -> (u16, String, Value) {
        self.post_with(&[], body)
    }
}

const JSON: [(&str, &str); 2] =
    [("Content-Type", "application/json"), ("Accept", "application/json, text/event-stream")];

fn tools_call(id: i64, tool: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": {"podId": "pod-1"}}})
}

#[test]
fn batches_and_malformed_messages_are_refused_before_a_legacy_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record.jsonl");
    let server = test_server("--sse", &record);
    let sse_url = format!("http://127.0.0.1:{}/sse", server.port);
    let proxy = proxy(&[&policy_file(dir.path())], &proxy_args(&sse_url, &["--max-body-bytes", "2048"]), &[]);
    let raw = Raw::initialize(proxy.proc.port);

    // Allowed: reaches the server, answered with its result.
    let (status, _, v) = raw.post(&tools_call(1, "echo").to_string());
    assert_eq!((status, v["result"]["content"][0]["text"].as_str()), (200, Some("echo: ")), "{v}");

    // A batch with a refused element is refused whole.
    let batch = json!([tools_call(2, "echo"), tools_call(3, "delete-pod")]).to_string();
    let (status, _, v) = raw.post(&batch);
    assert_eq!(status, 200);
    assert_eq!(v[0]["id"], 2);
    assert_eq!(v[0]["error"]["code"], -32010, "{v}");
    assert!(v[0]["error"]["message"].as_str().unwrap().contains("batch refused"), "{v}");
    assert_eq!(v[1]["error"]["code"], -32010, "{v}");
    assert_eq!(v[1]["error"]["data"]["decision"], "deny", "{v}");

    for (what, extra, body, want_status, want_code) in [
        ("not JSON", vec![], "{".to_owned(), 400, Some(-32700)),
        (
            "duplicate keys",
            vec![],
            r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"echo","name":"delete-pod"}}"#.to_owned(),
            400,
            Some(-32700),
        ),
        (
            "tools/call as a notification",
            vec![],
            json!({"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "delete-pod"}}).to_string(),
            400,
            Some(-32600),
        ),
        (
            "arguments not an object",
            vec![],
            json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "delete-pod", "arguments": "{}"}})
                .to_string(),
            200,
            Some(-32602),
        ),
        (
            "Mcp-Name disagrees with the body",
            vec![("Mcp-Method", "tools/call"), ("Mcp-Name", "echo")],
            tools_call(6, "delete-pod").to_string(),
            400,
            Some(-32600),
        ),
        (
            "encoded body",
            vec![("Content-Encoding", "gzip")],
            tools_call(7, "delete-pod").to_string(),
            415,
            Some(-32600),
        ),
        (
            "oversized body",
            vec![],
            json!({"jsonrpc": "2.0", "id": 8, "method": "tools/call",
                   "params": {"name": "delete-pod", "arguments": {"pad": "x".repeat(4096)}}})
            .to_string(),
            413,
            Some(-32600),
        ),
    ] {
        let (status, _, v) = raw.post_with(&extra, &body);
        assert_eq!(status, want_status, "{what}: {v}");
        assert_eq!(v["error"]["code"].as_i64(), want_code, "{what}: {v}");
    }
    // Nothing refused reached the server; the allowed call did, once.
    assert_eq!(called_tools(&record), ["echo"]);
    assert!(!reached(&record, "delete-pod"), "{:?}", records(&record));
    let posts = records(&record).iter().filter(|r| r["kind"] == "post").count();
    assert_eq!(posts, 3, "initialize, initialized and the one allowed call: {:?}", records(&record));

    // DELETE ends the session: the proxy closes its SSE connection to the server.
    let (status, _, _) = http(proxy.proc.port, "DELETE", "/mcp", &[("Mcp-Session-Id", &raw.session)], b"");
    assert_eq!(status, 200);
    eventually(10, "the server saw its SSE connection close", || {
        records(&record).iter().any(|r| r["kind"] == "closed")
    });
    let (status, _, v) = raw.post(&tools_call(9, "echo").to_string());
    assert_eq!(status, 404, "an ended session is unknown: {v}");
}

#[test]
fn the_transport_flag_and_the_session_limit() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record.jsonl");
    let server = test_server("--sse", &record);
    let sse_url = format!("http://127.0.0.1:{}/sse", server.port);
    let policy = policy_file(dir.path());

    // Forced Streamable HTTP: the legacy server's 404 goes to the client, nothing is translated.
    let streamable = proxy(&[&policy], &proxy_args(&sse_url, &["--upstream-transport", "streamable"]), &[]);
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}});
    let (status, _, _) = http(streamable.proc.port, "POST", "/mcp", &JSON, init.to_string().as_bytes());
    assert_eq!(status, 404);
    assert!(!records(&record).iter().any(|r| r["kind"] == "open"), "no SSE connection was opened");

    // Forced SSE, one session at most.
    let sse = proxy(&[&policy], &proxy_args(&sse_url, &["--upstream-transport", "sse", "--max-sessions", "1"]), &[]);
    let first = Raw::initialize(sse.proc.port);
    let (status, _, body) = http(sse.proc.port, "POST", "/mcp", &JSON, init.to_string().as_bytes());
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, v["error"]["code"].as_i64()), (502, Some(-32014)), "{v}");
    // With one session in all, the caller's fair share is that one.
    assert!(v["error"]["message"].as_str().unwrap().contains("already holds its share of MCP sessions (1"), "{v}");
    let (status, _, v) = first.post(&tools_call(1, "echo").to_string());
    assert_eq!((status, v["result"]["content"][0]["text"].as_str()), (200, Some("echo: ")), "{v}");
    let (status, _, _) = http(sse.proc.port, "DELETE", "/mcp", &[("Mcp-Session-Id", &first.session)], b"");
    assert_eq!(status, 200);
    let second = Raw::initialize(sse.proc.port);
    assert_ne!(second.session, first.session);
    let m = metrics(&sse);
    assert_eq!(sample(&m, r#"toolgate_upstream_errors_total{kind="sessions"}"#), 1.0, "{m}");
}

#[test]
fn server_requests_reach_the_client_through_http_and_stdio_upstreams() {
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_file(dir.path());

    // Streamable HTTP upstream: requests tied to the call (on the POST's SSE answer) and
    // unrelated ones (on the client's GET stream, which the proxy forwards).
    let record = dir.path().join("http.jsonl");
    let server = test_server("--http", &record);
    let proxy_http = proxy(&[&policy], &proxy_args(&format!("http://127.0.0.1:{}/mcp", server.port), &[]), &[]);
    for (via, tag) in [("post", "h1"), ("get", "h2")] {
        let (out, served) = callback_client(&over_http(&proxy_http, tag), &answers(tag), &policed_script(via));
        assert_policed(&out, &served, tag, &record);
        std::fs::remove_file(&record).unwrap();
    }

    // A child per session over stdio: everything the child asks goes on the GET stream.
    let record = dir.path().join("stdio.jsonl");
    let mut tail = vec!["--".to_owned()];
    tail.extend(test_server_stdio_command());
    let proxy_stdio = proxy(&[&policy], &tail, &[("TEST_SERVER_RECORD", record.display().to_string())]);
    let (out, served) = callback_client(&over_http(&proxy_stdio, "s"), &answers("s"), &policed_script("post"));
    assert_policed(&out, &served, "s", &record);
    assert_decision_metrics(&proxy_stdio);
}

#[test]
fn legacy_clients_are_served_at_sse_and_messages() {
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_file(dir.path());
    let sse_client = |proxy: &Proxy, token: &str| {
        vec![
            "--sse".to_owned(),
            format!("http://127.0.0.1:{}/sse", proxy.proc.port),
            "--header".to_owned(),
            format!("Authorization: Bearer {token}"),
        ]
    };

    // In front of a Streamable-HTTP server.
    let record = dir.path().join("http.jsonl");
    let server = test_server("--http", &record);
    let proxy_http = proxy(&[&policy], &proxy_args(&format!("http://127.0.0.1:{}/mcp", server.port), &[]), &[]);
    for (via, tag) in [("post", "l1"), ("get", "l2")] {
        let (out, served) = callback_client(&sse_client(&proxy_http, tag), &answers(tag), &policed_script(via));
        assert_policed(&out, &served, tag, &record);
        // The client went away: the proxy ends the upstream session it held for it.
        eventually(10, "the upstream session was ended", || records(&record).iter().any(|r| r["kind"] == "closed"));
        std::fs::remove_file(&record).unwrap();
    }

    // In front of a child process, and in front of a 2024-11-05 server.
    let record = dir.path().join("stdio.jsonl");
    let mut tail = vec!["--".to_owned()];
    tail.extend(test_server_stdio_command());
    let proxy_stdio = proxy(&[&policy], &tail, &[("TEST_SERVER_RECORD", record.display().to_string())]);
    let (out, served) = callback_client(&sse_client(&proxy_stdio, "l3"), &answers("l3"), &policed_script("post"));
    assert_policed(&out, &served, "l3", &record);

    let record = dir.path().join("sse.jsonl");
    let server = test_server("--sse", &record);
    let proxy_sse = proxy(&[&policy], &proxy_args(&format!("http://127.0.0.1:{}/sse", server.port), &[]), &[]);
    let (out, served) = callback_client(&sse_client(&proxy_sse, "l4"), &answers("l4"), &policed_script("post"));
    assert_policed(&out, &served, "l4", &record);
}

#[test]
fn legacy_client_endpoints_refuse_like_mcp() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record.jsonl");
    let server = test_server("--http", &record);
    let proxy =
        proxy(&[&policy_file(dir.path())], &proxy_args(&format!("http://127.0.0.1:{}/mcp", server.port), &[]), &[]);
    let port = proxy.proc.port;

    let (status, _, _) =
        http(port, "POST", "/messages?sessionId=nope", &JSON, tools_call(1, "echo").to_string().as_bytes());
    assert_eq!(status, 404);
    let (status, head, _) = http(port, "POST", "/sse", &JSON, b"{}");
    assert_eq!(status, 405, "{head}");

    let (status, head, mut stream) = SseStream::open(port, "/sse", &[]);
    assert_eq!(status, 200, "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/event-stream"), "{head}");
    let (kind, endpoint) = stream.next_event();
    assert_eq!(kind, "endpoint");
    assert!(endpoint.starts_with("/messages?sessionId="), "{endpoint}");

    // Unreadable bodies are refused on the POST itself, as on /mcp.
    let (status, _, body) = http(port, "POST", &endpoint, &JSON, b"{");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, v["error"]["code"].as_i64()), (400, Some(-32700)), "{v}");
    // A refused call: 202, and the refusal arrives on the stream with the call's id.
    let (status, _, _) = http(port, "POST", &endpoint, &JSON, tools_call(7, "delete-pod").to_string().as_bytes());
    assert_eq!(status, 202);
    let (kind, data) = stream.next_event();
    let v: Value = serde_json::from_str(&data).unwrap();
    assert_eq!((kind.as_str(), &v["id"], &v["error"]["code"]), ("message", &json!(7), &json!(-32010)), "{v}");
    // A refused batch: one event per element.
    let batch = json!([tools_call(8, "echo"), tools_call(9, "secret-tool")]).to_string();
    let (status, _, _) = http(port, "POST", &endpoint, &JSON, batch.as_bytes());
    assert_eq!(status, 202);
    let first: Value = serde_json::from_str(&stream.next_event().1).unwrap();
    let second: Value = serde_json::from_str(&stream.next_event().1).unwrap();
    assert_eq!((&first["id"], &first["error"]["code"]), (&json!(8), &json!(-32010)), "{first}");
    assert_eq!(second["error"]["data"]["decision"], "hidden", "{second}");
    assert!(!reached(&record, "delete-pod") && !reached(&record, "secret-tool") && !reached(&record, "echo"));

    // The stream closed: its session is gone.
    stream.close();
    eventually(10, "the closed /sse session is forgotten", || {
        http(port, "POST", &endpoint, &JSON, tools_call(10, "echo").to_string().as_bytes()).0 == 404
    });
}

#[test]
fn a_request_id_already_waiting_is_refused_and_server_requests_use_the_get_stream() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record.jsonl");
    let server = test_server("--sse", &record);
    let sse_url = format!("http://127.0.0.1:{}/sse", server.port);
    let proxy = proxy(&[&policy_file(dir.path())], &proxy_args(&sse_url, &["--upstream-transport", "sse"]), &[]);
    let raw = Raw::initialize(proxy.proc.port);
    let (status, head, mut events) = SseStream::open(proxy.proc.port, "/mcp", &[("Mcp-Session-Id", &raw.session)]);
    assert_eq!(status, 200, "{head}");

    // `ask` waits for the client's sampling answer; meanwhile its id is taken.
    let ask = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
                     "params": {"name": "ask", "arguments": {"prompt": "raw?"}}})
    .to_string();
    let waiting = {
        let (port, session) = (raw.port, raw.session.clone());
        std::thread::spawn(move || Raw { port, session }.post(&ask))
    };
    let (kind, data) = events.next_event();
    let request: Value = serde_json::from_str(&data).unwrap();
    assert_eq!((kind.as_str(), &request["method"]), ("message", &json!("sampling/createMessage")), "{request}");
    assert_eq!(request["params"]["messages"][0]["content"]["text"], "raw?");

    // A second request with id 5 would get the first one's answer (or the other way round):
    // refused, not forwarded.
    let (status, _, v) = raw.post(&json!({"jsonrpc": "2.0", "id": 5, "method": "tools/list"}).to_string());
    assert_eq!((status, v["error"]["code"].as_i64()), (400, Some(-32600)), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("already waiting"), "{v}");
    let lists =
        records(&record).iter().filter(|r| r["kind"] == "message" && r["message"]["method"] == "tools/list").count();
    assert_eq!(lists, 0, "the refused request reached the server");

    // The client answers the server's request with a POST; the waiting call completes.
    let answer = json!({"jsonrpc": "2.0", "id": request["id"], "result": {
        "role": "assistant", "content": {"type": "text", "text": "raw answer"}, "model": "m"}});
    let (status, _, _) = raw.post(&answer.to_string());
    assert_eq!(status, 202);
    let (status, _, v) = waiting.join().unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["result"]["content"][0]["text"], "sampled: raw answer (model m)", "{v}");
    // The id is free again.
    let (status, _, v) = raw.post(&json!({"jsonrpc": "2.0", "id": 5, "method": "tools/list"}).to_string());
    assert_eq!(status, 200, "{v}");
    let names: Vec<&str> =
        v["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, VISIBLE, "filtered for this caller too");
    events.close();
}

#[test]
fn when_a_legacy_upstream_ends_its_stream_waiting_calls_fail_and_keep_their_quota_spent() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record.jsonl");
    let policy = write_policy(
        dir.path(),
        "one-ask.yaml",
        r#"{"version":"1","default":"allow","tools":{"ask":{"limits":[{"counter":"asks","window":"minute","max":1,"scope":"global"}]}}}"#,
    );
    let server = test_server("--sse", &record);
    let port = server.port;
    let proxy =
        proxy(&[&policy], &proxy_args(&format!("http://127.0.0.1:{port}/sse"), &["--upstream-transport", "sse"]), &[]);
    let raw = Raw::initialize(proxy.proc.port);
    let ask = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                     "params": {"name": "ask", "arguments": {"prompt": "never answered"}}})
    .to_string();
    let waiting = {
        let (port, session) = (raw.port, raw.session.clone());
        std::thread::spawn(move || Raw { port, session }.post(&ask))
    };
    eventually(10, "the call reached the server", || called_tools(&record) == ["ask"]);
    drop(server);

    let (status, _, v) = waiting.join().unwrap();
    assert_eq!((status, v["error"]["code"].as_i64()), (502, Some(-32014)), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("SSE stream ended"), "{v}");
    let (status, _, v) = raw.post(&tools_call(2, "echo").to_string());
    assert_eq!(status, 404, "the session is over: {v}");

    // The call reached the server, which may have acted on it: its quota stays spent
    // (never admit more than the limit), so the one call a minute is used up.
    let _server = test_server_on(port, &record);
    let (out, _) =
        callback_client(&over_http(&proxy, "x"), &answers("again"), &json!([call("ask", json!({"prompt": "now?"}))]));
    assert_eq!(error_code(&out[0]), Some(-32011), "{}", out[0]);
    let m = metrics(&proxy);
    assert_eq!(sample(&m, r#"toolgate_decisions_total{tool="ask",decision="allow""#), 1.0, "{m}");
    assert_eq!(sample(&m, r#"toolgate_decisions_total{tool="ask",decision="rate_limited""#), 1.0, "{m}");
}
