//! The Helm chart (charts/toolgate), the images recipe and the example workload
//! (examples/runpod-mcp): rendered with `helm template`, linted, installed into the real
//! test apiserver (server-side validation of every object, the webhook's scoping seen from
//! the apiserver, RBAC exercised with the chart's ServiceAccount), alerts and dashboard
//! queries checked with promtool, the example server run with Node.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use futures::FutureExt as _;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::TokenReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use toolgate_tests::{TestCluster, Tool, command, eventually, http_get, repo_root, run_ok, run_output, yaml_docs};

/// The Kubernetes version of the test apiserver; `helm template` has no cluster to ask and
/// the chart requires >= 1.30.
const KUBE_VERSION: &str = "1.34.4";
/// Generous: the machine running the tests may be busy with other builds.
const TIMEOUT: Duration = Duration::from_secs(90);

const CERT_MANAGER: &[&str] = &["certManager.enabled=true"];
const MONITORING: &[&str] =
    &["metrics.serviceMonitor.enabled=true", "metrics.podMonitor.enabled=true", "metrics.prometheusRule.enabled=true"];
const NETWORK_POLICY: &[&str] = &["networkPolicy.enabled=true", "networkPolicy.namespaces[0]=agents"];
const DASHBOARD: &[&str] = &["dashboard.enabled=true"];
const DEV_MODE: &[&str] = &["operator.enabled=false", "webhook.url=https://127.0.0.1:9443/inject"];

fn chart() -> PathBuf {
    repo_root().join("charts/toolgate")
}

fn read(path: impl AsRef<Path>) -> String {
    let path = repo_root().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn all_features() -> Vec<&'static str> {
    [CERT_MANAGER, MONITORING, NETWORK_POLICY, DASHBOARD, STORE].concat()
}

/// helm, with its cache/config/data directories in cargo's scratch directory, for the
/// tests that need no cluster.
fn helm() -> tokio::process::Command {
    static HOME: OnceLock<PathBuf> = OnceLock::new();
    let home = HOME.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chart-helm-home");
        std::fs::create_dir_all(&dir).unwrap();
        dir
    });
    let mut cmd = command(Tool::Helm);
    cmd.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    cmd
}

fn with_sets<'a>(cmd: &'a mut tokio::process::Command, sets: &[&str]) -> &'a mut tokio::process::Command {
    for set in sets {
        cmd.args(["--set", set]);
    }
    cmd
}

fn template_cmd(release: &str, namespace: &str, sets: &[&str]) -> tokio::process::Command {
    let mut cmd = helm();
    cmd.args(["template", release]).arg(chart()).args(["--namespace", namespace, "--kube-version", KUBE_VERSION]);
    with_sets(&mut cmd, sets);
    cmd
}

/// `helm template` → the rendered objects.
async fn render(release: &str, namespace: &str, sets: &[&str]) -> Vec<Value> {
    yaml_docs(&run_ok(&mut template_cmd(release, namespace, sets)).await)
}

/// `helm template` that must fail; returns its stderr.
async fn render_error(sets: &[&str]) -> String {
    let out = run_output(&mut template_cmd("toolgate", "toolgate-system", sets)).await;
    assert!(!out.status.success(), "helm template {sets:?} succeeded but should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} among {:?}", kinds(docs)))
}

fn all_of<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn kinds(docs: &[Value]) -> Vec<String> {
    docs.iter()
        .map(|d| format!("{}/{}", d["kind"].as_str().unwrap_or("?"), d["metadata"]["name"].as_str().unwrap_or("?")))
        .collect()
}

fn strings(value: &Value) -> Vec<String> {
    value.as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

fn operator_container(docs: &[Value]) -> &Value {
    &find(docs, "Deployment", "toolgate-operator")["spec"]["template"]["spec"]["containers"][0]
}

fn args(docs: &[Value]) -> Vec<String> {
    strings(&operator_container(docs)["args"])
}

/// The value of `--flag=value` among the operator's arguments.
fn flag(args: &[String], name: &str) -> Option<String> {
    let prefix = format!("--{name}=");
    args.iter().find_map(|a| a.strip_prefix(&prefix).map(str::to_owned))
}

/// A literal of the operator's `InjectConfig::default()` (operator/src/inject.rs): the
/// chart must configure the same names and ports the operator assumes.
fn inject_default(field: &str) -> String {
    let source = read("operator/src/inject.rs");
    let body = source.split("impl Default for InjectConfig").nth(1).expect("InjectConfig's Default impl in inject.rs");
    let line = body
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no `{field}:` in InjectConfig::default()"));
    let value = line.split_once(':').unwrap().1;
    match value.split('"').nth(1) {
        Some(quoted) => quoted.to_owned(),
        None => value.trim().trim_end_matches(',').to_owned(),
    }
}

/// Every (apiGroup, resource, verb, resourceName or "") that a Role/ClusterRole grants.
fn grants(role: &Value) -> BTreeSet<(String, String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        let names = strings(&rule["resourceNames"]);
        let names = if names.is_empty() { vec![String::new()] } else { names };
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    for name in &names {
                        out.insert((group.clone(), resource.clone(), verb.clone(), name.clone()));
                    }
                }
            }
        }
    }
    out
}

fn grant_set(entries: &[(&str, &str, &[&str], &str)]) -> BTreeSet<(String, String, String, String)> {
    let mut out = BTreeSet::new();
    for (group, resource, verbs, name) in entries {
        for verb in *verbs {
            out.insert(((*group).to_owned(), (*resource).to_owned(), (*verb).to_owned(), (*name).to_owned()));
        }
    }
    out
}

const READ: &[&str] = &["get", "list", "watch"];
const WRITE: &[&str] = &["patch", "update"];

/// The operator's cluster-wide permissions (release "toolgate").
fn expected_cluster_grants(operator_cert_mode: bool) -> BTreeSet<(String, String, String, String)> {
    let mut entries: Vec<(&str, &str, &[&str], &str)> = vec![
        ("toolgate.dev", "mcppolicies", READ, ""),
        ("toolgate.dev", "mcppolicies/status", &["get", "patch", "update"], ""),
        ("toolgate.dev", "mcpapprovals", &["get", "list", "watch", "create", "patch", "update", "delete"], ""),
        ("toolgate.dev", "mcpapprovals/status", &["get", "patch", "update"], ""),
        ("", "pods", READ, ""),
        ("", "namespaces", READ, ""),
        ("", "configmaps", &["get", "list", "watch", "create"], ""),
        ("", "configmaps", WRITE, "toolgate-ca"),
        ("events.k8s.io", "events", &["create", "patch"], ""),
        ("authentication.k8s.io", "tokenreviews", &["create"], ""),
        ("admissionregistration.k8s.io", "mutatingwebhookconfigurations", READ, ""),
    ];
    if operator_cert_mode {
        entries.push(("admissionregistration.k8s.io", "mutatingwebhookconfigurations", WRITE, "toolgate-operator"));
    }
    grant_set(&entries)
}

/// The operator's permissions in its own namespace (release "toolgate").
fn expected_namespace_grants(operator_cert_mode: bool) -> BTreeSet<(String, String, String, String)> {
    let mut entries: Vec<(&str, &str, &[&str], &str)> =
        vec![("coordination.k8s.io", "leases", &["get", "list", "watch", "create", "update", "patch", "delete"], "")];
    if operator_cert_mode {
        entries.push(("", "secrets", &["get", "list", "watch", "create"], ""));
        entries.push(("", "secrets", WRITE, "toolgate-operator-tls"));
    }
    grant_set(&entries)
}

// ------------------------------------------------------------------ lint, CRDs, versions

#[tokio::test]
async fn lint_is_clean_for_every_feature() {
    let value_sets: Vec<(&str, Vec<&str>)> = vec![
        ("default", vec![]),
        ("cert-manager", CERT_MANAGER.to_vec()),
        ("monitoring", MONITORING.to_vec()),
        ("network policy", NETWORK_POLICY.to_vec()),
        ("dashboard", DASHBOARD.to_vec()),
        ("counter store", STORE.to_vec()),
        ("dev mode", DEV_MODE.to_vec()),
        ("everything", all_features()),
    ];
    for (what, sets) in value_sets {
        let mut cmd = helm();
        cmd.args(["lint", "--strict"]).arg(chart());
        let out = run_output(with_sets(&mut cmd, &sets)).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "helm lint --strict ({what}) failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("1 chart(s) linted, 0 chart(s) failed"), "{what}: {stdout}");
        for bad in ["[WARNING]", "[ERROR]"] {
            assert!(!stdout.contains(bad), "helm lint ({what}) reports {bad}:\n{stdout}");
        }
    }
}

#[tokio::test]
async fn values_schema_refuses_unknown_keys_and_bad_values() {
    for (set, mentions) in [
        ("operator.replica=3", "replica"),
        ("webhook.timeoutSeconds=10", "timeoutSeconds"),
        ("sidecar.upstreamCredential.header=x y", "header"),
        ("sidecar.upstreamCredential.scheme=Bearer x", "scheme"),
        ("sidecar.identity.kubernetes.issuer=http://k", "issuer"),
        ("webhook.url=http://127.0.0.1:9443/inject", "url"),
        ("operator.image.digest=latest", "digest"),
    ] {
        let mut cmd = helm();
        cmd.args(["lint", "--strict"]).arg(chart()).args(["--set", set]);
        let out = run_output(&mut cmd).await;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "--set {set} was accepted:\n{text}");
        assert!(text.contains("values don't meet the specifications of the schema"), "--set {set}:\n{text}");
        assert!(text.contains(mentions), "--set {set}: the error does not name {mentions}:\n{text}");
    }
}

#[tokio::test]
async fn chart_crds_are_the_generated_crds() {
    let list = |dir: &Path| -> BTreeMap<String, String> {
        std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap()))
            .collect()
    };
    let generated = list(&repo_root().join("crds"));
    let in_chart = list(&chart().join("crds"));
    assert!(!generated.is_empty());
    assert_eq!(
        generated.keys().collect::<Vec<_>>(),
        in_chart.keys().collect::<Vec<_>>(),
        "charts/toolgate/crds/ must hold exactly the files of crds/: run `cp crds/*.yaml charts/toolgate/crds/`"
    );
    for (name, text) in &generated {
        assert!(
            in_chart[name] == *text,
            "charts/toolgate/crds/{name} differs from crds/{name}: run `cp crds/*.yaml charts/toolgate/crds/`"
        );
    }

    // And the packaged chart carries them (what `helm install` of a .tgz installs).
    let out_dir = tempfile::tempdir().unwrap();
    run_ok(helm().arg("package").arg(chart()).arg("--destination").arg(out_dir.path())).await;
    let package = out_dir.path().join(format!("toolgate-{}.tgz", chart_yaml()["version"].as_str().unwrap()));
    let shown = run_ok(helm().args(["show", "crds"]).arg(&package)).await;
    for text in generated.values() {
        assert!(shown.contains(text.trim()), "the packaged chart lacks a CRD of crds/");
    }
    let crd_names: Vec<String> =
        yaml_docs(&shown).iter().map(|d| d["metadata"]["name"].as_str().unwrap().to_owned()).collect();
    assert!(crd_names.contains(&"mcppolicies.toolgate.dev".to_owned()), "{crd_names:?}");
}

