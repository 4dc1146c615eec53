//! Differential tests: random documents and calls, decided by the compiled evaluator and
//! by the small reference evaluator below, which follows docs/policy.md step by step with
//! no compilation, indexing or early exits. The decision kind (allow, deny, hidden,
//! approval) and the tools/list visibility must agree.
//!
//! The generated documents use exact and glob tool keys (including case variants), every
//! action, `require`/`deny_if` conditions with every operator over a small argument space,
//! `arguments` schemas, `hide` lists, `default` allow/deny, `all_tools`, optional grants
//! (by fingerprint and by header) and 1–3 documents. Limits are left out: they are
//! property-tested on their own (tests/limiter.rs) and in tests/semantics.rs.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Map, Value, json};
use toolgate_policy::{Call, Caller, DecisionKind, Limiter, Policy};

// ---------------------------------------------------------------- the model

#[derive(Clone, Debug)]
struct MCond {
    path: &'static str,
    op: &'static str,
    value: Option<Value>,
}

#[derive(Clone, Debug)]
struct MRule {
    action: Option<&'static str>,
    require: Vec<MCond>,
    deny_if: Vec<MCond>,
    /// `arguments: {"type": "object", "required": ["a"]}`.
    requires_a: bool,
}

#[derive(Clone, Debug)]
struct MRuleSet {
    default_allow: Option<bool>,
    hide: Vec<&'static str>,
    all_tools: Option<(Vec<MCond>, Vec<MCond>)>,
    tools: BTreeMap<&'static str, MRule>,
}

#[derive(Clone, Debug)]
struct MGrant {
    fingerprints: Vec<usize>,
    header: Option<Vec<&'static str>>,
    rules: MRuleSet,
}

#[derive(Clone, Debug)]
struct MDoc {
    top: MRuleSet,
    grants: Vec<MGrant>,
}

#[derive(Clone, Debug)]
struct MCall {
    tool: &'static str,
    args: Value,
    identity: usize,
    team: Option<&'static str>,
}

const TOOLS: &[&str] = &["read-a", "read-b", "delete-a", "Delete-a", "start-pod", "x"];
const GLOBS: &[&str] = &["read-*", "delete-*", "*", "*-a", "?ead-?", "*-*", "start-*", "*pod", "Delete-?"];
const CREDENTIALS: &[&str] = &["", "Bearer one", "Bearer two"];

fn identity(i: usize) -> String {
    if CREDENTIALS[i].is_empty() { String::new() } else { toolgate_policy::fingerprint(CREDENTIALS[i]) }
}

// ---------------------------------------------------------------- to JSON

fn cond_json(c: &MCond) -> Value {
    let mut o = json!({"path": format!("args.{}", c.path), "op": c.op});
    if let Some(v) = &c.value {
        o["value"] = v.clone();
    }
    o
}

fn rule_json(r: &MRule) -> Value {
    let mut o = Map::new();
    if let Some(a) = r.action {
        o.insert("action".into(), json!(a));
    }
    if !r.require.is_empty() {
        o.insert("require".into(), r.require.iter().map(cond_json).collect());
    }
    if !r.deny_if.is_empty() {
        o.insert("deny_if".into(), r.deny_if.iter().map(cond_json).collect());
    }
    if r.requires_a {
        o.insert("arguments".into(), json!({"type": "object", "required": ["a"]}));
    }
    Value::Object(o)
}

fn rule_set_json(s: &MRuleSet, o: &mut Map<String, Value>) {
    if let Some(d) = s.default_allow {
        o.insert("default".into(), json!(if d { "allow" } else { "deny" }));
    }
    if !s.hide.is_empty() {
        o.insert("hide".into(), json!(s.hide));
    }
    if let Some((require, deny_if)) = &s.all_tools {
        o.insert(
            "all_tools".into(),
            json!({"require": require.iter().map(cond_json).collect::<Vec<_>>(),
                   "deny_if": deny_if.iter().map(cond_json).collect::<Vec<_>>()}),
        );
    }
    if !s.tools.is_empty() {
        o.insert("tools".into(), s.tools.iter().map(|(k, r)| ((*k).to_owned(), rule_json(r))).collect());
    }
}

