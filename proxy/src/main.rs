//! toolgate-proxy: puts a toolgate policy in front of an MCP server.
//!
//! ```text
//! toolgate-proxy (--policy FILE | --operator https://HOST:PORT --token-file PATH
//!                 [--ca-file PEM] [--state-dir DIR])
//!                [--listen 127.0.0.1:8080] [--admin-listen 127.0.0.1:9090]
//!                (--upstream http://HOST:PORT/PATH | [--stdio] -- CMD ARGS...)
//! ```
#![forbid(unsafe_code)]

mod approval;
mod audit;
mod connections;
mod frontdoor;
mod gate;
mod jsonrpc;
mod legacy_clients;
mod metrics;
mod operator;
mod ordering;
mod owners;
mod policy_files;
#[cfg(test)]
mod proptests;
mod server;
mod sessions;
mod sse;
mod stdio;
mod store;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, Parser};

use crate::approval::Approvals;
use crate::connections::Limits;
use crate::frontdoor::HostRules;
use crate::gate::{Approver, Effective, Gate, IdentitySource, Source};
use crate::legacy_clients::LegacyClients;
use crate::metrics::Metrics;
use crate::owners::Owners;
use crate::server::{App, Front, Listen};
use crate::sessions::{Opener, Sessions};
use crate::upstream::{HttpUpstream, Transport, Upstream};

/// Deterministic rules in front of every MCP tool call.
#[derive(Parser, Debug)]
#[command(name = "toolgate-proxy", version, about)]
#[command(group(ArgGroup::new("source").required(true).multiple(false).args(["policies", "operator"])))]
struct Args {
    /// Policy file (YAML or JSON, native or Intercept). Repeat to apply several documents
    /// together. Watched: valid edits apply at once, invalid ones keep the last good policy.
    /// Exactly one of --policy and --operator.
    #[arg(long = "policy", short = 'p', env = "TOOLGATE_POLICY", value_delimiter = ',')]
    policies: Vec<PathBuf>,

    /// Get the policy from the toolgate operator's stream at this https:// URL (the
    /// sidecar mode). Exactly one of --policy and --operator.
    #[arg(long, env = "TOOLGATE_OPERATOR", value_name = "URL", requires = "token_file")]
    operator: Option<hyper::Uri>,

    /// Bearer token for the operator (a projected service account token); read again on
    /// every connection and acknowledgement, since it rotates.
    #[arg(long, env = "TOOLGATE_TOKEN_FILE", value_name = "PATH", requires = "operator")]
    token_file: Option<PathBuf>,

    /// PEM file with the roots that sign the operator's certificate (default: the
    /// platform's roots). Read again on every connection.
    #[arg(long, env = "TOOLGATE_CA_FILE", value_name = "PATH", requires = "operator")]
    ca_file: Option<PathBuf>,

    /// Directory where the last good policy set from the operator is kept, so that a
    /// restarted proxy enforces it at once, before the operator answers.
    #[arg(long, env = "TOOLGATE_STATE_DIR", value_name = "DIR", requires = "operator")]
    state_dir: Option<PathBuf>,

    /// Client-facing MCP endpoint (served at /mcp).
    #[arg(long, env = "TOOLGATE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// Admin endpoint: /metrics, /healthz, /readyz, /policy.
    #[arg(long, env = "TOOLGATE_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    admin_listen: SocketAddr,

    /// Upstream MCP endpoint, e.g. http://127.0.0.1:3000/mcp (Streamable HTTP) or
    /// http://127.0.0.1:3000/sse (the 2024-11-05 HTTP+SSE transport).
    #[arg(long, env = "TOOLGATE_UPSTREAM", conflicts_with = "command")]
    upstream: Option<hyper::Uri>,

    /// What --upstream speaks: auto (detected per the MCP spec's backwards compatibility:
    /// POST initialize, on a 4xx GET an SSE stream that begins with an endpoint event),
    /// streamable, or sse (2024-11-05 HTTP+SSE; the URL is the SSE endpoint).
    #[arg(long, env = "TOOLGATE_UPSTREAM_TRANSPORT", value_enum, default_value = "auto", requires = "upstream")]
    upstream_transport: Transport,

    /// Speak MCP over stdio to the client (for desktop clients) instead of HTTP.
    #[arg(long, env = "TOOLGATE_STDIO", requires = "command")]
    stdio: bool,

    /// Trust this header (set by a gateway in front of toolgate) as the caller identity
    /// instead of the fingerprint of the Authorization header.
    #[arg(long, env = "TOOLGATE_IDENTITY_HEADER")]
    identity_header: Option<hyper::header::HeaderName>,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "TOOLGATE_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    max_body_bytes: usize,

    /// Write raw argument values into audit lines (off: only keys and a hash).
    #[arg(long, env = "TOOLGATE_AUDIT_ARGUMENTS")]
    audit_arguments: bool,

