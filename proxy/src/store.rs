//! Where the gate counts limits: this process (`--counter-store local`, the default) or a
//! Redis/Valkey shared by every replica (`--counter-store redis://…`), with its flags, its
//! metrics and a monitor that keeps the store's state fresh for `/readyz` and `/metrics`.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, bail};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use toolgate_counters::{OnFailure, RedisConfig, RedisCounters, SharedCounters, redact};
use toolgate_policy::CounterStore;

/// The counter-store flags of `toolgate-proxy`.
#[derive(clap::Args, Debug, Clone)]
pub struct StoreArgs {
    /// Where rate limits are counted: `local` (this process) or a Redis/Valkey URL shared by
    /// every replica: `redis://host:6379[/db]`, `rediss://…` (TLS), `redis+unix:///path`.
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
    /// How many replicas share the limits (for `--counter-store-on-failure local`).
    #[arg(long = "counter-store-replicas", env = "TOOLGATE_COUNTER_STORE_REPLICAS", default_value_t = 1)]
    pub replicas: u64,
}

/// The store in use, for `/readyz` and the metrics.
#[derive(Debug, Default)]
pub struct StoreMetrics {
    up: Gauge,
    errors: Counter,
    round_trips: Counter,
    redis: OnceLock<RedisCounters>,
}

impl StoreMetrics {
    /// Registers the store's series.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "toolgate_counter_store_up",
            "Whether the shared counter store (Redis) answered its last operation: 1 yes, 0 no; -1 when limits are counted locally",
            m.up.clone(),
        );
        registry.register(
            "toolgate_counter_store_errors",
            "Counter store operations that failed or timed out",
            m.errors.clone(),
        );
        registry.register(
            "toolgate_counter_store_round_trips",
            "Counter store round trips (one per decision with limits, one per rollback)",
            m.round_trips.clone(),
        );
        m.up.set(-1);
        m
    }

    /// One line for `/readyz`: the store's state (`None` for the local store).
    pub fn readiness(&self) -> Option<String> {
        let r = self.redis.get()?;
        Some(if r.is_up() {
            "counter store: up".to_owned()
        } else {
            "counter store: unreachable (limited calls are refused or handled by --counter-store-on-failure)".to_owned()
        })
    }
}

fn password(args: &StoreArgs) -> anyhow::Result<Option<String>> {
    if let Some(path) = &args.password_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--counter-store-password-file {}", path.display()))?;
        return Ok(Some(text.trim_end_matches(['\n', '\r']).to_owned()));
    }
    Ok(std::env::var("TOOLGATE_COUNTER_STORE_PASSWORD").ok().filter(|p| !p.is_empty()))
}

/// The store the flags ask for: `None` for `local`. Call it inside the runtime.
pub fn build(args: &StoreArgs) -> anyhow::Result<Option<SharedCounters>> {
    if args.url == "local" {
        return Ok(None);
    }
    if !(args.url.starts_with("redis://") || args.url.starts_with("rediss://") || args.url.starts_with("redis+unix://"))
    {
        bail!("--counter-store {}: use `local` or a redis://, rediss:// or redis+unix:// URL", redact(&args.url));
    }
    if args.timeout_ms == 0 || args.timeout_ms > 60_000 {
        bail!("--counter-store-timeout-ms {}: from 1 to 60000", args.timeout_ms);
    }
    let on_failure =
        match args.on_failure.parse::<OnFailure>().map_err(|e| anyhow::anyhow!("--counter-store-on-failure {e}"))? {
            OnFailure::Local { .. } if args.replicas == 0 => bail!("--counter-store-replicas must be at least 1"),
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
        password: password(args)?,
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
    Ok(Some(SharedCounters::new(redis, on_failure)?))
}

/// Keeps the store's metrics and state fresh: a `PING` every `every` while no decision
/// does it (the connection manager reconnects with back-off meanwhile).
pub fn monitor(
    store: &SharedCounters,
    metrics: Arc<crate::metrics::Metrics>,
    every: Duration,
) -> Arc<dyn CounterStore> {
    let redis = store.redis().clone();
    let _ = metrics.store.redis.set(redis.clone());
    tokio::spawn(async move {
        let (mut errors, mut trips) = (0u64, 0u64);
        let mut was_up = None;
        loop {
            let _ = redis.ping().await;
            let up = redis.is_up();
            metrics.store.up.set(i64::from(up));
            if was_up != Some(up) {
                if up {
                    tracing::info!("counter store reachable");
                } else {
                    tracing::warn!(
                        "counter store unreachable: limited calls are refused (or as --counter-store-on-failure says)"
                    );
                }
                was_up = Some(up);
            }
            let e = redis.errors();
            metrics.store.errors.inc_by(e.saturating_sub(errors));
            errors = e;
            let t = redis.round_trips();
            metrics.store.round_trips.inc_by(t.saturating_sub(trips));
            trips = t;
            tokio::time::sleep(every).await;
        }
    });
    Arc::new(store.clone())
}
