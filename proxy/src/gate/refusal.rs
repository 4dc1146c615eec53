//! The only place refusals become answers: a JSON-RPC error with `data`, or (if the
//! policy asks) a tool result with `isError: true` and the same `data` in
//! `_meta.toolgate`. The gate and the approval flow both refuse through here.

use hyper::StatusCode;
use serde_json::{Value, json};
use toolgate_policy::{Decision, DecisionKind, DenialStyle};

use crate::mcp::jsonrpc::{self, code};
use crate::telemetry::decision::retry_secs;

/// Why the proxy answers a request itself instead of forwarding it. Each deny reason is
/// one variant; [`Refusal::into_answer`] and [`Refusal::http_status`] are the one mapping
/// to what the client receives.
#[derive(Debug)]
pub enum Refusal {
    /// Not a request the proxy can check: JSON-RPC `code` (-32600 or -32602).
    Invalid { id: Value, code: i64, message: String },
    /// Refused by the policy (deny, hidden, a full limit, the shared counter store unable
    /// to count a limited call, approval required, or no policy loaded); `approval`: the
    /// McpApproval a person approved before the policy in force
    /// refused the call.
    Policy { id: Value, decision: Box<Decision>, no_policy: bool, approval: Option<String> },
    /// Refused while waiting for a person, or by one.
    Approval(Box<ApprovalRefusal>),
    /// A request of a batch in which another element was refused (none is forwarded).
    Sibling { id: Value },
    /// A batch with a refused element: one answer per request.
    Batch(Vec<Refusal>),
}

/// A held call that is not forwarded, and why.
#[derive(Debug)]
pub struct ApprovalRefusal {
    pub id: Value,
    pub denial: DenialStyle,
    /// JSON-RPC code: `-32012` (approval required, expired, cancelled…) or `-32010` (denied).
    pub code: i64,
    /// The message's prefix: `approval required`, `denied`, `approval expired`…
    pub kind: &'static str,
    /// `data.decision`: `approval` or `deny`.
    pub decision: &'static str,
    pub policy: Option<String>,
    pub rule: Option<String>,
    pub reason: String,
    /// The McpApproval, once there is one.
    pub name: Option<String>,
    pub decided_by: Option<String>,
}

impl Refusal {
    /// A request that is not valid as it is (`code` -32600 or -32602).
    pub fn invalid(id: Value, code: i64, message: impl Into<String>) -> Self {
        Self::Invalid { id, code, message: message.into() }
    }

