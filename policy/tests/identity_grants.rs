//! Grants by authenticated identity: `subjects`, `claims`, `serviceAccounts`, `apiKeys`, and
//! what `scope: identity` / `scope: grant` count by for authenticated callers.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::{Map, Value, json};
use toolgate_policy::{Call, Caller, DecisionKind, Limiter, Policy, Principal};

fn policy(text: &str) -> Policy {
    Policy::compile(vec![("p".into(), toolgate_policy::parse_document(text).expect("parses"))]).expect("valid")
}

fn claims(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => unreachable!("test claims are objects"),
    }
}

fn token(issuer: &str, subject: &str, extra: Value) -> Caller {
    Caller {
        principal: Some(Principal::Token { issuer: issuer.into(), subject: subject.into(), claims: claims(extra) }),
        ..Caller::default()
    }
}

fn service_account(ns: &str, name: &str) -> Caller {
    let sub = format!("system:serviceaccount:{ns}:{name}");
    Caller {
        principal: Some(Principal::ServiceAccount {
            namespace: ns.into(),
            name: name.into(),
            pod: Some("client-0".into()),
            claims: claims(json!({"sub": sub})),
        }),
        ..Caller::default()
    }
}

fn api_key(name: &str) -> Caller {
    Caller { principal: Some(Principal::ApiKey { name: name.into() }), ..Caller::default() }
}

/// Decides and commits; returns the kind and the grant.
fn decide(p: &Policy, l: &Limiter, who: &Caller, tool: &str) -> (DecisionKind, Option<String>) {
    let args = json!({});
    let mut d = p.decide(l, &Call { tool, arguments: &args, caller: who }, Duration::ZERO);
    if let Some(r) = d.reservation.take() {
        r.commit();
    }
    (d.kind, d.grant.as_deref().map(str::to_owned))
}

const GRANTS: &str = r#"
version: "1"
grants:
  - name: agent-a
    match: {subjects: ["agent-a"]}
    tools:
      pod-action: {limits: [{window: minute, max: 2, scope: identity}]}
  - name: platform
    match: {claims: {groups: [platform], azp: [console]}}
    default: allow
  - name: agents
    match: {serviceAccounts: ["agents/*"]}
    tools:
      list-pods: {}
  - name: ci
    match: {apiKeys: [ci-bot], subjects: ["system:serviceaccount:ci:*"]}
    tools:
      pod-action: {limits: [{window: minute, max: 1, scope: grant}]}
"#;

#[test]
fn each_source_of_identity_selects_its_grant() {
    let p = policy(GRANTS);
    let l = Limiter::default();
    let a = token("https://idp", "agent-a", json!({}));
    assert_eq!(decide(&p, &l, &a, "pod-action"), (DecisionKind::Allow, Some("agent-a".into())));
    assert_eq!(decide(&p, &l, &a, "delete-pod").0, DecisionKind::Deny);

    // claims: every listed claim must hold; a list claim holds by any item.
    let plat = token("https://idp", "u1", json!({"groups": ["dev", "platform"], "azp": "console"}));
    assert_eq!(decide(&p, &l, &plat, "delete-pod"), (DecisionKind::Allow, Some("platform".into())));
    let half = token("https://idp", "u2", json!({"groups": ["platform"], "azp": "cli"}));
    assert_eq!(decide(&p, &l, &half, "delete-pod"), (DecisionKind::Deny, None), "azp does not hold");
    let nested = token("https://idp", "u3", json!({"groups": {"platform": true}, "azp": "console"}));
    assert_eq!(decide(&p, &l, &nested, "delete-pod").1, None, "an object claim never holds");

    let sa = service_account("agents", "runner");
    assert_eq!(decide(&p, &l, &sa, "list-pods"), (DecisionKind::Allow, Some("agents".into())));
    assert_eq!(decide(&p, &l, &sa, "pod-action").0, DecisionKind::Deny);
    let other_ns = service_account("agents-evil", "runner");
    assert_eq!(decide(&p, &l, &other_ns, "list-pods").1, None, "agents/* is not agents-evil/runner");

    assert_eq!(decide(&p, &l, &api_key("ci-bot"), "pod-action"), (DecisionKind::Allow, Some("ci".into())));
    assert_eq!(decide(&p, &l, &api_key("ci-bot-2"), "pod-action").1, None);
    // A service account of namespace ci matches the grant's subject glob.
    assert_eq!(
        decide(&p, &l, &service_account("ci", "job"), "pod-action"),
        (DecisionKind::RateLimited, Some("ci".into()))
    );
}

