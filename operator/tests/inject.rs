//! The injection function against JSON fixtures (`tests/fixtures/inject/*.json`): each has
//! `namespaceLabels`, a `pod`, and either the expected `skip` reason (with `refused`:
//! whether the webhook refuses the pod rather than admitting it unchanged) or the expected
//! `patch`. `TOOLGATE_BLESS=1 cargo test -p toolgate-operator --test inject` rewrites the
//! `patch` of the fixtures that inject (review the diff before committing).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use toolgate_operator::inject::{InjectConfig, Skip, holds_injected_sidecar, inject};

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
            (Value::String(reason), Err(skip)) => {
                assert_eq!(skip.as_str(), reason, "{name}");
                let refused = case.raw["refused"].as_bool().expect("a skip fixture says whether it is refused");
                assert_eq!(skip.refused(), refused, "{name}");
                if refused {
                    assert!(skip.metric_label().starts_with("refused_"), "{name}");
                    assert!(skip.message().contains(':'), "{name}: says why and how to fix it");
                }
            }
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

fn injected(file: &str) -> (Pod, BTreeMap<String, String>) {
    let case = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject").join(file));
    let patch = inject(&case.pod, &case.ns_labels, &InjectConfig::default()).expect("injects");
    (apply(&case.pod, &patch), case.ns_labels)
}

fn edit(pod: &Pod, f: impl FnOnce(&mut Value)) -> Pod {
    let mut value = serde_json::to_value(pod).expect("pod to JSON");
    f(&mut value);
    serde_json::from_value(value).expect("still a Pod")
}

#[test]
fn an_injected_pod_is_readmitted_with_the_apiservers_defaults_but_not_with_a_changed_sidecar() {
    let config = InjectConfig::default();
    let (pod, ns) = injected("namespace-labelled-annotated-port.json");
    // What the apiserver's defaulting adds to the injected sidecar is accepted.
    let defaulted = edit(&pod, |p| {
        let c = &mut p["spec"]["initContainers"][0];
        c["terminationMessagePath"] = json!("/dev/termination-log");
        c["terminationMessagePolicy"] = json!("File");
        c["imagePullPolicy"] = json!("IfNotPresent");
        c["readinessProbe"]["timeoutSeconds"] = json!(1);
        c["readinessProbe"]["httpGet"]["scheme"] = json!("HTTP");
        c["env"][0]["valueFrom"]["fieldRef"]["apiVersion"] = json!("v1");
        // The ServiceAccount admission plugin mounts the API token into every container.
        c["volumeMounts"].as_array_mut().unwrap().push(json!({
            "name": "kube-api-access-x7k2q", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}));
    });
    assert_eq!(inject(&defaulted, &ns, &config).map(|_| ()), Err(Skip::AlreadyInjected));

    let refused = |what: &str, f: &dyn Fn(&mut Value), want: Skip| {
        let changed = edit(&pod, f);
        assert_eq!(inject(&changed, &ns, &config).map(|_| ()), Err(want), "{what}");
        assert!(want.refused(), "{what}");
    };
    refused(
        "another image",
        &|p| p["spec"]["initContainers"][0]["image"] = json!("example.com/passthrough:1"),
        Skip::ForeignSidecar,
    );
    refused(
        "a command",
        &|p| p["spec"]["initContainers"][0]["command"] = json!(["sleep", "infinity"]),
        Skip::ForeignSidecar,
    );
    refused(
        "other args",
        &|p| p["spec"]["initContainers"][0]["args"][2] = json!("--upstream=http://127.0.0.1:1/mcp"),
        Skip::ForeignSidecar,
    );
    refused(
        "an extra volume mount",
        &|p| {
            p["spec"]["initContainers"][0]["volumeMounts"]
                .as_array_mut()
                .unwrap()
                .push(json!({"name": "data", "mountPath": "/data"}))
        },
        Skip::ForeignSidecar,
    );
    refused(
        "a writable mount at the API token's path",
        &|p| {
            p["spec"]["initContainers"][0]["volumeMounts"].as_array_mut().unwrap().push(json!({
                "name": "kube-api-access-x7k2q", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}))
        },
        Skip::ForeignSidecar,
    );
    refused(
        "the state volume on the host",
        &|p| {
            for v in p["spec"]["volumes"].as_array_mut().unwrap() {
                if v["name"] == "toolgate-state" {
                    *v = json!({"name": "toolgate-state", "hostPath": {"path": "/tmp"}});
                }
            }
        },
        Skip::ForeignSidecar,
    );
    refused(
        "the sidecar not first",
        &|p| p["spec"]["initContainers"].as_array_mut().unwrap().swap(0, 1),
        Skip::ForeignSidecar,
    );
    refused(
        "a second toolgate-proxy among the app containers",
        &|p| {
            let mut c = p["spec"]["containers"][0].clone();
            c["name"] = json!("toolgate-proxy");
            p["spec"]["containers"].as_array_mut().unwrap().push(c);
        },
        Skip::ForeignSidecar,
    );
    refused(
        "the sidecar without the marker",
        &|p| {
            p["metadata"]["annotations"].as_object_mut().unwrap().remove("toolgate.dev/injected");
        },
        Skip::ForeignSidecar,
    );
    refused(
        "the marker without the sidecar",
        &|p| {
            p["spec"]["initContainers"].as_array_mut().unwrap().remove(0);
        },
        Skip::FakeMarker,
    );
    refused("then hostNetwork", &|p| p["spec"]["hostNetwork"] = json!(true), Skip::HostNetwork);
}

