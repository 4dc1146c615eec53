//! Tests of the real-cluster test harness itself: the apiserver, kubectl, helm and
//! Prometheus that every other end-to-end test relies on.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{Value, json};
use toolgate_tests::{
    Prometheus, SERVICE_ACCOUNT_ISSUER, TOOLGATE_AUDIENCE, TestCluster, eventually, response, run_ok, run_output,
    serve_http, serve_https,
};

/// Generous: the machine running the tests may be busy with other builds.
const TIMEOUT: Duration = Duration::from_secs(90);

fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("valid object JSON")
}

fn write_file(cluster: &TestCluster, name: &str, contents: &str) -> PathBuf {
    let path = cluster.work_dir().join(name);
    std::fs::write(&path, contents).expect("writing a manifest");
    path
}

fn is_forbidden<T: std::fmt::Debug>(result: &Result<T, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(e)) if e.code == 403)
}

#[tokio::test]
async fn kubectl_applies_a_crd_and_a_custom_object() {
    let cluster = TestCluster::shared();
    cluster
        .kubectl_apply(
            None,
            r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.harness.toolgate.dev
spec:
  group: harness.toolgate.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              color: {type: string}
              size: {type: integer, minimum: 1}
"#,
        )
        .await;
    run_ok(cluster.kubectl().args([
        "wait",
        "--for=condition=Established",
        "--timeout=90s",
        "crd/widgets.harness.toolgate.dev",
    ]))
    .await;

    cluster
        .with_temp_namespace(|ns| async move {
            let widget = write_file(
                cluster,
                &format!("widget-{ns}.yaml"),
                &format!(
                    "apiVersion: harness.toolgate.dev/v1\nkind: Widget\nmetadata:\n  name: blue\n  namespace: {ns}\nspec:\n  color: blue\n  size: 3\n"
                ),
            );
            // The discovery of a just-established CRD can lag a little behind in kubectl.
            eventually("kubectl to create the Widget", TIMEOUT, || async {
                let out = run_output(cluster.kubectl().arg("apply").arg("-f").arg(&widget)).await;
                out.status.success().then_some(())
            })
            .await;

            let color = run_ok(cluster.kubectl().args([
                "get", "widget", "blue", "-n", &ns, "-o", "jsonpath={.spec.color}",
            ]))
            .await;
            assert_eq!(color, "blue");

            let resource = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("harness.toolgate.dev", "v1", "Widget"),
                "widgets",
            );
            let widgets: Api<DynamicObject> =
                Api::namespaced_with(cluster.client(), &ns, &resource);
            let read = widgets.get("blue").await.expect("reading the Widget");
            assert_eq!(read.data["spec"]["size"], json!(3));

            // The CRD's schema is enforced by the apiserver.
            let bad = write_file(
                cluster,
                &format!("bad-widget-{ns}.yaml"),
                &format!(
                    "apiVersion: harness.toolgate.dev/v1\nkind: Widget\nmetadata:\n  name: bad\n  namespace: {ns}\nspec:\n  size: 0\n"
                ),
            );
            let out = run_output(cluster.kubectl().arg("apply").arg("-f").arg(&bad)).await;
            assert!(!out.status.success(), "a Widget with size 0 was accepted");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("spec.size"), "unexpected error: {stderr}");
        })
        .await;
}

#[tokio::test]
async fn pods_are_api_objects() {
    let cluster = TestCluster::shared();
    cluster
        .with_temp_namespace(|ns| async move {
            let pods: Api<Pod> = Api::namespaced(cluster.client(), &ns);
            let pod: Pod = from_json(json!({
                "metadata": {"name": "api-only", "labels": {"app": "harness"}},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]}
            }));
            pods.create(&PostParams::default(), &pod).await.expect("creating a pod");

            let read = pods.get("api-only").await.expect("reading the pod");
            let spec = read.spec.expect("spec");
            assert_eq!(spec.containers[0].image.as_deref(), Some("registry.invalid/app:1"));
            assert_eq!(spec.node_name, None, "nothing schedules pods here");
            assert_eq!(read.status.and_then(|s| s.phase).as_deref(), Some("Pending"));
            // The ServiceAccount admission plugin ran: default account, projected token.
            assert_eq!(spec.service_account_name.as_deref(), Some("default"));
            assert!(
                spec.volumes.unwrap_or_default().iter().any(|v| v.name.starts_with("kube-api-access-")),
                "no projected service account token volume"
            );

            let listed = pods.list(&Default::default()).await.expect("listing pods");
            assert_eq!(listed.items.len(), 1);
        })
        .await;
}

