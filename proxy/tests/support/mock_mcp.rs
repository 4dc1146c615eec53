//! A small in-process Streamable-HTTP MCP server (JSON answers only) that records every
//! `tools/call` it receives with the session it came on, and a blocking client for it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::runtime::Runtime;

pub const TOOLS: [&str; 4] = ["echo", "start-pod", "delete-pod", "list-pods"];

#[derive(Default)]
struct State {
    sessions: HashSet<String>,
    /// (session, tool) of every tools/call that reached the server.
    calls: Vec<(String, String)>,
}

pub struct MockMcp {
    pub port: u16,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl MockMcp {
    pub fn start(rt: &Runtime) -> Self {
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let task = rt.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self { port, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }

    pub fn calls(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn called(&self, tool: &str) -> usize {
        self.calls().iter().filter(|(_, t)| t == tool).count()
    }
}

impl Drop for MockMcp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn json_response(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, "application/json".parse().unwrap());
    r
}

async fn handle(state: Arc<Mutex<State>>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    static SESSIONS: AtomicU64 = AtomicU64::new(1);
    if req.method() != Method::POST {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        return Ok(r);
    }
    let session = req.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let Ok(msg) = serde_json::from_slice::<Value>(&body) else {
        return Ok(json_response(StatusCode::BAD_REQUEST, &json!({"error": "not JSON"})));
    };
    let id = msg.get("id").cloned();
    let method = msg["method"].as_str().unwrap_or("");
    let Some(id) = id else {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::ACCEPTED;
        return Ok(r);
    };
    if method == "initialize" {
        let sid = format!("mock-session-{}", SESSIONS.fetch_add(1, Ordering::Relaxed));
        state.lock().unwrap().sessions.insert(sid.clone());
        let mut r = json_response(
            StatusCode::OK,
            &json!({"jsonrpc": "2.0", "id": id, "result": {
                "protocolVersion": msg["params"]["protocolVersion"].as_str().unwrap_or("2025-06-18"),
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "mock-mcp", "version": "0"}}}),
        );
        r.headers_mut().insert("mcp-session-id", sid.parse().unwrap());
        return Ok(r);
    }
    let known = session.as_ref().is_some_and(|s| state.lock().unwrap().sessions.contains(s));
    if !known {
        // The spec's answer to an unknown (e.g. lost) session.
        return Ok(json_response(
            StatusCode::NOT_FOUND,
            &json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32001, "message": "unknown session"}}),
        ));
    }
    let result = match method {
        "tools/list" => {
            json!({"tools": TOOLS.iter().map(|t| json!({"name": t, "inputSchema": {"type": "object"}})).collect::<Vec<_>>()})
        }
        "tools/call" => {
            let tool = msg["params"]["name"].as_str().unwrap_or("").to_owned();
            state.lock().unwrap().calls.push((session.clone().unwrap_or_default(), tool.clone()));
            if tool == "fail-after-work" {
                // A server that acted and then failed: HTTP 500 after the call was recorded.
                return Ok(json_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32603, "message": "crashed after the work"}}),
                ));
            }
            json!({"content": [{"type": "text", "text": format!("called {tool}")}]})
        }
        _ => json!({}),
    };
    Ok(json_response(StatusCode::OK, &json!({"jsonrpc": "2.0", "id": id, "result": result})))
}

/// A blocking MCP client session through the proxy (Streamable HTTP, JSON answers).
pub struct Client {
    port: u16,
    pub session: String,
    token: String,
    next_id: u64,
}

impl Client {
    pub fn initialize(port: u16, token: &str) -> Self {
        let mut c = Self { port, session: String::new(), token: token.to_owned(), next_id: 1 };
        let (status, head, body) = c.post(&json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "0"}}}));
        assert_eq!(status, 200, "initialize: {head} {}", String::from_utf8_lossy(&body));
        c.session = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim().eq_ignore_ascii_case("mcp-session-id").then(|| v.trim().to_owned())
            })
            .expect("a session id");
        let _ = c.post(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        c
    }

    fn post(&self, msg: &Value) -> (u16, String, Vec<u8>) {
        let auth = format!("Bearer {}", self.token);
        let mut headers = vec![
            ("Content-Type", "application/json"),
            ("Accept", "application/json, text/event-stream"),
            ("Authorization", auth.as_str()),
        ];
        if !self.session.is_empty() {
            headers.push(("Mcp-Session-Id", self.session.as_str()));
        }
        crate::support::http(self.port, "POST", "/mcp", &headers, msg.to_string().as_bytes())
    }

    fn request(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let (status, head, body) =
            self.post(&json!({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}));
        assert_eq!(status, 200, "{method}: {head} {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }

    /// The JSON-RPC answer to a tools/call.
    pub fn call(&mut self, tool: &str) -> Value {
        self.request("tools/call", json!({"name": tool, "arguments": {}}))
    }

    pub fn list(&mut self) -> Vec<String> {
        let v = self.request("tools/list", json!({}));
        v["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap().to_owned()).collect()
    }
}

/// The error code of a JSON-RPC answer, if it is an error.
pub fn error_code(answer: &Value) -> Option<i64> {
    answer["error"]["code"].as_i64()
}
