//! One JSON line per decision on stdout (logs go to stderr). Argument values are never
//! written unless `--audit-arguments` asks for them: only the top-level keys and a hash
//! of the canonical arguments, so identical calls can be correlated without their content.
//! Credentials never appear: the identity is the fingerprint.
//!
//! A line is written by [`Record::write_json`], a small writer made for this one shape:
//! the same bytes `serde_json::to_writer` writes for the [`Record`] (whose `Serialize`
//! stays, as the oracle of the property tests below), without going through serde's
//! map machinery, `core::fmt` or a `Vec` of keys. The timestamp's date and time of day
//! are formatted once per second (per thread) and the microseconds appended.

use std::cell::Cell;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Serialize, Serializer};
use serde_json::Value;
use tokio::sync::Notify;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Record<'a> {
    pub ts: Ts,
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
    pub argument_keys: ArgumentKeys<'a>,
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

/// `argumentKeys`: the top-level keys of the arguments, in their order (none when the
/// arguments are not an object), read from the arguments when written.
#[derive(Clone, Copy, Debug)]
pub struct ArgumentKeys<'a>(pub &'a Value);

impl ArgumentKeys<'_> {
    fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.as_object().into_iter().flat_map(|m| m.keys().map(String::as_str))
    }
}

impl Serialize for ArgumentKeys<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.keys())
    }
}

impl Record<'_> {
    /// Appends the record as one line of JSON, without the newline: byte for byte what
    /// `serde_json::to_writer` writes for it (same fields, order and omissions; strings
    /// escaped as serde_json escapes them: `"`, `\` and control characters, everything
    /// else as UTF-8). Fails only if `arguments` cannot be written (never for a `Value`);
    /// `out` may then hold part of the line.
    pub fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        out.extend_from_slice(b"{\"ts\":\"");
        out.extend_from_slice(self.ts.as_bytes());
        out.extend_from_slice(b"\",\"kind\":");
        json_str(out, self.kind);
        opt_field(out, b",\"pod\":", self.pod);
        opt_field(out, b",\"session\":", self.session);
        out.extend_from_slice(b",\"identity\":");
        json_str(out, self.identity);
        opt_field(out, b",\"grant\":", self.grant);
        out.extend_from_slice(b",\"tool\":");
        json_str(out, self.tool);
        out.extend_from_slice(b",\"decision\":");
        json_str(out, self.decision);
        opt_field(out, b",\"policy\":", self.policy);
        opt_field(out, b",\"rule\":", self.rule);
        out.extend_from_slice(b",\"revision\":");
        json_str(out, self.revision);
        opt_field(out, b",\"reason\":", self.reason);
        if let Some(secs) = self.retry_after_seconds {
            out.extend_from_slice(b",\"retryAfterSeconds\":");
            json_u64(out, secs);
        }
        out.extend_from_slice(b",\"argumentKeys\":[");
        for (i, key) in self.argument_keys.keys().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_str(out, key);
        }
        out.extend_from_slice(b"],\"argumentsSha256\":");
        json_str(out, &self.arguments_sha256);
        if let Some(args) = self.arguments {
            out.extend_from_slice(b",\"arguments\":");
            serde_json::to_writer(&mut *out, args)?;
        }
        if let Some(a) = &self.approval {
            out.extend_from_slice(b",\"approval\":");
            json_str(out, a.approval);
            out.extend_from_slice(b",\"approvalPhase\":");
            json_str(out, a.approval_phase);
            opt_field(out, b",\"decidedBy\":", a.decided_by);
            if a.approval_reused {
                out.extend_from_slice(b",\"approvalReused\":true");
            }
        }
        out.extend_from_slice(b",\"latencyUs\":");
        json_u64(out, self.latency_us);
        out.push(b'}');
        Ok(())
    }
}

/// `name` (`,"field":`) and the string, when there is one.
fn opt_field(out: &mut Vec<u8>, name: &[u8], value: Option<&str>) {
    if let Some(v) = value {
        out.extend_from_slice(name);
        json_str(out, v);
    }
}

/// A decimal number, as serde_json writes a `u64` (with the same `itoa`).
fn json_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// Whether any of the 8 bytes of `w` must be escaped in a JSON string: a control character
/// (< 0x20), `"` or `\`. Exact (no false positives): a byte ≥ 0x20 never borrows, and the
/// high bit is only set for a byte below the bound or equal to the searched one.
fn needs_escape(w: u64) -> bool {
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    (control | has_zero(w ^ (ONES * u64::from(b'"'))) | has_zero(w ^ (ONES * u64::from(b'\\')))) != 0
}

