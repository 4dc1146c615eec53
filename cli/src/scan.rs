//! `toolgate scan`: read a live MCP server's `tools/list` (every page) and write a policy
//! scaffold: each tool with its description and parameters as comments, a suggested
//! class, and a conservative rule per class.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(60);
const MAX_PAGES: usize = 100;

/// Where the server is.
#[derive(Debug)]
pub enum Target {
    /// A Streamable-HTTP endpoint, with extra headers (e.g. Authorization).
    Url { url: String, headers: Vec<(String, String)> },
    /// A command speaking MCP over stdio.
    Command(Vec<String>),
}

/// What the server said about itself and its tools.
#[derive(Debug)]
pub struct Scan {
    pub server: String,
    pub tools: Vec<Value>,
}

trait Session {
    fn request(&mut self, id: u64, method: &str, params: Value) -> anyhow::Result<Value>;
    fn notify(&mut self, method: &str) -> anyhow::Result<()>;
}

pub fn scan(target: &Target) -> anyhow::Result<Scan> {
    let mut session: Box<dyn Session> = match target {
        Target::Url { url, headers } => Box::new(HttpSession { url: url.clone(), headers: headers.clone(), sid: None }),
        Target::Command(cmd) => Box::new(StdioSession::start(cmd)?),
    };
    let init = session.request(
        1,
        "initialize",
        json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "toolgate-scan", "version": env!("CARGO_PKG_VERSION")}}),
    )?;
    let info = &init["serverInfo"];
    let server = format!("{} {}", info["name"].as_str().unwrap_or("?"), info["version"].as_str().unwrap_or("?"));
    session.notify("notifications/initialized")?;
    let mut tools = Vec::new();
    let mut cursor: Option<String> = None;
    for page in 0..MAX_PAGES {
        let params = match &cursor {
            Some(c) => json!({"cursor": c}),
            None => json!({}),
        };
        let result = session.request(2 + page as u64, "tools/list", params)?;
        tools.extend(result["tools"].as_array().cloned().unwrap_or_default());
        cursor = result["nextCursor"].as_str().map(str::to_owned);
        if cursor.is_none() {
            return Ok(Scan { server, tools });
        }
    }
    bail!("tools/list returned more than {MAX_PAGES} pages")
}

fn answer(msg: Value, id: u64) -> anyhow::Result<Option<Value>> {
    if msg.get("id").and_then(Value::as_u64) != Some(id) || msg.get("method").is_some() {
        return Ok(None);
    }
    if let Some(e) = msg.get("error") {
        bail!("the server answered with an error: {e}");
    }
    Ok(Some(msg["result"].clone()))
}

struct HttpSession {
    url: String,
    headers: Vec<(String, String)>,
    sid: Option<String>,
}

impl HttpSession {
    fn post(&mut self, body: &Value) -> anyhow::Result<(u16, String, String)> {
        let agent: ureq::Agent =
            ureq::Agent::config_builder().timeout_global(Some(TIMEOUT)).http_status_as_error(false).build().into();
        let mut req = agent
            .post(&self.url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream");
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        if let Some(s) = &self.sid {
            req = req.header("mcp-session-id", s.as_str());
        }
        let mut resp = req.send(body.to_string()).with_context(|| format!("cannot reach {}", self.url))?;
        if let Some(s) = resp.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()) {
            self.sid = Some(s.to_owned());
        }
        let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().context("cannot read the answer")?;
        Ok((status, ct, text))
    }
}

