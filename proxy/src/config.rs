//! The command line (`Args`), checked before anything starts, and the wiring of the
//! modules into a running proxy.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{ArgGroup, Parser};

use toolgate_counters::{OnFailure, RedisConfig, RedisCounters, SharedCounters, redact};

use crate::admin::{self, AdminState};
use crate::approval::Approvals;
use crate::control as operator;
use crate::gate::{Approvers, Gate, IdentitySource};
use crate::live::files as policy_files;
use crate::live::{Effective, Source};
use crate::telemetry::Telemetry;
use crate::telemetry::audit::{AuditSink, Target};
use crate::telemetry::metrics::Metrics;
use crate::transport::client::{ChildCommand, ChildCredential};
use crate::transport::connections::Limits;
use crate::transport::frontdoor::HostRules;
use crate::transport::legacy::LegacyClients;
use crate::transport::listener::{self, Front, Listen};
use crate::transport::mcp_http::App;
use crate::transport::owners::Owners;
use crate::transport::router::{self, Router};
use crate::transport::sessions::{Opener, Sessions};
use crate::transport::upstream::{HttpUpstream, Transport, Upstream};
use crate::transport::{connections, stdio};

/// Deterministic rules in front of every MCP tool call.
#[derive(Parser, Debug)]
#[command(name = "toolgate-proxy", version, about)]
#[command(group(ArgGroup::new("source").required(true).multiple(false).args(["policies", "operator"])))]
#[command(group(ArgGroup::new("credential_target").multiple(false).args(["upstream", "child_credential_env"])))]
#[command(group(
    ArgGroup::new("credential_source").multiple(false).args(["upstream_credential_file", "upstream_credential_env"])
))]
pub struct Args {
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

    /// Authenticate callers by bearer tokens (JWT) from this OAuth 2.1 / OIDC issuer: its
    /// keys come from `<issuer>/.well-known/openid-configuration` (or --oidc-jwks-uri).
    /// Repeatable. Needs --oidc-audience.
    #[arg(long = "oidc-issuer", env = "TOOLGATE_OIDC_ISSUERS", value_delimiter = ',', conflicts_with_all = ["identity_header", "stdio"])]
    oidc_issuers: Vec<String>,

    /// Audience a token must name (`aud`): this MCP server's URL or name. Repeatable.
    #[arg(long = "oidc-audience", env = "TOOLGATE_OIDC_AUDIENCES", value_delimiter = ',')]
    oidc_audiences: Vec<String>,

    /// The issuer's key set URL, when it has no discovery document (one --oidc-issuer only).
    #[arg(long = "oidc-jwks-uri", env = "TOOLGATE_OIDC_JWKS_URI")]
    oidc_jwks_uri: Option<String>,

    /// CA bundle (PEM) for the issuers' HTTPS (default: the platform's roots).
    #[arg(long = "oidc-ca-file", env = "TOOLGATE_OIDC_CA_FILE")]
    oidc_ca_file: Option<PathBuf>,

    /// Authenticate callers by Kubernetes service-account tokens meant for this audience
    /// (a projected token with `audience:` set to it), verified against the cluster's keys.
    #[arg(long = "k8s-token-audience", env = "TOOLGATE_K8S_TOKEN_AUDIENCE", conflicts_with_all = ["identity_header", "stdio"])]
    k8s_token_audience: Option<String>,

