//! A real `toolgate-operator` process against the test apiserver, its webhook
//! configuration, and a policy-stream client that speaks to it like a sidecar does.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use toolgate_policy::push::{Ack, Message};
use toolgate_tests::{Supervised, TestCluster, eventually, free_port};

pub const TIMEOUT: Duration = Duration::from_secs(90);

/// A running operator; its own namespace holds the Secret and the Lease.
pub struct Operator {
    pub proc: Option<Supervised>,
    pub port: u16,
    pub admin: u16,
    pub namespace: String,
    pub webhook: String,
    pub log: PathBuf,
    args: Vec<String>,
}

impl Operator {
    /// Starts the operator with the admin kubeconfig; the webhook configuration named
    /// `toolgate-<namespace>` sends pods of `app_namespace` to it.
    pub async fn start(cluster: &TestCluster, namespace: &str, app_namespace: &str, extra: &[&str]) -> Operator {
        Self::start_as(cluster, "operator-a", namespace, app_namespace, extra).await
    }

    /// [`Operator::start`] with a replica name (leader-election identity).
    pub async fn start_as(
        cluster: &TestCluster,
        identity: &str,
        namespace: &str,
        app_namespace: &str,
        extra: &[&str],
    ) -> Operator {
        let port = free_port().unwrap();
        let admin = free_port().unwrap();
        let webhook = format!("toolgate-{namespace}");
        let mut args: Vec<String> = vec![
            format!("--listen=127.0.0.1:{port}"),
            format!("--admin-listen=127.0.0.1:{admin}"),
            format!("--namespace={namespace}"),
            format!("--pod-name={identity}"),
            "--extra-san=127.0.0.1".into(),
            format!("--webhook-config={webhook}"),
            "--sidecar-image=toolgate-proxy:test".into(),
            "--heartbeat-seconds=1".into(),
            "--lease-seconds=4".into(),
        ];
        // Several operators share the test apiserver: each governs only its test's namespace.
        args.push(format!("--namespace-selector=toolgate.dev/test-operator={namespace}"));
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(cluster.client());
        let label = json!({"metadata": {"labels": {"toolgate.dev/test-operator": namespace}}});
        namespaces
            .patch(app_namespace, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&label))
            .await
            .expect("label the app namespace");
        // Replicas of one deployment share one URL (a Service); a single operator is
        // reached directly.
        if !extra.iter().any(|e| e.starts_with("--sidecar-operator-url=")) {
            args.push(format!("--sidecar-operator-url=https://127.0.0.1:{port}"));
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        create_webhook_config(cluster, &webhook, port, app_namespace, namespace).await;
        let log = cluster.work_dir().join(format!("operator-{namespace}-{identity}.log"));
        let mut op = Operator { proc: None, port, admin, namespace: namespace.into(), webhook, log, args };
        op.restart(cluster).await;
        op
    }

    /// Starts the process again (after [`Operator::kill`]) with the same flags.
    pub async fn restart(&mut self, cluster: &TestCluster) {
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_toolgate-operator"));
        let script = format!(
            "KUBECONFIG={} TOOLGATE_LOG=info,toolgate_operator=debug exec {} {}",
            cluster.kubeconfig_path().display(),
            bin.display(),
            self.args.join(" ")
        );
        let proc = Supervised::spawn("toolgate-operator", "/bin/sh".as_ref(), &["-c".into(), script], &self.log, None)
            .expect("spawn the operator");
        self.proc = Some(proc);
        let admin = self.admin;
        let log = self.log.clone();
        eventually("the operator to be ready", TIMEOUT, || {
            let log = log.clone();
            async move {
                let (status, _, _) = toolgate_tests::mcp::http(admin, "GET", "/readyz", &[], b"");
                if status == 0 {
                    // Still starting, or dead: show why if it died.
                    let tail = toolgate_tests::log_tail(&log, 20);
                    assert!(!tail.contains("toolgate-operator: "), "operator exited:\n{tail}");
                }
                (status == 200).then_some(())
            }
        })
        .await;
    }

