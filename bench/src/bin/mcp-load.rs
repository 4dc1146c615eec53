//! mcp-load: a closed-loop load generator for Streamable-HTTP MCP servers, and the
//! report of `make bench-proxy`.
//!
//! ```text
//! mcp-load run --url http://127.0.0.1:PORT/mcp [--sessions N] [--warmup-secs 5] [--secs 10] [--count N]
//! mcp-load report --direct-1 F --proxy-1 F --direct-8 F --proxy-8 F [--relay-1 F --relay-8 F] [--peer-1 F --peer-8 F]
//!     [--redis-1 F --redis-8 F --redis-commands N] [--cpu RUN=SECONDS]... --rss-idle-kib K --rss-load-kib K --out F
//! ```
//!
//! `run`: N sessions, each on its own keep-alive HTTP/1.1 connection: `initialize`,
//! `notifications/initialized`, then `tools/call` in a loop (closed loop: the next call
//! leaves when the answer to the previous one is read). Calls that start after the warm-up
//! and end inside the measured window are recorded in an HDR histogram (nanoseconds, 3
//! significant digits). Prints one JSON object: latency percentiles in µs and calls/s.
//! Any refused or failed call is an error: the exit status is then 1.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(name = "mcp-load", version, about = "Closed-loop MCP load generator")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a load and print its latency/throughput as JSON.
    Run(RunArgs),
    /// Combine direct and proxied runs into the benchmark table and JSON file.
    Report(ReportArgs),
}

#[derive(clap::Args, Debug, Clone)]
struct RunArgs {
    /// MCP endpoint, e.g. http://127.0.0.1:8080/mcp.
    #[arg(long)]
    url: Uri,
    /// Concurrent sessions (one connection each).
    #[arg(long, default_value_t = 1)]
    sessions: usize,
    /// Warm-up before measuring, in seconds (calls made then are not recorded).
    #[arg(long, default_value_t = 5.0)]
    warmup_secs: f64,
    /// Measured duration, in seconds.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Stop each session after this many measured calls (the duration stays an upper bound).
    #[arg(long)]
    count: Option<u64>,
    /// Runtime worker threads of the generator (1 = a single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Tool to call.
    #[arg(long, default_value = "echo")]
    tool: String,
    /// `arguments` of each call (a JSON object).
    #[arg(long, default_value = r#"{"message":"hello toolgate","count":3}"#)]
    arguments: String,
    /// Authorization header value to send (e.g. "Bearer x").
    #[arg(long)]
    auth: Option<String>,
    /// A label copied into the output.
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(clap::Args, Debug)]
struct ReportArgs {
    #[arg(long)]
    direct_1: PathBuf,
    #[arg(long)]
    proxy_1: PathBuf,
    #[arg(long)]
    direct_8: PathBuf,
    #[arg(long)]
    proxy_8: PathBuf,
    /// The same loads through `tcp-relay` (a byte-copying relay: the floor any proxy pays).
    #[arg(long, requires = "relay_8")]
    relay_1: Option<PathBuf>,
    #[arg(long, requires = "relay_1")]
    relay_8: Option<PathBuf>,
    /// The same loads through a peer MCP proxy (e.g. mcp-proxy 0.6.0), named by --peer-name.
    #[arg(long, requires = "peer_8")]
    peer_1: Option<PathBuf>,
    #[arg(long, requires = "peer_1")]
    peer_8: Option<PathBuf>,
    #[arg(long, default_value = "peer")]
    peer_name: String,
    /// The same loads through toolgate-proxy counting its limits in Redis.
    #[arg(long)]
    redis_1: Option<PathBuf>,
    #[arg(long)]
    redis_8: Option<PathBuf>,
    /// Round trips to Redis during the redis runs (EVALSHA, EVAL, SCRIPT from INFO commandstats).
    #[arg(long)]
    redis_commands: Option<u64>,
    /// CPU time (user + system) a process used during one run, `RUN=SECONDS` (e.g.
    /// `proxy-8=4.21`), repeated; divided by the run's calls (warm-up included).
    #[arg(long = "cpu", value_parser = parse_cpu)]
    cpu: Vec<(String, f64)>,
    /// Proxy VmRSS after start, before any load (KiB).
    #[arg(long)]
    rss_idle_kib: u64,
    /// Highest proxy VmRSS sampled during the 8-session run (KiB).
    #[arg(long)]
    rss_load_kib: u64,
    /// Proxy VmRSS after the loads (KiB).
    #[arg(long)]
    rss_after_kib: Option<u64>,
    /// Audit lines the proxy wrote (one per decided call).
    #[arg(long)]
    audit_lines: Option<u64>,
    /// Free text about the machine, copied into the JSON.
    #[arg(long, default_value = "")]
    machine: String,
    /// Where to write the combined JSON.
    #[arg(long)]
    out: PathBuf,
}

