//! Property tests of the parsers that read bytes a caller (or the upstream) chooses: the
//! SSE reader and the `--stdio` line reader, and the input generators the gate's property
//! tests use too (gate/proptests.rs: the JSON-RPC framing and the gate behind it).
//!
//! Inputs are arbitrary bytes and valid MCP messages mutated the way an attacker would
//! try: one field changed (ids such as `1.0`, `-0`, `1e0`; methods; params), keys added,
//! removed or duplicated, truncated, re-encoded (escapes, whitespace, batches), bytes
//! flipped. The properties here: nothing panics; SSE events split as an EventSource
//! splits them; the readers' memory stays bounded past their limits.
//!
//! `make test` runs a fixed seed and 256 cases per property; `PROPTEST_CASES=100000` (and
//! `PROPTEST_RNG_SEED=N` for another sequence) runs longer (docs/testing.md).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use serde_json::{Value, json};

use crate::mcp::sse;

/// The fixed seed of `make test`.
const SEED: u64 = 0x7001_6a7e_0011_0014;

/// `cases` per property and the fixed seed, unless `PROPTEST_CASES` / `PROPTEST_RNG_SEED`
/// say otherwise.
pub(crate) fn config(cases: u32) -> ProptestConfig {
    let mut c = ProptestConfig { failure_persistence: None, ..ProptestConfig::default() };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        c.rng_seed = RngSeed::Fixed(SEED);
    }
    c
}

// ------------------------------------------------------------------ JSON-RPC inputs

pub(crate) fn tool_call(id: Value, tool: &str, args: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}})
}

/// Valid MCP client messages, the starting points of mutations.
fn bases() -> Vec<Value> {
    vec![
        json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18",
            "capabilities": {}, "clientInfo": {"name": "c", "version": "1"}}}),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"cursor": "c1"}}),
        tool_call(json!(2), "start-pod", json!({"podId": "p1", "gpuCount": 2})),
        tool_call(
            json!("call-3"),
            "pod-action",
            json!({"action": "start", "podId": "p2", "env": {"A": "b"}, "ports": [8080, 22]}),
        ),
        json!({"jsonrpc": "2.0", "id": "s-1", "result": {"content": []}}),
        json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 2}}),
        json!({"jsonrpc": "2.0", "id": 4, "method": "ping"}),
        json!([
            tool_call(json!(5), "start-pod", json!({})),
            tool_call(json!(6), "list-pods", json!({"limit": 1})),
            {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}
        ]),
    ]
}

/// JSON texts spliced in verbatim (numbers that serde_json would re-spell, odd values).
const RAW: &[&str] = &[
    "1",
    "1.0",
    "-0",
    "1e0",
    "10E-1",
    "0",
    "-1",
    "9007199254740993",
    "1.00000000000000001",
    "1e400",
    "\"1\"",
    "\"2\"",
    "\"tools/call\"",
    "\"tools/list\"",
    "\"tools\\/call\"",
    "\"start-pod\"",
    "null",
    "true",
    "[]",
    "{}",
    "\"\"",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "[1]",
    "{\"name\":\"start-pod\"}",
    "{\"name\":\"start-pod\",\"arguments\":{}}",
    "{\"name\":\"start-pod\",\"arguments\":[]}",
    "{\"a\":{\"b\":[{}]}}",
];

const KEYS: &[&str] = &["jsonrpc", "id", "method", "params", "name", "arguments", "result", "error", "requestId"];

/// A placeholder string that becomes `RAW[i]` once serialised.
fn raw(i: usize) -> Value {
    Value::String(format!("\u{1}RAW{}\u{1}", i % RAW.len()))
}

fn splice_raw(text: String) -> String {
    let mut t = text;
    for (i, r) in RAW.iter().enumerate() {
        t = t.replace(&format!("\"\\u0001RAW{i}\\u0001\""), r);
    }
    t
}

/// Pointers to every node of `v` (objects and arrays first-class).
fn nodes(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            m.iter().for_each(|(k, x)| nodes(x, format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")), out))
        }
        Value::Array(a) => a.iter().enumerate().for_each(|(i, x)| nodes(x, format!("{at}/{i}"), out)),
        _ => {}
    }
}