fn chart_yaml() -> Value {
    serde_norway::from_str(&read("charts/toolgate/Chart.yaml")).unwrap()
}

fn workspace_version() -> String {
    let cargo = read("Cargo.toml");
    let package = cargo.split("[workspace.package]").nth(1).expect("[workspace.package]");
    let line = package.lines().find(|l| l.starts_with("version")).expect("workspace version");
    line.split('"').nth(1).unwrap().to_owned()
}

#[tokio::test]
async fn chart_defaults_match_the_operator_and_the_workspace() {
    let version = workspace_version();
    assert_eq!(chart_yaml()["appVersion"], json!(version), "Chart.yaml appVersion must be the workspace version");

    let docs = render("toolgate", "toolgate-system", &[]).await;
    let args = args(&docs);
    // What the operator injects by default is what the chart configures by default.
    assert_eq!(flag(&args, "sidecar-image").unwrap(), inject_default("image"));
    assert_eq!(flag(&args, "sidecar-operator-url").unwrap(), inject_default("operator_url"));
    assert_eq!(flag(&args, "ca-config-map").unwrap(), inject_default("ca_config_map"));
    assert_eq!(flag(&args, "sidecar-upstream-credential-key").unwrap(), inject_default("credential_key"));
    assert_eq!(flag(&args, "sidecar-upstream-credential-header").unwrap(), inject_default("credential_header"));
    assert_eq!(flag(&args, "sidecar-upstream-credential-scheme").unwrap(), inject_default("credential_scheme"));
    assert_eq!(flag(&args, "sidecar-k8s-token-audience"), None, "service-account callers are opt-in");
    assert_eq!(operator_container(&docs)["image"], json!(format!("ghcr.io/toolgate/toolgate-operator:{version}")),);
    // The NetworkPolicy's ports are the ports the operator gives the sidecar.
    let values: Value = serde_norway::from_str(&read("charts/toolgate/values.yaml")).unwrap();
    assert_eq!(values["networkPolicy"]["ports"]["mcp"].to_string(), inject_default("proxy_port"));
    assert_eq!(values["networkPolicy"]["ports"]["admin"].to_string(), inject_default("admin_port"));
}

// ------------------------------------------------------------------ rendering

#[tokio::test]
async fn rbac_is_least_privilege_without_wildcards() {
    for (operator_cert_mode, sets) in [(true, vec![]), (false, all_features())] {
        let docs = render("toolgate", "toolgate-system", &sets).await;
        let roles: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role").collect();
        assert_eq!(roles.len(), 3, "{:?}", kinds(&docs));
        for role in &roles {
            for rule in role["rules"].as_array().unwrap() {
                for key in ["apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"] {
                    for item in strings(&rule[key]) {
                        assert!(!item.contains('*'), "wildcard {item:?} in {key} of {}", role["metadata"]["name"]);
                    }
                }
                for verb in strings(&rule["verbs"]) {
                    assert!(!["escalate", "bind", "impersonate"].contains(&verb.as_str()), "{verb} granted");
                }
            }
        }
        let cluster = find(&docs, "ClusterRole", "toolgate-operator");
        assert!(
            grants(cluster) == expected_cluster_grants(operator_cert_mode),
            "cluster grants (certManager={}) differ:\n got {:#?}\nwant {:#?}",
            !operator_cert_mode,
            grants(cluster),
            expected_cluster_grants(operator_cert_mode)
        );
        assert!(
            !grants(cluster).iter().any(|(_, r, _, _)| r == "secrets"),
            "secrets must never be readable cluster-wide"
        );
        let role = find(&docs, "Role", "toolgate-operator");
        assert_eq!(role["metadata"]["namespace"], "toolgate-system");
        assert!(
            grants(role) == expected_namespace_grants(operator_cert_mode),
            "namespace grants differ:\n got {:#?}\nwant {:#?}",
            grants(role),
            expected_namespace_grants(operator_cert_mode)
        );
        let approver = find(&docs, "ClusterRole", "toolgate-approver");
        assert_eq!(
            grants(approver),
            grant_set(&[
                ("toolgate.dev", "mcpapprovals", READ, ""),
                ("toolgate.dev", "mcpapprovals/status", &["get", "patch", "update"], "")
            ])
        );
        // Both bindings name the Deployment's ServiceAccount.
        let sa =
            find(&docs, "Deployment", "toolgate-operator")["spec"]["template"]["spec"]["serviceAccountName"].clone();
        assert_eq!(sa, "toolgate-operator");
        find(&docs, "ServiceAccount", "toolgate-operator");
        for (kind, role_kind) in [("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")] {
            let binding = find(&docs, kind, "toolgate-operator");
            assert_eq!(binding["roleRef"]["kind"], role_kind);
            assert_eq!(binding["roleRef"]["name"], "toolgate-operator");
            assert_eq!(
                binding["subjects"],
                json!([{"kind": "ServiceAccount", "name": sa, "namespace": "toolgate-system"}])
            );
        }
    }
}

fn excluded_namespaces(webhook: &Value) -> Vec<String> {
    let exprs = webhook["namespaceSelector"]["matchExpressions"].as_array().expect("matchExpressions");
    let name = exprs.iter().find(|e| e["key"] == "kubernetes.io/metadata.name").expect("a namespace-name expression");
    assert_eq!(name["operator"], "NotIn");
    strings(&name["values"])
}

#[tokio::test]
async fn webhook_is_opt_in_and_fails_closed() {
    let docs = render("toolgate", "toolgate-system", &[]).await;
    let config = find(&docs, "MutatingWebhookConfiguration", "toolgate-operator");
    assert!(config["metadata"]["annotations"].get("cert-manager.io/inject-ca-from").is_none());
    let all = config["webhooks"].as_array().unwrap();
    let names: Vec<&str> = all.iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["inject.toolgate.dev", "pod.inject.toolgate.dev", "approvals.toolgate.dev"]);
    // The approvals webhook: status updates of McpApprovals, failing closed, at /approval.
    let approvals = &all[2];
    assert_eq!(approvals["failurePolicy"], "Fail");
    assert_eq!(approvals["sideEffects"], "None");
    assert!(approvals["timeoutSeconds"].as_i64().unwrap() <= 5);
    assert_eq!(
        approvals["rules"],
        json!([
            {"operations": ["UPDATE"], "apiGroups": ["toolgate.dev"], "apiVersions": ["v1alpha1"], "resources": ["mcpapprovals/status"], "scope": "Namespaced"},
            {"operations": ["CREATE"], "apiGroups": ["toolgate.dev"], "apiVersions": ["v1alpha1"], "resources": ["mcpapprovals"], "scope": "Namespaced"}
        ])
    );
    assert_eq!(
        approvals["clientConfig"],
        json!({"service": {"name": "toolgate-operator", "namespace": "toolgate-system", "path": "/approval", "port": 8443}})
    );
    let webhooks = &all[..2];
    for webhook in webhooks {
        let name = &webhook["name"];
        assert_eq!(webhook["failurePolicy"], "Fail", "{name}");
        assert!(webhook["timeoutSeconds"].as_i64().unwrap() <= 5, "{name}");
        assert_eq!(webhook["sideEffects"], "None", "{name}");
        assert_eq!(webhook["admissionReviewVersions"], json!(["v1"]), "{name}");
        assert_eq!(webhook["reinvocationPolicy"], "IfNeeded", "{name}");
        assert_eq!(
            webhook["rules"],
            json!([{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}]),
            "{name}"
        );
        assert_eq!(
            webhook["clientConfig"],
            json!({"service": {"name": "toolgate-operator", "namespace": "toolgate-system", "path": "/inject", "port": 8443}}),
            "{name}: no caBundle in the chart (the operator patches it), the operator Service"
        );
        let excluded = excluded_namespaces(webhook);
        assert!(excluded.contains(&"kube-system".to_owned()), "{name}: {excluded:?}");
        assert!(excluded.contains(&"toolgate-system".to_owned()), "{name}: {excluded:?}");
        // Opted-out pods are sent too: the webhook decides whether the namespace allows it.
        assert!(webhook.get("matchConditions").is_none(), "{name}: {}", webhook["matchConditions"]);
    }
    // Opt-in: the first by namespace label, the second by pod label elsewhere.
    let label = |w: &Value| {
        w["namespaceSelector"]["matchExpressions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["key"] == "toolgate.dev/inject")
            .cloned()
            .unwrap()
    };
    assert_eq!(label(&webhooks[0]), json!({"key": "toolgate.dev/inject", "operator": "In", "values": ["enabled"]}));
    assert!(webhooks[0].get("objectSelector").is_none());
    assert_eq!(label(&webhooks[1]), json!({"key": "toolgate.dev/inject", "operator": "NotIn", "values": ["enabled"]}));
    assert_eq!(webhooks[1]["objectSelector"], json!({"matchLabels": {"toolgate.dev/inject": "enabled"}}));
    // The operator patches the caBundle of exactly this configuration.
    assert_eq!(flag(&args(&docs), "webhook-config").unwrap(), "toolgate-operator");

    // The name is a value, passed on to the operator; another release namespace is excluded.
    let docs = render("toolgate", "gates", &["webhook.name=gate-inject"]).await;
    let config = find(&docs, "MutatingWebhookConfiguration", "gate-inject");
    assert_eq!(flag(&args(&docs), "webhook-config").unwrap(), "gate-inject");
    assert!(excluded_namespaces(&config["webhooks"][0]).contains(&"gates".to_owned()));
    let cluster = find(&docs, "ClusterRole", "toolgate-operator");
    assert!(grants(cluster).contains(&(
        "admissionregistration.k8s.io".into(),
        "mutatingwebhookconfigurations".into(),
        "patch".into(),
        "gate-inject".into()
    )));

    // Development: the webhook calls an out-of-cluster operator; nothing runs in the cluster.
    let docs = render("toolgate", "toolgate-system", DEV_MODE).await;
    let config = find(&docs, "MutatingWebhookConfiguration", "toolgate-operator");
    for webhook in config["webhooks"].as_array().unwrap() {
        let path = if webhook["name"] == "approvals.toolgate.dev" { "approval" } else { "inject" };
        assert_eq!(webhook["clientConfig"], json!({"url": format!("https://127.0.0.1:9443/{path}")}));
        assert_eq!(webhook["failurePolicy"], "Fail");
    }
    assert!(all_of(&docs, "Deployment").is_empty() && all_of(&docs, "Service").is_empty(), "{:?}", kinds(&docs));
    find(&docs, "ServiceAccount", "toolgate-operator");
    find(&docs, "ClusterRole", "toolgate-operator");
    // ... and an in-cluster operator is told the URL too.
    let docs = render("toolgate", "toolgate-system", &["webhook.url=https://dev.example:9443/inject"]).await;
    assert_eq!(flag(&args(&docs), "webhook-url").unwrap(), "https://dev.example:9443/inject");

    let error = render_error(&["operator.enabled=false"]).await;
    assert!(error.contains("webhook.url"), "{error}");
}