impl Session for HttpSession {
    fn request(&mut self, id: u64, method: &str, params: Value) -> anyhow::Result<Value> {
        let (status, ct, text) = self.post(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))?;
        if !(200..300).contains(&status) {
            bail!("{method}: HTTP {status}: {}", text.chars().take(300).collect::<String>());
        }
        let messages: Vec<Value> = if ct.starts_with("text/event-stream") {
            text.split("\n\n")
                .filter_map(|ev| {
                    let data: Vec<&str> = ev
                        .lines()
                        .filter_map(|l| l.strip_prefix("data:"))
                        .map(|d| d.strip_prefix(' ').unwrap_or(d))
                        .collect();
                    serde_json::from_str(&data.join("\n")).ok()
                })
                .collect()
        } else {
            vec![serde_json::from_str(&text).with_context(|| format!("{method}: the answer is not JSON"))?]
        };
        for m in messages {
            if let Some(r) = answer(m, id)? {
                return Ok(r);
            }
        }
        bail!("{method}: no answer with id {id}")
    }

    fn notify(&mut self, method: &str) -> anyhow::Result<()> {
        self.post(&json!({"jsonrpc": "2.0", "method": method})).map(|_| ())
    }
}

struct StdioSession {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl StdioSession {
    fn start(cmd: &[String]) -> anyhow::Result<Self> {
        let (prog, args) = cmd.split_first().context("no command after --")?;
        let mut child = Command::new(prog)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {prog}"))?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self { child, stdin, lines })
    }

    fn send(&mut self, msg: &Value) -> anyhow::Result<()> {
        writeln!(self.stdin, "{msg}").context("the server's stdin is closed")?;
        self.stdin.flush().context("the server's stdin is closed")
    }
}

impl Session for StdioSession {
    fn request(&mut self, id: u64, method: &str, params: Value) -> anyhow::Result<Value> {
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))?;
        loop {
            let line = self
                .lines
                .recv_timeout(TIMEOUT)
                .map_err(|_| anyhow::anyhow!("{method}: no answer (server exited or timed out)"))?;
            let Ok(msg) = serde_json::from_str::<Value>(&line) else { continue };
            if let Some(r) = answer(msg, id)? {
                return Ok(r);
            }
        }
    }

    fn notify(&mut self, method: &str) -> anyhow::Result<()> {
        self.send(&json!({"jsonrpc": "2.0", "method": method}))
    }
}

impl Drop for StdioSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tool's suggested class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Read,
    Write,
    Execute,
    Destructive,
}

/// Guesses the class from the tool name's words (then its description).
pub fn classify(name: &str, description: &str) -> Class {
    let words: Vec<String> = name
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_ascii_lowercase())
        .collect();
    let has = |set: &[&str]| words.iter().any(|w| set.contains(&w.as_str()));
    if has(&["delete", "remove", "destroy", "terminate", "purge", "revoke", "drop", "wipe", "erase", "uninstall"]) {
        Class::Destructive
    } else if has(&[
        "start", "stop", "restart", "run", "runsync", "exec", "execute", "action", "deploy", "cancel", "retry",
        "invoke", "trigger",
    ]) {
        Class::Execute
    } else if has(&[
        "create", "update", "set", "put", "add", "patch", "edit", "write", "upload", "save", "report", "ask",
    ]) {
        Class::Write
    } else if has(&[
        "list", "get", "read", "describe", "search", "find", "stream", "health", "status", "fetch", "query", "show",
    ]) {
        Class::Read
    } else if description.to_ascii_lowercase().contains("delete") {
        Class::Destructive
    } else {
        // Unknown verbs are treated as writes: limited, not free.
        Class::Write
    }
}

fn comment_lines(out: &mut String, text: &str, max_lines: usize) {
    for (n, line) in text.lines().map(str::trim).filter(|l| !l.is_empty()).enumerate() {
        if n == max_lines {
            out.push_str("  #   …\n");
            break;
        }
        let line: String = line.chars().take(110).collect();
        out.push_str(&format!("  #   {line}\n"));
    }
}