/// `s` as a JSON string: copied as it is when no byte needs an escape (checked 8 bytes at
/// a time), which is the common case; otherwise `"`, `\` and control characters are
/// escaped the way serde_json escapes them (`\"`, `\\`, `\b`, `\t`, `\n`, `\f`, `\r`,
/// else `\u00xx`) and every other byte copied.
fn json_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    out.reserve(b.len() + 2);
    out.push(b'"');
    if is_plain(b) {
        out.extend_from_slice(b);
    } else {
        escaped(out, b);
    }
    out.push(b'"');
}

/// Whether no byte of `b` needs an escape.
fn is_plain(b: &[u8]) -> bool {
    let word = |w: &[u8]| {
        let mut word = [0u8; 8];
        word.copy_from_slice(w);
        u64::from_le_bytes(word)
    };
    if b.len() < 8 {
        // Padded with a byte that needs no escape.
        let mut w = [b'a'; 8];
        w[..b.len()].copy_from_slice(b);
        return !needs_escape(u64::from_le_bytes(w));
    }
    // Whole words, then the last 8 bytes (overlapping the last whole word).
    let mut flagged = b.chunks_exact(8).any(|w| needs_escape(word(w)));
    flagged |= needs_escape(word(&b[b.len() - 8..]));
    !flagged
}

/// `b` with its escapes, byte by byte.
#[cold]
fn escaped(out: &mut Vec<u8>, b: &[u8]) {
    let mut copied = 0;
    for i in 0..b.len() {
        escape_at(out, b, &mut copied, i);
    }
    out.extend_from_slice(&b[copied..]);
}

/// Escapes `b[i]` if it must be, after copying what precedes it since `copied`.
fn escape_at(out: &mut Vec<u8>, b: &[u8], copied: &mut usize, i: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let c = b[i];
    let short = match c {
        b'"' => b'"',
        b'\\' => b'\\',
        0x08 => b'b',
        0x09 => b't',
        0x0a => b'n',
        0x0c => b'f',
        0x0d => b'r',
        0x00..=0x1f => b'u',
        _ => return,
    };
    out.extend_from_slice(&b[*copied..i]);
    *copied = i + 1;
    out.extend_from_slice(&[b'\\', short]);
    if short == b'u' {
        out.extend_from_slice(&[b'0', b'0', HEX[usize::from(c >> 4)], HEX[usize::from(c & 0xf)]]);
    }
}

/// An audit line's `ts`: an instant in UTC as RFC 3339 with six fraction digits
/// (`2026-12-06T21:40:00.123456Z`), exactly as jiff writes it with `{:.6}` (the fraction
/// truncated, not rounded), held without the heap.
#[derive(Clone, Copy)]
pub struct Ts {
    text: [u8; Ts::MAX],
    len: u8,
}

thread_local! {
    /// The second last formatted on this thread and its `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: Cell<(i64, [u8; 19])> = const { Cell::new((-1, [0; 19])) };
}

impl Ts {
    /// The longest text: jiff's years run from -9999 to 9999 (`-009999-…`, 30 bytes).
    const MAX: usize = 32;

    /// Now.
    pub fn now() -> Self {
        Self::of(jiff::Timestamp::now())
    }

    /// `t`, formatted. From 1970 on, the date and time of day are taken from the
    /// thread's last second when it is the same second (formatted by jiff otherwise), and
    /// the microseconds appended; before 1970 (where jiff's fraction counts backwards) jiff
    /// formats all of it.
    pub fn of(t: jiff::Timestamp) -> Self {
        let (second, nanos) = (t.as_second(), t.subsec_nanosecond());
        if second >= 0 && nanos >= 0 {
            let (cached, prefix) = SECOND.with(Cell::get);
            if cached == second {
                let mut text = [0u8; Self::MAX];
                text[..19].copy_from_slice(&prefix);
                text[19] = b'.';
                let mut micros = nanos / 1000;
                for d in text[20..26].iter_mut().rev() {
                    *d = b'0' + (micros % 10) as u8;
                    micros /= 10;
                }
                text[26] = b'Z';
                return Self { text, len: 27 };
            }
            let full = Self::formatted(t);
            let b = full.as_bytes();
            if b.len() == 27 && b[19] == b'.' && b[26] == b'Z' {
                let mut prefix = [0u8; 19];
                prefix.copy_from_slice(&b[..19]);
                SECOND.with(|c| c.set((second, prefix)));
            }
            return full;
        }
        Self::formatted(t)
    }

