//! What a namespace editor or an approver of another namespace tried against a real
//! apiserver with the chart's objects and a real operator (issue "Operator hardening"):
//! changing the injected sidecar after creation, releasing a held call with a copy of its
//! McpApproval in another namespace, deciding as an impersonated service account; and the
//! approver role's supported `kubectl patch --subresource=status`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use support::*;
use toolgate_policy::crd::{ApprovalPhase, McpApproval};
use toolgate_tests::{TestCluster, eventually};

fn approval_request(digest_byte: char) -> serde_json::Value {
    json!({
        "tool": "delete-pod", "identity": "f".repeat(64), "policy": "runpod", "rule": "tools.delete-pod",
        "argumentsDigest": digest_byte.to_string().repeat(64), "argumentKeys": ["id"],
        "timeoutSeconds": 600, "instance": "instance-1",
    })
}

/// Whether kubectl's failure is RBAC not having caught up with a binding made a moment ago.
fn rbac_not_yet(out: &str) -> bool {
    out.contains("forbidden: User") && !out.contains("admission webhook") && !out.contains("ValidatingAdmissionPolicy")
}

/// Runs kubectl as `token` until RBAC lets the request through to admission.
async fn kubectl_when_bound(cluster: &TestCluster, token: &str, args: &[&str]) -> (bool, String) {
    eventually(&format!("RBAC to admit kubectl {args:?}"), TIMEOUT, || async {
        let r = kubectl_as(cluster, token, args).await;
        if rbac_not_yet(&r.1) {
            eprintln!("not yet: {}", r.1);
            return None;
        }
        Some(r)
    })
    .await
}

