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
    let cluster = TestCluster::shared();
    install_crd(cluster).await;
    let op_ns = cluster.create_namespace().await;
    let app = cluster.create_namespace().await;
    let mut operator = Operator::start(cluster, &op_ns, &app, &[]).await;
    wait_for_webhook(cluster, &operator.webhook).await;

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
    // A plain API token: 401 where `toolgate` is not an API audience, 403 (not bound to a
    // pod) where it is, as in the test apiserver.
    let api_audience = cluster.mint_token(&app, "agent", &[], None).await;
    let refused = open_stream(operator.port, &ca, &api_audience).await.err();
    assert!(matches!(refused.as_ref().map(|e| e.0), Some(401 | 403)), "{refused:?}");
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
    for result in ["unauthenticated", "forbidden", "unknown_pod"] {
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
    cluster.delete_namespace(&app).await;
    cluster.delete_namespace(&op_ns).await;
}
