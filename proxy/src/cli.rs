//! The command line: the flags (`Args`), checked into a [`Config`] before any port is
//! bound or the runtime starts (a usage error exits 64, an invalid policy 78), and the
//! parts the flags configure (caller authentication, credential custody, the child
//! command, the counter store).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{ArgGroup, Parser};

use toolgate_counters::{OnFailure, RedisConfig, RedisCounters, SharedCounters, redact};

use crate::control as operator;
use crate::live::files as policy_files;
use crate::live::{Effective, Source};
use crate::transport::client::{ChildCommand, ChildCredential};
use crate::transport::frontdoor::HostRules;
use crate::transport::listener::Front;
use crate::transport::upstream::Transport;

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
    pub(crate) policies: Vec<PathBuf>,

    /// Get the policy from the toolgate operator's stream at this https:// URL (the
    /// sidecar mode). Exactly one of --policy and --operator.
    #[arg(long, env = "TOOLGATE_OPERATOR", value_name = "URL", requires = "token_file")]
    pub(crate) operator: Option<hyper::Uri>,

    /// Bearer token for the operator (a projected service account token); read again on
    /// every connection and acknowledgement, since it rotates.
    #[arg(long, env = "TOOLGATE_TOKEN_FILE", value_name = "PATH", requires = "operator")]
    pub(crate) token_file: Option<PathBuf>,

    /// PEM file with the roots that sign the operator's certificate (default: the
    /// platform's roots). Read again on every connection.
    #[arg(long, env = "TOOLGATE_CA_FILE", value_name = "PATH", requires = "operator")]
    pub(crate) ca_file: Option<PathBuf>,

    /// Directory where the last good policy set from the operator is kept, so that a
    /// restarted proxy enforces it at once, before the operator answers.
    #[arg(long, env = "TOOLGATE_STATE_DIR", value_name = "DIR", requires = "operator")]
    pub(crate) state_dir: Option<PathBuf>,

    /// Client-facing MCP endpoint (served at /mcp).
    #[arg(long, env = "TOOLGATE_LISTEN", default_value = "127.0.0.1:8080")]
    pub(crate) listen: SocketAddr,

    /// Admin endpoint: /metrics, /healthz, /readyz, /policy.
    #[arg(long, env = "TOOLGATE_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub(crate) admin_listen: SocketAddr,

    /// Upstream MCP endpoint, e.g. http://127.0.0.1:3000/mcp (Streamable HTTP) or
    /// http://127.0.0.1:3000/sse (the 2024-11-05 HTTP+SSE transport).
    #[arg(long, env = "TOOLGATE_UPSTREAM", conflicts_with = "command")]
    pub(crate) upstream: Option<hyper::Uri>,

    /// What --upstream speaks: auto (detected per the MCP spec's backwards compatibility:
    /// POST initialize, on a 4xx GET an SSE stream that begins with an endpoint event),
    /// streamable, or sse (2024-11-05 HTTP+SSE; the URL is the SSE endpoint).
    #[arg(long, env = "TOOLGATE_UPSTREAM_TRANSPORT", value_enum, default_value = "auto", requires = "upstream")]
    pub(crate) upstream_transport: Transport,

    /// Speak MCP over stdio to the client (for desktop clients) instead of HTTP.
    #[arg(long, env = "TOOLGATE_STDIO", requires = "command")]
    pub(crate) stdio: bool,

    /// Trust this header (set by a gateway in front of toolgate) as the caller identity
    /// instead of the fingerprint of the Authorization header.
    #[arg(long, env = "TOOLGATE_IDENTITY_HEADER")]
    pub(crate) identity_header: Option<hyper::header::HeaderName>,

    /// Authenticate callers by bearer tokens (JWT) from this OAuth 2.1 / OIDC issuer: its
    /// keys come from `<issuer>/.well-known/openid-configuration` (or --oidc-jwks-uri).
    /// Repeatable. Needs --oidc-audience.
    #[arg(long = "oidc-issuer", env = "TOOLGATE_OIDC_ISSUERS", value_delimiter = ',', conflicts_with_all = ["identity_header", "stdio"])]
    pub(crate) oidc_issuers: Vec<String>,

    /// Audience a token must name (`aud`): this MCP server's URL or name. Repeatable.
    #[arg(long = "oidc-audience", env = "TOOLGATE_OIDC_AUDIENCES", value_delimiter = ',')]
    pub(crate) oidc_audiences: Vec<String>,

    /// The issuer's key set URL, when it has no discovery document (one --oidc-issuer only).
    #[arg(long = "oidc-jwks-uri", env = "TOOLGATE_OIDC_JWKS_URI")]
    pub(crate) oidc_jwks_uri: Option<String>,

    /// CA bundle (PEM) for the issuers' HTTPS (default: the platform's roots).
    #[arg(long = "oidc-ca-file", env = "TOOLGATE_OIDC_CA_FILE")]
    pub(crate) oidc_ca_file: Option<PathBuf>,

    /// Authenticate callers by Kubernetes service-account tokens meant for this audience
    /// (a projected token with `audience:` set to it), verified against the cluster's keys.
    #[arg(long = "k8s-token-audience", env = "TOOLGATE_K8S_TOKEN_AUDIENCE", conflicts_with_all = ["identity_header", "stdio"])]
    pub(crate) k8s_token_audience: Option<String>,

    /// The cluster's service-account issuer (`--service-account-issuer` of the apiserver).
    #[arg(
        long = "k8s-issuer",
        env = "TOOLGATE_K8S_ISSUER",
        default_value = "https://kubernetes.default.svc.cluster.local"
    )]
    pub(crate) k8s_issuer: String,

    /// Where the cluster publishes its service-account keys.
    #[arg(
        long = "k8s-jwks-uri",
        env = "TOOLGATE_K8S_JWKS_URI",
        default_value = "https://kubernetes.default.svc/openid/v1/jwks"
    )]
    pub(crate) k8s_jwks_uri: String,

    /// CA bundle for the apiserver's HTTPS.
    #[arg(
        long = "k8s-ca-file",
        env = "TOOLGATE_K8S_CA_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    )]
    pub(crate) k8s_ca_file: PathBuf,

    /// The sidecar's own API token, sent when fetching the cluster's keys.
    #[arg(
        long = "k8s-api-token-file",
        env = "TOOLGATE_K8S_API_TOKEN_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub(crate) k8s_api_token_file: PathBuf,

    /// Authenticate callers by static API keys: a file of `name sha256:<hex>` lines (the
    /// SHA-256 of each key; a mounted Secret), reloaded when it changes.
    #[arg(long = "api-keys-file", env = "TOOLGATE_API_KEYS_FILE", conflicts_with_all = ["identity_header", "stdio"])]
    pub(crate) api_keys_file: Option<PathBuf>,

    /// With an identity source configured, still let callers without a credential through
    /// (as one anonymous identity). A credential that is sent must verify.
    #[arg(long, env = "TOOLGATE_ALLOW_ANONYMOUS")]
    pub(crate) allow_anonymous: bool,

    /// This MCP endpoint's public URL: served as OAuth protected-resource metadata
    /// (RFC 9728) at /.well-known/oauth-protected-resource/... naming the --oidc-issuer(s),
    /// and named in 401 answers so MCP clients find where to log in.
    #[arg(long = "resource-url", env = "TOOLGATE_RESOURCE_URL")]
    pub(crate) resource_url: Option<String>,

    /// A file holding the upstream's credential (a mounted Secret): the proxy sets it on
    /// every request upstream (--upstream-credential-header), so callers never need it.
    /// With --child-credential-env, the child process gets it in its environment instead.
    #[arg(
        long = "upstream-credential-file",
        env = "TOOLGATE_UPSTREAM_CREDENTIAL_FILE",
        requires = "credential_target",
        conflicts_with = "upstream_credential_env"
    )]
    pub(crate) upstream_credential_file: Option<PathBuf>,

    /// The name of an environment variable holding the upstream's credential (as
    /// --upstream-credential-file).
    #[arg(long = "upstream-credential-env", env = "TOOLGATE_UPSTREAM_CREDENTIAL_ENV", requires = "credential_target")]
    pub(crate) upstream_credential_env: Option<String>,

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
    pub(crate) child_credential_env: Option<String>,

    /// The header that carries the upstream's credential.
    #[arg(
        long = "upstream-credential-header",
        env = "TOOLGATE_UPSTREAM_CREDENTIAL_HEADER",
        default_value = "authorization"
    )]
    pub(crate) upstream_credential_header: hyper::header::HeaderName,

    /// The scheme written before the credential (`Bearer <key>`); empty: the value as is.
    #[arg(long = "upstream-credential-scheme", env = "TOOLGATE_UPSTREAM_CREDENTIAL_SCHEME", default_value = "Bearer")]
    pub(crate) upstream_credential_scheme: String,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "TOOLGATE_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub(crate) max_body_bytes: usize,

    /// Write raw argument values into audit lines (off: only keys and a hash).
    #[arg(long, env = "TOOLGATE_AUDIT_ARGUMENTS")]
    pub(crate) audit_arguments: bool,

    /// How often the policy files are checked for changes, in milliseconds.
    #[arg(long, env = "TOOLGATE_RELOAD_INTERVAL_MS", default_value_t = 500)]
    pub(crate) reload_interval_ms: u64,

    /// Most sessions the proxy holds upstream for its clients: child processes (`-- CMD`)
    /// or connections to a 2024-11-05 HTTP+SSE upstream; also the most open `/sse`
    /// client streams.
    #[arg(long, env = "TOOLGATE_MAX_SESSIONS", default_value_t = 32)]
    pub(crate) max_sessions: usize,

    /// Sessions one caller identity may hold upstream at once (its fair share of
    /// --max-sessions); at its share, its least recently used idle session is ended to make
    /// room. 0: a quarter of --max-sessions (at least 1), or all of them when every caller
    /// is one identity (a child process without --identity-header).
    #[arg(long, env = "TOOLGATE_MAX_SESSIONS_PER_IDENTITY", default_value_t = 0)]
    pub(crate) max_sessions_per_identity: usize,

    /// Idle time after which a session's child process is stopped (or its connection to a
    /// 2024-11-05 HTTP+SSE upstream closed), in seconds. A session with a waiting call or
    /// an open GET stream is not idle.
    #[arg(long, env = "TOOLGATE_SESSION_IDLE_SECONDS", default_value_t = 300)]
    pub(crate) session_idle_seconds: u64,

    /// Time to wait for an upstream answer (response head), in seconds.
    #[arg(long, env = "TOOLGATE_UPSTREAM_TIMEOUT_SECONDS", default_value_t = 300)]
    pub(crate) upstream_timeout_seconds: u64,

    /// A request head must arrive whole within this many seconds (it also bounds the wait
    /// for the next request on an HTTP/1.1 keep-alive connection).
    #[arg(long, env = "TOOLGATE_HEADER_READ_TIMEOUT_SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub(crate) header_read_timeout_seconds: u64,

    /// A request body must arrive whole within this many seconds of its head; else 408 and
    /// the connection is closed.
    #[arg(long, env = "TOOLGATE_BODY_READ_TIMEOUT_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub(crate) body_read_timeout_seconds: u64,

    /// A client connection with no request in flight for this many seconds is closed (a
    /// call waiting for its answer or an approval, or an open SSE stream, is in flight).
    #[arg(long, env = "TOOLGATE_IDLE_CONNECTION_TIMEOUT_SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub(crate) idle_connection_timeout_seconds: u64,

    /// Most open client connections per listener; more get 503 and are closed. Default
    /// 1024, lowered to fit the open-file limit (two descriptors per connection).
    #[arg(long, env = "TOOLGATE_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) max_connections: Option<u64>,

    /// Host names the MCP endpoints accept besides the defaults (localhost, 127.0.0.1,
    /// [::1], the listen address; on 0.0.0.0 also IP addresses, Service short names and
    /// *.svc, *.svc.cluster.local), comma-separated; `*.example.com` for subdomains, `*` for
    /// any. Other Hosts get 403 (DNS-rebinding protection).
    #[arg(long, env = "TOOLGATE_ALLOWED_HOSTS", value_delimiter = ',')]
    pub(crate) allowed_hosts: Vec<String>,

    /// Origins accepted besides http(s) on localhost, 127.0.0.1, [::1] and the allowed
    /// host names (any port), comma-separated: `https://app.example.com[:PORT]`,
    /// `https://*.example.com`, `null`, or `*` for any. Requests without Origin pass.
    #[arg(long, env = "TOOLGATE_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub(crate) allowed_origins: Vec<String>,

    /// Serve /policy on the admin listener to any peer (default: loopback peers only, e.g.
    /// through kubectl port-forward).
    #[arg(long, env = "TOOLGATE_ADMIN_POLICY_PUBLIC")]
    pub(crate) admin_policy_public: bool,

    /// Pod name for audit lines (the sidecar gets it from the downward API).
    #[arg(long, env = "TOOLGATE_POD_NAME")]
    pub(crate) pod_name: Option<String>,

    /// The MCP server to run as a child process, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub(crate) command: Vec<String>,

    /// Where rate limits are counted (docs/proxy.md, Counter store).
    #[command(flatten)]
    pub(crate) store: StoreArgs,

    /// Threads that serve requests: 1 (the default) is a single-threaded runtime (no
    /// cross-thread wake-ups: the cheapest per call, docs/benchmarks.md); N > 1 a
    /// multi-threaded one with N workers; 0 one worker per CPU. With a Redis
    /// --counter-store, 1 means 2 (a decision waits for Redis on its worker).
    #[arg(long, env = "TOOLGATE_WORKER_THREADS", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(0..=256))]
    pub(crate) worker_threads: u64,
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
pub enum Start {
    Files(toolgate_policy::Policy),
    /// The operator, and what to enforce until it answers (a persisted set, or nothing).
    Operator(operator::Config, Effective),
}

