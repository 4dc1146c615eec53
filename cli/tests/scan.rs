//! `toolgate scan` against the real RunPod MCP servers (tests/node): the scaffolds of
//! 1.1.0 (stdio) and 4.0.0 (Streamable HTTP) list every tool and validate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn node_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/node");
    assert!(dir.join("node_modules/runpod-mcp-1").is_dir(), "run `make node` (npm ci in tests/node) first");
    dir.canonicalize().unwrap()
}

fn fixture_names(version: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../tests/fixtures/runpod-{version}-tools.json"));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let tools = v.as_array().cloned().or_else(|| v["tools"].as_array().cloned()).unwrap();
    tools.iter().map(|t| t["name"].as_str().unwrap().to_owned()).collect()
}

fn check_scaffold(text: &str, expected: &[String]) {
    let policy = toolgate_policy::Policy::from_text("scan", text).expect("the scaffold validates");
    let doc = policy.documents().next().unwrap().1.clone();
    let mut keys: Vec<&String> = doc.tools.keys().collect();
    keys.sort();
    let mut want: Vec<&String> = expected.iter().collect();
    want.sort();
    assert_eq!(keys, want, "one rule per tool");
    assert_eq!(doc.tools["delete-pod"].action, Some(toolgate_policy::Action::Approval));
    assert!(text.contains("# list-pods: read"), "classes are written as comments");
}

#[test]
fn scan_runpod_1_1_0_over_stdio() {
    let dir = node_dir();
    let out = Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .args(["scan", "--", "node"])
        .arg(dir.join("node_modules/runpod-mcp-1/dist/index.mjs"))
        .env("RUNPOD_API_KEY", "scan-only")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let names = fixture_names("1.1.0");
    assert_eq!(names.len(), 26);
    check_scaffold(&String::from_utf8(out.stdout).unwrap(), &names);
}

#[test]
fn scan_runpod_4_0_0_over_http() {
    let dir = node_dir();
    let mut server = Command::new("node")
        .current_dir(&dir)
        .args(["runpod-http.mjs", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port: u16 = line.trim().strip_prefix("LISTENING ").unwrap().parse().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .args(["scan", "--upstream", &format!("http://127.0.0.1:{port}/mcp"), "--header", "Authorization: Bearer k"])
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let names = fixture_names("4.0.0");
    assert_eq!(names.len(), 68);
    check_scaffold(&String::from_utf8(out.stdout).unwrap(), &names);
}

#[test]
fn scan_reports_a_dead_server() {
    let out = Command::new(env!("CARGO_BIN_EXE_toolgate")).args(["scan", "--", "false"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // The process may exit before or after the request is written: either way the
    // error says the server is gone.
    assert!(err.contains("no answer") || err.contains("stdin is closed"), "{err}");
    assert!(!err.contains("panicked"));
}
