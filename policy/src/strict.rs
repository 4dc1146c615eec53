//! A JSON value that refuses duplicate keys in any object, at any depth.
//!
//! `serde_json::Value` keeps the last of duplicate keys, and other parsers (an MCP
//! server's, a reviewer's eyes) may keep the first: a policy or a tool call whose
//! meaning depends on the parser is refused instead.

use serde::Deserialize;
use serde_json::Value;

/// Parses JSON text, refusing duplicate object keys, NaN and infinities.
pub fn from_slice_strict(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let StrictValue(v) = StrictValue::deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

/// A deserialized value with no duplicate keys; works with any serde format.
#[derive(Debug)]
pub struct StrictValue(pub Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML or JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Value, E> {
        Ok(v.into())
    }
    // The YAML reader hands out integers beyond 64 bits as 128-bit ones; read them as
    // JSON text would be read (a float), so both formats mean the same.
    fn visit_i128<E: serde::de::Error>(self, v: i128) -> std::result::Result<Value, E> {
        match i64::try_from(v) {
            Ok(i) => Ok(i.into()),
            Err(_) => self.visit_f64(v as f64),
        }
    }
    fn visit_u128<E: serde::de::Error>(self, v: u128) -> std::result::Result<Value, E> {
        match u64::try_from(v) {
            Ok(u) => Ok(u.into()),
            Err(_) => self.visit_f64(v as f64),
        }
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("NaN and infinite numbers are not allowed"))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> std::result::Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        StrictValue::deserialize(d).map(|v| v.0)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let StrictValue(v) = map.next_value()?;
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!("duplicate key {key:?}")));
            }
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_anywhere_are_refused() {
        assert!(from_slice_strict(br#"{"a":1,"a":2}"#).is_err());
        assert!(from_slice_strict(br#"{"params":{"name":"x","name":"y"}}"#).is_err());
        assert!(from_slice_strict(br#"[{"a":{"b":1,"b":1}}]"#).is_err());
        assert_eq!(from_slice_strict(br#"{"a":[1,{"b":null}]}"#).ok(), Some(serde_json::json!({"a":[1,{"b":null}]})));
        assert!(from_slice_strict(br#"{"a":1} trailing"#).is_err());
    }

    #[test]
    fn huge_integers_read_alike_in_yaml_and_json() {
        let yaml: StrictValue =
            serde_norway::from_str("a: 99999999999999999999\nb: -99999999999999999999\n").expect("YAML");
        let json = from_slice_strict(br#"{"a":99999999999999999999,"b":-99999999999999999999}"#).expect("JSON");
        assert_eq!(yaml.0, json);
        assert_eq!(json["a"].as_f64(), Some(1e20));
    }
}
