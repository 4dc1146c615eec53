//! Validation and compilation of documents into the form evaluation uses: regexes,
//! globs and JSON Schemas compiled once, windows parsed, paths split, every problem
//! reported with the path of the field.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use globset::{Glob, GlobMatcher};
use regex::Regex;
use serde_json::Value;

use crate::document::{
    Action, AllTools, Condition, DefaultAction, DenialStyle, Document, Grant, GrantMatch, Limit, Op, Scope, ToolRule,
    Window,
};
use crate::error::Problem;
use crate::parse::kind_of;

/// Bounds that keep evaluation fast whatever a policy says.
pub mod bounds {
    /// Tool keys per rule set.
    pub const MAX_TOOL_KEYS: usize = 2_000;
    /// Glob tool keys (each is tried in turn) per rule set.
    pub const MAX_GLOB_KEYS: usize = 64;
    /// Hide patterns per rule set.
    pub const MAX_HIDE: usize = 2_000;
    /// Conditions per `require` or `deny_if` list.
    pub const MAX_CONDITIONS: usize = 64;
    /// Limits per rule.
    pub const MAX_LIMITS: usize = 16;
    /// Grants per document.
    pub const MAX_GRANTS: usize = 256;
    /// Segments of a condition path.
    pub const MAX_PATH_DEPTH: usize = 16;
    /// Length of a regex pattern, in bytes.
    pub const MAX_REGEX_LEN: usize = 1_024;
    /// Compiled size of a regex, in bytes.
    pub const MAX_REGEX_COMPILED: usize = 256 * 1024;
    /// Elements of an `in` / `not_in` list.
    pub const MAX_LIST: usize = 1_000;
    /// Longest window or approval timeout.
    pub const MAX_WINDOW_SECS: u64 = 31 * 24 * 3600;
}

pub(crate) const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(600);

/// A compiled document.
#[derive(Debug)]
pub(crate) struct CompiledDoc {
    pub name: Arc<str>,
    /// The policy identity in counter keys: the name, or `<namespace>/<name>` for an
    /// McpPolicy ([`crate::Policy::with_counter_namespace`]).
    pub counter_id: Arc<str>,
    /// `counters` of the document (store and failure behaviour), carried by its demands.
    pub counters: crate::CounterSettings,
    pub denial: DenialStyle,
    /// Top-level rules; `None` when the document has grants and no top-level tools, in
    /// which case callers no grant matches are denied.
    pub top: Option<RuleSet>,
    pub grants: Vec<CompiledGrant>,
    pub source: Document,
}

#[derive(Debug)]
pub(crate) struct CompiledGrant {
    pub name: Arc<str>,
    pub fingerprints: Vec<String>,
    pub header: Option<(String, Vec<String>)>,
    pub principals: PrincipalMatch,
    pub rules: RuleSet,
}

/// A grant's criteria on authenticated callers.
#[derive(Debug, Default)]
pub(crate) struct PrincipalMatch {
    pub subjects: Vec<GlobMatcher>,
    pub claims: Vec<(String, Vec<String>)>,
    pub service_accounts: Vec<GlobMatcher>,
    pub api_keys: Vec<String>,
}

impl PrincipalMatch {
    fn is_empty(&self) -> bool {
        self.subjects.is_empty()
            && self.claims.is_empty()
            && self.service_accounts.is_empty()
            && self.api_keys.is_empty()
    }

    /// Any criterion fits (as every criterion of a grant's `match`); `claims` fits when all
    /// of its claims hold.
    pub fn matches(&self, p: &crate::eval::Principal) -> bool {
        use crate::eval::Principal;
        if !self.subjects.is_empty() {
            let subject = p.subject();
            if self.subjects.iter().any(|g| g.is_match(&subject)) {
                return true;
            }
        }
        if let Principal::ServiceAccount { namespace, name, .. } = p {
            let sa = format!("{namespace}/{name}");
            if self.service_accounts.iter().any(|g| g.is_match(&sa)) {
                return true;
            }
        }
        if let Principal::ApiKey { name } = p
            && self.api_keys.iter().any(|k| k == name)
        {
            return true;
        }
        if !self.claims.is_empty()
            && let Some(claims) = p.claims_map()
        {
            return self.claims.iter().all(|(claim, accepted)| claim_holds(claims.get(claim), accepted));
        }
        false
    }
}

