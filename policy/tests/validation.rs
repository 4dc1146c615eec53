//! Every class of validation error: each names the path of the offending field and says
//! what is allowed there.
#![allow(clippy::unwrap_used)]

use toolgate_policy::{Error, MAX_DOCUMENT_BYTES, Policy, Problem, bounds, parse_document};

/// Parses and compiles `text`, returning its problems (empty when valid).
fn problems(text: &str) -> Vec<Problem> {
    match parse_document(text).and_then(|doc| Policy::compile(vec![("p".into(), doc)])) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems(),
    }
}

/// Asserts that `text` is refused with a problem at exactly `path` whose message
/// contains every one of `needles`.
#[track_caller]
fn rejects(text: &str, path: &str, needles: &[&str]) {
    let found = problems(text);
    let p = found.iter().find(|p| p.path == path).unwrap_or_else(|| panic!("no problem at {path:?}: {found:#?}"));
    for n in needles {
        assert!(p.message.contains(n), "{path}: {:?} does not mention {n:?}", p.message);
    }
}

#[track_caller]
fn accepts(text: &str) {
    let found = problems(text);
    assert!(found.is_empty(), "{found:#?}");
}

fn tool(rule: &str) -> String {
    format!("version: '1'\ntools:\n  start-pod: {rule}\n")
}

#[test]
fn version() {
    rejects("version: '2'\n", "version", &["must be \"1\""]);
    rejects("default: deny\n", "", &["missing field `version`"]);
}

#[test]
fn windows() {
    for bad in ["fortnight", "0s", "32d", "1.5h", "5", "-1m", ""] {
        let text = tool(&format!("{{limits: [{{window: '{bad}', max: 1}}]}}"));
        rejects(&text, "tools.start-pod.limits[0].window", &["second, minute, hour, day", "90s"]);
    }
    for good in ["second", "minute", "hour", "day", "90s", "5m", "2h", "1d", "250ms", "31d"] {
        accepts(&tool(&format!("{{limits: [{{window: '{good}', max: 1}}]}}")));
    }
}