#[test]
fn opting_out_is_the_namespace_owners_choice() {
    let config = InjectConfig::default();
    let case = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject/opted-out.json"));
    let mut ns = case.ns_labels.clone();
    assert_eq!(inject(&case.pod, &ns, &config).map(|_| ()), Err(Skip::OptOutNotAllowed));
    assert!(Skip::OptOutNotAllowed.message().contains("toolgate.dev/allow-opt-out=true"));
    ns.insert("toolgate.dev/allow-opt-out".into(), "yes".into());
    assert_eq!(inject(&case.pod, &ns, &config).map(|_| ()), Err(Skip::OptOutNotAllowed), "only `true`");
    ns.insert("toolgate.dev/allow-opt-out".into(), "true".into());
    assert_eq!(inject(&case.pod, &ns, &config).map(|_| ()), Err(Skip::OptedOut));
    assert!(!Skip::OptedOut.refused());
}

#[test]
fn only_a_pod_holding_the_injected_sidecar_counts_as_protected() {
    use toolgate_operator::inject::holds_injected_sidecar;
    let config = InjectConfig::default();
    let (pod, _) = injected("labelled-pod.json");
    assert!(holds_injected_sidecar(&pod, &config));
    // Labels and annotations do not matter either way: the namespace label may be gone,
    // the pod may carry the opt-out annotation afterwards.
    let relabelled = edit(&pod, |p| {
        p["metadata"]["labels"] = json!({});
        p["metadata"]["annotations"]["toolgate.dev/inject"] = json!("disabled");
    });
    assert!(holds_injected_sidecar(&relabelled, &config));
    // A pod without the sidecar, however it is labelled and annotated, is not protected.
    let case = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject/labelled-pod.json"));
    let faked = edit(&case.pod, |p| {
        p["metadata"]["labels"]["toolgate.dev/injected"] = json!("true");
        p["metadata"]["annotations"] = json!({"toolgate.dev/inject": "disabled", "toolgate.dev/injected": "0.1.0"});
    });
    assert!(!holds_injected_sidecar(&faked, &config));
    // Another image, other args, or another operator configuration: not the injected sidecar.
    let reimaged = edit(&pod, |p| p["spec"]["initContainers"][0]["image"] = json!("example.com/passthrough:1"));
    assert!(!holds_injected_sidecar(&reimaged, &config));
    let rewired =
        edit(&pod, |p| p["spec"]["initContainers"][0]["args"][3] = json!("--operator=https://evil.example:8443"));
    assert!(!holds_injected_sidecar(&rewired, &config));
    let other = InjectConfig { image: "registry.example/toolgate-proxy:9".into(), ..InjectConfig::default() };
    assert!(!holds_injected_sidecar(&pod, &other));
    let host = edit(&pod, |p| p["spec"]["hostNetwork"] = json!(true));
    assert!(!holds_injected_sidecar(&host, &config));
}