/// Applies one mutation `(kind, a, b)`: kinds 0-3 change the value, 4-11 the text.
fn mutate_value(v: &mut Value, (kind, a, b): (u8, u32, u32)) {
    let mut all = Vec::new();
    nodes(v, String::new(), &mut all);
    let pick = |list: &[String]| list[a as usize % list.len()].clone();
    match kind % 12 {
        // One field (or the whole message) replaced.
        0 => {
            let p = pick(&all);
            if let Some(x) = v.pointer_mut(&p) {
                *x = raw(b as usize);
            }
        }
        // A key added or overwritten on some object.
        1 => {
            let objects: Vec<String> = all.into_iter().filter(|p| v.pointer(p).is_some_and(Value::is_object)).collect();
            if !objects.is_empty()
                && let Some(Value::Object(m)) = v.pointer_mut(&pick(&objects))
            {
                m.insert(KEYS[b as usize % KEYS.len()].to_owned(), raw((b / 16) as usize));
            }
        }
        // A key removed.
        2 => {
            let objects: Vec<String> = all.into_iter().filter(|p| v.pointer(p).is_some_and(Value::is_object)).collect();
            if !objects.is_empty()
                && let Some(Value::Object(m)) = v.pointer_mut(&pick(&objects))
                && !m.is_empty()
            {
                let k = m.keys().nth(b as usize % m.len()).cloned().unwrap_or_default();
                m.remove(&k);
            }
        }
        // Batched, or an element duplicated (same id).
        3 => match v {
            Value::Array(items) if !items.is_empty() => {
                let x = items[b as usize % items.len()].clone();
                items.push(x);
            }
            other => *other = Value::Array(vec![other.clone()]),
        },
        _ => {}
    }
}

/// Calls `f` for each byte outside JSON string literals with its index.
fn outside_strings(text: &[u8]) -> Vec<bool> {
    let (mut in_str, mut esc) = (false, false);
    text.iter()
        .map(|&c| {
            let outside = !in_str;
            if in_str {
                if esc {
                    esc = false;
                } else if c == b'\\' {
                    esc = true;
                } else if c == b'"' {
                    in_str = false;
                }
            } else if c == b'"' {
                in_str = true;
            }
            outside && c != b'"'
        })
        .collect()
}

fn mutate_text(t: &mut Vec<u8>, (kind, a, b): (u8, u32, u32)) {
    let (a, b) = (a as usize, b as usize);
    match kind % 12 {
        // Truncated.
        4 => t.truncate(a % (t.len() + 1)),
        // A key inserted at the start of some object: often a duplicate.
        5 => {
            let opens: Vec<usize> = t.iter().enumerate().filter(|(_, c)| **c == b'{').map(|(i, _)| i).collect();
            if !opens.is_empty() {
                let at = opens[a % opens.len()] + 1;
                let ins = format!("\"{}\":{},", KEYS[b % KEYS.len()], RAW[(b / 16) % RAW.len()]);
                t.splice(at..at, ins.into_bytes());
            }
        }
        // Re-encoded: characters of strings as \u escapes (same meaning).
        6 => {
            let out = outside_strings(t);
            let text = String::from_utf8_lossy(t).into_owned();
            let mut n = String::with_capacity(text.len() * 2);
            for (i, c) in text.char_indices() {
                let inside = !out.get(i).copied().unwrap_or(true) && c != '"' && c != '\\';
                let prev_backslash = i > 0 && text.as_bytes()[i - 1] == b'\\';
                if inside && !prev_backslash && c.is_ascii_alphanumeric() && (i + a) % 3 == 0 {
                    n.push_str(&format!("\\u{:04x}", c as u32));
                } else {
                    n.push(c);
                }
            }
            *t = n.into_bytes();
        }
        // Re-encoded: whitespace between tokens (same meaning).
        7 => {
            let out = outside_strings(t);
            let ws = [" ", "\n", "\t", "\r\n", "  \n "][b % 5].as_bytes();
            let mut n = Vec::with_capacity(t.len() * 2);
            for (i, c) in t.iter().enumerate() {
                n.push(*c);
                if out[i] && matches!(c, b',' | b':' | b'[' | b'{') {
                    n.extend_from_slice(ws);
                }
            }
            *t = n;
        }
        // One byte changed, inserted, or the text repeated / prefixed.
        8 if !t.is_empty() => {
            let i = a % t.len();
            t[i] = b as u8;
        }
        9 => {
            let i = a % (t.len() + 1);
            t.insert(i, b as u8);
        }
        10 => {
            let copy = t.clone();
            t.push(b' ');
            t.extend_from_slice(&copy);
        }
        11 => {
            let prefix: &[u8] = [&b"\xef\xbb\xbf"[..], b" \n", b"\x00"][b % 3];
            t.splice(0..0, prefix.iter().copied());
        }
        _ => {}
    }
}