    /// The cluster's service-account issuer (`--service-account-issuer` of the apiserver).
    #[arg(
        long = "k8s-issuer",
        env = "TOOLGATE_K8S_ISSUER",
        default_value = "https://kubernetes.default.svc.cluster.local"
    )]
    k8s_issuer: String,

    /// Where the cluster publishes its service-account keys.
    #[arg(
        long = "k8s-jwks-uri",
        env = "TOOLGATE_K8S_JWKS_URI",
        default_value = "https://kubernetes.default.svc/openid/v1/jwks"
    )]
    k8s_jwks_uri: String,

    /// CA bundle for the apiserver's HTTPS.
    #[arg(
        long = "k8s-ca-file",
        env = "TOOLGATE_K8S_CA_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    )]
    k8s_ca_file: PathBuf,

    /// The sidecar's own API token, sent when fetching the cluster's keys.
    #[arg(
        long = "k8s-api-token-file",
        env = "TOOLGATE_K8S_API_TOKEN_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    k8s_api_token_file: PathBuf,

    /// Authenticate callers by static API keys: a file of `name sha256:<hex>` lines (the
    /// SHA-256 of each key; a mounted Secret), reloaded when it changes.
    #[arg(long = "api-keys-file", env = "TOOLGATE_API_KEYS_FILE", conflicts_with_all = ["identity_header", "stdio"])]
    api_keys_file: Option<PathBuf>,

    /// With an identity source configured, still let callers without a credential through
    /// (as one anonymous identity). A credential that is sent must verify.
    #[arg(long, env = "TOOLGATE_ALLOW_ANONYMOUS")]
    allow_anonymous: bool,

    /// This MCP endpoint's public URL: served as OAuth protected-resource metadata
    /// (RFC 9728) at /.well-known/oauth-protected-resource/... naming the --oidc-issuer(s),
    /// and named in 401 answers so MCP clients find where to log in.
    #[arg(long = "resource-url", env = "TOOLGATE_RESOURCE_URL")]
    resource_url: Option<String>,

    /// A file holding the upstream's credential (a mounted Secret): the proxy sets it on
    /// every request upstream (--upstream-credential-header), so callers never need it.
    /// With --child-credential-env, the child process gets it in its environment instead.
    #[arg(
        long = "upstream-credential-file",
        env = "TOOLGATE_UPSTREAM_CREDENTIAL_FILE",
        requires = "credential_target",
        conflicts_with = "upstream_credential_env"
    )]
    upstream_credential_file: Option<PathBuf>,

    /// The name of an environment variable holding the upstream's credential (as
    /// --upstream-credential-file).
    #[arg(long = "upstream-credential-env", env = "TOOLGATE_UPSTREAM_CREDENTIAL_ENV", requires = "credential_target")]
    upstream_credential_env: Option<String>,

    /// Child-process custody: the MCP server run after `--` gets the upstream credential
    /// (--upstream-credential-file or -env, as is: no header, no scheme) in this environment
    /// variable, e.g. RUNPOD_API_KEY. The file is read again for every child, so a rotated
    /// Secret reaches the next session. A child never sees the caller's headers.
    #[arg(
        long = "child-credential-env",
        env = "TOOLGATE_CHILD_CREDENTIAL_ENV",
        conflicts_with = "upstream",
        requires = "credential_source"
    )]
    child_credential_env: Option<String>,

    /// The header that carries the upstream's credential.
    #[arg(
        long = "upstream-credential-header",
        env = "TOOLGATE_UPSTREAM_CREDENTIAL_HEADER",
        default_value = "authorization"
    )]
    upstream_credential_header: hyper::header::HeaderName,

    /// The scheme written before the credential (`Bearer <key>`); empty: the value as is.
    #[arg(long = "upstream-credential-scheme", env = "TOOLGATE_UPSTREAM_CREDENTIAL_SCHEME", default_value = "Bearer")]
    upstream_credential_scheme: String,

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
    store: StoreArgs,

    /// Threads that serve requests: 1 (the default) is a single-threaded runtime (no
    /// cross-thread wake-ups: the cheapest per call, docs/benchmarks.md); N > 1 a
    /// multi-threaded one with N workers; 0 one worker per CPU. With a Redis
    /// --counter-store, 1 means 2 (a decision waits for Redis on its worker).
    #[arg(long, env = "TOOLGATE_WORKER_THREADS", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(0..=256))]
    worker_threads: u64,
}

