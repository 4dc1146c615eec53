//! toolgate-proxy in operator mode (`--operator`): the real binary against an in-process
//! fake operator (HTTPS with a throwaway CA, bearer tokens, NDJSON stream, recorded
//! acknowledgements, approval requests and closes) in front of an in-process MCP server
//! that records what reached it. Loopback only; every wait polls with a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/fake_operator.rs"]
mod fake_operator;
#[path = "support/mock_mcp.rs"]
mod mock_mcp;
mod support;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fake_operator::{AckSeen, ApprovalSeen, CloseSeen, FakeOperator};
use mock_mcp::{Client, MockMcp, error_code};
use serde_json::{Value, json};
use support::{Proxy, free_port, http, metrics, sample};
use toolgate_policy::push::{Ack, ApprovalClose, PodRef, PolicySet, PushedPolicy};

const DENIED: i64 = -32010;
const APPROVAL_REQUIRED: i64 = -32012;
const NO_POLICY: i64 = -32013;

struct Harness {
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    mcp: MockMcp,
}

impl Harness {
    fn new() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let mcp = MockMcp::start(&rt);
        Self { rt, dir: tempfile::tempdir().unwrap(), mcp }
    }

    fn token_file(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    fn write_token(&self, token: &str) {
        // Written like the kubelet does: a new file swapped in.
        let tmp = self.dir.path().join("token.tmp");
        std::fs::write(&tmp, format!("{token}\n")).unwrap();
        std::fs::rename(tmp, self.token_file()).unwrap();
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn operator(&self, token: &str, first: &PolicySet) -> FakeOperator {
        self.write_token(token);
        let op = FakeOperator::start(&self.rt, token, first);
        std::fs::write(self.dir.path().join("ca.crt"), &op.ca_pem).unwrap();
        op
    }

    /// Starts the proxy in operator mode, with the arguments the operator injects.
    fn proxy(&self, operator_url: &str, state_dir: &std::path::Path) -> Proxy {
        let tail = vec![
            format!("--operator={operator_url}"),
            format!("--token-file={}", self.token_file().display()),
            format!("--ca-file={}", self.dir.path().join("ca.crt").display()),
            format!("--state-dir={}", state_dir.display()),
            format!("--upstream={}", self.mcp.url()),
        ];
        support::proxy(&[], &tail, &[("TOOLGATE_POD_NAME", "pod-0".into())])
    }
}

fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pushed(name: &str, dry_run: bool, document: Value) -> PushedPolicy {
    PushedPolicy { name: name.into(), uid: format!("uid-{name}"), generation: 1, dry_run, document }
}

fn set(policies: Vec<PushedPolicy>) -> PolicySet {
    PolicySet::new(PodRef { namespace: "agents".into(), name: "pod-0".into() }, policies)
}

/// A document allowing exactly these tools (default deny).
fn allow(tools: &[&str]) -> Value {
    let tools: serde_json::Map<String, Value> = tools.iter().map(|t| ((*t).to_owned(), json!({}))).collect();
    json!({"version": "1", "default": "deny", "tools": tools})
}

fn wait_ack(op: &FakeOperator, revision: &str) -> AckSeen {
    eventually(&format!("an ack of revision {revision}"), || op.acks().into_iter().find(|a| a.ack.revision == revision))
}

fn admin(proxy: &Proxy, path: &str) -> (u16, String) {
    let (status, _, body) = http(proxy.admin, "GET", path, &[], b"");
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn policy_view(proxy: &Proxy) -> Value {
    serde_json::from_str(&admin(proxy, "/policy").1).unwrap()
}

#[test]
fn pushed_sets_are_enforced_acked_replaced_and_a_bad_one_keeps_the_last_good() {
    let h = Harness::new();
    let first = set(vec![pushed("echo-only", false, allow(&["echo"]))]);
    let op = h.operator("tok-1", &first);
    let proxy = h.proxy(&op.url(), &h.state_dir());

    let ack = wait_ack(&op, &first.revision);
    assert_eq!(ack.ack, Ack { revision: first.revision.clone(), error: None });
    assert!(ack.on_stream_connection, "over h2 the ack travels on the stream's connection: {ack:?}");
    eventually("ready", || (admin(&proxy, "/readyz").0 == 200).then_some(()));

    let mut client = Client::initialize(proxy.proc.port, "agent");
    assert!(client.call("echo")["result"].is_object(), "allowed call passes");
    let refused = client.call("delete-pod");
    assert_eq!(error_code(&refused), Some(DENIED), "{refused}");
    assert_eq!(refused["error"]["data"]["policy"], "echo-only");
    assert_eq!(h.mcp.called("echo"), 1);
    assert_eq!(h.mcp.called("delete-pod"), 0, "a denied call never reaches the upstream");
    assert_eq!(client.list(), ["echo"]);

    let view = policy_view(&proxy);
    assert_eq!(view["revision"], first.revision.as_str());
    assert_eq!(view["source"], "operator");
    assert_eq!(view["documents"][0]["name"], "echo-only");
    assert_eq!(view["documents"][0]["mode"], "enforce");
    let m = metrics(&proxy);
    assert_eq!(sample(&m, "toolgate_operator_connected "), 1.0, "{m}");
    assert_eq!(sample(&m, "toolgate_policy_loaded "), 1.0, "{m}");
    assert_eq!(sample(&m, &format!(r#"toolgate_policy_info{{revision="{}"}}"#, first.revision)), 1.0, "{m}");
    assert_eq!(sample(&m, r#"toolgate_policy_updates_total{result="applied"}"#), 1.0, "{m}");
    let audit = eventually("two audit lines", || {
        let a = proxy.audit.lock().unwrap().clone();
        (a.len() >= 2).then_some(a)
    });
    assert!(audit.iter().all(|a| a["revision"] == first.revision.as_str() && a["pod"] == "pod-0"), "{audit:?}");
    let persisted: PolicySet =
        serde_json::from_slice(&std::fs::read(h.state_dir().join("policyset.json")).unwrap()).unwrap();
    assert_eq!(persisted, first);

    // A new set changes enforcement for the next call of the same session.
    let second = set(vec![pushed("delete-only", false, allow(&["delete-pod"]))]);
    op.publish(&second);
    assert_eq!(wait_ack(&op, &second.revision).ack.error, None);
    let answer = client.call("delete-pod");
    assert!(answer["result"].is_object(), "{answer}");
    assert_eq!(h.mcp.calls().last().unwrap(), &(client.session.clone(), "delete-pod".to_owned()), "same session");
    assert_eq!(error_code(&client.call("echo")), Some(DENIED));
    assert_eq!(op.streams(), 1, "the set came on the open stream");

    // An invalid set is acknowledged with its error; the last good policy stays.
    let invalid = set(vec![pushed(
        "broken",
        false,
        json!({"version": "1", "tools": {"x": {"limits": [{"window": "fortnight", "max": 1}]}}}),
    )]);
    op.publish(&invalid);
    let nack = wait_ack(&op, &invalid.revision);
    let error = nack.ack.error.expect("an error");
    assert!(error.contains("broken: tools.x.limits[0].window"), "{error}");
    assert!(client.call("delete-pod")["result"].is_object(), "the last good policy still allows it");
    assert_eq!(policy_view(&proxy)["revision"], second.revision.as_str());
    let m = metrics(&proxy);
    assert_eq!(sample(&m, r#"toolgate_policy_updates_total{result="rejected"}"#), 1.0, "{m}");
    assert_eq!(sample(&m, &format!(r#"toolgate_policy_info{{revision="{}"}}"#, second.revision)), 1.0, "{m}");

    // No McpPolicy selects the pod any more: deny everything, not ready, persisted.
    let empty = set(vec![]);
    op.publish(&empty);
    assert_eq!(wait_ack(&op, &empty.revision).ack.error, None);
    let refused = client.call("delete-pod");
    assert_eq!(error_code(&refused), Some(NO_POLICY), "{refused}");
    assert_eq!(admin(&proxy, "/readyz").0, 503);
    assert_eq!(sample(&metrics(&proxy), "toolgate_policy_loaded "), 0.0);
    let persisted: PolicySet =
        serde_json::from_slice(&std::fs::read(h.state_dir().join("policyset.json")).unwrap()).unwrap();
    assert_eq!(persisted, empty);
    assert_eq!(h.mcp.called("delete-pod"), 2, "only the two allowed deletes reached the upstream");
}

#[test]
fn an_operator_outage_keeps_the_policy_and_the_reconnect_uses_the_rotated_token() {
    let h = Harness::new();
    let first = set(vec![pushed("echo-only", false, allow(&["echo"]))]);
    let mut op = h.operator("tok-1", &first);
    let proxy = h.proxy(&op.url(), &h.state_dir());
    wait_ack(&op, &first.revision);

    op.kill();
    eventually("the proxy notices the operator is gone", || {
        (sample(&metrics(&proxy), "toolgate_operator_connected ") == 0.0).then_some(())
    });
    let mut client = Client::initialize(proxy.proc.port, "agent");
    assert!(client.call("echo")["result"].is_object(), "the last good policy is enforced");
    assert_eq!(error_code(&client.call("delete-pod")), Some(DENIED));
    assert_eq!(admin(&proxy, "/readyz").0, 200);

    // While it is down: the projected token rotates and the policy changes.
    h.write_token("tok-2");
    op.set_token("tok-2");
    let second = set(vec![pushed("delete-only", false, allow(&["delete-pod"]))]);
    op.publish(&second);
    let seen_before = op.tokens_seen().len();
    op.restart();

    // The fake now refuses tok-1, so this ack proves the token file was read again.
    assert_eq!(wait_ack(&op, &second.revision).ack.error, None);
    let tokens = op.tokens_seen();
    assert!(tokens[seen_before..].iter().all(|t| t == "tok-2"), "{tokens:?}");
    assert!(client.call("delete-pod")["result"].is_object());
    assert_eq!(error_code(&client.call("echo")), Some(DENIED));
    eventually("connected again", || (sample(&metrics(&proxy), "toolgate_operator_connected ") == 1.0).then_some(()));
    assert_eq!(op.refused(), 0, "the old token was never presented");
}

#[test]
fn a_restarted_proxy_enforces_the_persisted_set_before_the_operator_answers() {
    let h = Harness::new();
    let first = set(vec![pushed("echo-only", false, allow(&["echo"]))]);
    let mut op = h.operator("tok-1", &first);
    let url = op.url();
    let proxy = h.proxy(&url, &h.state_dir());
    wait_ack(&op, &first.revision);
    drop(proxy);
    op.kill();

    // Same state dir, operator down: enforcing at once (no wait).
    let proxy = h.proxy(&url, &h.state_dir());
    assert_eq!(admin(&proxy, "/readyz").0, 200, "ready from the first check");
    assert_eq!(policy_view(&proxy)["revision"], first.revision.as_str());
    let mut client = Client::initialize(proxy.proc.port, "agent");
    assert!(client.call("echo")["result"].is_object());
    assert_eq!(error_code(&client.call("delete-pod")), Some(DENIED));
    let m = metrics(&proxy);
    assert_eq!(sample(&m, "toolgate_operator_connected "), 0.0, "{m}");
    assert_eq!(sample(&m, "toolgate_policy_loaded "), 1.0, "{m}");
    drop(proxy);

    // Never had a policy (fresh state dir), operator down: deny all, not ready.
    let proxy = h.proxy(&url, &h.dir.path().join("fresh"));
    let (status, text) = admin(&proxy, "/readyz");
    assert_eq!(status, 503, "{text}");
    let mut client = Client::initialize(proxy.proc.port, "agent");
    let refused = client.call("echo");
    assert_eq!(error_code(&refused), Some(NO_POLICY), "{refused}");
    assert_eq!(policy_view(&proxy)["loaded"], false);
    assert_eq!(h.mcp.called("echo"), 1, "only the first proxy's allowed call reached the upstream");
}

#[test]
fn garbage_lines_and_wrong_revisions_never_loosen_the_policy() {
    let h = Harness::new();
    let first = set(vec![pushed("echo-only", false, allow(&["echo"]))]);
    let op = h.operator("tok-1", &first);
    let proxy = h.proxy(&op.url(), &h.state_dir());
    wait_ack(&op, &first.revision);
    let mut client = Client::initialize(proxy.proc.port, "agent");

    op.send_raw("this is not JSON\n");
    eventually("a reconnect after the garbage line", || (op.streams() >= 2).then_some(()));
    assert_eq!(error_code(&client.call("delete-pod")), Some(DENIED));

    // A set claiming a revision that is not the hash of its content (allow everything).
    let streams = op.streams();
    let mut forged = set(vec![pushed("open", false, json!({"version": "1", "default": "allow"}))]);
    forged.revision = "0123456789abcdef".into();
    op.send_raw(&fake_operator::line(&toolgate_policy::push::Message::Policies(forged)));
    let nack = wait_ack(&op, "0123456789abcdef");
    assert!(nack.ack.error.as_deref().is_some_and(|e| e.contains("does not match")), "{nack:?}");
    eventually("a reconnect after the forged set", || (op.streams() > streams).then_some(()));
    assert_eq!(error_code(&client.call("delete-pod")), Some(DENIED));
    assert_eq!(policy_view(&proxy)["revision"], first.revision.as_str());

    // A policies line whose body is not a policy set, and a JSON value without a type.
    let streams = op.streams();
    op.send_raw("{\"type\":\"policies\",\"revision\":1}\n");
    eventually("a reconnect after the bad set", || (op.streams() > streams).then_some(()));
    let streams = op.streams();
    op.send_raw("[1,2,3]\n");
    eventually("a reconnect after the typeless line", || (op.streams() > streams).then_some(()));

    assert_eq!(error_code(&client.call("delete-pod")), Some(DENIED));
    assert_eq!(h.mcp.called("delete-pod"), 0);
    assert!(client.call("echo")["result"].is_object(), "the good policy is still in force");
    let m = metrics(&proxy);
    assert_eq!(sample(&m, r#"toolgate_policy_updates_total{result="applied"}"#), 1.0, "{m}");
    let forged_acks = op.acks().iter().filter(|a| a.ack.error.is_some()).count();
    assert_eq!(forged_acks, 1, "only the forged set is acknowledged (with its error)");
}

#[test]
fn dry_run_documents_are_counted_not_enforced() {
    let h = Harness::new();
    let both =
        set(vec![pushed("base", false, allow(&["echo", "start-pod"])), pushed("strict", true, allow(&["echo"]))]);
    let op = h.operator("tok-1", &both);
    let proxy = h.proxy(&op.url(), &h.state_dir());
    wait_ack(&op, &both.revision);
    let mut client = Client::initialize(proxy.proc.port, "agent");

    let answer = client.call("start-pod");
    assert!(answer["result"].is_object(), "the dry-run refusal does not refuse: {answer}");
    assert_eq!(h.mcp.called("start-pod"), 1);
    let m = metrics(&proxy);
    assert_eq!(
        sample(&m, r#"toolgate_decisions_total{tool="start-pod",decision="would_deny",policy="strict""#),
        1.0,
        "{m}"
    );
    assert_eq!(sample(&m, r#"toolgate_decisions_total{tool="start-pod",decision="allow",policy="base""#), 1.0, "{m}");
    let would = eventually("a would_deny audit line", || {
        proxy.audit.lock().unwrap().iter().find(|a| a["decision"] == "would_deny").cloned()
    });
    assert_eq!((&would["tool"], &would["policy"]), (&json!("start-pod"), &json!("strict")), "{would}");
    assert_eq!(would["revision"], both.revision.as_str());
    assert_eq!(error_code(&client.call("delete-pod")), Some(DENIED), "the enforcing document still decides");
    let mut listed = client.list();
    listed.sort();
    assert_eq!(listed, ["echo", "start-pod"], "tools/list follows the enforcing documents only");
    let view = policy_view(&proxy);
    let modes: Vec<(&str, &str)> = view["documents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["name"].as_str().unwrap(), d["mode"].as_str().unwrap()))
        .collect();
    assert_eq!(modes, [("base", "enforce"), ("strict", "dryRun")]);

    // Only a dry-run document: calls pass (it is being tried out), and are counted.
    let dry_only = set(vec![pushed("strict", true, allow(&["echo"]))]);
    op.publish(&dry_only);
    wait_ack(&op, &dry_only.revision);
    assert!(client.call("delete-pod")["result"].is_object());
    assert_eq!(h.mcp.called("delete-pod"), 1);
    assert_eq!(admin(&proxy, "/readyz").0, 200);
    let m = metrics(&proxy);
    assert_eq!(
        sample(&m, r#"toolgate_decisions_total{tool="delete-pod",decision="would_deny",policy="strict""#),
        1.0,
        "{m}"
    );
}

#[test]
fn a_silent_stream_is_dropped_and_http1_acks_use_their_own_connection() {
    let h = Harness::new();
    let first = set(vec![pushed("echo-only", false, allow(&["echo"]))]);
    h.write_token("tok-1");
    let op = FakeOperator::start_with(&h.rt, "tok-1", &first, &[b"http/1.1"]);
    std::fs::write(h.dir.path().join("ca.crt"), &op.ca_pem).unwrap();
    // One heartbeat announcing 1 s, then silence: dead after 3 s.
    op.set_heartbeat(1, false);
    let proxy = h.proxy(&op.url(), &h.state_dir());

    let ack = wait_ack(&op, &first.revision);
    assert!(!ack.on_stream_connection, "HTTP/1.1 cannot share the stream's connection: {ack:?}");
    eventually("a reconnect after three silent heartbeat intervals", || (op.streams() >= 2).then_some(()));
    let mut client = Client::initialize(proxy.proc.port, "agent");
    assert_eq!(error_code(&client.call("delete-pod")), Some(DENIED));
    assert!(client.call("echo")["result"].is_object());
}

#[test]
fn exactly_one_policy_source_and_an_https_operator() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_toolgate-proxy"))
            .args(args)
            .args(["--listen", &format!("127.0.0.1:{}", free_port()), "--upstream", "http://127.0.0.1:9/mcp"])
            .env_remove("TOOLGATE_POLICY")
            .env_remove("TOOLGATE_OPERATOR")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.yaml");
    std::fs::write(&policy, "version: '1'\n").unwrap();
    let policy = policy.to_str().unwrap();

    let (code, err) = run(&[]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--policy") && err.contains("--operator"), "{err}");
    let (code, err) = run(&["--policy", policy, "--operator", "https://op:8443", "--token-file", "/t"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
    let (code, err) = run(&["--operator", "http://op:8443", "--token-file", "/t"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("https://"), "{err}");
    let (code, err) = run(&["--operator", "https://op:8443"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--token-file"), "{err}");
    let (code, err) = run(&["--policy", policy, "--state-dir", "/tmp/x"]);
    assert_eq!(code, Some(64), "--state-dir means nothing without --operator: {err}");
}

// ---------------------------------------------------------------------------------------
// Human approval: calls whose rule says `action: approval` are held until decided.

/// `echo` allowed, `start-pod` needs approval with these `approval` settings.
fn approval_policy(approval: Value) -> PolicySet {
    set(vec![pushed(
        "approvals",
        false,
        json!({"version": "1", "default": "deny", "tools": {
            "echo": {},
            "start-pod": {"action": "approval", "reason": "a person approves every pod start", "approval": approval}
        }}),
    )])
}

/// An approval-mode harness: the fake operator pushing `policy`, the proxy connected.
fn approval_setup(h: &Harness, policy: &PolicySet) -> (FakeOperator, Proxy) {
    let op = h.operator("tok-1", policy);
    let proxy = h.proxy(&op.url(), &h.state_dir());
    wait_ack(&op, &policy.revision);
    (op, proxy)
}

fn call_body(id: u64, tool: &str, args: &Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}}).to_string()
}

/// One JSON-RPC message POSTed on `session` as caller `token`; the answer (blocking).
fn post(port: u16, token: &str, session: &str, body: &str) -> (u16, Value) {
    let auth = format!("Bearer {token}");
    let (status, _, bytes) = http(
        port,
        "POST",
        "/mcp",
        &[
            ("Content-Type", "application/json"),
            ("Accept", "application/json, text/event-stream"),
            ("Authorization", &auth),
            ("Mcp-Session-Id", session),
        ],
        body.as_bytes(),
    );
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// A tools/call as caller "agent"; its answer.
fn call_args(port: u16, session: &str, id: u64, tool: &str, args: Value) -> Value {
    let (status, answer) = post(port, "agent", session, &call_body(id, tool, &args));
    assert_eq!(status, 200, "{answer}");
    answer
}

/// The same call on its own thread: it is held until decided.
fn spawn_call(port: u16, session: &str, id: u64, tool: &str, args: Value) -> JoinHandle<Value> {
    let session = session.to_owned();
    let tool = tool.to_owned();
    std::thread::spawn(move || call_args(port, &session, id, &tool, args))
}

/// The `n`th approval request (1-based) the operator received.
fn wait_request(op: &FakeOperator, n: usize) -> ApprovalSeen {
    eventually(&format!("approval request #{n}"), || op.approvals().get(n - 1).cloned())
}

fn wait_close(op: &FakeOperator, name: &str, phase: &str) {
    let want = CloseSeen {
        name: name.to_owned(),
        close: ApprovalClose { phase: serde_json::from_value(json!(phase)).expect("a close phase") },
    };
    eventually(&format!("close({phase}) of {name}"), || op.closes().contains(&want).then_some(()));
}

/// Still held a while later, and the upstream never saw `tool`.
fn still_held(call: &JoinHandle<Value>, h: &Harness, tool: &str, reached: usize) {
    std::thread::sleep(Duration::from_millis(400));
    assert!(!call.is_finished(), "the call must still be held");
    assert_eq!(h.mcp.called(tool), reached, "a held call is not forwarded");
}

/// Hex SHA-256 of a text: the digest is computed here independently of the proxy.
fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn approval_metric(proxy: &Proxy, decision: &str) -> f64 {
    sample(&metrics(proxy), &format!(r#"toolgate_approval_decisions_total{{decision="{decision}"}}"#))
}

fn audit_line(proxy: &Proxy, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    eventually(what, || proxy.audit.lock().unwrap().iter().find(|a| f(a)).cloned())
}

#[test]
fn an_approved_call_is_held_until_decided_and_reaches_the_upstream_once() {
    let h = Harness::new();
    let policy = approval_policy(json!({"timeout": "5m", "show_arguments": true}));
    let (op, proxy) = approval_setup(&h, &policy);
    let port = proxy.proc.port;
    let mut client = Client::initialize(port, "agent");

    let held = spawn_call(port, &client.session, 10, "start-pod", json!({"podId": "p-1", "gpuCount": 1}));
    let seen = wait_request(&op, 1);
    let r = &seen.request;
    assert_eq!((r.tool.as_str(), r.policy.as_str(), r.rule.as_str()), ("start-pod", "approvals", "tools.start-pod"));
    assert_eq!(r.reason.as_deref(), Some("a person approves every pod start"));
    assert_eq!(r.grant, None);
    assert_eq!(r.identity, toolgate_policy::fingerprint("Bearer agent"));
    assert_eq!(r.session.as_deref(), Some(client.session.as_str()));
    assert_eq!(r.arguments_digest, sha256_hex(r#"{"gpuCount":1,"podId":"p-1"}"#));
    assert_eq!(r.argument_keys, ["gpuCount", "podId"]);
    assert_eq!(r.arguments, Some(json!({"podId": "p-1", "gpuCount": 1})), "show_arguments: true");
    assert_eq!(r.timeout_seconds, 300);
    assert_eq!(r.instance.len(), 32, "{r:?}");
    assert_eq!(op.instances(), [Some(r.instance.clone())], "the stream names the same instance");
    assert!(seen.on_stream_connection, "the request travels on the stream's connection");

    still_held(&held, &h, "start-pod", 0);
    assert_eq!(sample(&metrics(&proxy), "toolgate_approvals_pending "), 1.0);
    assert!(client.call("echo")["result"].is_object(), "other calls of the session go on meanwhile");
    let waiting = audit_line(&proxy, "the audit line of the held call", |a| a["approval"] == seen.name.as_str());
    assert_eq!((&waiting["decision"], &waiting["approvalPhase"]), (&json!("approval"), &json!("Pending")));

    // Decisions for other approvals, a Pending update and a reconnect change nothing.
    op.decide("start-pod-99", "Approved", Some("alice"), None);
    op.decide(&seen.name, "Pending", None, None);
    op.send_raw("not JSON: the proxy reconnects\n");
    eventually("a reconnect", || (op.streams() >= 2).then_some(()));
    assert_eq!(op.instances()[1].as_deref(), Some(r.instance.as_str()), "same process, same instance");
    still_held(&held, &h, "start-pod", 0);

    op.decide(&seen.name, "Approved", Some("alice@example.com"), Some("looks right"));
    let answer = held.join().unwrap();
    assert_eq!(answer["result"]["content"][0]["text"], "called start-pod", "{answer}");
    assert_eq!(h.mcp.called("start-pod"), 1);
    let m = metrics(&proxy);
    assert_eq!(sample(&m, r#"toolgate_approval_decisions_total{decision="approved"}"#), 1.0, "{m}");
    assert_eq!(sample(&m, "toolgate_approvals_pending "), 0.0, "{m}");
    assert_eq!(sample(&m, "toolgate_approval_wait_seconds_count "), 1.0, "{m}");
    let allowed =
        r#"toolgate_decisions_total{tool="start-pod",decision="allow",policy="approvals",rule="tools.start-pod"}"#;
    assert_eq!(sample(&m, allowed), 1.0, "{m}");
    let held_metric =
        r#"toolgate_decisions_total{tool="start-pod",decision="approval",policy="approvals",rule="tools.start-pod"}"#;
    assert_eq!(sample(&m, held_metric), 1.0, "{m}");
    let outcome = audit_line(&proxy, "the audit line of the approval", |a| {
        a["approval"] == seen.name.as_str() && a["decision"] == "allow"
    });
    assert_eq!(outcome["approvalPhase"], "Approved");
    assert_eq!(outcome["decidedBy"], "alice@example.com");
    assert_eq!(outcome["reason"], "looks right");

    // Without reuse_for the same call needs a new approval, and changed arguments need
    // their own: a different digest, not covered by the approvals given before.
    let same = spawn_call(port, &client.session, 11, "start-pod", json!({"gpuCount": 1, "podId": "p-1"}));
    let second = wait_request(&op, 2);
    assert_eq!(second.request.arguments_digest, r.arguments_digest, "same arguments, other key order");
    assert_ne!(second.name, seen.name);
    let changed = spawn_call(port, &client.session, 12, "start-pod", json!({"podId": "p-2", "gpuCount": 1}));
    let third = wait_request(&op, 3);
    assert_eq!(third.request.arguments_digest, sha256_hex(r#"{"gpuCount":1,"podId":"p-2"}"#));
    still_held(&same, &h, "start-pod", 1);
    op.decide(&second.name, "Approved", Some("alice@example.com"), None);
    assert!(same.join().unwrap()["result"].is_object());
    assert_eq!(h.mcp.called("start-pod"), 2);
    still_held(&changed, &h, "start-pod", 2);
    op.decide(&third.name, "Denied", Some("bob"), None);
    assert_eq!(error_code(&changed.join().unwrap()), Some(DENIED));
    assert_eq!(h.mcp.called("start-pod"), 2, "the changed call never reached the upstream");
    assert!(op.closes().is_empty(), "decided approvals are not closed by the proxy: {:?}", op.closes());
}

#[test]
fn a_denied_call_is_refused_naming_the_approval_and_never_forwarded() {
    let h = Harness::new();
    let (op, proxy) = approval_setup(&h, &approval_policy(json!({"timeout": "5m"})));
    let client = Client::initialize(proxy.proc.port, "agent");

    let held = spawn_call(proxy.proc.port, &client.session, 3, "start-pod", json!({"podId": "p-1"}));
    let seen = wait_request(&op, 1);
    assert_eq!(seen.request.arguments, None, "arguments are shown only with show_arguments");
    assert_eq!(seen.request.argument_keys, ["podId"]);
    still_held(&held, &h, "start-pod", 0);
    op.decide(&seen.name, "Denied", Some("bob@example.com"), Some("not on a Friday"));
    let answer = held.join().unwrap();
    assert_eq!(answer["id"], 3);
    assert_eq!(error_code(&answer), Some(DENIED), "{answer}");
    let data = &answer["error"]["data"];
    assert_eq!(data["approval"], seen.name.as_str());
    assert_eq!(data["decision"], "deny");
    assert_eq!(data["decidedBy"], "bob@example.com");
    assert_eq!(
        data["reason"].as_str().unwrap(),
        format!("McpApproval {} was denied by bob@example.com: not on a Friday", seen.name)
    );
    assert!(answer["error"]["message"].as_str().unwrap().contains(&seen.name), "{answer}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(h.mcp.called("start-pod"), 0, "a denied call never reaches the upstream");
    let m = metrics(&proxy);
    assert_eq!(sample(&m, r#"toolgate_approval_decisions_total{decision="denied"}"#), 1.0, "{m}");
    assert_eq!(sample(&m, r#"toolgate_approval_decisions_total{decision="approved"}"#), 0.0, "{m}");
    assert_eq!(sample(&m, r#"toolgate_decisions_total{tool="start-pod",decision="deny""#), 1.0, "{m}");
    let line = audit_line(&proxy, "the denial's audit line", |a| a["decision"] == "deny");
    assert_eq!((&line["approval"], &line["approvalPhase"]), (&json!(seen.name), &json!("Denied")));
    assert_eq!(line["decidedBy"], "bob@example.com");
    // A late decision for the same approval changes nothing.
    op.decide(&seen.name, "Approved", Some("alice"), None);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(h.mcp.called("start-pod"), 0);
}

#[test]
fn an_undecided_call_expires_after_the_timeout_and_the_approval_is_closed() {
    let h = Harness::new();
    let (op, proxy) = approval_setup(&h, &approval_policy(json!({"timeout": "2s"})));
    let client = Client::initialize(proxy.proc.port, "agent");

    let started = Instant::now();
    let held = spawn_call(proxy.proc.port, &client.session, 4, "start-pod", json!({"podId": "p-1"}));
    let seen = wait_request(&op, 1);
    assert_eq!(seen.request.timeout_seconds, 2);
    let answer = held.join().unwrap();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(2) && waited < Duration::from_secs(15), "{waited:?}");
    assert_eq!(error_code(&answer), Some(APPROVAL_REQUIRED), "{answer}");
    let data = &answer["error"]["data"];
    assert_eq!((&data["approval"], &data["decision"]), (&json!(seen.name), &json!("approval")));
    assert_eq!(
        data["reason"].as_str().unwrap(),
        format!("McpApproval {} expired after 2s without a decision", seen.name)
    );
    wait_close(&op, &seen.name, "Expired");
    // A decision after the expiry forwards nothing.
    op.decide(&seen.name, "Approved", Some("alice"), None);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(h.mcp.called("start-pod"), 0);
    let m = metrics(&proxy);
    assert_eq!(sample(&m, r#"toolgate_approval_decisions_total{decision="expired"}"#), 1.0, "{m}");
    assert_eq!(sample(&m, "toolgate_approvals_pending "), 0.0, "{m}");
    let line = audit_line(&proxy, "the expiry's audit line", |a| a["approvalPhase"] == "Expired");
    assert_eq!(line["decision"], "approval");
}

#[test]
fn reuse_for_lets_an_approval_cover_identical_calls_only() {
    let h = Harness::new();
    let (op, proxy) = approval_setup(&h, &approval_policy(json!({"timeout": "5m", "reuse_for": "10m"})));
    let port = proxy.proc.port;
    let client = Client::initialize(port, "agent");

    let first = spawn_call(port, &client.session, 1, "start-pod", json!({"podId": "p-1", "gpuCount": 1}));
    let seen = wait_request(&op, 1);
    op.decide(&seen.name, "Approved", Some("alice"), None);
    assert!(first.join().unwrap()["result"].is_object());

    // Identical (keys in another order): passes at once, no new request.
    let again = call_args(port, &client.session, 2, "start-pod", json!({"gpuCount": 1, "podId": "p-1"}));
    assert!(again["result"].is_object(), "{again}");
    assert_eq!(h.mcp.called("start-pod"), 2);
    assert_eq!(op.approvals().len(), 1, "the approval was reused");
    let reused = audit_line(&proxy, "the reuse's audit line", |a| a["approvalReused"] == true);
    assert_eq!((&reused["approval"], &reused["decision"]), (&json!(seen.name), &json!("allow")));

    // One changed argument: a new request with another digest, held until decided.
    let changed = spawn_call(port, &client.session, 3, "start-pod", json!({"podId": "p-1", "gpuCount": 2}));
    let second = wait_request(&op, 2);
    assert_ne!(second.request.arguments_digest, seen.request.arguments_digest);
    still_held(&changed, &h, "start-pod", 2);
    // The operator may also end an approval itself (here: expired on its side).
    op.decide(&second.name, "Expired", None, None);
    let answer = changed.join().unwrap();
    assert_eq!(error_code(&answer), Some(APPROVAL_REQUIRED), "{answer}");
    assert_eq!(answer["error"]["data"]["reason"], format!("McpApproval {} expired", second.name));

    // The same arguments from another caller are not covered either.
    let other = Client::initialize(port, "another-agent");
    let (_, answer) = {
        let handle = {
            let session = other.session.clone();
            std::thread::spawn(move || {
                post(
                    port,
                    "another-agent",
                    &session,
                    &call_body(4, "start-pod", &json!({"podId": "p-1", "gpuCount": 1})),
                )
            })
        };
        let third = wait_request(&op, 3);
        assert_eq!(third.request.identity, toolgate_policy::fingerprint("Bearer another-agent"));
        op.decide(&third.name, "Abandoned", None, None);
        handle.join().unwrap()
    };
    assert_eq!(error_code(&answer), Some(APPROVAL_REQUIRED), "{answer}");
    assert!(answer["error"]["data"]["reason"].as_str().unwrap().ends_with("was abandoned"), "{answer}");
    assert_eq!(h.mcp.called("start-pod"), 2);
    let m = metrics(&proxy);
    for (decision, n) in [("approved", 1.0), ("expired", 1.0), ("abandoned", 1.0), ("denied", 0.0)] {
        assert_eq!(sample(&m, &format!(r#"toolgate_approval_decisions_total{{decision="{decision}"}}"#)), n, "{m}");
    }
}

#[test]
fn a_client_that_goes_away_or_cancels_cancels_its_approval() {
    let h = Harness::new();
    let (op, proxy) = approval_setup(&h, &approval_policy(json!({"timeout": "5m"})));
    let port = proxy.proc.port;
    let client = Client::initialize(port, "agent");

    // The client's connection closes while its call is held.
    let body = call_body(7, "start-pod", &json!({"podId": "p-1"}));
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        conn,
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\nAuthorization: Bearer agent\r\n\
         Mcp-Session-Id: {}\r\nContent-Length: {}\r\n\r\n{body}",
        client.session,
        body.len()
    )
    .unwrap();
    let gone = wait_request(&op, 1);
    assert_eq!(sample(&metrics(&proxy), "toolgate_approvals_pending "), 1.0);
    drop(conn);
    wait_close(&op, &gone.name, "Cancelled");
    assert_eq!(approval_metric(&proxy, "cancelled"), 1.0);
    assert_eq!(sample(&metrics(&proxy), "toolgate_approvals_pending "), 0.0);

    // notifications/cancelled for the held request: only from its own session.
    let held = spawn_call(port, &client.session, 21, "start-pod", json!({"podId": "p-1"}));
    let seen = wait_request(&op, 2);
    let cancel =
        json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 21}}).to_string();
    let stranger = Client::initialize(port, "agent");
    let (status, _) = post(port, "agent", &stranger.session, &cancel);
    assert_eq!(status, 202, "the notification is forwarded");
    still_held(&held, &h, "start-pod", 0);
    let (status, _) = post(port, "agent", &client.session, &cancel);
    assert_eq!(status, 202);
    let answer = held.join().unwrap();
    assert_eq!(error_code(&answer), Some(APPROVAL_REQUIRED), "{answer}");
    assert_eq!(
        answer["error"]["data"]["reason"],
        format!("McpApproval {} cancelled: the client cancelled the request", seen.name)
    );
    wait_close(&op, &seen.name, "Cancelled");
    assert_eq!(approval_metric(&proxy, "cancelled"), 2.0);
    // A decision after the cancellation forwards nothing.
    op.decide(&gone.name, "Approved", Some("alice"), None);
    op.decide(&seen.name, "Approved", Some("alice"), None);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(h.mcp.called("start-pod"), 0);
}

#[test]
fn when_approval_cannot_be_requested_the_call_is_refused() {
    let h = Harness::new();
    let (mut op, proxy) = approval_setup(&h, &approval_policy(json!({"timeout": "5m"})));
    let port = proxy.proc.port;
    let client = Client::initialize(port, "agent");

    op.refuse_approvals(hyper::StatusCode::INTERNAL_SERVER_ERROR, "the apiserver is unreachable");
    let answer = call_args(port, &client.session, 1, "start-pod", json!({"podId": "p-1"}));
    assert_eq!(error_code(&answer), Some(APPROVAL_REQUIRED), "{answer}");
    let reason = answer["error"]["data"]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("cannot request approval: the operator answered 500")
            && reason.contains("the apiserver is unreachable"),
        "{reason}"
    );
    assert_eq!(answer["error"]["data"]["approval"], Value::Null);
    assert_eq!(approval_metric(&proxy, "error"), 1.0);

    // No stream: nobody could tell this process the decision, so it does not ask.
    op.kill();
    eventually("the proxy notices the operator is gone", || {
        (sample(&metrics(&proxy), "toolgate_operator_connected ") == 0.0).then_some(())
    });
    let answer = call_args(port, &client.session, 2, "start-pod", json!({"podId": "p-1"}));
    assert_eq!(error_code(&answer), Some(APPROVAL_REQUIRED), "{answer}");
    let reason = answer["error"]["data"]["reason"].as_str().unwrap();
    assert!(reason.contains("not connected"), "{reason}");
    assert_eq!(approval_metric(&proxy, "error"), 2.0);
    assert_eq!(h.mcp.called("start-pod"), 0);
    assert_eq!(sample(&metrics(&proxy), "toolgate_approvals_pending "), 0.0);
}

/// `reuse_for` across replicas: two proxies enforcing the same McpPolicy share one Redis
/// (`--counter-store`). An approval given through one covers the identical call (same
/// caller, tool and canonical arguments) on the other within the window; other arguments
/// or another caller are asked about; with the store down the other replica asks again
/// (fail closed) while the approving one still reuses its own memory.
#[test]
fn reuse_for_covers_the_identical_call_on_another_replica_through_the_shared_store() {
    let h = Harness::new();
    let mut redis = toolgate_tests::redis::RedisServer::start().expect("redis-server (apt-get install redis-server)");
    let policy = approval_policy(json!({"timeout": "5m", "reuse_for": "10m"}));
    let op = h.operator("tok-1", &policy);
    let replica = |n: usize| {
        let tail = vec![
            format!("--operator={}", op.url()),
            format!("--token-file={}", h.token_file().display()),
            format!("--ca-file={}", h.dir.path().join("ca.crt").display()),
            format!("--state-dir={}", h.dir.path().join(format!("state-{n}")).display()),
            format!("--upstream={}", h.mcp.url()),
            format!("--counter-store={}", redis.url()),
            "--counter-store-prefix=reuse:".into(),
            "--counter-store-timeout-ms=2000".into(),
        ];
        support::proxy(&[], &tail, &[("TOOLGATE_POD_NAME", format!("pod-{n}"))])
    };
    let (a, b) = (replica(0), replica(1));
    eventually("both replicas acknowledge the policy", || {
        (op.acks().iter().filter(|s| s.ack.revision == policy.revision && s.ack.error.is_none()).count() >= 2)
            .then_some(())
    });
    let on_a = Client::initialize(a.proc.port, "agent");
    let on_b = Client::initialize(b.proc.port, "agent");
    let args = json!({"podId": "p-1", "gpuCount": 1});

    let first = spawn_call(a.proc.port, &on_a.session, 1, "start-pod", args.clone());
    let seen = wait_request(&op, 1);
    op.decide(&seen.name, "Approved", Some("alice"), None);
    assert!(first.join().unwrap()["result"].is_object());
    assert_eq!(h.mcp.called("start-pod"), 1);

    // The identical call (keys in another order) on the other replica: passes at once.
    let again = call_args(b.proc.port, &on_b.session, 2, "start-pod", json!({"gpuCount": 1, "podId": "p-1"}));
    assert!(again["result"].is_object(), "reused through the shared store: {again}");
    assert_eq!(op.approvals().len(), 1, "no new approval request");
    assert_eq!(h.mcp.called("start-pod"), 2);
    let reused = audit_line(&b, "the reuse's audit line on replica b", |l| l["approvalReused"] == true);
    assert_eq!((&reused["approval"], &reused["decidedBy"]), (&json!(seen.name), &json!("alice")));

    // Other arguments, or another caller, on replica b: asked about.
    let changed = spawn_call(b.proc.port, &on_b.session, 3, "start-pod", json!({"podId": "p-2", "gpuCount": 1}));
    let second = wait_request(&op, 2);
    op.decide(&second.name, "Denied", Some("bob"), None);
    assert_eq!(error_code(&changed.join().unwrap()), Some(DENIED));
    let other = Client::initialize(b.proc.port, "another-agent");
    let port = b.proc.port;
    let session = other.session.clone();
    let body = call_body(4, "start-pod", &args);
    let theirs = std::thread::spawn(move || post(port, "another-agent", &session, &body));
    let third = wait_request(&op, 3);
    assert_eq!(third.request.identity, toolgate_policy::fingerprint("Bearer another-agent"));
    op.decide(&third.name, "Denied", Some("bob"), None);
    assert_eq!(error_code(&theirs.join().unwrap().1), Some(DENIED));
    assert_eq!(h.mcp.called("start-pod"), 2);

    // Store down: replica b cannot see the shared approval and asks again (fail closed);
    // replica a still has its own.
    redis.kill();
    let asked = spawn_call(b.proc.port, &on_b.session, 5, "start-pod", args.clone());
    let fourth = wait_request(&op, 4);
    assert_eq!(fourth.request.arguments_digest, seen.request.arguments_digest);
    still_held(&asked, &h, "start-pod", 2);
    op.decide(&fourth.name, "Denied", Some("bob"), None);
    assert_eq!(error_code(&asked.join().unwrap()), Some(DENIED));
    let own = call_args(a.proc.port, &on_a.session, 6, "start-pod", args);
    assert!(own["result"].is_object(), "the approving replica's own memory: {own}");
    assert_eq!(op.approvals().len(), 4);
    assert_eq!(h.mcp.called("start-pod"), 3);
}