fn doc_json(d: &MDoc) -> Value {
    let mut o = Map::new();
    o.insert("version".into(), json!("1"));
    rule_set_json(&d.top, &mut o);
    if !d.grants.is_empty() {
        let grants: Vec<Value> = d
            .grants
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let mut m = json!({});
                if !g.fingerprints.is_empty() {
                    m["fingerprints"] = g.fingerprints.iter().map(|&f| json!(identity(f))).collect();
                }
                if let Some(values) = &g.header {
                    m["header"] = json!({"name": "X-Team", "values": values});
                }
                let mut o = Map::new();
                o.insert("name".into(), json!(format!("g{i}")));
                o.insert("match".into(), m);
                rule_set_json(&g.rules, &mut o);
                Value::Object(o)
            })
            .collect();
        o.insert("grants".into(), Value::Array(grants));
    }
    Value::Object(o)
}

// ---------------------------------------------------------------- the reference

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Allow,
    Deny,
    Hidden,
    Approval,
}

fn glob_match(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob_match(&p[1..], s) || (!s.is_empty() && glob_match(p, &s[1..])),
        (Some(b'?'), Some(_)) => glob_match(&p[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => glob_match(&p[1..], &s[1..]),
        _ => false,
    }
}

fn is_glob(k: &str) -> bool {
    k.contains(['*', '?'])
}

fn matches(pattern: &str, tool: &str) -> bool {
    if is_glob(pattern) { glob_match(pattern.as_bytes(), tool.as_bytes()) } else { pattern == tool }
}

/// Exact key first; otherwise the matching glob with the most literal characters, ties
/// broken by the pattern text.
fn find_rule<'a>(set: &'a MRuleSet, tool: &str) -> Option<&'a MRule> {
    if let Some(r) = set.tools.get(tool) {
        return Some(r);
    }
    let literal = |k: &str| k.chars().filter(|c| !matches!(c, '*' | '?')).count();
    set.tools
        .iter()
        .filter(|(k, _)| is_glob(k) && glob_match(k.as_bytes(), tool.as_bytes()))
        .max_by(|(a, _), (b, _)| literal(a).cmp(&literal(b)).then_with(|| b.cmp(a)))
        .map(|(_, r)| r)
}

fn lookup<'v>(args: &'v Value, path: &str) -> Option<&'v Value> {
    let mut v = args;
    for seg in path.split('.') {
        v = match v {
            Value::Object(m) => m.get(seg)?,
            Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

/// Numbers, and strings that hold a number, compare as numbers.
fn num(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        _ => None,
    }
}

fn equal(a: &Value, b: &Value) -> bool {
    if a.is_number() || b.is_number() { matches!((num(a), num(b)), (Some(x), Some(y)) if x == y) } else { a == b }
}

fn holds(c: &MCond, args: &Value) -> bool {
    let target = lookup(args, c.path);
    if c.op == "exists" {
        let want = c.value.as_ref().is_none_or(|v| v == &json!(true));
        return target.is_some() == want;
    }
    let Some(t) = target else { return false };
    let v = c.value.as_ref().expect("operand");
    let list = || v.as_array().expect("list");
    let cmp = |f: fn(f64, f64) -> bool| num(t).is_some_and(|x| f(x, v.as_f64().expect("number")));
    match c.op {
        "eq" => equal(t, v),
        "neq" => !equal(t, v),
        "in" => list().iter().any(|x| equal(t, x)),
        "not_in" => !list().iter().any(|x| equal(t, x)),
        "lt" => cmp(|x, n| x < n),
        "lte" => cmp(|x, n| x <= n),
        "gt" => cmp(|x, n| x > n),
        "gte" => cmp(|x, n| x >= n),
        "regex" => t.as_str().is_some_and(|s| regex_lite(v.as_str().expect("pattern"), s)),
        "contains" => match t {
            Value::String(s) => v.as_str().is_some_and(|needle| s.contains(needle)),
            Value::Array(items) => items.iter().any(|x| equal(x, v)),
            _ => false,
        },
        other => unreachable!("{other}"),
    }
}

/// The few patterns the generator uses, by hand.
fn regex_lite(pattern: &str, s: &str) -> bool {
    match pattern {
        "^x" => s.starts_with('x'),
        "x" => s.contains('x'),
        "^[0-9]+$" => !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()),
        "y$" => s.ends_with('y'),
        "^X" => s.starts_with('X'),
        other => unreachable!("{other}"),
    }
}

