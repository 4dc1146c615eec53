//! Authenticated callers and credential custody, end to end: two agents with their own
//! OIDC tokens (from a real HTTPS issuer on loopback) and a CI bot with an API key call the
//! real RunPod MCP server 4.0.0 through the proxy, which alone holds the RunPod key. Grants
//! are by subject and key name; every refused credential is a 401 that reaches nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::*;
use toolgate_tests::oidc::{TestIssuer, now};

const AUD: &str = "https://mcp.test/mcp";
const SIDECAR_KEY: &str = "rp-key-only-the-sidecar-holds";

const POLICY: &str = r#"
version: "1"
default: deny
grants:
  - name: agent-a
    match: {subjects: [agent-a]}
    tools:
      list-pods: {}
      pod-action:
        require:
          - {path: args.body.action, op: eq, value: start}
        limits:
          - {counter: starts, window: minute, max: 10, scope: identity}
  - name: agent-b
    match: {subjects: [agent-b]}
    tools:
      list-pods: {}
  - name: ci
    match: {apiKeys: [ci-bot]}
    tools:
      list-pods: {}
"#;

const JSON_HEADERS: [(&str, &str); 2] =
    [("Content-Type", "application/json"), ("Accept", "application/json, text/event-stream")];

fn post(proxy: &Proxy, auth: Option<&str>, sid: Option<&str>, body: &Value) -> (u16, String, Vec<Value>) {
    let bearer = auth.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = JSON_HEADERS.to_vec();
    if let Some(b) = &bearer {
        headers.push(("Authorization", b));
    }
    if let Some(s) = sid {
        headers.push(("Mcp-Session-Id", s));
    }
    let (status, head, body) = http(proxy.proc.port, "POST", "/mcp", &headers, body.to_string().as_bytes());
    (status, head, messages(&body))
}

/// Initializes; RunPod MCP 4.0.0 over HTTP is stateless (no session id), which is fine:
/// limits count by the caller's identity.
fn initialize(proxy: &Proxy, token: &str) -> Option<String> {
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "agent", "version": "0"}}});
    let (status, head, msgs) = post(proxy, Some(token), None, &init);
    assert_eq!(status, 200, "initialize: {head} {msgs:?}");
    assert!(msgs.iter().any(|m| m["result"]["serverInfo"].is_object()), "{msgs:?}");
    let sid =
        head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("mcp-session-id:").map(|v| v.trim().to_owned()));
    let (status, _, _) =
        post(proxy, Some(token), sid.as_deref(), &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    assert_eq!(status, 202);
    sid
}

fn call(id: u64, tool: &str, args: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}})
}

fn start(id: u64) -> Value {
    call(id, "pod-action", json!({"id": "pod-2", "body": {"action": "start"}}))
}

fn starts(fake: &Proc) -> usize {
    fake_requests(fake)
        .iter()
        .filter(|(m, p, b)| m == "POST" && p.ends_with("/action") && b["action"] == "start")
        .count()
}