/// A mutated MCP message: the base, value mutations, then text mutations.
pub(crate) fn mutated_message() -> impl Strategy<Value = Vec<u8>> {
    let n = bases().len();
    (0..n, prop::collection::vec((any::<u8>(), any::<u32>(), any::<u32>()), 0..5)).prop_map(|(i, muts)| {
        let mut v = bases().swap_remove(i);
        for m in muts.iter().filter(|m| m.0 % 12 < 4) {
            mutate_value(&mut v, *m);
        }
        let mut t = splice_raw(v.to_string()).into_bytes();
        for m in muts.iter().filter(|m| m.0 % 12 >= 4) {
            mutate_text(&mut t, *m);
        }
        t
    })
}

/// Arbitrary JSON built from the protocol's keys and odd leaves, as text.
pub(crate) fn arbitrary_json() -> impl Strategy<Value = Vec<u8>> {
    let leaf = (0..RAW.len()).prop_map(raw);
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((0..KEYS.len(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (KEYS[k].to_owned(), v)).collect())),
        ]
    })
    .prop_map(|v| splice_raw(v.to_string()).into_bytes())
}

pub(crate) fn any_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => mutated_message(),
        2 => arbitrary_json(),
        1 => prop::collection::vec(any::<u8>(), 0..256),
    ]
}

// ------------------------------------------------------------------ SSE

/// What an EventSource (the WHATWG algorithm) reads from one event: lines end at CRLF,
/// LF or CR; bytes are UTF-8 with replacement; `data` values are joined with LF.
fn reference_fields(event: &[u8]) -> (Option<String>, Option<String>) {
    let text = String::from_utf8_lossy(event);
    let (mut data, mut kind): (Option<String>, Option<String>) = (None, None);
    for line in reference_lines(&text) {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_owned()),
            },
            "event" => kind = Some(value.to_owned()),
            _ => {}
        }
    }
    (data, kind)
}

fn reference_lines(text: &str) -> Vec<&str> {
    let mut lines = Vec::new();
    let b = text.as_bytes();
    let (mut start, mut i) = (0, 0);
    while i < b.len() {
        if b[i] == b'\n' || b[i] == b'\r' {
            lines.push(&text[start..i]);
            i += if b[i] == b'\r' && b.get(i + 1) == Some(&b'\n') { 2 } else { 1 };
            start = i;
        } else {
            i += 1;
        }
    }
    if start < b.len() {
        lines.push(&text[start..]);
    }
    lines
}

/// Event streams: fields an MCP server writes, comments, odd lines, every line ending.
fn sse_stream() -> impl Strategy<Value = Vec<u8>> {
    let line = prop_oneof![
        Just(b"data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"a\"}]}}".to_vec()),
        Just(b"data:{\"jsonrpc\":\"2.0\",\"id\":2,\"error\":{\"code\":-1,\"message\":\"x\"}}".to_vec()),
        Just(b"data".to_vec()),
        Just(b"data:  two spaces".to_vec()),
        Just(b"event: message".to_vec()),
        Just(b"event:endpoint".to_vec()),
        Just(b"id: 7".to_vec()),
        Just(b": keep-alive".to_vec()),
        Just(b"retry: 100".to_vec()),
        Just(b"dat".to_vec()),
        Just(Vec::new()),
        prop::collection::vec(any::<u8>(), 0..12),
    ];
    let ending = prop_oneof![Just(&b"\n"[..]), Just(&b"\r\n"[..]), Just(&b"\r"[..])];
    prop::collection::vec((line, ending), 0..16).prop_map(|lines| {
        let mut out = Vec::new();
        for (l, e) in lines {
            out.extend_from_slice(&l);
            out.extend_from_slice(e);
        }
        out
    })
}