/// The counter-store flags of `toolgate-proxy`.
#[derive(clap::Args, Debug, Clone)]
pub struct StoreArgs {
    /// Where rate limits are counted: `local` (this process) or a Redis/Valkey URL shared by
    /// every replica: `redis://host:6379[/db]`, `rediss://…` (TLS), `redis+unix:///path`,
    /// a Redis Cluster `redis+cluster://h1:6379,h2:6379` (`rediss+cluster://` for TLS), or
    /// Sentinels naming the master `redis+sentinel://s1:26379,s2:26379/<master>[/db]`.
    /// Put the password in --counter-store-password-file or TOOLGATE_COUNTER_STORE_PASSWORD,
    /// not in the URL.
    #[arg(long = "counter-store", env = "TOOLGATE_COUNTER_STORE", default_value = "local")]
    pub url: String,
    /// Prepended to every Redis key: a policy's counters are shared by the proxies that use
    /// the same prefix (and policy document names).
    #[arg(long = "counter-store-prefix", env = "TOOLGATE_COUNTER_STORE_PREFIX", default_value = toolgate_counters::DEFAULT_PREFIX)]
    pub prefix: String,
    /// Bound on one store operation (a decision, a rollback), connecting included; past it
    /// the limited call is handled as --counter-store-on-failure says.
    #[arg(long = "counter-store-timeout-ms", env = "TOOLGATE_COUNTER_STORE_TIMEOUT_MS", default_value_t = 250)]
    pub timeout_ms: u64,
    /// Redis ACL user (overrides the URL's).
    #[arg(long = "counter-store-username", env = "TOOLGATE_COUNTER_STORE_USERNAME")]
    pub username: Option<String>,
    /// File holding the Redis password (a mounted Secret); trailing newlines are dropped.
    /// The environment variable TOOLGATE_COUNTER_STORE_PASSWORD is the alternative.
    #[arg(long = "counter-store-password-file", env = "TOOLGATE_COUNTER_STORE_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// PEM roots that sign a `rediss://` store's certificate (default: the platform's).
    #[arg(long = "counter-store-ca-file", env = "TOOLGATE_COUNTER_STORE_CA_FILE")]
    pub store_ca_file: Option<PathBuf>,
    /// What a limited call gets when the store cannot decide: `closed` (refused,
    /// decision `store_unavailable`), `local` (counted in this process against
    /// max / --counter-store-replicas), `open` (admitted uncounted).
    #[arg(long = "counter-store-on-failure", env = "TOOLGATE_COUNTER_STORE_ON_FAILURE", default_value = "closed")]
    pub on_failure: String,
    /// How many replicas share the limits: while the store is down, a `local` fallback (this
    /// flag's or a policy's `counters.on_store_failure: local`) admits max / replicas here.
    #[arg(long = "counter-store-replicas", env = "TOOLGATE_COUNTER_STORE_REPLICAS", default_value_t = 1)]
    pub replicas: u64,
}