#[test]
fn windows_as_whole_seconds() {
    // PolicyLayer writes windows as a bare number of seconds.
    for good in ["1", "60", "3600", "2678400"] {
        accepts(&tool(&format!("{{limits: [{{window: {good}, max: 1}}]}}")));
        accepts(&format!(r#"{{"version":"1","tools":{{"start-pod":{{"limits":[{{"window":{good},"max":1}}]}}}}}}"#));
    }
    let path = "tools.start-pod.limits[0].window";
    // Out of bounds: refused when compiled, like `0s` and `32d`.
    for bad in ["0", "2678401", "18446744073709551615"] {
        rejects(
            &tool(&format!("{{limits: [{{window: {bad}, max: 1}}]}}")),
            path,
            &[bad, "whole number of seconds", "31d"],
        );
    }
    // Not a whole positive number: refused when parsed, naming the field.
    for (bad, needle) in [
        ("-60", "must be positive"),
        ("-0.5", "whole number"),
        ("60.0", "whole number"),
        ("1.5", "whole number"),
        ("6e1", "whole number"),
        ("99999999999999999999", "whole number"),
    ] {
        rejects(&tool(&format!("{{limits: [{{window: {bad}, max: 1}}]}}")), path, &[needle, "minute"]);
        let json = format!(r#"{{"version":"1","tools":{{"start-pod":{{"limits":[{{"window":{bad},"max":1}}]}}}}}}"#);
        rejects(&json, path, &[needle]);
    }
    for bad in ["true", "[60]", "{s: 60}", "null"] {
        rejects(&tool(&format!("{{limits: [{{window: {bad}, max: 1}}]}}")), path, &["whole number of seconds"]);
    }
    // In grants, in all_tools and in Intercept's `state` too.
    let fp = toolgate_policy::fingerprint("Bearer a");
    accepts(&format!(
        "version: '1'\ngrants:\n  - {{name: a, match: {{fingerprints: ['{fp}']}}, all_tools: {{limits: [{{window: 90, max: 1}}]}}}}\n"
    ));
    rejects(
        &format!(
            "version: '1'\ngrants:\n  - {{name: a, match: {{fingerprints: ['{fp}']}}, tools: {{x: {{limits: [{{window: -1, max: 1}}]}}}}}}\n"
        ),
        "grants[0].tools.x.limits[0].window",
        &["must be positive"],
    );
    let intercept = "version: '1'\ntools:\n  pay:\n    rules:\n      - name: cap\n        conditions: [{path: state.pay.spent, op: lte, value: 10}]\n        state: {counter: spent, window: 86400}\n";
    accepts(intercept);
    // A quoted number is a string and needs a unit: `"60"` is ambiguous, `60` is not.
    rejects(&tool("{limits: [{window: '60', max: 1}]}"), path, &["\"60\" is not a window", "unquoted"]);
}

#[test]
fn max_and_increment() {
    rejects(&tool("{limits: [{window: minute, max: 0}]}"), "tools.start-pod.limits[0].max", &["at least 1"]);
    rejects(&tool("{limits: [{window: minute, max: -1}]}"), "tools.start-pod.limits[0].max", &["invalid value"]);
    rejects(
        &tool("{limits: [{window: minute, max: 1, increment: 0}]}"),
        "tools.start-pod.limits[0].increment",
        &["at least 1"],
    );
    rejects(
        &tool("{limits: [{window: minute, max: 5, increment: 2, increment_from: args.n}]}"),
        "tools.start-pod.limits[0]",
        &["not both"],
    );
    rejects(
        &tool("{limits: [{window: minute, max: 1, counter: ''}]}"),
        "tools.start-pod.limits[0].counter",
        &["1-128"],
    );
}

#[test]
fn shared_counters_need_one_window_and_scope() {
    let text = "version: '1'\ntools:\n  a: {limits: [{counter: c, window: minute, max: 5}]}\n  b: {limits: [{counter: c, window: hour, max: 5}]}\n";
    rejects(text, "tools.b.limits[0]", &["\"c\"", "tools.a.limits[0]", "same window and scope"]);
    let scope = "version: '1'\ntools:\n  a: {limits: [{counter: c, window: minute, max: 5}]}\n  b: {limits: [{counter: c, window: minute, max: 5, scope: global}]}\n";
    rejects(scope, "tools.b.limits[0]", &["same window and scope"]);
    // Same window and scope (different max) is fine: one count, each limit its own max.
    accepts(
        "version: '1'\ntools:\n  a: {limits: [{counter: c, window: minute, max: 5}]}\n  b: {limits: [{counter: c, window: 60s, max: 2}]}\n",
    );
}

#[test]
fn regexes() {
    rejects(
        &tool("{require: [{path: args.image, op: regex, value: '(unclosed'}]}"),
        "tools.start-pod.require[0].value",
        &["not a valid regex"],
    );
    rejects(
        &tool("{require: [{path: args.image, op: regex, value: 5}]}"),
        "tools.start-pod.require[0].value",
        &["string"],
    );
    let long =
        format!("{{deny_if: [{{path: args.image, op: regex, value: '{}'}}]}}", "a".repeat(bounds::MAX_REGEX_LEN + 1));
    rejects(&tool(&long), "tools.start-pod.deny_if[0].value", &["longer than 1024 bytes"]);
    // Huge compiled size (a bounded-repetition bomb) is refused, not built.
    rejects(
        &tool("{require: [{path: args.s, op: regex, value: '(\\w{100}){100}'}]}"),
        "tools.start-pod.require[0].value",
        &["regex"],
    );
}

#[test]
fn globs() {
    rejects("version: '1'\ntools:\n  'delete-[': {action: deny}\n", "tools.delete-[", &["not a valid glob"]);
    rejects("version: '1'\nhide: ['a-{b']\n", "hide[0]", &["not a valid glob"]);
    rejects("version: '1'\nhide: ['']\n", "hide[0]", &["must not be empty"]);
    rejects("version: '1'\ntools:\n  '': {}\n", "tools.", &["must not be empty"]);
}

#[test]
fn argument_schemas() {
    rejects(&tool("{arguments: {type: 5}}"), "tools.start-pod.arguments", &["not a usable JSON Schema"]);
    rejects(&tool("{arguments: [1]}"), "tools.start-pod.arguments", &["JSON Schema object"]);
    rejects(&tool("{arguments: {pattern: '(('}}"), "tools.start-pod.arguments", &["not a usable JSON Schema"]);
    accepts(&tool("{arguments: {type: object, required: [podId]}}"));
    accepts(&tool("{arguments: true}"));
}

#[test]
fn condition_paths_and_operands() {
    let at = "tools.start-pod.require[0]";
    rejects(&tool("{require: [{path: podId, op: exists}]}"), &format!("{at}.path"), &["must start with `args.`"]);
    rejects(&tool("{require: [{path: args.a..b, op: exists}]}"), &format!("{at}.path"), &["empty segment"]);
    let deep = format!("args.{}", vec!["a"; bounds::MAX_PATH_DEPTH + 1].join("."));
    rejects(&tool(&format!("{{require: [{{path: {deep}, op: exists}}]}}")), &format!("{at}.path"), &["at most 16"]);
    rejects(&tool("{require: [{path: args.n, op: lt, value: ten}]}"), &format!("{at}.value"), &["needs a number"]);
    rejects(&tool("{require: [{path: args.n, op: in, value: 3}]}"), &format!("{at}.value"), &["needs a list"]);
    rejects(&tool("{require: [{path: args.n, op: eq}]}"), &format!("{at}.value"), &["needs a value"]);
    rejects(&tool("{require: [{path: args.n, op: exists, value: yes}]}"), &format!("{at}.value"), &["true or false"]);
    rejects(
        &tool("{require: [{path: args.n, op: like, value: 1}]}"),
        &format!("{at}.op"),
        &["unknown variant `like`", "regex"],
    );
    rejects(
        &tool("{limits: [{window: minute, max: 9, increment_from: gpuCount}]}"),
        "tools.start-pod.limits[0].increment_from",
        &["must start with `args.`"],
    );
}

#[test]
fn unknown_fields_are_errors_everywhere() {
    rejects("version: '1'\ntool: {}\n", "tool", &["unknown field `tool`", "tools"]);
    rejects(&tool("{action: deny, reasons: x}"), "tools.start-pod.reasons", &["unknown field `reasons`"]);
    rejects(
        &tool("{require: [{path: args.a, op: exists, vaule: 1}]}"),
        "tools.start-pod.require[0].vaule",
        &["unknown field"],
    );
    rejects(
        &tool("{limits: [{window: minute, max: 1, per: grant}]}"),
        "tools.start-pod.limits[0].per",
        &["unknown field"],
    );
    rejects("version: '1'\nall_tools: {limit: []}\n", "all_tools.limit", &["unknown field"]);
    rejects(
        "version: '1'\ngrants: [{name: a, match: {fingerprint: x}}]\n",
        "grants[0].match.fingerprint",
        &["unknown field", "fingerprints"],
    );
}

#[test]
fn wrong_types_and_enums() {
    rejects(&tool("{action: maybe}"), "tools.start-pod.action", &["allow", "deny", "approval"]);
    rejects("version: '1'\ndefault: block\n", "default", &["allow", "deny"]);
    rejects(
        &tool("{limits: [{window: minute, max: 1, scope: team}]}"),
        "tools.start-pod.limits[0].scope",
        &["grant", "identity", "session", "global"],
    );
    rejects("version: '1'\nhide: delete-pod\n", "hide", &["sequence"]);
    rejects("version: '1'\ntools: [a, b]\n", "tools", &["map"]);
}

#[test]
fn approval_settings_need_action_approval() {
    rejects(&tool("{approval: {timeout: 5m}}"), "tools.start-pod.approval", &["only allowed with `action: approval`"]);
    rejects(
        &tool("{action: approval, approval: {timeout: soon}}"),
        "tools.start-pod.approval.timeout",
        &["not a duration", "10m"],
    );
    accepts(&tool("{action: approval, approval: {timeout: 90s}}"));
}

#[test]
fn grants() {
    let fp = toolgate_policy::fingerprint("Bearer a");
    let g = |body: &str| format!("version: '1'\ngrants:\n  - {body}\n");
    rejects(
        &g("{name: 'bad name', match: {header: {name: x-team, values: [a]}}}"),
        "grants[0].name",
        &["1-63 characters"],
    );
    rejects(
        &g("{name: a, match: {fingerprints: [abc]}}"),
        "grants[0].match.fingerprints[0]",
        &["sha256:<64 hex digits>", "toolgate fingerprint"],
    );
    rejects(&g("{name: a, match: {}}"), "grants[0].match", &["fingerprints", "header"]);
    rejects(
        &g("{name: a, match: {header: {name: Authorization, values: [x]}}}"),
        "grants[0].match.header.name",
        &["fingerprints"],
    );
    rejects(
        &g("{name: a, match: {header: {name: 'x team', values: [x]}}}"),
        "grants[0].match.header.name",
        &["header name"],
    );
    rejects(
        &g("{name: a, match: {header: {name: x-team, values: []}}}"),
        "grants[0].match.header.values",
        &["at least one"],
    );
    let twice = format!(
        "version: '1'\ngrants:\n  - {{name: a, match: {{fingerprints: ['{fp}']}}}}\n  - {{name: a, match: {{fingerprints: ['{fp}']}}}}\n"
    );
    rejects(&twice, "grants[1].name", &["already the name of grants[0]"]);
    // A grant's own rules are validated under its path.
    let nested = format!(
        "version: '1'\ngrants:\n  - {{name: a, match: {{fingerprints: ['{fp}']}}, tools: {{x: {{limits: [{{window: soon, max: 1}}]}}}}}}\n"
    );
    rejects(&nested, "grants[0].tools.x.limits[0].window", &["not a window"]);
    // Upper-case hex is accepted (and normalised).
    accepts(&g(&format!(
        "{{name: a, match: {{fingerprints: ['{}']}}}}",
        fp.to_uppercase().replacen("SHA256", "sha256", 1)
    )));
}

#[test]
fn size_bounds() {
    let big = format!("version: '1'\ndescription: '{}'\n", "x".repeat(MAX_DOCUMENT_BYTES));
    let err = parse_document(&big).unwrap_err();
    assert!(matches!(err, Error::TooLarge { limit: MAX_DOCUMENT_BYTES, .. }), "{err}");
    assert!(err.to_string().contains("the limit is 1048576 bytes"), "{err}");

    let conds = vec!["{path: args.a, op: exists}"; bounds::MAX_CONDITIONS + 1].join(", ");
    rejects(&tool(&format!("{{require: [{conds}]}}")), "tools.start-pod.require", &["at most 64 conditions"]);
    let limits = vec!["{window: minute, max: 1}"; bounds::MAX_LIMITS + 1].join(", ");
    rejects(&tool(&format!("{{limits: [{limits}]}}")), "tools.start-pod.limits", &["at most 16 limits"]);
    let list = vec!["1"; bounds::MAX_LIST + 1].join(", ");
    rejects(
        &tool(&format!("{{require: [{{path: args.a, op: in, value: [{list}]}}]}}")),
        "tools.start-pod.require[0].value",
        &["at most 1000"],
    );
    let globs: String = (0..=bounds::MAX_GLOB_KEYS).map(|i| format!("  t{i}-*: {{}}\n")).collect();
    rejects(&format!("version: '1'\ntools:\n{globs}"), "tools", &["at most 64 glob keys"]);
    let grants: String = (0..=bounds::MAX_GRANTS)
        .map(|i| format!("  - {{name: g{i}, match: {{header: {{name: x, values: [v]}}}}}}\n"))
        .collect();
    rejects(&format!("version: '1'\ngrants:\n{grants}"), "grants", &["at most 256 grants"]);
}

#[test]
fn syntax_errors_and_duplicate_keys() {
    for text in ["version: '1'\ntools: {a: {}, a: {}}\n", "{\"version\":\"1\",\"version\":\"1\"}"] {
        let err = parse_document(text).unwrap_err();
        assert_eq!(err.metric_label(), "syntax");
        assert!(err.to_string().contains("duplicate key"), "{err}");
    }
    for text in ["{", "version: [", "\u{0}", "- a\n- b\n", "42", ""] {
        assert!(parse_document(text).is_err(), "{text:?}");
    }
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = "version: '1'\ntools:\n  a: {limits: [{window: soon, max: 0}]}\n  b: {approval: {timeout: 1m}}\n";
    let found = problems(text);
    let paths: Vec<&str> = found.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["tools.a.limits[0].window", "tools.a.limits[0].max", "tools.b.approval"]);
    // Display: one `path: message` per line.
    let err = Policy::compile(vec![("p".into(), parse_document(text).unwrap())]).unwrap_err();
    assert!(err.to_string().lines().all(|l| l.starts_with("tools.")), "{err}");
}

#[test]
fn several_documents_prefix_problems_with_the_document_name() {
    let good = parse_document("version: '1'\n").unwrap();
    let bad = parse_document(&tool("{limits: [{window: soon, max: 1}]}")).unwrap();
    let err = Policy::compile(vec![("ok".into(), good), ("team-b".into(), bad)]).unwrap_err();
    assert_eq!(err.problems()[0].path, "team-b: tools.start-pod.limits[0].window");
}

#[test]
fn intercept_errors_name_their_path() {
    let it = |rule: &str| format!("version: '1'\ntools:\n  create:\n    rules:\n      - {rule}\n");
    rejects(&it("{name: r, rate_limit: 5/fortnight}"), "tools.create.rules[0].rate_limit", &["N/minute"]);
    rejects(&it("{name: r, rate_limit: 0/minute}"), "tools.create.rules[0].rate_limit", &["not a rate limit"]);
    rejects(&it("{name: r}"), "tools.create.rules[0]", &["at least one condition"]);
    rejects(
        &it("{name: r, action: deny, conditions: [{path: args.a, op: exists}]}"),
        "tools.create.rules[0]",
        &["deny rules must not have conditions"],
    );
    rejects(
        &it("{name: r, conditions: [{path: state.create.n, op: lte, value: 3}]}"),
        "tools.create.rules[0].conditions[0].path",
        &["needs a `state` block"],
    );
    rejects(
        &it("{name: r, conditions: [{path: state.create.n, op: gt, value: 3}], state: {counter: n, window: day}}"),
        "tools.create.rules[0].conditions[0]",
        &["`lte N` or `lt N`"],
    );
    rejects(
        &it("{name: r, frobnicate: 1, rate_limit: 1/minute}"),
        "tools.create.rules[0].frobnicate",
        &["unknown field"],
    );
    rejects(
        "version: '1'\ntools:\n  '*':\n    rules:\n      - {name: r, action: deny}\n",
        "tools.*",
        &["default: deny"],
    );
}