fn checks_pass(require: &[MCond], deny_if: &[MCond], args: &Value) -> bool {
    require.iter().all(|c| holds(c, args)) && !deny_if.iter().any(|c| holds(c, args))
}

fn rule_passes(r: &MRule, args: &Value) -> bool {
    (!r.requires_a || args.get("a").is_some()) && checks_pass(&r.require, &r.deny_if, args)
}

fn all_tools_pass(set: &MRuleSet, args: &Value) -> bool {
    set.all_tools.as_ref().is_none_or(|(req, deny)| checks_pass(req, deny, args))
}

/// The rules that apply to the caller: the first matching grant, else the top-level
/// rules if the document has top-level `tools`/`all_tools` or no grants at all.
fn select_rules<'a>(doc: &'a MDoc, call: &MCall) -> Option<&'a MRuleSet> {
    for g in &doc.grants {
        let by_fp = call.identity != 0 && g.fingerprints.contains(&call.identity);
        let by_header = matches!((&g.header, call.team), (Some(values), Some(t)) if values.contains(&t));
        if by_fp || by_header {
            return Some(&g.rules);
        }
    }
    let has_top = !doc.top.tools.is_empty() || doc.top.all_tools.is_some() || doc.grants.is_empty();
    has_top.then_some(&doc.top)
}

fn hidden(set: &MRuleSet, tool: &str) -> bool {
    set.hide.iter().any(|h| matches(h, tool))
}

fn reference_doc(doc: &MDoc, call: &MCall, args: &Value) -> Kind {
    let Some(set) = select_rules(doc, call) else { return Kind::Deny };
    if hidden(set, call.tool) {
        return Kind::Hidden;
    }
    match find_rule(set, call.tool) {
        None if set.default_allow == Some(true) && all_tools_pass(set, args) => Kind::Allow,
        None => Kind::Deny,
        Some(r) if r.action == Some("deny") => Kind::Deny,
        Some(r) if !rule_passes(r, args) || !all_tools_pass(set, args) => Kind::Deny,
        Some(r) if r.action == Some("approval") => Kind::Approval,
        Some(_) => Kind::Allow,
    }
}

/// Several documents: refused if any refuses (hidden if any hides it), else approval if
/// any requires it, else allowed.
fn reference(docs: &[MDoc], call: &MCall) -> Kind {
    let args = match &call.args {
        Value::Null => &json!({}),
        a @ Value::Object(_) => a,
        _ => return Kind::Deny,
    };
    let kinds: Vec<Kind> = docs.iter().map(|d| reference_doc(d, call, args)).collect();
    if kinds.contains(&Kind::Hidden) {
        Kind::Hidden
    } else if kinds.contains(&Kind::Deny) {
        Kind::Deny
    } else if kinds.contains(&Kind::Approval) {
        Kind::Approval
    } else {
        Kind::Allow
    }
}

fn reference_lists(docs: &[MDoc], call: &MCall) -> bool {
    docs.iter().all(|doc| {
        select_rules(doc, call).is_some_and(|set| {
            !hidden(set, call.tool)
                && match find_rule(set, call.tool) {
                    None => set.default_allow == Some(true),
                    Some(r) => r.action != Some("deny"),
                }
        })
    })
}

// ---------------------------------------------------------------- generators

fn operand() -> impl Strategy<Value = Value> {
    select(vec![
        json!(0),
        json!(1),
        json!(2),
        json!(2.5),
        json!(-1),
        json!("1"),
        json!("x"),
        json!("X"),
        json!("xy"),
        json!(true),
        json!(false),
        json!([1, "x"]),
        json!({"c": 1}),
    ])
}

