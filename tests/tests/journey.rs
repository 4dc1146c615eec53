//! The user journey of README.md's "5 minutes on a cluster", end to end against the real
//! test apiserver: `helm install` → the operator (the real binary, with exactly the flags,
//! environment and ServiceAccount the chart gives it) → a labelled namespace and the example
//! RunPod workload's pod, injected by the webhook → the real RunPod MCP 4.0.0 server behind
//! a real `toolgate-proxy` started with the injected container's arguments → `kubectl apply`
//! of the seed McpPolicy → enforced calls from the official MCP SDK client → Prometheus,
//! configured like the chart's PodMonitor, sees every decision → policy edit, `helm
//! upgrade`, `helm uninstall`.
//!
//! There is no kubelet, scheduler or controller-manager: the test plays their part and only
//! theirs. It creates the Deployment's pod (a ReplicaSet would), mints the pod's projected
//! token with TokenRequest and reports a pod IP (the kubelet would), and runs the operator
//! and the pod's processes on loopback; ports and mount paths are the only things adapted
//! (see `toolgate_tests::sidecar`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use toolgate_tests::mcp::{
    ExampleServer, Proc, call_step, error_codes, fake_requests, http, run_client, runpod_example, sample,
    start_pod_step,
};
use toolgate_tests::sidecar::{SIDECAR_CONTAINER, Sidecar, sidecar_container};
use toolgate_tests::{
    Prometheus, Supervised, TestCluster, eventually, free_port, install_crypto_provider, log_tail, repo_root, run_ok,
    run_output, yaml_docs,
};

/// Generous: the machine running the tests may be busy with other builds.
const TIMEOUT: Duration = Duration::from_secs(120);
/// The names README.md uses (this test process has a cluster of its own).
const RELEASE: &str = "toolgate";
const RELEASE_NS: &str = "toolgate-system";
const APP_NS: &str = "runpod-mcp";
const MONITORING_NS: &str = "monitoring";
const SEED: &str = "examples/runpod-mcp/policies/seed-4.0.0.mcppolicy.yaml";
const SEED_NAME: &str = "seed-v4";
/// The PromQL query README.md shows.
const DECISIONS_QUERY: &str = r#"sum by (tool, decision) (toolgate_decisions_total{namespace="runpod-mcp"})"#;

fn chart() -> PathBuf {
    repo_root().join("charts/toolgate")
}

fn strings(value: &Value) -> Vec<String> {
    value.as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

fn policies_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("toolgate.dev", "v1alpha1", "McpPolicy"), "mcppolicies")
}