/// Where the policy comes from, checked before the runtime starts.
#[allow(clippy::large_enum_variant, reason = "built once at start")]
enum Start {
    Files(toolgate_policy::Policy),
    /// The operator, and what to enforce until it answers (a persisted set, or nothing).
    Operator(operator::Config, Effective),
}

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
            let initial = match args.state_dir.as_deref().map(crate::live::set::load_persisted) {
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
    // In `--stdio` mode stdout carries the protocol, so audit lines go to stderr.
    let sink = Arc::new(AuditSink::new(if args.stdio { Target::Stderr } else { Target::Stdout }));
    // Audit lines are buffered (telemetry::audit): written when a runtime thread runs out
    // of work, and on the way out — also on a panic (the release profile aborts).
    let weak = Arc::downgrade(&sink);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Some(s) = weak.upgrade() {
            s.try_flush();
        }
        previous(info);
    }));
    let idle = sink.clone();
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
    let runtime = match builder
        .enable_all()
        .on_thread_park(move || {
            if idle.has_pending() {
                idle.flush();
            }
        })
        .build()
    {
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

/// The caller authentication the flags configure, if any.
fn authentication(args: &Args) -> anyhow::Result<Option<Arc<crate::gate::authn::Authn>>> {
    use toolgate_identity::{
        ApiKeys, AuthConfig, Authenticator, DEFAULT_ALGORITHMS, FetchOptions, IssuerConfig, IssuerKind,
        ProtectedResource,
    };
    let mut issuers = Vec::new();
    if !args.oidc_issuers.is_empty() && args.oidc_audiences.is_empty() {
        anyhow::bail!("--oidc-issuer needs --oidc-audience: tokens must be meant for this server");
    }
    if args.oidc_jwks_uri.is_some() && args.oidc_issuers.len() != 1 {
        anyhow::bail!("--oidc-jwks-uri names the key set of one issuer: give exactly one --oidc-issuer");
    }
    for issuer in &args.oidc_issuers {
        issuers.push(IssuerConfig {
            issuer: issuer.clone(),
            audiences: args.oidc_audiences.clone(),
            jwks_uri: args.oidc_jwks_uri.clone(),
            algorithms: DEFAULT_ALGORITHMS.to_vec(),
            kind: IssuerKind::Oidc,
            fetch: FetchOptions { ca_file: args.oidc_ca_file.clone(), bearer_token_file: None },
        });
    }
    if let Some(aud) = &args.k8s_token_audience {
        issuers.push(IssuerConfig {
            issuer: args.k8s_issuer.clone(),
            audiences: vec![aud.clone()],
            jwks_uri: Some(args.k8s_jwks_uri.clone()),
            algorithms: DEFAULT_ALGORITHMS.to_vec(),
            kind: IssuerKind::Kubernetes,
            fetch: FetchOptions {
                ca_file: Some(args.k8s_ca_file.clone()),
                bearer_token_file: Some(args.k8s_api_token_file.clone()),
            },
        });
    }
    let api_keys = match &args.api_keys_file {
        Some(p) => Some(ApiKeys::load(p).map_err(|e| anyhow::anyhow!(e))?),
        None => None,
    };
    if issuers.is_empty() && api_keys.is_none() {
        if args.allow_anonymous {
            anyhow::bail!(
                "--allow-anonymous needs an identity source (--oidc-issuer, --k8s-token-audience, --api-keys-file)"
            );
        }
        if args.resource_url.is_some() {
            anyhow::bail!(
                "--resource-url needs an identity source (--oidc-issuer, --k8s-token-audience, --api-keys-file)"
            );
        }
        return Ok(None);
    }
    if let Some(keys) = &api_keys {
        keys.spawn_reloader();
    }
    let resource = args
        .resource_url
        .as_ref()
        .map(|url| ProtectedResource::new(url.clone(), args.oidc_issuers.clone(), Vec::new()));
    let authenticator = Authenticator::new(AuthConfig { issuers, api_keys, allow_anonymous: args.allow_anonymous })
        .map_err(|e| anyhow::anyhow!(e))?;
    tracing::info!(
        oidc_issuers = args.oidc_issuers.len(),
        kubernetes = args.k8s_token_audience.is_some(),
        api_keys = args.api_keys_file.is_some(),
        anonymous = args.allow_anonymous,
        "callers are authenticated; their Authorization is never forwarded upstream"
    );
    Ok(Some(Arc::new(crate::gate::authn::Authn::new(authenticator, resource, args.allow_anonymous))))
}

/// What happens to credentials on the way upstream.
fn custody(args: &Args, authenticated: bool) -> anyhow::Result<crate::transport::upstream::Custody> {
    let secret = match (&args.upstream_credential_file, &args.upstream_credential_env) {
        (Some(p), _) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("--upstream-credential-file {}", p.display()))?
                .trim()
                .to_owned(),
        ),
        (None, Some(var)) => Some(
            std::env::var(var).with_context(|| format!("--upstream-credential-env {var}: not set"))?.trim().to_owned(),
        ),
        (None, None) => None,
    };
    let set = match secret {
        None => None,
        Some(s) if s.is_empty() => anyhow::bail!("the upstream credential is empty"),
        Some(s) => {
            let value = if args.upstream_credential_scheme.is_empty() {
                s
            } else {
                format!("{} {s}", args.upstream_credential_scheme)
            };
            let mut v = hyper::header::HeaderValue::from_str(&value)
                .map_err(|_| anyhow::anyhow!("the upstream credential is not a valid header value"))?;
            v.set_sensitive(true);
            Some((args.upstream_credential_header.clone(), v))
        }
    };
    // Whoever sets the upstream's credential, the caller's own never goes along with it.
    let strip_caller = authenticated || set.as_ref().is_some_and(|(n, _)| *n == hyper::header::AUTHORIZATION);
    Ok(crate::transport::upstream::Custody { strip_caller, set })
}

/// The child MCP server to run, with the credential it gets (child-process custody).
fn child_command(args: &Args) -> anyhow::Result<ChildCommand> {
    let Some(var) = &args.child_credential_env else {
        return Ok(ChildCommand::new(args.command.clone()));
    };
    let credential = match (&args.upstream_credential_file, &args.upstream_credential_env) {
        (Some(p), _) => ChildCredential::from_file(var, p.clone()),
        (None, Some(env)) => {
            let value = std::env::var(env).with_context(|| format!("--upstream-credential-env {env}: not set"))?;
            ChildCredential::from_value(var, &value)
        }
        (None, None) => bail!("--child-credential-env needs --upstream-credential-file or --upstream-credential-env"),
    }
    .map_err(|e| anyhow::anyhow!("--child-credential-env {var}: {e}"))?;
    tracing::info!(var = credential.var(), "the MCP server's upstream credential is the proxy's to give");
    Ok(ChildCommand { argv: args.command.clone(), credential: Some(credential) })
}

