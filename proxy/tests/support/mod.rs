//! Processes for the proxy's end-to-end tests: the fake RunPod API, the real RunPod MCP
//! servers from npm (tests/node), the official MCP SDK client driver, and the proxy.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn node_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/node");
    assert!(
        dir.join("node_modules/runpod-mcp-1").is_dir(),
        "tests/node/node_modules is missing: run `make node` (npm ci) first"
    );
    dir.canonicalize().unwrap()
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub port: u16,
    pub name: &'static str,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a node script that prints `LISTENING <port>` first.
fn spawn_listening(name: &'static str, mut cmd: Command) -> Proc {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn node");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("read LISTENING line");
    let port = line.trim().strip_prefix("LISTENING ").and_then(|p| p.parse().ok()).unwrap_or_else(|| {
        panic!("{name} did not print LISTENING <port>, got {line:?}");
    });
    Proc { child, port, name }
}

pub fn fake_runpod() -> Proc {
    let mut cmd = Command::new("node");
    cmd.current_dir(node_dir()).args(["fake-runpod.mjs", "--port", "0"]);
    spawn_listening("fake-runpod", cmd)
}

/// RunPod MCP 4.0.0 over Streamable HTTP, talking to the fake API.
pub fn runpod_http(fake: &Proc) -> Proc {
    let base = format!("http://127.0.0.1:{}", fake.port);
    let mut cmd = Command::new("node");
    cmd.current_dir(node_dir())
        .args(["runpod-http.mjs", "--port", "0"])
        .env("RUNPOD_API_BASE_URL", &base)
        .env("RUNPOD_SERVERLESS_API_URL", format!("{base}/runtime/v2"))
        .env("RUNPOD_AUTHED_GRAPHQL_URL", format!("{base}/graphql"))
        .env("RUNPOD_PUBLIC_GRAPHQL_URL", format!("{base}/graphql"))
        .env_remove("POSTHOG_API_KEY");
    spawn_listening("runpod-http", cmd)
}

/// The command line that runs RunPod MCP 1.1.0 over stdio against the fake API.
pub fn runpod_1_stdio_command() -> Vec<String> {
    let dir = node_dir();
    vec![
        "node".into(),
        "--import".into(),
        dir.join("redirect-runpod.mjs").display().to_string(),
        dir.join("node_modules/runpod-mcp-1/dist/index.mjs").display().to_string(),
    ]
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Proxy {
    pub proc: Proc,
    pub admin: u16,
    pub audit: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
}

impl Proxy {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.proc.port)
    }
}

/// Starts toolgate-proxy; `tail` is `--upstream URL` or `-- CMD…`. Audit lines
/// (stdout) are collected.
pub fn proxy(policies: &[&Path], tail: &[String], env: &[(&str, String)]) -> Proxy {
    let port = free_port();
    let admin = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_toolgate-proxy"));
    for p in policies {
        cmd.arg("--policy").arg(p);
    }
    cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--reload-interval-ms", "100"])
        .args(tail)
        .env("TOOLGATE_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn proxy");
    let stdout = child.stdout.take().unwrap();
    let audit = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = audit.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("audit line is not JSON: {line}"));
            sink.lock().unwrap().push(v);
        }
    });
    let p = Proxy { proc: Proc { child, port, name: "toolgate-proxy" }, admin, audit };
    let deadline = Instant::now() + Duration::from_secs(20);
    while http(p.admin, "GET", "/healthz", &[], b"").0 != 200 {
        assert!(Instant::now() < deadline, "proxy did not become healthy");
        std::thread::sleep(Duration::from_millis(50));
    }
    p
}

/// A minimal HTTP/1.1 client (Connection: close), so tests can send exactly the bytes
/// an attacker would. Returns (status, headers, body).
pub fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String, Vec<u8>) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return (0, String::new(), Vec::new()) };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    let mut has_len = false;
    for (k, v) in headers {
        has_len |= k.eq_ignore_ascii_case("content-length");
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_len {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").map_or(out.len(), |i| i + 4);
    let head = String::from_utf8_lossy(&out[..split]).to_string();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut body = out[split..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    (status, head, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(std::str::from_utf8(&b[..i]).unwrap_or("0").trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + n]);
        b = &b[i + 2 + n + 2..];
    }
    out
}

pub fn metrics(proxy: &Proxy) -> String {
    String::from_utf8(http(proxy.admin, "GET", "/metrics", &[], b"").2).unwrap()
}

/// The value of one sample line, e.g. `toolgate_decisions_total{tool="x",...}`.
pub fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Runs the official-SDK client driver with a script; one JSON value per step.
pub fn mcp_client(target: &[String], script: &Value) -> Vec<Value> {
    let mut child = Command::new("node")
        .current_dir(node_dir())
        .arg("mcp-client.mjs")
        .args(target)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn mcp-client");
    child.stdin.take().unwrap().write_all(script.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "mcp-client failed: {:?}", out.status);
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

pub fn over_http(proxy: &Proxy, token: &str) -> Vec<String> {
    vec!["--url".into(), proxy.url(), "--header".into(), format!("Authorization: Bearer {token}")]
}

/// What reached the fake RunPod API: (method, path, body).
pub fn fake_requests(fake: &Proc) -> Vec<(String, String, Value)> {
    let (_, _, body) = http(fake.port, "GET", "/__requests", &[], b"");
    let v: Value = serde_json::from_slice(&body).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| (r["method"].as_str().unwrap().to_owned(), r["path"].as_str().unwrap().to_owned(), r["body"].clone()))
        .collect()
}

pub fn write_policy(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies").canonicalize().unwrap()
}
