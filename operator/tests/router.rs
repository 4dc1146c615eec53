//! The HTTPS and admin routes served in process, without an API server: the router over a
//! `Ctx` built from informer-store writers (what the layout of docs/operator.md, "Code
//! layout", makes possible), driven over loopback with the injection fixtures wrapped in
//! `AdmissionReview`s. The API client points at a port where nothing listens, so anything
//! that would need the API server fails, and must fail closed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::reflector::store::{self, Writer};
use kube::runtime::watcher;
use serde_json::{Value, json};
use tokio::sync::watch;
use toolgate_operator::admission::Admission;
use toolgate_operator::auth::{Authenticator, ConnAuth};
use toolgate_operator::http::{self, Keepalive};
use toolgate_operator::inject::InjectConfig;
use toolgate_operator::metrics::Metrics;
use toolgate_operator::push::Hub;
use toolgate_operator::push::server::Server;
use toolgate_operator::router::{self, Ctx};
use toolgate_tests::mcp::{http as request, sample};

struct Operator {
    https: u16,
    admin: u16,
    ctx: Arc<Ctx>,
    namespaces: Writer<Namespace>,
    _shutdown: watch::Sender<bool>,
}

async fn operator() -> Operator {
    // Nothing listens there: every API call fails at once.
    let dead = toolgate_tests::free_port().expect("a free port");
    let config = kube::Config::new(format!("http://127.0.0.1:{dead}").parse().expect("url"));
    let client = kube::Client::try_from(config).expect("client");
    let (policies, _pw) = store::store();
    let (pods, _ow) = store::store();
    let (approvals, _aw) = store::store();
    let (namespaces_store, namespaces) = store::store::<Namespace>();
    let metrics = Arc::new(Metrics::new());
    let inject = InjectConfig::default();
    let (hub, _status) = Hub::new(policies, pods, approvals, metrics.clone(), None, inject.clone());
    let (shutdown_tx, shutdown) = watch::channel(false);
    let ctx = Arc::new(Ctx {
        admission: Admission {
            hub: hub.clone(),
            namespaces: namespaces_store,
            namespace_api: kube::Api::all(client.clone()),
            inject: inject.clone(),
            deciders: Default::default(),
            metrics: metrics.clone(),
        },
        push: Server {
            client: client.clone(),
            hub,
            auth: Authenticator::new(client),
            inject,
            heartbeat: std::time::Duration::from_secs(10),
            bind_pod_ip: true,
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
        },
        metrics,
        ready: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let (https, admin_port) = (listener.local_addr().unwrap().port(), admin.local_addr().unwrap().port());
    let keepalive = Keepalive::default();
    tokio::spawn(http::serve::<_, ConnAuth, _, _>(
        listener,
        None,
        ctx.clone(),
        router::handle,
        keepalive,
        shutdown.clone(),
    ));
    tokio::spawn(http::serve::<_, (), _, _>(admin, None, ctx.clone(), router::admin, keepalive, shutdown));
    Operator { https, admin: admin_port, ctx, namespaces, _shutdown: shutdown_tx }
}

/// (status, body) of a request, sent from a blocking thread.
async fn send(port: u16, method: &'static str, path: &'static str, body: Vec<u8>) -> (u16, Vec<u8>) {
    tokio::task::spawn_blocking(move || {
        let (status, _, body) = request(port, method, path, &[("Content-Type", "application/json")], &body);
        (status, body)
    })
    .await
    .expect("request thread")
}

fn review(namespace: &str, pod: &Value) -> Vec<u8> {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "6d7a1c1e-0000-4000-8000-000000000001",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE", "namespace": namespace,
            "userInfo": {"username": "alice"}, "object": pod, "dryRun": false,
        },
    })
    .to_string()
    .into_bytes()
}

fn namespace(name: &str, labels: &Value) -> Namespace {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).expect("namespace")
}