fn chunks<'a>(bytes: &'a [u8], cuts: &[u16]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|c| usize::from(*c) % (bytes.len() + 1)).collect();
    at.push(0);
    at.push(bytes.len());
    at.sort_unstable();
    at.windows(2).map(|w| &bytes[w[0]..w[1]]).collect()
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn sse_events_are_split_as_an_event_source_splits_them(
        stream in sse_stream(),
        cuts in prop::collection::vec(any::<u16>(), 0..8),
    ) {
        let mut whole = sse::Splitter::default();
        let events = whole.push(&stream).unwrap();
        let rest = whole.rest();
        // Nothing lost, nothing added: the events and the rest are the stream.
        let mut joined: Vec<u8> = events.iter().flat_map(|e| e.iter().copied()).collect();
        joined.extend_from_slice(&rest);
        prop_assert_eq!(&joined, &stream);
        // However the stream is cut into chunks, the events are the same.
        let mut chunked = sse::Splitter::default();
        let mut events2 = Vec::new();
        for c in chunks(&stream, &cuts) {
            events2.extend(chunked.push(c).unwrap());
        }
        prop_assert_eq!(&events2, &events);
        prop_assert_eq!(chunked.rest(), rest);
        for ev in &events {
            // Each event ends at its first blank line after a field, where an EventSource
            // dispatches it (blank lines before any field dispatch nothing).
            let text = String::from_utf8_lossy(ev);
            let lines = reference_lines(&text);
            prop_assert!(lines.last().is_some_and(|l| l.is_empty()), "{:?}", text);
            let body = &lines[..lines.len() - 1];
            let first = body.iter().position(|l| !l.is_empty()).unwrap_or(body.len());
            prop_assert!(body[first..].iter().all(|l| !l.is_empty()), "{:?}", text);
            // The proxy reads the fields the client will read.
            let (data, kind) = reference_fields(ev);
            prop_assert_eq!(sse::data(ev), data.clone(), "data of {:?}", text);
            prop_assert_eq!(sse::event_type(ev), kind.clone(), "event of {:?}", text);
            // A rewritten event carries the new data and keeps its type.
            if data.is_some() {
                let new = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}"#;
                let r = sse::replace_data(ev, new);
                prop_assert_eq!(reference_fields(&r), (Some(new.to_owned()), kind));
                prop_assert_eq!(sse::data(&r), Some(new.to_owned()));
            }
        }
    }

    #[test]
    fn sse_reader_memory_is_bounded(stream in prop::collection::vec(any::<u8>(), 0..512)) {
        // Whatever arrives, the splitter keeps at most one event's worth.
        let mut s = sse::Splitter::default();
        for c in stream.chunks(7) {
            let _ = s.push(c);
        }
        prop_assert!(s.rest().len() <= sse::MAX_EVENT_BYTES);
    }
}

// ------------------------------------------------------------------ --stdio lines

/// What `read_line` must return for `input`: each `\n`-terminated line (and a final
/// unterminated one), trailing `\r`s removed, or `Err` when longer than `max`.
fn reference_read(input: &[u8], max: usize) -> Vec<Result<Vec<u8>, ()>> {
    let mut out = Vec::new();
    let mut parts: Vec<&[u8]> = input.split(|b| *b == b'\n').collect();
    if parts.last().is_some_and(|p| p.is_empty()) {
        parts.pop();
    }
    for p in parts {
        if p.len() > max {
            out.push(Err(()));
        } else {
            let mut l = p.to_vec();
            while matches!(l.last(), Some(b'\r')) {
                l.pop();
            }
            out.push(Ok(l));
        }
    }
    out
}

fn read_all(input: &[u8], max: usize, capacity: usize) -> Vec<Result<Vec<u8>, ()>> {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let mut r = tokio::io::BufReader::with_capacity(capacity, input);
        let mut out = Vec::new();
        while let Some(l) = crate::mcp::lines::read_line(&mut r, max).await.unwrap() {
            out.push(l);
        }
        out
    })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn stdio_lines_are_read_whole_or_refused(
        lines in prop::collection::vec(
            prop_oneof![
                mutated_message(),
                prop::collection::vec(prop_oneof![Just(b'x'), Just(b'\r'), Just(b'\n'), any::<u8>()], 0..80),
            ],
            0..8,
        ),
        max in 1usize..120,
        capacity in 1usize..64,
        final_newline in any::<bool>(),
    ) {
        let mut input = lines.join(&b'\n');
        if final_newline {
            input.push(b'\n');
        }
        prop_assert_eq!(read_all(&input, max, capacity), reference_read(&input, max));
    }
}

