//! The MCP side of end-to-end tests: the fake RunPod REST API, the real RunPod MCP server
//! 4.0.0 over Streamable HTTP (tests/node, from npm), the official MCP SDK client driver,
//! and the workspace's own binaries.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// `tests/node`, with its `node_modules` installed (`make node`).
pub fn node_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("node");
    assert!(
        dir.join("node_modules/runpod-mcp-4").is_dir(),
        "tests/node/node_modules is missing: run `make node` (npm ci) first"
    );
    dir.canonicalize().expect("tests/node exists")
}

/// A child process killed when dropped.
#[derive(Debug)]
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
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("read LISTENING line");
    let port = line
        .trim()
        .strip_prefix("LISTENING ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{name} did not print LISTENING <port>, got {line:?}"));
    Proc { child, port, name }
}

/// The fake RunPod REST API (records what reached it: `GET /__requests`).
pub fn fake_runpod() -> Proc {
    let mut cmd = Command::new("node");
    cmd.current_dir(node_dir()).args(["fake-runpod.mjs", "--port", "0"]);
    spawn_listening("fake-runpod", cmd)
}

/// The fake RunPod REST API listening on `host` (e.g. the test node's address, which its
/// pods reach); `Proc::port` is its port there. It exits when the test process does, even
/// a killed one (its standard input is a pipe from the test process).
pub fn fake_runpod_on(host: &str) -> Proc {
    let mut cmd = Command::new("node");
    cmd.current_dir(node_dir())
        .args(["fake-runpod.mjs", "--port", "0", "--host", host, "--exit-with-stdin"])
        .stdin(Stdio::piped());
    spawn_listening("fake-runpod", cmd)
}

/// What reached a fake RunPod API listening on `host` (see [`fake_requests`]).
pub fn fake_requests_on(host: &str, fake: &Proc) -> Vec<(String, String, Value)> {
    let Ok(mut s) = TcpStream::connect((host, fake.port)) else { return Vec::new() };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = s.write_all(format!("GET /__requests HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes());
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").map_or(out.len(), |i| i + 4);
    let head = String::from_utf8_lossy(&out[..split]).to_ascii_lowercase();
    let body = if head.contains("transfer-encoding: chunked") { dechunk(&out[split..]) } else { out[split..].to_vec() };
    requests_from(&body)
}

fn requests_from(body: &[u8]) -> Vec<(String, String, Value)> {
    let v: Value = serde_json::from_slice(body).expect("fake API answers JSON");
    v.as_array()
        .expect("a list of requests")
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            (s("method"), s("path"), r["body"].clone())
        })
        .collect()
}

/// RunPod MCP 4.0.0 over Streamable HTTP (`/mcp`, bearer token required), talking to the
/// fake API.
pub fn runpod_http(fake: &Proc) -> Proc {
    let mut cmd = Command::new("node");
    cmd.current_dir(node_dir()).args(["runpod-http.mjs", "--port", "0"]);
    fake_runpod_env(&mut cmd, fake);
    spawn_listening("runpod-http", cmd)
}

/// The RunPod environment that points RunPod MCP 4.0.0 at the fake API.
fn fake_runpod_env(cmd: &mut Command, fake: &Proc) {
    let base = format!("http://127.0.0.1:{}", fake.port);
    cmd.env("RUNPOD_SERVERLESS_API_URL", format!("{base}/runtime/v2"))
        .env("RUNPOD_AUTHED_GRAPHQL_URL", format!("{base}/graphql"))
        .env("RUNPOD_PUBLIC_GRAPHQL_URL", format!("{base}/graphql"))
        .env("RUNPOD_API_BASE_URL", base)
        .env_remove("POSTHOG_API_KEY");
}

/// The example workload's server (`examples/runpod-mcp/server.mjs`, RunPod MCP 4.0.0 over
/// Streamable HTTP on 127.0.0.1) talking to the fake API. It runs from a scratch
/// directory holding a copy of `server.mjs` and `node_modules/@runpod/mcp-server` linked to
/// tests/node's pinned 4.0.0, which is what the example's `npm ci` installs in the pod.
#[derive(Debug)]
pub struct ExampleServer {
    /// The server process; `proc.port` is where it listens (`/mcp`, `/healthz`).
    pub proc: Proc,
    _dir: tempfile::TempDir,
}

