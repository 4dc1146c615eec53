//! The operator binary against the real apiserver: the webhook injects (TLS and caBundle
//! managed by the operator), sidecar streams are authenticated by TokenReview and carry
//! the pod's effective policy set, acknowledgements become `status.enforcing`, invalid
//! edits are refused with an Event and never loosen what sidecars enforce.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use support::*;
use toolgate_operator::McpPolicy;
use toolgate_tests::{TestCluster, eventually};

const SEED: &str = r#"{"version":"1","default":"deny","tools":{"start-pod":{"limits":[{"counter":"start-pod_rate","window":"minute","max":10,"scope":"grant"}]}}}"#;

async fn apply_policy(cluster: &TestCluster, ns: &str, name: &str, spec: serde_json::Value) {
    let api: Api<McpPolicy> = Api::namespaced(cluster.client(), ns);
    let object =
        json!({"apiVersion": "toolgate.dev/v1alpha1", "kind": "McpPolicy", "metadata": {"name": name}, "spec": spec});
    api.patch(name, &PatchParams::apply("test").force(), &Patch::Apply(&object)).await.expect("apply the McpPolicy");
}

async fn status_where(
    cluster: &TestCluster,
    ns: &str,
    name: &str,
    what: &str,
    check: impl Fn(&McpPolicy) -> bool,
) -> McpPolicy {
    let api: Api<McpPolicy> = Api::namespaced(cluster.client(), ns);
    eventually(what, TIMEOUT, || {
        let api = api.clone();
        let check = &check;
        async move { api.get(name).await.ok().filter(|p| check(p)) }
    })
    .await
}

