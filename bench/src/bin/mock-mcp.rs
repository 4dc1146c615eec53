//! mock-mcp: a minimal, fast Streamable-HTTP MCP server for benchmarks.
//!
//! ```text
//! mock-mcp [PORT] [--threads N]
//! ```
//!
//! Listens on 127.0.0.1:PORT (0 = any free port), prints `LISTENING <port>` on stdout and
//! serves `/mcp`: `initialize` (gives an `Mcp-Session-Id`), notifications (202),
//! `tools/list` (a few fixed tools), `tools/call` (echoes the arguments back as one text
//! content item), `ping`. Answers are always `application/json` (no SSE). Requests are
//! parsed with borrowed fields and raw values, and answers are written straight into one
//! buffer, so the server costs as little as possible next to what it is measured against.
#![forbid(unsafe_code)]

use std::borrow::Cow;
use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;

/// A minimal, fast Streamable-HTTP MCP server (benchmark upstream).
#[derive(Parser, Debug)]
#[command(name = "mock-mcp", version, about)]
struct Args {
    /// Port on 127.0.0.1 (0 = any free port; the chosen one is printed).
    #[arg(default_value_t = 0)]
    port: u16,
    /// Runtime worker threads (1 = a single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

const MAX_BODY: usize = 1024 * 1024;

/// `tools/list` result (everything after `"result":`).
const TOOLS: &str = r#"{"tools":[{"name":"echo","description":"Echoes its arguments back as text.","inputSchema":{"type":"object","properties":{"message":{"type":"string"},"count":{"type":"integer"}}}},{"name":"start-pod","description":"Pretends to start a pod.","inputSchema":{"type":"object","properties":{"podId":{"type":"string"}},"required":["podId"]}},{"name":"list-pods","description":"Pretends to list pods.","inputSchema":{"type":"object","properties":{}}}]}"#;

#[derive(Deserialize)]
struct Req<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    method: Cow<'a, str>,
    #[serde(borrow, default)]
    params: Option<Params<'a>>,
}

#[derive(Deserialize)]
struct Params<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    arguments: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "protocolVersion")]
    protocol_version: Option<Cow<'a, str>>,
}

static SESSIONS: AtomicU64 = AtomicU64::new(0);

fn response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if status != StatusCode::ACCEPTED {
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    r
}

