//! `--stdio`: the proxy speaks MCP over its own stdin/stdout (a desktop client launches
//! it) and runs the MCP server as one child process. Same checks as over HTTP; the
//! caller is the local user (anonymous identity).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use serde_json::Value;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use toolgate_policy::Caller;

use crate::gate::{Checked, Gate, Tracker};
use crate::mcp::jsonrpc;
use crate::mcp::lines::read_line;
use crate::telemetry::metrics::CallerRefusal;
use crate::transport::sessions::MAX_PENDING;

/// Largest line the child may write (one JSON-RPC message), as in child sessions.
const MAX_CHILD_LINE_BYTES: usize = crate::mcp::sse::MAX_EVENT_BYTES;

/// Why calls that need approval are refused over `--stdio`.
pub const NO_HOLD: &str = "calls are not held for approval over --stdio";

pub async fn run(
    gate: Arc<Gate>,
    command: &crate::transport::client::ChildCommand,
    max_body: usize,
) -> anyhow::Result<()> {
    let mut child = crate::transport::client::spawn_server(command).context("cannot start the MCP server")?;
    let mut child_in = child.stdin.take().context("child stdin")?;
    let child_out = child.stdout.take().context("child stdout")?;
    let state = Arc::new(Mutex::new(State::default()));
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
        let state = state.clone();
        let caller = caller.clone();
        let out_tx = out_tx.clone();
        tokio::spawn(async move {
            // Bounded like every other reader: a child cannot make the proxy buffer an
            // endless line. An over-long line is skipped (an answer in it is lost: its
            // call stays spent).
            let mut out = BufReader::new(child_out);
            loop {
                let line = match read_line(&mut out, MAX_CHILD_LINE_BYTES).await {
                    Ok(Some(Ok(line))) => line,
                    Ok(Some(Err(()))) => {
                        tracing::warn!("ignoring a line over {MAX_CHILD_LINE_BYTES} bytes from the MCP server");
                        continue;
                    }
                    Ok(None) | Err(_) => break,
                };
                let replaced = {
                    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                    st.answered(&line);
                    gate.inspect_body(&line, &mut st.tracker, &caller)
                };
                if out_tx.send(replaced.unwrap_or(line)).await.is_err() {
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
        let refusal = state.lock().unwrap_or_else(|p| p.into_inner()).refuse_waiting(&body);
        if let Some(refusal) = refusal {
            gate.telemetry.metrics.caller_refused(CallerRefusal::DuplicateId);
            let _ = out_tx.send(serde_json::to_vec(&refusal).unwrap_or_default()).await;
            continue;
        }
        let policy = gate.current();
        match gate.check(&body, &caller, &policy, None, None) {
            Checked::Refuse(r) => {
                let _ = out_tx.send(serde_json::to_vec(&r.into_answer()).unwrap_or_default()).await;
            }
            // The stdio gate has no approver, so nothing is held; refuse all the same.
            Checked::Hold(h) => {
                let v = gate.refuse_hold(*h, NO_HOLD).into_answer();
                let _ = out_tx.send(serde_json::to_vec(&v).unwrap_or_default()).await;
            }
            Checked::Forward(t) => {
                {
                    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                    st.tracker.absorb(t);
                    st.forwarded(&body);
                }
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
    std::mem::take(&mut state.lock().unwrap_or_else(|p| p.into_inner()).tracker).keep_spent();
    Ok(())
}

/// What the one session of `--stdio` keeps between lines.
#[derive(Debug, Default)]
struct State {
    /// Forwarded calls and lists whose answers settle quota and are filtered.
    tracker: Tracker,
    /// Ids ([`jsonrpc::id_key`]) of every forwarded request not answered yet.
    waiting: HashSet<String>,
}

impl State {
    /// A request whose id is already waiting for its answer is refused (with the rest of
    /// its body): the child could not tell the two apart, and the answer to one would
    /// settle the other's quota. Also refused: more than [`MAX_PENDING`] waiting at once.
    fn refuse_waiting(&self, body: &jsonrpc::Body) -> Option<Value> {
        let ids: Vec<&Value> = request_ids(body).collect();
        let why = if ids.iter().any(|id| self.waiting.contains(&jsonrpc::id_key(id))) {
            "a request with this id is already waiting for its answer"
        } else if self.waiting.len() + ids.len() > MAX_PENDING {
            "too many requests waiting for their answers"
        } else {
            return None;
        };
        let answers: Vec<Value> = ids
            .iter()
            .map(|id| jsonrpc::error((*id).clone(), jsonrpc::code::INVALID_REQUEST, format!("toolgate: {why}"), None))
            .collect();
        Some(if body.batch { Value::Array(answers) } else { answers.into_iter().next().unwrap_or(Value::Null) })
    }

    fn forwarded(&mut self, body: &jsonrpc::Body) {
        for id in request_ids(body) {
            self.waiting.insert(jsonrpc::id_key(id));
        }
    }

    /// A line from the child: answers (messages without `method`) end their request's wait.
    fn answered(&mut self, line: &[u8]) {
        if self.waiting.is_empty() {
            return;
        }
        let mut done = |m: &Value| {
            if m.get("method").is_none()
                && let Some(id) = m.get("id")
            {
                self.waiting.remove(&jsonrpc::id_key(id));
            }
        };
        match serde_json::from_slice::<Value>(line) {
            Ok(Value::Array(items)) => items.iter().for_each(&mut done),
            Ok(m) => done(&m),
            Err(_) => {}
        }
    }
}

fn request_ids(body: &jsonrpc::Body) -> impl Iterator<Item = &Value> {
    body.messages.iter().filter_map(|m| match m.kind() {
        jsonrpc::Kind::Request { id, .. } => Some(id),
        _ => None,
    })
}