    /// Waits until `n` sidecars hold a policy stream to this process (e.g. after a restart,
    /// once they have reconnected on their own).
    pub async fn wait_for_sidecars(&self, n: f64) {
        eventually(&format!("{n} sidecar(s) connected"), TIMEOUT, || {
            let m = self.metrics();
            async move { (toolgate_tests::mcp::sample(&m, "toolgate_operator_sidecars_connected") == n).then_some(()) }
        })
        .await;
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(5));
        }
    }

    pub fn metrics(&self) -> String {
        String::from_utf8(toolgate_tests::mcp::http(self.admin, "GET", "/metrics", &[], b"").2).unwrap()
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The approvals webhook serves every namespace labelled for this operator
/// (`toolgate.dev/test-operator=<operator namespace>`), as the chart's serves all.
async fn create_webhook_config(cluster: &TestCluster, name: &str, port: u16, app_namespace: &str, op_ns: &str) {
    let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "inject.toolgate.dev",
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/inject")},
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 5,
            "reinvocationPolicy": "IfNeeded",
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": app_namespace}},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
        }, {
            "name": "approvals.toolgate.dev",
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/approval")},
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 5,
            "namespaceSelector": {"matchLabels": {"toolgate.dev/test-operator": op_ns}},
            "rules": [{"apiGroups": ["toolgate.dev"], "apiVersions": ["v1alpha1"], "operations": ["UPDATE"],
                "resources": ["mcpapprovals/status"]},
                {"apiGroups": ["toolgate.dev"], "apiVersions": ["v1alpha1"], "operations": ["CREATE"],
                "resources": ["mcpapprovals"]}],
        }],
    }))
    .unwrap();
    let api: Api<MutatingWebhookConfiguration> = Api::all(cluster.client());
    let _ = api.delete(name, &Default::default()).await;
    api.create(&PostParams::default(), &config).await.expect("create the webhook configuration");
}

/// Waits until the operator patched the webhook's caBundle and the apiserver uses it:
/// a pod created in `namespace` comes back injected.
pub async fn wait_for_webhook(cluster: &TestCluster, name: &str) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(cluster.client());
    eventually("the operator to patch the caBundle", TIMEOUT, || {
        let api = api.clone();
        async move {
            let c = api.get(name).await.ok()?;
            c.webhooks?.first()?.client_config.ca_bundle.as_ref().filter(|b| !b.0.is_empty()).map(|_| ())
        }
    })
    .await;
}

/// Reports `ip` as the pod's address through the status subresource, as its kubelet would
/// (there is no kubelet here; the test's sidecars run on the host, hence 127.0.0.1).
pub async fn set_pod_ip(cluster: &TestCluster, pod: &Pod, ip: &str) -> Pod {
    let api: Api<Pod> = Api::namespaced(cluster.client(), pod.metadata.namespace.as_deref().unwrap());
    let status = json!({"status": {"podIP": ip, "podIPs": [{"ip": ip}]}});
    api.patch_status(
        pod.metadata.name.as_deref().unwrap(),
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&status),
    )
    .await
    .expect("report the pod's IP")
}

/// Creates a pod (retrying while the webhook's caBundle propagates) and returns it as
/// admitted, with 127.0.0.1 reported as its IP (see [`set_pod_ip`]).
pub async fn create_pod(cluster: &TestCluster, namespace: &str, name: &str, labels: Value) -> Pod {
    let pod = create_pod_without_ip(cluster, namespace, name, labels).await;
    set_pod_ip(cluster, &pod, "127.0.0.1").await
}

