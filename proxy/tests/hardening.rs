//! What a caller controls — request ids, identity headers, session ids, the number of
//! sessions it opens — must not change what counts. Each test is an attack that worked
//! before (it reached RunPod more often than the policy allows, or reached another caller's
//! session), driven against the real RunPod MCP servers from npm with the fake RunPod API
//! recording what reached it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mock_mcp.rs"]
mod mock_mcp;
mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

/// pod-action start, 3 a minute (4.0.0 names).
const POD_ACTION_3: &str = r#"
version: "1"
default: deny
tools:
  list-pods: {}
  pod-action:
    require:
      - {path: args.body.action, op: eq, value: start}
    limits:
      - {counter: starts, window: minute, max: 3, scope: grant}
"#;

/// start-pod, 3 a minute (1.1.0 names).
const START_POD_3: &str = r#"
version: "1"
default: deny
tools:
  start-pod:
    limits:
      - {counter: starts, window: minute, max: 3, scope: grant}
"#;

const JSON_HEADERS: [(&str, &str); 2] =
    [("Content-Type", "application/json"), ("Accept", "application/json, text/event-stream")];

/// POSTs `body` to the proxy's /mcp with `extra` headers.
fn post(proxy: &Proxy, extra: &[(&str, &str)], body: &str) -> (u16, String, Vec<Value>) {
    let headers: Vec<(&str, &str)> = JSON_HEADERS.iter().copied().chain(extra.iter().copied()).collect();
    let (status, head, body) = http(proxy.proc.port, "POST", "/mcp", &headers, body.as_bytes());
    (status, head, messages(&body))
}

fn initialize(proxy: &Proxy, extra: &[(&str, &str)]) -> String {
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "attacker", "version": "0"}}});
    let (status, head, msgs) = post(proxy, extra, &init.to_string());
    assert_eq!(status, 200, "initialize: {head} {msgs:?}");
    let sid = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("mcp-session-id:").map(|v| v.trim().to_owned()))
        .expect("a session id");
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let (status, _, _) = post(proxy, &[extra, &[("Mcp-Session-Id", &sid)]].concat(), &initialized.to_string());
    assert_eq!(status, 202);
    sid
}

