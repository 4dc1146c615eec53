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

/// The `data` of an event (data lines joined with `\n`), or None if it has none.
pub fn data(event: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(event).ok()?;
    let mut out: Option<String> = None;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let value = if line == "data" {
            ""
        } else if let Some(v) = line.strip_prefix("data:") {
            v.strip_prefix(' ').unwrap_or(v)
        } else {
            continue;
        };
        match &mut out {
            Some(s) => {
                s.push('\n');
                s.push_str(value);
            }
            None => out = Some(value.to_owned()),
        }
    }
    out
}

/// The `event` field of an event (its type), or None if it has none (type `message`).
pub fn event_type(event: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(event).ok()?;
    let mut out = None;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if let Some(v) = line.strip_prefix("event:") {
            // The last `event` line wins, as in a browser's EventSource.
            out = Some(v.strip_prefix(' ').unwrap_or(v).to_owned());
        }
    }
    out
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

/// The event with its data replaced by `new_data` (other fields kept in order).
pub fn replace_data(event: &[u8], new_data: &str) -> Bytes {
    let text = String::from_utf8_lossy(event);
    let mut out = String::with_capacity(new_data.len() + 64);
    let mut wrote = false;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        if line == "data" || line.starts_with("data:") {
            if !wrote {
                for d in new_data.split('\n') {
                    out.push_str("data: ");
                    out.push_str(d);
                    out.push('\n');
                }
                wrote = true;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
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
    fn oversized_event_is_an_error() {
        let mut s = Splitter::default();
        assert!(s.push(&vec![b'x'; MAX_EVENT_BYTES + 1]).is_err());
    }
}