/// [`create_pod`] without reporting an IP.
pub async fn create_pod_without_ip(cluster: &TestCluster, namespace: &str, name: &str, labels: Value) -> Pod {
    cluster.ensure_service_account(namespace, "agent").await;
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "serviceAccountName": "agent",
            "containers": [{"name": "runpod-mcp", "image": "node:22-slim", "ports": [{"containerPort": 3000}]}],
        },
    }))
    .unwrap();
    let api: Api<Pod> = Api::namespaced(cluster.client(), namespace);
    eventually("the pod to be admitted", TIMEOUT, || {
        let (api, pod) = (api.clone(), pod.clone());
        async move {
            match api.create(&PostParams::default(), &pod).await {
                Ok(p) => Some(p),
                Err(kube::Error::Api(e)) if e.code == 409 => api.get(name).await.ok(),
                Err(e) => {
                    eprintln!("pod create: {e}");
                    None
                }
            }
        }
    })
    .await
}

/// The CA bundle the operator published into `namespace`.
pub async fn published_ca(cluster: &TestCluster, namespace: &str) -> String {
    let api: Api<ConfigMap> = Api::namespaced(cluster.client(), namespace);
    eventually("the toolgate-ca ConfigMap", TIMEOUT, || {
        let api = api.clone();
        async move { api.get("toolgate-ca").await.ok()?.data?.get("ca.crt").cloned() }
    })
    .await
}

/// A pod's token for the operator (audience toolgate, bound to the pod).
pub async fn pod_token(cluster: &TestCluster, pod: &Pod) -> String {
    let ns = pod.metadata.namespace.as_deref().unwrap();
    cluster
        .mint_token(
            ns,
            "agent",
            &["toolgate"],
            Some((pod.metadata.name.as_deref().unwrap(), pod.metadata.uid.as_deref().unwrap())),
        )
        .await
}

fn tls_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for der in toolgate_tests::pem_blocks(ca_pem, "CERTIFICATE").unwrap() {
        roots.add(rustls::pki_types::CertificateDer::from(der)).unwrap();
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A sidecar-like client: one h2 connection carrying the stream and the acks.
pub struct StreamClient {
    sender: http2::SendRequest<Full<Bytes>>,
    token: String,
    pub messages: mpsc::UnboundedReceiver<Message>,
    /// Approval updates seen while waiting for something else.
    pub approvals: Vec<toolgate_policy::push::ApprovalUpdate>,
}

/// Opens `/v1/stream`; `Err((status, body))` when refused.
pub async fn open_stream(port: u16, ca_pem: &str, token: &str) -> Result<StreamClient, (u16, String)> {
    open_stream_as(port, ca_pem, token, "instance-1").await
}

/// [`open_stream`] as a given sidecar instance (`toolgate-instance` header).
pub async fn open_stream_as(
    port: u16,
    ca_pem: &str,
    token: &str,
    instance: &str,
) -> Result<StreamClient, (u16, String)> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls_config(ca_pem));
    let server = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = connector.connect(server, tcp).await.expect("TLS handshake with the operator");
    let (mut sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get("/v1/stream")
        .header("authorization", format!("Bearer {token}"))
        .header("toolgate-instance", instance)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    let status = res.status().as_u16();
    if status != 200 {
        let body = res.into_body().collect().await.unwrap().to_bytes();
        return Err((status, String::from_utf8_lossy(&body).into_owned()));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let mut body = res.into_body();
    tokio::spawn(async move {
        let mut buf = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else { continue };
            buf.extend_from_slice(&data);
            while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                let message: Message = serde_json::from_slice(&line).expect("the operator sends Message lines");
                if tx.send(message).is_err() {
                    return;
                }
            }
        }
    });
    Ok(StreamClient { sender, token: token.into(), messages: rx, approvals: Vec::new() })
}

impl StreamClient {
    /// The next policy set (heartbeats skipped).
    pub async fn next_set(&mut self) -> toolgate_policy::push::PolicySet {
        loop {
            match tokio::time::timeout(TIMEOUT, self.messages.recv()).await.expect("a policy set in time") {
                Some(Message::Policies(set)) => return set,
                Some(Message::Heartbeat { .. }) => {}
                Some(Message::Approval(update)) => self.approvals.push(update),
                None => panic!("the stream ended"),
            }
        }
    }