/// An endless run of `x` (`len` bytes) followed by `tail`, produced as it is read.
struct Long {
    left: usize,
    tail: &'static [u8],
}

impl tokio::io::AsyncRead for Long {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        static XS: [u8; 64 * 1024] = [b'x'; 64 * 1024];
        if self.left > 0 {
            let n = self.left.min(buf.remaining()).min(XS.len());
            buf.put_slice(&XS[..n]);
            self.left -= n;
        } else {
            let n = self.tail.len().min(buf.remaining());
            buf.put_slice(&self.tail[..n]);
            self.tail = &self.tail[n..];
        }
        std::task::Poll::Ready(Ok(()))
    }
}

/// `VmRSS` or `VmHWM` of this process, in KiB.
#[cfg(target_os = "linux")]
fn status_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(target_os = "linux")]
#[test]
fn stdio_line_reader_memory_stays_bounded_past_its_limit() {
    // A 256 MiB line against a 64 KiB limit: refused, skipped, and the next line read,
    // without ever holding the long line (peak RSS of the process grows by far less).
    const LONG: usize = 256 * 1024 * 1024;
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    // Reset the peak to the current RSS (Linux ≥ 4.0).
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
    let before = status_kib("VmRSS:").expect("VmRSS");
    let got = rt.block_on(async {
        let mut r = tokio::io::BufReader::with_capacity(64 * 1024, Long { left: LONG, tail: b"\n{\"ok\":1}\n" });
        let first = crate::mcp::lines::read_line(&mut r, 64 * 1024).await.unwrap();
        let second = crate::mcp::lines::read_line(&mut r, 64 * 1024).await.unwrap();
        let third = crate::mcp::lines::read_line(&mut r, 64 * 1024).await.unwrap();
        (first, second, third)
    });
    assert_eq!(got, (Some(Err(())), Some(Ok(b"{\"ok\":1}".to_vec())), None));
    let grew = status_kib("VmHWM:").expect("VmHWM").saturating_sub(before);
    assert!(grew < 64 * 1024, "reading past the limit held {grew} KiB");
}

// ------------------------------------------------------------------ one-pass JSON-RPC reading