#[tokio::test]
async fn mutating_webhook_on_loopback_is_called_for_pod_creation() {
    let cluster = TestCluster::shared();
    let ca = cluster.test_ca();
    let tls =
        ca.server_cert(&["127.0.0.1"]).expect("serving certificate").rustls_server_config().expect("rustls config");
    let reviews: Arc<Mutex<Vec<Value>>> = Arc::default();
    let seen = reviews.clone();
    let webhook = serve_https(tls, move |request| {
        let seen = seen.clone();
        async move {
            let review: Value = serde_json::from_slice(request.body()).expect("AdmissionReview");
            let uid = review["request"]["uid"].clone();
            seen.lock().expect("lock").push(review);
            let patch = json!([{
                "op": "add",
                "path": "/metadata/labels/toolgate.dev~1mutated",
                "value": "true"
            }]);
            let patch = base64::engine::general_purpose::STANDARD.encode(patch.to_string());
            response(
                "application/json",
                json!({
                    "apiVersion": "admission.k8s.io/v1",
                    "kind": "AdmissionReview",
                    "response": {"uid": uid, "allowed": true, "patchType": "JSONPatch", "patch": patch}
                })
                .to_string(),
            )
        }
    })
    .await;

    cluster
        .with_temp_namespace(|ns| async move {
            let client = cluster.client();
            let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
            let name = format!("harness-{ns}");
            let config: MutatingWebhookConfiguration = from_json(json!({
                "metadata": {"name": name},
                "webhooks": [{
                    "name": "mutate.harness.toolgate.dev",
                    "clientConfig": {"url": format!("{}/mutate", webhook.url()), "caBundle": ca.ca_bundle()},
                    "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
                    // Only this test's namespace.
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                    "failurePolicy": "Fail",
                    "timeoutSeconds": 10
                }]
            }));
            configs
                .create(&PostParams::default(), &config)
                .await
                .expect("creating the MutatingWebhookConfiguration");

            let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
            let attempt = AtomicUsize::new(0);
            // The apiserver picks up new webhook configurations asynchronously.
            let mutated = eventually("the webhook to label a new pod", TIMEOUT, || async {
                let name = format!("probe-{}", attempt.fetch_add(1, Ordering::Relaxed));
                let pod: Pod = from_json(json!({
                    "metadata": {"name": name, "labels": {"app": "harness"}},
                    "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]}
                }));
                let created = pods.create(&PostParams::default(), &pod).await.expect("creating a pod");
                let labels = created.metadata.labels.clone().unwrap_or_default();
                if labels.get("toolgate.dev/mutated").map(String::as_str) == Some("true") {
                    Some(name)
                } else {
                    None
                }
            })
            .await;
            // The mutation is stored, not only returned.
            let stored = pods.get(&mutated).await.expect("reading the pod");
            assert_eq!(
                stored.metadata.labels.unwrap_or_default().get("toolgate.dev/mutated").map(String::as_str),
                Some("true")
            );

            let reviews = reviews.lock().expect("lock").clone();
            let last = reviews.last().expect("the webhook was called");
            assert_eq!(last["request"]["kind"]["kind"], "Pod");
            assert_eq!(last["request"]["namespace"], json!(ns));
            assert_eq!(last["request"]["operation"], "CREATE");
            assert_eq!(last["request"]["object"]["metadata"]["name"], json!(mutated));

            configs
                .delete(&name, &DeleteParams::default())
                .await
                .expect("deleting the MutatingWebhookConfiguration");
        })
        .await;
}