fn arg_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => operand(),
        1 => Just(Value::Null),
        1 => select(vec![json!(" 2 "), json!("2.0"), json!("12"), json!(""), json!(["xy", 2])]),
    ]
}

fn cond() -> impl Strategy<Value = MCond> {
    let path = select(vec!["a", "b", "n.c", "l.0", "l.1"]);
    let number = select(vec![json!(0), json!(1), json!(1.5), json!(2), json!(-1)]);
    let op = prop_oneof![
        operand().prop_map(|v| ("eq", Some(v))),
        operand().prop_map(|v| ("neq", Some(v))),
        prop::collection::vec(arg_value(), 0..3).prop_map(|v| ("in", Some(Value::Array(v)))),
        prop::collection::vec(arg_value(), 0..3).prop_map(|v| ("not_in", Some(Value::Array(v)))),
        (select(vec!["lt", "lte", "gt", "gte"]), number).prop_map(|(op, n)| (op, Some(n))),
        select(vec!["^x", "x", "^[0-9]+$", "y$", "^X"]).prop_map(|p| ("regex", Some(json!(p)))),
        operand().prop_map(|v| ("contains", Some(v))),
        select(vec![None, Some(json!(true)), Some(json!(false))]).prop_map(|v| ("exists", v)),
    ];
    (path, op).prop_map(|(path, (op, value))| MCond { path, op, value })
}

fn conds() -> impl Strategy<Value = Vec<MCond>> {
    prop_oneof![2 => Just(vec![]), 3 => prop::collection::vec(cond(), 1..3)]
}

fn rule() -> impl Strategy<Value = MRule> {
    let action = prop_oneof![
        3 => Just(None),
        2 => Just(Some("allow")),
        2 => Just(Some("deny")),
        2 => Just(Some("approval")),
    ];
    (action, conds(), conds(), prop::bool::weighted(0.15)).prop_map(|(action, require, deny_if, requires_a)| MRule {
        action,
        require,
        deny_if,
        requires_a,
    })
}

fn key() -> impl Strategy<Value = &'static str> {
    prop_oneof![select(TOOLS.to_vec()), select(GLOBS.to_vec())]
}

fn rule_set() -> impl Strategy<Value = MRuleSet> {
    (
        prop::option::of(prop::bool::weighted(0.6)),
        // Mostly nothing hidden, so that most calls reach the rules.
        prop_oneof![
            4 => Just(vec![]),
            1 => prop::collection::vec(prop_oneof![6 => key(), 1 => Just("*")], 1..3),
        ],
        prop::option::weighted(0.3, (conds(), conds())),
        prop::collection::btree_map(key(), rule(), 0..6),
    )
        .prop_map(|(default_allow, hide, all_tools, tools)| MRuleSet { default_allow, hide, all_tools, tools })
}

fn grant() -> impl Strategy<Value = MGrant> {
    (
        prop::collection::vec(1..CREDENTIALS.len(), 0..2),
        prop::option::of(prop::collection::vec(select(vec!["ops", "dev"]), 1..3)),
        rule_set(),
    )
        .prop_filter("a grant must match something", |(f, h, _)| !f.is_empty() || h.is_some())
        .prop_map(|(fingerprints, header, rules)| MGrant { fingerprints, header, rules })
}

fn doc() -> impl Strategy<Value = MDoc> {
    (rule_set(), prop::collection::vec(grant(), 0..=2)).prop_map(|(top, grants)| MDoc { top, grants })
}

fn args() -> impl Strategy<Value = Value> {
    let object = (
        prop::option::of(arg_value()),
        prop::option::of(arg_value()),
        prop::option::of(prop_oneof![arg_value().prop_map(|c| json!({ "c": c })), arg_value()]),
        prop::option::of(prop_oneof![(arg_value(), arg_value()).prop_map(|(x, y)| json!([x, y])), arg_value()]),
    )
        .prop_map(|(a, b, n, l)| {
            let mut m = Map::new();
            for (k, v) in [("a", a), ("b", b), ("n", n), ("l", l)] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            Value::Object(m)
        });
    prop_oneof![
        12 => object,
        1 => Just(Value::Null),
        1 => select(vec![json!("a string"), json!([1]), json!(3)]),
    ]
}