    /// How often the policy files are checked for changes, in milliseconds.
    #[arg(long, env = "TOOLGATE_RELOAD_INTERVAL_MS", default_value_t = 500)]
    reload_interval_ms: u64,

    /// Most sessions the proxy holds upstream for its clients: child processes (`-- CMD`)
    /// or connections to a 2024-11-05 HTTP+SSE upstream; also the most open `/sse`
    /// client streams.
    #[arg(long, env = "TOOLGATE_MAX_SESSIONS", default_value_t = 32)]
    max_sessions: usize,

    /// Sessions one caller identity may hold upstream at once (its fair share of
    /// --max-sessions); at its share, its least recently used idle session is ended to make
    /// room. 0: a quarter of --max-sessions (at least 1), or all of them when every caller
    /// is one identity (a child process without --identity-header).
    #[arg(long, env = "TOOLGATE_MAX_SESSIONS_PER_IDENTITY", default_value_t = 0)]
    max_sessions_per_identity: usize,

    /// Idle time after which a session's child process is stopped (or its connection to a
    /// 2024-11-05 HTTP+SSE upstream closed), in seconds. A session with a waiting call or
    /// an open GET stream is not idle.
    #[arg(long, env = "TOOLGATE_SESSION_IDLE_SECONDS", default_value_t = 300)]
    session_idle_seconds: u64,

    /// Time to wait for an upstream answer (response head), in seconds.
    #[arg(long, env = "TOOLGATE_UPSTREAM_TIMEOUT_SECONDS", default_value_t = 300)]
    upstream_timeout_seconds: u64,

    /// A request head must arrive whole within this many seconds (it also bounds the wait
    /// for the next request on an HTTP/1.1 keep-alive connection).
    #[arg(long, env = "TOOLGATE_HEADER_READ_TIMEOUT_SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    header_read_timeout_seconds: u64,

    /// A request body must arrive whole within this many seconds of its head; else 408 and
    /// the connection is closed.
    #[arg(long, env = "TOOLGATE_BODY_READ_TIMEOUT_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    body_read_timeout_seconds: u64,

    /// A client connection with no request in flight for this many seconds is closed (a
    /// call waiting for its answer or an approval, or an open SSE stream, is in flight).
    #[arg(long, env = "TOOLGATE_IDLE_CONNECTION_TIMEOUT_SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    idle_connection_timeout_seconds: u64,

    /// Most open client connections per listener; more get 503 and are closed. Default
    /// 1024, lowered to fit the open-file limit (two descriptors per connection).
    #[arg(long, env = "TOOLGATE_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections: Option<u64>,

    /// Host names the MCP endpoints accept besides the defaults (localhost, 127.0.0.1,
    /// [::1], the listen address; on 0.0.0.0 also IP addresses, Service short names and
    /// *.svc, *.svc.cluster.local), comma-separated; `*.example.com` for subdomains, `*` for
    /// any. Other Hosts get 403 (DNS-rebinding protection).
    #[arg(long, env = "TOOLGATE_ALLOWED_HOSTS", value_delimiter = ',')]
    allowed_hosts: Vec<String>,

    /// Origins accepted besides http(s) on localhost, 127.0.0.1, [::1] and the allowed
    /// host names (any port), comma-separated: `https://app.example.com[:PORT]`,
    /// `https://*.example.com`, `null`, or `*` for any. Requests without Origin pass.
    #[arg(long, env = "TOOLGATE_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Vec<String>,

    /// Serve /policy on the admin listener to any peer (default: loopback peers only, e.g.
    /// through kubectl port-forward).
    #[arg(long, env = "TOOLGATE_ADMIN_POLICY_PUBLIC")]
    admin_policy_public: bool,

    /// Pod name for audit lines (the sidecar gets it from the downward API).
    #[arg(long, env = "TOOLGATE_POD_NAME")]
    pod_name: Option<String>,

    /// The MCP server to run as a child process, after `--`.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,

    /// Where rate limits are counted (docs/proxy.md, Counter store).
    #[command(flatten)]
    store: store::StoreArgs,
}

