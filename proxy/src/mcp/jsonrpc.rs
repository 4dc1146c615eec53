//! Reading JSON-RPC messages a client sends, and writing the answers the proxy gives
//! itself. Parsing is strict (duplicate keys anywhere are refused) because the body the
//! policy sees must be the body the upstream acts on.

use serde_json::{Value, json};

/// JSON-RPC error codes toolgate answers with. Documented in docs/proxy.md.
pub mod code {
    /// The body is not JSON (or has duplicate keys).
    pub const PARSE_ERROR: i64 = -32700;
    /// Not a JSON-RPC request.
    pub const INVALID_REQUEST: i64 = -32600;
    /// A `tools/call` without a string `name` or with non-object `arguments`.
    pub const INVALID_PARAMS: i64 = -32602;
    /// Refused by a rule, the default, or because the tool is hidden.
    pub const DENIED: i64 = -32010;
    /// Refused because a limit has no room (`data.retryAfterSeconds` says when to retry).
    pub const RATE_LIMITED: i64 = -32011;
    /// Needs a person's approval, which this proxy cannot obtain (yet).
    pub const APPROVAL_REQUIRED: i64 = -32012;
    /// No valid policy is loaded: everything is refused.
    pub const NO_POLICY: i64 = -32013;
    /// The upstream server could not be reached or failed.
    pub const UPSTREAM: i64 = -32014;
    /// A limited call was refused because the shared counter store (Redis) could not
    /// count it: fail closed (`data.decision` is `store_unavailable`).
    pub const STORE_UNAVAILABLE: i64 = -32015;
}

/// One message of a POST body.
#[derive(Debug)]
pub struct Message {
    /// The parsed message.
    pub value: Value,
}

/// What kind of message it is.
#[derive(Debug, PartialEq)]
pub enum Kind<'a> {
    /// Has `method` and `id`.
    Request { id: &'a Value, method: &'a str },
    /// Has `method`, no `id`.
    Notification { method: &'a str },
    /// Has `id` and `result` or `error` (a client's answer to a server request).
    Response,
    /// Anything else.
    Invalid,
}

impl Message {
    pub fn kind(&self) -> Kind<'_> {
        let Some(obj) = self.value.as_object() else {
            return Kind::Invalid;
        };
        match (obj.get("method"), obj.get("id")) {
            (Some(Value::String(m)), Some(id)) if is_valid_id(id) => Kind::Request { id, method: m },
            (Some(Value::String(m)), None) => Kind::Notification { method: m },
            (None, Some(id)) if is_valid_id(id) && (obj.contains_key("result") || obj.contains_key("error")) => {
                Kind::Response
            }
            _ => Kind::Invalid,
        }
    }

    /// The id, if any (for error answers).
    pub fn id(&self) -> Value {
        self.value.get("id").filter(|v| is_valid_id(v)).cloned().unwrap_or(Value::Null)
    }
}

/// Largest integer id accepted: 2^53 − 1, the largest integer every JSON reader (a
/// JavaScript server's among them) holds exactly.
pub const MAX_SAFE_ID: u64 = (1 << 53) - 1;

/// The one rule for JSON-RPC ids, in every transport: a string, or an integer in
/// ±(2^53 − 1) written as an integer (`1`, not `1.0`, `1e0`, `10E-1` or
/// `1.00000000000000001`). Anything else — a fraction, an exponent, `-0`, a huge
/// number — is refused with `-32600`.
///
/// Why: the proxy matches answers to requests by id, and so does the server, but a
/// JavaScript server compares numeric values (`1.0 === 1`) while text differs. Two ids
/// equal to the server but not to the proxy would let the answer to one request settle
/// (and refund) another. Accepted ids have exactly one spelling ([`id_key`]), so equal
/// ids are equal keys, and a server's answer (written canonically) matches exactly the
/// request it answers.
pub fn is_valid_id(v: &Value) -> bool {
    match v {
        Value::String(_) => true,
        // serde_json keeps integers written without fraction or exponent as i64/u64;
        // everything else (and `-0`) is read as a float.
        Value::Number(n) => {
            n.as_u64().is_some_and(|u| u <= MAX_SAFE_ID) || n.as_i64().is_some_and(|i| i.unsigned_abs() <= MAX_SAFE_ID)
        }
        _ => false,
    }
}

/// The canonical text of a valid id ([`is_valid_id`]): the key answers, refunds, the
/// `tools/list` filter and duplicate checks use. Strings are re-encoded (escapes
/// normalised), integers written without sign of zero or padding.
pub fn id_key(id: &Value) -> String {
    id.to_string()
}

/// A POST body: one message or a batch.
#[derive(Debug)]
pub struct Body {
    pub messages: Vec<Message>,
    pub batch: bool,
}

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("body is not valid JSON: {0}")]
    Parse(String),
    #[error("body must be a JSON-RPC message or a non-empty batch (array) of them")]
    Shape,
}

impl BodyError {
    pub fn code(&self) -> i64 {
        match self {
            BodyError::Parse(_) => code::PARSE_ERROR,
            BodyError::Shape => code::INVALID_REQUEST,
        }
    }
}

