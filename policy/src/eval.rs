//! Evaluation of a call against compiled documents.
//!
//! Order per document: identify (grant) → hide → the tool's rule (action, default) →
//! argument checks (schema, require, deny_if; the tool's rule, then `all_tools`) →
//! approval → limits. Limits are reserved only after every document has passed the
//! earlier steps, so a refused call never spends quota.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::compile::{CompiledCondition, CompiledDoc, CompiledOp, CompiledRule, Increment, RuleSet};
use crate::document::{DenialStyle, Scope};
use crate::limiter::{CounterKey, Demand, Reservation};
use crate::store::{CounterStore, StoreRefusal};

/// Who is calling.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    /// Fingerprint of the caller's credential (`sha256:<hex>`, see [`crate::fingerprint`]),
    /// or a name given by a trusted gateway. Empty for anonymous callers, who then share
    /// one identity.
    pub identity: String,
    /// The MCP session id, if any.
    pub session: Option<String>,
    /// Request headers that grants match on: lower-case names (see
    /// [`crate::Policy::header_names`]).
    pub headers: Vec<(String, String)>,
    /// Who the caller proved to be, when the proxy authenticated it (a verified OIDC
    /// token, a Kubernetes service-account token or a named API key). `None` for callers
    /// known only by their credential's fingerprint or a gateway header.
    pub principal: Option<Principal>,
}

/// An authenticated caller, as the proxy verified it. Grants match on it
/// (`subjects`, `claims`, `serviceAccounts`, `apiKeys`); its [`Principal::key`] is the
/// stable identity that `scope: identity` counts by and audit lines carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// A bearer token (JWT) verified against a configured issuer's keys.
    Token {
        /// The token's issuer (`iss`), one of the configured ones.
        issuer: String,
        /// The token's subject (`sub`).
        subject: String,
        /// Every verified claim (string, number, boolean and array values are matched).
        claims: serde_json::Map<String, Value>,
    },
    /// A Kubernetes service account, from a projected token verified by the cluster.
    ServiceAccount {
        /// The service account's namespace.
        namespace: String,
        /// The service account's name.
        name: String,
        /// The pod the token is bound to, when it is bound to one.
        pod: Option<String>,
        /// The token's verified claims (`sub`, `aud`, `kubernetes.io`, …).
        claims: serde_json::Map<String, Value>,
    },
    /// A static API key, by the name its hash is listed under.
    ApiKey {
        /// The key's name in the key file.
        name: String,
    },
}

impl Principal {
    /// The subject grants' `subjects` match: the token's `sub`, or
    /// `system:serviceaccount:<namespace>:<name>`, or `apikey:<name>`.
    pub fn subject(&self) -> String {
        match self {
            Principal::Token { subject, .. } => subject.clone(),
            Principal::ServiceAccount { namespace, name, .. } => format!("system:serviceaccount:{namespace}:{name}"),
            Principal::ApiKey { name } => format!("apikey:{name}"),
        }
    }

    /// The stable identity of this caller: what `scope: identity` counts by, audit lines
    /// carry and no two different callers share. A token's subject is unique only within
    /// its issuer, so the issuer is part of it.
    pub fn key(&self) -> String {
        match self {
            Principal::Token { issuer, subject, .. } => format!("oidc:{issuer}#{subject}"),
            Principal::ServiceAccount { namespace, name, .. } => format!("sa:{namespace}/{name}"),
            Principal::ApiKey { name } => format!("apikey:{name}"),
        }
    }

    pub(crate) fn claims_map(&self) -> Option<&serde_json::Map<String, Value>> {
        match self {
            Principal::Token { claims, .. } | Principal::ServiceAccount { claims, .. } => Some(claims),
            Principal::ApiKey { .. } => None,
        }
    }
}

