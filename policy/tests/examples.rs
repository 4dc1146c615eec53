//! Every shipped example policy is valid and decides what its comments promise, against
//! the real tool lists of the RunPod MCP server (tests/fixtures/runpod-*-tools.json).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use toolgate_policy::{Call, Caller, DecisionKind, Limiter, Policy, fingerprint};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

fn example(name: &str) -> Policy {
    let path = repo().join("examples/policies").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Policy::from_text(name, &text).unwrap_or_else(|e| panic!("{name} is invalid:\n{e}"))
}

fn tool_names(version: &str) -> Vec<String> {
    let path = repo().join(format!("tests/fixtures/runpod-{version}-tools.json"));
    let dump: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json");
    dump["tools"].as_array().expect("tools").iter().map(|t| t["name"].as_str().expect("name").to_owned()).collect()
}

struct Agent {
    policy: Policy,
    limiter: Limiter,
    caller: Caller,
}

impl Agent {
    fn new(file: &str) -> Self {
        Self {
            policy: example(file),
            limiter: Limiter::default(),
            caller: Caller { identity: fingerprint("Bearer agent"), session: Some("s".into()), ..Caller::default() },
        }
    }

    fn call(&self, tool: &str, args: Value) -> (DecisionKind, Option<String>) {
        let mut d =
            self.policy.decide(&self.limiter, &Call { tool, arguments: &args, caller: &self.caller }, Duration::ZERO);
        if let Some(r) = d.reservation.take() {
            r.commit();
        }
        (d.kind, d.reason)
    }

    #[track_caller]
    fn expect(&self, tool: &str, args: Value, want: DecisionKind) -> Option<String> {
        let (kind, reason) = self.call(tool, args.clone());
        assert_eq!(kind, want, "{tool} {args}: {reason:?}");
        reason
    }
}

#[test]
fn every_example_policy_is_valid() {
    let dir = repo().join("examples/policies");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/policies") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("text");
        let policy = Policy::from_text(&path.display().to_string(), &text)
            .unwrap_or_else(|e| panic!("{} is invalid:\n{e}", path.display()));
        assert_eq!(policy.revision().len(), 12);
        seen += 1;
    }
    assert!(seen >= 3, "expected the seed and both RunPod packs, found {seen} files");
}

#[test]
fn seed() {
    let a = Agent::new("seed-start-pod.json");
    for _ in 0..10 {
        a.expect("start-pod", json!({"podId": "p1"}), DecisionKind::Allow);
    }
    a.expect("start-pod", json!({"podId": "p1"}), DecisionKind::RateLimited);
    for tool in tool_names("1.1.0").iter().filter(|t| *t != "start-pod") {
        a.expect(tool, json!({}), DecisionKind::Deny);
        assert!(!a.policy.lists_tool(tool, &a.caller));
    }
}

const GOOD_IMAGE: &str = "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04";

#[test]
fn runpod_1_1_0() {
    let a = Agent::new("runpod-1.1.0.yaml");
    let names = tool_names("1.1.0");
    assert_eq!(names.len(), 26);

    // Reads are allowed.
    for tool in names.iter().filter(|t| t.starts_with("list-") || t.starts_with("get-")) {
        a.expect(tool, json!({"podId": "p1"}), DecisionKind::Allow);
    }
    // Creates are checked: gpuCount 8 is refused, so is a missing gpuCount or a foreign image.
    let pod = json!({"name": "x", "imageName": GOOD_IMAGE, "gpuCount": 1, "cloudType": "SECURE"});
    a.expect("create-pod", pod.clone(), DecisionKind::Allow);
    let reason = a.expect("create-pod", json!({"imageName": GOOD_IMAGE, "gpuCount": 8}), DecisionKind::Deny);
    assert_eq!(reason.as_deref(), Some("at most 2 GPUs per pod"));
    a.expect("create-pod", json!({"imageName": GOOD_IMAGE, "gpuCount": "8"}), DecisionKind::Deny);
    a.expect("create-pod", json!({"imageName": GOOD_IMAGE}), DecisionKind::Deny);
    a.expect("create-pod", json!({"imageName": "evil/miner", "gpuCount": 1}), DecisionKind::Deny);
    a.expect(
        "create-pod",
        json!({"imageName": GOOD_IMAGE, "gpuCount": 1, "cloudType": "COMMUNITY"}),
        DecisionKind::Deny,
    );
    a.expect("create-endpoint", json!({"templateId": "t", "gpuCount": 8}), DecisionKind::Deny);
    a.expect("update-pod", json!({"podId": "p", "imageName": "evil/miner"}), DecisionKind::Deny);
    // The second create within a minute passes, the third hits create-pod_rate (2/minute).
    a.expect("create-pod", pod.clone(), DecisionKind::Allow);
    a.expect("create-pod", pod, DecisionKind::RateLimited);

    // Deletes go to approval, network volumes are denied.
    for tool in ["delete-pod", "delete-endpoint", "delete-template", "delete-container-registry-auth"] {
        a.expect(tool, json!({"podId": "p1"}), DecisionKind::Approval);
    }
    a.expect("delete-network-volume", json!({"networkVolumeId": "v"}), DecisionKind::Deny);

    // start-pod keeps the seed limit: the 11th start in a minute is rate-limited.
    for _ in 0..10 {
        a.expect("start-pod", json!({"podId": "p1"}), DecisionKind::Allow);
    }
    a.expect("start-pod", json!({"podId": "p1"}), DecisionKind::RateLimited);
    a.expect("stop-pod", json!({"podId": "p1"}), DecisionKind::Allow);

    // Tools a newer server adds are refused.
    a.expect("pod-action", json!({}), DecisionKind::Deny);
    // tools/list shows every tool of 1.1.0 except the denied delete-network-volume.
    let hidden: Vec<&String> = names.iter().filter(|t| !a.policy.lists_tool(t, &a.caller)).collect();
    assert_eq!(hidden, ["delete-network-volume"]);
}