    /// Whether a heartbeat arrives (skipping sets).
    pub async fn heartbeat(&mut self) -> bool {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.messages.recv()).await {
                Ok(Some(Message::Heartbeat { .. })) => return true,
                Ok(Some(Message::Approval(update))) => self.approvals.push(update),
                Ok(Some(_)) => {}
                _ => return false,
            }
        }
    }

    /// The next approval update (policy sets and heartbeats skipped).
    pub async fn next_approval(&mut self) -> toolgate_policy::push::ApprovalUpdate {
        if !self.approvals.is_empty() {
            return self.approvals.remove(0);
        }
        loop {
            match tokio::time::timeout(TIMEOUT, self.messages.recv()).await.expect("an approval update in time") {
                Some(Message::Approval(update)) => return update,
                Some(_) => {}
                None => panic!("the stream ended"),
            }
        }
    }

    /// POSTs JSON on the stream's connection; (status, body).
    pub async fn post(&mut self, path: &str, body: &Value) -> (u16, Value) {
        let req = Request::post(path)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let res = self.sender.send_request(req).await.unwrap();
        let status = res.status().as_u16();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// Acks a revision on the stream's connection; the HTTP status.
    pub async fn ack(&mut self, revision: &str) -> u16 {
        let body = serde_json::to_vec(&Ack { revision: revision.into(), error: None }).unwrap();
        let req = Request::post("/v1/ack")
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        self.sender.send_request(req).await.unwrap().status().as_u16()
    }
}

#[allow(unused_imports)]
pub use toolgate_tests::sidecar::Sidecar;

/// The DER of the certificate the operator presents now.
pub async fn served_certificate(port: u16, ca_pem: &str) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls_config(ca_pem));
    let server = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = connector.connect(server, tcp).await.expect("TLS handshake with the operator");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// The usual start: CRDs, a namespace for the operator and one for the app, and a running
/// operator whose webhook serves the app namespace (caBundle patched).
pub async fn setup(extra: &[&str]) -> (&'static TestCluster, String, String, Operator) {
    let cluster = TestCluster::shared();
    cluster.install_toolgate_crds().await;
    let op_ns = cluster.create_namespace().await;
    let app = cluster.create_namespace().await;
    let operator = Operator::start(cluster, &op_ns, &app, extra).await;
    wait_for_webhook(cluster, &operator.webhook).await;
    (cluster, op_ns, app, operator)
}

/// An injected pod of `app`, the CA bundle published there and a token for the pod.
pub async fn injected_pod(cluster: &TestCluster, app: &str, name: &str, labels: Value) -> (Pod, String, String) {
    let pod = create_pod(cluster, app, name, labels).await;
    let ca = published_ca(cluster, app).await;
    let token = pod_token(cluster, &pod).await;
    (pod, ca, token)
}

/// Deletes the test's namespaces.
pub async fn teardown(cluster: &TestCluster, op_ns: &str, app: &str) {
    cluster.delete_namespace(app).await;
    cluster.delete_namespace(op_ns).await;
}

/// Namespace of the people of the tests (approvers, editors): service accounts here stand
/// for users, since the test apiserver has no other authenticator. Not a workload
/// namespace, so its accounts are not those of a pod's namespace.
pub const PEOPLE: &str = "toolgate-test-people";

