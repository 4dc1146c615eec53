//! What a namespace editor (the built-in `edit` role: pods, labels, annotations, tokens of
//! the namespace's service accounts) cannot do against the operator, each against the real
//! apiserver and operator: fake `enforcing` status, use a token outside its pod, evict a
//! sidecar's stream, hide a pod without a sidecar from status, keep a frozen sidecar
//! counted, or move a pod out of a policy unnoticed. See docs/operator.md, "Threat model".
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use support::*;
use toolgate_operator::McpPolicy;
use toolgate_tests::{TestCluster, eventually};

const SEED: &str = r#"{"version":"1","default":"deny","tools":{"start-pod":{}}}"#;

fn seed_selecting(labels: Value) -> Value {
    let mut seed: Value = serde_json::from_str(SEED).unwrap();
    seed["selector"] = json!({ "matchLabels": labels });
    seed
}

async fn apply_policy(cluster: &TestCluster, ns: &str, name: &str, spec: Value) {
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

fn condition<'a>(p: &'a McpPolicy, type_: &str) -> Option<&'a Condition> {
    p.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

fn counts(p: &McpPolicy) -> (Option<i32>, Option<i32>, Option<i32>) {
    let s = p.status.clone().unwrap_or_default();
    (s.targets, s.enforcing, s.unprotected)
}

/// Creates a pod of `namespace` with `metadata` merged in (labels, annotations) and
/// 127.0.0.1 reported as its IP.
async fn create_pod_with(cluster: &TestCluster, namespace: &str, name: &str, metadata: Value) -> Pod {
    cluster.ensure_service_account(namespace, "agent").await;
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "serviceAccountName": "agent",
            "containers": [{"name": "runpod-mcp", "image": "node:22-slim", "ports": [{"containerPort": 3000}]}],
        },
    });
    for (k, v) in metadata.as_object().unwrap() {
        pod["metadata"][k] = v.clone();
    }
    let api: Api<Pod> = Api::namespaced(cluster.client(), namespace);
    let pod: Pod = serde_json::from_value(pod).unwrap();
    let created = eventually("the pod to be admitted", TIMEOUT, || {
        let (api, pod) = (api.clone(), pod.clone());
        async move {
            match api.create(&Default::default(), &pod).await {
                Ok(p) => Some(p),
                Err(kube::Error::Api(e)) if e.code == 409 => api.get(name).await.ok(),
                Err(e) => {
                    eprintln!("pod create: {e}");
                    None
                }
            }
        }
    })
    .await;
    set_pod_ip(cluster, &created, "127.0.0.1").await
}

async fn label_namespace(cluster: &TestCluster, namespace: &str, labels: Value) {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(cluster.client());
    api.patch(namespace, &PatchParams::default(), &Patch::Merge(&json!({"metadata": {"labels": labels}})))
        .await
        .expect("label the namespace");
}