fn call() -> impl Strategy<Value = MCall> {
    (
        prop_oneof![6 => select(TOOLS.to_vec()), 1 => select(vec!["DELETE-A", "read-", "unknown"])],
        args(),
        0..CREDENTIALS.len(),
        prop::option::of(select(vec!["ops", "dev", "qa"])),
    )
        .prop_map(|(tool, args, identity, team)| MCall { tool, args, identity, team })
}

// ---------------------------------------------------------------- the property

fn kind_of(k: DecisionKind) -> Kind {
    match k {
        DecisionKind::Allow => Kind::Allow,
        DecisionKind::Deny => Kind::Deny,
        DecisionKind::Hidden => Kind::Hidden,
        DecisionKind::Approval => Kind::Approval,
        DecisionKind::RateLimited | DecisionKind::StoreUnavailable => panic!("no limits are generated"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, max_shrink_iters: 2_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn compiled_evaluator_agrees_with_reference(
        docs in prop_oneof![2 => prop::collection::vec(doc(), 1..=1), 1 => prop::collection::vec(doc(), 2..=3)],
        calls in prop::collection::vec(call(), 1..24),
    ) {
        let named: Vec<(String, toolgate_policy::Document)> = docs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let (doc, _) = toolgate_policy::document_from_value(doc_json(d)).expect("generated documents parse");
                (format!("d{i}"), doc)
            })
            .collect();
        let policy = Policy::compile(named).map_err(|e| TestCaseError::fail(format!("compile: {e}")))?;
        let limiter = Limiter::default();
        for c in &calls {
            let caller = Caller {
                identity: identity(c.identity),
                session: None,
                headers: c.team.map(|t| vec![("x-team".to_owned(), t.to_owned())]).unwrap_or_default(),
                principal: None,
            };
            let call = Call { tool: c.tool, arguments: &c.args, caller: &caller };
            let decision = policy.decide(&limiter, &call, Duration::ZERO);
            let got = kind_of(decision.kind);
            let want = reference(&docs, c);
            prop_assert_eq!(got, want, "call {:?}\ndecision {:?}\ndocs {}", c, decision,
                serde_json::to_string(&docs.iter().map(doc_json).collect::<Vec<_>>()).unwrap());
            if let Some(r) = decision.reservation {
                r.commit();
            }

            let listed = policy.lists_tool(c.tool, &caller);
            prop_assert_eq!(listed, reference_lists(&docs, c), "tools/list of {:?} for {:?}", c.tool, c);
            // What tools/list leaves out is never callable.
            prop_assert!(listed || !matches!(got, Kind::Allow | Kind::Approval), "unlisted but {got:?}: {c:?}");
        }
    }
}

/// The reference's own helpers, checked on cases the generator relies on.
#[test]
fn reference_helpers() {
    assert!(glob_match(b"read-*", b"read-a"));
    assert!(glob_match(b"*", b""));
    assert!(glob_match(b"?ead-?", b"read-b"));
    assert!(!glob_match(b"delete-*", b"Delete-a"), "case-sensitive");
    assert!(equal(&json!("2.0"), &json!(2)));
    assert!(!equal(&json!("x"), &json!(["x"])));
    assert_eq!(lookup(&json!({"l": [1, 2]}), "l.1"), Some(&json!(2)));
    let set = MRuleSet {
        default_allow: None,
        hide: vec![],
        all_tools: None,
        tools: [("*-a", MRule { action: Some("deny"), require: vec![], deny_if: vec![], requires_a: false })]
            .into_iter()
            .chain([("read-*", MRule { action: None, require: vec![], deny_if: vec![], requires_a: false })])
            .collect(),
    };
    assert_eq!(find_rule(&set, "read-a").map(|r| r.action), Some(None), "more literal characters win");
}
