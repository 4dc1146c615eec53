//! The one bounded line reader: newline-delimited JSON-RPC from `--stdio` clients and
//! from child MCP servers. An over-long line is skipped without being buffered.

use tokio::io::{AsyncBufReadExt, AsyncReadExt};

/// Reads one newline-terminated line of at most `max` bytes. Ok(None) at end of input;
/// Err(()) for an over-long line (which is skipped).
pub async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<Option<Result<Vec<u8>, ()>>> {
    let mut buf = Vec::new();
    let n = (&mut *r).take(max as u64 + 1).read_until(b'\n', &mut buf).await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') && buf.len() > max {
        skip_line(r).await?;
        return Ok(Some(Err(())));
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    Ok(Some(Ok(buf)))
}

/// Consumes the rest of a line (through its newline, or to the end of input) without
/// keeping it: an over-long line costs no memory however long it is.
async fn skip_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<()> {
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(());
        }
        if let Some(i) = chunk.iter().position(|b| *b == b'\n') {
            r.consume(i + 1);
            return Ok(());
        }
        let n = chunk.len();
        r.consume(n);
    }
}