fn condition<'a>(
    p: &'a McpPolicy,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    p.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injection_streams_acks_status_and_refusals() {
    let (cluster, op_ns, app, mut operator) = setup(&[]).await;

    // Injection: the pod comes back with the sidecar, pointed at this operator.
    let pod = create_pod(cluster, &app, "runpod-a", json!({"app": "runpod", "toolgate.dev/inject": "enabled"})).await;
    let spec = pod.spec.as_ref().unwrap();
    let sidecar = spec.init_containers.as_ref().and_then(|c| c.first()).expect("sidecar injected");
    assert_eq!(sidecar.name, "toolgate-proxy");
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    let args = sidecar.args.clone().unwrap_or_default();
    assert!(args.contains(&format!("--operator={}", operator.url())), "{args:?}");
    assert!(args.contains(&"--upstream=http://127.0.0.1:3000/mcp".to_owned()), "{args:?}");
    assert_eq!(pod.metadata.labels.as_ref().unwrap().get("toolgate.dev/injected").map(String::as_str), Some("true"));
    let other = create_pod(cluster, &app, "runpod-b", json!({"app": "other", "toolgate.dev/inject": "enabled"})).await;
    let plain = create_pod(cluster, &app, "plain", json!({"app": "plain"})).await;
    assert!(plain.spec.as_ref().unwrap().init_containers.is_none(), "pods that did not opt in are left alone");

    // The CA the sidecars need is published into the namespace; streams use it.
    let ca = published_ca(cluster, &app).await;
    let token = pod_token(cluster, &pod).await;
    let mut stream = open_stream(operator.port, &ca, &token).await.expect("stream opens");
    let first = stream.next_set().await;
    assert_eq!((first.pod.namespace.as_str(), first.pod.name.as_str()), (app.as_str(), "runpod-a"));
    assert!(first.policies.is_empty(), "no McpPolicy yet: the sidecar denies everything");
    assert!(stream.heartbeat().await, "idle streams get heartbeats");

    // A policy selecting app=runpod arrives on the stream; the ack becomes status.enforcing.
    let mut seed: serde_json::Value = serde_json::from_str(SEED).unwrap();
    seed["selector"] = json!({"matchLabels": {"app": "runpod"}});
    apply_policy(cluster, &app, "seed", seed.clone()).await;
    let set = stream.next_set().await;
    assert_eq!(set.policies.len(), 1);
    assert_eq!(set.policies[0].name, "seed");
    assert_eq!(set.policies[0].generation, 1);
    assert_eq!(set.policies[0].document["tools"]["start-pod"]["limits"][0]["max"], 10);
    assert!(set.policies[0].document.get("selector").is_none());
    let pending = status_where(cluster, &app, "seed", "status with one target", |p| {
        p.status.as_ref().is_some_and(|s| s.targets == Some(1) && s.observed_generation == Some(1))
    })
    .await;
    assert_eq!(pending.status.as_ref().unwrap().enforcing, Some(0), "not acknowledged yet");
    assert_eq!(condition(&pending, "Accepted").unwrap().status, "True");
    assert_eq!(condition(&pending, "Ready").unwrap().status, "False");
    assert_eq!(stream.ack("0000000000000000").await, 409, "a revision never sent is not acknowledged");
    assert_eq!(stream.ack(&set.revision).await, 204);
    let ready = status_where(cluster, &app, "seed", "status.enforcing 1", |p| {
        p.status.as_ref().is_some_and(|s| s.enforcing == Some(1))
    })
    .await;
    assert_eq!(condition(&ready, "Ready").unwrap().status, "True");

    // An invalid edit: refused with a message naming the field and an Event; the
    // sidecar keeps generation 1 (nothing new is pushed).
    let mut bad = seed.clone();
    bad["tools"]["start-pod"]["limits"][0]["window"] = json!("fortnight");
    apply_policy(cluster, &app, "seed", bad).await;
    let refused = status_where(cluster, &app, "seed", "Accepted=False", |p| {
        condition(p, "Accepted").is_some_and(|c| c.status == "False")
    })
    .await;
    let message = &condition(&refused, "Accepted").unwrap().message;
    assert!(message.contains("window") && message.contains("generation 1"), "{message}");
    assert_eq!(refused.status.as_ref().unwrap().enforcing, Some(0), "nobody enforces generation 2");
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(cluster.client(), &app);
    eventually("an InvalidPolicy event", TIMEOUT, || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items.iter().any(|e| e.reason.as_deref() == Some("InvalidPolicy")).then_some(())
        }
    })
    .await;
    assert!(
        tokio::time::timeout(std::time::Duration::from_secs(2), stream.next_set()).await.is_err(),
        "an invalid edit pushes nothing"
    );

    // The fix arrives as generation 3.
    let mut fixed = seed.clone();
    fixed["tools"]["start-pod"]["limits"][0]["max"] = json!(12);
    apply_policy(cluster, &app, "seed", fixed).await;
    let set3 = stream.next_set().await;
    assert_eq!(set3.policies[0].generation, 3);
    assert_eq!(stream.ack(&set3.revision).await, 204);
    status_where(cluster, &app, "seed", "generation 3 enforced", |p| {
        p.status.as_ref().is_some_and(|s| s.observed_generation == Some(3) && s.enforcing == Some(1))
    })
    .await;

    // Another pod's token gets that pod's own set, never this one's.
    let other_token = pod_token(cluster, &other).await;
    let mut other_stream = open_stream(operator.port, &ca, &other_token).await.expect("other stream");
    let other_set = other_stream.next_set().await;
    assert_eq!(other_set.pod.name, "runpod-b");
    assert!(other_set.policies.is_empty(), "the selector does not match runpod-b");
    // Forged, wrong-audience and unbound tokens are refused.
    // Forged: runpod-a's token with runpod-b's claims (the signature no longer matches).
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let claims = String::from_utf8(b64.decode(&parts[1]).unwrap()).unwrap();
    let claims = claims
        .replace("runpod-a", "runpod-b")
        .replace(pod.metadata.uid.as_deref().unwrap(), other.metadata.uid.as_deref().unwrap());
    parts[1] = b64.encode(claims);
    let forged = parts.join(".");
    assert_ne!(forged, token);
    let refused = open_stream(operator.port, &ca, &forged).await.err();
    assert_eq!(refused.as_ref().map(|e| e.0), Some(401), "{refused:?}");
    // A plain API token: its audience is the apiserver's, not `toolgate` (as in a real
    // cluster, the test apiserver does not list `toolgate` among its API audiences).
    let api_audience = cluster.mint_token(&app, "agent", &[], None).await;
    let refused = open_stream(operator.port, &ca, &api_audience).await.err();
    assert_eq!(refused.as_ref().map(|e| e.0), Some(401), "{refused:?}");
    let unbound = cluster.mint_token(&app, "agent", &["toolgate"], None).await;
    assert_eq!(open_stream(operator.port, &ca, &unbound).await.err().map(|e| e.0), Some(403));
    let plain_token = pod_token(cluster, &plain).await;
    assert_eq!(
        open_stream(operator.port, &ca, &plain_token).await.err().map(|e| e.0),
        Some(403),
        "a pod without the sidecar gets no stream"
    );

    // Metrics: connected sidecars, injections and stream refusals are counted.
    let metrics = operator.metrics();
    assert_eq!(toolgate_tests::mcp::sample(&metrics, "toolgate_operator_sidecars_connected"), 2.0, "{metrics}");
    assert!(
        toolgate_tests::mcp::sample(&metrics, "toolgate_operator_webhook_requests_total{result=\"injected\"}") >= 2.0
    );
    for result in ["unauthenticated", "forbidden", "not_injected"] {
        let line = format!("toolgate_operator_stream_requests_total{{result=\"{result}\"}}");
        assert!(toolgate_tests::mcp::sample(&metrics, &line) >= 1.0, "{line} in\n{metrics}");
    }
    assert_eq!(toolgate_tests::mcp::sample(&metrics, "toolgate_operator_leader"), 1.0);
    assert_eq!(
        toolgate_tests::mcp::sample(
            &metrics,
            &format!("toolgate_operator_policy_enforcing{{namespace=\"{app}\",policy=\"seed\"}}")
        ),
        1.0
    );

    // Deleting the policy: the sidecar gets an empty set (deny everything).
    Api::<McpPolicy>::namespaced(cluster.client(), &app).delete("seed", &Default::default()).await.unwrap();
    let emptied = stream.next_set().await;
    assert!(emptied.policies.is_empty());

    operator.kill();
    drop(stream);
    drop(other_stream);
    teardown(cluster, &op_ns, &app).await;
}

/// RunPod MCP 4.0.0's pod-action with the seed's limit (see examples/policies/runpod-4.0.0.yaml).
fn pod_action_policy(max: u32) -> serde_json::Value {
    json!({
        "version": "1",
        "default": "deny",
        "tools": {
            "list-pods": {},
            "pod-action": {
                "arguments": {"type": "object", "required": ["id", "body"],
                    "properties": {"body": {"type": "object", "required": ["action"]}}},
                "require": [{"path": "args.body.action", "op": "in", "value": ["start", "stop", "restart"]}],
                "limits": [{"counter": "pod-action_rate", "window": "minute", "max": max, "scope": "grant"}],
            },
        },
    })
}

fn call(tool: &str, args: serde_json::Value) -> serde_json::Value {
    json!({"op": "call", "tool": tool, "args": args})
}

fn start() -> serde_json::Value {
    call("pod-action", json!({"id": "pod-2", "body": {"action": "start"}}))
}