/// JSON text built directly (not through `Value`, which would merge them), so objects
/// repeat keys at every depth, spelled plainly or with escapes (`"\u0069d"` is `"id"`).
fn json_text_with_duplicates() -> impl Strategy<Value = String> {
    const SPELLED: &[&str] = &[
        "jsonrpc",
        "id",
        "method",
        "params",
        "name",
        "arguments",
        "result",
        "error",
        "requestId",
        "_meta",
        "\\u0069d",
        "na\\u006de",
        "\\u0061rguments",
    ];
    let leaf = (0..RAW.len()).prop_map(|i| RAW[i].to_owned());
    let value = leaf.prop_recursive(4, 48, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec((0..SPELLED.len(), inner), 0..5).prop_map(|kv| {
                let fields: Vec<String> = kv.into_iter().map(|(k, v)| format!("\"{}\":{v}", SPELLED[k])).collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    });
    let message = prop::collection::vec((0..SPELLED.len(), value), 0..6).prop_map(|kv| {
        let fields: Vec<String> = kv.into_iter().map(|(k, v)| format!("\"{}\":{v}", SPELLED[k])).collect();
        format!("{{{}}}", fields.join(","))
    });
    prop_oneof![
        3 => message.clone(),
        1 => prop::collection::vec(message, 0..4).prop_map(|m| format!("[{}]", m.join(","))),
    ]
}

/// What a message meant to the gate before the one-pass reader: the body parsed whole by
/// `from_slice_strict`, then each field looked up (the code this replaced, kept as the
/// reference).
mod reference {
    use serde_json::Value;

    use crate::mcp::jsonrpc::{MAX_BATCH, is_valid_id};

    pub(super) type Summary = (String, Value, Option<String>, Result<(String, Value), String>, Option<Value>);

    pub(super) fn parse(bytes: &[u8]) -> Result<Vec<Summary>, &'static str> {
        let value = toolgate_policy::from_slice_strict(bytes).map_err(|_| "parse")?;
        let messages = match value {
            Value::Array(items) if !items.is_empty() && items.len() <= MAX_BATCH => items,
            v @ Value::Object(_) => vec![v],
            _ => return Err("shape"),
        };
        Ok(messages.iter().map(summary).collect())
    }

    fn kind(v: &Value) -> String {
        let Some(obj) = v.as_object() else { return "invalid".into() };
        match (obj.get("method"), obj.get("id")) {
            (Some(Value::String(m)), Some(id)) if is_valid_id(id) => format!("request {id} {m}"),
            (Some(Value::String(m)), None) => format!("notification {m}"),
            (None, Some(id)) if is_valid_id(id) && (obj.contains_key("result") || obj.contains_key("error")) => {
                "response".into()
            }
            _ => "invalid".into(),
        }
    }

    fn summary(v: &Value) -> Summary {
        let id = v.get("id").filter(|v| is_valid_id(v)).cloned().unwrap_or(Value::Null);
        let method = v.get("method").and_then(Value::as_str).map(str::to_owned);
        let call = (|| {
            let params = v.get("params").and_then(Value::as_object).ok_or("tools/call needs `params` (an object)")?;
            let name = params.get("name").and_then(Value::as_str).ok_or("tools/call needs `params.name` (a string)")?;
            let arguments = match params.get("arguments") {
                None | Some(Value::Null) => Value::Null,
                Some(a @ Value::Object(_)) => a.clone(),
                Some(_) => return Err("`params.arguments` must be an object".to_owned()),
            };
            Ok((name.to_owned(), arguments))
        })();
        let request_id = v.get("params").and_then(|p| p.get("requestId")).cloned();
        (kind(v), id, method, call, request_id)
    }
}

/// The same summary of a message read by [`jsonrpc::parse_body`].
fn one_pass(bytes: &[u8]) -> Result<Vec<reference::Summary>, &'static str> {
    use crate::mcp::jsonrpc::{self, BodyError, Kind};
    let body = jsonrpc::parse_body(bytes).map_err(|e| match e {
        BodyError::Parse(_) => "parse",
        BodyError::Shape => "shape",
    })?;
    Ok(body
        .messages
        .iter()
        .map(|m| {
            let kind = match m.kind() {
                Kind::Request { id, key, method } => {
                    // The key computed once is the id's canonical text.
                    assert_eq!(key, id.to_string());
                    format!("request {id} {method}")
                }
                Kind::Notification { method } => format!("notification {method}"),
                Kind::Response => "response".into(),
                Kind::Invalid => "invalid".into(),
            };
            let call = jsonrpc::tool_call(m).map(|c| (c.name.to_owned(), c.arguments.clone()));
            (kind, m.id(), m.method().map(str::to_owned), call, m.request_id().cloned())
        })
        .collect())
}

proptest! {
    #![proptest_config(config(512))]

    /// The one-pass reader accepts exactly the bodies the strict whole-body parse accepted
    /// (duplicate keys at any depth, numbers out of range and trailing data refused) and
    /// reads the same kinds, ids, methods, tool names, arguments and cancelled ids.
    #[test]
    fn one_pass_reading_means_what_the_whole_parse_meant(
        text in prop_oneof![any_body(), json_text_with_duplicates().prop_map(String::into_bytes)],
    ) {
        prop_assert_eq!(one_pass(&text), reference::parse(&text), "{}", String::from_utf8_lossy(&text));
    }

    /// `id_key` writes every valid id as `Value::to_string` does.
    #[test]
    fn id_keys_are_the_canonical_text(
        id in prop_oneof![
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-(crate::mcp::jsonrpc::MAX_SAFE_ID as i64)..=crate::mcp::jsonrpc::MAX_SAFE_ID as i64).prop_map(Value::from),
            any::<String>().prop_map(Value::from),
            "[\"\\\\\\x00-\\x1f\\x7f a-z\u{e9}\u{2028}\u{1f600}]{0,12}".prop_map(Value::from),
        ],
    ) {
        prop_assert_eq!(crate::mcp::jsonrpc::id_key(&id), id.to_string());
    }
}