#[tokio::test]
async fn operator_deployment_is_hardened_and_wired() {
    let docs = render("toolgate", "toolgate-system", &[]).await;
    let deployment = find(&docs, "Deployment", "toolgate-operator");
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 2);
    let pod = &spec["template"]["spec"];
    let selector = &spec["selector"]["matchLabels"];
    for (k, v) in selector.as_object().unwrap() {
        assert_eq!(&spec["template"]["metadata"]["labels"][k], v, "the pod template carries the selector");
    }
    let anti =
        &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"];
    assert_eq!(anti["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(&anti["labelSelector"]["matchLabels"], selector);
    let pdb = find(&docs, "PodDisruptionBudget", "toolgate-operator");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], selector);
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);

    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    let container = operator_container(&docs);
    let sc = &container["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["runAsUser"], 65532, "the distroless nonroot user of the image");
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert!(
        container["resources"]["requests"]["cpu"].is_string()
            && container["resources"]["requests"]["memory"].is_string()
    );

    // Probes on the admin port.
    let ports: BTreeMap<String, i64> = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_owned(), p["containerPort"].as_i64().unwrap()))
        .collect();
    assert_eq!(ports, BTreeMap::from([("https".into(), 8443), ("metrics".into(), 8080)]));
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")] {
        assert_eq!(container[probe]["httpGet"], json!({"path": path, "port": "metrics"}), "{probe}");
    }

    // The operator interface, flag by flag.
    let operator_args = args(&docs);
    let expected = [
        ("listen", "0.0.0.0:8443"),
        ("admin-listen", "0.0.0.0:8080"),
        ("service-name", "toolgate-operator"),
        ("tls-secret", "toolgate-operator-tls"),
        ("cert-mode", "operator"),
        ("webhook-config", "toolgate-operator"),
        ("ca-config-map", "toolgate-ca"),
        ("sidecar-image", "ghcr.io/toolgate/toolgate-proxy:0.1.0"),
        ("sidecar-operator-url", "https://toolgate-operator.toolgate-system.svc:8443"),
        ("sidecar-upstream-credential-key", "api-key"),
        ("sidecar-upstream-credential-header", "authorization"),
        ("sidecar-upstream-credential-scheme", "Bearer"),
        ("heartbeat-seconds", "10"),
        ("decider-service-accounts", "other-namespaces"),
        ("lease-name", "toolgate-operator-leader"),
    ];
    assert_eq!(operator_args.len(), expected.len(), "{operator_args:?}");
    for (name, value) in expected {
        assert_eq!(flag(&operator_args, name).as_deref(), Some(value), "--{name} in {operator_args:?}");
    }
    let env: BTreeMap<String, String> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(env["POD_NAMESPACE"], "metadata.namespace");
    assert_eq!(env["POD_NAME"], "metadata.name");

    // The Service: https and metrics, onto the container's named ports.
    let service = find(&docs, "Service", "toolgate-operator");
    assert_eq!(&service["spec"]["selector"], selector);
    let service_ports: Vec<(String, i64, String)> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (p["name"].as_str().unwrap().into(), p["port"].as_i64().unwrap(), p["targetPort"].as_str().unwrap().into())
        })
        .collect();
    assert_eq!(
        service_ports,
        [("https".to_owned(), 8443, "https".to_owned()), ("metrics".to_owned(), 8080, "metrics".to_owned())]
    );

    // Images and replicas are values; a digest wins over the tag.
    let docs = render(
        "toolgate",
        "toolgate-system",
        &[
            "operator.replicas=1",
            "operator.image.repository=registry.example/op",
            "operator.image.tag=dev",
            "sidecar.image.repository=registry.example/proxy",
            "sidecar.image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ],
    )
    .await;
    assert_eq!(operator_container(&docs)["image"], "registry.example/op:dev");
    assert_eq!(
        flag(&args(&docs), "sidecar-image").unwrap(),
        "registry.example/proxy@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    );
    assert!(all_of(&docs, "PodDisruptionBudget").is_empty(), "no PDB for a single replica");

    // Credential custody and service-account callers are values.
    let docs = render(
        "toolgate",
        "toolgate-system",
        &[
            "sidecar.upstreamCredential.key=token",
            "sidecar.upstreamCredential.header=x-api-key",
            "sidecar.upstreamCredential.scheme=",
            "sidecar.identity.kubernetes.audience=toolgate-mcp",
            "sidecar.identity.kubernetes.issuer=https://oidc.example.com/cluster",
        ],
    )
    .await;
    let a = args(&docs);
    assert_eq!(flag(&a, "sidecar-upstream-credential-key").as_deref(), Some("token"));
    assert_eq!(flag(&a, "sidecar-upstream-credential-header").as_deref(), Some("x-api-key"));
    assert_eq!(flag(&a, "sidecar-upstream-credential-scheme").as_deref(), Some(""));
    assert_eq!(flag(&a, "sidecar-k8s-token-audience").as_deref(), Some("toolgate-mcp"));
    assert_eq!(flag(&a, "sidecar-k8s-issuer").as_deref(), Some("https://oidc.example.com/cluster"));
}

/// The sidecar guard keeps every volume of the sidecar (the upstream credential and API
/// keys included) as injected, and refuses ephemeral containers that mount them.
#[tokio::test]
async fn the_sidecar_guard_covers_the_credential_volumes() {
    let docs = render("toolgate", "toolgate-system", &[]).await;
    let guard = find(&docs, "ValidatingAdmissionPolicy", "toolgate-sidecar-guard");
    let volumes = guard["spec"]["variables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "sidecarVolumes")
        .expect("a sidecarVolumes variable")["expression"]
        .as_str()
        .unwrap()
        .to_owned();
    for name in ["toolgate-token", "toolgate-state", "toolgate-upstream-credential", "toolgate-api-keys"] {
        assert!(volumes.contains(&format!("'{name}'")), "{name} in {volumes}");
    }
    let source = read("operator/src/inject.rs");
    for constant in
        ["CREDENTIAL_VOLUME: &str = \"toolgate-upstream-credential\"", "API_KEYS_VOLUME: &str = \"toolgate-api-keys\""]
    {
        assert!(source.contains(constant), "the operator injects {constant}");
    }
    let expressions: Vec<&str> =
        guard["spec"]["validations"].as_array().unwrap().iter().filter_map(|v| v["expression"].as_str()).collect();
    assert!(
        expressions.iter().filter(|e| e.contains("variables.sidecarVolumes")).count() >= 2,
        "volumes and ephemeral mounts: {expressions:?}"
    );
}

#[tokio::test]
async fn cert_manager_issues_the_serving_certificate() {
    let docs = render("toolgate", "toolgate-system", CERT_MANAGER).await;
    let certificate = find(&docs, "Certificate", "toolgate-operator-serving");
    assert_eq!(certificate["spec"]["secretName"], "toolgate-operator-tls");
    let dns = strings(&certificate["spec"]["dnsNames"]);
    assert!(dns.contains(&"toolgate-operator.toolgate-system.svc".to_owned()), "{dns:?}");
    // Signed by a CA (not self-signed leaf) so that ca.crt is a real trust anchor.
    assert_eq!(certificate["spec"]["issuerRef"]["name"], "toolgate-selfsigned-ca");
    assert_eq!(find(&docs, "Certificate", "toolgate-selfsigned-ca")["spec"]["isCA"], true);
    find(&docs, "Issuer", "toolgate-selfsigned-ca");
    let config = find(&docs, "MutatingWebhookConfiguration", "toolgate-operator");
    assert_eq!(
        config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "toolgate-system/toolgate-operator-serving"
    );
    let args = args(&docs);
    assert_eq!(flag(&args, "cert-mode").unwrap(), "files");
    let container = operator_container(&docs);
    let mount = container["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "tls").expect("tls mount");
    let dir = mount["mountPath"].as_str().unwrap();
    for (name, file) in [("tls-cert-file", "tls.crt"), ("tls-key-file", "tls.key"), ("tls-ca-file", "ca.crt")] {
        assert_eq!(flag(&args, name).unwrap(), format!("{dir}/{file}"));
    }
    let volumes = &find(&docs, "Deployment", "toolgate-operator")["spec"]["template"]["spec"]["volumes"];
    let tls = volumes.as_array().unwrap().iter().find(|v| v["name"] == "tls").unwrap();
    assert_eq!(tls["secret"]["secretName"], "toolgate-operator-tls");

    // An existing issuer instead of the chart's CA.
    let docs = render(
        "toolgate",
        "toolgate-system",
        &["certManager.enabled=true", "certManager.issuerRef.name=corp-ca", "certManager.issuerRef.kind=ClusterIssuer"],
    )
    .await;
    assert!(all_of(&docs, "Issuer").is_empty(), "{:?}", kinds(&docs));
    let certificate = find(&docs, "Certificate", "toolgate-operator-serving");
    assert_eq!(certificate["spec"]["issuerRef"], json!({"kind": "ClusterIssuer", "name": "corp-ca"}));
}

#[tokio::test]
async fn monitoring_scrapes_the_operator_and_every_sidecar() {
    let docs = render("toolgate", "toolgate-system", MONITORING).await;
    let service_monitor = find(&docs, "ServiceMonitor", "toolgate-operator");
    let service = render("toolgate", "toolgate-system", &[]).await;
    assert_eq!(
        service_monitor["spec"]["selector"]["matchLabels"],
        find(&service, "Service", "toolgate-operator")["spec"]["selector"]
    );
    assert_eq!(service_monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(service_monitor["spec"]["endpoints"][0]["honorLabels"], true);

    let pod_monitor = find(&docs, "PodMonitor", "toolgate-sidecars");
    assert_eq!(pod_monitor["spec"]["selector"], json!({"matchLabels": {"toolgate.dev/injected": "true"}}));
    assert_eq!(pod_monitor["spec"]["podMetricsEndpoints"][0]["port"], "toolgate-admin");
    assert_eq!(pod_monitor["spec"]["podMetricsEndpoints"][0]["path"], "/metrics");
    // The label and port name are the ones the operator injects.
    let inject = read("operator/src/inject.rs");
    assert!(
        inject.contains(r#"INJECTED_LABEL: &str = "toolgate.dev/injected""#),
        "inject.rs no longer labels injected pods so"
    );
    assert!(inject.contains(r#""name": "toolgate-admin""#), "inject.rs no longer names the admin port toolgate-admin");
}

/// `{{ $labels.x }}` and `{{ $value | humanize }}` of an alert annotation, filled in.
fn expand(template: &str, labels: &Value, value: &str) -> String {
    let mut out = template.replace("{{ $value | humanize }}", value);
    for (k, v) in labels.as_object().unwrap() {
        out = out.replace(&format!("{{{{ $labels.{k} }}}}"), v.as_str().unwrap());
    }
    assert!(!out.contains("{{"), "unexpanded template in {out}");
    out
}

#[tokio::test]
async fn prometheus_rules_are_valid_and_fire() {
    let docs = render("toolgate", "toolgate-system", MONITORING).await;
    let rule = find(&docs, "PrometheusRule", "toolgate");
    let groups = &rule["spec"]["groups"];
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), serde_norway::to_string(&json!({"groups": groups})).unwrap())
        .unwrap();
    let out = run_ok(command(Tool::Promtool).current_dir(dir.path()).args(["check", "rules", "rules.yaml"])).await;
    assert!(out.contains("SUCCESS: 4 rules found"), "{out}");

    let alerts: BTreeMap<String, &Value> =
        groups[0]["rules"].as_array().unwrap().iter().map(|r| (r["alert"].as_str().unwrap().to_owned(), r)).collect();
    let expected = |name: &str, labels: Value, value: &str| -> Value {
        let alert = alerts[name];
        let mut all = alert["labels"].clone();
        for (k, v) in labels.as_object().unwrap() {
            all[k] = v.clone();
        }
        let annotations: serde_json::Map<String, Value> = alert["annotations"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), json!(expand(v.as_str().unwrap(), &labels, value))))
            .collect();
        json!({"exp_labels": all, "exp_annotations": annotations})
    };
    // Firing and quiet series side by side; each alert must fire for exactly the bad ones.
    let tests = json!({
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": "up{job=\"toolgate-operator\",namespace=\"toolgate-system\",pod=\"a\"}", "values": "0x30"},
                    {"series": "toolgate_operator_policy_targets{namespace=\"agents\",policy=\"seed\",pod=\"a\"}", "values": "2x30"},
                    {"series": "toolgate_operator_policy_enforcing{namespace=\"agents\",policy=\"seed\",pod=\"a\"}", "values": "1x30"},
                    {"series": "toolgate_operator_policy_targets{namespace=\"agents\",policy=\"ok\",pod=\"a\"}", "values": "2x30"},
                    {"series": "toolgate_operator_policy_enforcing{namespace=\"agents\",policy=\"ok\",pod=\"a\"}", "values": "2x30"},
                    {"series": "toolgate_decisions_total{namespace=\"agents\",pod=\"p\",tool=\"delete-pod\",decision=\"deny\",policy=\"seed\",rule=\"default\"}", "values": "0+60x30"},
                    {"series": "toolgate_decisions_total{namespace=\"agents\",pod=\"p\",tool=\"list-pods\",decision=\"deny\",policy=\"seed\",rule=\"default\"}", "values": "0+6x30"},
                    {"series": "toolgate_decisions_total{namespace=\"agents\",pod=\"p\",tool=\"start-pod\",decision=\"allow\",policy=\"seed\",rule=\"tools.start-pod\"}", "values": "0+600x30"},
                    {"series": "toolgate_policy_loaded{namespace=\"agents\",pod=\"p\"}", "values": "1x30"},
                    {"series": "toolgate_policy_loaded{namespace=\"agents\",pod=\"q\"}", "values": "0x30"}
                ],
                "alert_rule_test": [
                    {"eval_time": "20m", "alertname": "ToolgateOperatorDown",
                     "exp_alerts": [expected("ToolgateOperatorDown", json!({}), "1")]},
                    {"eval_time": "20m", "alertname": "ToolgatePolicyNotEnforced",
                     "exp_alerts": [expected("ToolgatePolicyNotEnforced", json!({"namespace": "agents", "policy": "seed"}), "2")]},
                    {"eval_time": "20m", "alertname": "ToolgateDenySpike",
                     "exp_alerts": [expected("ToolgateDenySpike", json!({"namespace": "agents", "tool": "delete-pod"}), "1")]},
                    {"eval_time": "20m", "alertname": "ToolgateSidecarWithoutPolicy",
                     "exp_alerts": [expected("ToolgateSidecarWithoutPolicy", json!({"namespace": "agents", "pod": "q"}), "0")]},
                    // Not before their `for`.
                    {"eval_time": "2m", "alertname": "ToolgateOperatorDown", "exp_alerts": []},
                    {"eval_time": "2m", "alertname": "ToolgatePolicyNotEnforced", "exp_alerts": []}
                ]
            },
            {
                "interval": "1m",
                "input_series": [
                    {"series": "up{job=\"toolgate-operator\",namespace=\"toolgate-system\",pod=\"a\"}", "values": "0x30"},
                    {"series": "up{job=\"toolgate-operator\",namespace=\"toolgate-system\",pod=\"b\"}", "values": "1x30"}
                ],
                "alert_rule_test": [{"eval_time": "20m", "alertname": "ToolgateOperatorDown", "exp_alerts": []}]
            }
        ]
    });
    std::fs::write(dir.path().join("tests.yaml"), serde_norway::to_string(&tests).unwrap()).unwrap();
    let out = run_output(command(Tool::Promtool).current_dir(dir.path()).args(["test", "rules", "tests.yaml"])).await;
    assert!(
        out.status.success(),
        "promtool test rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn dashboard_queries_are_valid_promql_on_real_metrics() {
    let docs = render("toolgate", "toolgate-system", DASHBOARD).await;
    let config_map = find(&docs, "ConfigMap", "toolgate-dashboard");
    assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1");
    let json_text = config_map["data"]["toolgate.json"].as_str().unwrap();
    assert_eq!(json_text.trim(), read("charts/toolgate/files/dashboard.json").trim());
    let dashboard: Value = serde_json::from_str(json_text).unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_owned()))
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");

    // Every metric exists: the proxy's in docs/proxy.md, the operator's as named for the alerts.
    let documented = read("docs/proxy.md");
    let operator_metrics = ["toolgate_operator_policy_targets", "toolgate_operator_policy_enforcing"];
    let mut used = BTreeSet::new();
    for expr in &exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("toolgate_") {
                used.insert(word.to_owned());
            }
        }
    }
    for metric in &used {
        let base = metric.strip_suffix("_bucket").unwrap_or(metric);
        assert!(
            operator_metrics.contains(&base) || documented.contains(&format!("`{base}`")),
            "the dashboard queries {metric}, which docs/proxy.md does not list"
        );
    }
    assert!(used.contains("toolgate_decisions_total"));

    // Grafana's variables replaced, each query must parse (promtool checks recording rules).
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            json!({"record": format!("dashboard:query_{i}"), "expr": e.replace("$__rate_interval", "5m").replace("$namespace", ".*")})
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("dashboard.yaml"),
        serde_norway::to_string(&json!({"groups": [{"name": "d", "rules": rules}]})).unwrap(),
    )
    .unwrap();
    let out = run_ok(command(Tool::Promtool).current_dir(dir.path()).args(["check", "rules", "dashboard.yaml"])).await;
    assert!(out.contains(&format!("SUCCESS: {} rules found", exprs.len())), "{out}");
}

