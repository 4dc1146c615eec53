//! The injection function against JSON fixtures (`tests/fixtures/inject/*.json`): each has
//! `namespaceLabels`, a `pod`, and either the expected `skip` reason or the expected
//! `patch`. `TOOLGATE_BLESS=1 cargo test -p toolgate-operator --test inject` rewrites the
//! `patch` of the fixtures that inject (review the diff before committing).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use toolgate_operator::inject::{InjectConfig, Skip, inject};

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixture directory")
        .map(|e| e.expect("fixture entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "fixtures missing in {}", dir.display());
    files
}

struct Case {
    file: PathBuf,
    raw: Value,
    pod: Pod,
    ns_labels: BTreeMap<String, String>,
}

fn load(file: &Path) -> Case {
    let text = std::fs::read_to_string(file).expect("read fixture");
    let raw: Value = serde_json::from_str(&text).expect("fixture is JSON");
    let pod = serde_json::from_value(raw["pod"].clone()).expect("fixture pod");
    let ns_labels = serde_json::from_value(raw["namespaceLabels"].clone()).expect("namespaceLabels");
    Case { file: file.to_owned(), raw, pod, ns_labels }
}

fn apply(pod: &Pod, patch: &json_patch::Patch) -> Pod {
    let mut value = serde_json::to_value(pod).expect("pod to JSON");
    json_patch::patch(&mut value, patch).expect("the patch applies to the pod");
    serde_json::from_value(value).expect("the patched pod is a Pod")
}

#[test]
fn every_fixture_gets_its_patch_or_skip_reason() {
    let config = InjectConfig::default();
    let bless = std::env::var_os("TOOLGATE_BLESS").is_some();
    for file in fixtures() {
        let mut case = load(&file);
        let name = case.file.display().to_string();
        let result = inject(&case.pod, &case.ns_labels, &config);
        match (&case.raw["skip"], result) {
            (Value::String(reason), Err(skip)) => assert_eq!(skip.as_str(), reason, "{name}"),
            (Value::String(reason), Ok(patch)) => panic!("{name}: expected skip {reason}, got {patch:?}"),
            (_, Err(skip)) => panic!("{name}: unexpected skip {skip:?}"),
            (_, Ok(patch)) => {
                let got = serde_json::to_value(&patch).expect("patch to JSON");
                if bless {
                    case.raw["patch"] = got;
                    let text = serde_json::to_string_pretty(&case.raw).expect("fixture to JSON");
                    std::fs::write(&case.file, text + "\n").expect("write fixture");
                } else {
                    assert_eq!(got, case.raw["patch"], "{name}: patch differs (TOOLGATE_BLESS=1 to update)");
                }
            }
        }
    }
}

#[test]
fn injected_pods_have_a_native_sidecar_and_are_not_injected_twice() {
    let config = InjectConfig::default();
    let mut injected = 0;
    for file in fixtures() {
        let case = load(&file);
        let Ok(patch) = inject(&case.pod, &case.ns_labels, &config) else { continue };
        injected += 1;
        let pod = apply(&case.pod, &patch);
        let spec = pod.spec.as_ref().expect("spec");
        let init = spec.init_containers.as_ref().expect("init containers");
        let sidecar = &init[0];
        assert_eq!(sidecar.name, "toolgate-proxy");
        assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
        let before = case.pod.spec.as_ref().and_then(|s| s.init_containers.as_ref()).map_or(0, Vec::len);
        assert_eq!(init.len(), before + 1, "other init containers are kept");
        let security = sidecar.security_context.as_ref().expect("securityContext");
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(security.read_only_root_filesystem, Some(true));
        let probe = sidecar.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("readiness");
        assert_eq!(probe.path.as_deref(), Some("/readyz"));
        let volume = spec.volumes.iter().flatten().find(|v| v.name == "toolgate-token").expect("token volume");
        let token = serde_json::to_value(volume).expect("volume JSON");
        assert_eq!(token["projected"]["sources"][0]["serviceAccountToken"]["audience"], json!("toolgate"));
        assert!(sidecar.resources.as_ref().and_then(|r| r.requests.as_ref()).is_some());
        let annotations = pod.metadata.annotations.as_ref().expect("annotations");
        assert!(annotations.contains_key("toolgate.dev/injected"));

        // Re-invocation (reinvocationPolicy, or the same pod submitted again) changes nothing.
        assert_eq!(inject(&pod, &case.ns_labels, &config).map(|_| ()), Err(Skip::AlreadyInjected));
    }
    assert!(injected >= 2, "fixtures with an injection");
}

#[test]
fn upstream_port_comes_from_the_annotation_or_the_first_container_port() {
    let config = InjectConfig::default();
    let upstream = |file: &str| {
        let case = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject").join(file));
        let pod = apply(&case.pod, &inject(&case.pod, &case.ns_labels, &config).expect("injects"));
        let init = pod.spec.expect("spec").init_containers.expect("init");
        let args = init[0].args.clone().expect("args");
        let annotations = pod.metadata.annotations.expect("annotations");
        (args.into_iter().find(|a| a.starts_with("--upstream=")).expect("--upstream"), annotations)
    };
    let (arg, annotations) = upstream("labelled-pod.json");
    assert_eq!(arg, "--upstream=http://127.0.0.1:3000/mcp");
    assert_eq!(annotations.get("prometheus.io/port").map(String::as_str), Some("15090"));
    let (arg, annotations) = upstream("namespace-labelled-annotated-port.json");
    assert_eq!(arg, "--upstream=http://127.0.0.1:8000/v1/mcp");
    // The app's own scrape annotations are left alone.
    assert!(!annotations.contains_key("prometheus.io/port"));
}

#[test]
fn allowed_hosts_and_origins_reach_the_sidecar_only_when_configured() {
    let sidecar_args = |config: &InjectConfig| {
        let case = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject/labelled-pod.json"));
        let pod = apply(&case.pod, &inject(&case.pod, &case.ns_labels, config).expect("injects"));
        pod.spec.expect("spec").init_containers.expect("init")[0].args.clone().expect("args")
    };
    // By default the sidecar's own defaults apply (localhost, IPs, Service names).
    let args = sidecar_args(&InjectConfig::default());
    assert!(!args.iter().any(|a| a.starts_with("--allowed-")), "{args:?}");
    let config = InjectConfig {
        allowed_hosts: vec!["runpod-mcp.agents".into(), "*.mcp.example.com".into()],
        allowed_origins: vec!["https://console.example.com".into()],
        ..InjectConfig::default()
    };
    let args = sidecar_args(&config);
    assert!(args.contains(&"--allowed-hosts=runpod-mcp.agents,*.mcp.example.com".to_owned()), "{args:?}");
    assert!(args.contains(&"--allowed-origins=https://console.example.com".to_owned()), "{args:?}");
}