/// The Secret a pod names for its upstream credential is mounted read-only into the
/// sidecar only, and the sidecar is told to set it; the app container never gets it.
#[test]
fn the_upstream_credential_secret_reaches_the_sidecar_only() {
    let config = InjectConfig::default();
    let (pod, ns) = injected("upstream-credential-secret.json");
    let spec = pod.spec.as_ref().expect("spec");
    let sidecar = &spec.init_containers.as_ref().expect("init")[0];
    let args = sidecar.args.clone().expect("args");
    for want in [
        "--upstream-credential-file=/var/run/secrets/toolgate-upstream/credential",
        "--upstream-credential-header=authorization",
        "--upstream-credential-scheme=Bearer",
        "--api-keys-file=/var/run/secrets/toolgate-api-keys/api-keys",
    ] {
        assert!(args.contains(&want.to_owned()), "{want} in {args:?}");
    }
    let mount = sidecar.volume_mounts.iter().flatten().find(|m| m.name == "toolgate-upstream-credential").unwrap();
    assert_eq!(mount.read_only, Some(true));
    let volume = spec.volumes.iter().flatten().find(|v| v.name == "toolgate-upstream-credential").unwrap();
    let secret = volume.secret.as_ref().expect("a Secret volume");
    assert_eq!(secret.secret_name.as_deref(), Some("runpod-api-key"));
    assert_eq!(serde_json::to_value(&secret.items).unwrap(), json!([{"key": "api-key", "path": "credential"}]));
    for app in &spec.containers {
        assert!(app.volume_mounts.is_none(), "the app container mounts nothing of the sidecar's: {app:?}");
    }
    assert!(holds_injected_sidecar(&pod, &config));

    // Per-pod key, header and scheme.
    let case =
        load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject/upstream-credential-secret.json"));
    let custom = edit(&case.pod, |p| {
        let a = &mut p["metadata"]["annotations"];
        a["toolgate.dev/upstream-credential-key"] = json!("token");
        a["toolgate.dev/upstream-credential-header"] = json!("X-Api-Key");
        a["toolgate.dev/upstream-credential-scheme"] = json!("");
    });
    let injected_custom = apply(&custom, &inject(&custom, &case.ns_labels, &config).expect("injects"));
    let spec = injected_custom.spec.as_ref().unwrap();
    let args = spec.init_containers.as_ref().unwrap()[0].args.clone().unwrap();
    assert!(args.contains(&"--upstream-credential-header=x-api-key".to_owned()), "{args:?}");
    assert!(args.contains(&"--upstream-credential-scheme=".to_owned()), "{args:?}");
    let volume = spec.volumes.iter().flatten().find(|v| v.name == "toolgate-upstream-credential").unwrap();
    assert_eq!(volume.secret.as_ref().unwrap().items.as_ref().unwrap()[0].key, "token");

    // After creation, the credential volume is part of what the sidecar is: a pod whose
    // volume names another Secret, or whose app mounts it, is not the injected sidecar.
    let other_secret = edit(&pod, |p| {
        for v in p["spec"]["volumes"].as_array_mut().unwrap() {
            if v["name"] == "toolgate-upstream-credential" {
                v["secret"]["secretName"] = json!("someone-elses-key");
            }
        }
    });
    assert_eq!(inject(&other_secret, &ns, &config).map(|_| ()), Err(Skip::ForeignSidecar));
    assert!(!holds_injected_sidecar(&other_secret, &config));
    let app_mounts = edit(&pod, |p| {
        p["spec"]["containers"][0]["volumeMounts"] =
            json!([{"name": "toolgate-upstream-credential", "mountPath": "/key", "readOnly": true}]);
    });
    assert_eq!(inject(&app_mounts, &ns, &config).map(|_| ()), Err(Skip::SidecarVolumeInApp));
    assert!(!holds_injected_sidecar(&app_mounts, &config));
    let debug = edit(&pod, |p| {
        p["spec"]["ephemeralContainers"] = json!([{"name": "debug", "image": "busybox",
            "volumeMounts": [{"name": "toolgate-upstream-credential", "mountPath": "/key"}]}]);
    });
    assert_eq!(inject(&debug, &ns, &config).map(|_| ()), Err(Skip::SidecarVolumeInApp));
    assert!(Skip::SidecarVolumeInApp.message().contains("toolgate-upstream-credential"));
}

#[test]
fn bad_credential_annotations_are_refused() {
    let config = InjectConfig::default();
    let case = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject/labelled-pod.json"));
    for (key, value) in [
        ("toolgate.dev/upstream-credential-secret", ""),
        ("toolgate.dev/upstream-credential-secret", "-key"),
        ("toolgate.dev/upstream-credential-secret", "a/b"),
        ("toolgate.dev/api-keys-secret", "Keys"),
    ] {
        let pod = edit(&case.pod, |p| p["metadata"]["annotations"] = json!({key: value}));
        assert_eq!(inject(&pod, &case.ns_labels, &config).map(|_| ()), Err(Skip::BadCredentialAnnotation), "{value:?}");
    }
    for (key, value) in [
        ("toolgate.dev/upstream-credential-key", "a/b"),
        ("toolgate.dev/upstream-credential-header", "x y"),
        ("toolgate.dev/upstream-credential-header", "x:\r\ny"),
        ("toolgate.dev/upstream-credential-scheme", "Bearer x"),
    ] {
        let pod = edit(&case.pod, |p| {
            p["metadata"]["annotations"] = json!({"toolgate.dev/upstream-credential-secret": "k", key: value});
        });
        assert_eq!(inject(&pod, &case.ns_labels, &config).map(|_| ()), Err(Skip::BadCredentialAnnotation), "{value:?}");
    }
    assert!(InjectConfig { credential_header: "a b".into(), ..InjectConfig::default() }.check().is_err());
    assert!(InjectConfig { credential_scheme: String::new(), ..InjectConfig::default() }.check().is_ok());
    assert!(InjectConfig { k8s_issuer: "http://x".into(), ..InjectConfig::default() }.check().is_err());
}