impl Caller {
    /// The identity limits count by: the authenticated principal's stable key when there
    /// is one, else the credential's fingerprint (or gateway name).
    pub fn identity_key(&self) -> std::borrow::Cow<'_, str> {
        match &self.principal {
            Some(p) => p.key().into(),
            None => self.identity.as_str().into(),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// One `tools/call`.
#[derive(Clone, Copy, Debug)]
pub struct Call<'a> {
    /// Tool name, exactly as sent.
    pub tool: &'a str,
    /// The call's `arguments` (`Value::Null` when absent).
    pub arguments: &'a Value,
    /// Who calls.
    pub caller: &'a Caller,
}

/// What was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DecisionKind {
    /// Forward the call.
    Allow,
    /// Refused by a rule or the default.
    Deny,
    /// Refused because the tool is hidden.
    Hidden,
    /// Held for a person's approval.
    Approval,
    /// Refused because a limit has no room.
    RateLimited,
    /// Refused because the counter store could not decide (unreachable or too slow):
    /// limited calls fail closed.
    StoreUnavailable,
}

impl DecisionKind {
    /// The label used in metrics, audit lines and JSON-RPC error data.
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionKind::Allow => "allow",
            DecisionKind::Deny => "deny",
            DecisionKind::Hidden => "hidden",
            DecisionKind::Approval => "approval",
            DecisionKind::RateLimited => "rate_limited",
            DecisionKind::StoreUnavailable => "store_unavailable",
        }
    }

    /// Whether the call goes on to the upstream.
    pub fn is_allow(self) -> bool {
        self == DecisionKind::Allow
    }
}

/// The outcome of [`crate::Policy::decide`].
#[derive(Debug)]
pub struct Decision {
    /// What was decided.
    pub kind: DecisionKind,
    /// The document that decided (for a refusal: the first refusing document).
    pub policy: Option<Arc<str>>,
    /// Path of the deciding rule in that document (`tools.start-pod.limits[0]`).
    pub rule: Option<Arc<str>>,
    /// Why, for refusals and approvals: text for the agent.
    pub reason: Option<String>,
    /// The grant the caller was matched to in the deciding document.
    pub grant: Option<Arc<str>>,
    /// How the deciding document wants refusals answered.
    pub denial: DenialStyle,
    /// For `RateLimited`: when the same call could pass.
    pub retry_after: Option<Duration>,
    /// For `Approval`: how long to wait for a decision.
    pub approval_timeout: Option<Duration>,
    /// For `Approval`: whether the approver may see the arguments.
    pub approval_show_arguments: bool,
    /// For `Approval`: how long an approval also covers identical calls (none: one call).
    pub approval_reuse: Option<Duration>,
    /// For `Allow`: the units held; roll back if the upstream call fails.
    pub reservation: Option<Reservation>,
    /// For `Approval`: the limits to reserve once approved.
    pending: Vec<LimitDemand>,
}

#[derive(Clone, Debug)]
pub(crate) struct LimitDemand {
    demand: Demand,
    policy: Arc<str>,
    rule: Arc<str>,
    reason: Option<Arc<str>>,
    grant: Option<Arc<str>>,
    denial: DenialStyle,
}

impl Decision {
    fn refusal(
        kind: DecisionKind,
        doc: &CompiledDoc,
        grant: Option<&Arc<str>>,
        rule: Arc<str>,
        reason: String,
    ) -> Self {
        Self {
            kind,
            policy: Some(doc.name.clone()),
            rule: Some(rule),
            reason: Some(reason),
            grant: grant.cloned(),
            denial: doc.denial,
            retry_after: None,
            approval_timeout: None,
            approval_show_arguments: false,
            approval_reuse: None,
            reservation: None,
            pending: Vec::new(),
        }
    }

    /// A refusal not tied to any document (no policy loaded, malformed call).
    pub fn deny_without_policy(reason: impl Into<String>) -> Self {
        Self {
            kind: DecisionKind::Deny,
            policy: None,
            rule: None,
            reason: Some(reason.into()),
            grant: None,
            denial: DenialStyle::Error,
            retry_after: None,
            approval_timeout: None,
            approval_show_arguments: false,
            approval_reuse: None,
            reservation: None,
            pending: Vec::new(),
        }
    }