fn metric(operator: &Operator, line: &str) -> f64 {
    toolgate_tests::mcp::sample(&operator.metrics(), line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_api_token_bound_to_the_pod_is_not_a_toolgate_token() {
    let (cluster, op_ns, app, operator) = setup(&[]).await;
    let (pod, ca, token) = injected_pod(cluster, &app, "runpod-a", json!({"toolgate.dev/inject": "enabled"})).await;
    // The pod's default API token (audience: the apiserver, as in a real cluster), bound
    // to the pod: anyone who can mint tokens for the service account has one.
    let api_token = cluster
        .mint_token(
            &app,
            "agent",
            &[],
            Some((pod.metadata.name.as_deref().unwrap(), pod.metadata.uid.as_deref().unwrap())),
        )
        .await;
    let refused = open_stream(operator.port, &ca, &api_token).await.err();
    assert_eq!(refused.as_ref().map(|e| e.0), Some(401), "{refused:?}");
    assert!(refused.is_some_and(|e| e.1.contains("audience") || e.1.contains("token")));
    // The same pod's token with the toolgate audience (what the sidecar mounts) is accepted.
    let stream = open_stream(operator.port, &ca, &token).await;
    assert!(stream.is_ok(), "{:?}", stream.err());
    drop(stream);
    drop(operator);
    teardown(cluster, &op_ns, &app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_every_selected_pod_and_enforcing_cannot_be_faked() {
    let (cluster, op_ns, app, operator) = setup(&[]).await;
    label_namespace(cluster, &app, json!({"toolgate.dev/inject": "enabled", "toolgate.dev/allow-opt-out": "true"}))
        .await;
    let injected = json!({"app": "runpod", "toolgate.dev/inject": "enabled"});
    let a = create_pod_with(cluster, &app, "runpod-a", json!({"labels": injected})).await;
    assert!(a.spec.as_ref().unwrap().init_containers.is_some(), "injected");
    let b = create_pod_with(cluster, &app, "runpod-b", json!({"labels": injected})).await;
    // Opted out (allowed here: refused and retried until the operator sees the namespace
    // label), and another one that also hand-sets the injected label.
    let opted_out = json!({"toolgate.dev/inject": "disabled"});
    let c = create_pod_with(cluster, &app, "runpod-c", json!({"labels": {"app": "runpod"}, "annotations": opted_out}))
        .await;
    assert!(c.spec.as_ref().unwrap().init_containers.is_none(), "no sidecar");
    let fake_labels = json!({"app": "runpod", "toolgate.dev/injected": "true"});
    let d = create_pod_with(cluster, &app, "runpod-d", json!({"labels": fake_labels, "annotations": opted_out})).await;
    assert!(d.spec.as_ref().unwrap().init_containers.is_none(), "no sidecar");

    let ca = published_ca(cluster, &app).await;
    apply_policy(cluster, &app, "seed", seed_selecting(json!({"app": "runpod"}))).await;
    let mut streams = Vec::new();
    for pod in [&a, &b] {
        let mut s = open_stream(operator.port, &ca, &pod_token(cluster, pod).await).await.expect("stream");
        let set = loop {
            let set = s.next_set().await;
            if !set.policies.is_empty() {
                break set;
            }
        };
        assert_eq!(s.ack(&set.revision).await, 204);
        streams.push(s);
    }
    // The pods without a sidecar, with a token bound to them, cannot open a stream (and so
    // cannot acknowledge anything), whatever their labels say.
    for pod in [&d, &c] {
        let refused = open_stream(operator.port, &ca, &pod_token(cluster, pod).await).await.err();
        assert_eq!(refused.as_ref().map(|e| e.0), Some(403), "{refused:?}");
        assert!(refused.unwrap().1.contains("does not hold the toolgate sidecar"));
    }
    let p = status_where(cluster, &app, "seed", "4 targets, 2 enforcing, 2 unprotected", |p| {
        counts(p) == (Some(4), Some(2), Some(2))
    })
    .await;
    let ready = condition(&p, "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "Unprotected"), "{ready:?}");
    assert!(ready.message.contains("runpod-c") && ready.message.contains("runpod-d"), "{}", ready.message);
    assert!(!ready.message.contains("runpod-a"), "{}", ready.message);

    // What `kubectl get mcpp` shows: not Ready, and the unprotected pods counted.
    let out = cluster.kubectl().args(["get", "mcpp", "-n", &app, "seed"]).output().await.unwrap();
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
    let row: Vec<&str> = table.lines().nth(1).unwrap_or_default().split_whitespace().collect();
    let column = |name: &str| header.iter().position(|h| *h == name).and_then(|i| row.get(i).copied());
    assert_eq!(column("READY"), Some("False"), "{table}");
    assert_eq!(column("TARGETS"), Some("4"), "{table}");
    assert_eq!(column("ENFORCING"), Some("2"), "{table}");
    assert_eq!(column("UNPROTECTED"), Some("2"), "{table}");
    let unprotected = format!("toolgate_operator_policy_unprotected{{namespace=\"{app}\",policy=\"seed\"}}");
    assert_eq!(metric(&operator, &unprotected), 2.0);
    assert!(metric(&operator, "toolgate_operator_stream_requests_total{result=\"not_injected\"}") >= 2.0);

    // Without the unprotected pods the policy is Ready.
    let pods: Api<Pod> = Api::namespaced(cluster.client(), &app);
    for name in ["runpod-c", "runpod-d"] {
        pods.delete(name, &Default::default()).await.unwrap();
    }
    let p = status_where(cluster, &app, "seed", "Ready with 2 targets", |p| {
        counts(p) == (Some(2), Some(2), Some(0)) && condition(p, "Ready").is_some_and(|c| c.status == "True")
    })
    .await;
    assert_eq!(condition(&p, "Ready").unwrap().reason, "Enforcing");
    drop(streams);
    drop(operator);
    teardown(cluster, &op_ns, &app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_bound_to_the_pod_is_accepted_only_from_the_pods_address() {
    let (cluster, op_ns, app, operator) = setup(&[]).await;
    let (pod, ca, token) = injected_pod(cluster, &app, "runpod-a", json!({"toolgate.dev/inject": "enabled"})).await;
    // The pod runs at another address: the token (which anyone with `edit` can mint for
    // it) is useless from here.
    set_pod_ip(cluster, &pod, "10.244.7.9").await;
    let refused = eventually("the stream from a foreign address to be refused", TIMEOUT, || {
        let (ca, token) = (ca.clone(), token.clone());
        async move { open_stream(operator.port, &ca, &token).await.err().filter(|e| e.0 == 403) }
    })
    .await;
    assert!(refused.1.contains("not from pod") && refused.1.contains("10.244.7.9"), "{refused:?}");
    assert!(metric(&operator, "toolgate_operator_stream_requests_total{result=\"wrong_peer\"}") >= 1.0);
    // Reported at this host's address, as the sidecar's pod would be: accepted.
    set_pod_ip(cluster, &pod, "127.0.0.1").await;
    let stream = eventually("the stream from the pod's address", TIMEOUT, || {
        let (ca, token) = (ca.clone(), token.clone());
        async move { open_stream(operator.port, &ca, &token).await.ok() }
    })
    .await;
    drop(stream);
    drop(operator);
    teardown(cluster, &op_ns, &app).await;
}

fn approval_request(instance: &str) -> Value {
    json!({
        "tool": "delete-pod", "identity": "f".repeat(64), "policy": "runpod", "rule": "tools.delete-pod",
        "argumentsDigest": "a".repeat(64), "argumentKeys": ["id"], "timeoutSeconds": 600, "instance": instance,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stream_for_a_pod_neither_evicts_the_first_nor_abandons_its_held_calls() {
    use toolgate_policy::crd::{ApprovalPhase, McpApproval};
    let (cluster, op_ns, app, operator) = setup(&[]).await;
    let (pod, ca, token) = injected_pod(cluster, &app, "runpod-a", json!({"toolgate.dev/inject": "enabled"})).await;
    let mut sidecar = open_stream_as(operator.port, &ca, &token, "instance-1").await.expect("the sidecar's stream");
    sidecar.next_set().await;
    let (code, created) = sidecar.post("/v1/approvals", &approval_request("instance-1")).await;
    assert_eq!(code, 201, "{created}");
    let held = created["name"].as_str().unwrap().to_owned();

    // Another token minted for the pod (as `edit` allows), another instance header, the
    // same address: refused while the sidecar's stream is alive.
    let minted = pod_token(cluster, &pod).await;
    for instance in ["intruder", "instance-1"] {
        let refused = open_stream_as(operator.port, &ca, &minted, instance).await.err();
        assert_eq!(refused.as_ref().map(|e| e.0), Some(409), "{instance}: {refused:?}");
    }
    assert!(metric(&operator, "toolgate_operator_stream_requests_total{result=\"duplicate\"}") >= 2.0);
    // The sidecar keeps its stream: a new policy reaches it and its ack counts.
    apply_policy(cluster, &app, "seed", serde_json::from_str(SEED).unwrap()).await;
    let set = sidecar.next_set().await;
    assert_eq!(set.policies.len(), 1);
    assert_eq!(sidecar.ack(&set.revision).await, 204);
    status_where(cluster, &app, "seed", "the sidecar to enforce", |p| counts(p).1 == Some(1)).await;
    let approvals: Api<McpApproval> = Api::namespaced(cluster.client(), &app);
    assert_eq!(
        approvals.get(&held).await.unwrap().status.and_then(|s| s.phase),
        Some(ApprovalPhase::Pending),
        "the held call is not abandoned"
    );

    // Once the sidecar's connection is gone (it restarted), a new instance is accepted
    // and the old instance's held call is abandoned.
    drop(sidecar);
    let restarted = eventually("the restarted sidecar's stream", TIMEOUT, || {
        let (ca, token) = (ca.clone(), token.clone());
        async move { open_stream_as(operator.port, &ca, &token, "instance-2").await.ok() }
    })
    .await;
    eventually("the old instance's held call to be abandoned", TIMEOUT, || {
        let (approvals, held) = (approvals.clone(), held.clone());
        async move { (approvals.get(&held).await.ok()?.status?.phase? == ApprovalPhase::Abandoned).then_some(()) }
    })
    .await;
    drop(restarted);
    drop(operator);
    teardown(cluster, &op_ns, &app).await;
}

/// Sends `signal` (STOP, CONT) to a process.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_sidecar_is_dropped_and_no_longer_counted_as_enforcing() {
    let (cluster, op_ns, app, operator) = setup(&["--keepalive-seconds=1", "--keepalive-timeout-seconds=2"]).await;
    let (pod, ca, token) = injected_pod(cluster, &app, "runpod-a", json!({"toolgate.dev/inject": "enabled"})).await;
    let dir = tempfile::tempdir().unwrap();
    // The real sidecar, started as injected (its upstream is not needed here).
    let mut sidecar = Sidecar::start(&pod, toolgate_tests::free_port().unwrap(), dir.path(), &token, &ca);
    apply_policy(cluster, &app, "seed", serde_json::from_str(SEED).unwrap()).await;
    status_where(cluster, &app, "seed", "the sidecar to enforce", |p| counts(p).1 == Some(1)).await;
    operator.wait_for_sidecars(1.0).await;

    let pid = sidecar.proc.child.id();
    signal(pid, "STOP");
    // Frozen: it answers no keepalive ping, so its connection and stream are dropped.
    let p =
        status_where(cluster, &app, "seed", "the frozen sidecar to stop counting", |p| counts(p).1 == Some(0)).await;
    assert_eq!(condition(&p, "Ready").unwrap().status, "False");
    operator.wait_for_sidecars(0.0).await;
    signal(pid, "CONT");
    // Thawed, it reconnects on its own and enforces again.
    status_where(cluster, &app, "seed", "the thawed sidecar to enforce again", |p| counts(p).1 == Some(1)).await;
    let _ = sidecar.proc.child.kill();
    drop(operator);
    teardown(cluster, &op_ns, &app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relabelling_a_pod_out_of_a_policy_shows_in_status_and_metrics() {
    let (cluster, op_ns, app, operator) = setup(&[]).await;
    let (pod, ca, token) = injected_pod(
        cluster,
        &app,
        "runpod-a",
        json!({"toolgate.dev/inject": "enabled", "app": "runpod", "tier": "strict"}),
    )
    .await;
    let mut stream = open_stream(operator.port, &ca, &token).await.expect("stream");
    stream.next_set().await;
    apply_policy(cluster, &app, "strict", seed_selecting(json!({"tier": "strict"}))).await;
    apply_policy(cluster, &app, "loose", seed_selecting(json!({"app": "runpod"}))).await;
    let p =
        status_where(cluster, &app, "strict", "the strict policy to select the pod", |p| counts(p).0 == Some(1)).await;
    assert_eq!(condition(&p, "PodsLeft").map(|c| c.status.as_str()), Some("False"));

    // The pod author relabels the pod out of the strict policy: still governed by the
    // loose one, and the strict policy says so.
    let pods: Api<Pod> = Api::namespaced(cluster.client(), &app);
    let relabel = json!({"metadata": {"labels": {"tier": "relaxed"}}});
    pods.patch(pod.metadata.name.as_deref().unwrap(), &PatchParams::default(), &Patch::Merge(&relabel))
        .await
        .expect("relabel the pod");
    let p = status_where(cluster, &app, "strict", "PodsLeft=True", |p| {
        condition(p, "PodsLeft").is_some_and(|c| c.status == "True")
    })
    .await;
    let left = condition(&p, "PodsLeft").unwrap();
    assert_eq!(left.reason, "SelectionLost");
    assert!(left.message.contains("runpod-a"), "{}", left.message);
    assert_eq!(counts(&p).0, Some(0));
    let counter = format!("toolgate_operator_policy_pods_left_total{{namespace=\"{app}\",policy=\"strict\"}}");
    eventually("the pods-left counter", TIMEOUT, || {
        let v = metric(&operator, &counter);
        async move { (v == 1.0).then_some(()) }
    })
    .await;
    let loose = status_where(cluster, &app, "loose", "the loose policy keeps it", |p| counts(p).0 == Some(1)).await;
    assert_eq!(condition(&loose, "PodsLeft").map(|c| c.status.as_str()), Some("False"));

    // Labelled back: no longer reported.
    let back = json!({"metadata": {"labels": {"tier": "strict"}}});
    pods.patch(pod.metadata.name.as_deref().unwrap(), &PatchParams::default(), &Patch::Merge(&back)).await.unwrap();
    status_where(cluster, &app, "strict", "PodsLeft=False again", |p| {
        counts(p).0 == Some(1) && condition(p, "PodsLeft").is_some_and(|c| c.status == "False")
    })
    .await;
    drop(stream);
    drop(operator);
    teardown(cluster, &op_ns, &app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stream_on_another_replica_does_not_abandon_the_held_calls() {
    use toolgate_policy::crd::{ApprovalPhase, McpApproval};
    let cluster = TestCluster::shared();
    cluster.install_toolgate_crds().await;
    let op_ns = cluster.create_namespace().await;
    let app = cluster.create_namespace().await;
    let service = format!("--sidecar-operator-url=https://toolgate-operator.{op_ns}.svc:8443");
    let a = Operator::start_as(cluster, "replica-a", &op_ns, &app, &[&service]).await;
    eventually("replica-a to lead", TIMEOUT, || {
        let m = a.metrics();
        async move { (toolgate_tests::mcp::sample(&m, "toolgate_operator_leader") == 1.0).then_some(()) }
    })
    .await;
    let b = Operator::start_as(cluster, "replica-b", &op_ns, &app, &[&service]).await;
    wait_for_webhook(cluster, &b.webhook).await;
    let (pod, ca, token) = injected_pod(cluster, &app, "runpod-a", json!({"toolgate.dev/inject": "enabled"})).await;

    // The sidecar streams from the leader and holds a call for approval.
    let mut sidecar = open_stream_as(a.port, &ca, &token, "instance-1").await.expect("the sidecar's stream");
    sidecar.next_set().await;
    let (code, created) = sidecar.post("/v1/approvals", &approval_request("instance-1")).await;
    assert_eq!(code, 201, "{created}");
    let held = created["name"].as_str().unwrap().to_owned();

    // A second stream for the pod reaches the other replica (which cannot know of the
    // first): accepted there, and reported to the leader within a second.
    let intruder = open_stream_as(b.port, &ca, &pod_token(cluster, &pod).await, "intruder").await;
    assert!(intruder.is_ok(), "{:?}", intruder.err());
    b.wait_for_sidecars(1.0).await;
    // Past the age at which the leader gives up the calls of a replaced instance (report
    // freshness, 15 s) and several of its rounds: still Pending, since instance-1 lives.
    tokio::time::sleep(std::time::Duration::from_secs(25)).await;
    let approvals: Api<McpApproval> = Api::namespaced(cluster.client(), &app);
    assert_eq!(
        approvals.get(&held).await.unwrap().status.and_then(|s| s.phase),
        Some(ApprovalPhase::Pending),
        "a stream on another replica must not abandon the held call"
    );
    drop(intruder);
    drop(sidecar);
    drop(b);
    drop(a);
    teardown(cluster, &op_ns, &app).await;
}