/// With a service-account audience configured, the sidecar authenticates callers by their
/// projected tokens and reads the cluster's keys with its own API token and CA.
#[test]
fn sidecars_accept_service_account_tokens_when_configured() {
    let config = InjectConfig { k8s_audience: Some("toolgate-mcp".into()), ..InjectConfig::default() };
    let case = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject/labelled-pod.json"));
    let pod = apply(&case.pod, &inject(&case.pod, &case.ns_labels, &config).expect("injects"));
    let spec = pod.spec.as_ref().unwrap();
    let args = spec.init_containers.as_ref().unwrap()[0].args.clone().unwrap();
    for want in [
        "--k8s-token-audience=toolgate-mcp",
        "--k8s-issuer=https://kubernetes.default.svc.cluster.local",
        "--k8s-api-token-file=/var/run/secrets/toolgate/kube-api-token",
        "--k8s-ca-file=/var/run/secrets/toolgate/kube-ca.crt",
    ] {
        assert!(args.contains(&want.to_owned()), "{want} in {args:?}");
    }
    let token = spec.volumes.iter().flatten().find(|v| v.name == "toolgate-token").unwrap();
    let sources = serde_json::to_value(token).unwrap()["projected"]["sources"].clone();
    assert_eq!(sources[2], json!({"serviceAccountToken": {"expirationSeconds": 3600, "path": "kube-api-token"}}));
    assert_eq!(sources[3]["configMap"]["name"], "kube-root-ca.crt");
    assert_eq!(inject(&pod, &case.ns_labels, &config).map(|_| ()), Err(Skip::AlreadyInjected));
    // Without it, nothing of that.
    let plain = apply(&case.pod, &inject(&case.pod, &case.ns_labels, &InjectConfig::default()).unwrap());
    let args = plain.spec.unwrap().init_containers.unwrap()[0].args.clone().unwrap();
    assert!(!args.iter().any(|a| a.starts_with("--k8s-")), "{args:?}");
}

fn store_config() -> InjectConfig {
    use toolgate_operator::inject::CounterStoreConfig;
    InjectConfig {
        counter_store: Some(CounterStoreConfig {
            url: "redis://toolgate-counter-store.toolgate-system.svc:6379".into(),
            prefix: "toolgate:".into(),
            secret: "toolgate-counter-store".into(),
            ca: false,
            on_failure: "closed".into(),
            timeout_ms: 250,
        }),
        ..InjectConfig::default()
    }
}

/// The injected pod in `namespace` (as the webhook sees it: the namespace's name label).
fn injected_in(namespace: &str, config: &InjectConfig) -> Pod {
    let case = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject/labelled-pod.json"));
    let labels = BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), namespace.to_owned())]);
    let mut pod = apply(&case.pod, &inject(&case.pod, &labels, config).expect("injects"));
    pod.metadata.namespace = Some(namespace.to_owned());
    pod
}