    /// After a person approved an `Approval` decision: reserve its limits, giving
    /// `Allow` (with a reservation) or `RateLimited`.
    pub fn approved(self, store: &dyn CounterStore, now: Duration) -> Decision {
        let grant = self.grant.clone();
        reserve(store, self.policy, self.rule, grant, self.denial, self.pending, now)
    }
}

/// Result of one document, before limits.
enum DocOutcome<'a> {
    Refused(Decision),
    Approval { rules: &'a RuleSet, rule: &'a CompiledRule, grant: Option<&'a Arc<str>> },
    Allow { rules: &'a RuleSet, rule: Option<&'a CompiledRule>, grant: Option<&'a Arc<str>> },
}

static EMPTY_ARGS: Value = Value::Null;

/// The first allowing document, its deciding rule path and the caller's grant there.
type FirstAllow<'a> = (&'a CompiledDoc, Arc<str>, Option<&'a Arc<str>>);

pub(crate) fn decide(docs: &[CompiledDoc], store: &dyn CounterStore, call: &Call<'_>, now: Duration) -> Decision {
    if docs.is_empty() {
        return Decision::deny_without_policy("no policy is loaded; every tool call is refused");
    }
    let args = match call.arguments {
        Value::Null => &EMPTY_ARGS,
        a @ Value::Object(_) => a,
        other => {
            return Decision::deny_without_policy(format!(
                "tool arguments must be an object, got {}",
                crate::parse::kind_of(other)
            ));
        }
    };
    let mut demands = Vec::new();
    let mut approval: Option<Decision> = None;
    let mut first_allow: Option<FirstAllow<'_>> = None;
    for (i, doc) in docs.iter().enumerate() {
        match eval_doc(doc, call, args) {
            DocOutcome::Refused(d) => return hide_outranks(&docs[i + 1..], call, d),
            DocOutcome::Approval { rules, rule, grant } => {
                if let Err(d) = collect_demands(doc, rules, Some(rule), grant, call, args, &mut demands) {
                    return hide_outranks(&docs[i + 1..], call, d);
                }
                approval.get_or_insert_with(|| Decision {
                    kind: DecisionKind::Approval,
                    policy: Some(doc.name.clone()),
                    rule: Some(rule.path.clone()),
                    reason: Some(
                        rule.reason
                            .as_deref()
                            .map_or_else(|| format!("tool {:?} requires approval", call.tool), str::to_owned),
                    ),
                    grant: grant.cloned(),
                    denial: doc.denial,
                    retry_after: None,
                    approval_timeout: Some(rule.approval_timeout),
                    approval_show_arguments: rule.approval_show_arguments,
                    approval_reuse: rule.approval_reuse,
                    reservation: None,
                    pending: Vec::new(),
                });
            }
            DocOutcome::Allow { rules, rule, grant } => {
                if let Err(d) = collect_demands(doc, rules, rule, grant, call, args, &mut demands) {
                    return hide_outranks(&docs[i + 1..], call, d);
                }
                let path = rule.map_or_else(|| rules.default_path.clone(), |r| r.path.clone());
                first_allow.get_or_insert((doc, path, grant));
            }
        }
    }
    if let Some(mut a) = approval {
        a.pending = demands;
        return a;
    }
    let Some((doc, rule_path, grant)) = first_allow else {
        return Decision::deny_without_policy("no policy is loaded; every tool call is refused");
    };
    reserve(store, Some(doc.name.clone()), Some(rule_path), grant.cloned(), doc.denial, demands, now)
}

fn reserve(
    store: &dyn CounterStore,
    policy: Option<Arc<str>>,
    rule: Option<Arc<str>>,
    grant: Option<Arc<str>>,
    denial: DenialStyle,
    demands: Vec<LimitDemand>,
    now: Duration,
) -> Decision {
    let allow = |reservation: Reservation| Decision {
        kind: DecisionKind::Allow,
        policy,
        rule,
        reason: None,
        grant,
        denial,
        retry_after: None,
        approval_timeout: None,
        approval_show_arguments: false,
        approval_reuse: None,
        reservation: Some(reservation),
        pending: Vec::new(),
    };
    if demands.iter().all(|d| d.demand.amount == 0) {
        // No limit to count (or nothing to spend): the store is not asked.
        return allow(Reservation::none());
    }
    let plain: Vec<Demand> = demands.iter().map(|d| d.demand.clone()).collect();
    match store.reserve(&plain, now) {
        Ok(reservation) => allow(reservation),
        Err(StoreRefusal::Unavailable(why)) => {
            // Fail closed: a limit that cannot be counted admits nothing. Named after the
            // first limit of the call (every limit of it went uncounted).
            let d = &demands[0];
            Decision {
                kind: DecisionKind::StoreUnavailable,
                policy: Some(d.policy.clone()),
                rule: Some(d.rule.clone()),
                reason: Some(format!(
                    "the rate-limit counter store is unavailable ({why}); limited calls are refused until it is back"
                )),
                grant: d.grant.clone(),
                denial: d.denial,
                retry_after: None,
                approval_timeout: None,
                approval_show_arguments: false,
                approval_reuse: None,
                reservation: None,
                pending: Vec::new(),
            }
        }
        Err(StoreRefusal::Limit(refusal)) => {
            let d = &demands[refusal.index];
            let reason = d.reason.as_deref().map_or_else(
                || match refusal.retry_after {
                    Some(_) => {
                        format!("rate limit reached: at most {} per {}", d.demand.max, fmt_duration(d.demand.window))
                    }
                    None if d.demand.amount > d.demand.max => format!(
                        "this call spends {} but the limit allows at most {} per {}",
                        d.demand.amount,
                        d.demand.max,
                        fmt_duration(d.demand.window)
                    ),
                    None => "rate limiter is full; try again later".to_owned(),
                },
                str::to_owned,
            );
            Decision {
                kind: DecisionKind::RateLimited,
                policy: Some(d.policy.clone()),
                rule: Some(d.rule.clone()),
                reason: Some(reason),
                grant: d.grant.clone(),
                denial: d.denial,
                retry_after: refusal.retry_after,
                approval_timeout: None,
                approval_show_arguments: false,
                approval_reuse: None,
                reservation: None,
                pending: Vec::new(),
            }
        }
    }
}

/// `60s` → `minute` etc., for messages.
pub(crate) fn fmt_duration(d: Duration) -> String {
    match d.as_millis() {
        1_000 => "second".into(),
        60_000 => "minute".into(),
        3_600_000 => "hour".into(),
        86_400_000 => "day".into(),
        ms if ms % 1000 != 0 => format!("{ms}ms"),
        ms => format!("{}s", ms / 1000),
    }
}

/// Which rules apply to this caller in `doc`, and under which grant.
fn select<'a>(doc: &'a CompiledDoc, caller: &Caller) -> Option<(&'a RuleSet, Option<&'a Arc<str>>)> {
    for g in &doc.grants {
        let by_fp = !caller.identity.is_empty() && g.fingerprints.iter().any(|f| f == &caller.identity);
        let by_header = g
            .header
            .as_ref()
            .is_some_and(|(name, values)| caller.header(name).is_some_and(|v| values.iter().any(|x| x == v)));
        let by_principal = caller.principal.as_ref().is_some_and(|p| g.principals.matches(p));
        if by_fp || by_header || by_principal {
            return Some((&g.rules, Some(&g.name)));
        }
    }
    doc.top.as_ref().map(|t| (t, None))
}

