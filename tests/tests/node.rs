//! Tests on a real node (kubelet + containerd + kube-proxy + CoreDNS; `TestNode`). They need
//! root and the node binaries, so they are ignored in a plain `cargo test`: `make test-node`
//! runs them (and `make test` does when this machine can, see docs/testing.md).

use std::net::UdpSocket;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use toolgate_tests::images::{redis_server_image, runpod_example_image, toolgate_image};
use toolgate_tests::mcp::{call_step, error_codes, fake_requests_on, fake_runpod_on, run_client, start_pod_step};
use toolgate_tests::node::{CLUSTER_DNS, NODE_IP, PAUSE_IMAGE, pod_is_ready, release_dir, sidecar_status};
use toolgate_tests::{Prometheus, TestNode, eventually, repo_root, run_ok, run_output};

/// An A query for `name` (recursion desired), id 0x7467.
fn dns_query(name: &str) -> Vec<u8> {
    let mut q = vec![0x74, 0x67, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        q.push(u8::try_from(label.len()).expect("short label"));
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The IPv4 addresses in the answer section of a response to [`dns_query`].
fn dns_answers(query: &[u8], response: &[u8]) -> Option<Vec<[u8; 4]>> {
    if response.len() < query.len() || response[..2] != query[..2] || response[3] & 0x0f != 0 {
        return None;
    }
    let answers = u16::from_be_bytes([response[6], response[7]]);
    // The question is echoed: the answers start after it; each is a name (labels, or a
    // pointer), type, class (4), TTL (4), length (2), data.
    let mut at = query.len();
    let mut out = Vec::new();
    for _ in 0..answers {
        loop {
            let len = *response.get(at)?;
            if len == 0 {
                at += 1;
                break;
            }
            if len & 0xc0 == 0xc0 {
                at += 2;
                break;
            }
            at += 1 + usize::from(len);
        }
        let kind = u16::from_be_bytes([*response.get(at)?, *response.get(at + 1)?]);
        let len = usize::from(u16::from_be_bytes([*response.get(at + 8)?, *response.get(at + 9)?]));
        let data = response.get(at + 10..at + 10 + len)?;
        if kind == 1 && len == 4 {
            out.push([data[0], data[1], data[2], data[3]]);
        }
        at += 10 + len;
    }
    Some(out)
}

fn resolve(server: &str, name: &str) -> Option<Vec<[u8; 4]>> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let query = dns_query(name);
    socket.send_to(&query, server).ok()?;
    let mut buf = [0u8; 1500];
    let n = socket.recv(&mut buf).ok()?;
    dns_answers(&query, &buf[..n])
}

/// The node turns Ready, runs CoreDNS from an image the harness wrote (pause sandbox
/// included), and the `kube-dns` Service routes to it through kube-proxy's rules; CoreDNS
/// itself reaches the apiserver through the `kubernetes` Service (10.0.0.1 → the node's
/// address), and the apiserver reaches the kubelet (logs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a node: make test-node"]
async fn node_runs_pods_from_local_images_and_routes_services() {
    let sysctls = ["kernel/panic", "kernel/panic_on_oops", "vm/overcommit_memory", "net/ipv4/ip_forward"];
    let read = |key: &str| std::fs::read_to_string(format!("/proc/sys/{key}")).unwrap_or_default();
    let before: Vec<String> = sysctls.iter().map(|k| read(k)).collect();
    // Fixed paths the kubelet, containerd's shims and libcni use outside the node's own
    // directories: as they were before.
    let fixed =
        ["/var/lib/kubelet", "/var/lib/cni", "/run/containerd", "/var/log/containers", "/usr/libexec/kubernetes"];
    let existed: Vec<bool> = fixed.iter().map(|p| std::path::Path::new(p).exists()).collect();
    let node = TestNode::start().await;

    let server = format!("{CLUSTER_DNS}:53");
    let answers = eventually("CoreDNS answering through the kube-dns Service", Duration::from_secs(120), || {
        let server = server.clone();
        async move {
            tokio::task::spawn_blocking(move || resolve(&server, "kubernetes.default.svc.cluster.local"))
                .await
                .ok()
                .flatten()
                .filter(|a| !a.is_empty())
        }
    })
    .await;
    assert_eq!(answers, vec![[10, 0, 0, 1]], "kubernetes.default's ClusterIP");
    let dns = format!("{CLUSTER_DNS}:53");
    let missing =
        tokio::task::spawn_blocking(move || resolve(&dns, "nope.default.svc.cluster.local")).await.expect("join");
    assert_eq!(missing, None, "an unknown Service name gets NXDOMAIN, not an address");

    // The kubelet answers the apiserver (logs through the node address).
    let pod = node.wait_pod_ready("kube-system", "k8s-app=kube-dns", Duration::from_secs(60)).await;
    let name = pod.metadata.name.clone().expect("pod name");
    let logs = run_ok(node.kubectl().args(["logs", "-n", "kube-system", &name])).await;
    assert!(logs.contains("CoreDNS-"), "CoreDNS's start banner in its logs:\n{logs}");
    let status = pod.status.expect("pod status");
    let ip = status.pod_ip.expect("pod IP");
    assert!(ip.starts_with("10.244.0.") && ip != NODE_IP, "pod IP {ip} from the bridge's range");
    assert_eq!(status.host_ip.as_deref(), Some(NODE_IP));
    drop(node);

    // Teardown left nothing behind.
    assert!(!std::path::Path::new("/sys/class/net/tgnode0").exists(), "the bridge is gone");
    assert!(!std::path::Path::new("/var/lib/toolgate-node").exists(), "the node's directories are gone");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!mounts.contains("toolgate-node"), "no mounts left:\n{mounts}");
    let nat = std::process::Command::new("iptables-save").args(["-t", "nat"]).output().expect("iptables-save");
    let nat = String::from_utf8_lossy(&nat.stdout);
    assert!(!nat.contains("KUBE-") && !nat.contains("CNI-"), "no iptables chains left:\n{nat}");
    assert!(!std::path::Path::new("/sys/fs/cgroup/memory/toolgate-node").exists(), "no cgroups left");
    let after: Vec<String> = sysctls.iter().map(|k| read(k)).collect();
    assert_eq!(before, after, "the sysctls {sysctls:?} are restored");
    let exist: Vec<bool> = fixed.iter().map(|p| std::path::Path::new(p).exists()).collect();
    assert_eq!(existed, exist, "{fixed:?} exist as before");
}

