//! The proxy's connections to a Streamable-HTTP upstream: one kept-alive connection serves
//! a session's calls one after the other; an upstream that closes its connections after
//! each answer (with `Connection: close`, or silently, as one closing idle keep-alive
//! connections does) still gets every call exactly once; and a request whose connection
//! dies after it was written is answered -32014, never sent a second time (it may have run).
//!
//! The upstream is a small HTTP/1.1 server written here over plain TCP, so the test decides
//! when a connection closes and counts what reached it: connections accepted, and every
//! JSON-RPC request by id.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use support::{Proxy, http, proxy, write_policy};

const UPSTREAM_ERROR: i64 = -32014;

/// When the upstream ends a connection.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Closing {
    /// Never (keep-alive).
    Never,
    /// After each answer, which says `Connection: close`.
    Announced,
    /// After each answer, without a word (as an idle keep-alive connection is closed).
    Silently,
}

#[derive(Default)]
struct Seen {
    accepted: usize,
    /// (connection number, method, id) of every request read whole.
    requests: Vec<(usize, String, Value)>,
}

struct Upstream {
    port: u16,
    seen: Arc<Mutex<Seen>>,
}

impl Upstream {
    /// Serves until the test ends. A `tools/call` of the tool `die` is read whole and then
    /// its connection is closed without an answer.
    fn start(closing: Closing) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let conn = {
                    let mut s = s.lock().unwrap();
                    s.accepted += 1;
                    s.accepted
                };
                let s = s.clone();
                std::thread::spawn(move || serve(stream, conn, closing, &s));
            }
        });
        Self { port, seen }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }

    fn accepted(&self) -> usize {
        self.seen.lock().unwrap().accepted
    }

    /// How many requests with this JSON-RPC id reached the upstream.
    fn received(&self, id: u64) -> usize {
        self.seen.lock().unwrap().requests.iter().filter(|(_, _, i)| *i == json!(id)).count()
    }

    fn requests(&self) -> usize {
        self.seen.lock().unwrap().requests.len()
    }
}

/// One request (head and Content-Length body), or None when the peer closed first.
fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize =
                head.lines().find_map(|l| l.strip_prefix("content-length:")).map_or(0, |v| v.trim().parse().unwrap());
            let total = end + 4 + len;
            while buf.len() < total {
                let n = stream.read(&mut chunk).ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[end + 4..total].to_vec();
            buf.drain(..total);
            return Some(body);
        }
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn serve(mut stream: TcpStream, conn: usize, closing: Closing, seen: &Mutex<Seen>) {
    let mut buf = Vec::new();
    while let Some(body) = read_request(&mut stream, &mut buf) {
        let msg: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let method = msg["method"].as_str().unwrap_or("").to_owned();
        seen.lock().unwrap().requests.push((conn, method.clone(), msg["id"].clone()));
        if method == "tools/call" && msg["params"]["name"] == "die" {
            return; // read whole, never answered: the connection closes here
        }
        let close = if closing == Closing::Announced { "Connection: close\r\n" } else { "" };
        let answer = match method.as_str() {
            "initialize" => Some(json!({"jsonrpc": "2.0", "id": msg["id"], "result": {
                "protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
                "serverInfo": {"name": "closing-upstream", "version": "0"}}})),
            "tools/call" => Some(json!({"jsonrpc": "2.0", "id": msg["id"], "result": {
                "content": [{"type": "text", "text": "ok"}]}})),
            _ => None,
        };
        let out = match answer {
            Some(a) => {
                let a = a.to_string();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nMcp-Session-Id: s-1\r\n{close}Content-Length: {}\r\n\r\n{a}",
                    a.len()
                )
            }
            None => format!("HTTP/1.1 202 Accepted\r\n{close}Content-Length: 0\r\n\r\n"),
        };
        if stream.write_all(out.as_bytes()).is_err() || closing != Closing::Never {
            return;
        }
    }
}

