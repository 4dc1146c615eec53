//! Processes for the proxy's end-to-end tests: the fake RunPod API, the real RunPod MCP
//! servers from npm (tests/node), the official MCP SDK client driver, and the proxy.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
#[allow(unused_imports)] // each test binary uses a different subset
pub use toolgate_tests::mcp::{Proc, fake_requests, fake_runpod, http, mcp_client, node_dir, runpod_http, sample};

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

    /// The audit lines once `ready` holds for them: an admitted call's line is written up
    /// to 50 ms after the call (refusals' at once). Panics naming `what` after 20 s.
    #[allow(dead_code, reason = "not every test file reads audit lines")]
    pub fn audit_when(&self, what: &str, ready: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let lines = self.audit.lock().unwrap().clone();
            if ready(&lines) {
                return lines;
            }
            assert!(Instant::now() < deadline, "audit lines never showed {what}: {lines:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
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

pub fn metrics(proxy: &Proxy) -> String {
    String::from_utf8(http(proxy.admin, "GET", "/metrics", &[], b"").2).unwrap()
}

pub fn over_http(proxy: &Proxy, token: &str) -> Vec<String> {
    vec!["--url".into(), proxy.url(), "--header".into(), format!("Authorization: Bearer {token}")]
}

pub fn write_policy(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies").canonicalize().unwrap()
}

/// The JSON-RPC messages of an answer body: JSON, or the `data:` lines of an SSE body;
/// batches are flattened.
pub fn messages(body: &[u8]) -> Vec<Value> {
    let text = String::from_utf8_lossy(body);
    let values: Vec<Value> = if text.trim_start().starts_with(['{', '[']) {
        vec![serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))]
    } else {
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str(d.trim()).ok())
            .collect()
    };
    values.into_iter().flat_map(|v| if let Value::Array(a) = v { a } else { vec![v] }).collect()
}
