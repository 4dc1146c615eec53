//! The `toolgate` binary, run as a user runs it.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const SEED: &str = r#"{"version":"1","default":"deny","tools":{"start-pod":{"limits":[{"counter":"start-pod_rate","window":"minute","max":10,"scope":"grant"}]}}}"#;

const INTERCEPT: &str = include_str!("../../examples/policies/intercept-github.yaml");

fn toolgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_toolgate")).args(args).stdin(Stdio::null()).output().expect("runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies")
}

fn file(dir: &tempfile::TempDir, name: &str, contents: &[u8]) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, contents).expect("write");
    p.display().to_string()
}

/// Exit code 1, a message, and no panic.
#[track_caller]
fn fails_cleanly(out: &Output) -> String {
    let all = text(&out.stdout) + &text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(!all.contains("panicked"), "{all}");
    assert!(!all.trim().is_empty(), "a failure says why");
    all
}

fn eval_json(args: &[&str]) -> Value {
    let out = toolgate(args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("eval prints JSON")
}

#[test]
fn validate_accepts_the_examples() {
    let dir = examples();
    let files: Vec<String> = ["seed-start-pod.json", "runpod-1.1.0.yaml", "runpod-4.0.0.yaml"]
        .iter()
        .map(|f| dir.join(f).display().to_string())
        .collect();
    let out = toolgate(&files.iter().map(String::as_str).fold(vec!["validate"], |mut v, f| {
        v.push(f);
        v
    }));
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    assert!(stdout.lines().all(|l| l.contains(": ok (native, ")), "{stdout}");
    assert!(stdout.contains("68 tool rules"), "{stdout}");
}

#[test]
fn validate_reports_the_path_of_each_problem() {
    let dir = tempfile::tempdir().unwrap();
    let bad = file(
        &dir,
        "bad.yaml",
        b"version: '1'\ntools:\n  start-pod:\n    limits: [{window: fortnight, max: 0}]\n  delete-pod: {approval: {timeout: 5m}}\n",
    );
    let good = file(&dir, "seed.json", SEED.as_bytes());
    let out = toolgate(&["validate", &good, &bad]);
    let all = fails_cleanly(&out);
    assert!(all.contains("seed.json: ok"), "the valid file is still reported: {all}");
    assert!(all.contains("bad.yaml: invalid"), "{all}");
    assert!(
        all.contains("tools.start-pod.limits[0].window: \"fortnight\" is not a window; use second, minute"),
        "{all}"
    );
    assert!(all.contains("tools.start-pod.limits[0].max: must be at least 1"), "{all}");
    assert!(all.contains("tools.delete-pod.approval: only allowed with `action: approval`"), "{all}");

    let unknown =
        file(&dir, "unknown.yaml", b"version: '1'\ntools:\n  x: {limits: [{window: minute, max: 1, maxx: 2}]}\n");
    let all = fails_cleanly(&toolgate(&["validate", &unknown]));
    assert!(all.contains("tools.x.limits[0].maxx: unknown field `maxx`"), "{all}");
}

#[test]
fn validate_recognises_intercept() {
    let dir = tempfile::tempdir().unwrap();
    let it = file(&dir, "intercept.yaml", INTERCEPT.as_bytes());
    let out = toolgate(&["validate", &it]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("ok (intercept, 3 tool rules"), "{}", text(&out.stdout));
}

#[test]
fn hostile_files_fail_cleanly_and_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut bomb = String::from("a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    for i in 1..10u8 {
        let (p, n) = ((b'a' + i - 1) as char, (b'a' + i) as char);
        bomb.push_str(&format!("{n}: &{n} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"));
    }
    let mut huge = b"version: '1'\ndescription: '".to_vec();
    huge.extend(std::iter::repeat_n(b'x', 2 * 1024 * 1024));
    huge.extend(b"'\n");
    let binary: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty.yaml", vec![], "must be a mapping"),
        ("binary.bin", binary, "not UTF-8"),
        ("huge.yaml", huge, "the limit is 1048576 bytes"),
        ("deep.yaml", "[".repeat(100_000).into_bytes(), "nested more than 128 levels deep"),
        ("deep.json", "{\"a\":".repeat(200_000).into_bytes(), "nested more than 128 levels deep"),
        ("bomb.yaml", bomb.into_bytes(), "repetition limit"),
        ("nul.yaml", b"version: '1'\0\n".to_vec(), "control characters"),
        ("list.yaml", b"- a\n- b\n".to_vec(), "must be a mapping"),
        ("truncated.json", SEED.as_bytes()[..40].to_vec(), "not valid YAML or JSON"),
        ("dup.json", br#"{"version":"1","tools":{"a":{},"a":{"action":"deny"}}}"#.to_vec(), "duplicate key"),
    ];
    for (name, contents, message) in cases {
        let path = file(&dir, name, &contents);
        for args in [
            vec!["validate", path.as_str()],
            vec!["eval", "--policy", path.as_str(), "--tool", "x"],
            vec!["convert", path.as_str()],
        ] {
            let all = fails_cleanly(&toolgate(&args));
            assert!(all.contains(message), "{name} {args:?}: {all}");
        }
    }
    let missing = dir.path().join("missing.yaml").display().to_string();
    assert!(fails_cleanly(&toolgate(&["validate", &missing])).contains("cannot read"));
    let a_dir = dir.path().display().to_string();
    fails_cleanly(&toolgate(&["validate", &a_dir]));
}

