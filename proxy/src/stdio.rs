//! `--stdio`: the proxy speaks MCP over its own stdin/stdout (a desktop client launches
//! it) and runs the MCP server as one child process. Same checks as over HTTP; the
//! caller is the local user (anonymous identity).

use std::sync::{Arc, Mutex};

use anyhow::Context;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use toolgate_policy::Caller;

use crate::gate::{Checked, Gate, Tracker};
use crate::jsonrpc;

/// Reads one newline-terminated line of at most `max` bytes. Ok(None) at end of input;
/// Err(()) for an over-long line (which is skipped).
pub(crate) async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
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

/// Why calls that need approval are refused over `--stdio`.
pub const NO_HOLD: &str = "calls are not held for approval over --stdio";

pub async fn run(gate: Arc<Gate>, command: &[String], max_body: usize) -> anyhow::Result<()> {
    let mut child = crate::upstream::spawn_server(command).context("cannot start the MCP server")?;
    let mut child_in = child.stdin.take().context("child stdin")?;
    let child_out = child.stdout.take().context("child stdout")?;
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let caller = Caller::default();

    // One writer owns our stdout, so lines never interleave.
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(64);
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(mut line) = out_rx.recv().await {
            line.push(b'\n');
            if stdout.write_all(&line).await.is_err() || stdout.flush().await.is_err() {
                break;
            }
        }
    });

    // Server → client: inspect answers, pass everything on.
    let from_child = {
        let gate = gate.clone();
        let tracker = tracker.clone();
        let caller = caller.clone();
        let out_tx = out_tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(child_out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let replaced = {
                    let mut t = tracker.lock().unwrap_or_else(|p| p.into_inner());
                    gate.inspect_body(line.as_bytes(), &mut t, &caller)
                };
                if out_tx.send(replaced.unwrap_or_else(|| line.into_bytes())).await.is_err() {
                    break;
                }
            }
        })
    };

    // Client → server: check, answer refusals, forward the rest.
    let mut stdin = BufReader::new(tokio::io::stdin());
    loop {
        let line = match read_line(&mut stdin, max_body).await? {
            None => break,
            Some(Err(())) => {
                let e = jsonrpc::error(
                    Value::Null,
                    jsonrpc::code::INVALID_REQUEST,
                    format!("message larger than {max_body} bytes"),
                    None,
                );
                let _ = out_tx.send(serde_json::to_vec(&e).unwrap_or_default()).await;
                continue;
            }
            Some(Ok(l)) if l.iter().all(u8::is_ascii_whitespace) => continue,
            Some(Ok(l)) => l,
        };
        let body = match jsonrpc::parse_body(&line) {
            Ok(b) => b,
            Err(e) => {
                let err = jsonrpc::error(Value::Null, e.code(), e.to_string(), None);
                let _ = out_tx.send(serde_json::to_vec(&err).unwrap_or_default()).await;
                continue;
            }
        };
        let policy = gate.current();
        match gate.check(&body, &caller, &policy, None, None) {
            Checked::Answer(v) => {
                let _ = out_tx.send(serde_json::to_vec(&v).unwrap_or_default()).await;
            }
            // The stdio gate has no approver, so nothing is held; refuse all the same.
            Checked::Hold(h) => {
                let v = gate.refuse_hold(*h, NO_HOLD);
                let _ = out_tx.send(serde_json::to_vec(&v).unwrap_or_default()).await;
            }
            Checked::Forward(t) => {
                tracker.lock().unwrap_or_else(|p| p.into_inner()).absorb(t);
                let mut l = line;
                l.push(b'\n');
                if child_in.write_all(&l).await.is_err() || child_in.flush().await.is_err() {
                    break;
                }
            }
        }
    }
    drop(child_in);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), child.wait()).await;
    let _ = child.start_kill();
    let _ = from_child.await;
    drop(out_tx);
    let _ = writer.await;
    // Calls the child received but never answered may have run: they stay spent.
    std::mem::take(&mut *tracker.lock().unwrap_or_else(|p| p.into_inner())).keep_spent();
    Ok(())
}