fn start(closing: Closing) -> (Upstream, Proxy, tempfile::TempDir) {
    let up = Upstream::start(closing);
    let dir = tempfile::tempdir().unwrap();
    let policy =
        write_policy(dir.path(), "policy.yaml", "version: '1'\ndefault: deny\ntools:\n  echo: {}\n  die: {}\n");
    let p = proxy(&[&policy], &["--upstream".into(), up.url()], &[]);
    (up, p, dir)
}

fn post(p: &Proxy, session: Option<&str>, msg: &Value) -> (u16, Value) {
    let mut headers = vec![("Content-Type", "application/json"), ("Accept", "application/json, text/event-stream")];
    if let Some(s) = session {
        headers.push(("Mcp-Session-Id", s));
    }
    let (status, head, body) = http(p.proc.port, "POST", "/mcp", &headers, msg.to_string().as_bytes());
    assert_ne!(status, 0, "no answer from the proxy: {head}");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// initialize and notifications/initialized; the session id.
fn open_session(p: &Proxy) -> String {
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}});
    let (status, body) = post(p, None, &init);
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(p, Some("s-1"), &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    assert_eq!(status, 202, "{body}");
    "s-1".to_owned()
}

fn call(p: &Proxy, session: &str, id: u64, tool: &str) -> Value {
    let msg = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": {}}});
    post(p, Some(session), &msg).1
}

#[test]
fn sequential_calls_of_a_session_share_one_upstream_connection() {
    let (up, p, _dir) = start(Closing::Never);
    let s = open_session(&p);
    for id in 1..=20 {
        let answer = call(&p, &s, id, "echo");
        assert_eq!(answer["result"]["content"][0]["text"], "ok", "call {id}: {answer}");
    }
    assert_eq!(up.requests(), 22, "initialize, initialized and 20 calls");
    assert_eq!(up.accepted(), 1, "one connection upstream for 22 requests one after the other");
}

#[test]
fn an_upstream_that_closes_its_connections_gets_every_call_once() {
    for closing in [Closing::Announced, Closing::Silently] {
        let (up, p, _dir) = start(closing);
        let s = open_session(&p);
        for id in 1..=10 {
            // The upstream closed the last connection right after its answer: by now the
            // proxy has it idle, closed or about to be found closed.
            std::thread::sleep(Duration::from_millis(20));
            let answer = call(&p, &s, id, "echo");
            assert_eq!(answer["result"]["content"][0]["text"], "ok", "{closing:?}, call {id}: {answer}");
            assert_eq!(up.received(id), 1, "{closing:?}: call {id} reached the upstream once");
        }
        assert_eq!(up.requests(), 12, "{closing:?}: nothing sent twice");
        assert_eq!(up.accepted(), 12, "{closing:?}: one connection per request (each was closed)");
    }
}

#[test]
fn a_request_whose_connection_dies_after_it_was_written_is_not_sent_again() {
    let (up, p, _dir) = start(Closing::Never);
    let s = open_session(&p);
    assert_eq!(call(&p, &s, 1, "echo")["result"]["content"][0]["text"], "ok");
    // On the kept-alive connection: the upstream reads the call whole, then the connection
    // dies. The call may have run: it is not resent, and the caller is told.
    let answer = call(&p, &s, 2, "die");
    assert_eq!(answer["error"]["code"], UPSTREAM_ERROR, "{answer}");
    assert_eq!(up.received(2), 1, "the call reached the upstream once, not twice");
    // On a fresh connection too (the dead one is not reused).
    let answer = call(&p, &s, 3, "die");
    assert_eq!(answer["error"]["code"], UPSTREAM_ERROR, "{answer}");
    assert_eq!(up.received(3), 1, "the call reached the upstream once, not twice");
    // The next call opens another connection and gets its answer.
    assert_eq!(call(&p, &s, 4, "echo")["result"]["content"][0]["text"], "ok");
    assert_eq!(up.received(4), 1);
    assert_eq!(up.accepted(), 3, "the kept-alive one, the one after each death");
    assert_eq!(up.requests(), 6);
}