fn store_password(args: &StoreArgs) -> anyhow::Result<Option<String>> {
    if let Some(path) = &args.password_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--counter-store-password-file {}", path.display()))?;
        return Ok(Some(text.trim_end_matches(['\n', '\r']).to_owned()));
    }
    Ok(std::env::var("TOOLGATE_COUNTER_STORE_PASSWORD").ok().filter(|p| !p.is_empty()))
}

/// The counter store the flags ask for: `None` for `local`. Call it inside the runtime.
fn counter_store(args: &StoreArgs) -> anyhow::Result<Option<SharedCounters>> {
    if args.url == "local" {
        return Ok(None);
    }
    const SCHEMES: [&str; 6] =
        ["redis://", "rediss://", "redis+unix://", "redis+cluster://", "rediss+cluster://", "redis+sentinel://"];
    if !SCHEMES.iter().any(|scheme| args.url.starts_with(scheme)) {
        bail!(
            "--counter-store {}: use `local` or a redis://, rediss://, redis+unix://, redis+cluster://, \
             rediss+cluster:// or redis+sentinel:// URL",
            redact(&args.url)
        );
    }
    if args.timeout_ms == 0 || args.timeout_ms > 60_000 {
        bail!("--counter-store-timeout-ms {}: from 1 to 60000", args.timeout_ms);
    }
    if args.replicas == 0 {
        bail!("--counter-store-replicas must be at least 1");
    }
    let on_failure =
        match args.on_failure.parse::<OnFailure>().map_err(|e| anyhow::anyhow!("--counter-store-on-failure {e}"))? {
            OnFailure::Local { .. } => OnFailure::Local { replicas: args.replicas },
            other => other,
        };
    if redact(&args.url) != args.url {
        tracing::warn!(
            "the --counter-store URL holds a password: processes on this host can read it; use --counter-store-password-file"
        );
    }
    let config = RedisConfig {
        username: args.username.clone(),
        password: store_password(args)?,
        prefix: args.prefix.clone(),
        timeout: Duration::from_millis(args.timeout_ms),
        ca_pem: match &args.store_ca_file {
            Some(path) => {
                Some(std::fs::read(path).with_context(|| format!("--counter-store-ca-file {}", path.display()))?)
            }
            None => None,
        },
        ..RedisConfig::new(args.url.clone())
    };
    let redis = RedisCounters::new(&config)?;
    tracing::info!(store = %redact(&args.url), prefix = %args.prefix, ?on_failure, "rate limits are counted in the shared store");
    Ok(Some(SharedCounters::new(redis, on_failure)?.with_replicas(args.replicas)))
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

    /// Custody flags go together: a credential needs somewhere to go (an HTTP upstream or a
    /// child's variable), and a child's variable needs a credential.
    #[test]
    fn custody_flags_need_each_other() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["toolgate-proxy", "--policy", "p.yaml"];
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv)
        };
        let child = parse(&["--upstream-credential-file", "/k", "--child-credential-env", "RUNPOD_API_KEY", "--", "s"])
            .expect("child custody parses");
        assert_eq!(child.child_credential_env.as_deref(), Some("RUNPOD_API_KEY"));
        assert!(parse(&["--upstream-credential-file", "/k", "--upstream", "http://u/mcp"]).is_ok());
        assert!(parse(&["--upstream-credential-env", "K", "--child-credential-env", "V", "--", "s"]).is_ok());
        for bad in [
            &["--child-credential-env", "RUNPOD_API_KEY", "--", "s"][..],
            &["--upstream-credential-file", "/k", "--", "s"],
            &["--upstream-credential-file", "/k", "--child-credential-env", "V", "--upstream", "http://u/mcp"],
            &[
                "--upstream-credential-file",
                "/k",
                "--upstream-credential-env",
                "K",
                "--child-credential-env",
                "V",
                "--",
                "s",
            ],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