/// Starts [`ExampleServer`] (the example's `PORT` is 0: any free port).
pub fn runpod_example(fake: &Proc) -> ExampleServer {
    let package = node_dir().join("node_modules/runpod-mcp-4");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/runpod-mcp/server.mjs");
    let dir = tempfile::tempdir().expect("a scratch directory");
    std::fs::copy(&example, dir.path().join("server.mjs")).expect("copying examples/runpod-mcp/server.mjs");
    std::fs::create_dir_all(dir.path().join("node_modules/@runpod")).expect("creating node_modules");
    std::os::unix::fs::symlink(&package, dir.path().join("node_modules/@runpod/mcp-server"))
        .expect("linking @runpod/mcp-server");
    let mut cmd = Command::new("node");
    cmd.current_dir(dir.path()).arg("server.mjs").env("PORT", "0");
    fake_runpod_env(&mut cmd, fake);
    ExampleServer { proc: spawn_listening("runpod-example", cmd), _dir: dir }
}

/// A minimal HTTP/1.1 client (`Connection: close`) to loopback, so tests send exactly
/// the bytes an attacker would: a `Content-Length` given in `headers` is sent as is (even
/// when it lies), and the answer is read even when the server stops reading the body
/// early. Returns (status, head, body); status 0 when nothing listens.
pub fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String, Vec<u8>) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return (0, String::new(), Vec::new()) };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    let mut has_length = false;
    for (k, v) in headers {
        has_length |= k.eq_ignore_ascii_case("content-length");
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_length {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new(), Vec::new());
    }
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
        if n == 0 || b.len() < i + 2 + n {
            break;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + n]);
        b = b.get(i + 2 + n + 2..).unwrap_or_default();
    }
    out
}

/// The value of the first sample line starting with `prefix` in a Prometheus text page.
pub fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Runs the official-SDK client driver (tests/node/mcp-client.mjs) with a JSON script;
/// one JSON value per step.
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
    child.stdin.take().expect("piped stdin").write_all(script.to_string().as_bytes()).expect("write the script");
    let out = child.wait_with_output().expect("mcp-client runs");
    assert!(out.status.success(), "mcp-client failed: {:?}", out.status);
    String::from_utf8(out.stdout)
        .expect("mcp-client prints UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("mcp-client prints JSON lines"))
        .collect()
}

/// What reached the fake RunPod API: (method, path, body).
pub fn fake_requests(fake: &Proc) -> Vec<(String, String, Value)> {
    let (_, _, body) = http(fake.port, "GET", "/__requests", &[], b"");
    requests_from(&body)
}

/// A binary of this workspace (`target/<profile>/<name>`), built with cargo if missing
/// (`cargo test --workspace` builds every binary first; a single-package run may not).
pub fn workspace_binary(package: &str, name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target profile directory");
    let path = dir.join(name);
    if !path.exists() {
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--locked", "-p", package, "--bin", name])
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build -p {package} --bin {name} failed");
    }
    assert!(path.exists(), "{} missing after the build", path.display());
    path
}

/// A script step for [`mcp_client`]: call `tool` with `args`.
pub fn call_step(tool: &str, args: Value) -> Value {
    serde_json::json!({"op": "call", "tool": tool, "args": args})
}

/// The step the journeys limit: `pod-action` starting `pod-2`.
pub fn start_pod_step() -> Value {
    call_step("pod-action", serde_json::json!({"id": "pod-2", "body": {"action": "start"}}))
}

/// The JSON-RPC error code of each step of [`mcp_client`]'s output (None: answered by the
/// server).
pub fn error_codes(out: &[Value]) -> Vec<Option<i64>> {
    out.iter().map(|s| if s["ok"] == true { None } else { Some(s["error"]["code"].as_i64().unwrap_or(0)) }).collect()
}

/// [`mcp_client`] on a blocking thread.
pub async fn run_client(target: Vec<String>, script: Vec<Value>) -> Vec<Value> {
    tokio::task::spawn_blocking(move || mcp_client(&target, &Value::Array(script))).await.expect("the client thread")
}