#[tokio::test]
async fn network_policy_admits_only_the_proxy_ports() {
    let docs = render(
        "toolgate",
        "toolgate-system",
        &["networkPolicy.enabled=true", "networkPolicy.namespaces={agents,tools}"],
    )
    .await;
    let policies = all_of(&docs, "NetworkPolicy");
    let namespaces: BTreeSet<&str> = policies.iter().map(|p| p["metadata"]["namespace"].as_str().unwrap()).collect();
    assert_eq!(namespaces, BTreeSet::from(["agents", "tools", "toolgate-system"]));
    for policy in policies.iter().filter(|p| p["metadata"]["name"] == "toolgate-injected-pods") {
        let spec = &policy["spec"];
        assert_eq!(spec["podSelector"], json!({"matchLabels": {"toolgate.dev/injected": "true"}}));
        assert_eq!(spec["policyTypes"], json!(["Ingress"]));
        let ingress = spec["ingress"].as_array().unwrap();
        let ports: Vec<i64> = ingress
            .iter()
            .flat_map(|r| r["ports"].as_array().unwrap().iter().map(|p| p["port"].as_i64().unwrap()))
            .collect();
        assert_eq!(ports, [15080, 15090], "only the proxy's MCP and admin ports");
        assert!(ingress[0].get("from").is_none(), "MCP from anywhere by default");
        assert_eq!(
            ingress[1]["from"],
            json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]),
            "admin only from monitoring"
        );
    }
    let error = render_error(&["networkPolicy.enabled=true"]).await;
    assert!(error.contains("networkPolicy.namespaces"), "{error}");
}

const STORE: &[&str] = &["counters.redis.deploy=true", "counters.redis.namespaces={agents,tools}"];

/// The `stringData` value `key` of the Secret `name` in `namespace`.
fn secret_value(docs: &[Value], namespace: &str, name: &str, key: &str) -> String {
    let secret = docs
        .iter()
        .find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == name && d["metadata"]["namespace"] == namespace)
        .unwrap_or_else(|| panic!("no Secret {namespace}/{name} among {:?}", kinds(docs)));
    secret["stringData"][key].as_str().unwrap_or_else(|| panic!("no {key} in {secret}")).to_owned()
}

