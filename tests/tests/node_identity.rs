//! Authenticated callers and credential custody on a real node (`TestNode`; `make
//! test-node`): the chart installed with sidecars that accept Kubernetes service-account
//! tokens; the example RunPod MCP server whose pod names the Secret with the RunPod key
//! (examples/runpod-mcp/custody), mounted into the sidecar only; two agent pods of
//! examples/runpod-mcp/custody/agents.yaml, each with its own projected token, calling the
//! Service; the example's McpPolicy granting by `serviceAccounts`. The fake RunPod API sees
//! agent A's allowed calls only, each with the Secret's key, never an agent's token.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};
use toolgate_tests::images::{runpod_example_image, toolgate_image};
use toolgate_tests::mcp::{call_step, error_codes, fake_runpod_on, start_pod_step};
use toolgate_tests::node::{NODE_IP, release_dir, sidecar_status};
use toolgate_tests::{TestNode, eventually, repo_root, run_ok, run_output, yaml_docs};

const RUNPOD_IMAGE: &str = "toolgate.local/runpod-mcp:4.0.0";
/// The audience the chart's sidecars accept (examples/runpod-mcp/custody uses it).
const AUDIENCE: &str = "toolgate-mcp";
/// The RunPod key in the Secret only the sidecar mounts.
const SECRET_KEY: &str = "rp-key-from-the-secret";

/// An MCP client on the official SDK, run in the agent pods (from the example image's
/// node_modules): reads its projected token, runs the steps of $SCRIPT, prints one JSON
/// line per step.
const AGENT_JS: &str = r#"
import { readFileSync } from 'node:fs';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
const headers = {};
if (process.env.MCP_TOKEN_FILE) headers.authorization = `Bearer ${readFileSync(process.env.MCP_TOKEN_FILE, 'utf8').trim()}`;
const client = new Client({ name: 'agent', version: '0' });
try {
  await client.connect(new StreamableHTTPClientTransport(new URL(process.env.MCP_URL), { requestInit: { headers } }));
} catch (e) {
  console.log(JSON.stringify({ op: 'connect', ok: false, error: { code: e?.code, message: String(e?.message ?? e) } }));
  process.exit(0);
}
for (const [i, s] of JSON.parse(process.env.SCRIPT).entries()) {
  try {
    const result = s.op === 'list' ? await client.listTools() : await client.callTool({ name: s.tool, arguments: s.args });
    console.log(JSON.stringify({ step: i, ok: true, result }));
  } catch (e) {
    console.log(JSON.stringify({ step: i, ok: false, error: { code: e?.code, message: String(e?.message ?? e), data: e?.data } }));
  }
}
await client.close().catch(() => {});
process.exit(0);
"#;

