//! One JSON line per decision on stdout (logs go to stderr). Argument values are never
//! written unless `--audit-arguments` asks for them: only the top-level keys and a hash
//! of the canonical arguments, so identical calls can be correlated without their content.
//! Credentials never appear: the identity is the fingerprint.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Record<'a> {
    pub ts: String,
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<&'a str>,
    pub identity: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant: Option<&'a str>,
    pub tool: &'a str,
    pub decision: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<&'a str>,
    pub revision: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
    pub argument_keys: Vec<&'a str>,
    pub arguments_sha256: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<&'a Value>,
    /// For calls held for approval: the McpApproval and where it stands.
    #[serde(flatten)]
    pub approval: Option<Approval<'a>>,
    pub latency_us: u64,
}

/// The approval fields of an audit line.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Approval<'a> {
    /// `metadata.name` of the McpApproval.
    pub approval: &'a str,
    /// `Pending` (the call is held), `Approved`, `Denied`, `Expired`, `Cancelled` or
    /// `Abandoned`.
    pub approval_phase: &'a str,
    /// Who decided, as the apiserver authenticated them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<&'a str>,
    /// The call passed on an earlier approval of an identical call (`reuse_for`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub approval_reused: bool,
}

/// `sha256:<hex>` of the arguments' canonical JSON ([`arguments_sha256_hex`]): the audit
/// line's `argumentsSha256`. The same digest as an McpApproval's `argumentsDigest`, so the
/// two correlate.
pub fn arguments_digest(args: &Value) -> String {
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    s.push_str(&arguments_sha256_hex(args));
    s
}

/// Hex SHA-256 of the arguments' canonical JSON: object keys sorted by their UTF-8 bytes at
/// every level, no whitespace, strings and numbers as `serde_json` writes them; absent
/// arguments are `{}`. The one digest of a call's arguments (audit lines and approvals).
pub fn arguments_sha256_hex(args: &Value) -> String {
    let mut h = Sha256::new();
    if args.is_null() {
        h.update(b"{}");
    } else {
        canonical(args, &mut h);
    }
    let text = sha256_text(&h.finalize());
    text["sha256:".len()..].to_owned()
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

fn sha256_text(digest: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(7 + 2 * digest.len());
    s.push_str("sha256:");
    for b in digest {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
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
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            h.update(b"{");
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    h.update(b",");
                }
                // The key as a JSON string, exactly as `serde_json::to_string` writes it.
                let _ = serde_json::to_writer(HashWriter(h), k);
                h.update(b":");
                canonical(&m[k], h);
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

pub fn argument_keys(args: &Value) -> Vec<&str> {
    args.as_object().map(|m| m.keys().map(String::as_str).collect()).unwrap_or_default()
}

pub fn now_rfc3339() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, dd) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Days since 1970-01-01 → (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

static TO_STDERR: AtomicBool = AtomicBool::new(false);

/// In `--stdio` mode stdout carries the protocol, so audit lines go to stderr.
pub fn to_stderr() {
    TO_STDERR.store(true, Ordering::Relaxed);
}

pub fn write(record: &Record<'_>) {
    if let Ok(mut line) = serde_json::to_vec(record) {
        line.push(b'\n');
        if TO_STDERR.load(Ordering::Relaxed) {
            let _ = std::io::stderr().lock().write_all(&line);
        } else {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&line);
            let _ = out.flush();
        }
    }
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
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_417), (2025, 11, 25));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
