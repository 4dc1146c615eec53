//! Reading policy text: YAML or JSON, native documents or Intercept YAML.
//!
//! Everything is read through the YAML parser (JSON is YAML), which refuses duplicate
//! keys, so `{"tools": {"a": …, "a": …}}` is an error instead of "last one wins".

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::document::{Action, AllTools, Condition, DefaultAction, Document, Limit, Op, Scope, ToolRule, Window};
use crate::error::{Error, Problem, Result};

/// Largest policy text accepted, in bytes.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// The format a policy text was written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceFormat {
    /// toolgate's native document (a superset of PolicyLayer's JSON).
    Native,
    /// Intercept's YAML (`tools.<name>.rules[]`), converted on load.
    Intercept,
}

/// Parses policy text (YAML or JSON, native or Intercept) into a native [`Document`].
///
/// This checks the shape (types, unknown fields, duplicate keys) but not the meaning;
/// [`crate::Policy::compile`] validates the rest.
pub fn parse_document(text: &str) -> Result<Document> {
    parse_document_with_format(text).map(|(doc, _)| doc)
}

/// Like [`parse_document`], also telling which format was recognised.
pub fn parse_document_with_format(text: &str) -> Result<(Document, SourceFormat)> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(Error::TooLarge { size: text.len(), limit: MAX_DOCUMENT_BYTES });
    }
    check_flow_depth(text)?;
    let crate::strict::StrictValue(value) = serde_norway::from_str(text).map_err(|e| Error::Syntax(e.to_string()))?;
    document_from_value(value)
}

/// Deepest `[`/`{` nesting accepted; the YAML reader refuses more than 128 levels anyway.
const MAX_FLOW_DEPTH: usize = 128;

/// Refuses deeply nested flow collections before the YAML reader sees them: it reads
/// every level before its own depth limit applies, in time quadratic in the depth
/// (100 000 levels of `{"a":`, 500 KB, took a minute of CPU). Brackets inside quoted
/// strings and comments do not count.
fn check_flow_depth(text: &str) -> Result<()> {
    let (mut depth, mut quote, mut escaped, mut comment) = (0usize, None, false, false);
    let mut prev = b'\n';
    for &b in text.as_bytes() {
        let boundary = prev.is_ascii_whitespace() || matches!(prev, b'[' | b'{' | b',' | b':');
        match (quote, b) {
            _ if comment => comment = b != b'\n',
            (Some(b'"'), _) if escaped => escaped = false,
            (Some(b'"'), b'\\') => escaped = true,
            (Some(q), _) if b == q => quote = None,
            (Some(_), _) => {}
            (None, b'"' | b'\'') if boundary => quote = Some(b),
            (None, b'#') if prev.is_ascii_whitespace() => comment = true,
            (None, b'[' | b'{') => {
                depth += 1;
                if depth > MAX_FLOW_DEPTH {
                    return Err(Error::Syntax(format!("nested more than {MAX_FLOW_DEPTH} levels deep")));
                }
            }
            (None, b']' | b'}') => depth = depth.saturating_sub(1),
            (None, _) => {}
        }
        prev = b;
    }
    Ok(())
}

/// Builds a native [`Document`] from an already parsed value (e.g. an McpPolicy spec).
pub fn document_from_value(value: Value) -> Result<(Document, SourceFormat)> {
    if !value.is_object() {
        return Err(Error::Invalid(vec![Problem::new(
            "",
            format!("a policy must be a mapping/object, not {}", kind_of(&value)),
        )]));
    }
    if is_intercept(&value) {
        let doc: InterceptDocument = from_value_with_path(value)?;
        return Ok((doc.into_native()?, SourceFormat::Intercept));
    }
    Ok((from_value_with_path(value)?, SourceFormat::Native))
}

fn from_value_with_path<T: for<'de> Deserialize<'de>>(value: Value) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        Error::Invalid(vec![Problem::new(path, e.into_inner().to_string())])
    })
}