fn is_hidden(rules: &RuleSet, tool: &str) -> bool {
    rules.hide_all || rules.hide_exact.iter().any(|h| h == tool) || rules.hide_globs.iter().any(|g| g.is_match(tool))
}

fn find_rule<'a>(rules: &'a RuleSet, tool: &str) -> Option<&'a CompiledRule> {
    if let Some(&i) = rules.exact.get(tool) {
        return Some(&rules.rules[i]);
    }
    rules.globs.iter().find(|(g, _)| g.is_match(tool)).map(|(_, i)| &rules.rules[*i])
}

/// Hiding is the union over documents, and tools/list leaves a tool out whichever
/// document hides it; so a refusal by one document becomes `Hidden` when a later one
/// hides the tool, and the kind does not depend on the order of the documents.
/// (Earlier documents passed the call, so they do not hide it.)
fn hide_outranks(later: &[CompiledDoc], call: &Call<'_>, refusal: Decision) -> Decision {
    if refusal.kind == DecisionKind::Hidden {
        return refusal;
    }
    later.iter().find_map(|doc| hidden(doc, call)).unwrap_or(refusal)
}

/// The `Hidden` refusal of `doc`, if it hides the tool from this caller.
fn hidden(doc: &CompiledDoc, call: &Call<'_>) -> Option<Decision> {
    let (rules, grant) = select(doc, call.caller)?;
    is_hidden(rules, call.tool).then(|| hidden_refusal(doc, rules, grant, call.tool))
}

