//! One JSON line per decision on stdout (logs go to stderr). Argument values are never
//! written unless `--audit-arguments` asks for them: only the top-level keys and a hash
//! of the canonical arguments, so identical calls can be correlated without their content.
//! Credentials never appear: the identity is the fingerprint.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

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

/// Where audit lines go, chosen when the proxy starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditSink {
    /// The default: stdout carries audit lines, logs go to stderr.
    Stdout,
    /// `--stdio`: stdout carries the protocol, so audit lines go to stderr.
    Stderr,
}

impl AuditSink {
    /// Writes `record` as one JSON line.
    pub fn write(self, record: &Record<'_>) {
        if let Ok(mut line) = serde_json::to_vec(record) {
            line.push(b'\n');
            match self {
                Self::Stderr => {
                    let _ = std::io::stderr().lock().write_all(&line);
                }
                Self::Stdout => {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(&line);
                    let _ = out.flush();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_417), (2025, 11, 25));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