fn chart_app_version() -> String {
    let chart = std::fs::read_to_string(repo_root().join("charts/toolgate/Chart.yaml")).expect("Chart.yaml");
    chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .expect("appVersion in Chart.yaml")
}

/// README's "5 minutes on a cluster", steps 0–3, on real pods: the operator and sidecar
/// images made from the Dockerfile's final stages and this build's release binaries; `helm
/// install` exactly as the README has it; the operator Deployment rolls out (2 replicas,
/// probes, read-only root, its own certificates); a pod of a labelled namespace gets the
/// native sidecar through the webhook called via the operator's Service; the sidecar
/// starts, reaches the operator by its Service name (cluster DNS) with its projected token
/// and CA, and turns Ready only once the seed McpPolicy is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a node: make test-node"]
async fn the_chart_runs_on_the_node_from_the_dockerfile_images() {
    let node = TestNode::start().await;
    let version = import_toolgate_images(&node);

    // 1. Install the chart (README's commands).
    helm_install_and_roll_out(&node, &[]).await;
    let operators = Api::<Pod>::namespaced(node.client(), "toolgate-system")
        .list(&ListParams::default().labels("app.kubernetes.io/component=operator"))
        .await
        .expect("operator pods");
    let ready = operators.items.iter().filter(|p| pod_is_ready(p)).count();
    assert_eq!(ready, 2, "two operator replicas Ready");

    // 2. A labelled namespace; its pod gets the sidecar from the webhook (called through the
    // operator's Service). The app container is the pause image: this test is about the
    // sidecar's start, the server's part is the journey's.
    let manifest = format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: runpod-mcp
  labels:
    toolgate.dev/inject: enabled
    pod-security.kubernetes.io/enforce: restricted
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: runpod-mcp
  namespace: runpod-mcp
  labels: {{app.kubernetes.io/name: runpod-mcp}}
spec:
  replicas: 1
  selector:
    matchLabels: {{app.kubernetes.io/name: runpod-mcp}}
  template:
    metadata:
      labels: {{app.kubernetes.io/name: runpod-mcp}}
      annotations:
        toolgate.dev/upstream-port: "3000"
        toolgate.dev/upstream-path: /mcp
    spec:
      automountServiceAccountToken: false
      securityContext:
        runAsNonRoot: true
        runAsUser: 1000
        seccompProfile: {{type: RuntimeDefault}}
      containers:
      - name: server
        image: {PAUSE_IMAGE}
        imagePullPolicy: Never
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities: {{drop: [ALL]}}
"#
    );
    node.kubectl_apply(None, &manifest).await;
    let pods = Api::<Pod>::namespaced(node.client(), "runpod-mcp");
    let pod = eventually("the workload's pod with a started sidecar", Duration::from_secs(180), || {
        let pods = pods.clone();
        async move {
            let list = pods.list(&ListParams::default().labels("app.kubernetes.io/name=runpod-mcp")).await.ok()?;
            list.items.into_iter().find(|p| sidecar_status(p).is_some_and(|s| s.started == Some(true)))
        }
    })
    .await;
    let spec = pod.spec.clone().expect("pod spec");
    let init = spec.init_containers.clone().unwrap_or_default();
    assert_eq!(init.first().map(|c| c.name.as_str()), Some("toolgate-proxy"), "the sidecar comes first");
    assert_eq!(init[0].restart_policy.as_deref(), Some("Always"), "a native sidecar");
    assert_eq!(init[0].image.as_deref(), Some(format!("ghcr.io/toolgate/toolgate-proxy:{version}").as_str()));
    // Until a policy selects the pod the sidecar is not Ready (it would refuse every call).
    let name = pod.metadata.name.clone().expect("pod name");
    let fresh = pods.get(&name).await.expect("pod");
    assert_eq!(sidecar_status(&fresh).map(|s| s.ready), Some(false), "not Ready without a policy");

    // 3. The seed policy: the sidecar holds it and turns Ready.
    let seed = std::fs::read_to_string(repo_root().join("examples/runpod-mcp/policies/seed-4.0.0.mcppolicy.yaml"))
        .expect("seed policy");
    node.kubectl_apply(Some("runpod-mcp"), &seed).await;
    eventually("the sidecar Ready with the seed policy", Duration::from_secs(180), || {
        let pods = pods.clone();
        let name = name.clone();
        async move { pods.get(&name).await.ok().filter(|p| sidecar_status(p).is_some_and(|s| s.ready)) }
    })
    .await;
    wait_seed_enforcing(&node, "ENFORCING 1 on the seed policy", Duration::from_secs(120), "1").await;
}