fn fake_authorizations(fake: &Proc) -> Vec<String> {
    let (_, _, body) = http(fake.port, "GET", "/__requests", &[], b"");
    let v: Value = serde_json::from_slice(&body).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["headers"]["authorization"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn agents_prove_who_they_are_and_only_the_sidecar_holds_the_runpod_key() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let idp = rt.block_on(TestIssuer::start()).unwrap();
    let fake = fake_runpod();
    let server = runpod_http(&fake);
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), "p.yaml", POLICY);
    let ca = write_policy(dir.path(), "idp-ca.pem", &idp.ca_pem());
    let key = write_policy(dir.path(), "runpod-key", &format!("{SIDECAR_KEY}\n"));
    let ci_key = "ci-bot-secret-key";
    let digest: String = Sha256::digest(ci_key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    let keys = write_policy(dir.path(), "api-keys", &format!("# CI\nci-bot sha256:{digest}\n"));
    let tail: Vec<String> = [
        "--oidc-issuer",
        &idp.issuer(),
        "--oidc-audience",
        AUD,
        "--oidc-ca-file",
        &ca.display().to_string(),
        "--api-keys-file",
        &keys.display().to_string(),
        "--resource-url",
        AUD,
        "--upstream-credential-file",
        &key.display().to_string(),
        "--upstream",
        &format!("http://127.0.0.1:{}/mcp", server.port),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let proxy = proxy(&[&policy], &tail, &[]);

    let token_a = idp.mint(&idp.claims("agent-a", AUD)).unwrap();
    let token_b = idp.mint(&idp.claims("agent-b", AUD)).unwrap();

    // Agent A: 10 starts a minute, by its subject.
    let sid_a = initialize(&proxy, &token_a);
    let mut allowed = 0;
    for i in 1..=12 {
        let (_, _, msgs) = post(&proxy, Some(&token_a), sid_a.as_deref(), &start(i));
        if msgs.iter().any(|m| m.get("result").is_some() && m["result"]["isError"] != true) {
            allowed += 1;
        } else {
            assert!(msgs.iter().any(|m| m["error"]["code"] == -32011), "refused as rate limited: {msgs:?}");
        }
    }
    assert_eq!(allowed, 10);
    // A fresh token for the same subject is the same caller: still limited.
    let token_a2 =
        idp.mint(&json!({"iss": idp.issuer(), "sub": "agent-a", "aud": AUD, "exp": now() + 300, "jti": "2"})).unwrap();
    let sid_a2 = initialize(&proxy, &token_a2);
    let (_, _, msgs) = post(&proxy, Some(&token_a2), sid_a2.as_deref(), &start(20));
    assert!(msgs.iter().any(|m| m["error"]["code"] == -32011), "a new token is no new quota: {msgs:?}");

    // Agent B: list-pods only.
    let sid_b = initialize(&proxy, &token_b);
    let (_, _, msgs) = post(&proxy, Some(&token_b), sid_b.as_deref(), &start(1));
    assert!(msgs.iter().any(|m| m["error"]["code"] == -32010), "B may not start pods: {msgs:?}");
    let (_, _, msgs) = post(&proxy, Some(&token_b), sid_b.as_deref(), &call(2, "list-pods", json!({})));
    assert!(msgs.iter().any(|m| m.get("result").is_some()), "B lists pods: {msgs:?}");

    // The CI bot: an API key, by name.
    let sid_ci = initialize(&proxy, ci_key);
    let (_, _, msgs) = post(&proxy, Some(ci_key), sid_ci.as_deref(), &call(1, "list-pods", json!({})));
    assert!(msgs.iter().any(|m| m.get("result").is_some()), "the CI bot lists pods: {msgs:?}");
    let (_, _, msgs) = post(&proxy, Some(ci_key), sid_ci.as_deref(), &start(2));
    assert!(msgs.iter().any(|m| m["error"]["code"] == -32010), "{msgs:?}");

    // RunPod saw exactly A's 10 starts, every request with the sidecar's key, never an
    // agent's credential.
    assert_eq!(starts(&fake), 10);
    let auths = fake_authorizations(&fake);
    assert!(!auths.is_empty());
    for a in &auths {
        assert_eq!(a, &format!("Bearer {SIDECAR_KEY}"), "the RunPod API saw only the sidecar's key");
    }

    // Refused credentials: 401 with where to log in, nothing forwarded.
    let before = fake_requests(&fake).len();
    let t = now();
    let bad = [
        (
            "expired",
            Some(idp.mint(&json!({"iss": idp.issuer(), "sub": "agent-a", "aud": AUD, "exp": t - 300})).unwrap()),
        ),
        ("wrong_audience", Some(idp.mint(&idp.claims("agent-a", "https://elsewhere")).unwrap())),
        ("algorithm_not_allowed", Some(idp.forge_none(&idp.claims("agent-a", AUD)))),
        ("bad_signature", Some(idp.tamper(&token_b, &idp.claims("agent-a", AUD)))),
        ("unknown_api_key", Some("not-a-listed-key".to_owned())),
        ("missing", None),
    ];
    for (reason, token) in &bad {
        let (status, head, msgs) = post(&proxy, token.as_deref(), None, &start(99));
        assert_eq!(status, 401, "{reason}: {head} {msgs:?}");
        let head = head.to_ascii_lowercase();
        assert!(
            head.contains("www-authenticate: bearer resource_metadata=\"https://mcp.test/.well-known/oauth-protected-resource/mcp\""),
            "{reason}: {head}"
        );
        assert!(msgs.iter().all(|m| m.get("result").is_none()), "{reason}: {msgs:?}");
    }
    // Two credentials at once (agent B's and agent A's): which one counts would be the
    // caller's choice, so neither does.
    let (bearer_a, bearer_b) = (format!("Bearer {token_a}"), format!("Bearer {token_b}"));
    let headers: Vec<(&str, &str)> = JSON_HEADERS
        .iter()
        .copied()
        .chain([("Authorization", bearer_b.as_str()), ("Authorization", bearer_a.as_str())])
        .collect();
    let (status, _, body) = http(proxy.proc.port, "POST", "/mcp", &headers, start(98).to_string().as_bytes());
    assert_eq!(status, 400, "a repeated Authorization is refused: {}", String::from_utf8_lossy(&body));
    assert_eq!(fake_requests(&fake).len(), before, "no refused credential reached RunPod");
    let m = metrics(&proxy);
    for (reason, _) in &bad {
        assert!(m.contains(&format!("toolgate_auth_refusals_total{{reason=\"{reason}\"}} 1")), "{reason}:\n{m}");
    }

    // RFC 9728 metadata names the issuer.
    let (status, _, body) = http(proxy.proc.port, "GET", "/.well-known/oauth-protected-resource/mcp", &[], b"");
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["resource"], AUD);
    assert_eq!(doc["authorization_servers"], json!([idp.issuer()]));

    // Audit lines carry the stable subject, never a token.
    let subject = format!("oidc:{}#agent-a", idp.issuer());
    let audit = proxy.audit_when("agent-a's subject and grant", |a| {
        a.iter().any(|l| l["identity"] == subject.as_str() && l["grant"] == "agent-a")
    });
    let all = serde_json::to_string(&audit).unwrap();
    for secret in [&token_a, &token_b, ci_key, SIDECAR_KEY] {
        assert!(!all.contains(secret), "a credential in an audit line");
    }
    drop(server);
}

