//! The listeners' bounds against clients that hold connections or flood them: a trickled
//! request head, a body that stops midway, idle keep-alive connections, more connections
//! than the cap or than file descriptors; and `/policy` on the admin listener only for
//! loopback peers. The real binary in front of the in-process mock MCP server; short
//! bounds via flags; every wait is bounded generously and asserts behaviour, not timing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mock_mcp.rs"]
mod mock_mcp;
mod support;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mock_mcp::{Client, MockMcp};
use support::{free_port, http, sample};

/// A proxy started by these tests: stderr (its log) is collected.
struct Spawned {
    child: Child,
    port: u16,
    admin: u16,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Spawned {
    fn log_lines(&self, needle: &str) -> usize {
        self.log.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }

    fn metrics(&self) -> String {
        String::from_utf8(http(self.admin, "GET", "/metrics", &[], b"").2).unwrap()
    }
}

/// Starts toolgate-proxy (allow-all policy) in front of `upstream` with `extra` flags;
/// with `nofile`, under that open-file limit (`ulimit -n`). `admin_host` is where the
/// admin listener binds.
fn start(upstream: &str, extra: &[&str], nofile: Option<u32>, admin_host: &str) -> Spawned {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("allow.json");
    std::fs::write(&policy, r#"{"version": "1", "default": "allow"}"#).unwrap();
    let port = free_port();
    let admin = free_port();
    let mut args: Vec<String> = vec![
        "--policy".into(),
        policy.display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--admin-listen".into(),
        format!("{admin_host}:{admin}"),
        "--upstream".into(),
        upstream.into(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let exe = env!("CARGO_BIN_EXE_toolgate-proxy");
    let mut cmd = match nofile {
        Some(n) => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(format!("ulimit -n {n} && exec \"$0\" \"$@\"")).arg(exe).args(&args);
            c
        }
        None => {
            let mut c = Command::new(exe);
            c.args(&args);
            c
        }
    };
    let mut child = cmd
        .env("TOOLGATE_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn proxy");
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let s = Spawned { child, port, admin, log, _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(20);
    while http(s.admin, "GET", "/healthz", &[], b"").0 != 200 {
        assert!(Instant::now() < deadline, "proxy did not become healthy: {:?}", s.log.lock().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    s
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Reads until the server closes the connection (EOF or reset) or `limit` passes; returns
/// what was read and whether it was closed.
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        s.set_read_timeout(Some(Duration::from_millis(250))).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return (out, true),
        }
    }
    (out, false)
}

fn legit_call(port: u16) {
    let mut c = Client::initialize(port, "legit");
    let answer = c.call("echo");
    assert_eq!(answer["result"]["content"][0]["text"], "called echo", "{answer}");
}

#[test]
fn a_slowloris_head_is_cut_off_while_other_clients_are_served() {
    let rt = runtime();
    let mock = MockMcp::start(&rt);
    let proxy = start(&mock.url(), &["--header-read-timeout-seconds", "2"], None, "127.0.0.1");
    let mut slow = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    slow.write_all(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n").unwrap();
    // Trickle one header byte every 200 ms from another thread while this one reads.
    let mut writer = slow.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        for _ in 0..300 {
            if writer.write_all(b"x").is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    });
    // Meanwhile a client on another connection is served.
    legit_call(proxy.port);
    let (_, closed) = read_until_closed(&mut slow, Duration::from_secs(30));
    assert!(closed, "the trickled head was still open after 30 s (bound: 2 s)");
    let _ = slow.shutdown(std::net::Shutdown::Both);
    let _ = trickle.join();
    assert!(sample(&proxy.metrics(), r#"toolgate_connection_timeouts_total{listener="mcp",kind="header"}"#) >= 1.0);
    assert_eq!(mock.called("echo"), 1);
}

#[test]
fn a_body_stuck_midway_gets_408_and_nothing_is_forwarded() {
    let rt = runtime();
    let mock = MockMcp::start(&rt);
    let proxy = start(&mock.url(), &["--body-read-timeout-seconds", "2"], None, "127.0.0.1");
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    s.write_all(
        b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
          Accept: application/json, text/event-stream\r\nContent-Length: 100\r\n\r\n{",
    )
    .unwrap();
    let (out, closed) = read_until_closed(&mut s, Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "expected 408, got {text:?}");
    assert!(text.contains("--body-read-timeout-seconds"), "{text}");
    assert!(text.to_ascii_lowercase().contains("connection: close"), "{text}");
    assert!(closed, "the connection stays open after the 408");
    assert!(mock.calls().is_empty());
    assert!(sample(&proxy.metrics(), r#"toolgate_connection_timeouts_total{listener="mcp",kind="body"}"#) >= 1.0);
    legit_call(proxy.port);
}

#[test]
fn idle_connections_are_closed_but_open_streams_are_not() {
    let rt = runtime();
    let mock = MockMcp::start(&rt);
    let proxy = start(
        &mock.url(),
        // The head bound is long, so the idle bound is what closes the connection.
        &["--idle-connection-timeout-seconds", "2", "--header-read-timeout-seconds", "120"],
        None,
        "127.0.0.1",
    );
    // A keep-alive connection: one request, then nothing.
    let mut idle = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    idle.write_all(b"GET /nothing-here HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    // An open stream: a 2024-11-05 client's GET /sse, which stays open with nothing sent.
    let mut stream = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    stream.write_all(b"GET /sse HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n").unwrap();
    let (first, closed) = read_until_closed(&mut idle, Duration::from_secs(30));
    let first = String::from_utf8_lossy(&first);
    assert!(first.starts_with("HTTP/1.1 404"), "{first}");
    assert!(closed, "an idle keep-alive connection was still open after 30 s (bound: 2 s)");
    // By now the stream has been open for longer than the idle bound; give it three more.
    let (events, closed) = read_until_closed(&mut stream, Duration::from_secs(6));
    let events = String::from_utf8_lossy(&events);
    assert!(events.starts_with("HTTP/1.1 200") && events.contains("event: endpoint"), "{events}");
    assert!(!closed, "an open SSE stream was cut by the idle bound");
    assert!(sample(&proxy.metrics(), r#"toolgate_connection_timeouts_total{listener="mcp",kind="idle"}"#) >= 1.0);
}

#[test]
fn over_the_connection_cap_clients_get_a_clear_503() {
    let rt = runtime();
    let mock = MockMcp::start(&rt);
    let proxy =
        start(&mock.url(), &["--max-connections", "3", "--idle-connection-timeout-seconds", "300"], None, "127.0.0.1");
    // Three keep-alive connections, each known to be accepted (answered once).
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
        s.write_all(b"GET /nothing-here HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        let (out, _) = read_until_closed(&mut s, Duration::from_secs(2));
        assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 404"));
        held.push(s);
    }
    let (status, head, body) = http(
        proxy.port,
        "POST",
        "/mcp",
        &[("Content-Type", "application/json")],
        br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#,
    );
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 503, "{head}{body}");
    assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
    let error: serde_json::Value = serde_json::from_str(&body).expect("a JSON-RPC error body");
    assert!(error["error"]["message"].as_str().unwrap().contains("--max-connections"), "{body}");
    assert!(sample(&proxy.metrics(), r#"toolgate_connections_refused_total{listener="mcp"}"#) >= 1.0);
    assert_eq!(sample(&proxy.metrics(), r#"toolgate_connections_open{listener="mcp"}"#), 3.0);
    // A slot freed is a slot for the next client.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, ..) = http(proxy.port, "GET", "/nothing-here", &[], b"");
        if status == 404 {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot was never reused (last status {status})");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Opens `n` connections that send nothing (the client side keeps them).
fn idle_flood(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n).filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok()).collect()
}

/// A legitimate call, retried until it gets through (a 503 refusal or a connection the
/// proxy could not accept yet counts as "not yet").
fn eventually_served(port: u16, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    let mut refused = 0;
    loop {
        let (status, _, body) = http(
            port,
            "POST",
            "/mcp",
            &[("Content-Type", "application/json"), ("Accept", "application/json, text/event-stream")],
            br#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"0"}}}"#,
        );
        match status {
            200 => return refused,
            503 => {
                assert!(String::from_utf8_lossy(&body).contains("--max-connections"));
                refused += 1;
            }
            _ => {}
        }
        assert!(Instant::now() < deadline, "no legitimate call got through (last status {status})");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn out_of_file_descriptors_accept_errors_are_backed_off_and_calls_still_get_through() {
    let rt = runtime();
    let mock = MockMcp::start(&rt);
    // A cap far above what 64 descriptors hold: accept itself fails (EMFILE).
    let proxy = start(
        &mock.url(),
        &["--max-connections", "1000", "--idle-connection-timeout-seconds", "2"],
        Some(64),
        "127.0.0.1",
    );
    assert_eq!(proxy.log_lines("exceeds what the open-file limit"), 1, "{:?}", proxy.log.lock().unwrap());
    let flood = idle_flood(proxy.port, 150);
    std::thread::sleep(Duration::from_secs(4));
    eventually_served(proxy.port, Duration::from_secs(90));
    let accept_lines = proxy.log_lines("accept failed");
    let total = proxy.log.lock().unwrap().len();
    assert!(accept_lines >= 1, "the accept failures were not reported: {:?}", proxy.log.lock().unwrap());
    assert!(accept_lines < 50 && total < 100, "{accept_lines} accept lines, {total} lines in all");
    assert!(sample(&proxy.metrics(), r#"toolgate_accept_errors_total{listener="mcp"}"#) >= 1.0);
    drop(flood);
}

#[test]
fn under_a_low_file_limit_the_default_cap_refuses_clearly_instead() {
    let rt = runtime();
    let mock = MockMcp::start(&rt);
    let proxy = start(&mock.url(), &["--idle-connection-timeout-seconds", "2"], Some(64), "127.0.0.1");
    assert_eq!(proxy.log_lines("at most 16 client connections"), 1, "{:?}", proxy.log.lock().unwrap());
    let flood = idle_flood(proxy.port, 150);
    std::thread::sleep(Duration::from_secs(1));
    eventually_served(proxy.port, Duration::from_secs(90));
    let accept_lines = proxy.log_lines("accept failed");
    assert!(accept_lines < 50, "{accept_lines} accept lines");
    assert!(sample(&proxy.metrics(), r#"toolgate_connections_refused_total{listener="mcp"}"#) >= 1.0);
    drop(flood);
}

/// A non-loopback address of this machine, if it has one (`ip -o -4 addr`).
fn non_loopback_address() -> Option<IpAddr> {
    let out = Command::new("ip").args(["-o", "-4", "addr", "show", "scope", "global"]).output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next()?.parse().ok())
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let (out, _) = read_until_closed(&mut s, Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

#[test]
fn policy_is_shown_to_loopback_peers_only_unless_made_public() {
    let rt = runtime();
    let mock = MockMcp::start(&rt);
    let proxy = start(&mock.url(), &[], None, "0.0.0.0");
    let (status, text) = get(SocketAddr::from(([127, 0, 0, 1], proxy.admin)), "/policy");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"documents\""), "{text}");
    let Some(ip) = non_loopback_address() else {
        eprintln!("no non-loopback IPv4 address here: only the loopback side is tested (the decision has unit tests)");
        return;
    };
    let outside = SocketAddr::new(ip, proxy.admin);
    let (status, text) = get(outside, "/policy");
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("kubectl port-forward") && text.contains("--admin-policy-public"), "{text}");
    assert!(!text.contains("\"documents\""), "{text}");
    // Metrics and probes stay reachable from anywhere.
    assert_eq!(get(outside, "/metrics").0, 200);
    assert_eq!(get(outside, "/readyz").0, 200);
    assert!(sample(&proxy.metrics(), r#"toolgate_requests_refused_total{reason="admin_policy"}"#) >= 1.0);
    drop(proxy);
    let public = start(&mock.url(), &["--admin-policy-public"], None, "0.0.0.0");
    let (status, text) = get(SocketAddr::new(ip, public.admin), "/policy");
    assert_eq!(status, 200, "{text}");
}