/// Waits until the example's seed McpPolicy reports `status.enforcing` `n`.
async fn wait_seed_enforcing(node: &TestNode, what: &str, timeout: Duration, n: &str) {
    let enforcing = eventually(what, timeout, || async {
        let out = run_output(node.kubectl().args([
            "-n",
            "runpod-mcp",
            "get",
            "mcpp",
            "seed-v4",
            "-o",
            "jsonpath={.status.enforcing}",
        ]))
        .await;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (text == n).then_some(text)
    })
    .await;
    assert_eq!(enforcing, n);
}

const RUNPOD_IMAGE: &str = "toolgate.local/runpod-mcp:4.0.0";
/// Debian's redis-server as the chart's counter store (tests/src/images.rs).
const REDIS_IMAGE: &str = "toolgate.local/redis:7.0";

/// The README's store values with the harness's Redis image (the node cannot pull Valkey's).
const STORE_SETS: &[&str] = &[
    "counters.redis.deploy=true",
    "counters.redis.namespaces={runpod-mcp}",
    "counters.redis.image.repository=toolgate.local/redis",
    "counters.redis.image.tag=7.0",
    "counters.redis.image.pullPolicy=Never",
    "counters.redis.command={/usr/bin/redis-server}",
];

fn yaml_doc(text: &str) -> serde_json::Value {
    use serde::Deserialize as _;
    let doc = serde_norway::Deserializer::from_str(text).next().expect("a YAML document");
    serde_json::Value::deserialize(doc).expect("valid YAML")
}

/// Writes and imports the operator and sidecar images under the chart's default names;
/// returns the tag (the chart's appVersion).
fn import_toolgate_images(node: &TestNode) -> String {
    let release = release_dir();
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).expect("Dockerfile");
    let version = chart_app_version();
    for target in ["toolgate-operator", "toolgate-proxy"] {
        let image = toolgate_image(&dockerfile, target, &format!("ghcr.io/toolgate/{target}:{version}"), &release)
            .unwrap_or_else(|e| panic!("image {target}: {e:#}"));
        node.import_image(&image).unwrap_or_else(|e| panic!("importing {target}: {e:#}"));
    }
    version
}