pub(crate) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Intercept documents are recognised by `rules` lists under `tools.<name>`, which the
/// native format does not have.
fn is_intercept(v: &Value) -> bool {
    v.get("tools").and_then(Value::as_object).is_some_and(|tools| tools.values().any(|t| t.get("rules").is_some()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InterceptDocument {
    version: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    default: Option<DefaultAction>,
    #[serde(default)]
    hide: Vec<String>,
    #[serde(default)]
    tools: BTreeMap<String, InterceptTool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InterceptTool {
    #[serde(default)]
    rules: Vec<InterceptRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InterceptRule {
    name: String,
    #[serde(default)]
    action: Option<InterceptAction>,
    #[serde(default)]
    conditions: Vec<Condition>,
    #[serde(default)]
    rate_limit: Option<String>,
    #[serde(default)]
    state: Option<InterceptState>,
    #[serde(default)]
    on_deny: Option<String>,
}

#[derive(Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum InterceptAction {
    Evaluate,
    Deny,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InterceptState {
    counter: String,
    window: Window,
    #[serde(default)]
    increment: Option<u64>,
    #[serde(default)]
    increment_from: Option<String>,
}

impl InterceptDocument {
    /// Converts to the native document with the same behaviour. Intercept counters are
    /// shared by every caller (it has no identities), so they become `scope: global`;
    /// its calendar-aligned windows become exact sliding windows, which never admit more.
    fn into_native(self) -> Result<Document> {
        let mut problems = Vec::new();
        let mut doc = Document {
            version: self.version,
            description: self.description,
            // Intercept's posture is allow when the field is omitted.
            default: Some(self.default.unwrap_or(DefaultAction::Allow)),
            hide: self.hide,
            ..Document::default()
        };
        for (tool, entry) in self.tools {
            let wildcard = tool == "*";
            let counter_scope = if wildcard { "_global" } else { tool.as_str() };
            let mut rule = ToolRule::default();
            for (i, r) in entry.rules.into_iter().enumerate() {
                let path = format!("tools.{tool}.rules[{i}]");
                convert_rule(r, counter_scope, &path, &mut rule, &mut problems);
            }
            if wildcard {
                if rule.action == Some(Action::Deny) {
                    problems.push(Problem::new(
                        format!("tools.{tool}"),
                        "a deny rule under \"*\" would refuse every call; use `default: deny` or `hide: [\"*\"]` instead",
                    ));
                }
                doc.all_tools = Some(AllTools { require: rule.require, deny_if: rule.deny_if, limits: rule.limits });
            } else {
                doc.tools.insert(tool, rule);
            }
        }
        if problems.is_empty() { Ok(doc) } else { Err(Error::Invalid(problems)) }
    }
}

fn convert_rule(r: InterceptRule, counter_scope: &str, path: &str, out: &mut ToolRule, problems: &mut Vec<Problem>) {
    let reason = r.on_deny.clone();
    if r.action == Some(InterceptAction::Deny) {
        if !r.conditions.is_empty() || r.rate_limit.is_some() || r.state.is_some() {
            problems.push(Problem::new(path, "deny rules must not have conditions, rate_limit or state"));
        }
        if out.action != Some(Action::Deny) {
            out.action = Some(Action::Deny);
            out.reason = reason.or_else(|| Some(format!("denied by rule {:?}", r.name)));
        }
        return;
    }
    if let Some(spec) = &r.rate_limit {
        if !r.conditions.is_empty() || r.state.is_some() {
            problems.push(Problem::new(
                format!("{path}.rate_limit"),
                "rate_limit cannot be combined with conditions or state",
            ));
        }
        match parse_rate_limit(spec) {
            Ok((max, window)) => out.limits.push(Limit {
                counter: Some(format!("{counter_scope}._rate_{window}")),
                window: Window::from(window),
                max,
                scope: Some(Scope::Global),
                increment: None,
                increment_from: None,
                reason: reason.or_else(|| Some(format!("Rate limit of {max} per {window} reached. Try again later."))),
            }),
            Err(msg) => problems.push(Problem::new(format!("{path}.rate_limit"), msg)),
        }
        return;
    }
    if r.conditions.is_empty() {
        problems.push(Problem::new(path, "evaluate rules must have at least one condition"));
    }
    let state_path = r.state.as_ref().map(|s| format!("state.{counter_scope}.{}", s.counter));
    let mut used_state = false;
    for (j, c) in r.conditions.into_iter().enumerate() {
        let cpath = format!("{path}.conditions[{j}]");
        if c.path.starts_with("state.") {
            let (Some(state), Some(expected)) = (&r.state, &state_path) else {
                problems.push(Problem::new(
                    format!("{cpath}.path"),
                    "a condition on a counter needs a `state` block on the same rule",
                ));
                continue;
            };
            if &c.path != expected {
                problems.push(Problem::new(
                    format!("{cpath}.path"),
                    format!("only this rule's own counter `{expected}` can be tested here"),
                ));
                continue;
            }
            let Some(max) = counter_max(c.op, c.value.as_ref()) else {
                problems.push(Problem::new(
                    cpath,
                    "a counter condition must be `lte N` or `lt N` with a non-negative integer N",
                ));
                continue;
            };
            used_state = true;
            out.limits.push(Limit {
                counter: Some(format!("{counter_scope}.{}", state.counter)),
                window: state.window.clone(),
                max,
                scope: Some(Scope::Global),
                increment: state.increment,
                increment_from: state.increment_from.clone(),
                reason: reason.clone(),
            });
        } else {
            out.require.push(Condition { reason: c.reason.clone().or_else(|| reason.clone()), ..c });
        }
    }
    if r.state.is_some() && !used_state {
        problems.push(Problem::new(
            format!("{path}.state"),
            "a counter that no condition tests would never limit anything",
        ));
    }
}

/// Intercept counts after the increment: `lte N` admits N units, `lt N` admits N-1.
fn counter_max(op: Op, value: Option<&Value>) -> Option<u64> {
    let n = value?.as_u64()?;
    match op {
        Op::Lte => Some(n),
        Op::Lt => n.checked_sub(1),
        _ => None,
    }
}

fn parse_rate_limit(spec: &str) -> std::result::Result<(u64, &str), String> {
    let err = || format!("`{spec}` is not a rate limit; write N/second, N/minute, N/hour or N/day");
    let (n, window) = spec.split_once('/').ok_or_else(err)?;
    let n: u64 = n.trim().parse().map_err(|_| err())?;
    let window = window.trim();
    if n == 0 || !matches!(window, "second" | "minute" | "hour" | "day") {
        return Err(err());
    }
    Ok((n, window))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn seed_policy_parses_verbatim() {
        let seed = r#"{"version":"1","default":"deny","tools":{"start-pod":{"limits":[{"counter":"start-pod_rate","window":"minute","max":10,"scope":"grant"}]}}}"#;
        let doc = parse_document(seed).expect("seed parses");
        assert_eq!(doc.default, Some(DefaultAction::Deny));
        let limit = &doc.tools["start-pod"].limits[0];
        assert_eq!(limit.max, 10);
        assert_eq!(limit.window, Window::from("minute"));
        assert_eq!(limit.scope, Some(Scope::Grant));
    }

    #[test]
    fn duplicate_keys_are_refused() {
        for text in [
            r#"{"version":"1","tools":{"a":{},"a":{"action":"deny"}}}"#,
            "version: '1'\ntools:\n  a: {action: deny, action: allow}\n",
            r#"{"version":"1","version":"1"}"#,
        ] {
            let err = parse_document(text).unwrap_err();
            assert!(matches!(err, Error::Syntax(ref m) if m.contains("duplicate")), "{err}");
        }
    }

    #[test]
    fn unknown_fields_name_their_path() {
        let err = parse_document(
            "version: '1'\ntools:\n  start-pod:\n    limits:\n      - {window: minute, max: 1, maxx: 2}\n",
        )
        .unwrap_err();
        let p = &err.problems()[0];
        assert_eq!(p.path, "tools.start-pod.limits[0].maxx");
        assert!(p.message.contains("unknown field `maxx`"), "{p}");
    }

    #[test]
    fn wrong_types_name_their_path() {
        let err = parse_document("version: '1'\ntools:\n  x:\n    action: maybe\n").unwrap_err();
        let p = &err.problems()[0];
        assert_eq!(p.path, "tools.x.action");
        assert!(p.message.contains("allow"), "{p}");
    }

    #[test]
    fn non_mapping_is_refused() {
        assert!(parse_document("[1, 2]").is_err());
        assert!(parse_document("just text").is_err());
        assert!(parse_document("").is_err());
    }

    #[test]
    fn deep_nesting_is_refused_quickly() {
        for text in ["{\"a\":".repeat(200_000), "[".repeat(500_000), "a: {b: ".repeat(100_000)] {
            let start = std::time::Instant::now();
            let err = parse_document(&text).unwrap_err();
            assert!(err.to_string().contains("nested more than 128 levels deep"), "{err}");
            assert!(start.elapsed() < std::time::Duration::from_secs(1), "{:?}", start.elapsed());
        }
        // Brackets in quoted strings and comments are not nesting.
        let quoted = format!(
            "version: '1'\ndescription: \"{0}\"\n# {0}\ntools:\n  a: {{require: [{{path: args.x, op: regex, value: '{0}'}}]}}\n",
            "[{".repeat(200)
        );
        assert!(parse_document(&quoted).is_ok());
        // Real nesting within the limit is fine.
        let nested = format!(
            "version: '1'\ndescription: x\ntools: {{a: {{arguments: {}1{}}}}}\n",
            "[".repeat(60),
            "]".repeat(60)
        );
        assert!(parse_document(&nested).is_ok());
    }

    #[test]
    fn oversized_is_refused() {
        let big = format!("version: '1'\ndescription: '{}'\n", "x".repeat(MAX_DOCUMENT_BYTES));
        assert!(matches!(parse_document(&big), Err(Error::TooLarge { .. })));
    }

    #[test]
    fn intercept_is_converted() {
        let text = include_str!("../../examples/policies/intercept-github.yaml");
        let (doc, fmt) = parse_document_with_format(text).expect("intercept parses");
        assert_eq!(fmt, SourceFormat::Intercept);
        assert_eq!(doc.default, Some(DefaultAction::Allow));
        assert_eq!(doc.tools["create_issue"].limits[0].max, 5);
        assert_eq!(doc.tools["create_issue"].limits[0].scope, Some(Scope::Global));
        let charge = &doc.tools["create_charge"];
        assert_eq!(charge.require[0].reason.as_deref(), Some("too big"));
        assert_eq!(charge.limits[0].max, 999_999);
        assert_eq!(charge.limits[0].increment_from.as_deref(), Some("args.amount"));
        assert_eq!(doc.tools["delete_repository"].action, Some(Action::Deny));
        assert_eq!(doc.tools["delete_repository"].reason.as_deref(), Some("no deletes"));
        assert_eq!(doc.all_tools.as_ref().map(|a| a.limits[0].max), Some(60));
    }

    #[test]
    fn intercept_errors_name_their_path() {
        let text = "version: '1'\ntools:\n  a:\n    rules:\n      - name: r\n        rate_limit: lots\n";
        let err = parse_document(text).unwrap_err();
        assert_eq!(err.problems()[0].path, "tools.a.rules[0].rate_limit");
    }
}