fn parse_cpu(s: &str) -> Result<(String, f64), String> {
    let (name, secs) = s.split_once('=').ok_or("expected RUN=SECONDS")?;
    let secs: f64 = secs.parse().map_err(|e| format!("{secs}: {e}"))?;
    Ok((name.to_owned(), secs))
}

/// What one session measured.
struct SessionResult {
    hist: Histogram<u64>,
    calls: u64,
    /// Every call made, the warm-up's included (what the proxy's CPU time is divided by).
    all_calls: u64,
    errors: u64,
    first_error: Option<String>,
    last_end: Option<Instant>,
}

struct Target {
    host: String,
    port: u16,
    path: String,
    host_header: HeaderValue,
}

/// The clock starts once every session is connected and initialised.
static START: OnceLock<Instant> = OnceLock::new();

fn new_hist() -> anyhow::Result<Histogram<u64>> {
    // 1 ns .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).context("histogram bounds")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

struct Conn {
    sender: SendRequest<Full<Bytes>>,
    session: Option<HeaderValue>,
}

impl Conn {
    async fn open(t: &Target) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
            .await
            .with_context(|| format!("cannot connect to {}:{}", t.host, t.port))?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.context("handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { sender, session: None })
    }

    async fn post(
        &mut self,
        t: &Target,
        auth: Option<&HeaderValue>,
        body: Bytes,
    ) -> anyhow::Result<(StatusCode, Option<HeaderValue>, Bytes)> {
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = Uri::try_from(t.path.as_str()).context("path")?;
        let h = req.headers_mut();
        h.insert(header::HOST, t.host_header.clone());
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json, text/event-stream"));
        h.insert("mcp-protocol-version", HeaderValue::from_static("2025-06-18"));
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, a.clone());
        }
        if let Some(s) = &self.session {
            h.insert("mcp-session-id", s.clone());
        }
        self.sender.ready().await.context("connection closed")?;
        let resp = self.sender.send_request(req).await.context("request failed")?;
        let status = resp.status();
        let sid = resp.headers().get("mcp-session-id").cloned();
        let body = resp.into_body().collect().await.context("body")?.to_bytes();
        Ok((status, sid, body))
    }
}

