//! The one canonical form of a call's arguments and its digest, credential fingerprints,
//! and the hex text they (and random ids) are written in. An audit line's `argumentsSha256` and an
//! McpApproval's `argumentsDigest` both come from here, so they correlate.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// `sha256:<hex>` of the arguments' canonical JSON ([`arguments_sha256_hex`]): the audit
/// line's `argumentsSha256`. The same digest as an McpApproval's `argumentsDigest`, so the
/// two correlate.
pub fn arguments_digest(args: &Value) -> String {
    sha256_text(&arguments_hash(args))
}

/// Hex SHA-256 of the arguments' canonical JSON: object keys sorted by their UTF-8 bytes at
/// every level, no whitespace, strings and numbers as `serde_json` writes them; absent
/// arguments are `{}`. The one digest of a call's arguments (audit lines and approvals).
pub fn arguments_sha256_hex(args: &Value) -> String {
    hex(&arguments_hash(args))
}

fn arguments_hash(args: &Value) -> [u8; 32] {
    let mut h = Sha256::new();
    if args.is_null() {
        h.update(b"{}");
    } else {
        canonical(args, &mut h);
    }
    h.finalize().into()
}

#[cfg(test)]
fn fingerprint(credential: &str) -> String {
    fingerprint_bytes(credential.as_bytes())
}

/// `sha256:<hex>` of a credential header value's bytes (UTF-8 or not): the same text as
/// `toolgate_policy::fingerprint_bytes` (the hash of its canonical spelling, so `bearer T`
/// and `Bearer  T` are one caller), without formatting each byte through `fmt` (this runs
/// on every request).
pub fn fingerprint_bytes(credential: &[u8]) -> String {
    sha256_text(&Sha256::digest(toolgate_policy::canonical_credential(credential)))
}

/// The fingerprints of recently seen credentials, so a client that sends the same
/// `Authorization` on every request is hashed once (SHA-256 and hex were ~4.5 k
/// instructions of every call). Keyed by the header's exact bytes, so a hit is the value
/// [`fingerprint_bytes`] would compute; bounded (at most [`Self::ENTRIES`] values of at
/// most [`Self::MAX_KEY`] bytes: longer ones are computed every time), emptied when full.
#[derive(Debug, Default)]
pub struct FingerprintCache(std::sync::Mutex<std::collections::HashMap<Box<[u8]>, std::sync::Arc<str>>>);

impl FingerprintCache {
    pub const ENTRIES: usize = 256;
    pub const MAX_KEY: usize = 512;

    /// [`fingerprint_bytes`] of `credential`.
    pub fn fingerprint(&self, credential: &[u8]) -> String {
        if credential.len() > Self::MAX_KEY {
            return fingerprint_bytes(credential);
        }
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = map.get(credential) {
            return f.to_string();
        }
        let f = fingerprint_bytes(credential);
        if map.len() >= Self::ENTRIES {
            map.clear();
        }
        map.insert(credential.into(), f.as_str().into());
        f
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().map(|m| m.len()).unwrap_or(0)
    }
}

fn sha256_text(digest: &[u8]) -> String {
    let mut s = String::with_capacity(7 + 2 * digest.len());
    s.push_str("sha256:");
    s.push_str(&hex(digest));
    s
}

/// Feeds JSON text straight into the hash (no intermediate strings).
struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn canonical(v: &Value, h: &mut Sha256) {
    match v {
        Value::Object(m) => {
            h.update(b"{");
            // serde_json's map keeps keys in byte order (no `preserve_order`), so this is
            // already the canonical order; sorted here only if a build ever changes that.
            if m.keys().is_sorted() {
                members(m.iter(), h);
            } else {
                let mut sorted: Vec<(&String, &Value)> = m.iter().collect();
                sorted.sort_unstable_by_key(|(k, _)| *k);
                members(sorted.into_iter(), h);
            }
            h.update(b"}");
        }
        Value::Array(a) => {
            h.update(b"[");
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    h.update(b",");
                }
                canonical(x, h);
            }
            h.update(b"]");
        }
        // Scalars as compact JSON (what `Value`'s Display writes).
        other => {
            let _ = serde_json::to_writer(HashWriter(h), other);
        }
    }
}