/// A claim holds when it is a string, number or boolean whose text is accepted, or a list
/// with such an item. Objects and absent claims never hold.
fn claim_holds(value: Option<&serde_json::Value>, accepted: &[String]) -> bool {
    use serde_json::Value;
    fn scalar(v: &Value, accepted: &[String]) -> bool {
        match v {
            Value::String(s) => accepted.iter().any(|a| a == s),
            Value::Number(n) => accepted.iter().any(|a| *a == n.to_string()),
            Value::Bool(b) => accepted.iter().any(|a| *a == b.to_string()),
            _ => false,
        }
    }
    match value {
        Some(Value::Array(items)) => items.iter().any(|v| scalar(v, accepted)),
        Some(v) => scalar(v, accepted),
        None => false,
    }
}

#[derive(Debug)]
pub(crate) struct RuleSet {
    pub default_allow: bool,
    pub default_path: Arc<str>,
    pub hide_all: bool,
    pub hide_exact: Vec<String>,
    pub hide_globs: Vec<GlobMatcher>,
    pub hide_path: Arc<str>,
    pub exact: HashMap<String, usize>,
    /// Glob keys, most specific first.
    pub globs: Vec<(GlobMatcher, usize)>,
    pub rules: Vec<CompiledRule>,
    pub all_tools: Option<CompiledRule>,
}

#[derive(Debug)]
pub(crate) struct CompiledRule {
    pub path: Arc<str>,
    pub action: Action,
    pub reason: Option<Arc<str>>,
    pub require: Vec<CompiledCondition>,
    pub deny_if: Vec<CompiledCondition>,
    pub schema: Option<jsonschema::Validator>,
    pub limits: Vec<CompiledLimit>,
    pub approval_timeout: Duration,
    pub approval_show_arguments: bool,
    pub approval_reuse: Option<Duration>,
}

#[derive(Debug)]
pub(crate) struct CompiledCondition {
    pub path: Arc<str>,
    pub segments: Vec<String>,
    pub op: CompiledOp,
    pub reason: Option<Arc<str>>,
}

#[derive(Debug)]
pub(crate) enum CompiledOp {
    Eq(Value),
    Neq(Value),
    In(Vec<Value>),
    NotIn(Vec<Value>),
    Lt(f64),
    Lte(f64),
    Gt(f64),
    Gte(f64),
    Regex(Regex),
    Contains(Value),
    Exists(bool),
}

#[derive(Debug)]
pub(crate) struct CompiledLimit {
    pub path: Arc<str>,
    pub counter: Arc<str>,
    pub window: Duration,
    pub max: u64,
    pub scope: Scope,
    pub increment: Increment,
    pub reason: Option<Arc<str>>,
}

#[derive(Debug)]
pub(crate) enum Increment {
    Fixed(u64),
    From(Vec<String>),
}

struct Ctx<'a> {
    problems: &'a mut Vec<Problem>,
    /// counter name → (window, scope, path of first use): shared counters must agree.
    counters: HashMap<String, (Duration, Scope, String)>,
}

impl Ctx<'_> {
    fn err(&mut self, path: impl Into<String>, msg: impl Into<String>) {
        self.problems.push(Problem::new(path, msg));
    }
}

pub(crate) fn compile_document(name: &str, doc: &Document, problems: &mut Vec<Problem>) -> Option<CompiledDoc> {
    let before = problems.len();
    let mut cx = Ctx { problems, counters: HashMap::new() };
    if doc.version != "1" {
        cx.err("version", format!("must be \"1\", got {:?}", doc.version));
    }
    let has_top_rules = !doc.tools.is_empty() || doc.all_tools.is_some() || doc.grants.is_empty();
    let top = has_top_rules
        .then(|| compile_rule_set(&mut cx, "", doc.default, &doc.hide, doc.all_tools.as_ref(), &doc.tools));
    if doc.grants.len() > bounds::MAX_GRANTS {
        cx.err("grants", format!("at most {} grants are allowed", bounds::MAX_GRANTS));
    }
    let mut seen = HashMap::new();
    let grants = doc
        .grants
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let gpath = format!("grants[{i}]");
            if let Some(prev) = seen.insert(g.name.clone(), i) {
                cx.err(format!("{gpath}.name"), format!("{:?} is already the name of grants[{prev}]", g.name));
            }
            compile_grant(&mut cx, &gpath, g)
        })
        .collect();
    let counters = doc.counters.unwrap_or_default();
    if counters.store == Some(crate::StoreKind::Local) && counters.on_store_failure.is_some() {
        cx.err(
            "counters.on_store_failure",
            "applies only to the shared store; this document counts locally (`store: local`)",
        );
    }
    if cx.problems.len() > before {
        return None;
    }
    let name: Arc<str> = name.into();
    Some(CompiledDoc {
        counter_id: name.clone(),
        name,
        counters,
        denial: doc.denial.unwrap_or_default(),
        top,
        grants,
        source: doc.clone(),
    })
}

