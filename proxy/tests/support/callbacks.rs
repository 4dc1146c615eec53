//! tests/node/test-server.mjs (an SDK server that records what reached it and asks its
//! client back) and tests/node/callback-client.mjs (an SDK client that answers sampling,
//! roots and elicitation), for the transport tests. Used with `#[path]` next to
//! `mod support;`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Proc, node_dir};

/// The command line of test-server.mjs over stdio (for `-- CMD`).
pub fn test_server_stdio_command() -> Vec<String> {
    vec!["node".into(), node_dir().join("test-server.mjs").display().to_string(), "--stdio".into()]
}

/// test-server.mjs over HTTP: `mode` is `--http` (Streamable HTTP at /mcp) or `--sse`
/// (2024-11-05 HTTP+SSE at /sse and /messages); it records into `record`.
pub fn test_server(mode: &str, record: &Path) -> Proc {
    spawn_test_server(mode, 0, record, &[])
}

/// The test server over Streamable HTTP on a free port with `extra` options
/// (`--get-delay MS`, `--no-get-stream`).
pub fn test_server_http_with(extra: &[&str], record: &Path) -> Proc {
    spawn_test_server("--http", 0, record, extra)
}

/// test-server.mjs in `--sse` mode again on a port one had (its predecessor is gone).
pub fn test_server_on(port: u16, record: &Path) -> Proc {
    spawn_test_server("--sse", port, record, &[])
}

fn spawn_test_server(mode: &str, port: u16, record: &Path, extra: &[&str]) -> Proc {
    let mut child = Command::new("node")
        .current_dir(node_dir())
        .args(["test-server.mjs", mode, "--port", &port.to_string(), "--record"])
        .arg(record)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn test-server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("LISTENING line");
    let port = line.trim().strip_prefix("LISTENING ").and_then(|p| p.parse().ok()).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("test-server did not print LISTENING <port>, got {line:?}")
    });
    Proc { child, port, name: "test-server" }
}

/// What test-server.mjs recorded so far.
pub fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("record line {l:?}: {e}")))
        .collect()
}

/// Tools whose handlers ran, in order.
pub fn called_tools(path: &Path) -> Vec<String> {
    records(path).iter().filter(|r| r["kind"] == "call").map(|r| r["tool"].as_str().unwrap().to_owned()).collect()
}

/// Whether any message or raw POST body that reached the server names `tool` in a call.
pub fn reached(path: &Path, tool: &str) -> bool {
    let needle = format!("\"name\":\"{tool}\"");
    records(path).iter().any(|r| match r["kind"].as_str() {
        Some("message") => r["message"]["params"]["name"] == tool,
        Some("post") => r["body"].as_str().unwrap().replace(' ', "").contains(&needle),
        Some("call") => r["tool"] == tool,
        _ => false,
    })
}

/// Polls `cond` until it holds, failing after `secs`.
pub fn eventually(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How callback-client.mjs answers the server's requests.
pub struct Answers {
    pub sampling: String,
    pub roots: Vec<String>,
    pub elicit: Value,
}

impl Answers {
    pub fn args(&self) -> Vec<String> {
        vec![
            "--sampling".into(),
            self.sampling.clone(),
            "--roots".into(),
            self.roots.join(","),
            "--elicit".into(),
            self.elicit.to_string(),
        ]
    }
}

/// Runs callback-client.mjs: `target` is `--url URL`, `--sse URL` (plus headers) or
/// `--stdio -- CMD`. Returns the step lines and the server requests it answered.
pub fn callback_client(target: &[String], answers: &Answers, script: &Value) -> (Vec<Value>, Vec<Value>) {
    let mut args = answers.args();
    args.extend(target.iter().cloned());
    let mut child = Command::new("node")
        .current_dir(node_dir())
        .arg("callback-client.mjs")
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn callback-client");
    child.stdin.take().unwrap().write_all(script.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let lines: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(out.status.success(), "callback-client failed ({:?}): {lines:?}", out.status);
    let (served, steps): (Vec<Value>, Vec<Value>) = lines.into_iter().partition(|l| l["op"] == "served");
    let served = served.first().map(|s| s["requests"].as_array().unwrap().clone()).unwrap_or_default();
    (steps, served)
}

/// The text of a step's tool result.
pub fn result_text(step: &Value) -> String {
    step["result"]["content"][0]["text"].as_str().unwrap_or_else(|| panic!("no text result: {step}")).to_owned()
}

/// A raw SSE stream (GET), read event by event.
pub struct SseStream {
    reader: BufReader<TcpStream>,
}

impl SseStream {
    pub fn open(port: u16, path: &str, headers: &[(&str, &str)]) -> (u16, String, Self) {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        (&s).write_all(req.as_bytes()).unwrap();
        let mut reader = BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            head.push_str(&line);
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, head, Self { reader })
    }

    /// The next event with data: (event type, data). Chunked framing is skipped over (a
    /// chunk-size line is never `event:`/`data:`).
    pub fn next_event(&mut self) -> (String, String) {
        let mut kind = String::from("message");
        let mut data: Option<String> = None;
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("read SSE");
            assert!(n > 0, "SSE stream ended");
            let line = line.trim_end_matches(['\r', '\n']);
            if let Some(v) = line.strip_prefix("event:") {
                kind = v.trim().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                data = Some(v.strip_prefix(' ').unwrap_or(v).to_owned());
            } else if line.is_empty()
                && let Some(d) = data.take()
            {
                return (kind, d);
            }
        }
    }

    pub fn close(self) {
        let _ = self.reader.into_inner().shutdown(std::net::Shutdown::Both);
    }
}
