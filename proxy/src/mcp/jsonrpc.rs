//! Reading JSON-RPC messages a client sends, and writing the answers the proxy gives
//! itself. Parsing is strict (duplicate keys anywhere are refused) because the body the
//! policy sees must be the body the upstream acts on.

use serde::Deserialize;
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

/// One message of a POST body, read once ([`parse_body`]) into what the gate needs: its
/// id (with its canonical key), method, whether it answers, and its `params` as far as
/// `tools/call` and `notifications/cancelled` read them. Every other field was checked
/// (strict JSON, no duplicate keys) and skipped.
#[derive(Debug, Default)]
pub struct Message {
    /// Whether the message is a JSON object at all (a batch may hold anything).
    object: bool,
    /// `id` as sent, any JSON value.
    id: Option<Value>,
    /// [`id_key`] of `id` when it is a valid id ([`is_valid_id`]).
    key: Option<String>,
    /// `method`: `Some(None)` when present but not a string.
    method: Option<Option<String>>,
    /// Has `result` or `error`.
    answer: bool,
    params: Params,
}

/// `params` of a message.
#[derive(Debug, Default)]
enum Params {
    #[default]
    Absent,
    /// Present, not an object (`null` included).
    Other,
    Object {
        /// `name`, when a string.
        name: Option<String>,
        /// `arguments` as sent, any JSON value.
        arguments: Option<Value>,
        /// `requestId` as sent, any JSON value.
        request_id: Option<Value>,
    },
}