#[test]
fn eval_seed_rate_limits_the_eleventh_start() {
    let seed = examples().join("seed-start-pod.json").display().to_string();
    let tenth =
        eval_json(&["eval", "--policy", &seed, "--tool", "start-pod", "--args", r#"{"podId":"p1"}"#, "--count", "10"]);
    assert_eq!(tenth["decision"], "allow");
    assert_eq!(tenth["rule"], "tools.start-pod");
    let d =
        eval_json(&["eval", "--policy", &seed, "--tool", "start-pod", "--args", r#"{"podId":"p1"}"#, "--count", "11"]);
    assert_eq!(d["decision"], "rate_limited", "{d}");
    assert_eq!(d["call"], 11);
    assert_eq!(d["rule"], "tools.start-pod.limits[0]");
    assert_eq!(d["retryAfterSeconds"], 60, "all 11 calls happen at the same instant");
    assert_eq!(d["policy"], "seed-start-pod.json");
    assert_eq!(d["revision"].as_str().unwrap().len(), 12);
}

#[test]
fn eval_denies_unlisted_tools_and_checks_arguments() {
    let seed = examples().join("seed-start-pod.json").display().to_string();
    let d = eval_json(&["eval", "--policy", &seed, "--tool", "delete-pod", "--args", r#"{"podId":"p1"}"#]);
    assert_eq!(d["decision"], "deny");
    assert_eq!(d["rule"], "default");
    assert!(d["reason"].as_str().unwrap().contains("default: deny"), "{d}");
    assert!(d.get("retryAfterSeconds").is_none());

    let pack = examples().join("runpod-4.0.0.yaml").display().to_string();
    let d = eval_json(&[
        "eval",
        "-p",
        &pack,
        "--tool",
        "pod-action",
        "--args",
        r#"{"id":"p","body":{"action":"terminate"}}"#,
    ]);
    assert_eq!(d["decision"], "deny");
    assert_eq!(d["rule"], "tools.pod-action.require[0]", "require is checked before deny_if");
    assert!(d["reason"].as_str().unwrap().contains("delete-pod"), "{d}");
    let d = eval_json(&["eval", "-p", &pack, "--tool", "delete-pod", "--args", r#"{"id":"p"}"#]);
    assert_eq!(d["decision"], "approval");
    assert_eq!(d["approvalTimeoutSeconds"], 600);

    // Several documents apply together.
    let d = eval_json(&["eval", "-p", &pack, "-p", &seed, "--tool", "list-pods"]);
    assert_eq!(d["decision"], "deny", "the seed denies list-pods: {d}");
    assert_eq!(d["policy"], "seed-start-pod.json");

    let all = fails_cleanly(&toolgate(&["eval", "-p", &seed, "--tool", "start-pod", "--args", "{not json"]));
    assert!(all.contains("--args is not valid JSON"), "{all}");
    let d = eval_json(&["eval", "-p", &seed, "--tool", "start-pod", "--args", "[1]"]);
    assert_eq!(d["decision"], "deny", "arguments must be an object");
}

#[test]
fn eval_identifies_callers_by_credential_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let fp = toolgate_policy::fingerprint("Bearer ops");
    let policy = file(
        &dir,
        "grants.yaml",
        format!("version: '1'\ngrants:\n  - {{name: ops, match: {{fingerprints: ['{fp}']}}, default: allow}}\n")
            .as_bytes(),
    );
    let d = eval_json(&["eval", "-p", &policy, "--tool", "x", "--credential", "Bearer ops"]);
    assert_eq!((d["decision"].as_str(), d["grant"].as_str()), (Some("allow"), Some("ops")));
    let d = eval_json(&["eval", "-p", &policy, "--tool", "x", "--identity", &fp]);
    assert_eq!(d["decision"], "allow");
    let d = eval_json(&["eval", "-p", &policy, "--tool", "x", "--credential", "Bearer other"]);
    assert_eq!(d["decision"], "deny");
    assert_eq!(d["rule"], "grants");
}

#[test]
fn eval_dry_runs_authenticated_identities() {
    let dir = tempfile::tempdir().unwrap();
    let policy = file(
        &dir,
        "ids.yaml",
        br#"version: '1'
grants:
  - {name: agent-a, match: {subjects: [agent-a]}, tools: {pod-action: {limits: [{window: minute, max: 1, scope: identity}]}}}
  - {name: platform, match: {claims: {groups: [platform]}}, default: allow}
  - {name: agents, match: {serviceAccounts: ["agents/*"]}, tools: {list-pods: {}}}
  - {name: ci, match: {apiKeys: [ci-bot]}, tools: {list-pods: {}}}
"#,
    );
    let d = eval_json(&["eval", "-p", &policy, "--tool", "pod-action", "--subject", "agent-a", "--count", "2"]);
    assert_eq!((d["decision"].as_str(), d["grant"].as_str()), (Some("rate_limited"), Some("agent-a")));
    assert_eq!(d["subject"], "oidc:https://issuer.example#agent-a");
    let d =
        eval_json(&["eval", "-p", &policy, "--tool", "x", "--subject", "u", "--claims", r#"{"groups":["platform"]}"#]);
    assert_eq!((d["decision"].as_str(), d["grant"].as_str()), (Some("allow"), Some("platform")));
    let d = eval_json(&["eval", "-p", &policy, "--tool", "list-pods", "--service-account", "agents/runner"]);
    assert_eq!(
        (d["decision"].as_str(), d["grant"].as_str(), d["subject"].as_str()),
        (Some("allow"), Some("agents"), Some("sa:agents/runner"))
    );
    let d = eval_json(&["eval", "-p", &policy, "--tool", "list-pods", "--api-key", "ci-bot"]);
    assert_eq!(d["grant"], "ci");
    let d = eval_json(&["eval", "-p", &policy, "--tool", "list-pods", "--identity", "apikey:ci-bot"]);
    assert_eq!((d["decision"].as_str(), d["grant"].as_str()), (Some("deny"), None), "a plain identity is no API key");
    for bad in [
        vec!["--service-account", "no-slash"],
        vec!["--claims", "[1]", "--subject", "a"],
        vec!["--claims", r#"{"a":1}"#],
    ] {
        let mut args = vec!["eval", "-p", &policy, "--tool", "x"];
        args.extend(bad.iter().copied());
        let all = fails_cleanly(&toolgate(&args));
        assert!(all.contains("--"), "{all}");
    }
}

fn manifest(out: &Output) -> Value {
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_norway::from_slice(&out.stdout).expect("convert prints YAML")
}

#[test]
fn convert_intercept_to_an_equivalent_mcppolicy() {
    let dir = tempfile::tempdir().unwrap();
    let it = file(&dir, "GitHub Rules.yaml", INTERCEPT.as_bytes());
    let m = manifest(&toolgate(&["convert", &it, "--namespace", "agents"]));
    assert_eq!(m["apiVersion"], "toolgate.dev/v1alpha1");
    assert_eq!(m["kind"], "McpPolicy");
    assert_eq!(m["metadata"]["name"], "github-rules");
    assert_eq!(m["metadata"]["namespace"], "agents");
    let (spec, format) = toolgate_policy::document_from_value(m["spec"].clone()).expect("spec parses back");
    assert_eq!(format, toolgate_policy::SourceFormat::Native, "the manifest holds the native form");
    assert_eq!(spec, toolgate_policy::parse_document(INTERCEPT).unwrap(), "same meaning as the Intercept file");
    assert_eq!(m["spec"]["default"], "allow", "Intercept's omitted default is allow");
    assert_eq!(m["spec"]["tools"]["create_issue"]["limits"][0]["scope"], "global");
}

#[test]
fn convert_the_seed_keeps_it_verbatim() {
    let seed = examples().join("seed-start-pod.json").display().to_string();
    let m = manifest(&toolgate(&["convert", &seed, "--name", "start-pod-limit"]));
    assert_eq!(m["metadata"]["name"], "start-pod-limit");
    assert!(m["metadata"].get("namespace").is_none());
    let original: Value = serde_json::from_str(SEED).unwrap();
    assert_eq!(m["spec"], original, "a PolicyLayer policy pastes verbatim under spec");
    let m = manifest(&toolgate(&["convert", &seed]));
    assert_eq!(m["metadata"]["name"], "seed-start-pod");

    let dir = tempfile::tempdir().unwrap();
    let bad = file(&dir, "bad.json", br#"{"version":"1","tools":{"a":{"limits":[{"window":"week","max":1}]}}}"#);
    let all = fails_cleanly(&toolgate(&["convert", &bad]));
    assert!(all.contains("tools.a.limits[0].window"), "an invalid policy is not converted: {all}");
}

#[test]
fn fingerprint_from_argument_and_stdin() {
    let out = toolgate(&["fingerprint", "Bearer abc"]);
    assert!(out.status.success());
    let printed = text(&out.stdout).trim().to_owned();
    assert_eq!(printed, toolgate_policy::fingerprint("Bearer abc"));
    assert!(printed.starts_with("sha256:") && printed.len() == 7 + 64, "{printed}");

    let mut child = Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .arg("fingerprint")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("runs");
    child.stdin.take().expect("stdin").write_all(b"Bearer abc\n").expect("write");
    let out = child.wait_with_output().expect("exits");
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).trim(), printed, "the trailing newline is not part of the credential");
}

#[test]
fn fingerprint_is_the_same_for_every_spelling_of_a_credential() {
    // The usual spelling keeps the fingerprint it always had (grants in use list it).
    let pinned = "sha256:c355dce96c1612880d11940ffdd9014d386c253e0c3652a6cd06a7226f7bd2b6";
    for spelling in ["Bearer abc", "bearer abc", "BEARER abc", "BeArEr abc", " Bearer   abc ", "Bearer\tabc"] {
        let out = toolgate(&["fingerprint", spelling]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), pinned, "{spelling:?}");
    }
    let out = toolgate(&["fingerprint", "Bearer ABC"]);
    assert_ne!(text(&out.stdout).trim(), pinned, "the credential itself is case-sensitive");
    let help = text(&toolgate(&["fingerprint", "--help"]).stdout);
    assert!(help.contains("Every spelling of one credential"), "{help}");

    // `eval --credential` finds the grant by any spelling too.
    let dir = tempfile::tempdir().unwrap();
    let policy = file(
        &dir,
        "grants.yaml",
        format!("version: '1'\ngrants:\n  - {{name: ops, match: {{fingerprints: ['{pinned}']}}, default: allow}}\n")
            .as_bytes(),
    );
    let d = eval_json(&["eval", "-p", &policy, "--tool", "x", "--credential", "BEARER  abc"]);
    assert_eq!((d["decision"].as_str(), d["grant"].as_str()), (Some("allow"), Some("ops")));
}

#[test]
fn usage_errors_exit_2() {
    let out = toolgate(&["eval", "--tool", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--policy"));
    let out = toolgate(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!text(&out.stderr).contains("panicked"));
}