fn compile_grant(cx: &mut Ctx<'_>, gpath: &str, g: &Grant) -> CompiledGrant {
    if g.name.is_empty() || g.name.len() > 63 || !g.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        cx.err(format!("{gpath}.name"), "must be 1-63 characters of letters, digits, '-', '_' or '.'");
    }
    let mut fingerprints = Vec::new();
    for (j, f) in g.matches.fingerprints.iter().enumerate() {
        let hex = f.strip_prefix("sha256:").unwrap_or("");
        if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
            fingerprints.push(format!("sha256:{}", hex.to_ascii_lowercase()));
        } else {
            cx.err(
                format!("{gpath}.match.fingerprints[{j}]"),
                "must be sha256:<64 hex digits> (see `toolgate fingerprint`)",
            );
        }
    }
    let header = g.matches.header.as_ref().map(|h| {
        if h.name.is_empty() || !h.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            cx.err(format!("{gpath}.match.header.name"), "must be a header name");
        }
        if h.name.eq_ignore_ascii_case("authorization") {
            cx.err(
                format!("{gpath}.match.header.name"),
                "match the Authorization header by `fingerprints`, never by value",
            );
        }
        if h.values.is_empty() {
            cx.err(format!("{gpath}.match.header.values"), "must list at least one value");
        }
        (h.name.to_ascii_lowercase(), h.values.clone())
    });
    let principals = compile_principal_match(cx, gpath, &g.matches);
    if fingerprints.is_empty() && header.is_none() && g.matches.fingerprints.is_empty() && principals.is_empty() {
        cx.err(
            format!("{gpath}.match"),
            "must name `fingerprints`, a `header`, `subjects`, `claims`, `serviceAccounts` or `apiKeys`; an empty match fits nobody",
        );
    }
    let rules = compile_rule_set(cx, &format!("{gpath}."), g.default, &g.hide, g.all_tools.as_ref(), &g.tools);
    CompiledGrant { name: g.name.as_str().into(), fingerprints, header, principals, rules }
}

fn compile_principal_match(cx: &mut Ctx<'_>, gpath: &str, m: &GrantMatch) -> PrincipalMatch {
    let mut out = PrincipalMatch::default();
    for (j, s) in m.subjects.iter().enumerate() {
        let path = format!("{gpath}.match.subjects[{j}]");
        if s.is_empty() {
            cx.err(path, "must not be empty");
        } else if let Some(g) = compile_glob(cx, &path, s) {
            out.subjects.push(g);
        }
    }
    for (claim, values) in &m.claims {
        let path = format!("{gpath}.match.claims.{claim}");
        if claim.is_empty() {
            cx.err(format!("{gpath}.match.claims"), "a claim name must not be empty");
        }
        if values.is_empty() {
            cx.err(path, "must list at least one accepted value");
        } else {
            out.claims.push((claim.clone(), values.clone()));
        }
    }
    for (j, sa) in m.service_accounts.iter().enumerate() {
        let path = format!("{gpath}.match.serviceAccounts[{j}]");
        match sa.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                if let Some(g) = compile_glob(cx, &path, sa) {
                    out.service_accounts.push(g);
                }
            }
            _ => cx.err(path, format!("{sa:?} must be namespace/name (globs allowed: agents/*)")),
        }
    }
    for (j, k) in m.api_keys.iter().enumerate() {
        if k.is_empty() || k.len() > 63 || !k.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            cx.err(
                format!("{gpath}.match.apiKeys[{j}]"),
                "must be a key name: 1-63 characters of letters, digits, '-', '_' or '.'",
            );
        } else {
            out.api_keys.push(k.clone());
        }
    }
    out
}

fn is_glob(key: &str) -> bool {
    key.contains(['*', '?', '[', '{'])
}

fn compile_glob(cx: &mut Ctx<'_>, path: &str, pattern: &str) -> Option<GlobMatcher> {
    match Glob::new(pattern) {
        Ok(g) => Some(g.compile_matcher()),
        Err(e) => {
            cx.err(path, format!("{pattern:?} is not a valid glob: {}", e.kind()));
            None
        }
    }
}