/// The checked command line: what [`crate::run::main`] starts.
pub struct Config {
    pub args: Args,
    pub start: Start,
    pub front: Arc<Front>,
}

impl std::fmt::Debug for Start {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Start::Files(_) => "Start::Files",
            Start::Operator(..) => "Start::Operator",
        })
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config").field("args", &self.args).field("start", &self.start).finish_non_exhaustive()
    }
}

/// A command line the proxy refuses before it starts: the exit code and why.
#[derive(Debug)]
pub struct Refused {
    pub code: u8,
    pub message: String,
}

impl Refused {
    fn usage(message: impl std::fmt::Display) -> Self {
        Self { code: 64, message: message.to_string() }
    }
}

impl Config {
    /// Checks `args` (reads the policy files or the persisted policy set; binds nothing).
    pub fn from_args(args: Args) -> Result<Self, Refused> {
        if args.upstream.is_none() && args.command.is_empty() {
            return Err(Refused::usage(
                "give an upstream: --upstream URL, or -- CMD ARGS to run the MCP server as a child",
            ));
        }
        let hosts = match HostRules::new(args.listen, &args.allowed_hosts, &args.allowed_origins) {
            Ok(h) => h,
            Err(e) => return Err(Refused::usage(e)),
        };
        let front = Arc::new(Front { hosts, admin_policy_public: args.admin_policy_public });
        let start = match &args.operator {
            Some(uri) => {
                let endpoint = match operator::Endpoint::parse(uri) {
                    Ok(e) => e,
                    Err(e) => return Err(Refused::usage(e)),
                };
                let Some(token_file) = args.token_file.clone() else {
                    return Err(Refused::usage("--operator needs --token-file"));
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
                Err(e) => return Err(Refused { code: 78, message: format!("invalid policy:\n{e}") }),
            },
        };
        Ok(Config { args, start, front })
    }
}

/// The caller authentication the flags configure, if any.
pub(crate) fn authentication(args: &Args) -> anyhow::Result<Option<Arc<crate::gate::authn::Authn>>> {
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
pub(crate) fn custody(args: &Args, authenticated: bool) -> anyhow::Result<crate::transport::upstream::Custody> {
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
pub(crate) fn child_command(args: &Args) -> anyhow::Result<ChildCommand> {
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

pub(crate) fn store_password(args: &StoreArgs) -> anyhow::Result<Option<String>> {
    if let Some(path) = &args.password_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--counter-store-password-file {}", path.display()))?;
        return Ok(Some(text.trim_end_matches(['\n', '\r']).to_owned()));
    }
    Ok(std::env::var("TOOLGATE_COUNTER_STORE_PASSWORD").ok().filter(|p| !p.is_empty()))
}

/// The counter store the flags ask for: `None` for `local`. Call it inside the runtime.
pub(crate) fn counter_store(args: &StoreArgs) -> anyhow::Result<Option<SharedCounters>> {
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