fn parameters(schema: &Value) -> String {
    let required: Vec<&str> =
        schema["required"].as_array().map(|r| r.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    let Some(props) = schema["properties"].as_object() else { return "none".into() };
    if props.is_empty() {
        return "none".into();
    }
    props
        .iter()
        .map(|(k, v)| {
            let ty = v["type"].as_str().unwrap_or(if v.get("$ref").is_some() { "object" } else { "any" });
            let req = if required.contains(&k.as_str()) { ", required" } else { "" };
            format!("{k} ({ty}{req})")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The scaffold YAML.
pub fn scaffold(scan: &Scan, source: &str) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "# toolgate policy scaffold, written by `toolgate scan` from {source}\n# server: {}, {} tools.\n",
        scan.server,
        scan.tools.len()
    ));
    out.push_str(
        "# Classes are guesses from the tool names: review every rule before enforcing it.\n\
         #   read        allowed, 120 calls a minute per grant (shared counter `reads`)\n\
         #   write       10 a minute per grant (shared counter `writes`)\n\
         #   execute     10 a minute per grant (shared counter `executes`)\n\
         #   destructive held for a person's approval\n\
         # Tools the server adds later are refused (default: deny) until a rule names them.\n",
    );
    out.push_str("version: \"1\"\ndefault: deny\ntools:\n");
    let mut seen = std::collections::HashSet::new();
    for t in &scan.tools {
        let Some(name) = t["name"].as_str() else { continue };
        if !seen.insert(name.to_owned()) {
            continue;
        }
        let description = t["description"].as_str().unwrap_or("");
        let class = classify(name, description);
        let quoted = serde_json::to_string(name).unwrap_or_default();
        out.push_str(&format!("  # {name}: {}\n", format!("{class:?}").to_ascii_lowercase()));
        comment_lines(&mut out, description, 4);
        out.push_str(&format!("  #   parameters: {}\n", parameters(&t["inputSchema"])));
        out.push_str(&format!("  {quoted}:\n"));
        match class {
            Class::Read => out.push_str("    limits:\n      - {counter: reads, window: minute, max: 120, scope: grant}\n"),
            Class::Write => out.push_str("    limits:\n      - {counter: writes, window: minute, max: 10, scope: grant}\n"),
            Class::Execute => {
                out.push_str("    limits:\n      - {counter: executes, window: minute, max: 10, scope: grant}\n")
            }
            Class::Destructive => out.push_str(
                "    action: approval\n    reason: \"destructive: needs a person's approval\"\n    approval: {timeout: 10m}\n",
            ),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(classify("list-pods", ""), Class::Read);
        assert_eq!(classify("get_pod", ""), Class::Read);
        assert_eq!(classify("create-pod", ""), Class::Write);
        assert_eq!(classify("start-pod", ""), Class::Execute);
        assert_eq!(classify("pod-action", ""), Class::Execute);
        assert_eq!(classify("delete-network-volume", ""), Class::Destructive);
        assert_eq!(classify("purge-endpoint-queue", ""), Class::Destructive);
        assert_eq!(classify("frobnicate", ""), Class::Write);
    }

    #[test]
    fn scaffold_validates_and_refuses_destructive() {
        let scan = Scan {
            server: "x 1".into(),
            tools: vec![
                json!({"name": "list-pods", "description": "List\npods", "inputSchema": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}),
                json!({"name": "delete-pod", "inputSchema": {"type": "object"}}),
                json!({"name": "we\"ird: name", "inputSchema": {}}),
            ],
        };
        let text = scaffold(&scan, "test");
        let policy = toolgate_policy::Policy::from_text("scan", &text).expect("scaffold validates");
        let caller = toolgate_policy::Caller::default();
        let args = json!({});
        let limiter = toolgate_policy::Limiter::default();
        let decide = |tool: &str| {
            policy
                .decide(&limiter, &toolgate_policy::Call { tool, arguments: &args, caller: &caller }, Duration::ZERO)
                .kind
        };
        assert_eq!(decide("list-pods"), toolgate_policy::DecisionKind::Allow);
        assert_eq!(decide("delete-pod"), toolgate_policy::DecisionKind::Approval);
        assert_eq!(decide("we\"ird: name"), toolgate_policy::DecisionKind::Allow);
        assert_eq!(decide("unknown"), toolgate_policy::DecisionKind::Deny);
        assert!(text.contains("a (string, required)"));
    }
}