/// Child-process custody: RunPod MCP 4.0.0 runs as the proxy's child (one per session) and
/// gets its key from a file (a mounted Secret) in `RUNPOD_API_KEY`, never from a caller;
/// callers prove who they are with their own API keys, and a rotated key file reaches the
/// next session.
#[test]
fn a_child_server_gets_its_key_from_the_file_and_never_a_callers() {
    let fake = fake_runpod();
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(
        dir.path(),
        "p.yaml",
        r#"
version: "1"
default: deny
grants:
  - name: agent-a
    match: {apiKeys: [agent-a]}
    tools:
      list-pods: {}
      pod-action:
        require:
          - {path: args.body.action, op: eq, value: start}
        limits:
          - {counter: starts, window: minute, max: 10, scope: identity}
  - name: agent-b
    match: {apiKeys: [agent-b]}
    tools:
      list-pods: {}
"#,
    );
    let (key_a, key_b) = ("agent-a-own-key", "agent-b-own-key");
    let hash = |k: &str| -> String { Sha256::digest(k.as_bytes()).iter().map(|b| format!("{b:02x}")).collect() };
    let keys = write_policy(
        dir.path(),
        "api-keys",
        &format!("agent-a sha256:{}\nagent-b sha256:{}\n", hash(key_a), hash(key_b)),
    );
    let key = write_policy(dir.path(), "runpod-key", &format!("{SIDECAR_KEY}\n"));
    let server = node_dir().join("node_modules/runpod-mcp-4/dist/stdio.mjs");
    let tail: Vec<String> = [
        "--api-keys-file",
        &keys.display().to_string(),
        "--upstream-credential-file",
        &key.display().to_string(),
        "--child-credential-env",
        "RUNPOD_API_KEY",
        "--",
        "node",
        &server.display().to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let base = format!("http://127.0.0.1:{}", fake.port);
    // The proxy's own environment holds another key: the file's wins.
    let env = [
        ("RUNPOD_API_KEY", "a-key-the-proxy-inherited".to_owned()),
        ("RUNPOD_API_BASE_URL", base.clone()),
        ("RUNPOD_SERVERLESS_API_URL", format!("{base}/runtime/v2")),
        ("RUNPOD_AUTHED_GRAPHQL_URL", format!("{base}/graphql")),
        ("RUNPOD_PUBLIC_GRAPHQL_URL", format!("{base}/graphql")),
    ];
    let proxy = proxy(&[&policy], &tail, &env);

    let sid_a = initialize(&proxy, key_a);
    assert!(sid_a.is_some(), "a child session has an id");
    let mut allowed = 0;
    for i in 1..=12 {
        let (_, _, msgs) = post(&proxy, Some(key_a), sid_a.as_deref(), &start(i));
        if msgs.iter().any(|m| m.get("result").is_some() && m["result"]["isError"] != true) {
            allowed += 1;
        } else {
            assert!(msgs.iter().any(|m| m["error"]["code"] == -32011), "refused as rate limited: {msgs:?}");
        }
    }
    assert_eq!(allowed, 10);
    let sid_b = initialize(&proxy, key_b);
    let (_, _, msgs) = post(&proxy, Some(key_b), sid_b.as_deref(), &start(1));
    assert!(msgs.iter().any(|m| m["error"]["code"] == -32010), "B may not start pods: {msgs:?}");
    let (_, _, msgs) = post(&proxy, Some(key_b), sid_b.as_deref(), &call(2, "list-pods", json!({})));
    assert!(msgs.iter().any(|m| m.get("result").is_some() && m["result"]["isError"] != true), "B lists: {msgs:?}");
    // No credential: 401, no child.
    let (status, _, _) = post(&proxy, None, None, &start(3));
    assert_eq!(status, 401);

    assert_eq!(starts(&fake), 10, "the RunPod API saw exactly A's allowed starts");
    let auths = fake_authorizations(&fake);
    assert!(auths.len() >= 11, "{auths:?}");
    for a in &auths {
        assert_eq!(a, &format!("Bearer {SIDECAR_KEY}"), "the RunPod API saw only the file's key");
    }

    // The Secret rotates: the next session's child gets the new key.
    std::fs::write(&key, "rp-key-rotated\n").unwrap();
    let sid_b2 = initialize(&proxy, key_b);
    let (_, _, msgs) = post(&proxy, Some(key_b), sid_b2.as_deref(), &call(1, "list-pods", json!({})));
    assert!(msgs.iter().any(|m| m.get("result").is_some()), "{msgs:?}");
    let auths = fake_authorizations(&fake);
    assert_eq!(auths.last().map(String::as_str), Some("Bearer rp-key-rotated"), "{auths:?}");
    let all = serde_json::to_string(&fake_requests(&fake)).unwrap() + &auths.join("\n");
    for secret in [key_a, key_b, "a-key-the-proxy-inherited"] {
        assert!(!all.contains(secret), "{secret} reached the RunPod API");
    }
    let lines =
        proxy.audit_when("the last call's line", |a| a.iter().filter(|l| l["tool"] == "list-pods").count() >= 2);
    let audit = serde_json::to_string(&lines).unwrap();
    for secret in [key_a, key_b, SIDECAR_KEY, "rp-key-rotated"] {
        assert!(!audit.contains(secret), "a credential in an audit line");
    }
}

/// `--stdio` (a desktop client launches the proxy): the child RunPod MCP 4.0.0 gets its key
/// from the file too, not from the environment the client launched the proxy with.
#[test]
fn over_stdio_the_child_gets_its_key_from_the_file() {
    let fake = fake_runpod();
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), "p.yaml", "version: \"1\"\ndefault: deny\ntools:\n  list-pods: {}\n");
    let key = write_policy(dir.path(), "runpod-key", &format!("{SIDECAR_KEY}\n"));
    let server = node_dir().join("node_modules/runpod-mcp-4/dist/stdio.mjs");
    let target: Vec<String> = [
        "--stdio",
        "--",
        env!("CARGO_BIN_EXE_toolgate-proxy"),
        "--stdio",
        "--policy",
        &policy.display().to_string(),
        "--admin-listen",
        &format!("127.0.0.1:{}", free_port()),
        "--upstream-credential-file",
        &key.display().to_string(),
        "--child-credential-env",
        "RUNPOD_API_KEY",
        "--",
        "node",
        &server.display().to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let script = json!([
        {"op": "call", "tool": "list-pods", "args": {}},
        {"op": "call", "tool": "delete-pod", "args": {"id": "pod-1"}},
    ]);
    let base = format!("http://127.0.0.1:{}", fake.port);
    // mcp-client passes its environment on to the stdio child (the proxy, then RunPod).
    let out = std::process::Command::new("node")
        .current_dir(node_dir())
        .arg("mcp-client.mjs")
        .args(&target)
        .env("RUNPOD_API_KEY", "the-launching-environments-key")
        .env("RUNPOD_API_BASE_URL", &base)
        .env("RUNPOD_SERVERLESS_API_URL", format!("{base}/runtime/v2"))
        .env("RUNPOD_AUTHED_GRAPHQL_URL", format!("{base}/graphql"))
        .env("RUNPOD_PUBLIC_GRAPHQL_URL", format!("{base}/graphql"))
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
    assert_eq!(steps.len(), 2, "{steps:?}");
    assert_eq!(steps[0]["ok"], true, "{}", steps[0]);
    assert_eq!(steps[1]["error"]["code"], -32010, "{}", steps[1]);
    let auths = fake_authorizations(&fake);
    assert!(!auths.is_empty());
    for a in &auths {
        assert_eq!(a, &format!("Bearer {SIDECAR_KEY}"), "the RunPod API saw only the file's key");
    }
    assert!(!fake_requests(&fake).iter().any(|(m, _, _)| m == "DELETE"));
}
