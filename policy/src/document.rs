//! The policy document as users write it: YAML or JSON, a strict superset of the
//! PolicyLayer policy JSON. These types are also the schema of the `McpPolicy` CRD spec,
//! so their doc comments are what `kubectl explain` shows.
//!
//! Field names are snake_case (not the Kubernetes camelCase) on purpose: a PolicyLayer
//! policy must paste verbatim under `spec:`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A toolgate policy document.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// Format version. Must be "1".
    pub version: String,

    /// Free text for people reading the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,

    /// What happens to a tool that no key under `tools` matches: `deny` (the default when
    /// omitted, so a new tool on the server is refused until someone allows it) or `allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<DefaultAction>,

    /// Glob patterns of tools removed from `tools/list` and refused on `tools/call`.
    /// `"*"` hides every tool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hide: Vec<String>,

    /// How a refusal is answered: `error` (a JSON-RPC error, the default) or
    /// `tool_result` (a tool result with `isError: true`, so the model can read why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denial: Option<DenialStyle>,

    /// Checks and limits applied to every tool call that the tool's own rule lets through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all_tools: Option<AllTools>,

    /// Rules per tool. Keys are exact tool names (case-sensitive) or globs such as
    /// `delete-*`; an exact key beats a glob, and among globs the one with the most
    /// literal characters wins.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tools: BTreeMap<String, ToolRule>,

    /// Named groups of callers, each with its own rules. A caller is matched by the
    /// first grant whose `match` fits; a caller no grant matches gets the top-level
    /// rules when the document has any `tools`, and is denied otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<Grant>,

    /// Where this document's limits are counted, and what a limited call gets when the
    /// shared store cannot decide. Omitted: as the sidecar's `--counter-store` flags say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<CounterSettings>,
}

/// A document's choice of counter store (`counters`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CounterSettings {
    /// `local`: counted in each sidecar's memory (every replica admits `max` on its own);
    /// `shared`: counted in the store every replica shares (Redis/Valkey, the sidecar's
    /// `--counter-store`), so `max` holds across replicas. Omitted: the sidecar's store.
    /// A document asking for `shared` on a sidecar without a store has its limited calls
    /// refused (`store_unavailable`), never counted locally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreKind>,
    /// What a limited call gets when the shared store cannot decide (unreachable, slow
    /// past its bound): `closed` (refused, `store_unavailable`), `local` (counted in this
    /// sidecar against `max` divided by the sidecar's `--counter-store-replicas`) or
    /// `open` (admitted uncounted). Omitted: the sidecar's `--counter-store-on-failure`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_store_failure: Option<OnStoreFailure>,
}

/// Where a document's limits are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// In each sidecar's memory.
    Local,
    /// In the store shared by every replica.
    Shared,
}

/// What a limited call gets when the shared store cannot decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreFailure {
    /// Refused with `store_unavailable` (-32015).
    Closed,
    /// Counted in this sidecar against `max` divided by its `--counter-store-replicas`.
    Local,
    /// Admitted without being counted (`toolgate_counter_store_fallbacks_total{mode="open"}`).
    Open,
}

/// The posture for tools no rule names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DefaultAction {
    /// Tools without a rule are allowed (subject to `all_tools`).
    Allow,
    /// Tools without a rule are refused.
    Deny,
}

/// How refusals are returned to the client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DenialStyle {
    /// A JSON-RPC error with `data: {decision, policy, rule, reason, retryAfterSeconds?}`.
    #[default]
    Error,
    /// A successful JSON-RPC response carrying a tool result with `isError: true`.
    ToolResult,
}

/// Checks and limits that apply to every tool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AllTools {
    /// Every condition must hold, otherwise the call is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub require: Vec<Condition>,
    /// Any condition that holds refuses the call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_if: Vec<Condition>,
    /// Rate limits and spend caps shared by all tools.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<Limit>,
}

/// What a tool's rule does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Allowed when its checks pass and its limits have room.
    #[default]
    Allow,
    /// Always refused.
    Deny,
    /// Held until a person approves it (after checks, before limits).
    Approval,
}

/// The rule for one tool key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolRule {
    /// `allow` (default), `deny` or `approval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// Text returned to the agent when this rule refuses a call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Every condition must hold, otherwise the call is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub require: Vec<Condition>,
    /// Any condition that holds refuses the call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_if: Vec<Condition>,
    /// A JSON Schema the call's `arguments` must satisfy. External `$ref`s are not fetched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
    pub arguments: Option<Value>,
    /// Rate limits and spend caps for this tool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<Limit>,
    /// Settings for `action: approval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalSettings>,
}

/// Settings of a human approval.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApprovalSettings {
    /// How long a held call waits for a decision before it is refused as expired, as a
    /// duration (`90s`, `10m`, `1h`). Default 10m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Whether the McpApproval shows the call's arguments to the approver. Default false:
    /// only their SHA-256 digest and keys are shown (arguments may hold secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_arguments: Option<bool>,
    /// Let one approval also cover identical calls (same tool, same canonical arguments,
    /// same grant) for this long after it was given (`15m`). Default: an approval covers
    /// exactly one call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reuse_for: Option<String>,
}

