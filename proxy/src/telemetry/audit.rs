//! One JSON line per decision on stdout (logs go to stderr). Argument values are never
//! written unless `--audit-arguments` asks for them: only the top-level keys and a hash
//! of the canonical arguments, so identical calls can be correlated without their content.
//! Credentials never appear: the identity is the fingerprint.

use std::io::Write;
use std::sync::Mutex;

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
    // jiff prints a timestamp as RFC 3339 in UTC; `.6` fixes six fraction digits (cheaper
    // than a strftime pattern).
    format!("{:.6}", jiff::Timestamp::now())
}

/// Where audit lines go, chosen when the proxy starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The default: stdout carries audit lines, logs go to stderr.
    Stdout,
    /// `--stdio`: stdout carries the protocol, so audit lines go to stderr.
    Stderr,
}

/// Pending lines are written at once when they reach this size.
const FLUSH_AT: usize = 64 * 1024;

/// The audit sink: lines are appended to a buffer in memory and written to the target in
/// one `write` when a runtime thread runs out of work (`on_thread_park`, see
/// `run::main`), when the buffer reaches 64 KiB, when the proxy stops (after the
/// runtime, on a panic, on drop) — and at once for a line that refuses a call, so every
/// refusal's line is out before its answer. One `write` per burst of calls instead of one
/// per call; a line of an admitted call waits at most until the proxy is next idle, and
/// only a `SIGKILL` (or an abort outside a panic) can lose the lines written since.
#[derive(Debug)]
pub struct AuditSink {
    target: Target,
    pending: Mutex<Vec<u8>>,
}

impl AuditSink {
    pub fn new(target: Target) -> Self {
        Self { target, pending: Mutex::new(Vec::new()) }
    }

    /// Appends `record` as one JSON line; `now`: write it (and what is pending) at once.
    pub fn write(&self, record: &Record<'_>, now: bool) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let start = pending.len();
        if serde_json::to_writer(&mut *pending, record).is_err() {
            pending.truncate(start);
            return;
        }
        pending.push(b'\n');
        if now || pending.len() >= FLUSH_AT {
            self.write_out(&mut pending);
        }
    }

    /// Writes every pending line.
    pub fn flush(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        self.write_out(&mut pending);
    }

    /// Writes the pending lines unless another thread is writing (a panic hook must not
    /// wait for a lock its own thread may hold).
    pub fn try_flush(&self) {
        if let Ok(mut pending) = self.pending.try_lock() {
            self.write_out(&mut pending);
        }
    }

    /// Whether lines are waiting to be written.
    pub fn has_pending(&self) -> bool {
        !self.pending.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// Writes under the buffer's lock, so lines keep their order.
    fn write_out(&self, pending: &mut Vec<u8>) {
        if pending.is_empty() {
            return;
        }
        // A failed write (stdout closed) loses the lines, as the per-line writes did.
        let _ = match self.target {
            Target::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(pending).and_then(|()| out.flush())
            }
            Target::Stderr => std::io::stderr().lock().write_all(pending),
        };
        pending.clear();
        if pending.capacity() > 4 * FLUSH_AT {
            pending.shrink_to(FLUSH_AT);
        }
    }
}

impl Drop for AuditSink {
    fn drop(&mut self) {
        self.flush();
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