/// An object's members, in the order given, as `"key":value` separated by commas.
fn members<'a>(entries: impl Iterator<Item = (&'a String, &'a Value)>, h: &mut Sha256) {
    for (i, (k, v)) in entries.enumerate() {
        if i > 0 {
            h.update(b",");
        }
        // The key as a JSON string, exactly as `serde_json::to_string` writes it.
        let _ = serde_json::to_writer(HashWriter(&mut *h), k);
        h.update(b":");
        canonical(v, h);
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 * bytes.len());
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn digest_ignores_key_order_but_not_values() {
        let a = arguments_digest(&json!({"a": 1, "b": [1, {"x": "y", "w": 2}]}));
        let b = arguments_digest(&json!({"b": [1, {"w": 2, "x": "y"}], "a": 1}));
        let c = arguments_digest(&json!({"a": 2, "b": [1, {"x": "y", "w": 2}]}));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn digest_is_the_sha256_of_the_canonical_json() {
        // Pinned: sha256 of the text `{"gpuCount":1,"podId":"p-1"}` (sha256sum), the same
        // value an McpApproval's argumentsDigest carries for these arguments.
        assert_eq!(
            arguments_digest(&json!({"podId": "p-1", "gpuCount": 1})),
            "sha256:cdc4f708fae53b542e3309453399db6248586d6e5af1e2f5568da9bbaf0b16c9"
        );
        let v = json!({"b": [1, {"x": "y\"q", "w": 2.5}], "a": "é\n", "c": null, "d": true, "e": [], "f": {}});
        let text = r#"{"a":"é\n","b":[1,{"w":2.5,"x":"y\"q"}],"c":null,"d":true,"e":[],"f":{}}"#;
        let want: String = Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(arguments_sha256_hex(&v), want);
        assert_eq!(arguments_digest(&Value::Null), arguments_digest(&json!({})), "absent arguments are {{}}");
    }

    #[test]
    fn the_digest_is_of_the_compact_text_serde_json_writes() {
        // Objects keep their keys in byte order (no `preserve_order`), so the compact text
        // serde_json writes is the canonical text, for long arguments too.
        let big: serde_json::Map<String, Value> =
            (0..700).map(|i| (format!("k{i:04}"), json!({"v": i, "s": "x\"y".repeat(i % 7)}))).collect();
        let v = Value::Object(big);
        let text = serde_json::to_string(&v).expect("json");
        assert!(text.len() > 12 * 1024, "{}", text.len());
        assert_eq!(arguments_sha256_hex(&v), hex(&Sha256::digest(text.as_bytes())));
    }

    #[test]
    fn fingerprint_matches_the_policy_crate() {
        for c in [
            "",
            "Bearer bench-token",
            "Basic dXNlcjpwYXNz",
            "é \u{fffd} x",
            "bearer bench-token",
            " BEARER \t bench-token ",
            "sk-Bare",
        ] {
            assert_eq!(fingerprint(c), toolgate_policy::fingerprint(c), "{c:?}");
        }
        for b in [&b"bearer \xff\xfe"[..], b"\x80", b" \tB\xc3 x"] {
            assert_eq!(fingerprint_bytes(b), toolgate_policy::fingerprint_bytes(b), "{b:?}");
        }
        assert_eq!(
            fingerprint("Bearer bench-token"),
            "sha256:2266689a4bad04fcdf44edb46a3b4b6b1a16875737397a49d27c49e1629be133"
        );
    }

    #[test]
    fn every_spelling_of_a_credential_is_one_identity() {
        let canonical = fingerprint("Bearer bench-token");
        for spelling in [
            "bearer bench-token",
            "BEARER bench-token",
            "BeArEr bench-token",
            " Bearer   bench-token ",
            "Bearer\tbench-token",
        ] {
            assert_eq!(fingerprint(spelling), canonical, "{spelling:?}");
        }
        assert_ne!(fingerprint("Bearer BENCH-token"), canonical, "the credential itself is case-sensitive");
    }

    #[test]
    fn cached_fingerprints_are_the_computed_ones_and_bounded() {
        let cache = FingerprintCache::default();
        let spellings = ["Bearer a", "bearer a", "Bearer b", " Bearer   a ", "Bearer A"];
        for _ in 0..2 {
            for s in spellings {
                assert_eq!(cache.fingerprint(s.as_bytes()), fingerprint(s), "{s:?}");
            }
        }
        let long = format!("Bearer {}", "x".repeat(FingerprintCache::MAX_KEY));
        assert_eq!(cache.fingerprint(long.as_bytes()), fingerprint(&long));
        assert_eq!(cache.len(), spellings.len(), "long credentials are not kept");
        for i in 0..FingerprintCache::ENTRIES + 10 {
            let s = format!("Bearer t{i}");
            assert_eq!(cache.fingerprint(s.as_bytes()), fingerprint(&s));
            assert!(cache.len() <= FingerprintCache::ENTRIES);
        }
    }

    #[test]
    fn hex_is_lower_case_two_digits_a_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }
}