async fn helm_install_and_roll_out(node: &TestNode, sets: &[&str]) {
    let chart = repo_root().join("charts/toolgate");
    let mut install = node.helm();
    install.arg("install").arg("toolgate").arg(&chart).args(["--namespace", "toolgate-system", "--create-namespace"]);
    for set in sets {
        install.args(["--set", set]);
    }
    run_ok(&mut install).await;
    wait_operator_rollout(node).await;
}

async fn wait_operator_rollout(node: &TestNode) {
    let rollout = run_output(node.kubectl().args([
        "-n",
        "toolgate-system",
        "rollout",
        "status",
        "deployment/toolgate-operator",
        "--timeout=300s",
    ]))
    .await;
    assert!(
        rollout.status.success(),
        "the operator did not roll out: {}\n{}\n{}",
        String::from_utf8_lossy(&rollout.stderr),
        String::from_utf8_lossy(
            &run_output(node.kubectl().args(["-n", "toolgate-system", "describe", "pods"])).await.stdout
        ),
        node.logs_tail(20)
    );
}

/// README's journey on real pods: `helm install` with the shared counter store (the
/// chart's Redis StatefulSet, Debian's redis-server as its image) → the example RunPod MCP
/// server (its namespace, Service and Deployment from examples/runpod-mcp, at 2 replicas;
/// the server image written by the harness with the pinned 4.0.0, since the node cannot
/// run the npm-ci init container) gets its native sidecars → the seed McpPolicy → an MCP
/// client (the official SDK) calling each replica's pod sees 10 allowed in all, the 11th
/// rate-limited, delete and stop refused, and the fake RunPod API (reached from the pods)
/// sees exactly the 10 → Prometheus scrapes both sidecars: each served some of the 10 → the
/// operator pods are deleted: the sidecars keep enforcing (through the Service), the
/// Deployment brings them back → `helm upgrade`, `helm uninstall`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a node: make test-node"]
async fn the_readme_journey_on_real_pods() {
    let node_modules = toolgate_tests::mcp::node_dir().join("node_modules");
    let node = TestNode::start().await;
    import_toolgate_images(&node);
    let server = runpod_example_image(RUNPOD_IMAGE, &repo_root(), &node_modules).expect("the RunPod MCP image");
    node.import_image(&server).expect("importing the RunPod MCP image");
    let redis = redis_server_image(REDIS_IMAGE).expect("the Redis image");
    node.import_image(&redis).expect("importing the Redis image");
    let fake = tokio::task::spawn_blocking(|| fake_runpod_on(NODE_IP)).await.expect("fake RunPod");

    // 1. The example's namespace (the store's Secret for its sidecars goes there), then
    // helm install with the shared counter store.
    let example = repo_root().join("examples/runpod-mcp");
    run_ok(node.kubectl().arg("apply").arg("-f").arg(example.join("namespace.yaml"))).await;
    helm_install_and_roll_out(&node, STORE_SETS).await;
    let store = run_output(node.kubectl().args([
        "-n",
        "toolgate-system",
        "rollout",
        "status",
        "statefulset/toolgate-counter-store",
        "--timeout=240s",
    ]))
    .await;
    assert!(
        store.status.success(),
        "the counter store did not start: {}\n{}",
        String::from_utf8_lossy(&store.stderr),
        String::from_utf8_lossy(
            &run_output(node.kubectl().args(["-n", "toolgate-system", "describe", "statefulset,pods"])).await.stdout
        )
    );

    // 2. The example: Service as it is, the Deployment at 2 replicas with the harness's
    // server image (no npm-ci init container) pointed at the fake RunPod API.
    run_ok(node.kubectl().args(["-n", "runpod-mcp", "apply", "-f"]).arg(example.join("service.yaml"))).await;
    let mut deployment = yaml_doc(&std::fs::read_to_string(example.join("deployment.yaml")).expect("deployment.yaml"));
    deployment["spec"]["replicas"] = 2.into();
    let spec = &mut deployment["spec"]["template"]["spec"];
    spec.as_object_mut().expect("pod spec").remove("initContainers");
    spec["volumes"] = serde_json::json!([{"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}]);
    let container = &mut spec["containers"][0];
    container["image"] = RUNPOD_IMAGE.into();
    container["imagePullPolicy"] = "Never".into();
    container["volumeMounts"] = serde_json::json!([{"name": "tmp", "mountPath": "/tmp"}]);
    let base = format!("http://{NODE_IP}:{}", fake.port);
    let env = container["env"].as_array_mut().expect("env");
    for (name, value) in [
        ("RUNPOD_API_BASE_URL", base.clone()),
        ("RUNPOD_SERVERLESS_API_URL", format!("{base}/runtime/v2")),
        ("RUNPOD_AUTHED_GRAPHQL_URL", format!("{base}/graphql")),
        ("RUNPOD_PUBLIC_GRAPHQL_URL", format!("{base}/graphql")),
    ] {
        env.push(serde_json::json!({"name": name, "value": value}));
    }
    node.kubectl_apply(Some("runpod-mcp"), &deployment.to_string()).await;
    run_ok(node.kubectl().args(["label", "namespace", "runpod-mcp", "toolgate.dev/inject=enabled", "--overwrite"]))
        .await;
    let pods = Api::<Pod>::namespaced(node.client(), "runpod-mcp");
    let running = eventually("the example's 2 pods running with their sidecars", Duration::from_secs(300), || {
        let pods = pods.clone();
        async move {
            let list = pods.list(&ListParams::default().labels("app.kubernetes.io/name=runpod-mcp")).await.ok()?;
            let running: Vec<Pod> =
                list.items
                    .into_iter()
                    .filter(|p| {
                        p.metadata.deletion_timestamp.is_none()
                            && sidecar_status(p).is_some_and(|s| s.started == Some(true))
                            && p.status.as_ref().and_then(|s| s.container_statuses.as_ref()).is_some_and(|c| {
                                c.iter().all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
                            })
                    })
                    .collect();
            (running.len() == 2).then_some(running)
        }
    })
    .await;
    for pod in &running {
        let init = pod.spec.as_ref().and_then(|s| s.init_containers.as_ref()).expect("init containers");
        let names: Vec<&str> = init.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["toolgate-proxy"], "the webhook added the native sidecar");
        let args = init[0].args.clone().unwrap_or_default();
        for want in [
            "--counter-store=redis://toolgate-counter-store.toolgate-system.svc:6379",
            "--counter-store-prefix=toolgate:runpod-mcp/",
        ] {
            assert!(args.iter().any(|a| a == want), "{want} in {args:?}");
        }
    }
    let names: Vec<String> = running.iter().map(|p| p.metadata.name.clone().expect("pod name")).collect();

    // 3. The seed policy.
    run_ok(
        node.kubectl()
            .args(["-n", "runpod-mcp", "apply", "-f"])
            .arg(example.join("policies/seed-4.0.0.mcppolicy.yaml")),
    )
    .await;
    let mut ips = Vec::new();
    for name in &names {
        let ready = eventually("each sidecar Ready with the seed policy", Duration::from_secs(180), || {
            let pods = pods.clone();
            let name = name.clone();
            async move { pods.get(&name).await.ok().filter(|p| sidecar_status(p).is_some_and(|s| s.ready)) }
        })
        .await;
        ips.push(ready.status.and_then(|s| s.pod_ip).expect("pod IP"));
    }
    wait_seed_enforcing(&node, "ENFORCING 2 on the seed policy", Duration::from_secs(180), "2").await;

    // 4. One agent calls both replicas (each pod's proxy port, so that both certainly
    // serve): 6 starts on the first, 5 on the second. The seed's 10 a minute holds across
    // the two: the second replica admits only 4.
    let agent_at = |target: String| {
        vec![
            "--url".to_owned(),
            format!("http://{target}/mcp"),
            "--header".to_owned(),
            "Authorization: Bearer agent-key-1".to_owned(),
        ]
    };
    let mut first = vec![serde_json::json!({"op": "list"})];
    first.extend((0..6).map(|_| start_pod_step()));
    let out = run_client(agent_at(format!("{}:15080", ips[0])), first).await;
    let listed: Vec<&str> = out[0]["result"]["tools"]
        .as_array()
        .map(|t| t.iter().filter_map(|t| t["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(listed, ["pod-action"], "tools/list shows only what the policy allows: {:#?}", out[0]);
    assert_eq!(error_codes(&out), vec![None; 7], "{out:#?}");
    let mut second: Vec<serde_json::Value> = (0..5).map(|_| start_pod_step()).collect();
    second.push(call_step("delete-pod", serde_json::json!({"id": "pod-1"})));
    second.push(call_step("pod-action", serde_json::json!({"id": "pod-1", "body": {"action": "stop"}})));
    let out2 = run_client(agent_at(format!("{}:15080", ips[1])), second).await;
    let mut want = vec![None; 4];
    want.extend([Some(-32011), Some(-32010), Some(-32010)]);
    assert_eq!(error_codes(&out2), want, "the second replica counts the first one's calls: {out2:#?}");
    for step in out[1..].iter().chain(&out2[..4]) {
        assert_ne!(step["result"]["isError"], true, "RunPod answered: {step}");
    }
    let reached: Vec<_> =
        fake_requests_on(NODE_IP, &fake).into_iter().filter(|(_, path, _)| path != "/graphql").collect();
    assert_eq!(reached.len(), 10, "the fake RunPod API saw exactly the allowed calls: {reached:#?}");
    for (method, path, body) in &reached {
        assert_eq!((method.as_str(), path.as_str()), ("POST", "/v2/pods/pod-2/action"));
        assert_eq!(body, &serde_json::json!({"action": "start"}));
    }

    // Prometheus on the host scrapes both sidecars' admin ports on the pod IPs (Debian's
    // Prometheus has no Kubernetes discovery: the targets are the pods' IPs and the port
    // the chart's scrape annotations name): each replica served its share of the 10.
    let scraped = pods.get(&names[0]).await.expect("pod");
    let annotations = scraped.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(annotations.get("prometheus.io/port").map(String::as_str), Some("15090"), "{annotations:?}");
    let targets: Vec<std::net::SocketAddr> =
        ips.iter().map(|ip| format!("{ip}:15090").parse().expect("pod address")).collect();
    let prometheus = Prometheus::scraping(&targets).await;
    let query = r#"sum by (instance) (toolgate_decisions_total{tool="pod-action",decision="allow"})"#;
    let per_pod =
        eventually("Prometheus scraping 6 + 4 allowed pod-action calls", Duration::from_secs(120), || async {
            let samples = prometheus.query(query).await.ok()?;
            let mut by_instance: Vec<(String, String)> = samples
                .as_array()?
                .iter()
                .map(|s| {
                    (
                        s["metric"]["instance"].as_str().unwrap_or_default().to_owned(),
                        s["value"][1].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect();
            by_instance.sort();
            let mut want =
                vec![(format!("{}:15090", ips[0]), "6".to_owned()), (format!("{}:15090", ips[1]), "4".to_owned())];
            want.sort();
            (by_instance == want).then_some(by_instance)
        })
        .await;
    assert_eq!(per_pod.len(), 2, "both replicas served calls: {per_pod:?}");
    drop(prometheus);

    // Through the Service (either replica): still limited.
    let service = run_ok(node.kubectl().args([
        "-n",
        "runpod-mcp",
        "get",
        "svc",
        "runpod-mcp",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]))
    .await;
    let agent = agent_at(service.trim().to_owned());

    // 5. Without the operator the sidecar keeps enforcing; the Deployment brings it back.
    run_ok(node.kubectl().args([
        "-n",
        "toolgate-system",
        "delete",
        "pods",
        "-l",
        "app.kubernetes.io/component=operator",
        "--wait=false",
    ]))
    .await;
    let out =
        run_client(agent.clone(), vec![start_pod_step(), call_step("delete-pod", serde_json::json!({"id": "pod-1"}))])
            .await;
    assert_eq!(error_codes(&out), [Some(-32011), Some(-32010)], "still limited and refused: {out:#?}");
    wait_operator_rollout(&node).await;
    // The new operator pods take the sidecars' streams back: status returns to ENFORCING 2.
    wait_seed_enforcing(&node, "ENFORCING 2 again after the operator pods came back", Duration::from_secs(180), "2")
        .await;
    let reached = fake_requests_on(NODE_IP, &fake).into_iter().filter(|(_, path, _)| path != "/graphql").count();
    assert_eq!(reached, 10, "nothing more reached RunPod");

    // 6. helm upgrade and uninstall.
    run_ok(node.helm().args(["upgrade", "toolgate"]).arg(repo_root().join("charts/toolgate")).args([
        "-n",
        "toolgate-system",
        "--reuse-values",
        "--set",
        "operator.heartbeatSeconds=5",
    ]))
    .await;
    wait_operator_rollout(&node).await;
    let out = run_client(agent.clone(), vec![call_step("delete-pod", serde_json::json!({"id": "pod-1"}))]).await;
    assert_eq!(error_codes(&out), [Some(-32010)], "enforcing across the upgrade: {out:#?}");
    run_ok(node.helm().args(["uninstall", "toolgate", "-n", "toolgate-system", "--wait"])).await;
    let left = run_ok(node.kubectl().args(["-n", "toolgate-system", "get", "deployments", "-o", "name"])).await;
    assert_eq!(left.trim(), "", "helm uninstall removed the operator");
}