#[tokio::test]
async fn counter_store_is_wired_into_the_operator_and_locked_down() {
    // No store by default: the operator injects none.
    let docs = render("toolgate", "toolgate-system", &[]).await;
    assert!(!args(&docs).iter().any(|a| a.starts_with("--sidecar-counter-store")), "{:?}", args(&docs));
    assert!(all_of(&docs, "StatefulSet").is_empty());

    // An existing store: the URL and the Secret name reach the operator; nothing is run.
    let docs = render(
        "toolgate",
        "toolgate-system",
        &[
            "counters.redis.url=rediss://redis.example:6380/2",
            "counters.redis.existingSecret=redis-auth",
            "counters.redis.tlsCa=true",
        ],
    )
    .await;
    let a = args(&docs);
    assert_eq!(flag(&a, "sidecar-counter-store").as_deref(), Some("rediss://redis.example:6380/2"));
    assert_eq!(flag(&a, "sidecar-counter-store-secret").as_deref(), Some("redis-auth"));
    assert_eq!(flag(&a, "sidecar-counter-store-ca").as_deref(), Some("true"));
    assert_eq!(flag(&a, "sidecar-counter-store-prefix").as_deref(), Some("toolgate:"));
    assert_eq!(flag(&a, "sidecar-counter-store-on-failure").as_deref(), Some("closed"));
    assert!(all_of(&docs, "StatefulSet").is_empty() && all_of(&docs, "Secret").is_empty());

    // The chart's own store.
    let docs = render("toolgate", "toolgate-system", STORE).await;
    let a = args(&docs);
    assert_eq!(
        flag(&a, "sidecar-counter-store").as_deref(),
        Some("redis://toolgate-counter-store.toolgate-system.svc:6379")
    );
    assert_eq!(flag(&a, "sidecar-counter-store-secret").as_deref(), Some("toolgate-counter-store"));
    let set = find(&docs, "StatefulSet", "toolgate-counter-store");
    assert_eq!(set["spec"]["replicas"], json!(1));
    let pod = &set["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], json!(false));
    assert_eq!(pod["securityContext"]["runAsNonRoot"], json!(true));
    let c = &pod["containers"][0];
    assert_eq!(c["image"], json!("docker.io/valkey/valkey:8.1-alpine"));
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], json!(true));
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], json!(false));
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    let server_args = strings(&c["args"]);
    let after = |f: &str| server_args.iter().skip_while(|a| *a != f).nth(1).cloned();
    assert_eq!(after("--aclfile").as_deref(), Some("/etc/toolgate-store/users.acl"));
    assert_eq!(after("--maxmemory-policy").as_deref(), Some("noeviction"), "counters are never evicted");
    assert_eq!(after("--appendonly").as_deref(), Some("no"));
    assert!(set["spec"].get("volumeClaimTemplates").is_none(), "no persistence by default");
    find(&docs, "Service", "toolgate-counter-store");
    // Only injected sidecars of the listed namespaces reach it.
    let policy = find(&docs, "NetworkPolicy", "toolgate-counter-store");
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]));
    let from = &policy["spec"]["ingress"][0]["from"];
    assert_eq!(from.as_array().unwrap().len(), 1, "{from}");
    assert_eq!(from[0]["podSelector"], json!({"matchLabels": {"toolgate.dev/injected": "true"}}));
    assert_eq!(from[0]["namespaceSelector"]["matchExpressions"][0]["values"], json!(["agents", "tools"]));
    // One user per namespace, limited to its own keys; passwords only hashed in the ACL.
    let acl = secret_value(&docs, "toolgate-system", "toolgate-counter-store-acl", "users.acl");
    let agents = secret_value(&docs, "agents", "toolgate-counter-store", "password");
    let tools = secret_value(&docs, "tools", "toolgate-counter-store", "password");
    assert!(agents.len() >= 32 && agents != tools, "generated, distinct passwords");
    assert!(!acl.contains(&agents) && !acl.contains(&tools), "{acl}");
    assert!(acl.lines().any(|l| l == "user default off"), "{acl}");
    assert!(acl.contains("user toolgate-agents on #") && acl.contains("~toolgate:agents/* "), "{acl}");
    assert_eq!(secret_value(&docs, "tools", "toolgate-counter-store", "username"), "toolgate-tools");

    // Persistence and another image.
    let docs = render(
        "toolgate",
        "toolgate-system",
        &[
            STORE,
            &[
                "counters.redis.persistence.enabled=true",
                "counters.redis.image.repository=redis",
                "counters.redis.image.tag=7-alpine",
                "counters.redis.command={redis-server}",
            ],
        ]
        .concat(),
    )
    .await;
    let set = find(&docs, "StatefulSet", "toolgate-counter-store");
    assert_eq!(set["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"], json!("1Gi"));
    assert_eq!(set["spec"]["template"]["spec"]["containers"][0]["command"], json!(["redis-server"]));

    // Mistakes are refused with the fix.
    let error = render_error(&["counters.redis.deploy=true"]).await;
    assert!(error.contains("counters.redis.namespaces"), "{error}");
    let error = render_error(&[STORE, &["counters.redis.url=redis://elsewhere:6379"]].concat()).await;
    assert!(error.contains("not both"), "{error}");
    let error = render_error(&[STORE, &["counters.redis.tlsCa=true"]].concat()).await;
    assert!(error.contains("tlsCa"), "{error}");
    for bad in [
        "counters.redis.url=redis://:secret@redis:6379",
        "counters.redis.keyPrefix=a*",
        "counters.redis.onFailure=maybe",
    ] {
        let mut cmd = helm();
        cmd.args(["lint", "--strict"]).arg(chart()).args(["--set", bad]);
        let out = run_output(&mut cmd).await;
        assert!(!out.status.success(), "--set {bad} was accepted");
    }
}

/// The ACL the chart generates, loaded by a real `redis-server`, used by the real counter
/// store: each namespace's sidecars count under their own prefix, and one namespace's
/// password can neither touch another namespace's counters nor do anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_store_users_reach_only_their_own_namespaces_counters() {
    use toolgate_counters::{RedisConfig, RedisCounters};
    use toolgate_policy::{CounterKey, Demand};
    let docs = render("toolgate", "toolgate-system", STORE).await;
    let acl = secret_value(&docs, "toolgate-system", "toolgate-counter-store-acl", "users.acl");
    let agents = secret_value(&docs, "agents", "toolgate-counter-store", "password");
    let tools = secret_value(&docs, "tools", "toolgate-counter-store", "password");
    let server = toolgate_tests::redis::RedisServer::start_with_acl(&acl, "toolgate-agents", &agents).unwrap();
    let store = |user: Option<&str>, password: Option<&str>, namespace: &str| {
        RedisCounters::new(&RedisConfig {
            username: user.map(str::to_owned),
            password: password.map(str::to_owned),
            // What the operator gives the sidecars of `namespace`.
            prefix: format!("toolgate:{namespace}/"),
            timeout: Duration::from_secs(10),
            ..RedisConfig::new(server.url())
        })
        .unwrap()
    };
    let demand = || Demand {
        key: CounterKey { policy: "seed".into(), counter: "start-pod_rate".into(), scope: "agent-a".into() },
        window: Duration::from_secs(60),
        max: 2,
        amount: 1,
        counters: Default::default(),
    };
    let own = store(Some("toolgate-agents"), Some(&agents), "agents");
    for _ in 0..2 {
        assert!(own.reserve(&[demand()], Duration::ZERO).await.unwrap().is_ok(), "admitted");
    }
    assert!(own.reserve(&[demand()], Duration::ZERO).await.unwrap().is_err(), "the third is refused: max 2");
    // The same McpPolicy name in another namespace counts separately, with its own user.
    let theirs = store(Some("toolgate-tools"), Some(&tools), "tools");
    assert!(theirs.reserve(&[demand()], Duration::ZERO).await.unwrap().is_ok());
    // The agents password on the tools keys: refused by the server (NOPERM).
    let trespass = store(Some("toolgate-agents"), Some(&agents), "tools");
    let error = trespass.reserve(&[demand()], Duration::ZERO).await.expect_err("no access to tools' keys");
    assert!(error.to_string().to_lowercase().contains("noperm"), "{error}");
    // No credentials, or the default user: nothing.
    assert!(store(None, None, "agents").reserve(&[demand()], Duration::ZERO).await.is_err());
    // The users run the counting scripts and nothing else.
    for command in ["KEYS *", "FLUSHALL", "CONFIG GET requirepass", "ACL LIST", "DEL toolgate:agents/x"] {
        let reply = server.command(command).unwrap();
        let answer = reply.lines().nth(1).unwrap_or_default();
        if command.starts_with("DEL") {
            assert!(answer.starts_with(':'), "{command}: {reply}");
        } else {
            assert!(answer.contains("NOPERM"), "{command} was allowed: {reply}");
        }
    }
}

#[tokio::test]
async fn notes_tell_the_next_two_steps() {
    // NOTES.txt is not a manifest: `helm install --dry-run` renders it (against the test
    // apiserver, whose version satisfies the chart's kubeVersion).
    let cluster = TestCluster::shared();
    let out = run_ok(cluster.helm().args(["install", "toolgate"]).arg(chart()).args([
        "--namespace",
        "toolgate-system",
        "--dry-run=server",
    ]))
    .await;
    let notes = out.split("NOTES:").nth(1).expect("NOTES in the dry-run output");
    assert!(notes.contains("kubectl label namespace <namespace> toolgate.dev/inject=enabled"), "{notes}");
    assert!(notes.contains("apply -f examples/runpod-mcp/policies/seed.mcppolicy.yaml"), "{notes}");
    assert!(notes.contains("get mcpp"), "{notes}");
    assert!(repo_root().join("examples/runpod-mcp/policies/seed.mcppolicy.yaml").is_file());
}

// ------------------------------------------------------------------ images

#[tokio::test]
async fn images_build_with_the_make_build_command() {
    let makefile = read("Makefile");
    let recipe = makefile
        .split("\nbuild:\n")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .expect("the build target's recipe")
        .trim()
        .replace("$(CARGO)", "cargo");
    assert!(recipe.starts_with("cargo build"), "{recipe}");
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains(&format!("    {recipe} \\\n")), "the Dockerfile does not run `{recipe}`");
    for target in ["toolgate-operator", "toolgate-proxy"] {
        assert!(dockerfile.contains(&format!("FROM runtime AS {target}\n")), "no {target} stage");
        assert!(dockerfile.contains(&format!("/usr/local/bin/{target}\"]")), "{target} is not the entrypoint");
    }
    assert!(dockerfile.contains("FROM gcr.io/distroless/cc-debian12:nonroot AS runtime\nUSER 65532:65532"));
    let toolchain = read("rust-toolchain.toml");
    let channel = toolchain.split('"').nth(1).unwrap();
    assert!(
        dockerfile.contains(&format!("ARG RUST_VERSION={channel}\n")),
        "the build image must use rust-toolchain.toml's {channel}"
    );

    // make images: one build per target, tagged as the chart's defaults.
    let out = std::process::Command::new("make")
        .current_dir(repo_root())
        .args(["-n", "images", "CONTAINER_ENGINE=podman"])
        .output()
        .unwrap();
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{plan}");
    assert!(plan.contains("for target in toolgate-operator toolgate-proxy"), "{plan}");
    assert!(plan.contains("podman build"), "{plan}");
    assert!(plan.contains(&format!("-t ghcr.io/toolgate/$target:{} -f Dockerfile", workspace_version())), "{plan}");
    let docs = render("toolgate", "toolgate-system", &[]).await;
    assert_eq!(
        operator_container(&docs)["image"],
        json!(format!("ghcr.io/toolgate/toolgate-operator:{}", workspace_version()))
    );

    // Without an engine it says so.
    let out = std::process::Command::new("make")
        .current_dir(repo_root())
        .args(["images", "CONTAINER_ENGINE="])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no container engine found"), "{out:?}");
}