fn hidden_refusal(doc: &CompiledDoc, rules: &RuleSet, grant: Option<&Arc<str>>, tool: &str) -> Decision {
    Decision::refusal(
        DecisionKind::Hidden,
        doc,
        grant,
        rules.hide_path.clone(),
        format!("tool {tool:?} is hidden by policy"),
    )
}

fn eval_doc<'a>(doc: &'a CompiledDoc, call: &Call<'_>, args: &Value) -> DocOutcome<'a> {
    let Some((rules, grant)) = select(doc, call.caller) else {
        return DocOutcome::Refused(Decision::refusal(
            DecisionKind::Deny,
            doc,
            None,
            "grants".into(),
            "no grant of this policy matches the caller".into(),
        ));
    };
    let tool = call.tool;
    if is_hidden(rules, tool) {
        return DocOutcome::Refused(hidden_refusal(doc, rules, grant, tool));
    }
    let rule = find_rule(rules, tool);
    let Some(rule) = rule else {
        if !rules.default_allow {
            return DocOutcome::Refused(Decision::refusal(
                DecisionKind::Deny,
                doc,
                grant,
                rules.default_path.clone(),
                format!("tool {tool:?} is not allowed by policy (default: deny)"),
            ));
        }
        if let Some(all) = &rules.all_tools
            && let Err(d) = check_arguments(doc, grant, all, tool, args)
        {
            return DocOutcome::Refused(d);
        }
        return DocOutcome::Allow { rules, rule: None, grant };
    };
    if rule.action == crate::document::Action::Deny {
        let reason = rule.reason.as_deref().map_or_else(|| format!("tool {tool:?} is denied by policy"), str::to_owned);
        return DocOutcome::Refused(Decision::refusal(DecisionKind::Deny, doc, grant, rule.path.clone(), reason));
    }
    for r in std::iter::once(rule).chain(rules.all_tools.as_ref()) {
        if let Err(d) = check_arguments(doc, grant, r, tool, args) {
            return DocOutcome::Refused(d);
        }
    }
    if rule.action == crate::document::Action::Approval {
        return DocOutcome::Approval { rules, rule, grant };
    }
    DocOutcome::Allow { rules, rule: Some(rule), grant }
}

#[expect(clippy::result_large_err, reason = "the error is the refusal itself, built once per refused call")]
fn check_arguments(
    doc: &CompiledDoc,
    grant: Option<&Arc<str>>,
    rule: &CompiledRule,
    tool: &str,
    args: &Value,
) -> Result<(), Decision> {
    let args_for_schema = if args.is_null() { &EMPTY_OBJECT } else { args };
    if let Some(schema) = &rule.schema
        && let Err(e) = schema.validate(args_for_schema)
    {
        let reason =
            rule.reason.as_deref().map_or_else(|| format!("arguments of {tool:?} rejected: {e}"), str::to_owned);
        return Err(Decision::refusal(
            DecisionKind::Deny,
            doc,
            grant,
            format!("{}.arguments", rule.path).into(),
            reason,
        ));
    }
    for c in &rule.require {
        if !holds(c, args) {
            return Err(condition_refusal(doc, grant, rule, c, tool, "requires"));
        }
    }
    for c in &rule.deny_if {
        if holds(c, args) {
            return Err(condition_refusal(doc, grant, rule, c, tool, "refuses"));
        }
    }
    Ok(())
}