    /// jiff's own text of `t`.
    fn formatted(t: jiff::Timestamp) -> Self {
        let mut text = [0u8; Self::MAX];
        let mut w = &mut text[..];
        // Cannot fail: jiff's longest text fits (and `write!` into a slice fails only when full).
        let _ = write!(w, "{t:.6}");
        let len = Self::MAX - w.len();
        Self { text, len: len as u8 }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.text[..usize::from(self.len)]
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

impl std::fmt::Display for Ts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for Ts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for Ts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
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

/// Pending lines of admitted calls are written at most this long after the first of them.
pub const FLUSH_AFTER: Duration = Duration::from_millis(50);

/// The audit sink: lines are appended to a buffer in memory and written to the target in
/// one `write` [`FLUSH_AFTER`] (50 ms) after the first pending line ([`Self::flush_after`],
/// a task of the runtime), when the buffer reaches 64 KiB, when the proxy stops (after the
/// runtime, on a panic, on drop) — and at once for a line that refuses a call, so every
/// refusal's line is out before its answer. One `write` per 50 ms of calls instead of one
/// per call (or per idle moment: at one session that was every call); a line of an admitted
/// call waits at most 50 ms, and only a `SIGKILL` (or an abort outside a panic) can lose
/// the lines written since.
#[derive(Debug)]
pub struct AuditSink {
    target: Target,
    pending: Mutex<Vec<u8>>,
    /// Signalled when a line is appended to an empty buffer.
    wake: Notify,
}

impl AuditSink {
    pub fn new(target: Target) -> Self {
        Self { target, pending: Mutex::new(Vec::new()), wake: Notify::new() }
    }

    /// Writes the pending lines [`FLUSH_AFTER`] after the first of them was appended, for
    /// as long as the proxy runs (spawned on its runtime).
    pub async fn flush_after(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            tokio::time::sleep(FLUSH_AFTER).await;
            self.flush();
        }
    }

    /// Appends `record` as one JSON line; `now`: write it (and what is pending) at once.
    pub fn write(&self, record: &Record<'_>, now: bool) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let start = pending.len();
        if record.write_json(&mut pending).is_err() {
            pending.truncate(start);
            return;
        }
        pending.push(b'\n');
        if now || pending.len() >= FLUSH_AT {
            self.write_out(&mut pending);
        } else if start == 0 {
            // The first pending line: the flusher writes it (and what follows) soon.
            self.wake.notify_one();
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
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::mcp::proptests::config;

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let ts = Ts::now().to_string();
        assert_eq!(ts.len(), "2026-12-06T21:40:00.123456Z".len(), "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T' && ts.as_bytes()[19] == b'.', "{ts}");
        let parsed: jiff::Timestamp = ts.parse().expect("RFC 3339");
        let age = jiff::Timestamp::now().duration_since(parsed);
        assert!(age >= jiff::SignedDuration::ZERO && age < jiff::SignedDuration::from_secs(3600), "{ts}");
    }

    fn jiff_text(t: jiff::Timestamp) -> String {
        format!("{t:.6}")
    }

    /// Around second, minute, day, month, year and leap-day boundaries, each instant twice
    /// in a row (the second time from the cached second), forwards and backwards.
    #[test]
    fn cached_seconds_write_what_jiff_writes() {
        let seconds: &[i64] = &[
            0,
            59,
            60,
            86_399,
            86_400,
            951_782_399,   // 2000-02-28T23:59:59
            951_868_800,   // 2000-03-01
            1_709_164_799, // 2024-02-28T23:59:59
            1_709_251_199, // 2024-02-29T23:59:59
            1_735_689_599, // 2024-12-31T23:59:59
            1_735_689_600, // 2025-01-01
            1_796_593_600,
            4_102_444_799,   // 2099-12-31T23:59:59
            253_402_207_199, // jiff's last whole second but one (9999-12-30T21:59:59)
        ];
        let nanos = [0, 1, 999, 1_000, 1_001, 123_456_789, 500_000_000, 999_999_000, 999_999_999];
        let mut instants = Vec::new();
        for &s in seconds {
            for &n in &nanos {
                instants.push(jiff::Timestamp::new(s, n).unwrap());
            }
            // The next second's first instant right after this second's last.
            instants.push(jiff::Timestamp::new(s, 999_999_999).unwrap());
            if let Ok(t) = jiff::Timestamp::new(s + 1, 0) {
                instants.push(t);
            }
        }
        let backwards: Vec<_> = instants.iter().rev().copied().collect();
        for t in instants.iter().chain(&backwards) {
            for _ in 0..2 {
                assert_eq!(Ts::of(*t).as_str(), jiff_text(*t));
            }
        }
        // Before 1970 jiff formats all of it (its fraction counts the other way).
        for t in [jiff::Timestamp::new(-1, -1).unwrap(), jiff::Timestamp::new(0, -500).unwrap(), jiff::Timestamp::MIN] {
            assert_eq!(Ts::of(t).as_str(), jiff_text(t));
        }
        assert_eq!(Ts::of(jiff::Timestamp::MAX).as_str(), jiff_text(jiff::Timestamp::MAX));
    }

    proptest! {
        #![proptest_config(config(512))]

        #[test]
        fn any_instant_is_written_as_jiff_writes_it(
            second in jiff::Timestamp::MIN.as_second()..=jiff::Timestamp::MAX.as_second(),
            nanos in 0..1_000_000_000i32,
            later in prop::collection::vec(0..1_000_000_000i32, 0..4),
        ) {
            let t = jiff::Timestamp::new(second, nanos).unwrap_or(jiff::Timestamp::MAX);
            prop_assert_eq!(Ts::of(t).to_string(), jiff_text(t));
            // Later instants of the same second come from the cache.
            for n in later {
                let t = jiff::Timestamp::new(second, n).unwrap_or(jiff::Timestamp::MAX);
                prop_assert_eq!(Ts::of(t).to_string(), jiff_text(t));
            }
        }
    }

    fn must_escape(b: u8) -> bool {
        b < 0x20 || b == b'"' || b == b'\\'
    }

    /// Every byte value at every position of a word, among fillers next to each bound.
    #[test]
    fn the_word_test_finds_exactly_the_bytes_to_escape() {
        for filler in [b'a', b' ', b'!', b'#', b'[', b']', 0x7f, 0x80, 0xa2, 0xdc, 0xff] {
            for at in 0..8 {
                for c in 0..=255u8 {
                    let mut w = [filler; 8];
                    w[at] = c;
                    assert_eq!(needs_escape(u64::from_le_bytes(w)), must_escape(c), "{w:?}");
                }
            }
        }
    }

    /// Each character JSON escapes, at every position of strings up to three words long
    /// (the full words and the padded last bytes), alone and next to non-ASCII.
    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        for len in 0..=24 {
            for at in 0..len {
                for c in
                    ['"', '\\', '\0', '\u{8}', '\t', '\n', '\u{b}', '\u{c}', '\r', '\u{1f}', '\u{7f}', 'é', '\u{2028}']
                {
                    let mut s: String = "x".repeat(len);
                    s.replace_range(at..=at, c.encode_utf8(&mut [0; 4]));
                    let mut out = Vec::new();
                    json_str(&mut out, &s);
                    assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&s).unwrap(), "{s:?}");
                }
            }
        }
    }