// ------------------------------------------------------------------ the real apiserver

/// Installs CRDs like those of cert-manager and the Prometheus Operator (kinds only, any
/// spec) unless the cluster has them, so that the chart's optional objects can be created.
async fn ensure_third_party_crds(cluster: &TestCluster) {
    let crds = [
        ("cert-manager.io", "Certificate", "certificates"),
        ("cert-manager.io", "Issuer", "issuers"),
        ("monitoring.coreos.com", "ServiceMonitor", "servicemonitors"),
        ("monitoring.coreos.com", "PodMonitor", "podmonitors"),
        ("monitoring.coreos.com", "PrometheusRule", "prometheusrules"),
    ];
    for (group, kind, plural) in crds {
        let name = format!("{plural}.{group}");
        let out = run_output(cluster.kubectl().args(["get", "crd", &name])).await;
        if out.status.success() {
            continue;
        }
        let manifest = format!(
            "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: {name}\nspec:\n  group: {group}\n  scope: Namespaced\n  names: {{plural: {plural}, singular: {singular}, kind: {kind}}}\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema:\n        type: object\n        properties:\n          spec: {{type: object, x-kubernetes-preserve-unknown-fields: true}}\n",
            singular = kind.to_lowercase(),
        );
        cluster.kubectl_apply(None, &manifest).await;
        run_ok(cluster.kubectl().args([
            "wait",
            "--for=condition=Established",
            "--timeout=90s",
            &format!("crd/{name}"),
        ]))
        .await;
    }
}

/// Installed releases are serialized: the webhooks of every release see labelled pods in
/// every namespace, so one test's release would answer for another's pods.
static INSTALLS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A release name unique in the shared cluster (its cluster-scoped objects are named after it).
fn release_for(namespace: &str) -> String {
    format!("toolgate-{}", &namespace[namespace.len() - 6..])
}

async fn helm_install(cluster: &TestCluster, release: &str, namespace: &str, sets: &[&str]) {
    let mut cmd = cluster.helm();
    cmd.args(["install", release]).arg(chart()).args(["--namespace", namespace]);
    run_ok(with_sets(&mut cmd, sets)).await;
}

/// Runs `checks`, then `helm uninstall`s the release whatever happened.
async fn with_release<F, Fut>(cluster: &TestCluster, release: &str, namespace: &str, checks: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let result = AssertUnwindSafe(checks()).catch_unwind().await;
    let out = run_output(cluster.helm().args(["uninstall", release, "--namespace", namespace, "--wait"])).await;
    match result {
        Ok(()) => assert!(out.status.success(), "helm uninstall failed: {}", String::from_utf8_lossy(&out.stderr)),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn pod(name: &str, labels: Value, annotations: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1", "ports": [{"containerPort": 3000}]}]}
    }))
    .unwrap()
}

fn api_error(result: Result<Pod, kube::Error>) -> Option<String> {
    match result {
        Ok(_) => None,
        Err(kube::Error::Api(e)) => Some(e.message),
        Err(e) => Some(e.to_string()),
    }
}

/// A JSON patch (RFC 6902), as the operator sends for the caBundle; built without naming the
/// json-patch crate, which this crate does not depend on.
fn json_patch(ops: Value) -> Patch<()> {
    Patch::Json(serde_json::from_value(ops).expect("valid JSON patch operations"))
}

fn is_forbidden<T>(result: &Result<T, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(e)) if e.code == 403)
}

#[tokio::test]
async fn chart_installs_into_the_apiserver_and_uninstalls() {
    let cluster = TestCluster::shared();
    let _serialized = INSTALLS.lock().await;
    cluster
        .with_temp_namespace(|release_ns| async move {
            cluster
                .with_temp_namespace(|apps| async move {
                    let release = release_for(&release_ns);
                    helm_install(cluster, &release, &release_ns, &[]).await;
                    let operator = format!("{release}-operator");
                    with_release(cluster, &release, &release_ns, || async {
                        installed_release_checks(cluster, &release, &release_ns, &apps).await;
                    })
                    .await;

                    // Uninstalled: the cluster-scoped objects are gone, the CRD stays.
                    let client = cluster.client();
                    let gone =
                        Api::<MutatingWebhookConfiguration>::all(client.clone()).get_opt(&operator).await.unwrap();
                    assert!(gone.is_none(), "the webhook configuration survived helm uninstall");
                    let gone = Api::<ClusterRole>::all(client.clone()).get_opt(&operator).await.unwrap();
                    assert!(gone.is_none(), "the ClusterRole survived helm uninstall");
                    let guard = format!("validatingadmissionpolicy/{release}-sidecar-guard");
                    let out = run_output(cluster.kubectl().args(["get", &guard])).await;
                    assert!(!out.status.success(), "the sidecar guard survived helm uninstall");
                    run_ok(cluster.kubectl().args(["get", "crd", "mcppolicies.toolgate.dev"])).await;
                })
                .await;
        })
        .await;
}

