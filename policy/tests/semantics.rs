//! The semantics DESIGN.md promises, one behaviour per test, through the public API.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::{Value, json};
use toolgate_policy::{Call, Caller, Decision, DecisionKind, Limiter, Policy, fingerprint};

const SEED: &str = r#"{"version":"1","default":"deny","tools":{"start-pod":{"limits":[{"counter":"start-pod_rate","window":"minute","max":10,"scope":"grant"}]}}}"#;

fn policy(texts: &[&str]) -> Policy {
    let docs = texts
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("d{i}"), toolgate_policy::parse_document(t).expect("parses")))
        .collect();
    Policy::compile(docs).expect("valid")
}

fn caller(credential: &str) -> Caller {
    Caller { identity: fingerprint(credential), ..Caller::default() }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Decides and commits (the upstream call succeeded).
fn decide(p: &Policy, l: &Limiter, who: &Caller, tool: &str, args: Value, now: Duration) -> Decision {
    let mut d = p.decide(l, &Call { tool, arguments: &args, caller: who }, now);
    if let Some(r) = d.reservation.take() {
        r.commit();
    }
    d
}

fn kind(p: &Policy, l: &Limiter, who: &Caller, tool: &str, args: Value) -> DecisionKind {
    decide(p, l, who, tool, args, Duration::ZERO).kind
}

// ---------------------------------------------------------------- the seed policy

#[test]
fn a_window_of_60_is_sixty_seconds_like_minute() {
    // PolicyLayer's spelling: `max: 10, window: 60` is 10 calls per minute.
    let by_number = r#"{"version":"1","default":"deny","tools":{"start-pod":{"limits":[{"window":60,"max":2}]}}}"#;
    let by_name = r#"{"version":"1","default":"deny","tools":{"start-pod":{"limits":[{"window":"minute","max":2}]}}}"#;
    for text in [by_number, by_name] {
        let p = policy(&[text]);
        let l = Limiter::default();
        let alice = caller("Bearer alice");
        assert_eq!(decide(&p, &l, &alice, "start-pod", json!({}), secs(0)).kind, DecisionKind::Allow);
        assert_eq!(decide(&p, &l, &alice, "start-pod", json!({}), secs(1)).kind, DecisionKind::Allow);
        let d = decide(&p, &l, &alice, "start-pod", json!({}), Duration::from_millis(59_999));
        assert_eq!(d.kind, DecisionKind::RateLimited, "{text}");
        assert_eq!(d.retry_after, Some(Duration::from_millis(1)), "{text}");
        assert!(d.reason.as_deref().unwrap().contains("at most 2 per minute"), "{:?}", d.reason);
        // 60 s after the first call, its unit has left the window: exactly one more.
        assert_eq!(decide(&p, &l, &alice, "start-pod", json!({}), secs(60)).kind, DecisionKind::Allow, "{text}");
        assert_eq!(decide(&p, &l, &alice, "start-pod", json!({}), secs(60)).kind, DecisionKind::RateLimited);
    }
}

#[test]
fn a_window_in_seconds_is_kept_as_written() {
    // Serialised (the /policy endpoint, `toolgate convert`, the revision) as a number.
    let doc = toolgate_policy::parse_document("version: '1'\ntools:\n  a: {limits: [{window: 90, max: 1}]}\n").unwrap();
    let v = serde_json::to_value(&doc).unwrap();
    assert_eq!(v["tools"]["a"]["limits"][0]["window"], json!(90));
    assert_eq!(toolgate_policy::document_from_value(v).unwrap().0, doc);
}

#[test]
fn seed_allows_start_pod_ten_times_a_minute_per_credential_and_denies_everything_else() {
    let p = policy(&[SEED]);
    let l = Limiter::default();
    let alice = caller("Bearer alice");
    let bob = caller("Bearer bob");
    for i in 0..10 {
        let d = decide(&p, &l, &alice, "start-pod", json!({"podId": "p"}), Duration::from_millis(i * 100));
        assert_eq!(d.kind, DecisionKind::Allow, "call {}", i + 1);
        assert_eq!(d.rule.as_deref(), Some("tools.start-pod"));
    }
    let d = decide(&p, &l, &alice, "start-pod", json!({}), secs(30));
    assert_eq!(d.kind, DecisionKind::RateLimited);
    assert_eq!(d.rule.as_deref(), Some("tools.start-pod.limits[0]"));
    assert_eq!(d.retry_after, Some(secs(30)), "the first start (at 0s) leaves the window at 60s");
    assert!(d.reason.as_deref().unwrap().contains("at most 10 per minute"), "{:?}", d.reason);

    // Without grants each credential is its own grant: bob has his own 10.
    for _ in 0..10 {
        assert_eq!(decide(&p, &l, &bob, "start-pod", json!({}), secs(30)).kind, DecisionKind::Allow);
    }
    assert_eq!(decide(&p, &l, &bob, "start-pod", json!({}), secs(30)).kind, DecisionKind::RateLimited);

    // The window slides: at 60s the first admission left it, at 60.1s the second.
    assert_eq!(decide(&p, &l, &alice, "start-pod", json!({}), secs(60)).kind, DecisionKind::Allow);
    assert_eq!(decide(&p, &l, &alice, "start-pod", json!({}), secs(60)).kind, DecisionKind::RateLimited);
    assert_eq!(decide(&p, &l, &alice, "start-pod", json!({}), Duration::from_millis(60_100)).kind, DecisionKind::Allow);

    for tool in ["stop-pod", "delete-pod", "list-pods", "Start-Pod", "start-pod ", ""] {
        let d = decide(&p, &l, &alice, tool, json!({}), secs(0));
        assert_eq!(d.kind, DecisionKind::Deny, "{tool:?}");
        assert_eq!(d.rule.as_deref(), Some("default"));
    }
    assert!(p.lists_tool("start-pod", &alice));
    assert!(!p.lists_tool("delete-pod", &alice));
}

#[test]
fn anonymous_callers_share_one_identity() {
    let p = policy(&[SEED]);
    let l = Limiter::default();
    let a = Caller::default();
    let b = Caller { session: Some("other-session".into()), ..Caller::default() };
    for _ in 0..5 {
        assert_eq!(kind(&p, &l, &a, "start-pod", json!({})), DecisionKind::Allow);
        assert_eq!(kind(&p, &l, &b, "start-pod", json!({})), DecisionKind::Allow);
    }
    assert_eq!(kind(&p, &l, &b, "start-pod", json!({})), DecisionKind::RateLimited);
}

// ---------------------------------------------------------------- names and globs

#[test]
fn exact_names_are_case_sensitive_and_beat_globs() {
    let p = policy(&[r#"
version: "1"
default: deny
tools:
  delete-*: {action: deny, reason: "no deletes"}
  delete-pod: {action: approval}
  "*-pod": {action: allow}
  list-*: {}
  "*": {action: deny, reason: "catch-all"}
"#]);
    let l = Limiter::default();
    let c = Caller::default();
    let rule = |tool: &str| decide(&p, &l, &c, tool, json!({}), Duration::ZERO);
    assert_eq!(rule("delete-pod").kind, DecisionKind::Approval, "exact key beats every glob");
    assert_eq!(rule("delete-volume").kind, DecisionKind::Deny);
    assert_eq!(rule("delete-volume").reason.as_deref(), Some("no deletes"));
    // `delete-*` (7 literal characters) beats `*-pod` (4) for delete-xpod…
    assert_eq!(rule("delete-xpod").rule.as_deref(), Some("tools.delete-*"));
    // …and `*-pod` beats `*`.
    assert_eq!(rule("stop-pod").kind, DecisionKind::Allow);
    assert_eq!(rule("list-pods").kind, DecisionKind::Allow);
    assert_eq!(rule("Delete-Pod").reason.as_deref(), Some("catch-all"), "case-sensitive: only `*` matches");
    assert_eq!(rule("DELETE-POD").kind, DecisionKind::Deny);
}

#[test]
fn hide_removes_from_list_and_refuses_calls() {
    let p = policy(&["version: '1'\ndefault: allow\nhide: [secret, 'admin-*']\ntools:\n  admin-read: {}\n"]);
    let l = Limiter::default();
    let c = Caller::default();
    for tool in ["secret", "admin-read", "admin-x"] {
        let d = decide(&p, &l, &c, tool, json!({}), Duration::ZERO);
        assert_eq!(d.kind, DecisionKind::Hidden, "{tool}: hide wins over a rule");
        assert!(!p.lists_tool(tool, &c));
    }
    assert_eq!(kind(&p, &l, &c, "Secret", json!({})), DecisionKind::Allow);
    assert!(p.lists_tool("anything", &c));

    let all = policy(&["version: '1'\ndefault: allow\nhide: ['*']\n"]);
    assert_eq!(kind(&all, &l, &c, "x", json!({})), DecisionKind::Hidden);
}

// ---------------------------------------------------------------- several documents

#[test]
fn several_documents_must_all_pass() {
    let allow_all = "version: '1'\ndefault: allow\n";
    let only_reads = "version: '1'\ntools:\n  'list-*': {}\n  start-pod: {}\n";
    let p = policy(&[allow_all, only_reads]);
    let l = Limiter::default();
    let c = Caller::default();
    assert_eq!(kind(&p, &l, &c, "list-pods", json!({})), DecisionKind::Allow);
    let d = decide(&p, &l, &c, "delete-pod", json!({}), Duration::ZERO);
    assert_eq!(d.kind, DecisionKind::Deny);
    assert_eq!(d.policy.as_deref(), Some("d1"), "the refusing document is named");
    assert!(!p.lists_tool("delete-pod", &c));
    assert!(p.lists_tool("list-pods", &c));
}

#[test]
fn hide_is_the_union_of_documents() {
    let a = "version: '1'\ndefault: allow\nhide: [a]\n";
    let b = "version: '1'\ndefault: allow\nhide: [b]\n";
    let p = policy(&[a, b]);
    let l = Limiter::default();
    let c = Caller::default();
    assert_eq!(kind(&p, &l, &c, "a", json!({})), DecisionKind::Hidden);
    assert_eq!(kind(&p, &l, &c, "b", json!({})), DecisionKind::Hidden);
    assert_eq!(kind(&p, &l, &c, "c", json!({})), DecisionKind::Allow);
    assert!(!p.lists_tool("a", &c) && !p.lists_tool("b", &c) && p.lists_tool("c", &c));
}

#[test]
fn every_documents_limits_apply_and_the_tightest_binds() {
    let a = "version: '1'\ntools:\n  start-pod: {limits: [{window: minute, max: 5}]}\n";
    let b = "version: '1'\ntools:\n  start-pod: {limits: [{window: minute, max: 2}]}\n";
    for order in [[a, b], [b, a]] {
        let p = policy(&order);
        let l = Limiter::default();
        let c = Caller::default();
        assert_eq!(kind(&p, &l, &c, "start-pod", json!({})), DecisionKind::Allow);
        assert_eq!(kind(&p, &l, &c, "start-pod", json!({})), DecisionKind::Allow);
        let d = decide(&p, &l, &c, "start-pod", json!({}), Duration::ZERO);
        assert_eq!(d.kind, DecisionKind::RateLimited);
        assert!(d.reason.as_deref().unwrap().contains("at most 2"), "{:?}", d.reason);
    }
}

#[test]
fn approval_if_any_document_requires_it() {
    let allow = "version: '1'\ntools:\n  delete-pod: {}\n";
    let approve = "version: '1'\ntools:\n  delete-pod: {action: approval, reason: ask ops, approval: {timeout: 90s}}\n";
    let deny = "version: '1'\ntools:\n  delete-pod: {action: deny}\n";
    let l = Limiter::default();
    let c = Caller::default();
    for order in [[allow, approve], [approve, allow]] {
        let d = decide(&policy(&order), &l, &c, "delete-pod", json!({}), Duration::ZERO);
        assert_eq!(d.kind, DecisionKind::Approval);
        assert_eq!(d.reason.as_deref(), Some("ask ops"));
        assert_eq!(d.approval_timeout, Some(secs(90)));
        assert!(d.reservation.is_none(), "nothing is reserved while waiting");
    }
    // A refusal anywhere beats approval: nobody is asked about a call that would be refused.
    for order in [[approve, deny], [deny, approve]] {
        assert_eq!(kind(&policy(&order), &l, &c, "delete-pod", json!({})), DecisionKind::Deny);
    }
}

// ---------------------------------------------------------------- approval and limits

#[test]
fn approved_calls_reserve_their_limits_then() {
    let p = policy(&[
        "version: '1'\ntools:\n  delete-pod: {action: approval, limits: [{counter: approvals, window: hour, max: 1}]}\n",
    ]);
    let l = Limiter::default();
    let c = Caller::default();
    let held = decide(&p, &l, &c, "delete-pod", json!({}), secs(0));
    assert_eq!(held.kind, DecisionKind::Approval);
    assert_eq!(held.approval_timeout, Some(secs(600)), "default timeout 10m");
    let second = decide(&p, &l, &c, "delete-pod", json!({}), secs(1));
    assert_eq!(second.kind, DecisionKind::Approval, "waiting calls do not spend the limit");

    let mut ok = held.approved(&l, secs(5));
    assert_eq!(ok.kind, DecisionKind::Allow);
    ok.reservation.take().expect("reserved").commit();
    let late = second.approved(&l, secs(6));
    assert_eq!(late.kind, DecisionKind::RateLimited);
    assert_eq!(late.retry_after, Some(Duration::from_secs(3599)));
}

#[test]
fn refused_calls_never_spend_quota() {
    let p = policy(&[r#"
version: "1"
all_tools:
  limits: [{counter: all, window: minute, max: 3}]
tools:
  create-pod:
    deny_if: [{path: args.gpuCount, op: gt, value: 2}]
    limits: [{counter: creates, window: minute, max: 2}]
  delete-pod: {action: deny}
  list-pods: {}
"#]);
    let l = Limiter::default();
    let c = Caller::default();
    for _ in 0..20 {
        assert_eq!(kind(&p, &l, &c, "create-pod", json!({"gpuCount": 8})), DecisionKind::Deny);
        assert_eq!(kind(&p, &l, &c, "delete-pod", json!({})), DecisionKind::Deny);
        assert_eq!(kind(&p, &l, &c, "unknown", json!({})), DecisionKind::Deny);
    }
    assert_eq!(kind(&p, &l, &c, "create-pod", json!({"gpuCount": 1})), DecisionKind::Allow);
    assert_eq!(kind(&p, &l, &c, "create-pod", json!({"gpuCount": 2})), DecisionKind::Allow);
    // The third create hits `creates` (2); `all` must not keep the unit it reserved first.
    assert_eq!(kind(&p, &l, &c, "create-pod", json!({})), DecisionKind::RateLimited);
    // `all` holds 2 units; the refused create must not have kept a third.
    assert_eq!(kind(&p, &l, &c, "list-pods", json!({})), DecisionKind::Allow);
    let d = decide(&p, &l, &c, "list-pods", json!({}), Duration::ZERO);
    assert_eq!((d.kind, d.rule.as_deref()), (DecisionKind::RateLimited, Some("all_tools.limits[0]")));
}

#[test]
fn a_document_that_refuses_keeps_other_documents_limits_unspent() {
    let limited = "version: '1'\ntools:\n  start-pod: {limits: [{window: minute, max: 1}]}\n";
    let checks = "version: '1'\ntools:\n  start-pod: {require: [{path: args.podId, op: exists}]}\n";
    let p = policy(&[limited, checks]);
    let l = Limiter::default();
    let c = Caller::default();
    for _ in 0..5 {
        assert_eq!(kind(&p, &l, &c, "start-pod", json!({})), DecisionKind::Deny);
    }
    assert_eq!(kind(&p, &l, &c, "start-pod", json!({"podId": "p"})), DecisionKind::Allow);
    assert_eq!(kind(&p, &l, &c, "start-pod", json!({"podId": "p"})), DecisionKind::RateLimited);
}

#[test]
fn rollback_gives_the_units_back() {
    let p = policy(&[SEED]);
    let l = Limiter::default();
    let c = caller("Bearer x");
    let call = Call { tool: "start-pod", arguments: &json!({}), caller: &c };
    for _ in 0..25 {
        // The upstream call failed (transport or JSON-RPC error): nothing spent.
        let d = p.decide(&l, &call, Duration::ZERO);
        assert_eq!(d.kind, DecisionKind::Allow);
        d.reservation.expect("allow carries a reservation").rollback();
    }
    for _ in 0..10 {
        p.decide(&l, &call, Duration::ZERO).reservation.expect("room").commit();
    }
    assert_eq!(p.decide(&l, &call, Duration::ZERO).kind, DecisionKind::RateLimited);
}

// ---------------------------------------------------------------- spend caps

const SPEND: &str = r#"
version: "1"
tools:
  create-pod:
    limits:
      - {counter: gpus, window: day, max: 8, increment_from: args.gpuCount, reason: "GPU budget used up"}
"#;

#[test]
fn spend_caps_count_the_argument() {
    let p = policy(&[SPEND]);
    let l = Limiter::default();
    let c = Caller::default();
    assert_eq!(kind(&p, &l, &c, "create-pod", json!({"gpuCount": 3})), DecisionKind::Allow);
    assert_eq!(kind(&p, &l, &c, "create-pod", json!({"gpuCount": "2"})), DecisionKind::Allow, "numeric string");
    assert_eq!(kind(&p, &l, &c, "create-pod", json!({"gpuCount": 2.0})), DecisionKind::Allow, "integral float");
    assert_eq!(kind(&p, &l, &c, "create-pod", json!({"gpuCount": 0})), DecisionKind::Allow, "zero spends nothing");
    let d = decide(&p, &l, &c, "create-pod", json!({"gpuCount": 2}), Duration::ZERO);
    assert_eq!(d.kind, DecisionKind::RateLimited, "7 used, 2 more exceed 8");
    assert_eq!(d.reason.as_deref(), Some("GPU budget used up"));
    assert_eq!(kind(&p, &l, &c, "create-pod", json!({"gpuCount": 1})), DecisionKind::Allow, "exactly 8");
    assert_eq!(kind(&p, &l, &c, "create-pod", json!({"gpuCount": 1})), DecisionKind::RateLimited);
}

#[test]
fn spend_caps_refuse_amounts_that_cannot_be_counted() {
    let p = policy(&[SPEND]);
    let l = Limiter::default();
    let c = Caller::default();
    for args in [
        json!({}),
        json!({"gpuCount": -1}),
        json!({"gpuCount": 1.5}),
        json!({"gpuCount": "1.5"}),
        json!({"gpuCount": "two"}),
        json!({"gpuCount": null}),
        json!({"gpuCount": true}),
        json!({"gpuCount": [1]}),
        json!({"gpuCount": 1e300}),
    ] {
        let d = decide(&p, &l, &c, "create-pod", args.clone(), Duration::ZERO);
        assert_eq!(d.kind, DecisionKind::Deny, "{args}");
        assert_eq!(d.rule.as_deref(), Some("tools.create-pod.limits[0]"));
        assert!(d.reason.as_deref().unwrap().contains("non-negative integer"), "{:?}", d.reason);
    }
    // An amount larger than the cap can never pass: refused with no retry time.
    let d = decide(&p, &l, &c, "create-pod", json!({"gpuCount": 9}), Duration::ZERO);
    assert_eq!(d.kind, DecisionKind::RateLimited);
    assert_eq!(d.retry_after, None);
    assert!(d.reason.as_deref() == Some("GPU budget used up"));
    // None of that spent anything.
    assert_eq!(kind(&p, &l, &c, "create-pod", json!({"gpuCount": 8})), DecisionKind::Allow);
}

// ---------------------------------------------------------------- argument checks

const CHECKS: &str = r#"
version: "1"
tools:
  create-pod:
    require:
      - {path: args.name, op: regex, value: '^[a-z]+$'}
    deny_if:
      - {path: args.gpuCount, op: gt, value: 2, reason: "at most 2 GPUs"}
      - {path: args.env.DEBUG, op: exists}
      - {path: args.ports, op: contains, value: 22}
      - {path: args.cloud, op: not_in, value: [SECURE, COMMUNITY]}
      - {path: args.tags.0, op: eq, value: forbidden}
"#;

fn check(args: Value) -> (DecisionKind, Option<String>) {
    let d = decide(&policy(&[CHECKS]), &Limiter::default(), &Caller::default(), "create-pod", args, Duration::ZERO);
    (d.kind, d.reason)
}

#[test]
fn numeric_strings_are_compared_as_numbers() {
    assert_eq!(check(json!({"name": "a", "gpuCount": "100"})).0, DecisionKind::Deny);
    assert_eq!(check(json!({"name": "a", "gpuCount": " 3 "})).0, DecisionKind::Deny);
    assert_eq!(check(json!({"name": "a", "gpuCount": "2"})).0, DecisionKind::Allow);
    assert_eq!(check(json!({"name": "a", "gpuCount": 2.5})).1.as_deref(), Some("at most 2 GPUs"));
    assert_eq!(check(json!({"name": "a", "ports": [80, "22"]})).0, DecisionKind::Deny, "contains coerces too");
    // A string that is not a number is not greater than 2: the server's own validation
    // refuses it; a policy that must be sure uses `arguments` (a JSON Schema).
    assert_eq!(check(json!({"name": "a", "gpuCount": "lots"})).0, DecisionKind::Allow);
}

#[test]
fn missing_paths_fail_require_and_do_not_fire_deny_if() {
    assert_eq!(check(json!({"name": "abc"})).0, DecisionKind::Allow, "no deny_if path present");
    let (k, reason) = check(json!({}));
    assert_eq!(k, DecisionKind::Deny, "require on a missing path refuses");
    assert!(reason.unwrap().contains("args.name"));
    assert_eq!(check(json!({"name": 5})).0, DecisionKind::Deny, "regex needs a string");
    assert_eq!(check(json!({"name": "a", "env": {"DEBUG": null}})).0, DecisionKind::Deny, "null is present");
    assert_eq!(check(json!({"name": "a", "env": "DEBUG"})).0, DecisionKind::Allow, "no path through a string");
    assert_eq!(check(json!({"name": "a", "tags": ["ok", "forbidden"]})).0, DecisionKind::Allow);
    assert_eq!(check(json!({"name": "a", "tags": ["forbidden"]})).0, DecisionKind::Deny, "array index");
    assert_eq!(check(json!({"name": "a", "cloud": "SECURE"})).0, DecisionKind::Allow);
    assert_eq!(check(json!({"name": "a", "cloud": "secure"})).0, DecisionKind::Deny);
}

#[test]
fn arguments_that_are_not_objects_are_refused() {
    for args in [json!("a string"), json!([1, 2]), json!(3), json!(true)] {
        let d = decide(
            &policy(&["version: '1'\ndefault: allow\n"]),
            &Limiter::default(),
            &Caller::default(),
            "t",
            args.clone(),
            Duration::ZERO,
        );
        assert_eq!(d.kind, DecisionKind::Deny, "{args}");
        assert!(d.reason.as_deref().unwrap().contains("must be an object"));
    }
    // Absent arguments are an empty object.
    assert_eq!(check(Value::Null).0, DecisionKind::Deny, "require on name");
    let p = policy(&[
        "version: '1'\ntools:\n  t: {arguments: {type: object, required: [x]}}\n  u: {arguments: {type: object}}\n",
    ]);
    assert_eq!(kind(&p, &Limiter::default(), &Caller::default(), "t", Value::Null), DecisionKind::Deny);
    assert_eq!(kind(&p, &Limiter::default(), &Caller::default(), "u", Value::Null), DecisionKind::Allow);
}

#[test]
fn argument_schemas_are_checked() {
    let p = policy(&[r#"
version: "1"
tools:
  pod-action:
    reason: "start, stop or restart only"
    arguments:
      type: object
      required: [body]
      properties:
        body: {type: object, properties: {action: {enum: [start, stop, restart]}}}
"#]);
    let l = Limiter::default();
    let c = Caller::default();
    assert_eq!(kind(&p, &l, &c, "pod-action", json!({"body": {"action": "start"}})), DecisionKind::Allow);
    let d = decide(&p, &l, &c, "pod-action", json!({"body": "{\"action\":\"terminate\"}"}), Duration::ZERO);
    assert_eq!(d.kind, DecisionKind::Deny, "a body sent as a JSON string does not bypass the check");
    assert_eq!(d.rule.as_deref(), Some("tools.pod-action.arguments"));
    assert_eq!(d.reason.as_deref(), Some("start, stop or restart only"));
    assert_eq!(kind(&p, &l, &c, "pod-action", json!({"body": {"action": "terminate"}})), DecisionKind::Deny);
}

#[test]
fn all_tools_checks_apply_to_every_allowed_tool() {
    let p = policy(&[r#"
version: "1"
default: allow
all_tools:
  deny_if: [{path: args.dryRun, op: eq, value: false}]
  limits: [{counter: all, window: minute, max: 2, scope: global}]
tools:
  a: {}
"#]);
    let l = Limiter::default();
    assert_eq!(kind(&p, &l, &caller("x"), "a", json!({"dryRun": false})), DecisionKind::Deny);
    assert_eq!(
        kind(&p, &l, &caller("x"), "other", json!({"dryRun": false})),
        DecisionKind::Deny,
        "default-allowed too"
    );
    assert_eq!(kind(&p, &l, &caller("x"), "a", json!({})), DecisionKind::Allow);
    assert_eq!(kind(&p, &l, &caller("y"), "other", json!({})), DecisionKind::Allow);
    assert_eq!(kind(&p, &l, &caller("z"), "a", json!({})), DecisionKind::RateLimited, "global: shared by all");
}

// ---------------------------------------------------------------- grants and scopes

#[test]
fn grants_select_rules_and_share_counts() {
    let ops1 = fingerprint("Bearer ops-1");
    let ops2 = fingerprint("Bearer ops-2");
    let text = format!(
        r#"
version: "1"
grants:
  - name: ops
    match: {{fingerprints: ["{ops1}", "{ops2}"]}}
    tools:
      start-pod: {{limits: [{{window: minute, max: 2}}]}}
      delete-pod: {{}}
  - name: ci
    match: {{header: {{name: X-Toolgate-Team, values: [ci]}}}}
    default: allow
    hide: [delete-pod]
"#
    );
    let p = policy(&[&text]);
    assert_eq!(p.header_names(), ["x-toolgate-team"]);
    let l = Limiter::default();
    let (a, b) = (caller("Bearer ops-1"), caller("Bearer ops-2"));
    let d = decide(&p, &l, &a, "start-pod", json!({}), Duration::ZERO);
    assert_eq!((d.kind, d.grant.as_deref()), (DecisionKind::Allow, Some("ops")));
    assert_eq!(kind(&p, &l, &b, "start-pod", json!({})), DecisionKind::Allow);
    assert_eq!(kind(&p, &l, &a, "start-pod", json!({})), DecisionKind::RateLimited, "scope grant: shared by ops");
    assert_eq!(kind(&p, &l, &a, "delete-pod", json!({})), DecisionKind::Allow);

    let ci = Caller { headers: vec![("x-toolgate-team".into(), "ci".into())], ..Caller::default() };
    assert_eq!(kind(&p, &l, &ci, "anything", json!({})), DecisionKind::Allow);
    assert_eq!(kind(&p, &l, &ci, "delete-pod", json!({})), DecisionKind::Hidden);
    let wrong = Caller { headers: vec![("x-toolgate-team".into(), "CI".into())], ..Caller::default() };
    let d = decide(&p, &l, &wrong, "anything", json!({}), Duration::ZERO);
    assert_eq!((d.kind, d.rule.as_deref()), (DecisionKind::Deny, Some("grants")), "nobody else: no top-level tools");
    assert!(!p.lists_tool("anything", &wrong));
}

#[test]
fn callers_no_grant_matches_get_the_top_level_rules() {
    let ops = fingerprint("Bearer ops");
    let text = format!(
        "version: '1'\ntools:\n  list-pods: {{}}\ngrants:\n  - {{name: ops, match: {{fingerprints: ['{ops}']}}, default: allow}}\n"
    );
    let p = policy(&[&text]);
    let l = Limiter::default();
    assert_eq!(kind(&p, &l, &caller("Bearer ops"), "delete-pod", json!({})), DecisionKind::Allow);
    assert_eq!(kind(&p, &l, &caller("Bearer someone"), "delete-pod", json!({})), DecisionKind::Deny);
    assert_eq!(kind(&p, &l, &caller("Bearer someone"), "list-pods", json!({})), DecisionKind::Allow);
    // A grant's rules replace the top-level ones: ops has no list-pods key but default allow.
    assert_eq!(kind(&p, &l, &caller("Bearer ops"), "list-pods", json!({})), DecisionKind::Allow);
}

#[test]
fn scopes_identity_session_and_global() {
    let p = policy(&[r#"
version: "1"
tools:
  by-identity: {limits: [{window: minute, max: 1, scope: identity}]}
  by-session: {limits: [{window: minute, max: 1, scope: session}]}
  global: {limits: [{window: minute, max: 1, scope: global}]}
"#]);
    let l = Limiter::default();
    let s1 = Caller { session: Some("s1".into()), ..caller("a") };
    let s2 = Caller { session: Some("s2".into()), ..caller("a") };
    let other = Caller { session: Some("s1".into()), ..caller("b") };
    assert_eq!(kind(&p, &l, &s1, "by-identity", json!({})), DecisionKind::Allow);
    assert_eq!(kind(&p, &l, &s2, "by-identity", json!({})), DecisionKind::RateLimited, "same credential");
    assert_eq!(kind(&p, &l, &other, "by-identity", json!({})), DecisionKind::Allow);
    assert_eq!(kind(&p, &l, &s1, "by-session", json!({})), DecisionKind::Allow);
    assert_eq!(kind(&p, &l, &s2, "by-session", json!({})), DecisionKind::Allow);
    assert_eq!(kind(&p, &l, &other, "by-session", json!({})), DecisionKind::RateLimited, "same session id");
    assert_eq!(kind(&p, &l, &s1, "global", json!({})), DecisionKind::Allow);
    assert_eq!(kind(&p, &l, &other, "global", json!({})), DecisionKind::RateLimited);
}

#[test]
fn counters_are_shared_by_name_within_a_document() {
    let p = policy(&[r#"
version: "1"
tools:
  list-pods: {limits: [{counter: reads, window: minute, max: 3}]}
  get-pod: {limits: [{counter: reads, window: minute, max: 3}]}
  start-pod: {limits: [{window: minute, max: 3}]}
"#]);
    let l = Limiter::default();
    let c = Caller::default();
    assert_eq!(kind(&p, &l, &c, "list-pods", json!({})), DecisionKind::Allow);
    assert_eq!(kind(&p, &l, &c, "get-pod", json!({})), DecisionKind::Allow);
    assert_eq!(kind(&p, &l, &c, "list-pods", json!({})), DecisionKind::Allow);
    assert_eq!(kind(&p, &l, &c, "get-pod", json!({})), DecisionKind::RateLimited);
    assert_eq!(kind(&p, &l, &c, "start-pod", json!({})), DecisionKind::Allow, "its own counter");
}

#[test]
fn no_policy_fails_closed() {
    let p = Policy::empty();
    assert!(p.is_empty());
    assert_eq!(kind(&p, &Limiter::default(), &Caller::default(), "list-pods", json!({})), DecisionKind::Deny);
    assert!(!p.lists_tool("list-pods", &Caller::default()));
}

#[test]
fn revision_changes_with_content_only() {
    assert_eq!(policy(&[SEED]).revision(), policy(&[SEED]).revision());
    assert_eq!(policy(&[SEED]).revision().len(), 12);
    assert_ne!(policy(&[SEED]).revision(), policy(&["version: '1'\n"]).revision());
    // The same document as YAML has the same revision: it is a hash of the meaning.
    let yaml = "version: '1'\ndefault: deny\ntools:\n  start-pod:\n    limits: [{counter: start-pod_rate, window: minute, max: 10, scope: grant}]\n";
    assert_eq!(policy(&[SEED]).revision(), policy(&[yaml]).revision());
}