fn codes(out: &[serde_json::Value]) -> Vec<Option<i64>> {
    out.iter().map(|s| if s["ok"] == true { None } else { Some(s["error"]["code"].as_i64().unwrap_or(0)) }).collect()
}

/// Runs the SDK client on a blocking thread (it is a node process).
async fn run_client(target: Vec<String>, script: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    tokio::task::spawn_blocking(move || toolgate_tests::mcp::mcp_client(&target, &serde_json::Value::Array(script)))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_sidecar_enforces_what_the_operator_pushes_against_runpod() {
    let (cluster, op_ns, app, mut operator) = setup(&[]).await;
    let (pod, ca, token) =
        injected_pod(cluster, &app, "runpod-0", json!({"app": "runpod", "toolgate.dev/inject": "enabled"})).await;

    let fake = toolgate_tests::mcp::fake_runpod();
    let server = toolgate_tests::mcp::runpod_http(&fake);
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(&pod, server.port, dir.path(), &token, &ca);
    assert!(sidecar.args.iter().any(|a| a == &format!("--operator={}", operator.url())), "{:?}", sidecar.args);
    let agent = sidecar.client("agent-key");

    // Connected, but no McpPolicy selects the pod: everything is refused, not ready.
    let out = run_client(agent.clone(), vec![call("list-pods", json!({}))]).await;
    assert_eq!(codes(&out), [Some(-32013)], "{out:?}");
    assert_eq!(sidecar.ready(), 503);

    apply_policy(cluster, &app, "runpod", pod_action_policy(10)).await;
    status_where(cluster, &app, "runpod", "the sidecar to enforce generation 1", |p| {
        p.status.as_ref().is_some_and(|s| s.enforcing == Some(1) && s.observed_generation == Some(1))
    })
    .await;
    assert_eq!(sidecar.ready(), 200);
    let mut script: Vec<_> = (0..11).map(|_| start()).collect();
    script.push(call("delete-pod", json!({"id": "pod-1"})));
    script.push(call("pod-action", json!({"id": "pod-1", "body": {"action": "terminate"}})));
    let out = run_client(agent.clone(), script).await;
    let mut want = vec![None; 10];
    want.extend([Some(-32011), Some(-32010), Some(-32010)]);
    assert_eq!(codes(&out), want, "{out:?}");
    let reached = toolgate_tests::mcp::fake_requests(&fake);
    assert_eq!(reached.iter().filter(|(m, p, _)| m == "POST" && p.ends_with("/action")).count(), 10, "{reached:?}");
    assert!(!reached.iter().any(|(m, _, _)| m == "DELETE"), "{reached:?}");

    // Raising the limit: generation 2 is pushed, acknowledged and enforced (the counter
    // keeps the 10 calls already made).
    apply_policy(cluster, &app, "runpod", pod_action_policy(12)).await;
    status_where(cluster, &app, "runpod", "the sidecar to enforce generation 2", |p| {
        p.status.as_ref().is_some_and(|s| s.enforcing == Some(1) && s.observed_generation == Some(2))
    })
    .await;
    let out = run_client(agent.clone(), vec![start(), start(), start()]).await;
    assert_eq!(codes(&out), [None, None, Some(-32011)], "{out:?}");

    // The operator goes away: the sidecar keeps enforcing generation 2.
    operator.kill();
    let out =
        run_client(agent.clone(), vec![call("list-pods", json!({})), call("delete-pod", json!({"id": "pod-1"}))]).await;
    assert_eq!(codes(&out), [None, Some(-32010)], "{out:?}");
    assert_eq!(sidecar.ready(), 200);
    // It comes back: the sidecar reconnects on its own.
    operator.restart(cluster).await;
    operator.wait_for_sidecars(1.0).await;

    // A dryRun policy refusing list-pods: calls still pass, the would-be denial is counted.
    apply_policy(
        cluster,
        &app,
        "trial",
        json!({"mode": "dryRun", "version": "1", "default": "deny", "tools": {"pod-action": {}}}),
    )
    .await;
    status_where(cluster, &app, "trial", "the dryRun policy to be enforced", |p| {
        p.status.as_ref().is_some_and(|s| s.enforcing == Some(1))
    })
    .await;
    let out = run_client(agent.clone(), vec![call("list-pods", json!({}))]).await;
    assert_eq!(codes(&out), [None], "dryRun does not refuse: {out:?}");
    let m = sidecar.metrics();
    assert_eq!(
        toolgate_tests::mcp::sample(&m, "toolgate_decisions_total{tool=\"list-pods\",decision=\"would_deny\""),
        1.0,
        "{m}"
    );
    Api::<McpPolicy>::namespaced(cluster.client(), &app).delete("trial", &Default::default()).await.unwrap();

    // Deleting the McpPolicy leaves the sidecar denying everything.
    Api::<McpPolicy>::namespaced(cluster.client(), &app).delete("runpod", &Default::default()).await.unwrap();
    eventually("the sidecar to deny everything", TIMEOUT, || {
        let agent = agent.clone();
        async move {
            let out = run_client(agent, vec![call("list-pods", json!({}))]).await;
            (codes(&out) == [Some(-32013)]).then_some(())
        }
    })
    .await;
    let m = sidecar.metrics();
    assert_eq!(toolgate_tests::mcp::sample(&m, "toolgate_operator_connected"), 1.0, "{m}");
    operator.kill();
    teardown(cluster, &op_ns, &app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_reach_status_through_any_replica_and_a_new_leader_takes_over() {
    let cluster = TestCluster::shared();
    cluster.install_toolgate_crds().await;
    let op_ns = cluster.create_namespace().await;
    let app = cluster.create_namespace().await;
    // The injected sidecars name the operator's Service, as with a real deployment: every
    // replica injects (and recognises) the same sidecar.
    let service = format!("--sidecar-operator-url=https://toolgate-operator.{op_ns}.svc:8443");
    let mut a = Operator::start_as(cluster, "replica-a", &op_ns, &app, &[&service]).await;
    eventually("replica-a to lead", TIMEOUT, || {
        let m = a.metrics();
        async move { (toolgate_tests::mcp::sample(&m, "toolgate_operator_leader") == 1.0).then_some(()) }
    })
    .await;
    let b = Operator::start_as(cluster, "replica-b", &op_ns, &app, &[&service]).await;
    assert_eq!(toolgate_tests::mcp::sample(&b.metrics(), "toolgate_operator_leader"), 0.0);
    wait_for_webhook(cluster, &b.webhook).await;
    let (_pod, ca, token) = injected_pod(cluster, &app, "runpod-0", json!({"toolgate.dev/inject": "enabled"})).await;

    // The sidecar streams from replica-b (not the leader); the leader counts its ack.
    let mut stream = open_stream(b.port, &ca, &token).await.expect("stream from replica-b");
    assert!(stream.next_set().await.policies.is_empty());
    apply_policy(cluster, &app, "seed", serde_json::from_str(SEED).unwrap()).await;
    let set = stream.next_set().await;
    assert_eq!(stream.ack(&set.revision).await, 204);
    status_where(cluster, &app, "seed", "enforcing 1 via replica-b's report", |p| {
        p.status.as_ref().is_some_and(|s| s.enforcing == Some(1))
    })
    .await;

    // The leader goes away; replica-b takes over and writes status for generation 2.
    a.kill();
    eventually("replica-b to lead", TIMEOUT, || {
        let m = b.metrics();
        async move { (toolgate_tests::mcp::sample(&m, "toolgate_operator_leader") == 1.0).then_some(()) }
    })
    .await;
    let mut edited: serde_json::Value = serde_json::from_str(SEED).unwrap();
    edited["tools"]["start-pod"]["limits"][0]["max"] = json!(5);
    apply_policy(cluster, &app, "seed", edited).await;
    let set2 = stream.next_set().await;
    assert_eq!(set2.policies[0].generation, 2);
    assert_eq!(stream.ack(&set2.revision).await, 204);
    status_where(cluster, &app, "seed", "generation 2 enforcing, written by replica-b", |p| {
        p.status.as_ref().is_some_and(|s| s.enforcing == Some(1) && s.observed_generation == Some(2))
    })
    .await;
    drop(stream);
    drop(b);
    teardown(cluster, &op_ns, &app).await;
}

fn approval_request(tool: &str, digest_byte: char) -> serde_json::Value {
    json!({
        "tool": tool, "identity": "f".repeat(64), "policy": "runpod", "rule": format!("tools.{tool}"),
        "argumentsDigest": digest_byte.to_string().repeat(64), "argumentKeys": ["id"],
        "timeoutSeconds": 600, "instance": "instance-1",
    })
}

/// Runs the `toolgate` CLI with a kubeconfig for `token`; (success, stdout + stderr).
async fn toolgate_cli(cluster: &TestCluster, token: &str, args: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, cluster.kubeconfig_for_token(token)).unwrap();
    let out = tokio::process::Command::new(toolgate_tests::mcp::workspace_binary("toolgate", "toolgate"))
        .args(args)
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .await
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_are_requested_decided_by_authorized_people_and_pushed_to_the_sidecar() {
    use toolgate_policy::crd::{ApprovalPhase, McpApproval as Approval};
    let (cluster, op_ns, app, operator) = setup(&[]).await;
    let (pod, ca, token) = injected_pod(cluster, &app, "runpod-a", json!({"toolgate.dev/inject": "enabled"})).await;
    let mut stream = open_stream(operator.port, &ca, &token).await.expect("stream");
    stream.next_set().await;
    let approvals: Api<Approval> = Api::namespaced(cluster.client(), &app);

    // A held call asks; the McpApproval names the pod from the token, not the request.
    let (code, created) = stream.post("/v1/approvals", &approval_request("delete-pod", 'a')).await;
    assert_eq!(code, 201, "{created}");
    let name = created["name"].as_str().unwrap().to_owned();
    let object = approvals.get(&name).await.unwrap();
    assert_eq!(
        (object.spec.pod.as_str(), object.spec.pod_uid.as_str()),
        ("runpod-a", pod.metadata.uid.as_deref().unwrap())
    );
    assert_eq!(object.status.as_ref().and_then(|s| s.phase), Some(ApprovalPhase::Pending));
    assert!(object.spec.arguments.is_none(), "arguments are not shown unless the policy says so");
    let mut bad = approval_request("delete-pod", 'a');
    bad["argumentsDigest"] = json!("zz");
    assert_eq!(stream.post("/v1/approvals", &bad).await.0, 400);

    // `toolgate approvals` lists it for a person with the approver role.
    let alice = approver(cluster, &app, "alice").await;
    let (ok, listed) = toolgate_cli(cluster, &alice, &["approvals", "-n", &app]).await;
    assert!(ok && listed.contains(&name) && listed.contains("delete-pod") && listed.contains("Pending"), "{listed}");

    // Without the role: refused by RBAC. The pod's own service account, even with the
    // role, is refused by the operator's webhook.
    let agent = cluster.mint_token(&app, "agent", &[], None).await;
    let (ok, out) = toolgate_cli(cluster, &agent, &["approve", &name, "-n", &app]).await;
    assert!(!ok && out.contains("forbidden"), "{out}");
    let binding = json!({
        "metadata": {"name": "approver-agent"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "toolgate-approver"},
        "subjects": [{"kind": "ServiceAccount", "name": "agent", "namespace": app}],
    });
    Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(cluster.client(), &app)
        .create(&Default::default(), &serde_json::from_value(binding).unwrap())
        .await
        .unwrap();
    let (ok, out) = eventually("the agent's self-approval to reach the webhook", TIMEOUT, || async {
        let r = toolgate_cli(cluster, &agent, &["approve", &name, "-n", &app]).await;
        (!r.1.contains("forbidden: User")).then_some(r)
    })
    .await;
    assert!(!ok && out.contains("own service account"), "{out}");

    // Alice approves; the decider is who the apiserver authenticated; the sidecar hears it.
    let (ok, out) = toolgate_cli(cluster, &alice, &["approve", &name, "-n", &app, "--reason", "looks fine"]).await;
    assert!(ok, "{out}");
    let update = stream.next_approval().await;
    assert_eq!((update.name.as_str(), update.phase.as_str()), (name.as_str(), "Approved"));
    let alice_user = format!("system:serviceaccount:{PEOPLE}:alice");
    assert_eq!(update.decided_by.as_deref(), Some(alice_user.as_str()));
    assert_eq!(update.reason.as_deref(), Some("looks fine"));
    // Decided is final.
    let (ok, out) = toolgate_cli(cluster, &alice, &["deny", &name, "-n", &app]).await;
    assert!(!ok && out.contains("already Approved"), "{out}");

    // A claimed decider is overwritten by the authenticated one.
    let (_, second) = stream.post("/v1/approvals", &approval_request("delete-pod", 'b')).await;
    let second = second["name"].as_str().unwrap().to_owned();
    let alice_client = cluster.client_with_token(&alice).await;
    let forged = json!({"status": {"phase": "Denied", "reason": "no", "decidedBy": "mallory"}});
    let denied = Api::<Approval>::namespaced(alice_client, &app)
        .patch_status(&second, &PatchParams::default(), &Patch::Merge(&forged))
        .await
        .unwrap();
    assert_eq!(denied.status.unwrap().decided_by.as_deref(), Some(alice_user.as_str()));
    let update = stream.next_approval().await;
    assert_eq!((update.name.as_str(), update.phase.as_str()), (second.as_str(), "Denied"));

    // The sidecar gives up on a third (timeout): Expired.
    let (_, third) = stream.post("/v1/approvals", &approval_request("delete-pod", 'c')).await;
    let third = third["name"].as_str().unwrap().to_owned();
    assert_eq!(stream.post(&format!("/v1/approvals/{third}/close"), &json!({"phase": "Expired"})).await.0, 204);
    assert_eq!(approvals.get(&third).await.unwrap().status.unwrap().phase, Some(ApprovalPhase::Expired));
    assert_eq!(stream.post(&format!("/v1/approvals/{third}/close"), &json!({"phase": "Approved"})).await.0, 400);

    // The sidecar restarts while a fourth waits: Abandoned.
    let (_, fourth) = stream.post("/v1/approvals", &approval_request("delete-pod", 'd')).await;
    let fourth = fourth["name"].as_str().unwrap().to_owned();
    drop(stream);
    // Accepted once the old stream's connection is gone (a second stream never evicts it).
    let mut restarted = eventually("the new instance's stream", TIMEOUT, || {
        let (ca, token) = (ca.clone(), token.clone());
        async move { open_stream_as(operator.port, &ca, &token, "instance-2").await.ok() }
    })
    .await;
    restarted.next_set().await;
    eventually("the fourth approval to be abandoned", TIMEOUT, || {
        let approvals = approvals.clone();
        let fourth = fourth.clone();
        async move {
            let phase = approvals.get(&fourth).await.ok()?.status?.phase?;
            (phase == ApprovalPhase::Abandoned).then_some(())
        }
    })
    .await;
    assert!(
        tokio::time::timeout(std::time::Duration::from_secs(2), restarted.next_approval()).await.is_err(),
        "decisions of the old instance are not sent to the new one"
    );
    drop(operator);
    teardown(cluster, &op_ns, &app).await;
}

/// RunPod MCP 4.0.0 with delete-pod held for approval.
fn approval_policy() -> serde_json::Value {
    json!({
        "version": "1",
        "default": "deny",
        "tools": {
            "list-pods": {},
            "delete-pod": {"action": "approval", "reason": "deleting a pod needs a person",
                "approval": {"timeout": "4s", "show_arguments": true}},
            "delete-network-volume": {"action": "approval", "approval": {"timeout": "40s"}},
        },
    })
}

/// Waits for a Pending McpApproval of `tool` not in `seen`; returns its name.
async fn pending_approval(cluster: &TestCluster, ns: &str, tool: &str, seen: &[String]) -> String {
    use toolgate_policy::crd::{ApprovalPhase, McpApproval as Approval};
    let api: Api<Approval> = Api::namespaced(cluster.client(), ns);
    eventually("a pending McpApproval", TIMEOUT, || {
        let api = api.clone();
        async move {
            let list = api.list(&ListParams::default()).await.ok()?;
            list.items
                .into_iter()
                .find(|a| {
                    a.spec.tool == tool
                        && !seen.contains(&a.metadata.name.clone().unwrap_or_default())
                        && a.status.as_ref().and_then(|s| s.phase) == Some(ApprovalPhase::Pending)
                })
                .and_then(|a| a.metadata.name)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_calls_wait_for_a_person_against_runpod() {
    use toolgate_policy::crd::{ApprovalPhase, McpApproval as Approval};
    let (cluster, op_ns, app, mut operator) = setup(&[]).await;
    let (pod, ca, token) = injected_pod(cluster, &app, "runpod-0", json!({"toolgate.dev/inject": "enabled"})).await;
    let fake = toolgate_tests::mcp::fake_runpod();
    let server = toolgate_tests::mcp::runpod_http(&fake);
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(&pod, server.port, dir.path(), &token, &ca);
    let agent = sidecar.client("agent-key");
    apply_policy(cluster, &app, "runpod", approval_policy()).await;
    status_where(cluster, &app, "runpod", "the sidecar to enforce", |p| {
        p.status.as_ref().is_some_and(|s| s.enforcing == Some(1))
    })
    .await;
    let alice = approver(cluster, &app, "alice").await;
    let approvals: Api<Approval> = Api::namespaced(cluster.client(), &app);
    let deletes = |fake: &toolgate_tests::mcp::Proc| {
        toolgate_tests::mcp::fake_requests(fake).iter().filter(|(m, _, _)| m == "DELETE").count()
    };

    // Approve: the held call completes, and reaches RunPod exactly once.
    let held = tokio::spawn(run_client(agent.clone(), vec![call("delete-network-volume", json!({"id": "vol-1"}))]));
    let first = pending_approval(cluster, &app, "delete-network-volume", &[]).await;
    assert_eq!(deletes(&fake), 0, "nothing reaches RunPod while the call is held");
    let shown = approvals.get(&first).await.unwrap();
    assert!(shown.spec.arguments.is_none() && shown.spec.argument_keys.contains(&"id".to_owned()));
    let (ok, out) = toolgate_cli(cluster, &alice, &["approve", &first, "-n", &app, "--reason", "cleanup"]).await;
    assert!(ok, "{out}");
    let out = held.await.unwrap();
    assert_eq!(codes(&out), [None], "{out:?}");
    assert_eq!(deletes(&fake), 1);
    assert_eq!(
        approvals.get(&first).await.unwrap().status.unwrap().decided_by,
        Some(format!("system:serviceaccount:{PEOPLE}:alice"))
    );

    // Changed arguments are not covered: a new approval, which alice denies.
    let held = tokio::spawn(run_client(agent.clone(), vec![call("delete-network-volume", json!({"id": "vol-2"}))]));
    let second = pending_approval(cluster, &app, "delete-network-volume", std::slice::from_ref(&first)).await;
    assert_ne!(approvals.get(&second).await.unwrap().spec.arguments_digest, shown.spec.arguments_digest);
    let (ok, out) = toolgate_cli(cluster, &alice, &["deny", &second, "-n", &app, "--reason", "keep vol-2"]).await;
    assert!(ok, "{out}");
    let out = held.await.unwrap();
    assert_eq!(codes(&out), [Some(-32010)], "{out:?}");
    let message =
        out[0]["error"]["message"].as_str().unwrap_or_default().to_owned() + &out[0]["error"]["data"].to_string();
    assert!(message.contains(&second), "the refusal names the McpApproval: {message}");
    assert_eq!(deletes(&fake), 1, "a denied call never reaches RunPod");

    // Nobody decides: expired after the policy's 4 s; the McpApproval says so.
    let out = run_client(agent.clone(), vec![call("delete-pod", json!({"id": "pod-9"}))]).await;
    assert_eq!(codes(&out), [Some(-32012)], "{out:?}");
    let third = approvals
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|a| a.spec.tool == "delete-pod")
        .expect("an McpApproval for delete-pod");
    assert_eq!(third.spec.arguments, Some(json!({"id": "pod-9"})), "show_arguments: the approver sees them");
    eventually("the approval to be marked Expired", TIMEOUT, || {
        let approvals = approvals.clone();
        let name = third.metadata.name.clone().unwrap();
        async move { (approvals.get(&name).await.ok()?.status?.phase? == ApprovalPhase::Expired).then_some(()) }
    })
    .await;
    assert_eq!(deletes(&fake), 1);

    // The operator restarts (a rollout) while a call is held: the McpApproval outlives it,
    // the sidecar reconnects, and a decision made after the restart reaches the held call.
    let held = tokio::spawn(run_client(agent.clone(), vec![call("delete-network-volume", json!({"id": "vol-3"}))]));
    let fourth = pending_approval(cluster, &app, "delete-network-volume", &[first.clone(), second.clone()]).await;
    operator.kill();
    operator.restart(cluster).await;
    operator.wait_for_sidecars(1.0).await;
    assert!(!held.is_finished(), "the call is still held across the restart");
    assert_eq!(
        approvals.get(&fourth).await.unwrap().status.unwrap().phase,
        Some(ApprovalPhase::Pending),
        "a reconnect of the same sidecar instance does not abandon its approvals"
    );
    let (ok, out) = toolgate_cli(cluster, &alice, &["approve", &fourth, "-n", &app]).await;
    assert!(ok, "{out}");
    let out = held.await.unwrap();
    assert_eq!(codes(&out), [None], "{out:?}");
    assert_eq!(deletes(&fake), 2, "approved after the restart: reaches RunPod exactly once");

    let m = sidecar.metrics();
    assert_eq!(toolgate_tests::mcp::sample(&m, "toolgate_approval_decisions_total{decision=\"approved\"}"), 2.0, "{m}");
    assert_eq!(toolgate_tests::mcp::sample(&m, "toolgate_approval_decisions_total{decision=\"denied\"}"), 1.0, "{m}");
    assert_eq!(toolgate_tests::mcp::sample(&m, "toolgate_approval_decisions_total{decision=\"expired\"}"), 1.0, "{m}");
    drop(operator);
    teardown(cluster, &op_ns, &app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serving_certificate_is_rotated_before_expiry_without_a_restart() {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    // A 15 s serving certificate: renewed when 5 s are left.
    let (cluster, op_ns, app, operator) = setup(&["--serving-cert-seconds=15"]).await;
    create_pod(cluster, &app, "before-rotation", json!({"toolgate.dev/inject": "enabled"})).await;
    let ca = published_ca(cluster, &app).await;
    let first = served_certificate(operator.port, &ca).await;
    let second = eventually("a new serving certificate", TIMEOUT, || {
        let (ca, first) = (ca.clone(), first.clone());
        let port = operator.port;
        async move {
            let now = served_certificate(port, &ca).await;
            (now != first).then_some(now)
        }
    })
    .await;
    assert_ne!(first, second);
    // Same CA: the caBundle and the published bundle still verify it (the handshake above
    // used the CA fetched before the rotation), and admission keeps working.
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(cluster.client());
    let bundle = webhooks.get(&operator.webhook).await.unwrap().webhooks.unwrap()[0].client_config.ca_bundle.clone();
    assert_eq!(bundle.map(|b| b.0), Some(ca.as_bytes().to_vec()));
    let pod = create_pod(cluster, &app, "after-rotation", json!({"toolgate.dev/inject": "enabled"})).await;
    assert!(pod.spec.unwrap().init_containers.is_some_and(|c| c[0].name == "toolgate-proxy"));
    let m = operator.metrics();
    assert!(toolgate_tests::mcp::sample(&m, "toolgate_operator_certificate_rotations_total") >= 1.0, "{m}");
    drop(operator);
    teardown(cluster, &op_ns, &app).await;
}

/// A pod of `namespace` (no inject label of its own) with `spec` merged over a one-port
/// app container; the apiserver's answer.
async fn try_create(
    cluster: &TestCluster,
    namespace: &str,
    name: &str,
    meta: serde_json::Value,
    spec: serde_json::Value,
) -> Result<k8s_openapi::api::core::v1::Pod, kube::Error> {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "serviceAccountName": "agent",
            "containers": [{"name": "runpod-mcp", "image": "node:22-slim", "ports": [{"containerPort": 3000}]}],
        },
    });
    for (k, v) in meta.as_object().unwrap() {
        pod["metadata"][k] = v.clone();
    }
    for (k, v) in spec.as_object().unwrap() {
        pod["spec"][k] = v.clone();
    }
    let api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(cluster.client(), namespace);
    api.create(&Default::default(), &serde_json::from_value(pod).unwrap()).await
}

async fn label_namespace(cluster: &TestCluster, namespace: &str, labels: serde_json::Value) {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(cluster.client());
    api.patch(namespace, &PatchParams::default(), &Patch::Merge(&json!({"metadata": {"labels": labels}})))
        .await
        .expect("label the namespace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_an_opted_in_namespace_a_pod_that_cannot_get_the_sidecar_is_refused() {
    let (cluster, op_ns, app, operator) = setup(&[]).await;
    cluster.ensure_service_account(&app, "agent").await;
    label_namespace(cluster, &app, json!({"toolgate.dev/inject": "enabled"})).await;
    // Once the operator sees the label, a pod without a label of its own is injected.
    let mut n = 0;
    eventually("an unlabelled pod of the opted-in namespace to be injected", TIMEOUT, || {
        n += 1;
        let name = format!("probe-{n}");
        let app = app.clone();
        async move {
            let pod = try_create(cluster, &app, &name, json!({}), json!({}))
                .await
                .map_err(|e| eprintln!("probe: {e}"))
                .ok()?;
            pod.spec?.init_containers?.first().filter(|c| c.name == "toolgate-proxy").map(|_| ())
        }
    })
    .await;

    let refused = |name: &'static str, meta: serde_json::Value, spec: serde_json::Value, says: &'static str| {
        let app = app.clone();
        async move {
            match try_create(cluster, &app, name, meta, spec).await {
                Err(kube::Error::Api(e)) => {
                    assert_eq!(e.code, 403, "{name}: {e:?}");
                    assert!(e.message.contains(says), "{name}: {}", e.message);
                    e.message
                }
                other => panic!("{name}: admitted or failed otherwise: {other:?}"),
            }
        }
    };
    refused("host-net", json!({}), json!({"hostNetwork": true}), "hostNetwork: true").await;
    let message = refused(
        "opted-out",
        json!({"annotations": {"toolgate.dev/inject": "disabled"}}),
        json!({}),
        "does not allow opting out",
    )
    .await;
    assert!(message.contains("toolgate.dev/allow-opt-out=true"), "{message}");
    refused(
        "fake-marker",
        json!({"annotations": {"toolgate.dev/injected": "0.1.0"}}),
        json!({}),
        "without the sidecar the webhook injects",
    )
    .await;
    refused(
        "named-like-the-sidecar",
        json!({}),
        json!({"containers": [{"name": "toolgate-proxy", "image": "node:22-slim", "ports": [{"containerPort": 3000}]}]}),
        "named toolgate-proxy that is not the sidecar",
    )
    .await;
    // The upstream key: mounted into the sidecar only; an app container that mounts the
    // sidecar's volume is refused.
    let annotated = json!({"annotations": {"toolgate.dev/upstream-credential-secret": "runpod-api-key"}});
    let pod = eventually("a pod naming its upstream-credential Secret to be injected", TIMEOUT, || {
        let (app, annotated) = (app.clone(), annotated.clone());
        async move { try_create(cluster, &app, "custody", annotated, json!({})).await.ok() }
    })
    .await;
    let spec = pod.spec.unwrap();
    let sidecar = &spec.init_containers.as_ref().unwrap()[0];
    assert!(
        sidecar
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "toolgate-upstream-credential" && m.read_only == Some(true)),
        "{sidecar:?}"
    );
    assert!(
        sidecar
            .args
            .iter()
            .flatten()
            .any(|a| a == "--upstream-credential-file=/var/run/secrets/toolgate-upstream/credential")
    );
    for c in &spec.containers {
        assert!(!c.volume_mounts.iter().flatten().any(|m| m.name.starts_with("toolgate-")), "{c:?}");
    }
    refused(
        "app-mounts-the-key",
        annotated.clone(),
        json!({"containers": [{"name": "runpod-mcp", "image": "node:22-slim", "ports": [{"containerPort": 3000}],
            "volumeMounts": [{"name": "toolgate-upstream-credential", "mountPath": "/key"}]}]}),
        "the upstream credential must never reach the app",
    )
    .await;
    refused(
        "bad-secret-name",
        json!({"annotations": {"toolgate.dev/upstream-credential-secret": "RunPod Key"}}),
        json!({}),
        "is not valid",
    )
    .await;

    // The namespace owner allows opting out: the annotated pod is admitted without a sidecar.
    label_namespace(cluster, &app, json!({"toolgate.dev/allow-opt-out": "true"})).await;
    let pod = eventually("the opted-out pod to be admitted", TIMEOUT, || {
        let app = app.clone();
        async move {
            try_create(
                cluster,
                &app,
                "opted-out",
                json!({"annotations": {"toolgate.dev/inject": "disabled"}}),
                json!({}),
            )
            .await
            .ok()
        }
    })
    .await;
    let spec = pod.spec.unwrap();
    assert!(spec.init_containers.unwrap_or_default().is_empty(), "no sidecar");
    assert!(!pod.metadata.annotations.unwrap_or_default().contains_key("toolgate.dev/injected"));

    let m = operator.metrics();
    for reason in [
        "host_network",
        "opt_out_not_allowed",
        "fake_marker",
        "foreign_sidecar",
        "sidecar_volume_in_app",
        "bad_credential_annotation",
    ] {
        let sample = format!("toolgate_operator_webhook_requests_total{{result=\"refused_{reason}\"}}");
        assert!(toolgate_tests::mcp::sample(&m, &sample) >= 1.0, "{sample}: {m}");
    }
    assert!(
        toolgate_tests::mcp::sample(&m, "toolgate_operator_webhook_requests_total{result=\"opted_out\"}") >= 1.0,
        "{m}"
    );
    drop(operator);
    teardown(cluster, &op_ns, &app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_sidecars_count_in_the_shared_store_under_their_namespace() {
    let (cluster, op_ns, app, operator) = setup(&[
        "--sidecar-counter-store=redis://toolgate-counter-store.toolgate-system.svc:6379",
        "--sidecar-counter-store-prefix=toolgate:",
        "--sidecar-counter-store-secret=toolgate-counter-store",
    ])
    .await;
    let (pod, ca, token) =
        injected_pod(cluster, &app, "runpod-s", json!({"app": "runpod", "toolgate.dev/inject": "enabled"})).await;
    let spec = pod.spec.as_ref().unwrap();
    let sidecar = spec.init_containers.as_ref().and_then(|c| c.first()).expect("sidecar injected");
    let args = sidecar.args.clone().unwrap_or_default();
    for want in [
        "--counter-store=redis://toolgate-counter-store.toolgate-system.svc:6379".to_owned(),
        format!("--counter-store-prefix=toolgate:{app}/"),
        "--counter-store-password-file=/var/run/secrets/toolgate-store/password".to_owned(),
    ] {
        assert!(args.contains(&want), "{want} in {args:?}");
    }
    let volume = spec.volumes.iter().flatten().find(|v| v.name == "toolgate-store").expect("the store's Secret");
    assert_eq!(volume.secret.as_ref().and_then(|s| s.secret_name.as_deref()), Some("toolgate-counter-store"));
    // The pod as the API server stored it (with its defaults) is the injected sidecar: the
    // operator accepts its stream, so status and the policy push work with a store.
    let mut stream = open_stream(operator.port, &ca, &token).await.expect("the stream of a store sidecar opens");
    assert_eq!(stream.next_set().await.pod.name, "runpod-s");
    drop(stream);
    drop(operator);

    // Settings that would put the password into pod specs, or keys that could collide, stop
    // the operator at start with the reason.
    for (flag, says) in [
        ("--sidecar-counter-store=redis://:hunter2@redis:6379", "password"),
        ("--sidecar-counter-store=http://redis:6379", "redis://"),
        ("--sidecar-counter-store-prefix=a{b}", "prefix"),
    ] {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_toolgate-operator"));
        if !flag.starts_with("--sidecar-counter-store=") {
            cmd.arg("--sidecar-counter-store=redis://redis:6379");
        }
        cmd.arg(flag).env("KUBECONFIG", "/nonexistent");
        let out = cmd.output().await.expect("run the operator");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag}: started");
        assert!(stderr.contains("--sidecar-counter-store") && stderr.contains(says), "{flag}: {stderr}");
        assert!(!stderr.contains("hunter2"), "the refusal does not echo the password: {stderr}");
    }
    teardown(cluster, &op_ns, &app).await;
}