async fn installed_release_checks(cluster: &TestCluster, release: &str, release_ns: &str, apps: &str) {
    let client = cluster.client();
    let operator = format!("{release}-operator");

    // Every object of the release exists in the apiserver.
    let manifest = run_ok(cluster.helm().args(["get", "manifest", release, "--namespace", release_ns])).await;
    let objects = yaml_docs(&manifest);
    let mut installed: Vec<&str> = objects.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    installed.sort_unstable();
    assert_eq!(
        installed,
        [
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "MutatingWebhookConfiguration",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding"
        ]
    );
    let path = cluster.work_dir().join(format!("manifest-{release}.yaml"));
    std::fs::write(&path, &manifest).unwrap();
    let names = run_ok(cluster.kubectl().args(["get", "-o", "name", "-f"]).arg(&path)).await;
    assert_eq!(names.lines().count(), objects.len(), "{names}");
    run_ok(cluster.kubectl().args([
        "wait",
        "--for=condition=Established",
        "--timeout=90s",
        "crd/mcppolicies.toolgate.dev",
    ]))
    .await;
    let deployment = Api::<Deployment>::namespaced(client.clone(), release_ns).get(&operator).await.unwrap();
    assert_eq!(deployment.spec.unwrap().replicas, Some(2));

    // The chart's ServiceAccount can do what the operator needs, and no more.
    let token = cluster.mint_token(release_ns, &operator, &[], None).await;
    let sa = cluster.client_with_token(&token).await;
    // Each call below is one the operator makes (operator/src/main.rs, tls.rs, leader.rs,
    // acks.rs, controller.rs, auth.rs), with the same verb and patch type.
    let webhooks = Api::<MutatingWebhookConfiguration>::all(sa.clone());
    let ca_bundle = cluster.test_ca().ca_bundle();
    let ca_patch = json!([
        {"op": "test", "path": "/webhooks/0/name", "value": "inject.toolgate.dev"},
        {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": ca_bundle},
        {"op": "test", "path": "/webhooks/1/name", "value": "pod.inject.toolgate.dev"},
        {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": ca_bundle},
        {"op": "add", "path": "/webhooks/2/clientConfig/caBundle", "value": ca_bundle}
    ]);
    eventually("RBAC to let the operator patch its webhook configuration's caBundle", TIMEOUT, || async {
        webhooks.patch(&operator, &PatchParams::default(), &json_patch(ca_patch.clone())).await.ok()
    })
    .await;
    Api::<Pod>::all(sa.clone()).list(&ListParams::default()).await.expect("listing pods cluster-wide");
    Api::<Namespace>::all(sa.clone()).list_metadata(&ListParams::default()).await.expect("listing namespaces");
    let policies = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("toolgate.dev", "v1alpha1", "McpPolicy"),
        "mcppolicies",
    );
    eventually("the operator to list McpPolicies", TIMEOUT, || async {
        Api::<DynamicObject>::all_with(sa.clone(), &policies).list(&ListParams::default()).await.ok()
    })
    .await;
    let review: TokenReview = serde_json::from_value(json!({"spec": {"token": token}})).unwrap();
    Api::<TokenReview>::all(sa.clone()).create(&PostParams::default(), &review).await.expect("TokenReview");
    // Who it is (SelfSubjectReview, allowed to every authenticated user): the only user
    // whose McpApproval creations its webhook admits.
    let me = Api::<k8s_openapi::api::authentication::v1::SelfSubjectReview>::all(sa.clone())
        .create(&PostParams::default(), &Default::default())
        .await
        .expect("SelfSubjectReview");
    assert_eq!(
        me.status.and_then(|s| s.user_info).and_then(|u| u.username),
        Some(format!("system:serviceaccount:{release_ns}:{operator}"))
    );
    // Status of a policy (server-side apply on the status subresource) and an Event about it.
    let seed: DynamicObject =
        serde_norway::from_str(&read("examples/runpod-mcp/policies/seed.mcppolicy.yaml")).unwrap();
    Api::<DynamicObject>::namespaced_with(client.clone(), apps, &policies)
        .create(&PostParams::default(), &seed)
        .await
        .expect("creating the seed McpPolicy");
    let status =
        json!({"apiVersion": "toolgate.dev/v1alpha1", "kind": "McpPolicy", "status": {"targets": 0, "enforcing": 0}});
    Api::<DynamicObject>::namespaced_with(sa.clone(), apps, &policies)
        .patch_status("seed", &PatchParams::apply("toolgate-operator").force(), &Patch::Apply(&status))
        .await
        .expect("writing McpPolicy status");
    let event: Event = serde_json::from_value(json!({
        "metadata": {"name": "seed.toolgate-chart-test"},
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reportingController": "toolgate-operator",
        "reportingInstance": "operator-a",
        "action": "Validate",
        "reason": "InvalidPolicy",
        "type": "Warning",
        "regarding": {"apiVersion": "toolgate.dev/v1alpha1", "kind": "McpPolicy", "name": "seed", "namespace": apps}
    }))
    .unwrap();
    Api::<Event>::namespaced(sa.clone(), apps).create(&PostParams::default(), &event).await.expect("an Event");
    // The CA ConfigMap in a workload namespace (server-side apply creates and updates it),
    // but no other ConfigMap.
    let configmaps = Api::<ConfigMap>::namespaced(sa.clone(), apps);
    let ca_name = format!("{release}-ca");
    for value in ["x", "y"] {
        let cm =
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": ca_name}, "data": {"ca.crt": value}});
        configmaps
            .patch(&ca_name, &PatchParams::apply("toolgate-operator").force(), &Patch::Apply(&cm))
            .await
            .expect("publishing the CA ConfigMap");
    }
    let other: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "app-config"}})).unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), apps).create(&PostParams::default(), &other).await.unwrap();
    let data = json!({"data": {"ca.crt": "y"}});
    let denied = configmaps.patch("app-config", &PatchParams::default(), &Patch::Merge(&data)).await;
    assert!(is_forbidden(&denied), "the operator may patch any ConfigMap: {denied:?}");
    // Its serving-certificate Secret (get, create, replace), and no Secret of workloads.
    let denied = Api::<Secret>::namespaced(sa.clone(), apps).list(&ListParams::default()).await;
    assert!(is_forbidden(&denied), "the operator may read secrets of workloads: {denied:?}");
    let secrets = Api::<Secret>::namespaced(sa.clone(), release_ns);
    let tls_name = format!("{operator}-tls");
    assert!(secrets.get_opt(&tls_name).await.expect("reading the TLS secret").is_none());
    let tls: Secret = serde_json::from_value(json!({"metadata": {"name": tls_name}, "type": "Opaque"})).unwrap();
    let mut tls = secrets.create(&PostParams::default(), &tls).await.expect("creating the TLS secret");
    tls.metadata.labels = Some(BTreeMap::from([("rotated".to_owned(), "1".to_owned())]));
    secrets.replace(&tls_name, &PostParams::default(), &tls).await.expect("rotating the TLS secret");
    let other: Secret = serde_json::from_value(json!({"metadata": {"name": "other"}, "type": "Opaque"})).unwrap();
    Api::<Secret>::namespaced(client.clone(), release_ns).create(&PostParams::default(), &other).await.unwrap();
    let denied = secrets.replace("other", &PostParams::default(), &other).await;
    assert!(is_forbidden(&denied), "the operator may overwrite any Secret of its namespace: {denied:?}");
    // Leader election (create, replace) and the per-replica acknowledgement reports
    // (server-side apply, list by label, delete).
    let leases = Api::<Lease>::namespaced(sa.clone(), release_ns);
    let leader_name = format!("{operator}-leader");
    let lease: Lease =
        serde_json::from_value(json!({"metadata": {"name": leader_name}, "spec": {"holderIdentity": "operator-a"}}))
            .unwrap();
    let mut lease = leases.create(&PostParams::default(), &lease).await.expect("creating the leader lease");
    lease.spec.as_mut().unwrap().holder_identity = Some("operator-b".into());
    leases.replace(&leader_name, &PostParams::default(), &lease).await.expect("taking the leader lease");
    let report_name = format!("{leader_name}-acks-operator-a");
    let report = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": report_name, "labels": {"toolgate.dev/ack-report": "true"}},
        "spec": {"holderIdentity": "operator-a", "leaseDurationSeconds": 15}});
    leases
        .patch(&report_name, &PatchParams::apply("toolgate-operator").force(), &Patch::Apply(&report))
        .await
        .expect("publishing an acknowledgement report");
    let reports = leases.list(&ListParams::default().labels("toolgate.dev/ack-report=true")).await.unwrap();
    assert_eq!(reports.items.len(), 1);
    leases.delete(&report_name, &Default::default()).await.expect("deleting a stale report");
    // Nothing beyond that.
    let denied = Api::<Deployment>::namespaced(sa.clone(), release_ns).list(&ListParams::default()).await;
    assert!(is_forbidden(&denied), "{denied:?}");
    let denied = webhooks.delete(&operator, &Default::default()).await;
    assert!(matches!(&denied, Err(kube::Error::Api(e)) if e.code == 403), "{denied:?}");

    // The apiserver sends only opted-in pods to the webhook, which fails closed: with no
    // operator running, those are refused and every other pod is admitted.
    let pods = Api::<Pod>::namespaced(client.clone(), apps);
    let refused = eventually("the webhook to refuse a labelled pod", TIMEOUT, || {
        let pods = pods.clone();
        async move {
            let name = format!(
                "labelled-{}",
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000
            );
            api_error(
                pods.create(&PostParams::default(), &pod(&name, json!({"toolgate.dev/inject": "enabled"}), json!({})))
                    .await,
            )
        }
    })
    .await;
    assert!(refused.contains("failed calling webhook \"pod.inject.toolgate.dev\""), "{refused}");
    assert!(refused.contains(&operator), "the webhook calls the operator Service: {refused}");
    pods.create(&PostParams::default(), &pod("plain", json!({"app": "x"}), json!({})))
        .await
        .expect("an unlabelled pod");
    // Opting out is the namespace owner's choice, which only the operator can check: an
    // opted-out pod of an opted-in namespace goes to the webhook too (and fails closed here).
    let opted_out = api_error(
        pods.create(
            &PostParams::default(),
            &pod("opted-out", json!({"toolgate.dev/inject": "enabled"}), json!({"toolgate.dev/inject": "disabled"})),
        )
        .await,
    )
    .expect("an opted-out pod is refused while no operator answers");
    assert!(opted_out.contains("failed calling webhook \"pod.inject.toolgate.dev\""), "{opted_out}");
    Api::<Pod>::namespaced(client.clone(), release_ns)
        .create(&PostParams::default(), &pod("in-release-ns", json!({"toolgate.dev/inject": "enabled"}), json!({})))
        .await
        .expect("the release namespace is excluded");
    // A labelled namespace: all its pods are sent.
    let label = json!({"metadata": {"labels": {"toolgate.dev/inject": "enabled"}}});
    Api::<Namespace>::all(client.clone()).patch(apps, &PatchParams::default(), &Patch::Merge(&label)).await.unwrap();
    let refused = eventually("the webhook to refuse a pod of a labelled namespace", TIMEOUT, || {
        let pods = pods.clone();
        async move { api_error(pods.create(&PostParams::default(), &pod("in-labelled-ns", json!({}), json!({}))).await) }
    })
    .await;
    assert!(refused.contains("failed calling webhook \"inject.toolgate.dev\""), "{refused}");

    // helm upgrade with other values keeps the caBundle the operator patched in.
    run_ok(cluster.helm().args(["upgrade", release]).arg(chart()).args([
        "--namespace",
        release_ns,
        "--set",
        "operator.replicas=3",
    ]))
    .await;
    let deployment = Api::<Deployment>::namespaced(client.clone(), release_ns).get(&operator).await.unwrap();
    assert_eq!(deployment.spec.unwrap().replicas, Some(3));
    let config = Api::<MutatingWebhookConfiguration>::all(client.clone()).get(&operator).await.unwrap();
    for webhook in config.webhooks.unwrap() {
        let bundle = webhook.client_config.ca_bundle.expect("caBundle after helm upgrade");
        assert_eq!(
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &bundle.0),
            ca_bundle,
            "helm upgrade reset the caBundle of {}",
            webhook.name
        );
    }
}

#[tokio::test]
async fn chart_installs_with_every_option() {
    let cluster = TestCluster::shared();
    ensure_third_party_crds(cluster).await;
    let _serialized = INSTALLS.lock().await;
    cluster
        .with_temp_namespace(|release_ns| async move {
            cluster
                .with_temp_namespace(|apps| async move {
                    let release = release_for(&release_ns);
                    let namespaces = format!("networkPolicy.namespaces[0]={apps}");
                    let store = format!("counters.redis.namespaces[0]={apps}");
                    let sets = [
                        CERT_MANAGER,
                        MONITORING,
                        DASHBOARD,
                        &["networkPolicy.enabled=true", namespaces.as_str()],
                        &["counters.redis.deploy=true", store.as_str()],
                    ]
                    .concat();
                    helm_install(cluster, &release, &release_ns, &sets).await;
                    let client = cluster.client();
                    with_release(cluster, &release, &release_ns, || async {
                        let manifest =
                            run_ok(cluster.helm().args(["get", "manifest", &release, "--namespace", &release_ns]))
                                .await;
                        let objects = yaml_docs(&manifest);
                        let path = cluster.work_dir().join(format!("manifest-{release}.yaml"));
                        std::fs::write(&path, &manifest).unwrap();
                        let names = run_ok(cluster.kubectl().args(["get", "-o", "name", "-f"]).arg(&path)).await;
                        assert_eq!(names.lines().count(), objects.len(), "{names}");
                        for expected in [
                            "certificate.cert-manager.io/",
                            "issuer.cert-manager.io/",
                            "servicemonitor.monitoring.coreos.com/",
                            "podmonitor.monitoring.coreos.com/",
                            "prometheusrule.monitoring.coreos.com/",
                            "networkpolicy.networking.k8s.io/",
                            "configmap/",
                        ] {
                            assert!(names.contains(expected), "no {expected} in {names}");
                        }
                        let policy = Api::<NetworkPolicy>::namespaced(client.clone(), &apps)
                            .get(&format!("{release}-injected-pods"))
                            .await
                            .expect("the NetworkPolicy in the workload namespace");
                        assert_eq!(policy.spec.unwrap().policy_types, Some(vec!["Ingress".to_owned()]));
                        let config = Api::<MutatingWebhookConfiguration>::all(client.clone())
                            .get(&format!("{release}-operator"))
                            .await
                            .unwrap();
                        assert_eq!(
                            config.metadata.annotations.unwrap()["cert-manager.io/inject-ca-from"],
                            format!("{release_ns}/{release}-operator-serving")
                        );
                        // The counter store: its Secret in the workload namespace keeps its
                        // generated password across upgrades (the server's ACL with it).
                        let secrets = Api::<Secret>::namespaced(client.clone(), &apps);
                        let store_secret = format!("{release}-counter-store");
                        let password = |s: Secret| s.data.unwrap()["password"].0.clone();
                        let before = password(secrets.get(&store_secret).await.expect("the store Secret"));
                        assert!(before.len() >= 32);
                        let acl = Api::<Secret>::namespaced(client.clone(), &release_ns)
                            .get(&format!("{release}-counter-store-acl"))
                            .await
                            .expect("the store's ACL");
                        let acl = String::from_utf8(acl.data.unwrap()["users.acl"].0.clone()).unwrap();
                        assert!(acl.contains(&format!("user toolgate-{apps} on #")), "{acl}");
                        for kind in ["statefulset", "service", "networkpolicy"] {
                            run_ok(cluster.kubectl().args(["get", kind, &store_secret, "-n", &release_ns])).await;
                        }
                        let mut upgrade = cluster.helm();
                        upgrade.args(["upgrade", &release]).arg(chart()).args([
                            "--namespace",
                            &release_ns,
                            "--reuse-values",
                        ]);
                        run_ok(&mut upgrade).await;
                        let after = password(secrets.get(&store_secret).await.unwrap());
                        assert_eq!(before, after, "helm upgrade changed the store password");
                        let acl_after = Api::<Secret>::namespaced(client.clone(), &release_ns)
                            .get(&format!("{release}-counter-store-acl"))
                            .await
                            .unwrap();
                        assert_eq!(
                            String::from_utf8(acl_after.data.unwrap()["users.acl"].0.clone()).unwrap(),
                            acl,
                            "the same users and hashes after an upgrade"
                        );
                    })
                    .await;
                    let left = Api::<Secret>::namespaced(client.clone(), &apps)
                        .get_opt(&format!("{release}-counter-store"))
                        .await
                        .unwrap();
                    assert!(left.is_none(), "helm uninstall left the store's Secret in the workload namespace");
                    let left = Api::<NetworkPolicy>::namespaced(client.clone(), &apps)
                        .get_opt(&format!("{release}-injected-pods"))
                        .await
                        .unwrap();
                    assert!(left.is_none(), "helm uninstall left the workload namespace's NetworkPolicy");
                })
                .await;
        })
        .await;
}