fn compile_rule_set(
    cx: &mut Ctx<'_>,
    prefix: &str,
    default: Option<DefaultAction>,
    hide: &[String],
    all_tools: Option<&AllTools>,
    tools: &BTreeMap<String, ToolRule>,
) -> RuleSet {
    if hide.len() > bounds::MAX_HIDE {
        cx.err(format!("{prefix}hide"), format!("at most {} entries are allowed", bounds::MAX_HIDE));
    }
    let mut set = RuleSet {
        default_allow: default == Some(DefaultAction::Allow),
        default_path: format!("{prefix}default").into(),
        hide_all: false,
        hide_exact: Vec::new(),
        hide_globs: Vec::new(),
        hide_path: format!("{prefix}hide").into(),
        exact: HashMap::new(),
        globs: Vec::new(),
        rules: Vec::new(),
        all_tools: None,
    };
    for (i, h) in hide.iter().enumerate() {
        let path = format!("{prefix}hide[{i}]");
        if h.is_empty() {
            cx.err(path, "must not be empty");
        } else if h == "*" {
            set.hide_all = true;
        } else if is_glob(h) {
            if let Some(m) = compile_glob(cx, &path, h) {
                set.hide_globs.push(m);
            }
        } else {
            set.hide_exact.push(h.clone());
        }
    }
    if tools.len() > bounds::MAX_TOOL_KEYS {
        cx.err(format!("{prefix}tools"), format!("at most {} tool keys are allowed", bounds::MAX_TOOL_KEYS));
    }
    let mut globs = Vec::new();
    for (key, rule) in tools {
        let path = format!("{prefix}tools.{key}");
        if key.is_empty() {
            cx.err(&path, "tool keys must not be empty");
            continue;
        }
        let idx = set.rules.len();
        set.rules.push(compile_rule(cx, &path, rule));
        if is_glob(key) {
            if let Some(m) = compile_glob(cx, &path, key) {
                let literal = key.chars().filter(|c| !"*?[]{},".contains(*c)).count();
                globs.push((literal, key.clone(), m, idx));
            }
        } else {
            set.exact.insert(key.clone(), idx);
        }
    }
    if globs.len() > bounds::MAX_GLOB_KEYS {
        cx.err(format!("{prefix}tools"), format!("at most {} glob keys are allowed", bounds::MAX_GLOB_KEYS));
    }
    // Most literal characters first; ties broken by the pattern text so the order is
    // the same on every load.
    globs.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    set.globs = globs.into_iter().map(|(_, _, m, i)| (m, i)).collect();
    set.all_tools = all_tools.map(|a| {
        let rule = ToolRule {
            require: a.require.clone(),
            deny_if: a.deny_if.clone(),
            limits: a.limits.clone(),
            ..ToolRule::default()
        };
        compile_rule(cx, &format!("{prefix}all_tools"), &rule)
    });
    set
}

fn compile_rule(cx: &mut Ctx<'_>, path: &str, rule: &ToolRule) -> CompiledRule {
    let action = rule.action.unwrap_or_default();
    if rule.approval.is_some() && action != Action::Approval {
        cx.err(format!("{path}.approval"), "only allowed with `action: approval`");
    }
    let approval_timeout = match rule.approval.as_ref().and_then(|a| a.timeout.as_deref()) {
        None => DEFAULT_APPROVAL_TIMEOUT,
        Some(t) => parse_duration(t).unwrap_or_else(|| {
            cx.err(
                format!("{path}.approval.timeout"),
                format!("{t:?} is not a duration; write e.g. 90s, 10m, 1h (at most 31d)"),
            );
            DEFAULT_APPROVAL_TIMEOUT
        }),
    };
    let approval_reuse = rule.approval.as_ref().and_then(|a| a.reuse_for.as_deref()).and_then(|t| {
        parse_duration(t).or_else(|| {
            cx.err(
                format!("{path}.approval.reuse_for"),
                format!("{t:?} is not a duration; write e.g. 90s, 10m, 1h (at most 31d)"),
            );
            None
        })
    });
    let approval_show_arguments = rule.approval.as_ref().and_then(|a| a.show_arguments).unwrap_or(false);
    let schema = rule.arguments.as_ref().and_then(|s| {
        if !s.is_object() && !s.is_boolean() {
            cx.err(format!("{path}.arguments"), "must be a JSON Schema object");
            return None;
        }
        match jsonschema::options().should_validate_formats(true).build(s) {
            Ok(v) => Some(v),
            Err(e) => {
                cx.err(format!("{path}.arguments"), format!("not a usable JSON Schema: {e}"));
                None
            }
        }
    });
    CompiledRule {
        path: path.into(),
        action,
        reason: rule.reason.as_deref().map(Into::into),
        require: compile_conditions(cx, &format!("{path}.require"), &rule.require),
        deny_if: compile_conditions(cx, &format!("{path}.deny_if"), &rule.deny_if),
        schema,
        limits: compile_limits(cx, path, &rule.limits),
        approval_timeout,
        approval_show_arguments,
        approval_reuse,
    }
}