/// Renders one template of the chart (`helm template`, release `toolgate`) with `sets` and
/// applies it (server-side, so concurrent tests may apply the same objects).
pub async fn apply_chart_template(cluster: &TestCluster, template: &str, sets: &[&str]) {
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/toolgate");
    let mut cmd = cluster.helm();
    cmd.args(["template", "toolgate"]).arg(&chart).args([
        "--namespace",
        "toolgate-system",
        "--kube-version",
        "1.34.4",
        "--show-only",
        template,
    ]);
    for set in sets {
        cmd.args(["--set", set]);
    }
    let manifest = toolgate_tests::run_ok(&mut cmd).await;
    let path = cluster.work_dir().join(format!("chart-{}.yaml", template.replace('/', "-")));
    std::fs::write(&path, &manifest).unwrap();
    toolgate_tests::run_ok(
        cluster
            .kubectl()
            .args(["apply", "--server-side", "--force-conflicts", "--field-manager=toolgate-tests", "-f"])
            .arg(&path),
    )
    .await;
}

/// The namespace [`PEOPLE`], created once.
pub async fn people_namespace(cluster: &TestCluster) {
    let ns: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(json!({"metadata": {"name": PEOPLE}})).unwrap();
    match Api::all(cluster.client()).create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("creating namespace {PEOPLE}: {e}"),
    }
}

/// An RBAC-limited person: service account `name` of [`PEOPLE`], bound in `ns` to the
/// chart's `toolgate-approver` ClusterRole. Returns its token.
pub async fn approver(cluster: &TestCluster, ns: &str, name: &str) -> String {
    apply_chart_template(cluster, "templates/rbac.yaml", &["rbac.create=false"]).await;
    person(cluster, ns, name, "toolgate-approver").await
}

/// Fills in the rules of the built-in aggregated ClusterRoles (`edit`, `view`, `admin`)
/// from the roles labelled to aggregate into them, as kube-controller-manager's
/// clusterrole-aggregation controller does (the test cluster runs no controller manager).
pub async fn aggregate_builtin_roles(cluster: &TestCluster) {
    use k8s_openapi::api::rbac::v1::ClusterRole;
    let api: Api<ClusterRole> = Api::all(cluster.client());
    for role in ["view", "edit", "admin"] {
        let parts = api
            .list(
                &kube::api::ListParams::default()
                    .labels(&format!("rbac.authorization.k8s.io/aggregate-to-{role}=true")),
            )
            .await
            .unwrap();
        let rules: Vec<_> = parts.items.into_iter().flat_map(|r| r.rules.unwrap_or_default()).collect();
        let patch = json!({"rules": rules});
        api.patch(role, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await.unwrap();
    }
}

/// Service account `name` of [`PEOPLE`] bound in `ns` to the ClusterRole `role`; its token.
pub async fn person(cluster: &TestCluster, ns: &str, name: &str, role: &str) -> String {
    people_namespace(cluster).await;
    if ["view", "edit", "admin"].contains(&role) {
        aggregate_builtin_roles(cluster).await;
    }
    cluster.ensure_service_account(PEOPLE, name).await;
    bind(cluster, ns, role, json!({"kind": "ServiceAccount", "name": name, "namespace": PEOPLE})).await;
    cluster.mint_token(PEOPLE, name, &[], None).await
}

/// A RoleBinding in `ns` of the ClusterRole `role` to `subject`.
pub async fn bind(cluster: &TestCluster, ns: &str, role: &str, subject: Value) {
    use k8s_openapi::api::rbac::v1::RoleBinding;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("{role}-{}-{}", subject["namespace"].as_str().unwrap_or(""), subject["name"].as_str().unwrap())},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [subject],
    }))
    .unwrap();
    match Api::<RoleBinding>::namespaced(cluster.client(), ns).create(&PostParams::default(), &binding).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("binding {role} in {ns}: {e}"),
    }
}

/// `kubectl` authenticated with `token` (and any further arguments); (success, stdout +
/// stderr).
pub async fn kubectl_as(cluster: &TestCluster, token: &str, args: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, cluster.kubeconfig_for_token(token)).unwrap();
    let out = toolgate_tests::run_output(
        toolgate_tests::command(toolgate_tests::Tool::Kubectl)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--cache-dir"])
            .arg(dir.path().join("cache"))
            .args(args),
    )
    .await;
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}
