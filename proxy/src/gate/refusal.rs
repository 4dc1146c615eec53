//! The only place refusals become answers: a JSON-RPC error with `data`, or (if the
//! policy asks) a tool result with `isError: true` and the same `data` in
//! `_meta.toolgate`. The gate and the approval flow both refuse through here.

use serde_json::{Value, json};
use toolgate_policy::{Decision, DecisionKind, DenialStyle};

use crate::mcp::jsonrpc::{self, code};
use crate::telemetry::decision::retry_secs;

/// The answer for a refused call: a JSON-RPC error, or (if the policy asks) a tool
/// result with `isError: true`.
pub fn refusal(id: Value, d: &Decision, no_policy: bool) -> Value {
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
pub fn set_data(answer: &mut Value, key: &str, value: Value) {
    let path = if answer.get("error").is_some() { "/error/data" } else { "/result/_meta/toolgate" };
    if let Some(data) = answer.pointer_mut(path) {
        data[key] = value;
    }
}

/// A refusal as the policy wants it: a JSON-RPC error with `data`, or a tool result with
/// `isError: true` and `data` in `_meta.toolgate`.
pub fn answer(id: Value, denial: DenialStyle, code: i64, message: String, data: Value) -> Value {
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