fn compile_conditions(cx: &mut Ctx<'_>, path: &str, conds: &[Condition]) -> Vec<CompiledCondition> {
    if conds.len() > bounds::MAX_CONDITIONS {
        cx.err(path, format!("at most {} conditions are allowed", bounds::MAX_CONDITIONS));
    }
    conds.iter().enumerate().filter_map(|(i, c)| compile_condition(cx, &format!("{path}[{i}]"), c)).collect()
}

/// Splits `args.a.b.0` into `["a", "b", "0"]`.
fn parse_arg_path(cx: &mut Ctx<'_>, path: &str, p: &str) -> Option<Vec<String>> {
    let Some(rest) = p.strip_prefix("args.") else {
        cx.err(path, format!("{p:?} must start with `args.` (a path into the call's arguments)"));
        return None;
    };
    let segments: Vec<String> = rest.split('.').map(str::to_owned).collect();
    if segments.iter().any(String::is_empty) {
        cx.err(path, format!("{p:?} has an empty segment"));
        return None;
    }
    if segments.len() > bounds::MAX_PATH_DEPTH {
        cx.err(path, format!("at most {} segments are allowed", bounds::MAX_PATH_DEPTH));
        return None;
    }
    Some(segments)
}

fn compile_condition(cx: &mut Ctx<'_>, path: &str, c: &Condition) -> Option<CompiledCondition> {
    let segments = parse_arg_path(cx, &format!("{path}.path"), &c.path)?;
    let vpath = format!("{path}.value");
    let value = c.value.clone();
    let number = |cx: &mut Ctx<'_>| match value.as_ref().and_then(Value::as_f64) {
        Some(n) => Some(n),
        None => {
            cx.err(&vpath, format!("`{:?}` needs a number", c.op).to_lowercase());
            None
        }
    };
    let list = |cx: &mut Ctx<'_>| match value.as_ref() {
        Some(Value::Array(items)) if items.len() <= bounds::MAX_LIST => Some(items.clone()),
        Some(Value::Array(_)) => {
            cx.err(&vpath, format!("at most {} elements are allowed", bounds::MAX_LIST));
            None
        }
        other => {
            cx.err(&vpath, format!("needs a list, got {}", other.map_or("nothing", kind_of)));
            None
        }
    };
    let any = |cx: &mut Ctx<'_>| match value.clone() {
        Some(v) => Some(v),
        None => {
            cx.err(&vpath, "needs a value");
            None
        }
    };
    let op = match c.op {
        Op::Eq => CompiledOp::Eq(any(cx)?),
        Op::Neq => CompiledOp::Neq(any(cx)?),
        Op::In => CompiledOp::In(list(cx)?),
        Op::NotIn => CompiledOp::NotIn(list(cx)?),
        Op::Lt => CompiledOp::Lt(number(cx)?),
        Op::Lte => CompiledOp::Lte(number(cx)?),
        Op::Gt => CompiledOp::Gt(number(cx)?),
        Op::Gte => CompiledOp::Gte(number(cx)?),
        Op::Contains => CompiledOp::Contains(any(cx)?),
        Op::Exists => match value {
            None => CompiledOp::Exists(true),
            Some(Value::Bool(b)) => CompiledOp::Exists(b),
            Some(other) => {
                cx.err(&vpath, format!("`exists` needs true or false, got {}", kind_of(&other)));
                return None;
            }
        },
        Op::Regex => {
            let Some(Value::String(pattern)) = value else {
                cx.err(&vpath, "`regex` needs a string");
                return None;
            };
            if pattern.len() > bounds::MAX_REGEX_LEN {
                cx.err(&vpath, format!("regex longer than {} bytes", bounds::MAX_REGEX_LEN));
                return None;
            }
            match regex::RegexBuilder::new(&pattern)
                .size_limit(bounds::MAX_REGEX_COMPILED)
                .dfa_size_limit(bounds::MAX_REGEX_COMPILED)
                .build()
            {
                Ok(r) => CompiledOp::Regex(r),
                Err(e) => {
                    cx.err(&vpath, format!("not a valid regex: {e}"));
                    return None;
                }
            }
        }
    };
    Some(CompiledCondition { path: path.into(), segments, op, reason: c.reason.as_deref().map(Into::into) })
}