#[tokio::test]
async fn pod_bound_token_is_reviewed_with_the_pod_name() {
    let cluster = TestCluster::shared();
    cluster
        .with_temp_namespace(|ns| async move {
            cluster.ensure_service_account(&ns, "agent").await;
            let pods: Api<Pod> = Api::namespaced(cluster.client(), &ns);
            let pod: Pod = from_json(json!({
                "metadata": {"name": "mcp-server"},
                "spec": {
                    "serviceAccountName": "agent",
                    "containers": [{"name": "app", "image": "registry.invalid/app:1"}]
                }
            }));
            let pod = pods.create(&PostParams::default(), &pod).await.expect("creating the pod");
            let uid = pod.metadata.uid.expect("pod uid");

            let token = cluster.mint_token(&ns, "agent", &[TOOLGATE_AUDIENCE], Some(("mcp-server", &uid))).await;
            let status = cluster.review_token(&token, &[TOOLGATE_AUDIENCE]).await;
            assert_eq!(status.authenticated, Some(true), "{status:?}");
            assert_eq!(status.audiences, Some(vec![TOOLGATE_AUDIENCE.to_owned()]));
            let user = status.user.expect("user info");
            assert_eq!(user.username.as_deref(), Some(format!("system:serviceaccount:{ns}:agent").as_str()));
            let extra = user.extra.expect("extra");
            assert_eq!(extra["authentication.kubernetes.io/pod-name"], vec!["mcp-server".to_owned()]);
            assert_eq!(extra["authentication.kubernetes.io/pod-uid"], vec![uid.clone()]);

            // The audience is checked ...
            let status = cluster.review_token(&token, &[SERVICE_ACCOUNT_ISSUER]).await;
            assert_ne!(status.authenticated, Some(true), "wrong audience accepted: {status:?}");

            // ... and so is the binding: once the pod is gone, the token is not valid.
            pods.delete("mcp-server", &DeleteParams::default()).await.expect("deleting the pod");
            eventually("the token of a deleted pod to be rejected", TIMEOUT, || async {
                let status = cluster.review_token(&token, &[TOOLGATE_AUDIENCE]).await;
                (status.authenticated != Some(true)).then_some(())
            })
            .await;
        })
        .await;
}

#[tokio::test]
async fn client_as_has_only_what_rbac_grants() {
    let cluster = TestCluster::shared();
    cluster
        .with_temp_namespace(|ns| async move {
            let reader = cluster.client_as(&ns, "reader").await;
            let configmaps: Api<ConfigMap> = Api::namespaced(reader.clone(), &ns);
            let secrets: Api<Secret> = Api::namespaced(reader, &ns);
            let denied = configmaps.list(&Default::default()).await;
            assert!(is_forbidden(&denied), "expected 403, got {denied:?}");

            let admin = cluster.client();
            let role: Role = from_json(json!({
                "metadata": {"name": "configmap-reader"},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]
            }));
            Api::<Role>::namespaced(admin.clone(), &ns)
                .create(&PostParams::default(), &role)
                .await
                .expect("creating the Role");
            let binding: RoleBinding = from_json(json!({
                "metadata": {"name": "reader"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "configmap-reader"},
                "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}]
            }));
            Api::<RoleBinding>::namespaced(admin, &ns)
                .create(&PostParams::default(), &binding)
                .await
                .expect("creating the RoleBinding");

            eventually("RBAC to let the reader list configmaps", TIMEOUT, || async {
                configmaps.list(&Default::default()).await.ok()
            })
            .await;
            let still_denied = secrets.list(&Default::default()).await;
            assert!(is_forbidden(&still_denied), "expected 403, got {still_denied:?}");
        })
        .await;
}

