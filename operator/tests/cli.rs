//! The binary's command line: a bad flag stops it with EX_USAGE (64) and a message naming
//! the flag, before it looks for a cluster (here there is none to find: the test would
//! otherwise see "no Kubernetes configuration" and exit 1).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

fn operator(args: &[&str]) -> Output {
    let home = tempfile::tempdir().expect("temp dir");
    Command::new(env!("CARGO_BIN_EXE_toolgate-operator"))
        .args(args)
        .env_clear()
        .env("HOME", home.path())
        .env("KUBECONFIG", home.path().join("no-such-kubeconfig"))
        .output()
        .expect("run the operator")
}

#[test]
fn bad_flags_exit_64_before_any_io() {
    for (args, named) in [
        (&["--namespace-selector", "team"][..], "--namespace-selector"),
        (&["--allowed-decider-service-accounts", "bot"][..], "--allowed-decider-service-accounts"),
        (&["--decider-service-accounts", "some"][..], "--decider-service-accounts"),
        (&["--cert-mode", "files"][..], "--tls-cert-file"),
        (&["--no-such-flag"][..], "--no-such-flag"),
    ] {
        let out = operator(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
        assert!(!stderr.contains("Kubernetes configuration"), "{args:?} looked for a cluster: {stderr}");
    }
    let help = operator(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("--namespace-selector"));
}

#[test]
fn good_flags_get_past_the_checks() {
    // Valid flags reach the cluster lookup, which fails here (exit 1), not the checks.
    let out = operator(&["--namespace-selector", "team=ml", "--allowed-decider-service-accounts", "ops/bot"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no Kubernetes configuration"), "{stderr}");
}