    const KINDS: &[&str] = &["decision", "odd \"kind\"\n"];
    const DECISIONS: &[&str] = &["allow", "deny", "would_deny", "approval", "a\\b\u{1}"];

    /// Strings rich in what JSON escapes (quotes, backslashes, every control character),
    /// what it must not (DEL, U+2028, U+2029, other non-ASCII), and arbitrary text.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[\"\\\\\u{0}-\u{1f}\u{7f}\u{80}\u{2028}\u{2029}\u{fffd}a-z0-9 /:.é😀]{0,40}",
            any::<String>(),
            Just("sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".to_owned()),
        ]
    }

    fn arguments() -> impl Strategy<Value = Value> {
        prop_oneof![
            prop::collection::vec((text(), text()), 0..5)
                .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k, Value::String(v))).collect())),
            Just(Value::Null),
            Just(json!([1, "two", {"three": 3}])),
            text().prop_map(Value::String),
            any::<i64>().prop_map(Value::from),
        ]
    }

    #[derive(Debug)]
    struct Fields {
        ts: (i64, i32),
        kind: usize,
        decision: usize,
        strings: Vec<String>,
        present: Vec<bool>,
        retry: Option<u64>,
        latency: u64,
        arguments: Value,
        write_arguments: bool,
        approval: Option<(bool, bool)>,
    }

    fn fields() -> impl Strategy<Value = Fields> {
        (
            (0..jiff::Timestamp::MAX.as_second(), 0..1_000_000_000i32),
            0..KINDS.len(),
            0..DECISIONS.len(),
            prop::collection::vec(text(), 13),
            prop::collection::vec(any::<bool>(), 8),
            prop::option::of(any::<u64>()),
            any::<u64>(),
            arguments(),
            any::<bool>(),
            prop::option::of((any::<bool>(), any::<bool>())),
        )
            .prop_map(
                |(ts, kind, decision, strings, present, retry, latency, arguments, write_arguments, approval)| Fields {
                    ts,
                    kind,
                    decision,
                    strings,
                    present,
                    retry,
                    latency,
                    arguments,
                    write_arguments,
                    approval,
                },
            )
    }

    fn record(f: &Fields) -> Record<'_> {
        let s = |i: usize| f.strings[i].as_str();
        let opt = |i: usize| f.present[i].then(|| s(i));
        Record {
            ts: Ts::of(jiff::Timestamp::new(f.ts.0, f.ts.1).unwrap()),
            kind: KINDS[f.kind],
            pod: opt(0),
            session: opt(1),
            identity: s(2),
            grant: opt(3),
            tool: s(4),
            decision: DECISIONS[f.decision],
            policy: opt(5),
            rule: opt(6),
            revision: s(7),
            reason: opt(7).map(|_| s(8)),
            retry_after_seconds: f.retry,
            argument_keys: ArgumentKeys(&f.arguments),
            arguments_sha256: f.strings[9].clone(),
            arguments: f.write_arguments.then_some(&f.arguments),
            approval: f.approval.map(|(decided, reused)| Approval {
                approval: s(10),
                approval_phase: s(11),
                decided_by: decided.then(|| s(12)),
                approval_reused: reused,
            }),
            latency_us: f.latency,
        }
    }

    proptest! {
        #![proptest_config(config(1024))]

        /// The hand-written line is serde_json's line for the same record: the same bytes,
        /// hence the same JSON value, one line.
        #[test]
        fn the_line_is_serde_jsons_line(f in fields()) {
            let r = record(&f);
            let mut line = Vec::new();
            r.write_json(&mut line).unwrap();
            let oracle = serde_json::to_vec(&r).unwrap();
            prop_assert_eq!(String::from_utf8_lossy(&line), String::from_utf8_lossy(&oracle));
            let value: Value = serde_json::from_slice(&line).unwrap();
            prop_assert_eq!(&value, &serde_json::to_value(&r).unwrap());
            prop_assert!(!line.contains(&b'\n'));
            prop_assert_eq!(value["argumentKeys"].as_array().map_or(0, Vec::len), f.arguments.as_object().map_or(0, |m| m.len()));
        }
    }

    #[test]
    fn a_line_names_every_field_as_before() {
        let args = json!({"podId": "p-\"1\"", "gpu": 2});
        let r = Record {
            ts: Ts::of(jiff::Timestamp::new(1_796_593_600, 123_456_789).unwrap()),
            kind: "decision",
            pod: Some("pod-0"),
            session: None,
            identity: "sha256:ab",
            grant: Some("team\u{2028}a"),
            tool: "start-pod",
            decision: "approval",
            policy: Some("p"),
            rule: Some("tools.start-pod"),
            revision: "r1",
            reason: Some("line\nbreak\t\u{1f}"),
            retry_after_seconds: Some(3),
            argument_keys: ArgumentKeys(&args),
            arguments_sha256: "sha256:cd".into(),
            arguments: None,
            approval: Some(Approval {
                approval: "a-1",
                approval_phase: "Pending",
                decided_by: None,
                approval_reused: true,
            }),
            latency_us: 42,
        };
        let mut line = Vec::new();
        r.write_json(&mut line).unwrap();
        assert_eq!(
            String::from_utf8(line).unwrap(),
            "{\"ts\":\"2026-12-06T21:46:40.123456Z\",\"kind\":\"decision\",\"pod\":\"pod-0\",\"identity\":\"sha256:ab\",\
             \"grant\":\"team\u{2028}a\",\"tool\":\"start-pod\",\"decision\":\"approval\",\"policy\":\"p\",\
             \"rule\":\"tools.start-pod\",\"revision\":\"r1\",\"reason\":\"line\\nbreak\\t\\u001f\",\
             \"retryAfterSeconds\":3,\"argumentKeys\":[\"gpu\",\"podId\"],\"argumentsSha256\":\"sha256:cd\",\
             \"approval\":\"a-1\",\"approvalPhase\":\"Pending\",\"approvalReused\":true,\"latencyUs\":42}"
        );
    }
}