/// Most messages accepted in one batch.
pub const MAX_BATCH: usize = 128;

pub fn parse_body(bytes: &[u8]) -> Result<Body, BodyError> {
    let value = toolgate_policy::from_slice_strict(bytes).map_err(|e| BodyError::Parse(e.to_string()))?;
    match value {
        Value::Array(items) if !items.is_empty() && items.len() <= MAX_BATCH => {
            Ok(Body { messages: items.into_iter().map(|value| Message { value }).collect(), batch: true })
        }
        v @ Value::Object(_) => Ok(Body { messages: vec![Message { value: v }], batch: false }),
        _ => Err(BodyError::Shape),
    }
}

/// The parts of a `tools/call` the policy needs.
#[derive(Debug)]
pub struct ToolCall<'a> {
    pub name: &'a str,
    pub arguments: &'a Value,
}

static NULL: Value = Value::Null;

/// Reads `params.name` and `params.arguments` of a `tools/call`.
pub fn tool_call(msg: &Message) -> Result<ToolCall<'_>, String> {
    let params = msg.value.get("params").and_then(Value::as_object).ok_or("tools/call needs `params` (an object)")?;
    let name = params.get("name").and_then(Value::as_str).ok_or("tools/call needs `params.name` (a string)")?;
    let arguments = match params.get("arguments") {
        None | Some(Value::Null) => &NULL,
        Some(a @ Value::Object(_)) => a,
        Some(_) => return Err("`params.arguments` must be an object".into()),
    };
    Ok(ToolCall { name, arguments })
}

/// A JSON-RPC error answer.
pub fn error(id: Value, code: i64, message: impl Into<String>, data: Option<Value>) -> Value {
    let mut err = json!({ "code": code, "message": message.into() });
    if let Some(d) = data {
        err["data"] = d;
    }
    json!({ "jsonrpc": "2.0", "id": id, "error": err })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        let b = parse_body(br#"[{"jsonrpc":"2.0","id":1,"method":"tools/call"},{"jsonrpc":"2.0","method":"notifications/x"},{"jsonrpc":"2.0","id":"a","result":{}},{"id":[1]}]"#)
            .expect("parses");
        assert!(b.batch);
        let kinds: Vec<_> = b.messages.iter().map(|m| format!("{:?}", m.kind())).collect();
        assert!(kinds[0].starts_with("Request"));
        assert!(kinds[1].starts_with("Notification"));
        assert_eq!(kinds[2], "Response");
        assert_eq!(kinds[3], "Invalid");
    }

    #[test]
    fn ids_have_one_spelling() {
        for ok in [r#""a""#, r#""1""#, "0", "1", "-1", "9007199254740991", "-9007199254740991", r#""\u0031""#] {
            let v: Value = serde_json::from_str(ok).expect(ok);
            assert!(is_valid_id(&v), "{ok} must be accepted");
        }
        // `"\u0031"` and `"1"` are one string: one key.
        assert_eq!(id_key(&serde_json::from_str(r#""\u0031""#).expect("json")), r#""1""#);
        for bad in [
            "1.0",
            "1e0",
            "10E-1",
            "1E0",
            "-0",
            "-0.0",
            "0.0",
            "1.00000000000000001",
            "9007199254740992",
            "-9007199254740992",
            "18446744073709551616",
            "null",
            "true",
            "[1]",
            "{}",
        ] {
            let v: Value = serde_json::from_str(bad).expect(bad);
            assert!(!is_valid_id(&v), "{bad} must be refused");
            let msg = Message { value: serde_json::json!({"jsonrpc":"2.0","id": v,"method":"tools/call"}) };
            assert_eq!(msg.kind(), Kind::Invalid, "{bad}");
            assert_eq!(msg.id(), Value::Null, "{bad}: a refusal names no id it cannot match");
        }
    }

    #[test]
    fn bad_bodies() {
        assert!(matches!(parse_body(b"[]"), Err(BodyError::Shape)));
        assert!(matches!(parse_body(b"42"), Err(BodyError::Shape)));
        assert!(matches!(parse_body(b"{"), Err(BodyError::Parse(_))));
        assert!(matches!(
            parse_body(br#"{"method":"tools/call","params":{"name":"a","name":"b"}}"#),
            Err(BodyError::Parse(_))
        ));
        let many = format!("[{}]", vec!["{}"; MAX_BATCH + 1].join(","));
        assert!(matches!(parse_body(many.as_bytes()), Err(BodyError::Shape)));
    }

    #[test]
    fn tool_call_params() {
        let ok =
            parse_body(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"a":1}}}"#)
                .expect("parses");
        let tc = tool_call(&ok.messages[0]).expect("valid");
        assert_eq!(tc.name, "x");
        for bad in [
            r#"{"id":1,"method":"tools/call"}"#,
            r#"{"id":1,"method":"tools/call","params":{"name":5}}"#,
            r#"{"id":1,"method":"tools/call","params":{"name":"x","arguments":[1]}}"#,
        ] {
            let b = parse_body(bad.as_bytes()).expect("parses");
            assert!(tool_call(&b.messages[0]).is_err(), "{bad}");
        }
    }
}
