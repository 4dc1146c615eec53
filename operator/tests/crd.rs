//! The generated `McpPolicy` CRD (the committed `crds/` file) against a real kube-apiserver:
//! the seed policy is accepted as is, the schema and its CEL rule refuse what they can with
//! a clear message, and kubectl shows the short name, the printer columns and field docs.

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use toolgate_operator::{McpPolicy, Mode};
use toolgate_tests::{TestCluster, eventually, run_ok, run_output};

const TIMEOUT: Duration = Duration::from_secs(90);

/// The seed policy of the README, as YAML under `spec:` (4 spaces deep).
const SEED_SPEC: &str = r#"    version: "1"
    default: deny
    tools:
      start-pod:
        limits:
        - counter: start-pod_rate
          window: minute
          max: 10
          scope: grant
"#;

fn dedent(spec: &str) -> String {
    spec.lines().map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l))).collect()
}

fn manifest(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: toolgate.dev/v1alpha1\nkind: McpPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}"
    )
}

/// `kubectl apply` of a manifest; `Ok(stdout)` or `Err(stderr)`.
async fn apply(cluster: &TestCluster, ns: &str, yaml: &str) -> Result<String, String> {
    let path = cluster.work_dir().join(format!("{ns}-{}.yaml", yaml.len()));
    std::fs::write(&path, yaml).expect("writing the manifest");
    let out = run_output(cluster.kubectl().arg("apply").arg("-f").arg(&path)).await;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Like [`apply`] for a manifest that must be accepted; retries while kubectl's discovery
/// of the new CRD catches up.
async fn apply_ok(cluster: &TestCluster, ns: &str, yaml: &str) {
    eventually("kubectl to apply the McpPolicy", TIMEOUT, || async {
        match apply(cluster, ns, yaml).await {
            Ok(_) => Some(()),
            Err(e) => {
                eprintln!("retrying: {e}");
                None
            }
        }
    })
    .await;
}

#[tokio::test]
async fn the_seed_policy_is_accepted_and_listed_with_its_columns() {
    let cluster = TestCluster::shared();
    cluster.install_toolgate_crds().await;
    cluster
        .with_temp_namespace(|ns| async move {
            apply_ok(cluster, &ns, &manifest(&ns, "seed", SEED_SPEC)).await;

            // Read back typed: the document is intact and the schema default set the mode.
            let api: Api<McpPolicy> = Api::namespaced(cluster.client(), &ns);
            let stored = api.get("seed").await.expect("reading the McpPolicy");
            assert_eq!(stored.spec.mode, Mode::Enforce);
            let seed = toolgate_policy::parse_document(&dedent(SEED_SPEC)).expect("seed parses");
            assert_eq!(stored.spec.policy, seed);
            assert_eq!(stored.spec.policy.tools["start-pod"].limits[0].max, 10);

            // The status subresource takes what the controller will write, and the printer
            // columns show it.
            let status = json!({"status": {
                "conditions": [{"type": "Accepted", "status": "True", "reason": "Valid", "message": "ok",
                                "lastTransitionTime": "2025-01-01T00:00:00Z", "observedGeneration": 1},
                               {"type": "Ready", "status": "False", "reason": "Unprotected", "message": "c",
                                "lastTransitionTime": "2025-01-01T00:00:00Z", "observedGeneration": 1}],
                "observedGeneration": 1, "targets": 3, "enforcing": 2, "unprotected": 1,
            }});
            api.patch_status("seed", &PatchParams::default(), &Patch::Merge(&status)).await.expect("status patch");

            let table = run_ok(cluster.kubectl().args(["get", "mcpp", "-n", &ns])).await;
            let mut lines = table.lines();
            let header: Vec<&str> = lines.next().expect("a header").split_whitespace().collect();
            assert_eq!(
                header,
                ["NAME", "MODE", "ACCEPTED", "READY", "TARGETS", "ENFORCING", "UNPROTECTED", "AGE"],
                "{table}"
            );
            let row: Vec<&str> = lines.next().expect("a row").split_whitespace().collect();
            assert_eq!(row[..7], ["seed", "enforce", "True", "False", "3", "2", "1"], "{table}");

            // The category lists it too.
            let by_category = run_ok(cluster.kubectl().args(["get", "toolgate", "-n", &ns, "-o", "name"])).await;
            assert_eq!(by_category.trim(), "mcppolicy.toolgate.dev/seed");
        })
        .await;
}

#[tokio::test]
async fn selector_and_dry_run_are_accepted() {
    let cluster = TestCluster::shared();
    cluster.install_toolgate_crds().await;
    cluster
        .with_temp_namespace(|ns| async move {
            let spec = format!("    mode: dryRun\n    selector:\n      matchLabels: {{app: agent}}\n{SEED_SPEC}");
            apply_ok(cluster, &ns, &manifest(&ns, "dry", &spec)).await;
            let api: Api<McpPolicy> = Api::namespaced(cluster.client(), &ns);
            let stored = api.get("dry").await.expect("reading the McpPolicy");
            assert_eq!(stored.spec.mode, Mode::DryRun);
            let labels = stored.spec.selector.match_labels.expect("matchLabels");
            assert_eq!(labels.get("app").map(String::as_str), Some("agent"));
        })
        .await;
}

#[tokio::test]
async fn invalid_policies_are_refused_by_the_schema_with_the_field_named() {
    let cluster = TestCluster::shared();
    cluster.install_toolgate_crds().await;
    cluster
        .with_temp_namespace(|ns| async move {
            // Wait until the CRD is usable with a valid object, so that refusals below are
            // the schema's and not discovery lag.
            apply_ok(cluster, &ns, &manifest(&ns, "valid", SEED_SPEC)).await;

            let cases = [
                ("ten", SEED_SPEC.replace("max: 10", "max: ten"), "spec.tools.start-pod.limits[0].max"),
                ("mode", format!("    mode: audit\n{SEED_SPEC}"), "Unsupported value: \"audit\""),
                ("scope", SEED_SPEC.replace("scope: grant", "scope: team"), "spec.tools.start-pod.limits[0].scope"),
                ("version", SEED_SPEC.replace("\"1\"", "\"2\""), "spec.version must be \"1\""),
                ("missing", SEED_SPEC.replace("    version: \"1\"\n", ""), "spec.version: Required value"),
                ("typo", format!("    defualt: allow\n{SEED_SPEC}"), "unknown field \"spec.defualt\""),
            ];
            for (name, spec, expected) in cases {
                let err = apply(cluster, &ns, &manifest(&ns, name, &spec))
                    .await
                    .expect_err(&format!("case {name} must be refused"));
                assert!(err.contains(expected), "case {name}: expected {expected:?} in:\n{err}");
            }
            // Nothing but the valid one was stored.
            let names = run_ok(cluster.kubectl().args(["get", "mcpp", "-n", &ns, "-o", "name"])).await;
            assert_eq!(names.trim(), "mcppolicy.toolgate.dev/valid");
        })
        .await;
}

#[tokio::test]
async fn kubectl_explain_shows_the_field_docs() {
    let cluster = TestCluster::shared();
    cluster.install_toolgate_crds().await;
    let text = eventually("kubectl explain to know McpPolicy", TIMEOUT, || async {
        let out = run_output(cluster.kubectl().args(["explain", "mcppolicy.spec.tools"])).await;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .await;
    assert!(text.contains("Rules per tool"), "{text}");
    let limits = run_ok(cluster.kubectl().args(["explain", "mcpp.spec.tools.limits.window"])).await;
    assert!(limits.contains("a duration such as"), "{limits}");
    let mode = run_ok(cluster.kubectl().args(["explain", "mcpp.spec.mode"])).await;
    assert!(mode.contains("dryRun"), "{mode}");
}