// ------------------------------------------------------------------ examples

#[tokio::test]
async fn example_policies_are_valid_and_match_their_sources() {
    let dir = repo_root().join("examples/runpod-mcp/policies");
    let cases = [
        ("seed.mcppolicy.yaml", "seed", "examples/policies/seed-start-pod.json", "enforce"),
        ("runpod-4.0.0.mcppolicy.yaml", "runpod", "examples/policies/runpod-4.0.0.yaml", "enforce"),
        ("runpod-4.0.0-dryrun.mcppolicy.yaml", "runpod-dryrun", "examples/policies/runpod-4.0.0.yaml", "dryRun"),
    ];
    for (file, name, source, mode) in cases {
        let manifest: Value = serde_norway::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap();
        assert_eq!(manifest["apiVersion"], "toolgate.dev/v1alpha1", "{file}");
        assert_eq!(manifest["kind"], "McpPolicy", "{file}");
        assert_eq!(manifest["metadata"]["name"], name, "{file}");
        assert_eq!(manifest["spec"]["mode"], mode, "{file}");
        let mut spec = manifest["spec"].clone();
        let object = spec.as_object_mut().unwrap();
        object.remove("mode");
        object.remove("selector");
        let source_doc: Value = serde_norway::from_str(&read(source)).unwrap();
        assert!(spec == source_doc, "{file}: the spec is not {source} (regenerate it with `toolgate convert`)");
    }

    let cluster = TestCluster::shared();
    cluster.install_toolgate_crds().await;
    cluster
        .with_temp_namespace(|ns| async move {
            let out = eventually("kubectl to know McpPolicy", TIMEOUT, || async {
                let out =
                    run_output(cluster.kubectl().args(["apply", "--dry-run=server", "-n", &ns, "-f"]).arg(&dir)).await;
                out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
            })
            .await;
            for name in ["seed", "runpod", "runpod-dryrun"] {
                assert!(out.contains(&format!("mcppolicy.toolgate.dev/{name} created (server dry run)")), "{out}");
            }
            // The dry run validates: a bad mode is refused by the apiserver.
            let bad =
                read("examples/runpod-mcp/policies/seed.mcppolicy.yaml").replace("mode: enforce", "mode: sometimes");
            let path = cluster.work_dir().join(format!("bad-seed-{ns}.yaml"));
            std::fs::write(&path, bad).unwrap();
            let out =
                run_output(cluster.kubectl().args(["apply", "--dry-run=server", "-n", &ns, "-f"]).arg(&path)).await;
            assert!(!out.status.success());
            assert!(String::from_utf8_lossy(&out.stderr).contains("spec.mode"), "{out:?}");
        })
        .await;
}

#[tokio::test]
async fn example_workload_opts_in_and_is_reached_through_the_proxy() {
    let cluster = TestCluster::shared();
    let example = repo_root().join("examples/runpod-mcp");
    let rendered = run_ok(cluster.kubectl().arg("kustomize").arg(&example)).await;
    let docs = yaml_docs(&rendered);
    let namespace = find(&docs, "Namespace", "runpod-mcp");
    assert_eq!(namespace["metadata"]["labels"]["toolgate.dev/inject"], "enabled");
    let deployment = find(&docs, "Deployment", "runpod-mcp");
    let template = &deployment["spec"]["template"];
    assert_eq!(template["metadata"]["labels"]["toolgate.dev/inject"], "enabled");
    let upstream_port = template["metadata"]["annotations"]["toolgate.dev/upstream-port"].as_str().unwrap();
    let server = template["spec"]["containers"].as_array().unwrap().iter().find(|c| c["name"] == "runpod-mcp").unwrap();
    let port_env = server["env"].as_array().unwrap().iter().find(|e| e["name"] == "PORT").unwrap();
    assert_eq!(port_env["value"], upstream_port, "the sidecar forwards to the port the server listens on");
    assert!(server.get("ports").is_none(), "the server must not expose a port of its own");
    let service = find(&docs, "Service", "runpod-mcp");
    assert_eq!(service["spec"]["ports"][0]["targetPort"].to_string(), inject_default("proxy_port"));
    assert_eq!(&service["spec"]["selector"], &deployment["spec"]["selector"]["matchLabels"]);
    let config_map = docs.iter().find(|d| d["kind"] == "ConfigMap").expect("the generated ConfigMap");
    assert_eq!(config_map["data"]["server.mjs"].as_str().unwrap(), read("examples/runpod-mcp/server.mjs"));
    let package: Value = serde_json::from_str(&read("examples/runpod-mcp/package.json")).unwrap();
    assert_eq!(package["dependencies"]["@runpod/mcp-server"], "4.0.0");
    let lock: Value = serde_json::from_str(&read("examples/runpod-mcp/package-lock.json")).unwrap();
    assert_eq!(lock["packages"]["node_modules/@runpod/mcp-server"]["version"], "4.0.0");

    // The apiserver accepts the objects (in a test namespace instead of runpod-mcp).
    cluster
        .with_temp_namespace(|ns| async move {
            let objects: Vec<String> = docs
                .iter()
                .filter(|d| d["kind"] != "Namespace")
                .map(|d| {
                    let mut d = d.clone();
                    d["metadata"]["namespace"] = json!(ns);
                    serde_json::to_string(&d).unwrap()
                })
                .collect();
            let path = cluster.work_dir().join(format!("runpod-mcp-{ns}.json"));
            std::fs::write(&path, objects.join("\n")).unwrap();
            let out = run_ok(cluster.kubectl().args(["apply", "--dry-run=server", "-f"]).arg(&path)).await;
            assert!(out.contains("deployment.apps/runpod-mcp created (server dry run)"), "{out}");
            assert!(out.contains("service/runpod-mcp created (server dry run)"), "{out}");
        })
        .await;

    run_example_server().await;
}

/// The local addresses of the TCP sockets listening on `port` (from /proc/net/tcp{,6}).
fn tcp_listeners(port: u16) -> Vec<String> {
    let mut out = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(table) = std::fs::read_to_string(file) else { continue };
        for row in table.lines().skip(1) {
            let fields: Vec<&str> = row.split_whitespace().collect();
            let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else { continue };
            let Some((addr, hex_port)) = local.split_once(':') else { continue };
            if *state != "0A" || u16::from_str_radix(hex_port, 16).ok() != Some(port) {
                continue;
            }
            if v6 {
                out.push(format!("ipv6:{addr}"));
            } else {
                let n = u32::from_str_radix(addr, 16).unwrap();
                out.push(std::net::Ipv4Addr::from(n.swap_bytes()).to_string());
            }
        }
    }
    out
}

/// Runs examples/runpod-mcp/server.mjs with the RunPod MCP 4.0.0 package of tests/node:
/// it listens on 127.0.0.1 only and serves all 68 tools over Streamable HTTP.
async fn run_example_server() {
    let node_dir = repo_root().join("tests/node");
    let package = node_dir.join("node_modules/runpod-mcp-4");
    assert!(package.is_dir(), "tests/node/node_modules is missing: run `make node` (npm ci) first");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(repo_root().join("examples/runpod-mcp/server.mjs"), dir.path().join("server.mjs")).unwrap();
    std::fs::create_dir_all(dir.path().join("node_modules/@runpod")).unwrap();
    std::os::unix::fs::symlink(&package, dir.path().join("node_modules/@runpod/mcp-server")).unwrap();

    let mut server = tokio::process::Command::new("node")
        .current_dir(dir.path())
        .arg("server.mjs")
        .env("PORT", "0")
        .env("MCP_SKIP_CREDENTIAL_CHECK", "true")
        // Nowhere: listing tools calls no API.
        .env("RUNPOD_API_BASE_URL", "http://127.0.0.1:9")
        .env_remove("POSTHOG_API_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("running node");
    let mut stdout = tokio::io::BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(TIMEOUT, stdout.read_line(&mut line)).await.expect("the server's first line").unwrap();
    let port: u16 = line
        .trim()
        .strip_prefix("LISTENING ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("server.mjs did not print LISTENING <port>: {line:?}"));

    // Bound to the loopback address only: nothing but the sidecar can reach it in a pod.
    let listeners = tcp_listeners(port);
    assert_eq!(listeners, ["127.0.0.1"], "server.mjs listens on {listeners:?}");

    let (status, body) = http_get(&format!("http://127.0.0.1:{port}/healthz")).await.unwrap();
    assert!(status.is_success() && body.trim() == "ok", "{status} {body}");

    let listing = dir.path().join("list.jsonl");
    let mut client = tokio::process::Command::new("node")
        .current_dir(&node_dir)
        .args([
            "mcp-client.mjs",
            "--url",
            &format!("http://127.0.0.1:{port}/mcp"),
            "--header",
            "Authorization: Bearer test",
        ])
        .stdin(Stdio::piped())
        // A file, not a pipe: mcp-client.mjs exits before Node has flushed more than 64 KiB
        // into a pipe, and the 68 tools' schemas are larger.
        .stdout(std::fs::File::create(&listing).unwrap())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("running mcp-client.mjs");
    let mut stdin = client.stdin.take().unwrap();
    stdin.write_all(br#"[{"op":"list"}]"#).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(TIMEOUT, client.wait_with_output()).await.expect("mcp-client.mjs finished").unwrap();
    let text = std::fs::read_to_string(&listing).unwrap();
    let step: Value = serde_json::from_str(text.lines().next().unwrap_or_default()).unwrap_or_else(|e| {
        let head: String = text.chars().take(300).collect();
        panic!("mcp-client.mjs: {e}: {head}… {}", String::from_utf8_lossy(&out.stderr))
    });
    assert_eq!(step["ok"], true, "{step}");
    let tools: Vec<&str> =
        step["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(tools.len(), 68, "{tools:?}");
    assert!(tools.contains(&"pod-action") && tools.contains(&"delete-pod"), "{tools:?}");
    let _ = server.kill().await;
}