/// What kind of message it is.
#[derive(Debug, PartialEq)]
pub enum Kind<'a> {
    /// Has `method` and a valid `id`; `key` is the id's canonical text ([`id_key`]).
    Request { id: &'a Value, key: &'a str, method: &'a str },
    /// Has `method`, no `id`.
    Notification { method: &'a str },
    /// Has `id` and `result` or `error` (a client's answer to a server request).
    Response,
    /// Anything else.
    Invalid,
}

impl Message {
    pub fn kind(&self) -> Kind<'_> {
        if !self.object {
            return Kind::Invalid;
        }
        match (&self.method, &self.id, &self.key) {
            (Some(Some(method)), Some(id), Some(key)) => Kind::Request { id, key, method },
            (Some(Some(method)), None, _) => Kind::Notification { method },
            (None, Some(_), Some(_)) if self.answer => Kind::Response,
            _ => Kind::Invalid,
        }
    }

    /// The id, if any (for error answers).
    pub fn id(&self) -> Value {
        match (&self.id, &self.key) {
            (Some(id), Some(_)) => id.clone(),
            _ => Value::Null,
        }
    }

    /// `method`, when a string.
    pub fn method(&self) -> Option<&str> {
        self.method.as_ref().and_then(Option::as_deref)
    }

    /// `params.name`, when `params` is an object and `name` a string.
    pub fn tool_name(&self) -> Option<&str> {
        match &self.params {
            Params::Object { name, .. } => name.as_deref(),
            _ => None,
        }
    }

    /// `params.requestId` as sent (`notifications/cancelled`).
    pub fn request_id(&self) -> Option<&Value> {
        match &self.params {
            Params::Object { request_id, .. } => request_id.as_ref(),
            _ => None,
        }
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
/// normalised), integers written without sign of zero or padding: always what
/// `Value::to_string` writes, without its formatting machinery for the common ids.
pub fn id_key(id: &Value) -> String {
    match id {
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => itoa::Buffer::new().format(u).to_owned(),
            (None, Some(i)) => itoa::Buffer::new().format(i).to_owned(),
            _ => id.to_string(),
        },
        // Only `"`, `\\` and control characters are escaped when JSON is written.
        Value::String(s) if !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) => {
            let mut k = String::with_capacity(s.len() + 2);
            k.push('"');
            k.push_str(s);
            k.push('"');
            k
        }
        _ => id.to_string(),
    }
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

/// Reads a POST body in one pass (see [`read`]): strict JSON (duplicate keys at any
/// depth, numbers out of range and trailing data refused, as
/// `toolgate_policy::from_slice_strict` refuses them), then the shape.
pub fn parse_body(bytes: &[u8]) -> Result<Body, BodyError> {
    let parse = |e: serde_json::Error| BodyError::Parse(e.to_string());
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let top = read::Top::deserialize(&mut de).map_err(parse)?;
    de.end().map_err(parse)?;
    match top {
        read::Top::Batch(messages, n) if n > 0 && n <= MAX_BATCH => Ok(Body { messages, batch: true }),
        read::Top::One(m) => Ok(Body { messages: vec![m], batch: false }),
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
    let Params::Object { name, arguments, .. } = &msg.params else {
        return Err("tools/call needs `params` (an object)".into());
    };
    let name = name.as_deref().ok_or("tools/call needs `params.name` (a string)")?;
    let arguments = match arguments {
        None | Some(Value::Null) => &NULL,
        Some(a @ Value::Object(_)) => a,
        Some(_) => return Err("`params.arguments` must be an object".into()),
    };
    Ok(ToolCall { name, arguments })
}

/// The one-pass reader of [`parse_body`]: serde visitors over the body's bytes that keep
/// what [`Message`] holds, build a `Value` only for ids, `arguments` and `requestId`,
/// and check everything else without building it: strings are read (escapes checked),
/// numbers parsed (out-of-range ones refused), and every object's keys compared
/// (borrowed from the body when they have no escapes), so a duplicate key anywhere is
/// refused as `toolgate_policy::from_slice_strict` refuses it.
mod read {
    use std::borrow::Cow;
    use std::collections::HashSet;
    use std::fmt;

    use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
    use toolgate_policy::StrictValue;

    use super::{MAX_BATCH, Message, Params, id_key, is_valid_id};

    /// A body: one message, a batch (messages kept up to [`MAX_BATCH`], and how many
    /// there were), or any other JSON value.
    pub(super) enum Top {
        One(Message),
        Batch(Vec<Message>, usize),
        Other,
    }

    impl<'de> Deserialize<'de> for Top {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(TopVisitor)
        }
    }

    struct TopVisitor;

    impl<'de> Visitor<'de> for TopVisitor {
        type Value = Top;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON-RPC message or a batch")
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Top, A::Error> {
            MessageVisitor.visit_map(map).map(Top::One)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Top, A::Error> {
            let mut out = Vec::new();
            let mut n = 0;
            loop {
                if n < MAX_BATCH {
                    match seq.next_element::<Message>()? {
                        Some(m) => out.push(m),
                        None => break,
                    }
                } else if seq.next_element::<Checked>()?.is_none() {
                    break;
                }
                n += 1;
            }
            Ok(Top::Batch(out, n))
        }
        fn visit_bool<E>(self, _: bool) -> Result<Top, E> {
            Ok(Top::Other)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Top, E> {
            Ok(Top::Other)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Top, E> {
            Ok(Top::Other)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Top, E> {
            finite(v).map(|()| Top::Other)
        }
        fn visit_str<E>(self, _: &str) -> Result<Top, E> {
            Ok(Top::Other)
        }
        fn visit_unit<E>(self) -> Result<Top, E> {
            Ok(Top::Other)
        }
    }

    impl<'de> Deserialize<'de> for Message {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(MessageVisitor)
        }
    }

    /// One message; anything but an object is an invalid message (checked, not kept).
    struct MessageVisitor;

    impl<'de> Visitor<'de> for MessageVisitor {
        type Value = Message;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON-RPC message")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message, A::Error> {
            let mut m = Message { object: true, ..Message::default() };
            // The members the gate reads are remembered by a bit; only other keys are
            // listed (most messages have none).
            let (mut known, mut keys) = (Known::default(), Keys::default());
            while let Some(Key(k)) = map.next_key()? {
                match &*k {
                    "id" => m.id = Some(map.next_value::<StrictValue>()?.0),
                    "method" => m.method = Some(map.next_value::<MaybeString>()?.0),
                    "params" => m.params = map.next_value()?,
                    "result" | "error" => {
                        map.next_value::<Checked>()?;
                        m.answer = true;
                    }
                    _ => {
                        map.next_value::<Checked>()?;
                    }
                }
                match &*k {
                    "id" => known.insert(0, &k)?,
                    "method" => known.insert(1, &k)?,
                    "params" => known.insert(2, &k)?,
                    "result" => known.insert(3, &k)?,
                    "error" => known.insert(4, &k)?,
                    "jsonrpc" => known.insert(5, &k)?,
                    _ => keys.insert(k)?,
                }
            }
            if let Some(id) = &m.id
                && is_valid_id(id)
            {
                m.key = Some(id_key(id));
            }
            Ok(m)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Message, A::Error> {
            CheckedVisitor.visit_seq(seq).map(|_| Message::default())
        }
        fn visit_bool<E>(self, _: bool) -> Result<Message, E> {
            Ok(Message::default())
        }
        fn visit_i64<E>(self, _: i64) -> Result<Message, E> {
            Ok(Message::default())
        }
        fn visit_u64<E>(self, _: u64) -> Result<Message, E> {
            Ok(Message::default())
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Message, E> {
            finite(v).map(|()| Message::default())
        }
        fn visit_str<E>(self, _: &str) -> Result<Message, E> {
            Ok(Message::default())
        }
        fn visit_unit<E>(self) -> Result<Message, E> {
            Ok(Message::default())
        }
    }

    impl<'de> Deserialize<'de> for Params {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(ParamsVisitor)
        }
    }

    struct ParamsVisitor;

    impl<'de> Visitor<'de> for ParamsVisitor {
        type Value = Params;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("params")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Params, A::Error> {
            let (mut name, mut arguments, mut request_id) = (None, None, None);
            let (mut known, mut keys) = (Known::default(), Keys::default());
            while let Some(Key(k)) = map.next_key()? {
                match &*k {
                    "name" => name = map.next_value::<MaybeString>()?.0,
                    "arguments" => arguments = Some(map.next_value::<StrictValue>()?.0),
                    "requestId" => request_id = Some(map.next_value::<StrictValue>()?.0),
                    _ => {
                        map.next_value::<Checked>()?;
                    }
                }
                match &*k {
                    "name" => known.insert(0, &k)?,
                    "arguments" => known.insert(1, &k)?,
                    "requestId" => known.insert(2, &k)?,
                    _ => keys.insert(k)?,
                }
            }
            Ok(Params::Object { name, arguments, request_id })
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Params, A::Error> {
            CheckedVisitor.visit_seq(seq).map(|_| Params::Other)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Params, E> {
            Ok(Params::Other)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Params, E> {
            Ok(Params::Other)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Params, E> {
            Ok(Params::Other)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Params, E> {
            finite(v).map(|()| Params::Other)
        }
        fn visit_str<E>(self, _: &str) -> Result<Params, E> {
            Ok(Params::Other)
        }
        fn visit_unit<E>(self) -> Result<Params, E> {
            Ok(Params::Other)
        }
    }

    /// A string value, or `None` for any other (checked) value.
    struct MaybeString(Option<String>);

    impl<'de> Deserialize<'de> for MaybeString {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(MaybeStringVisitor)
        }
    }

    struct MaybeStringVisitor;

    impl<'de> Visitor<'de> for MaybeStringVisitor {
        type Value = MaybeString;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_str<E>(self, v: &str) -> Result<MaybeString, E> {
            Ok(MaybeString(Some(v.to_owned())))
        }
        fn visit_string<E>(self, v: String) -> Result<MaybeString, E> {
            Ok(MaybeString(Some(v)))
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<MaybeString, A::Error> {
            CheckedVisitor.visit_map(map).map(|_| MaybeString(None))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<MaybeString, A::Error> {
            CheckedVisitor.visit_seq(seq).map(|_| MaybeString(None))
        }
        fn visit_bool<E>(self, _: bool) -> Result<MaybeString, E> {
            Ok(MaybeString(None))
        }
        fn visit_i64<E>(self, _: i64) -> Result<MaybeString, E> {
            Ok(MaybeString(None))
        }
        fn visit_u64<E>(self, _: u64) -> Result<MaybeString, E> {
            Ok(MaybeString(None))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<MaybeString, E> {
            finite(v).map(|()| MaybeString(None))
        }
        fn visit_unit<E>(self) -> Result<MaybeString, E> {
            Ok(MaybeString(None))
        }
    }

    /// Any JSON value, checked as `from_slice_strict` checks it and not kept.
    struct Checked;

    impl<'de> Deserialize<'de> for Checked {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            // `deserialize_any`, not `deserialize_ignored_any`: serde_json's ignoring
            // skips numbers without parsing them (`1e400` would pass).
            d.deserialize_any(CheckedVisitor)
        }
    }

    struct CheckedVisitor;

    impl<'de> Visitor<'de> for CheckedVisitor {
        type Value = Checked;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
            let mut keys = Keys::default();
            while let Some(Key(k)) = map.next_key()? {
                map.next_value::<Checked>()?;
                keys.insert(k)?;
            }
            Ok(Checked)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
            while seq.next_element::<Checked>()?.is_some() {}
            Ok(Checked)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
            Ok(Checked)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
            Ok(Checked)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
            Ok(Checked)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Checked, E> {
            finite(v).map(|()| Checked)
        }
        fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
            Ok(Checked)
        }
        fn visit_unit<E>(self) -> Result<Checked, E> {
            Ok(Checked)
        }
    }

    /// NaN and infinities are refused, as `from_slice_strict` refuses them (JSON text
    /// cannot spell them; serde_json refuses a number out of range itself).
    fn finite<E: de::Error>(v: f64) -> Result<(), E> {
        if v.is_finite() { Ok(()) } else { Err(E::custom("NaN and infinite numbers are not allowed")) }
    }

    /// An object key, borrowed from the body when it has no escapes.
    struct Key<'de>(Cow<'de, str>);

    impl<'de> Deserialize<'de> for Key<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_str(KeyVisitor)
        }
    }

    struct KeyVisitor;

    impl<'de> Visitor<'de> for KeyVisitor {
        type Value = Key<'de>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object key")
        }
        fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
            Ok(Key(Cow::Borrowed(v)))
        }
        fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
            Ok(Key(Cow::Owned(v.to_owned())))
        }
        fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
            Ok(Key(Cow::Owned(v)))
        }
    }

    /// Which of an object's members read by name (bit `n`) were seen; the other keys go
    /// to a [`Keys`].
    #[derive(Default)]
    struct Known(u8);

    impl Known {
        fn insert<E: de::Error>(&mut self, bit: u8, k: &str) -> Result<(), E> {
            if self.0 & (1 << bit) != 0 {
                return Err(duplicate(k));
            }
            self.0 |= 1 << bit;
            Ok(())
        }
    }

    fn duplicate<E: de::Error>(k: &str) -> E {
        E::custom(format_args!("duplicate key {k:?}"))
    }

    /// Keys seen in one object: a short list (most objects), a hash set past
    /// [`Keys::LIST`] (so an object with many keys costs linear time).
    #[derive(Default)]
    struct Keys<'de> {
        list: Vec<Cow<'de, str>>,
        set: Option<HashSet<Cow<'de, str>, foldhash::fast::RandomState>>,
    }

    impl<'de> Keys<'de> {
        const LIST: usize = 16;

        fn insert<E: de::Error>(&mut self, k: Cow<'de, str>) -> Result<(), E> {
            let seen = match &self.set {
                Some(set) => set.contains(&k),
                None => self.list.contains(&k),
            };
            if seen {
                return Err(duplicate(&k));
            }
            match &mut self.set {
                Some(set) => {
                    set.insert(k);
                }
                None if self.list.len() < Self::LIST => self.list.push(k),
                None => {
                    let mut set: HashSet<_, _> = self.list.drain(..).collect();
                    set.insert(k);
                    self.set = Some(set);
                }
            }
            Ok(())
        }
    }
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
            let text = format!(r#"{{"jsonrpc":"2.0","id":{bad},"method":"tools/call"}}"#);
            let body = parse_body(text.as_bytes()).expect("parses");
            let msg = &body.messages[0];
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