#[test]
fn runpod_1_1_0_daily_gpu_budget() {
    let a = Agent::new("runpod-1.1.0.yaml");
    let pod = |gpus: u64| json!({"imageName": GOOD_IMAGE, "gpuCount": gpus});
    // 2 per minute and 10 per hour are the binding create limits; move the clock instead.
    let mut used = 0;
    for minute in 0..5u64 {
        let args = pod(2);
        let d = a.policy.decide(
            &a.limiter,
            &Call { tool: "create-pod", arguments: &args, caller: &a.caller },
            Duration::from_secs(minute * 60),
        );
        if d.kind == DecisionKind::Allow {
            used += 2;
            d.reservation.expect("reserved").commit();
        } else {
            assert_eq!(d.kind, DecisionKind::RateLimited);
            assert_eq!(d.reason.as_deref(), Some("daily GPU budget (8 GPUs per day) used up"));
        }
    }
    assert_eq!(used, 8, "8 GPUs per day per grant");
}

#[test]
fn runpod_4_0_0() {
    let a = Agent::new("runpod-4.0.0.yaml");
    let names = tool_names("4.0.0");
    assert_eq!(names.len(), 68);

    for tool in ["list-pods", "get-pod", "list-gpu-types", "get-endpoint", "list-billing", "stream-pod-logs"] {
        a.expect(tool, json!({"id": "p1"}), DecisionKind::Allow);
    }
    let pod = json!({"body": {"image": GOOD_IMAGE, "gpu": {"count": 1}}});
    a.expect("create-pod", pod, DecisionKind::Allow);
    let reason =
        a.expect("create-pod", json!({"body": {"image": GOOD_IMAGE, "gpu": {"count": 8}}}), DecisionKind::Deny);
    assert!(reason.unwrap().contains("GPU"));
    // The 4.0.0 server parses a string body itself; the schema refuses it so deny_if cannot be bypassed.
    a.expect("create-pod", json!({"body": "{\"gpu\":{\"count\":8}}"}), DecisionKind::Deny);
    a.expect("create-pod", json!({"body": {"image": "evil/miner"}}), DecisionKind::Deny);

    // pod-action: terminate is refused (it is a delete), start/stop/restart are rate-limited.
    let reason = a.expect("pod-action", json!({"id": "p1", "body": {"action": "terminate"}}), DecisionKind::Deny);
    assert!(reason.unwrap().contains("delete-pod"));
    a.expect("pod-action", json!({"id": "p1", "body": "{\"action\":\"terminate\"}"}), DecisionKind::Deny);
    a.expect("pod-action", json!({"id": "p1", "body": {"action": "explode"}}), DecisionKind::Deny);
    for action in ["start", "stop", "restart"].iter().cycle().take(10) {
        a.expect("pod-action", json!({"id": "p1", "body": {"action": action}}), DecisionKind::Allow);
    }
    a.expect("pod-action", json!({"id": "p1", "body": {"action": "start"}}), DecisionKind::RateLimited);

    // Deletes and access changes go to approval; network volumes are denied.
    for tool in [
        "delete-pod",
        "delete-endpoint",
        "delete-template",
        "delete-registry",
        "delete-cluster",
        "revoke-delegation",
        "purge-endpoint-queue",
        "update-ssh-keys",
    ] {
        a.expect(tool, json!({"id": "x"}), DecisionKind::Approval);
    }
    a.expect("delete-network-volume", json!({"id": "v"}), DecisionKind::Deny);

    // The hosted server's "agent learning" tools are hidden; 1.1.0's start-pod is unknown here.
    a.expect("report_feedback", json!({}), DecisionKind::Hidden);
    a.expect("start-pod", json!({"podId": "p1"}), DecisionKind::Deny);
    let unlisted: Vec<&String> = names.iter().filter(|t| !a.policy.lists_tool(t, &a.caller)).collect();
    assert_eq!(unlisted, ["delete-network-volume"]);
    assert!(!a.policy.lists_tool("save_to_journal", &a.caller));
}

#[test]
fn runpod_4_0_0_approvals_are_rate_limited_once_approved() {
    let a = Agent::new("runpod-4.0.0.yaml");
    let args = json!({"id": "p"});
    let call = Call { tool: "delete-pod", arguments: &args, caller: &a.caller };
    for i in 0..21 {
        let held = a.policy.decide(&a.limiter, &call, Duration::ZERO);
        assert_eq!(held.kind, DecisionKind::Approval);
        assert_eq!(held.approval_timeout, Some(Duration::from_secs(600)));
        let mut d = held.approved(&a.limiter, Duration::from_secs(1));
        if i < 20 {
            assert_eq!(d.kind, DecisionKind::Allow);
            d.reservation.take().expect("reserved").commit();
        } else {
            assert_eq!(d.kind, DecisionKind::RateLimited, "approvals_rate: 20 per hour");
        }
    }
}