#[test]
fn an_api_key_name_or_subject_given_as_a_plain_identity_matches_nothing() {
    // A caller that is only a fingerprint or a gateway name never takes an authenticated
    // grant, whatever its identity string says.
    let p = policy(GRANTS);
    let l = Limiter::default();
    for identity in ["agent-a", "apikey:ci-bot", "sa:agents/runner", "oidc:https://idp#agent-a"] {
        let c = Caller { identity: identity.into(), ..Caller::default() };
        assert_eq!(decide(&p, &l, &c, "list-pods"), (DecisionKind::Deny, None), "{identity}");
    }
}

#[test]
fn scope_identity_counts_per_authenticated_subject_and_issuer() {
    let p = policy(GRANTS);
    let l = Limiter::default();
    let a = token("https://idp", "agent-a", json!({}));
    // The same subject from another trusted issuer is another identity.
    let a_elsewhere = token("https://other-idp", "agent-a", json!({}));
    assert_eq!(decide(&p, &l, &a, "pod-action").0, DecisionKind::Allow);
    assert_eq!(decide(&p, &l, &a, "pod-action").0, DecisionKind::Allow);
    assert_eq!(decide(&p, &l, &a, "pod-action").0, DecisionKind::RateLimited);
    assert_eq!(decide(&p, &l, &a_elsewhere, "pod-action").0, DecisionKind::Allow);
    // Extra claims or another credential fingerprint do not make a new identity.
    let a_again =
        Caller { identity: "sha256:another-token".into(), ..token("https://idp", "agent-a", json!({"x": 1})) };
    assert_eq!(decide(&p, &l, &a_again, "pod-action").0, DecisionKind::RateLimited);
}

#[test]
fn without_grants_scope_grant_counts_per_authenticated_caller() {
    let p = policy(
        r#"{"version":"1","default":"deny","tools":{"start-pod":{"limits":[{"window":"minute","max":1,"scope":"grant"}]}}}"#,
    );
    let l = Limiter::default();
    let a1 = Caller { identity: "sha256:t1".into(), ..token("https://idp", "a", json!({})) };
    let a2 = Caller { identity: "sha256:t2".into(), ..token("https://idp", "a", json!({})) };
    let b = token("https://idp", "b", json!({}));
    assert_eq!(decide(&p, &l, &a1, "start-pod").0, DecisionKind::Allow);
    assert_eq!(decide(&p, &l, &a2, "start-pod").0, DecisionKind::RateLimited, "a's second token is still a");
    assert_eq!(decide(&p, &l, &b, "start-pod").0, DecisionKind::Allow);
}

#[test]
fn bad_identity_criteria_are_refused_with_their_path() {
    for (m, path) in [
        (r#"{serviceAccounts: ["no-slash"]}"#, "grants[0].match.serviceAccounts[0]"),
        (r#"{serviceAccounts: ["a/b/c"]}"#, "grants[0].match.serviceAccounts[0]"),
        (r#"{apiKeys: ["has space"]}"#, "grants[0].match.apiKeys[0]"),
        (r#"{claims: {groups: []}}"#, "grants[0].match.claims.groups"),
        (r#"{subjects: ["["]}"#, "grants[0].match.subjects[0]"),
        (r#"{}"#, "grants[0].match"),
    ] {
        let text = format!("version: '1'\ngrants:\n  - name: g\n    match: {m}\n");
        let doc = toolgate_policy::parse_document(&text).expect("parses");
        let err = Policy::compile(vec![("p".into(), doc)]).expect_err(m).to_string();
        assert!(err.contains(path), "{m}: {err}");
    }
}