/// Where the policy comes from, checked before the runtime starts.
#[allow(clippy::large_enum_variant, reason = "built once at start")]
enum Start {
    Files(toolgate_policy::Policy),
    /// The operator, and what to enforce until it answers (a persisted set, or nothing).
    Operator(operator::Config, Effective),
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors; every usage error is EX_USAGE.
            return if e.use_stderr() { ExitCode::from(64) } else { ExitCode::SUCCESS };
        }
    };
    // Logs go to stderr; stdout carries audit lines (or, with --stdio, the protocol).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("TOOLGATE_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    if args.upstream.is_none() && args.command.is_empty() {
        eprintln!("toolgate-proxy: give an upstream: --upstream URL, or -- CMD ARGS to run the MCP server as a child");
        return ExitCode::from(64);
    }
    let hosts = match HostRules::new(args.listen, &args.allowed_hosts, &args.allowed_origins) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("toolgate-proxy: {e}");
            return ExitCode::from(64);
        }
    };
    let front = Arc::new(Front { hosts, admin_policy_public: args.admin_policy_public });
    let start = match &args.operator {
        Some(uri) => {
            let endpoint = match operator::Endpoint::parse(uri) {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("toolgate-proxy: {e}");
                    return ExitCode::from(64);
                }
            };
            let Some(token_file) = args.token_file.clone() else {
                eprintln!("toolgate-proxy: --operator needs --token-file");
                return ExitCode::from(64);
            };
            // The persisted set is enforced before the operator is even asked. A broken
            // one is reported and ignored: the proxy then refuses every call until the
            // operator answers (fail closed), it does not refuse to start.
            let initial = match args.state_dir.as_deref().map(operator::load_persisted) {
                Some(Ok(Some(e))) => e,
                Some(Ok(None)) | None => Effective::none(Source::Operator),
                Some(Err(e)) => {
                    tracing::error!(
                        "ignoring the persisted policy set (every call is refused until the operator answers): {e}"
                    );
                    Effective::none(Source::Operator)
                }
            };
            let config = operator::Config {
                endpoint,
                token_file,
                ca_file: args.ca_file.clone(),
                state_dir: args.state_dir.clone(),
            };
            Start::Operator(config, initial)
        }
        // Invalid policies stop us before any port is bound.
        None => match policy_files::load(&args.policies) {
            Ok(p) => Start::Files(p),
            Err(e) => {
                eprintln!("toolgate-proxy: invalid policy:\n{e}");
                return ExitCode::from(78);
            }
        },
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("toolgate-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, start, front)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("toolgate-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, start: Start, front: Arc<Front>) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let mut approvals = None;
    let policy_rx = match start {
        Start::Files(policy) => {
            tracing::info!(revision = policy.revision(), files = ?args.policies, "policy loaded");
            let effective = Effective::files(policy);
            metrics.policy_enforced(&effective);
            let (policy_tx, policy_rx) = tokio::sync::watch::channel(Arc::new(effective));
            tokio::spawn(policy_files::watch(
                args.policies.clone(),
                Duration::from_millis(args.reload_interval_ms.max(50)),
                policy_tx,
                metrics.clone(),
            ));
            policy_rx
        }
        Start::Operator(config, initial) => {
            let applied = (!initial.revision.is_empty()).then(|| initial.revision.clone());
            match &applied {
                Some(r) => {
                    tracing::info!(revision = r, "enforcing the persisted policy set until the operator answers")
                }
                None => tracing::warn!("no policy yet: every tool call is refused until the operator sends one"),
            }
            metrics.policy_enforced(&initial);
            let (policy_tx, policy_rx) = tokio::sync::watch::channel(Arc::new(initial));
            let link = operator::Link::new(config);
            tracing::info!(instance = link.instance(), "this proxy's instance id (approvals it requests carry it)");
            let a = Approvals::new(link.clone(), metrics.clone());
            operator::Client::spawn(link, a.clone(), policy_tx, metrics.clone(), applied);
            approvals = Some(a);
            policy_rx
        }
    };
    let identity = match args.identity_header.clone() {
        Some(h) => IdentitySource::Header(h),
        // A child process uses its own key (RUNPOD_API_KEY…) and never sees the caller's
        // Authorization: a credential the proxy cannot check is a name the client picks.
        None if args.upstream.is_none() => {
            tracing::warn!(
                "no identity source: the MCP server runs as a child process and authenticates nobody, so every \
                 caller of this proxy is one identity (limits hold for the whole server); set --identity-header \
                 behind a gateway that authenticates callers to tell them apart"
            );
            IdentitySource::Shared
        }
        None => IdentitySource::Authorization,
    };
    // Calls that need approval are held only where a person can be asked and the call's
    // request can stay open: operator mode over HTTP.
    let approver = match approvals {
        Some(_) if args.stdio => Approver::Unavailable(stdio::NO_HOLD),
        Some(a) => Approver::Operator(a),
        None => Approver::Unavailable("no operator to ask"),
    };
    let shared_identity = matches!(identity, IdentitySource::Shared);
    let mut gate =
        Gate::new(policy_rx, metrics.clone(), identity, args.audit_arguments, args.pod_name.clone(), approver);
    if let Some(shared) = store::build(&args.store)? {
        gate = gate.with_counters(store::monitor(&shared, metrics.clone(), Duration::from_secs(2)));
    }
    let gate = Arc::new(gate);
    if args.stdio {
        audit::to_stderr();
    }

    let (max_connections, note) = connections::connection_cap(
        args.max_connections.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        connections::open_file_limit(),
    );
    if let Some(note) = note {
        tracing::warn!("{note}");
    }
    let limits = Limits {
        header_read: Duration::from_secs(args.header_read_timeout_seconds),
        body_read: Duration::from_secs(args.body_read_timeout_seconds),
        idle: Duration::from_secs(args.idle_connection_timeout_seconds),
        max_connections,
    };
    let admin_listen = Listen { name: "admin", limits, front: front.clone() };
    let admin_listener = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", args.admin_listen))?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);

    if args.stdio {
        let app = Arc::new(App {
            gate: gate.clone(),
            upstream: placeholder_upstream(),
            max_body: args.max_body_bytes,
            legacy: LegacyClients::new(0),
            owners: Owners::new(Duration::ZERO, true),
        });
        let admin = tokio::spawn(server::serve(admin_listener, admin_listen, app, server::admin, shutdown_rx));
        let result = stdio::run(gate, &args.command, args.max_body_bytes).await;
        let _ = shutdown_tx.send(true);
        let _ = admin.await;
        return result;
    }

    let per_identity = match args.max_sessions_per_identity {
        0 if shared_identity => args.max_sessions,
        0 => args.max_sessions.div_ceil(4),
        n => n,
    }
    .clamp(1, args.max_sessions.max(1));
    let upstream = match &args.upstream {
        Some(uri) => {
            if uri.scheme_str() != Some("http") {
                anyhow::bail!("--upstream must be an http:// URL (TLS to the upstream is not supported yet)");
            }
            Upstream::Http(Box::new(HttpUpstream::new(
                uri.clone(),
                Duration::from_secs(args.upstream_timeout_seconds),
                args.upstream_transport,
                args.max_sessions.max(1),
                per_identity,
                Duration::from_secs(args.session_idle_seconds),
            )))
        }
        None => Upstream::Stdio(Sessions::new(
            Opener::Command(args.command.clone()),
            args.max_sessions.max(1),
            per_identity,
            Duration::from_secs(args.session_idle_seconds),
            Duration::from_secs(args.upstream_timeout_seconds),
        )),
    };
    // Sessions of child processes are the proxy's own (it gives out their ids) and end
    // when idle; an HTTP upstream's live as long as the upstream keeps them (bounded here
    // by owners::MAX_SESSIONS and a day without use).
    let owners = match &upstream {
        Upstream::Stdio(_) => Owners::new(Duration::from_secs(args.session_idle_seconds.max(1)), true),
        Upstream::Http(_) => Owners::new(Duration::from_secs(24 * 3600), false),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(listen = %args.listen, admin = %args.admin_listen, "serving MCP at /mcp (and /sse, /messages for 2024-11-05 clients)");
    let app = Arc::new(App {
        gate,
        upstream,
        max_body: args.max_body_bytes,
        legacy: LegacyClients::new(args.max_sessions.max(1)),
        owners,
    });
    let admin =
        tokio::spawn(server::serve(admin_listener, admin_listen, app.clone(), server::admin, shutdown_rx.clone()));
    let mcp_listen = Listen { name: "mcp", limits, front };
    let main = tokio::spawn(server::serve(listener, mcp_listen, app.clone(), server::handle, shutdown_rx));
    shutdown_signal().await;
    tracing::info!("shutting down: no new connections, finishing in-flight calls");
    let _ = shutdown_tx.send(true);
    let _ = main.await;
    let _ = admin.await;
    app.upstream.shutdown();
    Ok(())
}

/// In `--stdio` mode the HTTP upstream is unused; the admin listener only needs the gate.
fn placeholder_upstream() -> Upstream {
    Upstream::Http(Box::new(HttpUpstream::new(
        hyper::Uri::from_static("http://127.0.0.1:9/"),
        Duration::from_secs(1),
        Transport::Streamable,
        1,
        1,
        Duration::from_secs(1),
    )))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod cli_tests {
    use clap::{CommandFactory, Parser};

    use super::Args;

    /// Flag ids are unique across the flattened groups (the counter store's
    /// `--counter-store-ca-file` once collided with the operator's `--ca-file`).
    #[test]
    fn flags_are_consistent() {
        Args::command().debug_assert();
        let a = Args::try_parse_from([
            "toolgate-proxy",
            "--policy",
            "p.yaml",
            "--counter-store",
            "rediss://r:6380",
            "--counter-store-ca-file",
            "/ca.pem",
        ])
        .expect("parses");
        assert_eq!(a.store.store_ca_file.as_deref(), Some(std::path::Path::new("/ca.pem")));
        assert_eq!(a.ca_file, None, "the operator's --ca-file is another flag");
    }
}
