//! Incremental Server-Sent Events splitting, so responses inside an SSE stream can be
//! inspected (and tools/list results filtered) while every other event passes through
//! byte for byte.

use bytes::{Bytes, BytesMut};

/// Largest single event accepted from the upstream.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, Default)]
pub struct Splitter {
    buf: BytesMut,
}

#[derive(Debug, thiserror::Error)]
#[error("an SSE event from the upstream exceeds {MAX_EVENT_BYTES} bytes")]
pub struct TooLarge;

impl Splitter {
    /// Feeds bytes; returns the complete events (each with its terminating blank line).
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Bytes>, TooLarge> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(end) = event_end(&self.buf) {
            out.push(self.buf.split_to(end).freeze());
        }
        if self.buf.len() > MAX_EVENT_BYTES {
            return Err(TooLarge);
        }
        Ok(out)
    }

    /// Whatever is left when the stream ends (an unterminated event).
    pub fn rest(&mut self) -> Bytes {
        self.buf.split().freeze()
    }
}

/// Index just past the first blank line (`\n\n`, `\r\n\r\n`, `\r\r`).
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < buf.len() {
        let c = buf[i];
        if c == b'\n' || c == b'\r' {
            // end of a line; is the next line empty?
            let after = if c == b'\r' && buf.get(i + 1) == Some(&b'\n') { i + 2 } else { i + 1 };
            match buf.get(after) {
                Some(b'\n') => return Some(after + 1),
                Some(b'\r') => {
                    return if buf.get(after + 1) == Some(&b'\n') {
                        Some(after + 2)
                    } else if after + 1 < buf.len() {
                        Some(after + 1)
                    } else {
                        None // might be \r\n split across chunks
                    };
                }
                _ => i = after,
            }
        } else {
            i += 1;
        }
    }
    None
}

/// The lines of an event as an EventSource reads them: each ends at CRLF, LF or CR.
fn lines(event: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = event;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let Some(i) = rest.iter().position(|b| *b == b'\n' || *b == b'\r') else {
            return Some(std::mem::take(&mut rest));
        };
        let line = &rest[..i];
        let skip = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') { 2 } else { 1 };
        rest = &rest[i + skip..];
        Some(line)
    })
}

/// The value of `line` if its field is `name` (`name`, `name:value`, `name: value`).
fn field<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    if line == name {
        return Some(&[]);
    }
    let v = line.strip_prefix(name)?.strip_prefix(b":")?;
    Some(v.strip_prefix(b" ").unwrap_or(v))
}

/// The `data` of an event (data lines joined with `\n`), or None if it has none. Read as
/// the client's EventSource reads it: any line ending, UTF-8 with replacement characters.
pub fn data(event: &[u8]) -> Option<String> {
    let mut out: Option<Vec<u8>> = None;
    for value in lines(event).filter_map(|l| field(l, b"data")) {
        match &mut out {
            Some(s) => {
                s.push(b'\n');
                s.extend_from_slice(value);
            }
            None => out = Some(value.to_vec()),
        }
    }
    out.map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// The `event` field of an event (its type), or None if it has none (type `message`).
pub fn event_type(event: &[u8]) -> Option<String> {
    // The last `event` line wins, as in a browser's EventSource.
    lines(event).filter_map(|l| field(l, b"event")).last().map(|v| String::from_utf8_lossy(v).into_owned())
}

/// An SSE `message` event carrying `data` (one line: JSON has no raw newlines).
pub fn message_event(data: &str) -> Bytes {
    let mut out = String::with_capacity(data.len() + 24);
    out.push_str("event: message\n");
    for d in data.split('\n') {
        out.push_str("data: ");
        out.push_str(d);
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

/// The event with its data replaced by `new_data` (other fields kept in order, byte for
/// byte; lines end with `\n`).
pub fn replace_data(event: &[u8], new_data: &str) -> Bytes {
    let mut out = Vec::with_capacity(event.len() + new_data.len() + 16);
    let mut wrote = false;
    for line in lines(event) {
        if line.is_empty() {
            continue;
        }
        if field(line, b"data").is_some() {
            if !wrote {
                for d in new_data.split('\n') {
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(d.as_bytes());
                    out.push(b'\n');
                }
                wrote = true;
            }
            continue;
        }
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.push(b'\n');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_across_chunks_and_line_endings() {
        let mut s = Splitter::default();
        let mut events = Vec::new();
        for chunk in ["event: message\ndata: {\"a\"", ":1}\n", "\nid: 2\r\n", "data: x\r\n\r\n", "data: y\n\n"] {
            events.extend(s.push(chunk.as_bytes()).expect("small"));
        }
        assert_eq!(events.len(), 3);
        assert_eq!(data(&events[0]).as_deref(), Some("{\"a\":1}"));
        assert_eq!(data(&events[1]).as_deref(), Some("x"));
        assert_eq!(&events[2][..], b"data: y\n\n");
        assert!(s.rest().is_empty());
    }

    #[test]
    fn multi_line_data_and_replace() {
        let ev = b"id: 7\nevent: message\ndata: line1\ndata: line2\n\n";
        assert_eq!(data(ev).as_deref(), Some("line1\nline2"));
        let r = replace_data(ev, "{}");
        assert_eq!(&r[..], b"id: 7\nevent: message\ndata: {}\n\n");
    }

    #[test]
    fn event_types() {
        assert_eq!(event_type(b"event: endpoint\ndata: /m\n\n").as_deref(), Some("endpoint"));
        assert_eq!(event_type(b"event:message\r\ndata: {}\r\n\r\n").as_deref(), Some("message"));
        assert_eq!(event_type(b"data: {}\n\n"), None);
        assert_eq!(&message_event("{}")[..], b"event: message\ndata: {}\n\n");
    }

    #[test]
    fn fields_are_read_as_an_event_source_reads_them() {
        // CR alone ends a line too: the client sees `event: message` and this data.
        let ev = b"event: message\rdata: {\"a\":1}\rdata:2\r\r";
        assert_eq!(data(ev).as_deref(), Some("{\"a\":1}\n2"));
        assert_eq!(event_type(ev).as_deref(), Some("message"));
        assert_eq!(data(b"data: x\r\r\n").as_deref(), Some("x"));
        assert_eq!(&replace_data(b"id: 1\rdata: old\r\r", "{}")[..], b"id: 1\ndata: {}\n\n");
        // Bytes that are not UTF-8 become replacement characters, as in the client.
        assert_eq!(data(b"data: {\"a\":\"\xff\"}\n\n").as_deref(), Some("{\"a\":\"\u{fffd}\"}"));
        assert_eq!(event_type(b"event: m\xffx\n\n").as_deref(), Some("m\u{fffd}x"));
        // `database: x` is not a data line.
        assert_eq!(data(b"database: x\n\n"), None);
    }

    #[test]
    fn oversized_event_is_an_error() {
        let mut s = Splitter::default();
        assert!(s.push(&vec![b'x'; MAX_EVENT_BYTES + 1]).is_err());
    }
}