/// `{"jsonrpc":"2.0","id":<id>,` — the start of every answer.
fn head(buf: &mut Vec<u8>, id: &RawValue) {
    buf.extend_from_slice(br#"{"jsonrpc":"2.0","id":"#);
    buf.extend_from_slice(id.get().as_bytes());
    buf.push(b',');
}

fn rpc_error(id: Option<&RawValue>, code: i64, message: &str) -> Vec<u8> {
    let id = id.map_or("null", RawValue::get);
    let mut buf = Vec::with_capacity(96 + message.len());
    let _ = write!(buf, r#"{{"jsonrpc":"2.0","id":{id},"error":{{"code":{code},"message":"#);
    let _ = serde_json::to_writer(&mut buf, message);
    buf.extend_from_slice(b"}}");
    buf
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() != "/mcp" {
        return Ok(response(StatusCode::NOT_FOUND, rpc_error(None, -32600, "not found: the MCP endpoint is /mcp")));
    }
    match *req.method() {
        Method::POST => {}
        // No server-to-client stream: the spec allows 405 for GET.
        Method::GET => return Ok(response(StatusCode::METHOD_NOT_ALLOWED, Vec::new())),
        Method::DELETE => return Ok(response(StatusCode::OK, Vec::new())),
        _ => return Ok(response(StatusCode::METHOD_NOT_ALLOWED, Vec::new())),
    }
    let has_session = req.headers().contains_key("mcp-session-id");
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return Ok(response(StatusCode::BAD_REQUEST, rpc_error(None, -32600, "body unreadable"))),
    };
    Ok(answer(&body, has_session))
}

fn answer(body: &[u8], has_session: bool) -> Response<Full<Bytes>> {
    let req: Req<'_> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(_) => return response(StatusCode::BAD_REQUEST, rpc_error(None, -32700, "not a JSON-RPC message")),
    };
    let Some(id) = req.id else {
        // Notifications (notifications/initialized, cancellations, …) are accepted.
        return response(StatusCode::ACCEPTED, Vec::new());
    };
    if req.method != "initialize" && !has_session {
        return response(StatusCode::BAD_REQUEST, rpc_error(Some(id), -32600, "missing Mcp-Session-Id"));
    }
    let params = req.params.as_ref();
    let mut buf = Vec::with_capacity(256);
    match &*req.method {
        "initialize" => {
            let version = params.and_then(|p| p.protocol_version.as_deref()).unwrap_or("2025-06-18");
            head(&mut buf, id);
            buf.extend_from_slice(br#""result":{"protocolVersion":"#);
            let _ = serde_json::to_writer(&mut buf, version);
            buf.extend_from_slice(
                br#","capabilities":{"tools":{"listChanged":false}},"serverInfo":{"name":"mock-mcp","version":"0.1.0"}}}"#,
            );
            let n = SESSIONS.fetch_add(1, Ordering::Relaxed);
            let mut r = response(StatusCode::OK, buf);
            if let Ok(v) = HeaderValue::from_str(&format!("mock-{n:016x}")) {
                r.headers_mut().insert("mcp-session-id", v);
            }
            r
        }
        "tools/list" => {
            head(&mut buf, id);
            buf.extend_from_slice(br#""result":"#);
            buf.extend_from_slice(TOOLS.as_bytes());
            buf.push(b'}');
            response(StatusCode::OK, buf)
        }
        "tools/call" => {
            let Some(name) = params.and_then(|p| p.name.as_deref()) else {
                return response(StatusCode::OK, rpc_error(Some(id), -32602, "tools/call needs params.name"));
            };
            if !matches!(name, "echo" | "start-pod" | "list-pods") {
                return response(StatusCode::OK, rpc_error(Some(id), -32602, "unknown tool"));
            }
            let args = params.and_then(|p| p.arguments).map_or("{}", RawValue::get);
            head(&mut buf, id);
            buf.extend_from_slice(br#""result":{"content":[{"type":"text","text":"#);
            // The arguments' JSON text, as a JSON string.
            let _ = serde_json::to_writer(&mut buf, args);
            buf.extend_from_slice(br#"}],"isError":false}}"#);
            response(StatusCode::OK, buf)
        }
        "ping" => {
            head(&mut buf, id);
            buf.extend_from_slice(br#""result":{}}"#);
            response(StatusCode::OK, buf)
        }
        _ => response(StatusCode::OK, rpc_error(Some(id), -32601, "method not found")),
    }
}

async fn serve(port: u16) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    let port = listener.local_addr().context("local address")?.port();
    println!("LISTENING {port}");
    let http = hyper::server::conn::http1::Builder::new();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("mock-mcp: accept failed: {e}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), hyper::service::service_fn(handle));
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads).enable_all().build()
    }
    .context("cannot start the runtime")?;
    runtime.block_on(serve(args.port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(r: Response<Full<Bytes>>) -> serde_json::Value {
        let bytes = futures_body(r);
        serde_json::from_slice(&bytes).expect("JSON answer")
    }

    fn futures_body(r: Response<Full<Bytes>>) -> Bytes {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(r.into_body().collect())
            .map(|c| c.to_bytes())
            .unwrap_or_else(|never| match never {})
    }

    #[test]
    fn echoes_arguments_as_text() {
        let r = answer(
            br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"message":"a \"q\"","count":3}}}"#,
            true,
        );
        assert_eq!(r.status(), StatusCode::OK);
        let v = body_of(r);
        assert_eq!(v["id"], 7);
        assert_eq!(v["result"]["isError"], false);
        let text = v["result"]["content"][0]["text"].as_str().expect("text");
        let args: serde_json::Value = serde_json::from_str(text).expect("arguments JSON");
        assert_eq!(args, serde_json::json!({"message": "a \"q\"", "count": 3}));
    }

    #[test]
    fn initialize_gives_a_session_and_notifications_are_accepted() {
        let r = answer(
            br#"{"jsonrpc":"2.0","id":"i","method":"initialize","params":{"protocolVersion":"2025-03-26"}}"#,
            false,
        );
        assert!(r.headers().contains_key("mcp-session-id"));
        let v = body_of(r);
        assert_eq!(v["result"]["protocolVersion"], "2025-03-26");
        let n = answer(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#, true);
        assert_eq!(n.status(), StatusCode::ACCEPTED);
    }

    #[test]
    fn lists_tools_and_refuses_without_session() {
        let v = body_of(answer(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#, true));
        let names: Vec<&str> =
            v["result"]["tools"].as_array().expect("tools").iter().filter_map(|t| t["name"].as_str()).collect();
        assert_eq!(names, ["echo", "start-pod", "list-pods"]);
        let r = answer(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#, false);
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let bad = body_of(answer(br#"{"jsonrpc":"2.0","id":2,"method":"nope"}"#, true));
        assert_eq!(bad["error"]["code"], -32601);
    }
}