static EMPTY_OBJECT: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| Value::Object(Default::default()));

fn condition_refusal(
    doc: &CompiledDoc,
    grant: Option<&Arc<str>>,
    rule: &CompiledRule,
    c: &CompiledCondition,
    tool: &str,
    verb: &str,
) -> Decision {
    let reason = c.reason.as_deref().or(rule.reason.as_deref()).map_or_else(
        || format!("policy {verb} args.{} {} for tool {tool:?}", c.segments.join("."), describe(&c.op)),
        str::to_owned,
    );
    Decision::refusal(DecisionKind::Deny, doc, grant, c.path.clone(), reason)
}

fn describe(op: &CompiledOp) -> String {
    match op {
        CompiledOp::Eq(v) => format!("eq {v}"),
        CompiledOp::Neq(v) => format!("neq {v}"),
        CompiledOp::In(v) => format!("in {}", Value::Array(v.clone())),
        CompiledOp::NotIn(v) => format!("not_in {}", Value::Array(v.clone())),
        CompiledOp::Lt(n) => format!("lt {n}"),
        CompiledOp::Lte(n) => format!("lte {n}"),
        CompiledOp::Gt(n) => format!("gt {n}"),
        CompiledOp::Gte(n) => format!("gte {n}"),
        CompiledOp::Regex(r) => format!("regex {:?}", r.as_str()),
        CompiledOp::Contains(v) => format!("contains {v}"),
        CompiledOp::Exists(true) => "exists".into(),
        CompiledOp::Exists(false) => "absent".into(),
    }
}

/// Looks `segments` up in the arguments: object keys, or array indices for numeric segments.
pub(crate) fn lookup<'v>(args: &'v Value, segments: &[String]) -> Option<&'v Value> {
    segments.iter().try_fold(args, |v, s| match v {
        Value::Object(m) => m.get(s),
        Value::Array(a) => s.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

/// A number, or a string holding one: servers often coerce "5" to 5, so `deny_if
/// gpuCount gt 2` must see through `"100"`.
pub(crate) fn as_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        _ => None,
    }
}

pub(crate) fn values_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(_), _) | (_, Value::Number(_)) => match (as_number(a), as_number(b)) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        },
        _ => a == b,
    }
}

fn holds(c: &CompiledCondition, args: &Value) -> bool {
    let target = lookup(args, &c.segments);
    match (&c.op, target) {
        (CompiledOp::Exists(want), t) => t.is_some() == *want,
        (_, None) => false,
        (CompiledOp::Eq(v), Some(t)) => values_eq(t, v),
        (CompiledOp::Neq(v), Some(t)) => !values_eq(t, v),
        (CompiledOp::In(list), Some(t)) => list.iter().any(|v| values_eq(t, v)),
        (CompiledOp::NotIn(list), Some(t)) => !list.iter().any(|v| values_eq(t, v)),
        (CompiledOp::Lt(n), Some(t)) => as_number(t).is_some_and(|x| x < *n),
        (CompiledOp::Lte(n), Some(t)) => as_number(t).is_some_and(|x| x <= *n),
        (CompiledOp::Gt(n), Some(t)) => as_number(t).is_some_and(|x| x > *n),
        (CompiledOp::Gte(n), Some(t)) => as_number(t).is_some_and(|x| x >= *n),
        (CompiledOp::Regex(r), Some(Value::String(s))) => r.is_match(s),
        (CompiledOp::Regex(_), Some(_)) => false,
        (CompiledOp::Contains(v), Some(Value::String(s))) => v.as_str().is_some_and(|needle| s.contains(needle)),
        (CompiledOp::Contains(v), Some(Value::Array(items))) => items.iter().any(|x| values_eq(x, v)),
        (CompiledOp::Contains(_), Some(_)) => false,
    }
}