fn compile_limits(cx: &mut Ctx<'_>, rule_path: &str, limits: &[Limit]) -> Vec<CompiledLimit> {
    if limits.len() > bounds::MAX_LIMITS {
        cx.err(format!("{rule_path}.limits"), format!("at most {} limits are allowed", bounds::MAX_LIMITS));
    }
    let mut out = Vec::new();
    for (i, l) in limits.iter().enumerate() {
        let path = format!("{rule_path}.limits[{i}]");
        let window = match &l.window {
            Window::Text(t) => parse_window(t),
            Window::Seconds(n) => window_seconds(*n),
        };
        if window.is_none() {
            cx.err(
                format!("{path}.window"),
                format!(
                    "{} is not a window; use second, minute, hour, day, a duration such as 90s, 5m, 2h, 1d, or a whole number of seconds (unquoted) from 1 to {} (at most 31d)",
                    l.window,
                    bounds::MAX_WINDOW_SECS
                ),
            );
        }
        if l.max == 0 {
            cx.err(format!("{path}.max"), "must be at least 1 (use `action: deny` to refuse every call)");
        }
        if l.increment.is_some() && l.increment_from.is_some() {
            cx.err(&path, "set `increment` or `increment_from`, not both");
        }
        if l.increment == Some(0) {
            cx.err(format!("{path}.increment"), "must be at least 1");
        }
        let increment = match &l.increment_from {
            Some(p) => match parse_arg_path(cx, &format!("{path}.increment_from"), p) {
                Some(segs) => Increment::From(segs),
                None => continue,
            },
            None => Increment::Fixed(l.increment.unwrap_or(1)),
        };
        let counter = match &l.counter {
            Some(c) if c.is_empty() || c.len() > 128 => {
                cx.err(format!("{path}.counter"), "must be 1-128 characters");
                continue;
            }
            Some(c) => c.clone(),
            None => format!("{rule_path}.limits[{i}]"),
        };
        let scope = l.scope.unwrap_or_default();
        let Some(window) = window else { continue };
        if let Some((w, s, first)) = cx.counters.get(&counter) {
            if *w != window || *s != scope {
                let msg = format!(
                    "counter {counter:?} is also used at {first} with another window or scope; a shared counter needs the same window and scope"
                );
                cx.err(&path, msg);
                continue;
            }
        } else {
            cx.counters.insert(counter.clone(), (window, scope, path.clone()));
        }
        out.push(CompiledLimit {
            path: path.into(),
            counter: counter.into(),
            window,
            max: l.max,
            scope,
            increment,
            reason: l.reason.as_deref().map(Into::into),
        });
    }
    out
}

/// `second|minute|hour|day` or a duration.
pub(crate) fn parse_window(s: &str) -> Option<Duration> {
    match s {
        "second" => Some(Duration::from_secs(1)),
        "minute" => Some(Duration::from_secs(60)),
        "hour" => Some(Duration::from_secs(3600)),
        "day" => Some(Duration::from_secs(86_400)),
        other => parse_duration(other),
    }
}

/// A window written as a bare number of seconds: positive and at most 31 days.
fn window_seconds(n: u64) -> Option<Duration> {
    (n > 0 && n <= bounds::MAX_WINDOW_SECS).then(|| Duration::from_secs(n))
}

/// `90s`, `5m`, `2h`, `1d`, `250ms`; positive and at most 31 days.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        "d" => Duration::from_secs(n.checked_mul(86_400)?),
        _ => return None,
    };
    (!d.is_zero() && d <= Duration::from_secs(bounds::MAX_WINDOW_SECS)).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_window("minute"), Some(Duration::from_secs(60)));
        assert_eq!(parse_window("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_window("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_window("250ms"), Some(Duration::from_millis(250)));
        for bad in ["", "0s", "fortnight", "5", "m", "-5s", "1.5h", "32d", "99999999999999999999d"] {
            assert_eq!(parse_window(bad), None, "{bad}");
        }
    }
}