/// Waits until the McpPolicy's status satisfies `check`; returns the object.
async fn policy_status(cluster: &TestCluster, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> DynamicObject {
    let api = Api::<DynamicObject>::namespaced_with(cluster.client(), APP_NS, &policies_resource());
    eventually(what, TIMEOUT, || {
        let api = api.clone();
        let check = &check;
        async move { api.get(name).await.ok().filter(|p| check(&p.data["status"])) }
    })
    .await
}

/// What reached the fake RunPod API, without the server's credential checks
/// (`query { myself { id } }` on /graphql before MCP requests, cached by the server).
fn runpod_calls(fake: &Proc) -> Vec<(String, String, Value)> {
    fake_requests(fake).into_iter().filter(|(_, path, _)| path != "/graphql").collect()
}

/// The operator as the chart's Deployment runs it: its container's arguments and
/// environment, read from the Deployment in the apiserver, with only the listen
/// addresses moved to loopback ports and `--extra-san=127.0.0.1` added (the apiserver and
/// the sidecar reach it at 127.0.0.1; there is no Service network). It authenticates as
/// the Deployment's ServiceAccount with a TokenRequest token, so it has exactly the
/// permissions the chart grants.
struct Operator {
    proc: Option<Supervised>,
    admin: u16,
    log: PathBuf,
}

impl Operator {
    async fn start(cluster: &TestCluster, https: u16, admin: u16, pod_name: &str) -> Operator {
        let deployment = Api::<Deployment>::namespaced(cluster.client(), RELEASE_NS)
            .get(&format!("{RELEASE}-operator"))
            .await
            .expect("the chart's operator Deployment");
        let pod = deployment.spec.unwrap().template.spec.unwrap();
        let service_account = pod.service_account_name.clone().expect("the Deployment names its ServiceAccount");
        let container = pod.containers.iter().find(|c| c.name == "operator").expect("the operator container");
        let mut args: Vec<String> = container
            .args
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|a| match a.split_once('=') {
                Some(("--listen", _)) => format!("--listen=127.0.0.1:{https}"),
                Some(("--admin-listen", _)) => format!("--admin-listen=127.0.0.1:{admin}"),
                _ => a,
            })
            .collect();
        args.push("--extra-san=127.0.0.1".into());
        // The environment the kubelet would give it (downward API), and nothing else.
        let mut env = BTreeMap::new();
        for var in container.env.iter().flatten() {
            let value = match (&var.value, var.value_from.as_ref().and_then(|f| f.field_ref.as_ref())) {
                (Some(v), _) => v.clone(),
                (None, Some(f)) if f.field_path == "metadata.namespace" => RELEASE_NS.to_owned(),
                (None, Some(f)) if f.field_path == "metadata.name" => pod_name.to_owned(),
                _ => panic!("env {} of the operator: not supported by this test", var.name),
            };
            env.insert(var.name.clone(), value);
        }
        assert_eq!(env.get("POD_NAMESPACE").map(String::as_str), Some(RELEASE_NS), "{env:?}");

        // In a pod the ServiceAccount token is mounted; here it is in a kubeconfig.
        let token = cluster.mint_token(RELEASE_NS, &service_account, &[], None).await;
        let kubeconfig = cluster.work_dir().join(format!("operator-{pod_name}.kubeconfig"));
        std::fs::write(&kubeconfig, cluster.kubeconfig_for_token(&token)).unwrap();
        let binary = toolgate_tests::mcp::workspace_binary("toolgate-operator", "toolgate-operator");
        let mut command = vec!["-i".to_owned(), format!("KUBECONFIG={}", kubeconfig.display())];
        command.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
        command.push(binary.display().to_string());
        command.extend(args);
        let log = cluster.work_dir().join(format!("operator-{pod_name}.log"));
        let proc = Supervised::spawn("toolgate-operator", Path::new("/usr/bin/env"), &command, &log, None)
            .expect("spawn the operator");
        let operator = Operator { proc: Some(proc), admin, log };
        eventually("the operator to be ready", TIMEOUT, || async {
            let status = http(admin, "GET", "/readyz", &[], b"").0;
            if status == 0 {
                let tail = log_tail(&operator.log, 30);
                assert!(!tail.contains("toolgate-operator: "), "the operator exited:\n{tail}");
            }
            (status == 200).then_some(())
        })
        .await;
        operator
    }

    fn metrics(&self) -> String {
        String::from_utf8_lossy(&http(self.admin, "GET", "/metrics", &[], b"").2).into_owned()
    }

    /// SIGTERM (the rollout or uninstall stopping the pod), waiting for it to exit.
    fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.stop(Duration::from_secs(15));
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The pod a ReplicaSet of `deployment` would create (without owner references: there is
/// no ReplicaSet object).
fn pod_from_template(deployment: &Deployment, name: &str) -> Pod {
    let template = deployment.spec.as_ref().unwrap().template.clone();
    let mut metadata = template.metadata.unwrap_or_default();
    metadata.name = Some(name.to_owned());
    Pod { metadata, spec: template.spec, status: None }
}

/// Creates the pod, retrying while the webhook configuration's caBundle propagates (the
/// webhook fails closed, so until then the apiserver refuses the pod).
async fn create_pod(cluster: &TestCluster, pod: &Pod) -> Pod {
    let api = Api::<Pod>::namespaced(cluster.client(), APP_NS);
    let name = pod.metadata.name.clone().unwrap();
    eventually("the apiserver to admit the pod through the webhook", TIMEOUT, || {
        let (api, pod, name) = (api.clone(), pod.clone(), name.clone());
        async move {
            match api.create(&PostParams::default(), &pod).await {
                Ok(created) => Some(created),
                Err(kube::Error::Api(e)) if e.code == 409 => api.get(&name).await.ok(),
                Err(e) => {
                    eprintln!("journey: creating pod {name}: {e}");
                    None
                }
            }
        }
    })
    .await
}

/// What Prometheus' Kubernetes service discovery (`role: pod`) reports: one target per
/// container port of every pod that has an IP, with its `__meta_kubernetes_*` labels.
///
/// Debian's Prometheus (the one the tests run) is built without Kubernetes discovery, so
/// the test lists the pods (as Prometheus' ServiceAccount) and hands the result to
/// Prometheus in a `file_sd` file; the PodMonitor's relabeling, which selects among these
/// targets, runs in Prometheus itself.
fn pod_targets(pods: &[Pod]) -> Value {
    let sanitize = |s: &str| -> String { s.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect() };
    let mut groups = Vec::new();
    for pod in pods {
        let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else { continue };
        let spec = pod.spec.as_ref().unwrap();
        let mut common = serde_json::Map::new();
        common.insert("__meta_kubernetes_namespace".into(), json!(pod.metadata.namespace));
        common.insert("__meta_kubernetes_pod_name".into(), json!(pod.metadata.name));
        common.insert("__meta_kubernetes_pod_ip".into(), json!(ip));
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
        common.insert("__meta_kubernetes_pod_phase".into(), json!(phase));
        for (key, value) in pod.metadata.labels.iter().flatten() {
            common.insert(format!("__meta_kubernetes_pod_label_{}", sanitize(key)), json!(value));
            common.insert(format!("__meta_kubernetes_pod_labelpresent_{}", sanitize(key)), json!("true"));
        }
        let containers = spec.containers.iter().map(|c| (c, false));
        let init = spec.init_containers.iter().flatten().map(|c| (c, true));
        for (container, is_init) in containers.chain(init) {
            for port in container.ports.iter().flatten() {
                let mut labels = common.clone();
                labels.insert("__meta_kubernetes_pod_container_name".into(), json!(container.name));
                labels.insert("__meta_kubernetes_pod_container_init".into(), json!(is_init.to_string()));
                labels.insert(
                    "__meta_kubernetes_pod_container_port_name".into(),
                    json!(port.name.clone().unwrap_or_default()),
                );
                labels.insert(
                    "__meta_kubernetes_pod_container_port_number".into(),
                    json!(port.container_port.to_string()),
                );
                groups.push(json!({"targets": [format!("{ip}:{}", port.container_port)], "labels": labels}));
            }
        }
    }
    Value::Array(groups)
}

/// The scrape job the Prometheus Operator generates for the chart's PodMonitor: keep the
/// targets of pods carrying every `selector.matchLabels` label and not finished, and only
/// the container port named like the PodMonitor's `port`; target labels `namespace`,
/// `container`, `pod`, `endpoint`, `job`. Targets come from `targets_file` (see
/// [`pod_targets`]). One addition: the pod's address `127.0.0.1:<admin port>` is rewritten
/// to where this test's sidecar listens (all pods share the host's loopback here).
fn pod_monitor_scrape_config(pod_monitor: &Value, targets_file: &Path, admin_port: i32, sidecar_admin: u16) -> String {
    let namespace = pod_monitor["metadata"]["namespace"].as_str().unwrap();
    let name = pod_monitor["metadata"]["name"].as_str().unwrap();
    let spec = &pod_monitor["spec"];
    assert_eq!(spec["namespaceSelector"], json!({"any": true}), "the test covers the default namespaceSelector");
    let endpoint = &spec["podMetricsEndpoints"][0];
    let port = endpoint["port"].as_str().unwrap();
    let path = endpoint["path"].as_str().unwrap();
    let scheme = endpoint["scheme"].as_str().unwrap();
    let mut relabel = String::new();
    for (key, value) in spec["selector"]["matchLabels"].as_object().unwrap() {
        let label: String = key.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        relabel.push_str(&format!(
            "  - action: keep\n    source_labels: [__meta_kubernetes_pod_label_{label}, __meta_kubernetes_pod_labelpresent_{label}]\n    regex: '({});true'\n",
            value.as_str().unwrap()
        ));
    }
    relabel.push_str(&format!(
        "  - action: drop\n    source_labels: [__meta_kubernetes_pod_phase]\n    regex: '(Failed|Succeeded)'\n\
         \x20 - action: keep\n    source_labels: [__meta_kubernetes_pod_container_port_name]\n    regex: '{port}'\n\
         \x20 - source_labels: [__meta_kubernetes_namespace]\n    target_label: namespace\n\
         \x20 - source_labels: [__meta_kubernetes_pod_container_name]\n    target_label: container\n\
         \x20 - source_labels: [__meta_kubernetes_pod_name]\n    target_label: pod\n\
         \x20 - target_label: job\n    replacement: '{namespace}/{name}'\n\
         \x20 - target_label: endpoint\n    replacement: '{port}'\n\
         \x20 - source_labels: [__address__]\n    regex: '127\\.0\\.0\\.1:{admin_port}'\n    target_label: __address__\n    replacement: '127.0.0.1:{sidecar_admin}'\n"
    ));
    format!(
        "- job_name: 'podMonitor/{namespace}/{name}/0'\n  honor_labels: false\n  metrics_path: '{path}'\n  scheme: {scheme}\n  file_sd_configs:\n  - files: ['{}']\n  relabel_configs:\n{relabel}",
        targets_file.display()
    )
}

/// A client for Prometheus' ServiceAccount, which may list and watch pods (what a
/// Prometheus in the cluster needs for pod discovery).
async fn prometheus_client(cluster: &TestCluster) -> kube::Client {
    cluster
        .kubectl_apply(
            None,
            &format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {MONITORING_NS}}}\n---\n\
                 apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: prometheus, namespace: {MONITORING_NS}}}\n---\n\
                 apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {{name: journey-prometheus}}\n\
                 rules: [{{apiGroups: [''], resources: [pods], verbs: [get, list, watch]}}]\n---\n\
                 apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: journey-prometheus}}\n\
                 roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: journey-prometheus}}\n\
                 subjects: [{{kind: ServiceAccount, name: prometheus, namespace: {MONITORING_NS}}}]\n"
            ),
        )
        .await;
    let token = cluster.mint_token(MONITORING_NS, "prometheus", &[], None).await;
    let client = cluster.client_with_token(&token).await;
    eventually("RBAC to let Prometheus list pods", TIMEOUT, || async {
        Api::<Pod>::all(client.clone()).list(&Default::default()).await.ok()
    })
    .await;
    client
}