fn scope_key(scope: Scope, grant: Option<&Arc<str>>, caller: &Caller) -> Box<str> {
    // `prefix + name` without `format!` (this runs for every limit of every call).
    let key = |prefix: &str, name: &str| -> Box<str> {
        let mut k = String::with_capacity(prefix.len() + name.len());
        k.push_str(prefix);
        k.push_str(name);
        k.into_boxed_str()
    };
    match (scope, grant) {
        (Scope::Grant, Some(g)) => key("grant:", g),
        (Scope::Grant | Scope::Identity, _) => key("id:", &caller.identity_key()),
        (Scope::Session, _) => match caller.session.as_deref() {
            Some(s) => key("session:", s),
            // No session (a stateless upstream): the caller's own bucket, never one shared
            // by every session-less caller nor a fresh one per request.
            None => key("sessionless:", &caller.identity_key()),
        },
        (Scope::Global, _) => "".into(),
    }
}

#[expect(clippy::result_large_err, reason = "the error is the refusal itself, built once per refused call")]
fn collect_demands(
    doc: &CompiledDoc,
    rules: &RuleSet,
    rule: Option<&CompiledRule>,
    grant: Option<&Arc<str>>,
    call: &Call<'_>,
    args: &Value,
    out: &mut Vec<LimitDemand>,
) -> Result<(), Decision> {
    for r in rule.into_iter().chain(rules.all_tools.as_ref()) {
        for l in &r.limits {
            let amount = match &l.increment {
                Increment::Fixed(n) => *n,
                Increment::From(segs) => {
                    match lookup(args, segs).and_then(as_number).filter(|n| *n >= 0.0 && n.fract() == 0.0) {
                        Some(n) if n <= u64::MAX as f64 => n as u64,
                        _ => {
                            return Err(Decision::refusal(
                                DecisionKind::Deny,
                                doc,
                                grant,
                                l.path.clone(),
                                format!(
                                    "args.{} must be a non-negative integer: it is counted against a limit",
                                    segs.join(".")
                                ),
                            ));
                        }
                    }
                }
            };
            out.push(LimitDemand {
                demand: Demand {
                    key: CounterKey {
                        policy: doc.counter_id.clone(),
                        counter: l.counter.clone(),
                        scope: scope_key(l.scope, grant, call.caller),
                    },
                    window: l.window,
                    max: l.max,
                    amount,
                    counters: doc.counters,
                },
                policy: doc.name.clone(),
                rule: l.path.clone(),
                reason: l.reason.clone(),
                grant: grant.cloned(),
                denial: doc.denial,
            });
        }
    }
    Ok(())
}

/// Whether `tools/list` should show `tool` to `caller`: hidden tools and tools every
/// call of which would be refused by its rule or the default are left out.
pub(crate) fn lists_tool(docs: &[CompiledDoc], tool: &str, caller: &Caller) -> bool {
    !docs.is_empty()
        && docs.iter().all(|doc| {
            let Some((rules, _)) = select(doc, caller) else {
                return false;
            };
            if is_hidden(rules, tool) {
                return false;
            }
            match find_rule(rules, tool) {
                None => rules.default_allow,
                Some(r) => r.action != crate::document::Action::Deny,
            }
        })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::{Call, Caller, DecisionKind, Limiter, Policy};

    fn policy(texts: &[&str]) -> Policy {
        let docs = texts
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("d{i}"), crate::parse_document(t).expect("parses")))
            .collect();
        Policy::compile(docs).expect("valid")
    }

    /// Found by tests/differential.rs: with the hiding document second, the call used to
    /// be reported as `deny` by the first document's default, although tools/list hid it.
    #[test]
    fn a_hide_in_any_document_outranks_other_refusals_whatever_the_order() {
        let deny_all = r#"{"version":"1"}"#;
        let hides = r#"{"version":"1","default":"allow","hide":["delete-*"]}"#;
        let caller = Caller::default();
        let args = json!({});
        let call = Call { tool: "delete-pod", arguments: &args, caller: &caller };
        for order in [[deny_all, hides], [hides, deny_all]] {
            let p = policy(&order);
            let d = p.decide(&Limiter::default(), &call, std::time::Duration::ZERO);
            assert_eq!(d.kind, DecisionKind::Hidden, "{order:?}");
            assert_eq!(d.rule.as_deref(), Some("hide"));
            assert!(!p.lists_tool("delete-pod", &caller));
        }
    }
}