#[test]
fn sidecars_count_in_the_shared_store_under_their_own_namespace() {
    use toolgate_operator::inject::holds_injected_sidecar;
    let config = store_config();
    let pod = injected_in("agents", &config);
    let spec = pod.spec.as_ref().expect("spec");
    let sidecar = &spec.init_containers.as_ref().expect("init")[0];
    let args = sidecar.args.clone().expect("args");
    for want in [
        "--counter-store=redis://toolgate-counter-store.toolgate-system.svc:6379",
        "--counter-store-prefix=toolgate:agents/",
        "--counter-store-password-file=/var/run/secrets/toolgate-store/password",
        "--counter-store-on-failure=closed",
    ] {
        assert!(args.contains(&want.to_owned()), "{want} in {args:?}");
    }
    assert!(!args.iter().any(|a| a.starts_with("--counter-store-ca-file")), "no CA unless configured");
    // The password reaches the sidecar only, from the Secret of the pod's own namespace.
    let volume = spec.volumes.iter().flatten().find(|v| v.name == "toolgate-store").expect("store volume");
    let secret = volume.secret.as_ref().expect("a Secret volume");
    assert_eq!(secret.secret_name.as_deref(), Some("toolgate-counter-store"));
    assert_ne!(secret.optional, Some(true), "no Secret, no pod: never a sidecar without its store password");
    let env = serde_json::to_value(&sidecar.env).expect("env");
    assert_eq!(env[1]["name"], json!("TOOLGATE_COUNTER_STORE_USERNAME"));
    assert_eq!(env[1]["valueFrom"]["secretKeyRef"]["key"], json!("username"));
    let app = &spec.containers[0];
    assert!(app.volume_mounts.iter().flatten().all(|m| m.name != "toolgate-store"), "the app does not get it");

    // The same pod is what the operator recognises as injected (streams, status).
    assert!(holds_injected_sidecar(&pod, &config));
    assert!(!holds_injected_sidecar(&pod, &InjectConfig::default()), "another configuration is another sidecar");
    // Another namespace's pod has another prefix: same McpPolicy names never share counters.
    let other = injected_in("team-b", &config);
    let other_args = other.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0].args.clone().unwrap();
    assert!(other_args.contains(&"--counter-store-prefix=toolgate:team-b/".to_owned()), "{other_args:?}");
    // A pod moved under another namespace's prefix is not the injected sidecar.
    let moved = edit(&pod, |p| p["metadata"]["namespace"] = json!("team-b"));
    assert!(!holds_injected_sidecar(&moved, &config));
    // Removing the store volume or its mount is caught like any other change.
    let unmounted = edit(&pod, |p| {
        let volumes = p["spec"]["volumes"].as_array_mut().unwrap();
        volumes.retain(|v| v["name"] != "toolgate-store");
    });
    assert!(!holds_injected_sidecar(&unmounted, &config));

    // With a TLS store, the CA comes from the same Secret.
    let mut tls = store_config();
    if let Some(s) = tls.counter_store.as_mut() {
        s.url = "rediss://redis.example:6380".into();
        s.ca = true;
    }
    let pod = injected_in("agents", &tls);
    let args = pod.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0].args.clone().unwrap();
    assert!(args.contains(&"--counter-store-ca-file=/var/run/secrets/toolgate-store/ca.crt".to_owned()));
}

#[test]
fn without_a_namespace_a_store_pod_is_refused() {
    let case = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject/labelled-pod.json"));
    let skip = inject(&case.pod, &case.ns_labels, &store_config()).expect_err("no namespace to key by");
    assert_eq!(skip, Skip::NoNamespace);
    assert!(skip.refused());
    assert_eq!(skip.metric_label(), "refused_no_namespace");
}

#[test]
fn store_settings_that_would_leak_or_break_are_refused() {
    use toolgate_operator::inject::CounterStoreConfig;
    let good = store_config().counter_store.expect("store");
    assert_eq!(good.validate(), Ok(()));
    let bad = |f: &dyn Fn(&mut CounterStoreConfig)| {
        let mut c = good.clone();
        f(&mut c);
        c.validate().expect_err("refused")
    };
    assert!(bad(&|c| c.url = "redis://:hunter2@redis:6379".into()).contains("password"));
    assert!(bad(&|c| c.url = "redis://user:pw@redis:6379/0".into()).contains("password"));
    bad(&|c| c.url = "http://redis:6379".into());
    bad(&|c| c.url = "redis+unix:///tmp/redis.sock".into());
    bad(&|c| c.url = "redis://".into());
    bad(&|c| c.prefix = "a{b}".into());
    bad(&|c| c.prefix = "team*".into());
    bad(&|c| c.prefix = "x".repeat(65));
    bad(&|c| c.on_failure = "maybe".into());
    bad(&|c| c.timeout_ms = 0);
    bad(&|c| c.secret = String::new());
    assert!(bad(&|c| c.ca = true).contains("rediss://"), "a CA for a plain-TCP store would stop every sidecar");
    assert!(bad(&|c| c.url = "redis+cluster://u:pw@r1:7000,r2:7001".into()).contains("password"));
    bad(&|c| c.url = "redis+sentinel://".into());
    // The proxy's Cluster and Sentinel forms pass through to the sidecars.
    for url in
        ["redis+cluster://r1:7000,r2:7001", "rediss+cluster://r1:7000", "redis+sentinel://s1:26379,s2:26379/main"]
    {
        let mut c = good.clone();
        c.url = url.into();
        c.ca = url.starts_with("rediss");
        assert_eq!(c.validate(), Ok(()), "{url}");
    }
}