#[tokio::test]
async fn helm_templates_and_installs_the_trivial_chart() {
    let cluster = TestCluster::shared();
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/trivial-chart");
    cluster
        .with_temp_namespace(|ns| async move {
            let rendered = run_ok(cluster.helm().args(["template", "demo"]).arg(&chart).args([
                "--namespace",
                &ns,
                "--set",
                "message=templated",
            ]))
            .await;
            assert!(rendered.contains("name: demo-trivial"), "{rendered}");
            assert!(rendered.contains("message: \"templated\""), "{rendered}");

            run_ok(cluster.helm().args(["install", "demo"]).arg(&chart).args([
                "--namespace",
                &ns,
                "--set",
                "message=installed",
            ]))
            .await;
            let configmaps: Api<ConfigMap> = Api::namespaced(cluster.client(), &ns);
            let data = configmaps.get("demo-trivial").await.expect("the chart's ConfigMap").data.unwrap_or_default();
            assert_eq!(data["message"], "installed");
            // helm asked the test apiserver for its version.
            assert!(data["kubeVersion"].starts_with("v1.34."), "{data:?}");

            let releases = run_ok(cluster.helm().args(["list", "--namespace", &ns, "-o", "json"])).await;
            let releases: Value = serde_json::from_str(&releases).expect("helm list JSON");
            assert_eq!(releases[0]["name"], "demo");
            assert_eq!(releases[0]["status"], "deployed");
        })
        .await;
}

#[tokio::test]
async fn prometheus_scrapes_a_loopback_target() {
    let target = serve_http(|request| async move {
        let body = if request.uri().path() == "/metrics" {
            "# HELP toolgate_harness_probe A constant for the harness test.\n# TYPE toolgate_harness_probe gauge\ntoolgate_harness_probe{source=\"harness\"} 42\n"
        } else {
            "not here\n"
        };
        response("text/plain; version=0.0.4", body)
    })
    .await;
    let prometheus = Prometheus::scraping(&[target.addr()]).await;
    let samples = prometheus.wait_for_samples("toolgate_harness_probe", TIMEOUT).await;
    assert_eq!(samples.len(), 1, "{samples:?}");
    assert_eq!(samples[0]["metric"]["source"], "harness");
    assert_eq!(samples[0]["metric"]["job"], "test");
    assert_eq!(samples[0]["metric"]["instance"], json!(target.addr().to_string()));
    assert_eq!(samples[0]["value"][1], "42");
    let up = prometheus.query("up{job=\"test\"}").await.expect("query up");
    assert_eq!(up[0]["value"][1], "1", "{up}");
}

/// The servers and their directory go away when the test process dies without running any
/// destructor. The test re-runs itself as a child process that starts a cluster and aborts.
#[tokio::test]
async fn servers_stop_when_the_test_process_dies() {
    const CHILD: &str = "TOOLGATE_HARNESS_ABORT_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let cluster = TestCluster::shared();
        println!("WORKDIR={}", cluster.work_dir().display());
        println!("URL={}", cluster.apiserver_url());
        std::process::abort();
    }
    if std::env::var_os("TOOLGATE_TEST_KUBECONFIG").is_some_and(|v| !v.is_empty()) {
        return; // Nothing is started locally with TOOLGATE_TEST_KUBECONFIG.
    }
    let exe = std::env::current_exe().expect("test binary");
    let out = run_output(
        tokio::process::Command::new(exe)
            .args(["--exact", "servers_stop_when_the_test_process_dies", "--nocapture"])
            .env(CHILD, "1"),
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "the child did not abort: {stdout}");
    let field = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| {
                panic!("no {key} in the child's output: {stdout}\n{}", String::from_utf8_lossy(&out.stderr))
            })
            .to_owned()
    };
    let work_dir = PathBuf::from(field("WORKDIR="));
    let url = field("URL=");
    let port: u16 = url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    eventually("the aborted child's apiserver and directory to go away", TIMEOUT, || async {
        let listening = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok();
        (!listening && !work_dir.exists()).then_some(())
    })
    .await;
}
