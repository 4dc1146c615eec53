//! DNS-rebinding protection: the proxy checks `Host` and `Origin` before anything else, in
//! front of an HTTP upstream and of a `-- CMD` child, and the MCP conformance suite's
//! `dns-rebinding-protection` scenario (tests/node, `@modelcontextprotocol/conformance`)
//! passes through it. Needs `make node`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/callbacks.rs"]
mod callbacks;
#[path = "support/mock_mcp.rs"]
mod mock_mcp;
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use callbacks::{records, test_server, test_server_stdio_command};
use mock_mcp::{Client, MockMcp};
use serde_json::{Value, json};
use support::{Proxy, node_dir, proxy, sample, write_policy};

const ALLOW_ALL: &str = r#"{"version": "1", "default": "allow"}"#;

/// One HTTP/1.1 request with exactly these headers (`Host` included) to the proxy's `/mcp`.
fn post(port: u16, headers: &[(&str, &str)], body: &Value) -> (u16, Value) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = body.to_string();
    let mut req = "POST /mcp HTTP/1.1\r\nConnection: close\r\nContent-Type: application/json\r\n\
                   Accept: application/json, text/event-stream\r\n"
        .to_owned();
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    // A JSON answer, or the first event of an SSE one.
    let json = body.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or(body);
    (status, serde_json::from_str(json).unwrap_or(Value::Null))
}

fn initialize() -> Value {
    json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}})
}

/// The rebinding and cross-site requests the proxy must refuse, with a refusal that names
/// the header and the flag, counted by reason.
fn assert_refused(p: &Proxy, port_host: &str) {
    let count =
        |reason: &str| sample(&support::metrics(p), &format!("toolgate_requests_refused_total{{reason=\"{reason}\"}}"));
    let (hosts, origins) = (count("host"), count("origin"));
    let bad: [&[(&str, &str)]; 4] = [
        &[("Host", "evil.example")],
        &[("Host", "evil.example:8080")],
        &[("Host", port_host), ("Origin", "http://evil.example")],
        &[("Host", "localhost.evil.example"), ("Origin", "http://localhost")],
    ];
    for headers in bad {
        let (status, answer) = post(p.proc.port, headers, &initialize());
        assert_eq!(status, 403, "{headers:?}: {answer}");
        assert_eq!(answer["error"]["code"], -32600, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        let named = if headers.iter().any(|(k, v)| *k == "Host" && v.contains("evil")) {
            message.contains("Host") && message.contains("--allowed-hosts")
        } else {
            message.contains("Origin") && message.contains("--allowed-origins")
        };
        assert!(named, "{headers:?}: {message}");
    }
    assert_eq!(count("host") - hosts, 3.0);
    assert_eq!(count("origin") - origins, 1.0);
}

fn assert_allowed(p: &Proxy, port_host: &str) {
    for headers in [
        vec![("Host", port_host)],
        vec![("Host", "localhost")],
        vec![("Host", "[::1]:1234"), ("Origin", "http://localhost:6274")],
        vec![("Host", "mcp.example.com"), ("Origin", "https://mcp.example.com")],
        vec![("Host", port_host), ("Origin", "https://app.example.org")],
    ] {
        let (status, answer) = post(p.proc.port, &headers, &initialize());
        assert_eq!(status, 200, "{headers:?}: {answer}");
        assert!(answer["result"]["serverInfo"].is_object(), "{headers:?}: {answer}");
    }
}

#[test]
fn rebinding_hosts_and_foreign_origins_get_403_before_an_http_upstream() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mock = MockMcp::start(&rt);
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), "allow.json", ALLOW_ALL);
    let tail = [
        "--upstream".to_owned(),
        mock.url(),
        "--allowed-hosts=mcp.example.com".to_owned(),
        "--allowed-origins=https://app.example.org".to_owned(),
    ];
    let p = proxy(&[&policy], &tail, &[]);
    let port_host = format!("127.0.0.1:{}", p.proc.port);
    // A call with a rebinding Host never reaches the upstream, even in a live session.
    let mut client = Client::initialize(p.proc.port, "t");
    let call = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "echo", "arguments": {}}});
    let (status, _) = post(p.proc.port, &[("Host", "evil.example"), ("Mcp-Session-Id", &client.session)], &call);
    assert_eq!(status, 403);
    assert_eq!(mock.called("echo"), 0, "the refused call reached the upstream");
    assert_eq!(client.call("echo")["result"]["content"][0]["text"], "called echo");
    assert_refused(&p, &port_host);
    assert_allowed(&p, &port_host);
}

#[test]
fn rebinding_hosts_and_foreign_origins_get_403_before_a_child() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), "allow.json", ALLOW_ALL);
    let record = dir.path().join("record.jsonl");
    let mut tail =
        vec!["--allowed-hosts=mcp.example.com".to_owned(), "--allowed-origins=https://app.example.org".to_owned()];
    tail.push("--".into());
    tail.extend(test_server_stdio_command());
    let p = proxy(&[&policy], &tail, &[("TEST_SERVER_RECORD", record.display().to_string())]);
    let port_host = format!("127.0.0.1:{}", p.proc.port);
    assert_refused(&p, &port_host);
    // Nothing reached a child: none was even started.
    assert!(records(&record).is_empty(), "{:?}", records(&record));
    assert_allowed(&p, &port_host);
    assert!(records(&record).iter().any(|r| r["message"]["method"] == "initialize"), "{:?}", records(&record));
}

/// Runs the conformance suite's `dns-rebinding-protection` scenario against `url`;
/// returns (passed, output).
fn conformance(url: &str) -> (bool, String) {
    let cli = node_dir().join("node_modules/@modelcontextprotocol/conformance/dist/index.js");
    // It writes its results under ./results: keep them out of the source tree.
    let scratch = tempfile::tempdir().unwrap();
    let out = Command::new("node")
        .current_dir(scratch.path())
        .arg(&cli)
        .args(["server", "--url", url, "--scenario", "dns-rebinding-protection"])
        .env("NO_COLOR", "1")
        .output()
        .expect("run the conformance suite");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success() && text.contains("Passed: 2/2"), text)
}

fn allow_policy(dir: &Path) -> std::path::PathBuf {
    write_policy(dir, "allow.json", ALLOW_ALL)
}

#[test]
fn the_conformance_dns_rebinding_scenario_passes_through_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let policy = allow_policy(dir.path());
    // The SDK server over HTTP does not check Host itself (the scenario fails directly) …
    let server = test_server("--http", &dir.path().join("http.jsonl"));
    let direct = format!("http://127.0.0.1:{}/mcp", server.port);
    let (passed, text) = conformance(&direct);
    assert!(!passed, "the upstream protects itself, so this test would prove nothing:\n{text}");
    // … through the proxy it passes: HTTP upstream …
    let p = proxy(&[&policy], &["--upstream".to_owned(), direct], &[]);
    let (passed, text) = conformance(&p.url());
    assert!(passed, "HTTP upstream:\n{text}");
    // … and a `-- CMD` child.
    let mut tail = vec!["--".to_owned()];
    tail.extend(test_server_stdio_command());
    let p = proxy(&[&policy], &tail, &[("TEST_SERVER_RECORD", dir.path().join("stdio.jsonl").display().to_string())]);
    let (passed, text) = conformance(&p.url());
    assert!(passed, "child process:\n{text}");
}