    /// The HTTP status of a body answered with this refusal: 400 for a lone request that is
    /// not valid JSON-RPC (-32600); every other refusal is a JSON-RPC answer with 200.
    pub fn http_status(&self) -> StatusCode {
        match self {
            Self::Invalid { code: code::INVALID_REQUEST, .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::OK,
        }
    }

    /// The JSON-RPC answer: an error with `data`, or (if the policy asks) a tool result
    /// with `isError: true` and the same `data` in `_meta.toolgate`.
    pub fn into_answer(self) -> Value {
        match self {
            Self::Invalid { id, code, message } => jsonrpc::error(id, code, message, None),
            Self::Policy { id, decision, no_policy, approval } => {
                let mut answer = policy_refusal(id, &decision, no_policy);
                if let Some(name) = approval {
                    set_data(&mut answer, "approval", json!(name));
                }
                answer
            }
            Self::Approval(a) => {
                let ApprovalRefusal { id, denial, code, kind, decision, policy, rule, reason, name, decided_by } = *a;
                let message = format!("toolgate: {kind}: {reason}");
                let mut data = json!({
                    "decision": decision,
                    "policy": policy,
                    "rule": rule,
                    "reason": reason,
                });
                if let Some(n) = name {
                    data["approval"] = json!(n);
                }
                let mut answer = answer(id, denial, code, message, data);
                if let Some(by) = decided_by {
                    set_data(&mut answer, "decidedBy", json!(by));
                }
                answer
            }
            Self::Sibling { id } => jsonrpc::error(
                id,
                code::DENIED,
                "batch refused: another element of this batch was refused, so none was forwarded",
                None,
            ),
            Self::Batch(all) => Value::Array(all.into_iter().map(Refusal::into_answer).collect()),
        }
    }
}

/// The answer for a call refused by a policy decision.
fn policy_refusal(id: Value, d: &Decision, no_policy: bool) -> Value {
    let reason = d.reason.clone().unwrap_or_else(|| "refused by policy".into());
    let mut data = json!({
        "decision": d.kind.as_str(),
        "policy": d.policy.as_deref(),
        "rule": d.rule.as_deref(),
        "reason": reason,
    });
    if let Some(r) = d.retry_after {
        data["retryAfterSeconds"] = json!(retry_secs(r));
    }
    let (code, kind) = match d.kind {
        DecisionKind::RateLimited => (code::RATE_LIMITED, "rate limited"),
        DecisionKind::StoreUnavailable => (code::STORE_UNAVAILABLE, "counter store unavailable"),
        DecisionKind::Approval => (code::APPROVAL_REQUIRED, "approval required"),
        _ if no_policy => (code::NO_POLICY, "no policy loaded"),
        _ => (code::DENIED, "denied"),
    };
    let message = if d.kind == DecisionKind::Approval {
        data["reason"] = json!(format!("approval required: {reason}"));
        format!("toolgate: approval required: {reason}")
    } else {
        format!("toolgate: {kind}: {reason}")
    };
    answer(id, d.denial, code, message, data)
}

/// Adds `key` to the `data` of a refusal made by [`answer`].
fn set_data(answer: &mut Value, key: &str, value: Value) {
    let path = if answer.get("error").is_some() { "/error/data" } else { "/result/_meta/toolgate" };
    if let Some(data) = answer.pointer_mut(path) {
        data[key] = value;
    }
}

/// A refusal as the policy wants it: a JSON-RPC error with `data`, or a tool result with
/// `isError: true` and `data` in `_meta.toolgate`.
fn answer(id: Value, denial: DenialStyle, code: i64, message: String, data: Value) -> Value {
    match denial {
        DenialStyle::Error => jsonrpc::error(id, code, message, Some(data)),
        DenialStyle::ToolResult => json!({
            "jsonrpc": "2.0",
            "id": id,
            "result": {
                "content": [{ "type": "text", "text": message }],
                "isError": true,
                "_meta": { "toolgate": data },
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_lone_invalid_request_is_http_400() {
        assert_eq!(Refusal::invalid(json!(1), code::INVALID_REQUEST, "x").http_status(), StatusCode::BAD_REQUEST);
        assert_eq!(Refusal::invalid(json!(1), code::INVALID_PARAMS, "x").http_status(), StatusCode::OK);
        let batch = Refusal::Batch(vec![Refusal::invalid(json!(1), code::INVALID_REQUEST, "x")]);
        assert_eq!(batch.http_status(), StatusCode::OK);
        assert_eq!(Refusal::Sibling { id: json!(2) }.http_status(), StatusCode::OK);
    }

    #[test]
    fn a_limited_call_the_store_cannot_count_is_refused_with_its_own_code() {
        let mut d = Decision::deny_without_policy("the shared counter store did not answer");
        d.kind = DecisionKind::StoreUnavailable;
        let r = Refusal::Policy { id: json!(3), decision: Box::new(d), no_policy: false, approval: None };
        assert_eq!(r.http_status(), StatusCode::OK);
        let a = r.into_answer();
        assert_eq!(a["id"], 3);
        assert_eq!(a["error"]["code"], code::STORE_UNAVAILABLE);
        assert_eq!(
            a["error"]["message"],
            "toolgate: counter store unavailable: the shared counter store did not answer"
        );
        assert_eq!(a["error"]["data"]["decision"], "store_unavailable");
    }

    #[test]
    fn an_approval_refusal_names_the_approval_and_who_decided() {
        let r = Refusal::Approval(Box::new(ApprovalRefusal {
            id: json!(7),
            denial: DenialStyle::Error,
            code: code::DENIED,
            kind: "denied",
            decision: "deny",
            policy: Some("p".into()),
            rule: Some("tools.x".into()),
            reason: "McpApproval a-1 was denied by alice".into(),
            name: Some("a-1".into()),
            decided_by: Some("alice".into()),
        }));
        let a = r.into_answer();
        assert_eq!(a["id"], 7);
        assert_eq!(a["error"]["code"], code::DENIED);
        assert_eq!(a["error"]["message"], "toolgate: denied: McpApproval a-1 was denied by alice");
        let data = &a["error"]["data"];
        assert_eq!((data["decision"].as_str(), data["rule"].as_str()), (Some("deny"), Some("tools.x")));
        assert_eq!((data["approval"].as_str(), data["decidedBy"].as_str()), (Some("a-1"), Some("alice")));
    }
}