/// Runs an agent pod (the example's agent manifest, with the harness's image and the
/// client script) to completion and returns its output lines.
async fn run_agent(node: &TestNode, template: &Value, name: &str, audience: &str, script: &[Value]) -> Vec<Value> {
    let mut pod = template.clone();
    pod["metadata"]["name"] = name.into();
    pod["metadata"]["labels"] = json!({"app": "agent"});
    let spec = &mut pod["spec"];
    spec["restartPolicy"] = "Never".into();
    spec["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["audience"] = audience.into();
    spec["volumes"]
        .as_array_mut()
        .expect("volumes")
        .push(json!({"name": "client", "configMap": {"name": "agent-client"}}));
    let c = &mut spec["containers"][0];
    c["image"] = RUNPOD_IMAGE.into();
    c["imagePullPolicy"] = "Never".into();
    c["command"] = json!(["node", "/app/client/agent.mjs"]);
    c["env"]
        .as_array_mut()
        .expect("env")
        .push(json!({"name": "SCRIPT", "value": Value::Array(script.to_vec()).to_string()}));
    c["volumeMounts"]
        .as_array_mut()
        .expect("mounts")
        .push(json!({"name": "client", "mountPath": "/app/client", "readOnly": true}));
    node.kubectl_apply(Some("agents"), &pod.to_string()).await;
    let pods = Api::<Pod>::namespaced(node.client(), "agents");
    let done = eventually(&format!("agent pod {name} to finish"), Duration::from_secs(240), || {
        let pods = pods.clone();
        async move {
            let p = pods.get(name).await.ok()?;
            let phase = p.status.as_ref()?.phase.clone()?;
            (phase == "Succeeded" || phase == "Failed").then_some(phase)
        }
    })
    .await;
    let logs = run_ok(node.kubectl().args(["-n", "agents", "logs", name])).await;
    assert_eq!(done, "Succeeded", "agent {name}:\n{logs}");
    logs.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Everything the fake RunPod API on the node address received: (method, path,
/// authorization). HTTP/1.0, so the answer is the body as is.
fn fake_seen(port: u16) -> Vec<(String, String, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect((NODE_IP, port)).expect("the fake RunPod API");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    s.write_all(b"GET /__requests HTTP/1.0\r\n\r\n").expect("request");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("answer");
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").expect("a head") + 4;
    let v: Value = serde_json::from_slice(&out[split..]).expect("the fake's request log");
    v.as_array()
        .expect("a list")
        .iter()
        .map(|r| {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
            (s(&r["method"]), s(&r["path"]), s(&r["headers"]["authorization"]))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a node: make test-node"]
async fn agents_call_with_their_service_accounts_and_only_the_sidecar_holds_the_runpod_key() {
    let node_modules = toolgate_tests::mcp::node_dir().join("node_modules");
    let node = TestNode::start().await;
    let release = release_dir();
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).expect("Dockerfile");
    let chart = std::fs::read_to_string(repo_root().join("charts/toolgate/Chart.yaml")).expect("Chart.yaml");
    let version = chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .expect("appVersion");
    for target in ["toolgate-operator", "toolgate-proxy"] {
        let image = toolgate_image(&dockerfile, target, &format!("ghcr.io/toolgate/{target}:{version}"), &release)
            .unwrap_or_else(|e| panic!("image {target}: {e:#}"));
        node.import_image(&image).unwrap_or_else(|e| panic!("importing {target}: {e:#}"));
    }
    let server = runpod_example_image(RUNPOD_IMAGE, &repo_root(), &node_modules).expect("the RunPod MCP image");
    node.import_image(&server).expect("importing the RunPod MCP image");
    let fake = tokio::task::spawn_blocking(|| fake_runpod_on(NODE_IP)).await.expect("fake RunPod");

    // 1. The chart, with sidecars that accept service-account tokens of the audience.
    run_ok(node.helm().arg("install").arg("toolgate").arg(repo_root().join("charts/toolgate")).args([
        "--namespace",
        "toolgate-system",
        "--create-namespace",
        "--set",
        &format!("sidecar.identity.kubernetes.audience={AUDIENCE}"),
    ]))
    .await;
    let rollout = run_output(node.kubectl().args([
        "-n",
        "toolgate-system",
        "rollout",
        "status",
        "deployment/toolgate-operator",
        "--timeout=300s",
    ]))
    .await;
    assert!(rollout.status.success(), "the operator did not roll out: {}", String::from_utf8_lossy(&rollout.stderr));

    // 2. The example server, its RunPod key in a Secret, the custody patch applied.
    let example = repo_root().join("examples/runpod-mcp");
    run_ok(node.kubectl().arg("apply").arg("-f").arg(example.join("namespace.yaml"))).await;
    run_ok(node.kubectl().args(["-n", "runpod-mcp", "apply", "-f"]).arg(example.join("service.yaml"))).await;
    run_ok(node.kubectl().args([
        "-n",
        "runpod-mcp",
        "create",
        "secret",
        "generic",
        "runpod-api-key",
        &format!("--from-literal=api-key={SECRET_KEY}"),
    ]))
    .await;
    let mut deployment =
        yaml_docs(&std::fs::read_to_string(example.join("deployment.yaml")).expect("deployment.yaml")).remove(0);
    let patch =
        yaml_docs(&std::fs::read_to_string(example.join("custody/deployment-patch.yaml")).expect("patch")).remove(0);
    for (k, v) in patch["spec"]["template"]["metadata"]["annotations"].as_object().expect("annotations") {
        deployment["spec"]["template"]["metadata"]["annotations"][k] = v.clone();
    }
    let spec = &mut deployment["spec"]["template"]["spec"];
    spec.as_object_mut().expect("pod spec").remove("initContainers");
    spec["volumes"] = json!([{"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}]);
    let container = &mut spec["containers"][0];
    container["image"] = RUNPOD_IMAGE.into();
    container["imagePullPolicy"] = "Never".into();
    container["volumeMounts"] = json!([{"name": "tmp", "mountPath": "/tmp"}]);
    let base = format!("http://{NODE_IP}:{}", fake.port);
    let env = container["env"].as_array_mut().expect("env");
    for (name, value) in [
        ("RUNPOD_API_BASE_URL", base.clone()),
        ("RUNPOD_SERVERLESS_API_URL", format!("{base}/runtime/v2")),
        ("RUNPOD_AUTHED_GRAPHQL_URL", format!("{base}/graphql")),
        ("RUNPOD_PUBLIC_GRAPHQL_URL", format!("{base}/graphql")),
    ] {
        env.push(json!({"name": name, "value": value}));
    }
    node.kubectl_apply(Some("runpod-mcp"), &deployment.to_string()).await;

    // 3. The agents and the policy granting by service account, as the example has them.
    let custody = run_ok(node.kubectl().arg("kustomize").arg(example.join("custody"))).await;
    let docs = yaml_docs(&custody);
    let agent_pod = docs.iter().find(|d| d["kind"] == "Pod").expect("the example agent pod").clone();
    assert_eq!(agent_pod["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["audience"], AUDIENCE);
    let rest: Vec<String> =
        docs.iter().filter(|d| d["kind"] != "Pod").map(|d| serde_json::to_string(d).expect("JSON")).collect();
    for doc in &rest {
        node.kubectl_apply(None, doc).await;
    }
    let client_cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "agent-client"},
        "data": {"agent.mjs": AGENT_JS}});
    node.kubectl_apply(Some("agents"), &client_cm.to_string()).await;

    let pods = Api::<Pod>::namespaced(node.client(), "runpod-mcp");
    let pod = eventually("the server pod Ready with its sidecar and policy", Duration::from_secs(300), || {
        let pods = pods.clone();
        async move {
            let list = pods.list(&ListParams::default().labels("app.kubernetes.io/name=runpod-mcp")).await.ok()?;
            list.items.into_iter().find(|p| {
                sidecar_status(p).is_some_and(|s| s.ready)
                    && p.status
                        .as_ref()
                        .and_then(|s| s.container_statuses.as_ref())
                        .is_some_and(|c| c.iter().all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some())))
            })
        }
    })
    .await;
    // The key is the sidecar's alone.
    let spec = pod.spec.clone().expect("spec");
    let sidecar = &spec.init_containers.as_ref().expect("init")[0];
    assert!(sidecar.volume_mounts.iter().flatten().any(|m| m.name == "toolgate-upstream-credential"));
    assert!(sidecar.args.iter().flatten().any(|a| a == &format!("--k8s-token-audience={AUDIENCE}")));
    for app in &spec.containers {
        assert!(
            !app.volume_mounts.iter().flatten().any(|m| m.name == "toolgate-upstream-credential"),
            "the app container mounts the key: {app:?}"
        );
        assert!(!app.env.iter().flatten().any(|e| e.value.as_deref() == Some(SECRET_KEY)));
    }

    // 4. Agent A: 10 starts a minute; a stop is refused. Agent B: lists, may not start.
    let url = "http://runpod-mcp.runpod-mcp.svc/mcp";
    let mut template = agent_pod;
    template["spec"]["containers"][0]["env"][0]["value"] = url.into();
    let mut script_a = vec![json!({"op": "list"})];
    script_a.extend((0..12).map(|_| start_pod_step()));
    script_a.push(call_step("pod-action", json!({"id": "pod-1", "body": {"action": "stop"}})));
    let out_a = run_agent(&node, &template, "agent-a", AUDIENCE, &script_a).await;
    let mut listed: Vec<&str> = out_a[0]["result"]["tools"]
        .as_array()
        .map(|t| t.iter().filter_map(|t| t["name"].as_str()).collect())
        .unwrap_or_default();
    listed.sort_unstable();
    assert_eq!(listed, ["list-pods", "pod-action"], "A sees its grant's tools: {out_a:#?}");
    let mut want = vec![None; 11];
    want.extend([Some(-32011), Some(-32011), Some(-32010)]);
    assert_eq!(error_codes(&out_a), want, "{out_a:#?}");

    let mut template_b = template.clone();
    template_b["spec"]["serviceAccountName"] = "agent-b".into();
    let script_b = [call_step("list-pods", json!({})), start_pod_step()];
    let out_b = run_agent(&node, &template_b, "agent-b", AUDIENCE, &script_b).await;
    assert_eq!(error_codes(&out_b), [None, Some(-32010)], "{out_b:#?}");
    assert_ne!(out_b[0]["result"]["isError"], true, "RunPod answered B's list: {}", out_b[0]);

    // A token of another audience (what a pod's default API token is) proves nothing.
    let out_c = run_agent(&node, &template, "agent-a-wrong-audience", "kubernetes", &[start_pod_step()]).await;
    assert_eq!(out_c.len(), 1, "{out_c:#?}");
    assert_eq!(out_c[0]["op"], "connect", "refused at initialize: {out_c:#?}");
    assert!(
        out_c[0]["error"]["code"] == 401 || out_c[0]["error"]["message"].as_str().unwrap_or_default().contains("401"),
        "{out_c:#?}"
    );

    // 5. RunPod saw A's 10 starts and B's list, every one with the Secret's key.
    let port = fake.port;
    let seen = tokio::task::spawn_blocking(move || fake_seen(port)).await.expect("join");
    let starts = seen.iter().filter(|(m, p, _)| m == "POST" && p.ends_with("/action")).count();
    assert_eq!(starts, 10, "{seen:?}");
    assert!(seen.iter().any(|(m, p, _)| m == "GET" && p.ends_with("/pods")), "B's list reached RunPod: {seen:?}");
    for (_, path, auth) in &seen {
        assert_eq!(auth, &format!("Bearer {SECRET_KEY}"), "{path}: RunPod saw only the Secret's key");
    }

    // The sidecar's audit lines name the service accounts and grants, never a token.
    let name = pod.metadata.name.clone().expect("pod name");
    let audit = run_ok(node.kubectl().args(["-n", "runpod-mcp", "logs", &name, "-c", "toolgate-proxy"])).await;
    let lines: Vec<Value> = audit.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(lines.iter().any(|l| l["identity"] == "sa:agents/agent-a" && l["grant"] == "agent-a"), "{audit}");
    assert!(lines.iter().any(|l| l["identity"] == "sa:agents/agent-b" && l["grant"] == "agent-b"), "{audit}");
    assert!(!audit.contains(SECRET_KEY), "the key in the sidecar's output");
    assert!(!audit.contains("eyJ"), "a token in the sidecar's output");
    drop(node);
}