fn start_call(id: &str, tool: &str) -> String {
    let args =
        if tool == "pod-action" { r#"{"id":"pod-2","body":{"action":"start"}}"# } else { r#"{"podId":"pod-2"}"# };
    format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{tool}","arguments":{args}}}}}"#)
}

/// Bodies in which a second request's id equals the call's id as a number but not as
/// text: the server would answer the second one with the call's id, and that error
/// answer must never give the call's quota back (nor skip the tools/list filter).
fn alias_bodies(tool: &str) -> Vec<String> {
    let mut bodies = Vec::new();
    for (call_id, alias) in [("1", "1.0"), ("1", "1e0"), ("1", "10E-1"), ("0", "-0"), ("1", "1.00000000000000001")] {
        bodies.push(format!(r#"[{},{{"jsonrpc":"2.0","id":{alias},"method":"x/y"}}]"#, start_call(call_id, tool)));
        bodies
            .push(format!(r#"[{},{{"jsonrpc":"2.0","id":{alias},"method":"tools/list"}}]"#, start_call(call_id, tool)));
    }
    // The call itself with an id that is not written as an integer.
    bodies.push(start_call("2.0", tool));
    bodies.push(start_call("9007199254740993", tool));
    bodies
}

fn assert_refused_as_invalid(what: &str, status: u16, msgs: &[Value]) {
    assert!(!msgs.is_empty(), "{what}: an answer ({status})");
    assert!(
        msgs.iter().all(|m| m.get("result").is_none()),
        "{what}: nothing is forwarded, so nothing is answered by the server: {msgs:?}"
    );
    assert!(
        msgs.iter().any(|m| m["error"]["code"] == -32600),
        "{what}: the non-canonical id is refused as an invalid request: {msgs:?}"
    );
}

/// Pod starts that reached the fake RunPod API: `POST /v1/pods/ID/start` (1.1.0) or
/// `POST /v2/pods/ID/action` `{"action":"start"}` (4.0.0).
fn starts(fake: &Proc) -> usize {
    fake_requests(fake)
        .iter()
        .filter(|(m, p, b)| {
            m == "POST" && (p.ends_with("/start") || (p.ends_with("/action") && b["action"] == "start"))
        })
        .count()
}

/// Calls that pass until the limit, then -32011: how many were allowed.
fn allowed_of(results: &[Vec<Value>]) -> usize {
    results.iter().filter(|m| m.iter().any(|m| m.get("result").is_some())).count()
}

/// What a test needs running: the fake RunPod API, the MCP server (HTTP mode) and the
/// proxy in front of it; dropped together.
struct Setup {
    fake: Proc,
    _server: Option<Proc>,
    _dir: tempfile::TempDir,
    proxy: Proxy,
}

/// The proxy (with `args` before the upstream) in front of RunPod MCP 4.0.0 over HTTP.
fn in_front_of_runpod_4(policy: &str, args: &[&str]) -> Setup {
    let fake = fake_runpod();
    let server = runpod_http(&fake);
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), "p.yaml", policy);
    let mut tail: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tail.extend(["--upstream".to_owned(), format!("http://127.0.0.1:{}/mcp", server.port)]);
    let proxy = proxy(&[&policy], &tail, &[]);
    Setup { fake, _server: Some(server), _dir: dir, proxy }
}

/// The proxy (with `args` before `--`) running RunPod MCP 1.1.0 as a child per session.
fn in_front_of_runpod_1_children(policy: &str, args: &[&str]) -> Setup {
    let fake = fake_runpod();
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), "p.yaml", policy);
    let mut tail: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tail.push("--".to_owned());
    tail.extend(runpod_1_stdio_command());
    let env = [("RUNPOD_API_KEY", "k".to_owned()), ("RUNPOD_REDIRECT_URL", format!("http://127.0.0.1:{}", fake.port))];
    let proxy = proxy(&[&policy], &tail, &env);
    Setup { fake, _server: None, _dir: dir, proxy }
}

#[test]
fn id_aliases_never_refund_a_call_over_http() {
    let Setup { fake, proxy, _server, _dir } = in_front_of_runpod_4(POD_ACTION_3, &[]);
    let auth = [("Authorization", "Bearer k")];
    for body in alias_bodies("pod-action") {
        let (status, _, msgs) = post(&proxy, &auth, &body);
        assert_refused_as_invalid(&body, status, &msgs);
    }
    assert_eq!(starts(&fake), 0, "no aliased body reached RunPod");
    let results: Vec<Vec<Value>> =
        (10..16).map(|id| post(&proxy, &auth, &start_call(&id.to_string(), "pod-action")).2).collect();
    assert_eq!(allowed_of(&results), 3, "{results:?}");
    assert_eq!(results[5][0]["error"]["code"], -32011, "{:?}", results[5]);
    assert_eq!(starts(&fake), 3, "exactly the limit reached RunPod");
}

#[test]
fn id_aliases_never_refund_a_call_in_a_child_session() {
    let Setup { fake, proxy, _server, _dir } = in_front_of_runpod_1_children(START_POD_3, &[]);
    let sid = initialize(&proxy, &[]);
    let session = [("Mcp-Session-Id", sid.as_str())];
    for body in alias_bodies("start-pod") {
        let (status, _, msgs) = post(&proxy, &session, &body);
        assert_refused_as_invalid(&body, status, &msgs);
    }
    assert_eq!(starts(&fake), 0, "no aliased body reached RunPod");
    let results: Vec<Vec<Value>> =
        (10..16).map(|id| post(&proxy, &session, &start_call(&id.to_string(), "start-pod")).2).collect();
    assert_eq!(allowed_of(&results), 3, "{results:?}");
    assert_eq!(starts(&fake), 3);
}

/// `--stdio`: the same id rule, and a request id that is still waiting for its answer is
/// refused (the child could not tell the two apart).
#[test]
fn id_aliases_and_waiting_ids_never_refund_over_stdio() {
    let fake = fake_runpod();
    // Starts take a while, so a second request with the same id arrives while one waits.
    let fault = json!({"method": "POST", "path": "/v1/pods/*", "delay_ms": 400, "times": 0}).to_string();
    let (status, _, _) =
        http(fake.port, "POST", "/__faults", &[("Content-Type", "application/json")], fault.as_bytes());
    assert!((200..300).contains(&status), "{status}");
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), "p.yaml", START_POD_3);
    let mut child = Command::new(env!("CARGO_BIN_EXE_toolgate-proxy"))
        .args(["--stdio", "--policy"])
        .arg(&policy)
        .args(["--admin-listen", &format!("127.0.0.1:{}", free_port()), "--"])
        .args(runpod_1_stdio_command())
        .env("RUNPOD_API_KEY", "k")
        .env("RUNPOD_REDIRECT_URL", format!("http://127.0.0.1:{}", fake.port))
        .env("TOOLGATE_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                let _ = tx.send(v);
            }
        }
    });
    let mut send = |line: &str| {
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    };
    // Answers by id (canonical text); every line gets exactly one answer (or a batch).
    let wait_for = |id: &str| -> Value {
        let want: Value = serde_json::from_str(id).unwrap();
        loop {
            let v = rx.recv_timeout(Duration::from_secs(60)).expect("an answer");
            let items = if let Value::Array(a) = &v { a.clone() } else { vec![v.clone()] };
            if items.iter().any(|m| m["id"] == want || m["id"].is_null()) {
                return v;
            }
        }
    };
    send(
        &json!({"jsonrpc":"2.0","id":"init","method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"a","version":"0"}}})
            .to_string(),
    );
    assert!(wait_for(r#""init""#).get("result").is_some());
    send(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    for body in alias_bodies("start-pod") {
        send(&body);
        let v = wait_for("null");
        let items = if let Value::Array(a) = &v { a.clone() } else { vec![v.clone()] };
        assert_refused_as_invalid(&body, 0, &items);
    }
    // A call waits (slow API); the same id again, meanwhile, is refused: its error answer
    // would otherwise settle (and refund) the waiting call.
    send(&start_call("7", "start-pod"));
    send(r#"{"jsonrpc":"2.0","id":7,"method":"x/y"}"#);
    let first = wait_for("7");
    assert_eq!(first["error"]["code"], -32600, "the duplicate is refused first: {first}");
    assert!(first["error"]["message"].as_str().unwrap().contains("already waiting"), "{first}");
    let call = wait_for("7");
    assert!(call.get("result").is_some(), "the call itself completes: {call}");
    let mut allowed = 1;
    for id in 20..25 {
        send(&start_call(&id.to_string(), "start-pod"));
        if wait_for(&id.to_string()).get("result").is_some() {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 3, "3 a minute, whatever the ids");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(starts(&fake), 3, "exactly the limit reached RunPod");
}

#[test]
fn repeated_identity_headers_are_refused() {
    let fake = fake_runpod();
    let server = runpod_http(&fake);
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), "p.yaml", POD_ACTION_3);
    let upstream = format!("http://127.0.0.1:{}/mcp", server.port);
    let by_header =
        proxy(&[&policy], &["--upstream".into(), upstream.clone(), "--identity-header".into(), "X-Agent".into()], &[]);
    let call = start_call("1", "pod-action");
    for headers in [
        vec![("X-Agent", "mallory"), ("X-Agent", "alice"), ("Authorization", "Bearer k")],
        vec![("X-Agent", "alice"), ("Authorization", "Bearer k"), ("Authorization", "Bearer k2")],
        vec![("X-Agent", "alice"), ("Authorization", "Bearer k"), ("Mcp-Session-Id", "a"), ("Mcp-Session-Id", "b")],
    ] {
        let (status, _, msgs) = post(&by_header, &headers, &call);
        assert_eq!(status, 400, "{headers:?}: {msgs:?}");
        assert_eq!(msgs[0]["error"]["code"], -32600);
        assert!(msgs[0]["error"]["message"].as_str().unwrap().contains("repeated"), "{msgs:?}");
    }
    let by_auth = proxy(&[&policy], &["--upstream".into(), upstream], &[]);
    let (status, _, _) = post(&by_auth, &[("Authorization", "Bearer a"), ("Authorization", "Bearer b")], &call);
    assert_eq!(status, 400);
    assert_eq!(starts(&fake), 0, "nothing ambiguous reached RunPod");
    let m = metrics(&by_auth);
    assert_eq!(sample(&m, r#"toolgate_caller_refusals_total{reason="ambiguous_caller"}"#), 1.0, "{m}");
}

/// Without an identity source, a child process authenticates nobody: invented tokens are
/// one caller, and the limit holds for the whole server.
#[test]
fn invented_credentials_are_one_caller_in_child_mode() {
    let Setup { fake, proxy, _server, _dir } = in_front_of_runpod_1_children(START_POD_3, &[]);
    let mut allowed = 0;
    for token in ["a", "b", "c"] {
        let auth = format!("Bearer {token}");
        let sid = initialize(&proxy, &[("Authorization", &auth)]);
        for id in 0..2 {
            let (_, _, msgs) = post(
                &proxy,
                &[("Authorization", &auth), ("Mcp-Session-Id", &sid)],
                &start_call(&id.to_string(), "start-pod"),
            );
            allowed += usize::from(msgs.iter().any(|m| m.get("result").is_some()));
        }
    }
    assert_eq!(allowed, 3, "3 a minute for the whole server, not per invented token");
    assert_eq!(starts(&fake), 3);
}

const PER_SESSION_2: &str = r#"
version: "1"
default: deny
tools:
  pod-action:
    limits:
      - {counter: per_session, window: minute, max: 2, scope: session}
"#;

/// A stateless upstream gives out no sessions: a session id a client invents is not a
/// fresh bucket, the calls count under the caller's identity.
#[test]
fn invented_session_ids_are_not_fresh_buckets() {
    let Setup { fake, proxy, _server, _dir } = in_front_of_runpod_4(PER_SESSION_2, &[]);
    let results: Vec<Vec<Value>> = (0..6)
        .map(|i| {
            let sid = format!("invented-{i}");
            post(
                &proxy,
                &[("Authorization", "Bearer k"), ("Mcp-Session-Id", &sid)],
                &start_call(&i.to_string(), "pod-action"),
            )
            .2
        })
        .collect();
    assert_eq!(allowed_of(&results), 2, "{results:?}");
    assert_eq!(starts(&fake), 2);
}

/// A session belongs to the identity that opened it: another caller naming it gets 404 for
/// POST, GET and DELETE, and the owner's session goes on.
#[test]
fn another_caller_cannot_use_take_over_or_end_a_session() {
    let Setup { fake, proxy, _server, _dir } =
        in_front_of_runpod_1_children(START_POD_3, &["--identity-header", "X-Agent"]);
    let sid = initialize(&proxy, &[("X-Agent", "alice")]);
    let as_bob = [("X-Agent", "bob"), ("Mcp-Session-Id", sid.as_str())];
    let (status, _, msgs) = post(&proxy, &as_bob, &start_call("1", "start-pod"));
    assert_eq!(status, 404, "{msgs:?}");
    let get = [("Accept", "text/event-stream"), ("X-Agent", "bob"), ("Mcp-Session-Id", sid.as_str())];
    assert_eq!(http(proxy.proc.port, "GET", "/mcp", &get, b"").0, 404, "bob cannot take alice's GET stream");
    assert_eq!(http(proxy.proc.port, "DELETE", "/mcp", &as_bob, b"").0, 404, "bob cannot end alice's session");
    assert_eq!(starts(&fake), 0);
    let (status, _, msgs) =
        post(&proxy, &[("X-Agent", "alice"), ("Mcp-Session-Id", &sid)], &start_call("2", "start-pod"));
    assert_eq!(status, 200, "{msgs:?}");
    assert!(msgs[0].get("result").is_some(), "alice's session goes on: {msgs:?}");
    let m = metrics(&proxy);
    assert_eq!(sample(&m, r#"toolgate_caller_refusals_total{reason="session"}"#), 3.0, "{m}");
}

/// One caller cannot take every child slot: it gets its share, the next caller still gets in.
#[test]
fn one_caller_cannot_fill_every_child_slot() {
    let Setup { fake: _fake, proxy, _server, _dir } =
        in_front_of_runpod_1_children(START_POD_3, &["--identity-header", "X-Agent", "--max-sessions", "4"]);
    let _mine = initialize(&proxy, &[("X-Agent", "mallory")]);
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "m", "version": "0"}}})
    .to_string();
    for _ in 0..3 {
        let (status, _, msgs) = post(&proxy, &[("X-Agent", "mallory")], &init);
        assert_ne!(status, 200, "mallory holds her share (1 of 4): {msgs:?}");
        assert!(msgs[0]["error"]["message"].as_str().unwrap().contains("share"), "{msgs:?}");
    }
    for who in ["alice", "bob", "carol"] {
        initialize(&proxy, &[("X-Agent", who)]);
    }
}

/// A 2024-11-05 client's `/sse` session is its opener's too: another identity cannot post
/// into it (the answers would arrive on the owner's stream).
#[test]
fn another_caller_cannot_post_into_an_sse_session() {
    use std::io::Read;
    let Setup { fake: _fake, proxy, _server, _dir } = in_front_of_runpod_4(POD_ACTION_3, &[]);
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", proxy.proc.port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        stream,
        "GET /sse HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\nAuthorization: Bearer alice\r\n\r\n"
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let endpoint = loop {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the /sse stream ended: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen);
        if let Some(line) = text.lines().find_map(|l| l.strip_prefix("data: /messages")) {
            break format!("/messages{}", line.trim());
        }
    };
    let ping = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let as_bob = [("Content-Type", "application/json"), ("Authorization", "Bearer bob")];
    let (status, _, _) = http(proxy.proc.port, "POST", &endpoint, &as_bob, ping.as_bytes());
    assert_eq!(status, 404, "bob cannot post into alice's /sse session");
    let as_alice = [("Content-Type", "application/json"), ("Authorization", "Bearer alice")];
    let (status, _, _) = http(proxy.proc.port, "POST", &endpoint, &as_alice, ping.as_bytes());
    assert_eq!(status, 202, "alice can");
}

/// An upstream 5xx may come after the tool ran: the unit stays spent (before, any non-2xx
/// gave it back, so a server that crashes after acting was never limited).
#[test]
fn a_server_error_after_the_work_keeps_the_unit_spent() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let mock = mock_mcp::MockMcp::start(&rt);
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(
        dir.path(),
        "p.yaml",
        "version: \"1\"\ndefault: deny\ntools:\n  fail-after-work:\n    limits:\n      - {counter: c, window: minute, max: 2, scope: global}\n",
    );
    let proxy = proxy(&[&policy], &["--upstream".into(), mock.url()], &[]);
    let auth = ("Authorization", "Bearer k");
    let sid = initialize(&proxy, &[auth]);
    let answers: Vec<(u16, Vec<Value>)> = (0..4)
        .map(|id| {
            let body = format!(
                r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"fail-after-work","arguments":{{}}}}}}"#
            );
            let (status, _, msgs) = post(&proxy, &[auth, ("Mcp-Session-Id", &sid)], &body);
            (status, msgs)
        })
        .collect();
    assert_eq!((answers[0].0, answers[1].0), (500, 500), "the server's own answer passes: {answers:?}");
    assert_eq!(mock.called("fail-after-work"), 2, "two reached the server, the limit: {answers:?}");
    for (status, msgs) in &answers[2..] {
        assert_eq!((*status, mock_mcp::error_code(&msgs[0])), (200, Some(-32011)), "{answers:?}");
    }
}

/// `--stdio`: the child's output is read with the same bound as every other reader; an
/// over-long line is skipped, not buffered and passed on, and the next one still arrives.
#[test]
fn an_over_long_line_from_the_stdio_child_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), "p.yaml", START_POD_3);
    // 17 MiB of `a` on one line (the bound is 16 MiB), then a notification.
    let script = r#"head -c 17825792 /dev/zero | tr '\0' a; echo; echo '{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":"after"}}'; sleep 30"#;
    let mut child = Command::new(env!("CARGO_BIN_EXE_toolgate-proxy"))
        .args(["--stdio", "--policy"])
        .arg(&policy)
        .args(["--admin-listen", &format!("127.0.0.1:{}", free_port()), "--", "sh", "-c", script])
        .env("TOOLGATE_LOG", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    lines.read_line(&mut first).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(first.len() < 1024, "the over-long line was passed on ({} bytes)", first.len());
    assert!(first.contains("\"after\""), "{first}");
}