/// A check on one value of the call's arguments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// `args.<field>.<field>…` into the call's arguments; numeric segments index arrays.
    pub path: String,
    /// eq, neq, in, not_in, lt, lte, gt, gte, regex, contains or exists.
    pub op: Op,
    /// The operand: any value for eq/neq/contains, a list for in/not_in, a number for
    /// lt/lte/gt/gte, a string for regex, true/false for exists (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
    pub value: Option<Value>,
    /// Text returned to the agent when this condition refuses a call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Condition operators (those of Intercept).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Equal (numbers compare numerically).
    Eq,
    /// Not equal.
    Neq,
    /// Equal to one element of the list.
    In,
    /// Equal to no element of the list.
    NotIn,
    /// Less than.
    Lt,
    /// Less than or equal.
    Lte,
    /// Greater than.
    Gt,
    /// Greater than or equal.
    Gte,
    /// The string matches the regular expression (unanchored; use ^…$).
    Regex,
    /// Substring of a string, or element of a list.
    Contains,
    /// The path is present (`true`) or absent (`false`).
    Exists,
}

/// A rate limit or spend cap: at most `max` units in any interval of length `window`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// Counter name. Limits with the same name in one document share a count.
    /// Default: the rule's own path (one counter per rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter: Option<String>,
    /// second, minute, hour, day, a duration such as `90s`, `5m`, `2h`, `1d`, or a whole
    /// number of seconds (`60`, as PolicyLayer writes it).
    pub window: Window,
    /// Most units admitted in any interval of length `window` (at least 1).
    pub max: u64,
    /// Whose calls share the count: `grant` (default), `identity`, `session` or `global`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    /// Units each call spends (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub increment: Option<u64>,
    /// `args.<path>` of a non-negative integer argument each call spends instead
    /// (spend caps). A call without it, or with a negative or fractional value, is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub increment_from: Option<String>,
    /// Text returned to the agent when this limit refuses a call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Who shares a limit's count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Every caller of the same grant (without grants: the same credential).
    #[default]
    Grant,
    /// The same credential fingerprint.
    Identity,
    /// The same MCP session (`Mcp-Session-Id`).
    Session,
    /// Every caller together.
    Global,
}

/// A named group of callers with its own rules.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Name of the grant, shown in decisions, audit lines and metrics.
    pub name: String,
    /// Which callers belong to this grant.
    #[serde(rename = "match")]
    pub matches: GrantMatch,
    /// Posture for tools no key names (default deny).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<DefaultAction>,
    /// Tools hidden from this grant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hide: Vec<String>,
    /// Checks and limits on every tool for this grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all_tools: Option<AllTools>,
    /// Rules per tool for this grant.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tools: BTreeMap<String, ToolRule>,
}

/// How callers are recognised. A caller matches when any listed criterion matches.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantMatch {
    /// `sha256:<hex>` fingerprints of the callers' `Authorization` header values
    /// (`toolgate fingerprint` prints one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fingerprints: Vec<String>,
    /// A request header set by a trusted gateway in front of toolgate, and its accepted values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderMatch>,
    /// Authenticated subjects (exact or glob): a verified token's `sub`, a service account's
    /// `system:serviceaccount:<namespace>:<name>`, an API key's `apikey:<name>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subjects: Vec<String>,
    /// Verified token claims and their accepted values (exact): every listed claim must
    /// hold; a claim that is a list holds when any of its items is accepted
    /// (`{groups: [platform]}`, `{azp: [agent-a]}`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub claims: BTreeMap<String, Vec<String>>,
    /// Kubernetes service accounts as `namespace/name` (globs allowed: `agents/*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty", rename = "serviceAccounts")]
    pub service_accounts: Vec<String>,
    /// Names of static API keys (from the proxy's key file).
    #[serde(default, skip_serializing_if = "Vec::is_empty", rename = "apiKeys")]
    pub api_keys: Vec<String>,
}

/// A header criterion.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    /// Header name (case-insensitive).
    pub name: String,
    /// Accepted values (exact, case-sensitive).
    pub values: Vec<String>,
}

/// The length of a limit's window as written: a name or duration (`minute`, `90s`), or a
/// whole number of seconds (`60`). Both are checked when the policy is compiled
/// (positive, at most 31 days); here only the shape: a negative or fractional number is
/// refused while parsing, naming the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Window {
    /// `second`, `minute`, `hour`, `day` or a duration such as `90s`.
    Text(String),
    /// A number of seconds, written as a bare (unquoted) integer.
    Seconds(u64),
}

impl From<&str> for Window {
    fn from(s: &str) -> Self {
        Window::Text(s.to_owned())
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Window::Text(s) => write!(f, "{s:?}"),
            Window::Seconds(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for Window {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Window::Text(t) => s.serialize_str(t),
            Window::Seconds(n) => s.serialize_u64(*n),
        }
    }
}

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(WindowVisitor)
    }
}

const WINDOW_EXPECTED: &str =
    "second, minute, hour, day, a duration such as 90s, 5m, 2h, 1d, or a whole number of seconds such as 60";

struct WindowVisitor;

impl serde::de::Visitor<'_> for WindowVisitor {
    type Value = Window;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(WINDOW_EXPECTED)
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Window, E> {
        Ok(Window::Seconds(v))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Window, E> {
        u64::try_from(v).map(Window::Seconds).map_err(|_| {
            E::custom(format_args!("{v} is not a window: a number of seconds must be positive; use {WINDOW_EXPECTED}"))
        })
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Window, E> {
        Err(E::custom(format_args!(
            "{v} is not a window: a number of seconds must be a whole number from 1 to {} (no fraction or exponent); use {WINDOW_EXPECTED}",
            crate::bounds::MAX_WINDOW_SECS
        )))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Window, E> {
        Ok(Window::Text(v.to_owned()))
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Window, E> {
        Ok(Window::Text(v))
    }
}

impl JsonSchema for Window {
    fn schema_name() -> Cow<'static, str> {
        "Window".into()
    }

    fn inline_schema() -> bool {
        true
    }

    /// A string or an integer, as Kubernetes spells it (like `IntOrString`).
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "x-kubernetes-int-or-string": true })
    }
}
