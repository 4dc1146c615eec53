//! One JSON line per decision on stdout (logs go to stderr). Argument values are never
//! written unless `--audit-arguments` asks for them: only the top-level keys and a hash
//! of the canonical arguments, so identical calls can be correlated without their content.
//! Credentials never appear: the identity is the fingerprint.

use std::io::Write;

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

/// Now, in UTC, as RFC 3339 with microseconds (`2026-12-06T21:40:00.123456Z`).
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
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
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let ts = now_rfc3339();
        assert_eq!(ts.len(), "2026-12-06T21:40:00.123456Z".len(), "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T' && ts.as_bytes()[19] == b'.', "{ts}");
        let parsed: jiff::Timestamp = ts.parse().expect("RFC 3339");
        let age = jiff::Timestamp::now().duration_since(parsed);
        assert!(age >= jiff::SignedDuration::ZERO && age < jiff::SignedDuration::from_secs(3600), "{ts}");
    }
}
