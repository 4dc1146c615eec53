//! The running proxy: logging, the runtime and the audit sink's flushes, and the wiring of
//! the modules (policy source, gate, approvals, transports, admin) until a signal stops it.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use crate::admin::{self, AdminState};
use crate::approval::Approvals;
use crate::cli::{Args, Config, Start, authentication, child_command, counter_store, custody};
use crate::control as operator;
use crate::gate::{Approvers, Gate, IdentitySource};
use crate::live::Effective;
use crate::live::files as policy_files;
use crate::telemetry::Telemetry;
use crate::telemetry::audit::{AuditSink, Target};
use crate::telemetry::metrics::Metrics;
use crate::transport::connections::Limits;
use crate::transport::legacy::LegacyClients;
use crate::transport::listener::{self, Front, Listen};
use crate::transport::mcp_http::App;
use crate::transport::owners::Owners;
use crate::transport::router::{self, Router};
use crate::transport::sessions::{Opener, Sessions};
use crate::transport::upstream::{HttpUpstream, Upstream};
use crate::transport::{connections, stdio};

/// Parses the command line, checks it and runs the proxy until it is told to stop.
pub fn main() -> ExitCode {
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
    let Config { args, start, front } = match Config::from_args(args) {
        Ok(c) => c,
        Err(refused) => {
            eprintln!("toolgate-proxy: {}", refused.message);
            return ExitCode::from(refused.code);
        }
    };
    // In `--stdio` mode stdout carries the protocol, so audit lines go to stderr.
    let sink = Arc::new(AuditSink::new(if args.stdio { Target::Stderr } else { Target::Stdout }));
    // Audit lines are buffered (telemetry::audit): written 50 ms after the first pending
    // one (a task of the runtime), and on the way out — also on a panic (the release
    // profile aborts).
    let weak = Arc::downgrade(&sink);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Some(s) = weak.upgrade() {
            s.try_flush();
        }
        previous(info);
    }));
    // A shared counter store waits for Redis inside the (synchronous) decision with
    // `block_in_place`, which needs a multi-thread runtime: two workers at least.
    let workers = match args.worker_threads {
        1 if args.store.url != "local" => 2,
        n => n,
    };
    let mut builder = match workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                b.worker_threads(usize::try_from(n).unwrap_or(1));
            }
            b
        }
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("toolgate-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(args, start, front, sink.clone()));
    drop(runtime);
    sink.flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("toolgate-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, start: Start, front: Arc<Front>, sink: Arc<AuditSink>) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    tokio::spawn(sink.clone().flush_after());
    let telemetry = Arc::new(Telemetry::new(metrics.clone(), args.pod_name.clone(), args.audit_arguments, sink));
    // The store first: loading a policy checks whether it can count shared limits.
    // The same store remembers approvals given with `reuse_for` for every replica.
    let counters = counter_store(&args.store)?.map(|shared| {
        let memory: Arc<dyn toolgate_policy::ApprovalMemory> = Arc::new(shared.clone());
        (metrics.store.monitor(&shared, Duration::from_secs(2)), memory)
    });
    let mut approvals = None;
    let policy_rx = match start {
        Start::Files(policy) => {
            tracing::info!(revision = policy.revision(), files = ?args.policies, "policy loaded");
            let effective = Effective::files(policy);
            crate::live::enforced(&metrics, &effective);
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
            crate::live::enforced(&metrics, &initial);
            let (policy_tx, policy_rx) = tokio::sync::watch::channel(Arc::new(initial));
            let link = operator::Link::new(config);
            tracing::info!(instance = link.instance(), "this proxy's instance id (approvals it requests carry it)");
            let a = Approvals::new(link.clone(), telemetry.clone());
            operator::Client::spawn(link, a.clone(), policy_tx, metrics.clone(), applied);
            approvals = Some(a);
            policy_rx
        }
    };
    let authn = authentication(&args)?;
    let identity = match args.identity_header.clone() {
        _ if authn.is_some() => IdentitySource::Authenticated(authn.clone().context("checked")?),
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
        Some(_) if args.stdio => Approvers::Unavailable(stdio::NO_HOLD),
        Some(a) => Approvers::Operator(a),
        None => Approvers::Unavailable("no operator to ask"),
    };
    let shared_identity = matches!(identity, IdentitySource::Shared);
    let mut gate = Gate::new(policy_rx, telemetry, identity, approver);
    if let Some((counters, memory)) = counters {
        gate = gate.with_counters(counters).with_approval_memory(memory);
    }
    let gate = Arc::new(gate);

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

    let admin_state = Arc::new(AdminState { policy: gate.policy.clone(), metrics: metrics.clone() });
    if args.stdio {
        let admin = tokio::spawn(listener::serve(
            admin_listener,
            admin_listen,
            admin_state,
            metrics.clone(),
            admin::admin,
            shutdown_rx,
        ));
        let result = stdio::run(gate, &child_command(&args)?, args.max_body_bytes).await;
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
            Upstream::Http(Box::new(
                HttpUpstream::new(
                    uri.clone(),
                    Duration::from_secs(args.upstream_timeout_seconds),
                    args.upstream_transport,
                    args.max_sessions.max(1),
                    per_identity,
                    Duration::from_secs(args.session_idle_seconds),
                )
                .with_custody(custody(&args, authn.is_some())?),
            ))
        }
        None => Upstream::Stdio(Sessions::new(
            Opener::Command(child_command(&args)?),
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
    let mcp_listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(listen = %args.listen, admin = %args.admin_listen, "serving MCP at /mcp (and /sse, /messages for 2024-11-05 clients)");
    let app = Arc::new(App { gate, upstream, max_body: args.max_body_bytes, owners });
    let legacy = Arc::new(LegacyClients::new(app.clone(), args.max_sessions.max(1)));
    let router = Arc::new(Router { app: app.clone(), legacy });
    let admin = tokio::spawn(listener::serve(
        admin_listener,
        admin_listen,
        admin_state,
        metrics.clone(),
        admin::admin,
        shutdown_rx.clone(),
    ));
    let mcp_listen = Listen { name: "mcp", limits, front };
    let main = tokio::spawn(listener::serve(mcp_listener, mcp_listen, router, metrics, router::handle, shutdown_rx));
    shutdown_signal().await;
    tracing::info!("shutting down: no new connections, finishing in-flight calls");
    let _ = shutdown_tx.send(true);
    let _ = main.await;
    let _ = admin.await;
    app.upstream.shutdown();
    Ok(())
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