async fn session(
    args: Arc<RunArgs>,
    target: Arc<Target>,
    ready: Arc<tokio::sync::Barrier>,
) -> anyhow::Result<SessionResult> {
    let auth = args.auth.as_deref().map(HeaderValue::from_str).transpose().context("--auth")?;
    let mut conn = Conn::open(&target).await?;
    let init = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"mcp-load","version":"0.1.0"}}}"#;
    let (status, sid, body) = conn.post(&target, auth.as_ref(), Bytes::from_static(init.as_bytes())).await?;
    if status != StatusCode::OK || !contains(&body, b"\"result\"") {
        bail!("initialize failed: {status} {}", String::from_utf8_lossy(&body));
    }
    conn.session = sid;
    let note = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    let (status, _, body) = conn.post(&target, auth.as_ref(), Bytes::from_static(note.as_bytes())).await?;
    if status != StatusCode::ACCEPTED {
        bail!("notifications/initialized: expected 202, got {status} {}", String::from_utf8_lossy(&body));
    }
    let tool = serde_json::to_string(&args.tool).context("tool name")?;
    let prefix = format!(
        r#"{{"jsonrpc":"2.0","method":"tools/call","params":{{"name":{tool},"arguments":{}}},"id":"#,
        args.arguments
    );

    ready.wait().await;
    let start = *START.get_or_init(Instant::now);
    let warm_end = start + Duration::from_secs_f64(args.warmup_secs);
    let end = warm_end + Duration::from_secs_f64(args.secs);
    let mut res =
        SessionResult { hist: new_hist()?, calls: 0, all_calls: 0, errors: 0, first_error: None, last_end: None };
    let mut id: u64 = 1;
    let mut body = Vec::with_capacity(prefix.len() + 24);
    loop {
        body.clear();
        body.extend_from_slice(prefix.as_bytes());
        body.extend_from_slice(id.to_string().as_bytes());
        body.push(b'}');
        id += 1;
        let t0 = Instant::now();
        if t0 >= end || args.count.is_some_and(|c| res.calls >= c) {
            break;
        }
        let outcome = conn.post(&target, auth.as_ref(), Bytes::copy_from_slice(&body)).await;
        let t1 = Instant::now();
        res.all_calls += 1;
        let problem = match &outcome {
            Ok((StatusCode::OK, _, b)) if contains(b, b"\"result\"") && !contains(b, b"\"isError\":true") => None,
            Ok((s, _, b)) => Some(format!("{s}: {}", String::from_utf8_lossy(b))),
            Err(e) => Some(format!("{e:#}")),
        };
        if t0 >= warm_end && t1 <= end {
            res.hist.saturating_record(t1.duration_since(t0).as_nanos() as u64);
            res.calls += 1;
            res.last_end = Some(t1);
        }
        if let Some(p) = problem {
            res.errors += 1;
            res.first_error.get_or_insert(p);
            if outcome.is_err() {
                // The connection is unusable.
                break;
            }
        }
    }
    Ok(res)
}

fn run(args: RunArgs) -> anyhow::Result<bool> {
    let host = args.url.host().context("--url needs a host")?.to_owned();
    let port = args.url.port_u16().unwrap_or(80);
    if args.url.scheme_str() != Some("http") {
        bail!("--url must be http://");
    }
    let target = Arc::new(Target {
        host_header: HeaderValue::from_str(&format!("{host}:{port}")).context("host")?,
        host,
        port,
        path: args.url.path_and_query().map_or("/".to_owned(), |p| p.as_str().to_owned()),
    });
    serde_json::from_str::<serde_json::Map<String, Value>>(&args.arguments)
        .context("--arguments must be a JSON object")?;
    let sessions = args.sessions.max(1);
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads).enable_all().build()
    }
    .context("cannot start the runtime")?;
    let args = Arc::new(args);
    let results = runtime.block_on(async {
        let ready = Arc::new(tokio::sync::Barrier::new(sessions));
        let tasks: Vec<_> =
            (0..sessions).map(|_| tokio::spawn(session(args.clone(), target.clone(), ready.clone()))).collect();
        let mut out = Vec::with_capacity(sessions);
        for t in tasks {
            out.push(t.await.context("session task")??);
        }
        anyhow::Ok(out)
    })?;

    let mut hist = new_hist()?;
    let (mut calls, mut all_calls, mut errors, mut first_error, mut last_end) = (0, 0, 0, None, None);
    for r in results {
        hist.add(&r.hist).context("merge histograms")?;
        calls += r.calls;
        all_calls += r.all_calls;
        errors += r.errors;
        first_error = first_error.or(r.first_error);
        last_end = last_end.max(r.last_end);
    }
    let start = START.get().copied().context("no session started")?;
    let warm_end = start + Duration::from_secs_f64(args.warmup_secs);
    // With --count the sessions may finish early: divide by the time actually measured.
    let measured = match (args.count, last_end) {
        (Some(_), Some(e)) => e.saturating_duration_since(warm_end).as_secs_f64(),
        _ => args.secs,
    };
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let out = json!({
        "label": args.label,
        "url": args.url.to_string(),
        "sessions": sessions,
        "tool": args.tool,
        "warmup_secs": args.warmup_secs,
        "measured_secs": measured,
        "calls": calls,
        "all_calls": all_calls,
        "errors": errors,
        "first_error": first_error,
        "rps": if measured > 0.0 { calls as f64 / measured } else { 0.0 },
        "latency_us": {
            "p50": us(0.50),
            "p90": us(0.90),
            "p99": us(0.99),
            "p999": us(0.999),
            "max": hist.max() as f64 / 1000.0,
            "mean": hist.mean() / 1000.0,
        },
    });
    println!("{out}");
    Ok(errors == 0 && calls > 0)
}