/// `(tool, decision) → value` of an instant query's samples.
fn by_tool_and_decision(samples: &Value) -> BTreeMap<(String, String), f64> {
    samples
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let metric = &s["metric"];
            let value: f64 = s["value"][1].as_str().unwrap().parse().unwrap();
            ((metric["tool"].as_str().unwrap().to_owned(), metric["decision"].as_str().unwrap().to_owned()), value)
        })
        .collect()
}

fn decisions(entries: &[(&str, &str, f64)]) -> BTreeMap<(String, String), f64> {
    entries.iter().map(|(t, d, v)| (((*t).to_owned(), (*d).to_owned()), *v)).collect()
}

/// The rows of `kubectl get mcpp` (the header and one line per policy, whitespace-split).
async fn get_mcpp(cluster: &TestCluster) -> (String, Vec<Vec<String>>) {
    let out = run_ok(cluster.kubectl().args(["-n", APP_NS, "get", "mcpp"])).await;
    let rows = out.lines().map(|l| l.split_whitespace().map(str::to_owned).collect()).collect();
    (out, rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_minutes_on_a_cluster() {
    install_crypto_provider();
    let cluster = TestCluster::shared();
    let client = cluster.client();
    let scratch = tempfile::tempdir().unwrap();

    // ---------------------------------------------------------------- 1. helm install
    // The apiserver reaches the out-of-cluster operator at 127.0.0.1 (webhook.url), and so
    // do sidecars (sidecar.operatorUrl); everything else is the chart's default.
    let https = free_port().unwrap();
    let admin = free_port().unwrap();
    let operator_url = format!("https://127.0.0.1:{https}");
    let values = [format!("webhook.url={operator_url}/inject"), format!("sidecar.operatorUrl={operator_url}")];
    let mut install = cluster.helm();
    install.args(["install", RELEASE]).arg(chart()).args(["--namespace", RELEASE_NS, "--create-namespace"]);
    for set in &values {
        install.args(["--set", set]);
    }
    let installed = run_ok(&mut install).await;
    let notes = installed.split("NOTES:").nth(1).expect("helm install prints NOTES");
    assert!(notes.contains("kubectl label namespace <namespace> toolgate.dev/inject=enabled"), "{notes}");
    assert!(notes.contains(&format!("apply -f {SEED}")), "NOTES name the seed for the example workload:\n{notes}");
    // What the release created (the CRD is installed from crds/, outside the manifest).
    let manifest = run_ok(cluster.helm().args(["get", "manifest", RELEASE, "--namespace", RELEASE_NS])).await;
    let release_objects = yaml_docs(&manifest);
    let manifest_path = scratch.path().join("release-manifest.yaml");
    std::fs::write(&manifest_path, &manifest).unwrap();
    let created = run_ok(cluster.kubectl().args(["get", "-o", "name", "-f"]).arg(&manifest_path)).await;
    let created: Vec<&str> = created.lines().collect();
    assert_eq!(created.len(), release_objects.len(), "every object of the release exists: {created:?}");
    // Strict server-side validation of every object as installed (unknown or duplicate
    // fields would fail here, where helm only gets warnings).
    run_ok(
        cluster
            .kubectl()
            .args(["apply", "--server-side", "--force-conflicts", "--dry-run=server", "--validate=strict", "-f"])
            .arg(&manifest_path),
    )
    .await;
    for kind in ["deployment.apps/", "mutatingwebhookconfiguration.", "clusterrole.", "serviceaccount/", "service/"] {
        assert!(created.iter().any(|n| n.starts_with(kind)), "no {kind} in {created:?}");
    }
    run_ok(cluster.kubectl().args([
        "wait",
        "--for=condition=Established",
        "--timeout=120s",
        "crd/mcppolicies.toolgate.dev",
    ]))
    .await;

    // ---------------------------------------------------------------- 2. the operator
    let operator_pod = format!("{RELEASE}-operator-7d9c5b7f4-x2k8q");
    let mut operator = Operator::start(cluster, https, admin, &operator_pod).await;
    let webhooks = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let ca_bundle = eventually("the operator to patch the webhook's caBundle", TIMEOUT, || async {
        let config = webhooks.get(&format!("{RELEASE}-operator")).await.ok()?;
        let hooks = config.webhooks?;
        let bundles: Vec<Vec<u8>> =
            hooks.iter().filter_map(|w| w.client_config.ca_bundle.clone().map(|b| b.0)).collect();
        (bundles.len() == hooks.len() && !bundles[0].is_empty()).then(|| bundles[0].clone())
    })
    .await;
    assert_eq!(sample(&operator.metrics(), "toolgate_operator_leader"), 1.0, "the only replica leads");

    // ---------------------------------------------------------------- 3. labelled namespace, injected pod
    run_ok(cluster.kubectl().args(["apply", "-k"]).arg(repo_root().join("examples/runpod-mcp"))).await;
    // The controller-manager's job: the namespace's default ServiceAccount.
    cluster.ensure_service_account(APP_NS, "default").await;
    let namespace = Api::<Namespace>::all(client.clone()).get(APP_NS).await.unwrap();
    let labels = namespace.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("toolgate.dev/inject").map(String::as_str), Some("enabled"), "{labels:?}");
    assert_eq!(labels.get("pod-security.kubernetes.io/enforce").map(String::as_str), Some("restricted"));
    // README's step for any namespace (the example's is labelled already).
    let out =
        run_ok(cluster.kubectl().args(["label", "namespace", APP_NS, "toolgate.dev/inject=enabled", "--overwrite"]))
            .await;
    assert!(out.contains(&format!("namespace/{APP_NS}")), "{out}");

    let deployment = Api::<Deployment>::namespaced(client.clone(), APP_NS).get("runpod-mcp").await.unwrap();
    let pod_name = "runpod-mcp-6b7f9d8c5d-4xk2p";
    let pod = create_pod(cluster, &pod_from_template(&deployment, pod_name)).await;
    // Admitted under the namespace's "restricted" Pod Security level, with the sidecar.
    let spec = pod.spec.as_ref().unwrap();
    let init: Vec<&str> = spec.init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
    assert_eq!(init, [SIDECAR_CONTAINER, "npm-ci"], "the sidecar comes first, before the example's npm ci");
    let sidecar_spec = sidecar_container(&pod);
    assert_eq!(sidecar_spec.restart_policy.as_deref(), Some("Always"), "a native sidecar");
    assert_eq!(
        sidecar_spec.image.as_deref(),
        Some("ghcr.io/toolgate/toolgate-proxy:0.1.0"),
        "the chart's sidecar image"
    );
    let injected_args = sidecar_spec.args.clone().unwrap_or_default();
    for arg in [
        "--listen=0.0.0.0:15080",
        "--admin-listen=0.0.0.0:15090",
        "--upstream=http://127.0.0.1:3000/mcp",
        &format!("--operator={operator_url}"),
        "--token-file=/var/run/secrets/toolgate/token",
        "--ca-file=/var/run/secrets/toolgate/ca.crt",
        "--state-dir=/var/lib/toolgate",
    ] {
        assert!(injected_args.iter().any(|a| a == arg), "{arg} not in {injected_args:?}");
    }
    let ports: BTreeMap<String, i32> =
        sidecar_spec.ports.iter().flatten().map(|p| (p.name.clone().unwrap_or_default(), p.container_port)).collect();
    assert_eq!(ports, BTreeMap::from([("toolgate-mcp".into(), 15080), ("toolgate-admin".into(), 15090)]));
    let service = run_ok(cluster.kubectl().args(["-n", APP_NS, "get", "service", "runpod-mcp", "-o", "json"])).await;
    let service: Value = serde_json::from_str(&service).unwrap();
    assert_eq!(service["spec"]["ports"][0]["targetPort"], 15080, "the Service targets the sidecar");
    let volumes: BTreeMap<String, Value> =
        spec.volumes.iter().flatten().map(|v| (v.name.clone(), serde_json::to_value(v).unwrap())).collect();
    let token_volume = &volumes["toolgate-token"]["projected"]["sources"];
    let token_source = &token_volume[0]["serviceAccountToken"];
    assert_eq!(token_source["audience"], "toolgate", "{token_volume}");
    assert_eq!(token_volume[1]["configMap"]["name"], format!("{RELEASE}-ca"), "the chart's tls.caConfigMap");
    assert!(volumes["toolgate-state"].get("emptyDir").is_some(), "{volumes:?}");
    let mounts: Vec<(String, String)> =
        sidecar_spec.volume_mounts.iter().flatten().map(|m| (m.name.clone(), m.mount_path.clone())).collect();
    assert!(mounts.contains(&("toolgate-token".into(), "/var/run/secrets/toolgate".into())), "{mounts:?}");
    let pod_labels = pod.metadata.labels.clone().unwrap_or_default();
    assert_eq!(pod_labels.get("toolgate.dev/injected").map(String::as_str), Some("true"));
    assert_eq!(pod_labels.get("app.kubernetes.io/name").map(String::as_str), Some("runpod-mcp"));
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(annotations.get("prometheus.io/port").map(String::as_str), Some("15090"), "{annotations:?}");

    // ---------------------------------------------------------------- 4. the pod's processes
    // The kubelet's part: the pod runs (its IP is loopback here), its projected token is
    // minted for its ServiceAccount with the volume's audience and bound to the pod, and
    // the CA ConfigMap the operator publishes is mounted.
    Api::<Pod>::namespaced(client.clone(), APP_NS)
        .patch_status(
            pod_name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}}),
            ),
        )
        .await
        .expect("reporting the pod running");
    let service_account = spec.service_account_name.clone().unwrap_or_else(|| "default".into());
    let token = cluster
        .mint_token(
            APP_NS,
            &service_account,
            &[token_source["audience"].as_str().unwrap()],
            Some((pod_name, pod.metadata.uid.as_deref().unwrap())),
        )
        .await;
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), APP_NS);
    let ca = eventually("the operator to publish its CA into the namespace", TIMEOUT, || async {
        configmaps.get(&format!("{RELEASE}-ca")).await.ok()?.data?.get("ca.crt").cloned()
    })
    .await;

    let fake = toolgate_tests::mcp::fake_runpod();
    let server: ExampleServer = runpod_example(&fake);
    let upstream_port = annotations["toolgate.dev/upstream-port"].parse::<u16>().unwrap();
    assert_eq!(upstream_port, 3000, "the example server's PORT");
    let sidecar_dir = scratch.path().join("sidecar");
    std::fs::create_dir_all(&sidecar_dir).unwrap();
    let sidecar = Sidecar::start(&pod, server.proc.port, &sidecar_dir, &token, &ca);
    assert!(sidecar.args.contains(&format!("--operator={operator_url}")), "{:?}", sidecar.args);
    assert_eq!(sidecar.env.get("TOOLGATE_POD_NAME").map(String::as_str), Some(pod_name), "{:?}", sidecar.env);
    let agent = sidecar.client("agent-key-1");

    // Connected, but no McpPolicy selects the pod: every call is refused, not ready.
    let out = run_client(agent.clone(), vec![start_pod_step()]).await;
    assert_eq!(error_codes(&out), [Some(-32013)], "{out:?}");
    assert_eq!(sidecar.ready(), 503);

    // ---------------------------------------------------------------- 5. the seed McpPolicy
    let applied = run_ok(cluster.kubectl().args(["-n", APP_NS, "apply", "-f"]).arg(repo_root().join(SEED))).await;
    assert_eq!(applied.trim(), format!("mcppolicy.toolgate.dev/{SEED_NAME} created"));
    let enforced = policy_status(cluster, SEED_NAME, "status.enforcing 1 for generation 1", |s| {
        s["enforcing"] == 1 && s["targets"] == 1 && s["observedGeneration"] == 1
    })
    .await;
    let accepted = enforced.data["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Accepted");
    assert_eq!(accepted.unwrap()["status"], "True", "{}", enforced.data["status"]);
    let (printed, rows) = get_mcpp(cluster).await;
    eprintln!("journey: kubectl -n {APP_NS} get mcpp\n{printed}");
    assert_eq!(
        rows[0],
        ["NAME", "MODE", "ACCEPTED", "READY", "TARGETS", "ENFORCING", "UNPROTECTED", "AGE"],
        "{printed}"
    );
    assert_eq!(rows[1][..7], [SEED_NAME, "enforce", "True", "True", "1", "1", "0"], "{printed}");
    assert_eq!(rows.len(), 2, "{printed}");
    assert_eq!(sidecar.ready(), 200);

    let mut script = vec![json!({"op": "list"})];
    script.extend((0..11).map(|_| start_pod_step()));
    script.push(call_step("delete-pod", json!({"id": "pod-1"})));
    script.push(call_step("pod-action", json!({"id": "pod-1", "body": {"action": "stop"}})));
    let out = run_client(agent.clone(), script).await;
    let listed: Vec<&str> =
        out[0]["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(listed, ["pod-action"], "tools/list shows only what the policy allows");
    let mut want = vec![None; 11];
    want.extend([Some(-32011), Some(-32010), Some(-32010)]);
    assert_eq!(error_codes(&out), want, "{out:#?}");
    for step in &out[1..11] {
        assert_ne!(step["result"]["isError"], true, "RunPod answered: {step}");
    }
    let limited = &out[11]["error"];
    assert_eq!(limited["data"]["decision"], "rate_limited", "{limited}");
    assert!(limited["data"]["retryAfterSeconds"].as_f64().unwrap() > 0.0, "{limited}");
    let denied = &out[12]["error"];
    eprintln!("journey: the denied call: {denied}");
    assert_eq!(denied["kind"], "jsonrpc", "{denied}");
    assert_eq!(denied["data"]["decision"], "deny", "{denied}");
    assert_eq!(denied["data"]["rule"], "default", "{denied}");
    assert!(denied["data"]["policy"].as_str().unwrap().contains(SEED_NAME), "{denied}");
    assert!(denied["data"]["reason"].as_str().unwrap().contains("delete-pod"), "{denied}");
    assert!(
        out[13]["error"]["data"]["reason"].as_str().unwrap().contains("starting pods only"),
        "stop is refused by the seed's require: {}",
        out[13]
    );
    // RunPod saw exactly the ten allowed calls.
    let reached = runpod_calls(&fake);
    assert_eq!(reached.len(), 10, "{reached:#?}");
    for (method, path, body) in &reached {
        assert_eq!((method.as_str(), path.as_str()), ("POST", "/v2/pods/pod-2/action"));
        assert_eq!(body, &json!({"action": "start"}));
    }
    // README's curl: the same refusal, as the HTTP answer a client gets (the proxy answers
    // it; nothing is forwarded).
    let request =
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete-pod","arguments":{"id":"pod-1"}}}"#;
    let (status, _, body) = http(
        sidecar.proc.port,
        "POST",
        "/mcp",
        &[
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
            ("authorization", "Bearer agent-key-1"),
        ],
        request.as_bytes(),
    );
    let body = String::from_utf8(body).unwrap();
    eprintln!("journey: curl delete-pod → {status} {body}");
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    let reason = r#"tool "delete-pod" is not allowed by policy (default: deny)"#;
    assert_eq!(
        answer,
        json!({"jsonrpc": "2.0", "id": 1, "error": {"code": -32010, "message": format!("toolgate: denied: {reason}"),
            "data": {"decision": "deny", "policy": SEED_NAME, "rule": "default", "reason": reason}}})
    );
    assert_eq!(runpod_calls(&fake).len(), 10, "the refused call reached nothing");
    let audit = sidecar.audit();
    let denial = audit.iter().find(|a| a["tool"] == "delete-pod").expect("an audit line for delete-pod");
    assert_eq!(denial["decision"], "deny", "{denial}");
    assert_eq!(denial["pod"], pod_name, "{denial}");

    // ---------------------------------------------------------------- 6. Prometheus
    let pod_monitor = {
        let mut cmd = cluster.helm();
        cmd.args(["template", RELEASE]).arg(chart()).args([
            "--namespace",
            RELEASE_NS,
            "--kube-version",
            "1.34.4",
            "--set",
            "metrics.podMonitor.enabled=true",
        ]);
        for set in &values {
            cmd.args(["--set", set]);
        }
        let docs = yaml_docs(&run_ok(&mut cmd).await);
        docs.into_iter().find(|d| d["kind"] == "PodMonitor").expect("the chart's PodMonitor")
    };
    let discovery = prometheus_client(cluster).await;
    let pods = Api::<Pod>::all(discovery).list(&Default::default()).await.unwrap().items;
    let targets_file = scratch.path().join("pods.json");
    std::fs::write(&targets_file, pod_targets(&pods).to_string()).unwrap();
    let scrape = pod_monitor_scrape_config(&pod_monitor, &targets_file, 15090, sidecar.admin);
    let prometheus = Prometheus::start(&scrape).await;
    let job = format!("{RELEASE_NS}/{RELEASE}-sidecars");
    let expected = decisions(&[
        // The call made before any policy selected the pod (refused, -32013); its tool
        // was not a label value yet: no policy named it and nothing had listed it.
        ("_other", "deny", 1.0),
        ("pod-action", "allow", 10.0),
        ("pod-action", "rate_limited", 1.0),
        ("pod-action", "deny", 1.0),
        ("delete-pod", "deny", 2.0),
    ]);
    let deadline = std::time::Instant::now() + TIMEOUT;
    let samples = loop {
        let samples = prometheus.query(DECISIONS_QUERY).await.unwrap();
        if by_tool_and_decision(&samples) == expected {
            break samples;
        }
        if std::time::Instant::now() > deadline {
            let targets = toolgate_tests::http_get(&format!("{}/api/v1/targets", prometheus.url())).await;
            panic!(
                "Prometheus did not see the decisions {expected:?}: {DECISIONS_QUERY} → {samples}\ntargets: {targets:?}\nscrape config:\n{scrape}"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("journey: {DECISIONS_QUERY} → {samples}");
    let all = prometheus.query("toolgate_decisions_total").await.unwrap();
    eprintln!("journey: toolgate_decisions_total → {all}");
    // One target, the injected pod, with the PodMonitor's target labels.
    let series = prometheus.query(r#"toolgate_decisions_total{tool="delete-pod"}"#).await.unwrap();
    let labels = &series[0]["metric"];
    for (key, value) in [
        ("namespace", APP_NS),
        ("pod", pod_name),
        ("container", SIDECAR_CONTAINER),
        ("endpoint", "toolgate-admin"),
        ("job", job.as_str()),
        ("decision", "deny"),
        ("rule", "default"),
    ] {
        assert_eq!(labels[key], value, "{labels}");
    }
    let up = prometheus.query(&format!(r#"up{{job="{job}"}}"#)).await.unwrap();
    assert_eq!(up.as_array().unwrap().len(), 1, "exactly one sidecar target: {up}");
    assert_eq!(up[0]["value"][1], "1", "{up}");

    // ---------------------------------------------------------------- 7a. edit the policy
    // README's command.
    let patched = run_ok(cluster.kubectl().args([
        "-n",
        APP_NS,
        "patch",
        "mcpp",
        SEED_NAME,
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/tools/pod-action/limits/0/max","value":12}]"#,
    ]))
    .await;
    assert_eq!(patched.trim(), format!("mcppolicy.toolgate.dev/{SEED_NAME} patched"));
    policy_status(cluster, SEED_NAME, "generation 2 enforced", |s| s["enforcing"] == 1 && s["observedGeneration"] == 2)
        .await;
    // A new caller (limits are per grant, i.e. per credential): 12 allowed, the 13th not.
    let out = run_client(sidecar.client("agent-key-2"), (0..13).map(|_| start_pod_step()).collect()).await;
    let mut want = vec![None; 12];
    want.push(Some(-32011));
    assert_eq!(error_codes(&out), want, "{out:#?}");
    assert_eq!(runpod_calls(&fake).len(), 22);

    // ---------------------------------------------------------------- 7b. helm upgrade
    let before =
        Api::<Deployment>::namespaced(client.clone(), RELEASE_NS).get(&format!("{RELEASE}-operator")).await.unwrap();
    run_ok(cluster.helm().args(["upgrade", RELEASE]).arg(chart()).args([
        "--namespace",
        RELEASE_NS,
        "--reuse-values",
        "--set",
        "operator.heartbeatSeconds=5",
        "--set",
        "commonLabels.team=platform",
    ]))
    .await;
    let after =
        Api::<Deployment>::namespaced(client.clone(), RELEASE_NS).get(&format!("{RELEASE}-operator")).await.unwrap();
    assert_eq!(after.metadata.labels.as_ref().unwrap().get("team").map(String::as_str), Some("platform"));
    let template = |d: &Deployment| serde_json::to_value(&d.spec.as_ref().unwrap().template).unwrap();
    assert_ne!(template(&before), template(&after), "the upgrade changes the operator's pod template");
    let args = strings(&template(&after)["spec"]["containers"][0]["args"]);
    assert!(args.contains(&"--heartbeat-seconds=5".to_owned()), "{args:?}");
    assert!(
        args.contains(&format!("--webhook-url={operator_url}/inject")),
        "--reuse-values kept webhook.url: {args:?}"
    );
    let config = webhooks.get(&format!("{RELEASE}-operator")).await.unwrap();
    for hook in config.webhooks.unwrap() {
        assert_eq!(
            hook.client_config.ca_bundle.map(|b| b.0),
            Some(ca_bundle.clone()),
            "helm upgrade kept the caBundle"
        );
    }
    // The rollout: the old operator pod stops, a new one starts with the new arguments.
    operator.stop();
    let operator = Operator::start(cluster, https, admin, &format!("{RELEASE}-operator-5f6d8c9b7-q7w2e")).await;
    eventually("the sidecar to reconnect to the new operator", TIMEOUT, || async {
        (sample(&operator.metrics(), "toolgate_operator_sidecars_connected") == 1.0).then_some(())
    })
    .await;
    policy_status(cluster, SEED_NAME, "generation 2 still enforced after the upgrade", |s| {
        s["enforcing"] == 1 && s["observedGeneration"] == 2
    })
    .await;
    // Calls are still decided.
    let out = run_client(
        sidecar.client("agent-key-3"),
        vec![start_pod_step(), call_step("delete-pod", json!({"id": "pod-1"}))],
    )
    .await;
    assert_eq!(error_codes(&out), [None, Some(-32010)], "{out:#?}");
    assert_eq!(runpod_calls(&fake).len(), 23);

    // ---------------------------------------------------------------- 7c. helm uninstall
    let policies = Api::<DynamicObject>::namespaced_with(client.clone(), APP_NS, &policies_resource());
    run_ok(cluster.helm().args(["uninstall", RELEASE, "--namespace", RELEASE_NS, "--wait"])).await;
    // The Deployment is gone: its pods stop.
    drop(operator);
    let left =
        run_ok(cluster.kubectl().args(["get", "--ignore-not-found", "-o", "name", "-f"]).arg(&manifest_path)).await;
    assert_eq!(left.trim(), "", "helm uninstall left objects of the release: {left}");
    for name in &created {
        let out = run_output(cluster.kubectl().args(["get", name, "-n", RELEASE_NS])).await;
        assert!(!out.status.success(), "{name} survived helm uninstall");
        assert!(String::from_utf8_lossy(&out.stderr).contains("NotFound"), "{name}: {out:?}");
    }
    // Helm keeps CRDs, and so the McpPolicies.
    run_ok(cluster.kubectl().args(["get", "crd", "mcppolicies.toolgate.dev"])).await;
    assert!(policies.get_opt(SEED_NAME).await.unwrap().is_some(), "the McpPolicy survives with its CRD");
    // What the operator created at run time is not the release's: the serving certificate
    // Secret and Leases in the release namespace, the CA ConfigMap in workload namespaces.
    assert!(
        Api::<Secret>::namespaced(client.clone(), RELEASE_NS)
            .get_opt(&format!("{RELEASE}-operator-tls"))
            .await
            .unwrap()
            .is_some()
    );
    assert!(configmaps.get_opt(&format!("{RELEASE}-ca")).await.unwrap().is_some());
    let leases = Api::<Lease>::namespaced(client.clone(), RELEASE_NS).list(&Default::default()).await.unwrap();
    assert!(
        leases.items.iter().any(|l| l.metadata.name.as_deref() == Some(&format!("{RELEASE}-operator-leader"))),
        "{:?}",
        leases.items.iter().map(|l| l.metadata.name.clone()).collect::<Vec<_>>()
    );
    // No webhook any more: new pods start without a sidecar.
    let plain = create_pod(cluster, &pod_from_template(&deployment, "runpod-mcp-6b7f9d8c5d-9z8y7")).await;
    assert!(
        plain.spec.unwrap().init_containers.unwrap().iter().all(|c| c.name != SIDECAR_CONTAINER),
        "a pod created after helm uninstall was injected"
    );
    // A running sidecar keeps enforcing its last policy without the operator.
    let out = run_client(sidecar.client("agent-key-4"), vec![call_step("delete-pod", json!({"id": "pod-1"}))]).await;
    assert_eq!(error_codes(&out), [Some(-32010)], "{out:#?}");

    drop(sidecar);
    drop(server);
    drop(fake);
    for ns in [APP_NS, MONITORING_NS, RELEASE_NS] {
        cluster.delete_namespace(ns).await;
    }
}