async fn metrics(op: &Operator) -> String {
    let (status, body) = send(op.admin, "GET", "/metrics", Vec::new()).await;
    assert_eq!(status, 200);
    String::from_utf8(body).expect("text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_injection_fixture_gets_its_answer_through_the_webhook() {
    let mut op = operator().await;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject");
    let mut files: Vec<_> = std::fs::read_dir(&dir).expect("fixtures").map(|e| e.expect("entry").path()).collect();
    files.sort();
    let (mut injected, mut refused) = (0, 0);
    for (i, file) in files.iter().filter(|f| f.extension().is_some_and(|e| e == "json")).enumerate() {
        let name = file.display().to_string();
        let case: Value = serde_json::from_str(&std::fs::read_to_string(file).expect("read")).expect("JSON");
        let ns = format!("ns-{i}");
        op.namespaces.apply_watcher_event(&watcher::Event::Apply(namespace(&ns, &case["namespaceLabels"])));
        let path = "/inject";
        let (status, body) = send(op.https, "POST", path, review(&ns, &case["pod"])).await;
        assert_eq!(status, 200, "{name}: {}", String::from_utf8_lossy(&body));
        let answer: Value = serde_json::from_slice(&body).expect("an AdmissionReview");
        let response = &answer["response"];
        assert_eq!(response["uid"], "6d7a1c1e-0000-4000-8000-000000000001", "{name}");
        if case["patch"].is_array() {
            injected += 1;
            assert_eq!(response["allowed"], true, "{name}");
            // kube serialises the patch bytes as an array of numbers (Go's decoder takes
            // both that and base64).
            let patch: Vec<u8> = match &response["patch"] {
                Value::String(b64) => base64::engine::general_purpose::STANDARD.decode(b64).expect("base64"),
                bytes => {
                    serde_json::from_value(bytes.clone()).unwrap_or_else(|_| panic!("{name}: no patch in {answer}"))
                }
            };
            let patch: Value = serde_json::from_slice(&patch).expect("JSON patch");
            assert_eq!(patch, case["patch"], "{name}: the webhook sends the pure function's patch");
        } else if case["refused"] == true {
            refused += 1;
            assert_eq!(response["allowed"], false, "{name}");
            assert_eq!(response["status"]["code"], 403, "{name}");
            assert!(response["status"]["message"].as_str().is_some_and(|m| m.contains(':')), "{name}: says why");
        } else {
            assert_eq!(response["allowed"], true, "{name}");
            assert!(response.get("patch").is_none_or(Value::is_null), "{name}: admitted unchanged");
        }
    }
    assert!(injected >= 2 && refused >= 8, "{injected} injected, {refused} refused");
    let page = metrics(&op).await;
    assert_eq!(sample(&page, "toolgate_operator_webhook_requests_total{result=\"injected\"}"), f64::from(injected));
    assert!(op.ctx.admission.metrics.encode().contains("toolgate_operator_webhook_duration_seconds_count"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_whose_namespace_cannot_be_read_is_refused() {
    let op = operator().await;
    let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app", "image": "x",
        "ports": [{"containerPort": 8080}]}]}});
    // Not in the cache, and the API server cannot be reached: fail closed.
    let (status, body) = send(op.https, "POST", "/inject", review("unknown", &pod)).await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).expect("an AdmissionReview");
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    let message = answer["response"]["status"]["message"].as_str().expect("a message");
    assert!(message.contains("cannot read namespace unknown"), "{message}");
    assert_eq!(sample(&metrics(&op).await, "toolgate_operator_webhook_requests_total{result=\"error\"}"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_refuse_what_they_do_not_serve_and_sidecar_endpoints_need_a_token() {
    let op = operator().await;
    assert_eq!(send(op.https, "GET", "/inject", Vec::new()).await.0, 405);
    assert_eq!(send(op.https, "GET", "/v1/ack", Vec::new()).await.0, 405);
    assert_eq!(send(op.https, "GET", "/nowhere", Vec::new()).await.0, 404);
    assert_eq!(send(op.https, "POST", "/inject", b"{".to_vec()).await.0, 400);
    for (method, path) in [("GET", "/v1/stream"), ("POST", "/v1/ack"), ("POST", "/v1/approvals/p-x1/close")] {
        let (status, body) = send(op.https, method, path, b"{}".to_vec()).await;
        assert_eq!(status, 401, "{path}: {}", String::from_utf8_lossy(&body));
    }
    let page = metrics(&op).await;
    assert_eq!(sample(&page, "toolgate_operator_stream_requests_total{result=\"unauthenticated\"}"), 3.0);
    assert_eq!(send(op.admin, "GET", "/healthz", Vec::new()).await.0, 200);
    assert_eq!(send(op.admin, "GET", "/readyz", Vec::new()).await.0, 503);
    op.ctx.ready.store(true, Ordering::Relaxed);
    assert_eq!(send(op.admin, "GET", "/readyz", Vec::new()).await.0, 200);
}