fn load(path: &PathBuf) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

fn num(v: &Value, ptr: &str) -> f64 {
    v.pointer(ptr).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn report(a: ReportArgs) -> anyhow::Result<bool> {
    let peer_1_name = format!("{}-1", a.peer_name);
    let peer_8_name = format!("{}-8", a.peer_name);
    let mut runs: Vec<(&str, Value)> = vec![("direct-1", load(&a.direct_1)?)];
    let opt = |p: &Option<PathBuf>| p.as_ref().map(load).transpose();
    let (relay_1, relay_8) = (opt(&a.relay_1)?, opt(&a.relay_8)?);
    let (peer_1, peer_8) = (opt(&a.peer_1)?, opt(&a.peer_8)?);
    let (redis_1, redis_8) = (opt(&a.redis_1)?, opt(&a.redis_8)?);
    let mut push = |name: &'static str, v: Option<Value>| {
        if let Some(v) = v {
            runs.push((name, v));
        }
    };
    push("relay-1", relay_1);
    push("proxy-1", Some(load(&a.proxy_1)?));
    push("redis-1", redis_1);
    push("direct-8", Some(load(&a.direct_8)?));
    push("relay-8", relay_8);
    push("proxy-8", Some(load(&a.proxy_8)?));
    push("redis-8", redis_8);
    if let Some(v) = peer_1 {
        runs.insert(runs.iter().position(|r| r.0 == "proxy-1").map_or(0, |i| i + 1), (peer_1_name.as_str(), v));
    }
    if let Some(v) = peer_8 {
        runs.insert(runs.iter().position(|r| r.0 == "proxy-8").map_or(0, |i| i + 1), (peer_8_name.as_str(), v));
    }
    let get = |name: &str| runs.iter().find(|r| r.0 == name).map(|r| &r.1);
    let val = |name: &str, ptr: &str| get(name).map_or(f64::NAN, |v| num(v, ptr));
    let p50 = |name: &str| val(name, "/latency_us/p50");
    let rps = |name: &str| val(name, "/rps");
    // CPU µs per call of the process in the path (warm-up calls included on both sides).
    let cpu_us = |name: &str| -> f64 {
        let secs = a.cpu.iter().find(|c| c.0 == name).map_or(f64::NAN, |c| c.1);
        secs * 1e6 / val(name, "/all_calls")
    };

    println!();
    println!(
        "{:<18} {:>9} {:>9} {:>9} {:>10} {:>10} {:>12} {:>7}",
        "run", "p50 µs", "p90 µs", "p99 µs", "max µs", "calls/s", "CPU µs/call", "errors"
    );
    for (name, v) in &runs {
        println!(
            "{:<18} {:>9.1} {:>9.1} {:>9.1} {:>10.1} {:>10.0} {:>12.1} {:>7}",
            name,
            num(v, "/latency_us/p50"),
            num(v, "/latency_us/p90"),
            num(v, "/latency_us/p99"),
            num(v, "/latency_us/max"),
            num(v, "/rps"),
            cpu_us(name),
            num(v, "/errors"),
        );
    }
    println!();
    // Each process in the path against the direct connection and the relay (the floor).
    let mut compare = serde_json::Map::new();
    for who in ["relay", "proxy", a.peer_name.as_str(), "redis"] {
        let (one, eight) = (format!("{who}-1"), format!("{who}-8"));
        if get(&one).is_none() && get(&eight).is_none() {
            continue;
        }
        let c = json!({
            "added_p50_us_1": p50(&one) - p50("direct-1"),
            "over_relay_p50_us_1": p50(&one) - p50("relay-1"),
            "throughput_vs_direct_8": rps(&eight) / rps("direct-8"),
            "throughput_vs_relay_8": rps(&eight) / rps("relay-8"),
            "cpu_us_per_call_8": cpu_us(&eight),
            "cpu_vs_relay_8": cpu_us(&eight) / cpu_us("relay-8"),
            "cpu_us_per_call_1": cpu_us(&one),
        });
        println!(
            "{who:<12} 1 session: p50 {:+.1} µs over direct, {:+.1} over the relay; 8 sessions: {:.3}× direct's \
             throughput, {:.3}× the relay's; CPU {:.1} µs/call ({:.2}× the relay's)",
            num(&c, "/added_p50_us_1"),
            num(&c, "/over_relay_p50_us_1"),
            num(&c, "/throughput_vs_direct_8"),
            num(&c, "/throughput_vs_relay_8"),
            num(&c, "/cpu_us_per_call_8"),
            num(&c, "/cpu_vs_relay_8"),
        );
        compare.insert(who.to_owned(), c);
    }
    let redis = get("redis-1").map(|_| {
        let calls = val("redis-1", "/all_calls") + get("redis-8").map_or(0.0, |v| num(v, "/all_calls"));
        let per_call = a.redis_commands.map_or(f64::NAN, |c| c as f64 / calls);
        let added = p50("redis-1") - p50("proxy-1");
        println!(
            "redis store vs local limiter, 1 session: p50 {added:+.1} µs; Redis round trips per limited call: {per_call:.3}"
        );
        json!({"added_p50_us_1": added, "round_trips": a.redis_commands, "calls": calls, "round_trips_per_call": per_call})
    });
    let idle_mib = a.rss_idle_kib as f64 / 1024.0;
    let load_mib = a.rss_load_kib as f64 / 1024.0;
    print!("toolgate-proxy RSS: idle {idle_mib:.1} MiB, peak under the 8-session load {load_mib:.1} MiB");
    if let Some(after) = a.rss_after_kib {
        print!(", after the loads {:.1} MiB", after as f64 / 1024.0);
    }
    println!();
    println!();
    let (relay_p50_1, proxy_p50_1) = (p50("relay-1") - p50("direct-1"), p50("proxy-1") - p50("direct-1"));
    let ratio_8 = rps("proxy-8") / rps("relay-8");
    let cpu_ratio = cpu_us("proxy-8") / cpu_us("relay-8");
    let targets = json!([
        {"what": "throughput at 8 sessions, × the relay's", "target": ">= 0.85", "value": ratio_8, "met": ratio_8 >= 0.85},
        {"what": "CPU per call at 8 sessions, × the relay's", "target": "<= 1.4", "value": cpu_ratio, "met": cpu_ratio <= 1.4},
        {"what": "added p50 at 1 session over the relay's (µs)", "target": "<= 15", "value": proxy_p50_1 - relay_p50_1,
         "met": proxy_p50_1 - relay_p50_1 <= 15.0},
        {"what": "idle RSS (MiB)", "target": "<= 8", "value": idle_mib, "met": idle_mib <= 8.0},
        {"what": "peak RSS at 8 sessions (MiB)", "target": "<= 12", "value": load_mib, "met": load_mib <= 12.0},
    ]);
    let mut all_met = true;
    for t in targets.as_array().into_iter().flatten() {
        let met = t["met"].as_bool().unwrap_or(false);
        all_met &= met;
        println!(
            "  [{}] {} {} (measured {:.3})",
            if met { "met " } else { "MISS" },
            t["what"].as_str().unwrap_or(""),
            t["target"].as_str().unwrap_or(""),
            t["value"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let out = json!({
        "machine": a.machine,
        "runs": runs.iter().map(|(n, v)| ((*n).to_owned(), v.clone())).collect::<serde_json::Map<_, _>>(),
        "cpu_seconds": a.cpu.iter().map(|(n, s)| (n.clone(), json!(s))).collect::<serde_json::Map<_, _>>(),
        "compare": compare,
        "redis": redis,
        "proxy_rss_kib": {"idle": a.rss_idle_kib, "load_peak": a.rss_load_kib, "after": a.rss_after_kib},
        "audit_lines": a.audit_lines,
        "targets": targets,
        "all_targets_met": all_met,
    });
    let text = serde_json::to_string_pretty(&out).context("encode")?;
    std::fs::write(&a.out, text + "\n").with_context(|| format!("cannot write {}", a.out.display()))?;
    println!("\nwrote {}", a.out.display());
    Ok(true)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Report(a) => report(a),
    };
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("mcp-load: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