fn sidecar_image(pod: &Pod) -> String {
    let spec = pod.spec.as_ref().unwrap();
    let sidecar = spec.init_containers.iter().flatten().find(|c| c.name == "toolgate-proxy").expect("the sidecar");
    sidecar.image.clone().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_editor_cannot_change_the_injected_sidecar_after_creation() {
    let (cluster, op_ns, app, operator) = setup(&[]).await;
    apply_chart_template(cluster, "templates/sidecar-guard.yaml", &[]).await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(cluster.client());
    let label = json!({"metadata": {"labels": {"toolgate.dev/inject": "enabled"}}});
    namespaces.patch(&app, &PatchParams::default(), &Patch::Merge(&label)).await.unwrap();
    let pod = create_pod(cluster, &app, "runpod-x", json!({"app": "runpod"})).await;
    let injected = sidecar_image(&pod);
    assert_eq!(injected, "toolgate-proxy:test");
    let eve = person(cluster, &app, "eve", "edit").await;
    let ns = app.as_str();
    // The API server loads a new policy within a moment.
    let dry_run = ["-n", ns, "set", "image", "pod/runpod-x", "toolgate-proxy=example.com/p:1", "--dry-run=server"];
    eventually("the sidecar guard to be in force", TIMEOUT, || async {
        let out = toolgate_tests::run_output(cluster.kubectl().args(dry_run)).await;
        if out.status.success() {
            let policy = toolgate_tests::run_output(cluster.kubectl().args([
                "get",
                "validatingadmissionpolicy",
                "toolgate-sidecar-guard",
                "-o",
                "yaml",
            ]))
            .await;
            eprintln!("not in force yet: {}", String::from_utf8_lossy(&policy.stdout));
        }
        (!out.status.success()).then_some(())
    })
    .await;

    // What `edit` allows on the pod but the sidecar guard refuses: each names the fix.
    let refused = [
        (
            vec!["set", "image", "pod/runpod-x", "toolgate-proxy=example.com/passthrough:1"],
            "cannot be changed or removed",
        ),
        (vec!["annotate", "pod/runpod-x", "toolgate.dev/injected-"], "toolgate.dev/injected annotation"),
        (
            vec!["annotate", "pod/runpod-x", "--overwrite", "toolgate.dev/injected=0.0.1"],
            "toolgate.dev/injected annotation",
        ),
        (vec!["label", "pod/runpod-x", "toolgate.dev/injected-"], "toolgate.dev/injected label"),
        (vec!["label", "pod/runpod-x", "--overwrite", "toolgate.dev/injected=false"], "toolgate.dev/injected label"),
    ];
    for (args, says) in refused {
        let args: Vec<&str> = ["-n", ns].into_iter().chain(args).collect();
        let (ok, out) = kubectl_when_bound(cluster, &eve, &args).await;
        assert!(!ok, "kubectl {args:?} was accepted: {out}");
        assert!(out.contains(says) && out.contains("toolgate-sidecar-guard"), "kubectl {args:?}: {out}");
    }
    // An ephemeral container sharing the sidecar's processes (as the cluster admin: the
    // policy binds everyone).
    let out = toolgate_tests::run_output(cluster.kubectl().args([
        "-n",
        ns,
        "debug",
        "pod/runpod-x",
        "--image=busybox:1",
        "--target=toolgate-proxy",
    ]))
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an ephemeral container targeting the sidecar was added");
    assert!(stderr.contains("cannot target the toolgate-proxy sidecar"), "{stderr}");

    // An ephemeral container mounting the sidecar's operator token (or the upstream
    // credential): the webhook never sees ephemeral containers, the guard does.
    let mount = r#"{"spec": {"ephemeralContainers": [{"name": "peek", "image": "busybox:1",
        "volumeMounts": [{"name": "toolgate-token", "mountPath": "/peek", "readOnly": true}]}]}}"#;
    let out = toolgate_tests::run_output(cluster.kubectl().args([
        "-n",
        ns,
        "patch",
        "pod/runpod-x",
        "--subresource=ephemeralcontainers",
        "--type=strategic",
        "-p",
        mount,
    ]))
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an ephemeral container mounting the sidecar's token was added");
    assert!(stderr.contains("cannot mount the toolgate-proxy sidecar's volumes"), "{stderr}");

    // Resizing the sidecar (as the cluster admin).
    let resize = r#"[{"op": "replace", "path": "/spec/initContainers/0/resources/limits/memory", "value": "64Mi"}]"#;
    let out = toolgate_tests::run_output(cluster.kubectl().args([
        "-n",
        ns,
        "patch",
        "pod/runpod-x",
        "--subresource=resize",
        "--type=json",
        "-p",
        resize,
    ]))
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("cannot be changed or removed"), "resize: {stderr}");

    // The API server counts the refusals (no operator involved).
    let metrics = toolgate_tests::run_ok(cluster.kubectl().args(["get", "--raw", "/metrics"])).await;
    let denied = metrics.lines().any(|l| {
        l.starts_with("apiserver_validating_admission_policy_check_total{")
            && l.contains(r#"enforcement_action="deny""#)
            && l.contains(r#"policy="toolgate-sidecar-guard""#)
    });
    assert!(denied, "{}", metrics.lines().filter(|l| l.contains("admission_policy")).collect::<Vec<_>>().join("\n"));

    let now = Api::<Pod>::namespaced(cluster.client(), &app).get("runpod-x").await.unwrap();
    assert_eq!(sidecar_image(&now), injected, "the sidecar is what was injected");
    assert_eq!(now.metadata.labels.as_ref().unwrap()["toolgate.dev/injected"], "true");

    // Updates that leave the sidecar alone stay allowed.
    for args in [
        vec!["label", "pod/runpod-x", "team=a"],
        vec!["annotate", "pod/runpod-x", "owner=eve"],
        vec!["set", "image", "pod/runpod-x", "runpod-mcp=node:23-slim"],
    ] {
        let args: Vec<&str> = ["-n", ns].into_iter().chain(args).collect();
        let (ok, out) = kubectl_when_bound(cluster, &eve, &args).await;
        assert!(ok, "kubectl {args:?}: {out}");
    }
    let out =
        toolgate_tests::run_output(cluster.kubectl().args(["-n", ns, "debug", "pod/runpod-x", "--image=busybox:1"]))
            .await;
    assert!(out.status.success(), "an ephemeral container for the app: {}", String::from_utf8_lossy(&out.stderr));
    drop(operator);
    teardown(cluster, &op_ns, &app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_a_pending_approval_in_another_namespace_releases_nothing() {
    let (cluster, op_ns, app, operator) = setup(&[]).await;
    // Namespace B, governed by the same operator; bea may create and decide McpApprovals there only.
    let other = cluster.create_namespace().await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(cluster.client());
    let label = json!({"metadata": {"labels": {"toolgate.dev/test-operator": op_ns}}});
    namespaces.patch(&other, &PatchParams::default(), &Patch::Merge(&label)).await.unwrap();
    let role: k8s_openapi::api::rbac::v1::Role = serde_json::from_value(json!({
        "metadata": {"name": "approvals-owner"},
        "rules": [
            {"apiGroups": ["toolgate.dev"], "resources": ["mcpapprovals"], "verbs": ["get", "list", "create"]},
            {"apiGroups": ["toolgate.dev"], "resources": ["mcpapprovals/status"], "verbs": ["get", "update", "patch"]},
        ],
    }))
    .unwrap();
    Api::namespaced(cluster.client(), &other).create(&PostParams::default(), &role).await.unwrap();
    people_namespace(cluster).await;
    cluster.ensure_service_account(PEOPLE, "bea").await;
    let binding: k8s_openapi::api::rbac::v1::RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "bea"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "approvals-owner"},
        "subjects": [{"kind": "ServiceAccount", "name": "bea", "namespace": PEOPLE}],
    }))
    .unwrap();
    Api::namespaced(cluster.client(), &other).create(&PostParams::default(), &binding).await.unwrap();
    let bea = cluster.client_with_token(&cluster.mint_token(PEOPLE, "bea", &[], None).await).await;

    let (_pod, ca, token) = injected_pod(cluster, &app, "runpod-a", json!({"toolgate.dev/inject": "enabled"})).await;
    let mut stream = open_stream(operator.port, &ca, &token).await.expect("stream");
    stream.next_set().await;
    let (code, created) = stream.post("/v1/approvals", &approval_request('a')).await;
    assert_eq!(code, 201, "{created}");
    let name = created["name"].as_str().unwrap().to_owned();
    let in_a: Api<McpApproval> = Api::namespaced(cluster.client(), &app);
    let original = in_a.get(&name).await.unwrap();
    let copy: McpApproval = serde_json::from_value(json!({
        "apiVersion": "toolgate.dev/v1alpha1", "kind": "McpApproval",
        "metadata": {"name": name},
        "spec": original.spec,
    }))
    .unwrap();

    // Bea copies it into B: only the operator creates McpApprovals.
    let bea_b: Api<McpApproval> = Api::namespaced(bea.clone(), &other);
    let refused = eventually("RBAC to let bea create in B", TIMEOUT, || async {
        match bea_b.create(&PostParams::default(), &copy).await {
            Err(kube::Error::Api(e)) if e.message.contains("cannot create resource") => None,
            other => Some(other),
        }
    })
    .await;
    match refused {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 403, "{e:?}");
            assert!(e.message.contains("created by the toolgate operator"), "{}", e.message);
        }
        other => panic!("bea created a copy of the pending approval in B: {other:?}"),
    }

    // Even a copy that exists (created by the operator's own identity, here the test's
    // admin) and is approved in B does not reach the sidecar of A's pod.
    Api::<McpApproval>::namespaced(cluster.client(), &other).create(&PostParams::default(), &copy).await.unwrap();
    let approve = json!({"status": {"phase": "Approved"}});
    let decided = eventually("bea's decision in B", TIMEOUT, || async {
        bea_b.patch_status(&name, &PatchParams::default(), &Patch::Merge(&approve)).await.ok()
    })
    .await;
    assert_eq!(decided.status.unwrap().decided_by, Some(format!("system:serviceaccount:{PEOPLE}:bea")));
    let early = tokio::time::timeout(Duration::from_secs(3), stream.next_approval()).await;
    assert!(early.is_err(), "a decision in B reached the sidecar in A: {early:?}");
    assert_eq!(in_a.get(&name).await.unwrap().status.unwrap().phase, Some(ApprovalPhase::Pending));

    // The approval in A, decided by an approver of A, does.
    let alice = approver(cluster, &app, "alice").await;
    let alice_a: Api<McpApproval> = Api::namespaced(cluster.client_with_token(&alice).await, &app);
    eventually("alice's decision in A", TIMEOUT, || async {
        alice_a.patch_status(&name, &PatchParams::default(), &Patch::Merge(&approve)).await.ok()
    })
    .await;
    let update = stream.next_approval().await;
    assert_eq!((update.name.as_str(), update.phase.as_str()), (name.as_str(), "Approved"));
    assert_eq!(update.decided_by, Some(format!("system:serviceaccount:{PEOPLE}:alice")));

    let m = operator.metrics();
    let sample = "toolgate_operator_webhook_requests_total{result=\"refused_not_operator\"}";
    assert!(toolgate_tests::mcp::sample(&m, sample) >= 1.0, "{sample}: {m}");
    drop(operator);
    cluster.delete_namespace(&other).await;
    teardown(cluster, &op_ns, &app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_editors_cannot_decide_as_its_service_accounts_and_approvers_use_kubectl() {
    let cluster = TestCluster::shared();
    cluster.install_toolgate_crds().await;
    let op_ns = cluster.create_namespace().await;
    let app = cluster.create_namespace().await;
    let listed = format!("--allowed-decider-service-accounts={app}/listed-bot");
    let operator = Operator::start(cluster, &op_ns, &app, &[&listed]).await;
    wait_for_webhook(cluster, &operator.webhook).await;
    let (_pod, ca, token) = injected_pod(cluster, &app, "runpod-a", json!({"toolgate.dev/inject": "enabled"})).await;
    let mut stream = open_stream(operator.port, &ca, &token).await.expect("stream");
    stream.next_set().await;
    let mut names = Vec::new();
    for digest in ['a', 'b'] {
        let (code, created) = stream.post("/v1/approvals", &approval_request(digest)).await;
        assert_eq!(code, 201, "{created}");
        names.push(created["name"].as_str().unwrap().to_owned());
    }

    // Two bots of the pod's namespace hold the chart's approver role; eve edits the namespace.
    let alice = approver(cluster, &app, "alice").await;
    for bot in ["bot", "listed-bot"] {
        cluster.ensure_service_account(&app, bot).await;
        bind(cluster, &app, "toolgate-approver", json!({"kind": "ServiceAccount", "name": bot, "namespace": app}))
            .await;
    }
    let eve = person(cluster, &app, "eve", "edit").await;
    let approve = |who: String, name: &str| {
        vec![
            format!("--as={who}"),
            "-n".into(),
            app.clone(),
            "patch".into(),
            format!("mcpapproval/{name}"),
            "--subresource=status".into(),
            "--type=merge".into(),
            "-p".into(),
            r#"{"status":{"phase":"Approved"}}"#.into(),
        ]
    };
    // Eve impersonates the bot (`edit` may impersonate the namespace's service accounts).
    let args = approve(format!("system:serviceaccount:{app}:bot"), &names[0]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out) = kubectl_when_bound(cluster, &eve, &args).await;
    assert!(!ok, "an impersonated service account of the pod's namespace decided: {out}");
    assert!(out.contains("may not decide approvals") && out.contains("impersonate"), "{out}");
    let in_app: Api<McpApproval> = Api::namespaced(cluster.client(), &app);
    assert_eq!(in_app.get(&names[0]).await.unwrap().status.unwrap().phase, Some(ApprovalPhase::Pending));

    // A service account the operator lists may decide.
    let args = approve(format!("system:serviceaccount:{app}:listed-bot"), &names[0]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out) = kubectl_when_bound(cluster, &eve, &args).await;
    assert!(ok, "{out}");
    let update = stream.next_approval().await;
    assert_eq!((update.name.as_str(), update.phase.as_str()), (names[0].as_str(), "Approved"));
    assert_eq!(update.decided_by, Some(format!("system:serviceaccount:{app}:listed-bot")));

    // A person with the chart's approver role decides with kubectl patch --subresource=status.
    let args = [
        "-n",
        &app,
        "patch",
        &format!("mcpapproval/{}", names[1]),
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Denied","reason":"not today"}}"#,
    ]
    .map(str::to_owned);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out) = kubectl_when_bound(cluster, &alice, &args).await;
    assert!(ok, "the approver role's kubectl patch --subresource=status: {out}");
    let update = stream.next_approval().await;
    assert_eq!((update.name.as_str(), update.phase.as_str()), (names[1].as_str(), "Denied"));
    assert_eq!(update.decided_by, Some(format!("system:serviceaccount:{PEOPLE}:alice")));

    let m = operator.metrics();
    let sample = "toolgate_operator_webhook_requests_total{result=\"refused_service_account\"}";
    assert!(toolgate_tests::mcp::sample(&m, sample) >= 1.0, "{sample}: {m}");
    drop(operator);
    teardown(cluster, &op_ns, &app).await;
}
