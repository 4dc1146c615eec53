//! toolgate-proxy in front of the real RunPod MCP servers (npm, pinned in tests/node),
//! driven by the official MCP SDK client, with a fake RunPod REST API recording what
//! reached it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

const SEED: &str = "seed-start-pod.json";

fn call(tool: &str, args: Value) -> Value {
    json!({"op": "call", "tool": tool, "args": args})
}

fn error_code(step: &Value) -> Option<i64> {
    step["error"]["code"].as_i64()
}

#[test]
fn seed_policy_in_front_of_runpod_1_1_0_over_stdio_children() {
    let fake = fake_runpod();
    let mut tail = vec!["--".to_owned()];
    tail.extend(runpod_1_stdio_command());
    let proxy = proxy(
        &[&examples().join(SEED)],
        &tail,
        &[("RUNPOD_API_KEY", "k".into()), ("RUNPOD_REDIRECT_URL", format!("http://127.0.0.1:{}", fake.port))],
    );
    let mut script = vec![json!({"op": "list"})];
    script.extend((0..11).map(|_| call("start-pod", json!({"podId": "pod-2"}))));
    script.push(call("delete-pod", json!({"podId": "pod-1"})));
    let out = mcp_client(&over_http(&proxy, "agent-a"), &Value::Array(script));

    let names: Vec<&str> =
        out[0]["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["start-pod"], "tools/list shows only what the policy allows");
    for (i, step) in out[1..11].iter().enumerate() {
        assert_eq!(step["ok"], true, "start #{} must be answered by RunPod: {step}", i + 1);
    }
    let eleventh = &out[11];
    assert_eq!(error_code(eleventh), Some(-32011), "{eleventh}");
    assert_eq!(eleventh["error"]["data"]["decision"], "rate_limited");
    let retry = eleventh["error"]["data"]["retryAfterSeconds"].as_u64().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(error_code(&out[12]), Some(-32010));
    assert_eq!(out[12]["error"]["data"]["rule"], "default");

    let reached = fake_requests(&fake);
    let starts = reached.iter().filter(|(m, p, _)| m == "POST" && p == "/v1/pods/pod-2/start").count();
    assert_eq!(starts, 10, "exactly the allowed calls reached RunPod: {reached:?}");
    assert!(!reached.iter().any(|(m, _, _)| m == "DELETE"), "{reached:?}");

    let m = metrics(&proxy);
    assert_eq!(sample(&m, r#"toolgate_decisions_total{tool="start-pod",decision="allow""#), 10.0, "{m}");
    assert_eq!(sample(&m, r#"toolgate_decisions_total{tool="start-pod",decision="rate_limited""#), 1.0, "{m}");
    assert_eq!(sample(&m, r#"toolgate_decisions_total{tool="delete-pod",decision="deny""#), 1.0, "{m}");
    let audit = proxy.audit_when("12 lines", |a| a.len() >= 12);
    assert_eq!(audit.len(), 12, "one audit line per decision");
    // The child uses its own key and never sees the caller's Authorization: nothing
    // authenticates callers, so all of them are one (anonymous) identity.
    assert!(audit.iter().all(|a| a["identity"].as_str().unwrap_or_default().is_empty()), "{audit:?}");
    assert!(!audit.iter().any(|a| a.to_string().contains("agent-a")), "no raw credential in audit");
    assert_eq!(audit.iter().filter(|a| a["decision"] == "allow").count(), 10);

    // Another (invented) credential is not another caller: the 10 hold for the server.
    let out = mcp_client(&over_http(&proxy, "agent-b"), &json!([call("start-pod", json!({"podId": "pod-2"}))]));
    assert_eq!(error_code(&out[0]), Some(-32011), "{}", out[0]);
    let starts = fake_requests(&fake).iter().filter(|(m, p, _)| m == "POST" && p == "/v1/pods/pod-2/start").count();
    assert_eq!(starts, 10);
}

const POD_ACTION_POLICY: &str = r#"
version: "1"
default: deny
tools:
  list-pods: {}
  pod-action:
    arguments:
      type: object
      required: [id, body]
      properties:
        body: {type: object, required: [action]}
    require:
      - {path: args.body.action, op: in, value: [start, stop, restart]}
    limits:
      - {counter: start-pod_rate, window: minute, max: 10, scope: grant}
"#;

#[test]
fn same_limits_in_front_of_runpod_4_0_0_over_http() {
    let fake = fake_runpod();
    let server = runpod_http(&fake);
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), "pod-action.yaml", POD_ACTION_POLICY);
    let proxy = proxy(&[&policy], &["--upstream".into(), format!("http://127.0.0.1:{}/mcp", server.port)], &[]);
    let mut script: Vec<Value> =
        (0..11).map(|_| call("pod-action", json!({"id": "pod-2", "body": {"action": "start"}}))).collect();
    script.push(call("pod-action", json!({"id": "pod-1", "body": {"action": "terminate"}})));
    script.push(call("pod-action", json!({"id": "pod-1", "body": "{\"action\":\"terminate\"}"})));
    script.push(call("delete-pod", json!({"id": "pod-1"})));
    script.push(call("list-pods", json!({})));
    let out = mcp_client(&over_http(&proxy, "k"), &Value::Array(script));
    for step in &out[..10] {
        assert_eq!(step["ok"], true, "{step}");
    }
    assert_eq!(error_code(&out[10]), Some(-32011), "{}", out[10]);
    assert_eq!(error_code(&out[11]), Some(-32010), "terminate is refused: {}", out[11]);
    assert_eq!(error_code(&out[12]), Some(-32010), "a string body cannot smuggle terminate: {}", out[12]);
    assert_eq!(error_code(&out[13]), Some(-32010), "{}", out[13]);
    assert_eq!(out[14]["ok"], true, "{}", out[14]);

    let reached = fake_requests(&fake);
    let actions: Vec<&Value> =
        reached.iter().filter(|(m, p, _)| m == "POST" && p.ends_with("/action")).map(|(_, _, b)| b).collect();
    assert_eq!(actions.len(), 10, "{reached:?}");
    assert!(actions.iter().all(|b| b["action"] == "start"), "never a terminate: {actions:?}");
    assert!(!reached.iter().any(|(m, _, _)| m == "DELETE"), "{reached:?}");
}

#[test]
fn bypass_attempts_are_refused_and_reach_nothing() {
    let fake = fake_runpod();
    let server = runpod_http(&fake);
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), "p.yaml", POD_ACTION_POLICY);
    let proxy = proxy(&[&policy], &["--upstream".into(), format!("http://127.0.0.1:{}/mcp", server.port)], &[]);
    let port = proxy.proc.port;
    let json_h = [
        ("Content-Type", "application/json"),
        ("Accept", "application/json, text/event-stream"),
        ("Authorization", "Bearer k"),
    ];
    let del =
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete-pod","arguments":{"id":"pod-1"}}}"#;
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"list-pods","arguments":{}}}"#;
    type Attempt<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<u8>);
    let attempts: Vec<Attempt> = vec![
        ("plain delete", json_h.to_vec(), del.into()),
        ("case variant", json_h.to_vec(), del.replace("delete-pod", "Delete-Pod").into()),
        ("batch hiding a delete", json_h.to_vec(), format!("[{list},{del}]").into()),
        (
            "duplicate name key",
            json_h.to_vec(),
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"list-pods","name":"delete-pod","arguments":{"id":"pod-1"}}}"#.into(),
        ),
        (
            "duplicate params",
            json_h.to_vec(),
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"list-pods"},"params":{"name":"delete-pod","arguments":{"id":"pod-1"}}}"#.into(),
        ),
        ("notification", json_h.to_vec(), del.replace(r#""id":1,"#, "").into()),
        ("null id", json_h.to_vec(), del.replace(r#""id":1"#, r#""id":null"#).into()),
        ("string arguments", json_h.to_vec(), del.replace(r#"{"id":"pod-1"}"#, r#""{\"id\":\"pod-1\"}""#).into()),
        (
            "gzip body",
            [json_h.to_vec(), vec![("Content-Encoding", "gzip")]].concat(),
            del.into(),
        ),
        (
            "header/body mismatch",
            [json_h.to_vec(), vec![("Mcp-Method", "tools/call"), ("Mcp-Name", "list-pods")]].concat(),
            del.into(),
        ),
        ("text/plain", vec![("Content-Type", "text/plain"), ("Authorization", "Bearer k")], del.into()),
        ("oversized", json_h.to_vec(), del.replace("pod-1", &"x".repeat(5 * 1024 * 1024)).into_bytes()),
        ("trailing garbage", json_h.to_vec(), format!("{del} {del}").into()),
        ("utf-16 body", json_h.to_vec(), del.encode_utf16().flat_map(u16::to_le_bytes).collect()),
    ];
    for (what, headers, body) in &attempts {
        let (status, _, resp) = http(port, "POST", "/mcp", headers, body);
        assert!(status != 0, "{what}: no answer");
        let text = String::from_utf8_lossy(resp.as_slice());
        assert!(status >= 400 || text.contains("\"error\""), "{what}: must be refused, got {status} {text}");
    }
    let reached = fake_requests(&fake);
    assert!(
        !reached.iter().any(|(m, p, _)| m == "DELETE" || p.contains("pod-1")),
        "nothing refused reached RunPod: {reached:?}"
    );
    // The proxy is still healthy and serving.
    let out = mcp_client(&over_http(&proxy, "k"), &json!([call("list-pods", json!({}))]));
    assert_eq!(out[0]["ok"], true, "{}", out[0]);
}

#[test]
fn policy_edit_applies_to_the_next_call_and_a_broken_edit_keeps_the_last_good_one() {
    let fake = fake_runpod();
    let server = runpod_http(&fake);
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), "p.yaml", "version: '1'\ndefault: deny\ntools:\n  list-pods: {}\n");
    let proxy = proxy(&[&policy], &["--upstream".into(), format!("http://127.0.0.1:{}/mcp", server.port)], &[]);
    let before = json!([call("get-pod", json!({"id": "pod-1"}))]);
    let out = mcp_client(&over_http(&proxy, "k"), &before);
    assert_eq!(error_code(&out[0]), Some(-32010));

    write_policy(dir.path(), "p.yaml", "version: '1'\ndefault: deny\ntools:\n  list-pods: {}\n  get-pod: {}\n");
    wait_for(|| sample(&metrics(&proxy), "toolgate_policy_info{") == 1.0 && policy_text(&proxy).contains("get-pod"));
    let out = mcp_client(&over_http(&proxy, "k"), &before);
    assert_eq!(out[0]["ok"], true, "the edited policy allows get-pod: {}", out[0]);

    write_policy(dir.path(), "p.yaml", "version: '1'\ndefault: deny\ntools:\n  get-pod: {action: sometimes}\n");
    wait_for(|| sample(&metrics(&proxy), "toolgate_policy_reload_errors_total") == 1.0);
    let out = mcp_client(&over_http(&proxy, "k"), &before);
    assert_eq!(out[0]["ok"], true, "the last good policy stays: {}", out[0]);
    assert_eq!(http(proxy.admin, "GET", "/readyz", &[], b"").0, 200);
}

fn policy_text(proxy: &Proxy) -> String {
    String::from_utf8_lossy(&http(proxy.admin, "GET", "/policy", &[], b"").2).to_string()
}

fn wait_for(mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "condition not reached in time");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn stdio_mode_with_the_sdk_stdio_client() {
    let fake = fake_runpod();
    let mut target = vec![
        "--stdio".to_owned(),
        "--".to_owned(),
        env!("CARGO_BIN_EXE_toolgate-proxy").to_owned(),
        "--stdio".to_owned(),
        "--policy".to_owned(),
        examples().join(SEED).display().to_string(),
        "--admin-listen".to_owned(),
        format!("127.0.0.1:{}", free_port()),
        "--".to_owned(),
    ];
    target.extend(runpod_1_stdio_command());
    // mcp-client passes its environment on to the stdio child (the proxy, then RunPod).
    let script = json!([
        {"op": "list"},
        call("start-pod", json!({"podId": "pod-2"})),
        call("delete-pod", json!({"podId": "pod-1"})),
    ]);
    let out = std::process::Command::new("node")
        .current_dir(node_dir())
        .arg("mcp-client.mjs")
        .args(&target)
        .env("RUNPOD_API_KEY", "k")
        .env("RUNPOD_REDIRECT_URL", format!("http://127.0.0.1:{}", fake.port))
        .env("TOOLGATE_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(script.to_string().as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    let steps: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(steps.len(), 3, "{steps:?}");
    let names: Vec<&str> =
        steps[0]["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["start-pod"]);
    assert_eq!(steps[1]["ok"], true, "{}", steps[1]);
    assert_eq!(error_code(&steps[2]), Some(-32010), "{}", steps[2]);
    let reached = fake_requests(&fake);
    assert_eq!(reached.iter().filter(|(_, p, _)| p == "/v1/pods/pod-2/start").count(), 1);
    assert!(!reached.iter().any(|(m, _, _)| m == "DELETE"));
}

#[test]
fn runpod_4_pack_behaves_as_its_comments_say() {
    let fake = fake_runpod();
    let server = runpod_http(&fake);
    let proxy = proxy(
        &[&examples().join("runpod-4.0.0.yaml")],
        &["--upstream".into(), format!("http://127.0.0.1:{}/mcp", server.port)],
        &[],
    );
    let out = mcp_client(
        &over_http(&proxy, "k"),
        &json!([
            {"op": "list"},
            call("list-pods", json!({})),
            call("pod-action", json!({"id": "pod-2", "body": {"action": "start"}})),
            call("pod-action", json!({"id": "pod-1", "body": {"action": "terminate"}})),
            call("create-pod", json!({"body": {"name": "x", "image": "runpod/pytorch:2", "cloud": "SECURE", "gpu": {"count": 8}}})),
            call("delete-pod", json!({"id": "pod-1"})),
            call("delete-network-volume", json!({"id": "vol-1"})),
        ]),
    );
    let listed: Vec<&str> =
        out[0]["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert!(listed.contains(&"list-pods") && listed.contains(&"pod-action"), "{listed:?}");
    assert!(!listed.contains(&"delete-network-volume"), "denied tools are not listed: {listed:?}");
    assert_eq!(out[1]["ok"], true, "{}", out[1]);
    assert_eq!(out[2]["ok"], true, "{}", out[2]);
    assert_eq!(error_code(&out[3]), Some(-32010), "{}", out[3]);
    assert_eq!(error_code(&out[4]), Some(-32010), "{}", out[4]);
    assert_eq!(error_code(&out[5]), Some(-32012), "deletes wait for approval: {}", out[5]);
    assert_eq!(error_code(&out[6]), Some(-32010), "{}", out[6]);
    let reached = fake_requests(&fake);
    assert!(!reached.iter().any(|(m, _, _)| m == "DELETE"), "{reached:?}");
    assert!(!reached.iter().any(|(m, p, _)| m == "POST" && p == "/v2/pods"), "no pod created: {reached:?}");
}

#[test]
fn sigterm_exits_zero_and_invalid_policy_exits_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_policy(dir.path(), "good.yaml", "version: '1'\n");
    let p = proxy(&[&good], &["--upstream".into(), "http://127.0.0.1:9/mcp".into()], &[]);
    let pid = p.proc.child.id().to_string();
    let mut p = p;
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = p.proc.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "proxy did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");

    let bad =
        write_policy(dir.path(), "bad.yaml", "version: '1'\ntools:\n  x:\n    limits: [{window: fortnight, max: 1}]\n");
    let port = free_port();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_toolgate-proxy"))
        .arg("--policy")
        .arg(&bad)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--upstream", "http://127.0.0.1:9/mcp"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tools.x.limits[0].window"), "{err}");
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(), "no port was bound");
}

#[test]
fn runpod_1_pack_behaves_as_its_comments_say() {
    let fake = fake_runpod();
    let mut tail = vec!["--".to_owned()];
    tail.extend(runpod_1_stdio_command());
    let proxy = proxy(
        &[&examples().join("runpod-1.1.0.yaml")],
        &tail,
        &[("RUNPOD_API_KEY", "k".into()), ("RUNPOD_REDIRECT_URL", format!("http://127.0.0.1:{}", fake.port))],
    );
    let good = json!({"name": "x", "imageName": "runpod/pytorch:2", "gpuCount": 1, "cloudType": "SECURE"});
    let out = mcp_client(
        &over_http(&proxy, "k"),
        &json!([
            {"op": "list"},
            call("list-pods", json!({})),
            call("create-pod", good.clone()),
            call("create-pod", json!({"name": "x", "imageName": "runpod/pytorch:2", "gpuCount": 8})),
            call("create-pod", json!({"name": "x", "imageName": "evil/miner:latest", "gpuCount": 1})),
            call("create-pod", json!({"name": "x", "imageName": "runpod/pytorch:2"})),
            call("delete-pod", json!({"podId": "pod-1"})),
        ]),
    );
    let listed = out[0]["result"]["tools"].as_array().unwrap().len();
    assert!(listed >= 20, "most tools are listed: {listed}");
    assert_eq!(out[1]["ok"], true, "{}", out[1]);
    assert_eq!(out[2]["ok"], true, "{}", out[2]);
    assert_eq!(out[3]["error"]["data"]["reason"], "at most 2 GPUs per pod", "{}", out[3]);
    assert_eq!(error_code(&out[4]), Some(-32010), "image allow-list: {}", out[4]);
    assert_eq!(error_code(&out[5]), Some(-32010), "gpuCount must be stated: {}", out[5]);
    assert_eq!(error_code(&out[6]), Some(-32012), "delete waits for approval: {}", out[6]);
    let reached = fake_requests(&fake);
    let creates: Vec<&Value> =
        reached.iter().filter(|(m, p, _)| m == "POST" && p == "/v1/pods").map(|(_, _, b)| b).collect();
    assert_eq!(creates.len(), 1, "only the compliant create reached RunPod: {reached:?}");
    assert_eq!(creates[0]["gpuCount"], 1);
    assert!(!reached.iter().any(|(m, _, _)| m == "DELETE"), "{reached:?}");
}
