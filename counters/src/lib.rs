//! toolgate's shared rate-limit counters: the policy crate's [`CounterStore`] kept in
//! Redis or Valkey, so that every replica of a sidecar enforcing the same policy shares
//! one count.
//!
//! - **One round trip per decision.** Every limit of a call is reserved by one atomic Lua
//!   script (`EVALSHA`, loaded again with `SCRIPT LOAD` if the server lost it): all or
//!   none, no check-then-act race between replicas.
//! - **The server's clock.** The script reads Redis `TIME`; the sidecars' clocks are never
//!   used, so a skewed node cannot over-admit. (Tests inject the time through
//!   [`RedisConfig::test_clock`]; the proxy never sets it.)
//! - **Exact sliding window.** Per counter key a sorted set holds the admissions of the
//!   last `window` (score: admission time in µs; member: reservation id, limit index and
//!   units) and a second key their sum. A call is admitted only if the units in
//!   `(now − window, now]` plus its own stay within `max`, as the local limiter does;
//!   `retry_after` is the exact time at which enough units leave the window.
//! - **Reserve → commit/rollback.** Entries count from the moment they are reserved;
//!   commit keeps them; rollback removes them (a second script), so a failed upstream call
//!   spends nothing.
//! - **Keys**: `<prefix>{<tag>}:w` and `<prefix>{<tag>}:n`, where `tag` is 32 hex digits of
//!   SHA-256 over (policy identity, counter, scope key): one limit's two keys share a
//!   Redis Cluster slot, and no caller-chosen text (session ids, header values) ever
//!   reaches a key name. Keys expire (`PEXPIRE`) one second after their last admission
//!   leaves the window.
//! - **Failure**: every operation is bounded by [`RedisConfig::timeout`]; past it, or on
//!   any error, the store answers [`StoreRefusal::Unavailable`] (fail closed) unless
//!   [`OnFailure`] says `local` or `open`. The connection manager reconnects with
//!   exponential back-off.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{IntoConnectionInfo, Script};
use sha2::{Digest, Sha256};
use tokio::runtime::{Handle, RuntimeFlavor};
use toolgate_policy::{
    ApprovalMemory, CounterKey, CounterStore, Demand, Hold, Limiter, OnStoreFailure, Refusal, RememberedApproval,
    Reservation, StoreKind, StoreRefusal,
};

const RESERVE_LUA: &str = include_str!("script.lua");
const ROLLBACK_LUA: &str = include_str!("rollback.lua");

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "toolgate:";
/// Default bound on one store operation.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);
/// Largest `max` or amount the script counts exactly (Lua numbers are doubles).
const MAX_EXACT: u64 = 1 << 53;

/// Why the store could not decide.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The bound on one operation passed.
    #[error("no answer from the counter store within {0:?}")]
    Timeout(Duration),
    /// The server or the connection failed.
    #[error("counter store error: {0}")]
    Redis(#[from] redis::RedisError),
    /// The script answered something it never answers.
    #[error("counter store answered unexpectedly: {0}")]
    Protocol(String),
    /// Called where it cannot wait (a current-thread async runtime).
    #[error("{0}")]
    Runtime(&'static str),
}

/// Bad store settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The URL is not a Redis URL the client understands.
    #[error("--counter-store: {0}")]
    Url(String),
    /// The prefix would break the key layout.
    #[error("--counter-store-prefix: {0}")]
    Prefix(String),
}

/// How to reach the store.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://[user[:password]@]host[:port][/db]`, `rediss://…` (TLS), or
    /// `redis+unix:///path`.
    pub url: String,
    /// ACL user, overriding the URL's.
    pub username: Option<String>,
    /// Password, overriding the URL's (read from a file or the environment, never a flag).
    pub password: Option<String>,
    /// Prepended to every key: separates deployments sharing one Redis.
    pub prefix: String,
    /// Bound on one operation (a decision or a rollback), connecting included.
    pub timeout: Duration,
    /// PEM roots that sign a `rediss://` server's certificate, instead of the platform's.
    pub ca_pem: Option<Vec<u8>>,
    /// Tests only: the script takes the time from the caller's `now` instead of `TIME`.
    #[doc(hidden)]
    pub test_clock: bool,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact(&self.url))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("ca_pem", &self.ca_pem.as_ref().map(Vec::len))
            .field("test_clock", &self.test_clock)
            .finish()
    }
}

impl RedisConfig {
    /// Settings for `url` with the defaults.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            username: None,
            password: None,
            prefix: DEFAULT_PREFIX.into(),
            timeout: DEFAULT_TIMEOUT,
            ca_pem: None,
            test_clock: false,
        }
    }
}

/// The URL with any password replaced, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:<redacted>{}", &url[..s + 3], user, &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// The Redis keys of one counter: its admissions and their sum,
/// `<prefix>{<policy tag>}:<counter tag>:w` and `…:n`. The hash tag covers the policy
/// identity only, so every key of one document lives in one Redis Cluster slot and one
/// script can reserve all of its limits; the counter tag covers (policy, counter, scope).
pub fn keys_for(prefix: &str, key: &CounterKey) -> (String, String) {
    let tag = hex16(&[&key.policy]);
    let id = hex16(&[&key.policy, &key.counter, &key.scope]);
    (format!("{prefix}{{{tag}}}:{id}:w"), format!("{prefix}{{{tag}}}:{id}:n"))
}

/// 32 hex digits of SHA-256 over length-prefixed parts.
fn hex16(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The hash tag of a key (`{…}`), which decides its Cluster slot.
fn slot_tag(key: &str) -> &str {
    match (key.find('{'), key.find('}')) {
        (Some(a), Some(b)) if b > a => &key[a..=b],
        _ => key,
    }
}

/// Where the store is, from the `--counter-store` URL.
#[derive(Debug, PartialEq, Eq)]
enum Endpoint {
    /// `redis://`, `rediss://`, `redis+unix://`: one server (or a Service in front of one).
    Single,
    /// `redis+cluster://h1:p1,h2:p2` (`rediss+cluster://` for TLS): seed nodes of a
    /// Redis Cluster; the client learns the rest.
    Cluster { tls: bool, seeds: Vec<(String, u16)> },
    /// `redis+sentinel://s1:26379,s2:26379/<master>[/<db>]`: Sentinels that name the
    /// master; after a failover the next connection goes to the new one.
    Sentinel { sentinels: Vec<(String, u16)>, master: String, db: i64 },
}

impl Endpoint {
    fn parse(url: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::Url(format!("{}: {why}", redact(url)));
        let (rest, kind) = if let Some(r) = url.strip_prefix("redis+cluster://") {
            (r, "cluster")
        } else if let Some(r) = url.strip_prefix("rediss+cluster://") {
            (r, "clusters")
        } else if let Some(r) = url.strip_prefix("redis+sentinel://") {
            (r, "sentinel")
        } else {
            return Ok(Self::Single);
        };
        if rest.contains('@') {
            return Err(bad(
                "no user or password in the URL: use --counter-store-username and --counter-store-password-file",
            ));
        }
        let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut nodes = Vec::new();
        for h in hosts.split(',') {
            let (host, port) = h.rsplit_once(':').ok_or_else(|| bad(&format!("{h:?}: host:port")))?;
            let port: u16 = port.parse().map_err(|_| bad(&format!("{h:?}: host:port")))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() || port == 0 {
                return Err(bad(&format!("{h:?}: host:port")));
            }
            nodes.push((host.to_owned(), port));
        }
        if nodes.len() > 64 {
            return Err(bad("at most 64 nodes"));
        }
        match kind {
            "sentinel" => {
                let mut parts = path.split('/');
                let master = parts.next().unwrap_or("").to_owned();
                if master.is_empty() {
                    return Err(bad("name the master: redis+sentinel://host:26379,…/<master>[/<db>]"));
                }
                let db = match parts.next() {
                    None | Some("") => 0,
                    Some(d) => d.parse().map_err(|_| bad(&format!("{d:?} is not a database number")))?,
                };
                if parts.next().is_some() {
                    return Err(bad("redis+sentinel://host:26379,…/<master>[/<db>]"));
                }
                Ok(Self::Sentinel { sentinels: nodes, master, db })
            }
            _ if !path.is_empty() => Err(bad("a Redis Cluster has only database 0: no path")),
            k => Ok(Self::Cluster { tls: k == "clusters", seeds: nodes }),
        }
    }
}

fn single(config: &RedisConfig) -> Result<ConnectionManager, ConfigError> {
    let mut info = config
        .url
        .as_str()
        .into_connection_info()
        .map_err(|e| ConfigError::Url(format!("{}: {e}", redact(&config.url))))?;
    let mut settings = info.redis_settings().clone();
    if let Some(u) = &config.username {
        settings = settings.set_username(u);
    }
    if let Some(p) = &config.password {
        settings = settings.set_password(p);
    }
    info = info.set_redis_settings(settings);
    let client = match &config.ca_pem {
        None => redis::Client::open(info),
        Some(_) if !config.url.starts_with("rediss://") => {
            return Err(ConfigError::Url("a CA file is only used with a rediss:// URL".into()));
        }
        Some(pem) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates { client_tls: None, root_cert: Some(pem.clone()) },
        ),
    }
    .map_err(|e| ConfigError::Url(e.to_string()))?;
    let cm = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.timeout))
        .set_response_timeout(Some(config.timeout))
        .set_number_of_retries(3)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(2));
    ConnectionManager::new_lazy_with_config(client, cm).map_err(|e| ConfigError::Url(e.to_string()))
}

fn cluster(config: &RedisConfig, tls: bool, seeds: &[(String, u16)]) -> Result<ClusterClient, ConfigError> {
    let scheme = if tls { "rediss" } else { "redis" };
    let urls: Vec<String> = seeds.iter().map(|(h, p)| format!("{scheme}://{h}:{p}")).collect();
    let mut b = ClusterClient::builder(urls)
        .connection_timeout(config.timeout)
        .response_timeout(config.timeout)
        .retries(2)
        .min_retry_wait(50)
        .max_retry_wait(2000);
    if let Some(u) = &config.username {
        b = b.username(u);
    }
    if let Some(p) = &config.password {
        b = b.password(p);
    }
    match &config.ca_pem {
        Some(_) if !tls => return Err(ConfigError::Url("a CA file is only used with rediss+cluster://".into())),
        Some(pem) => b = b.certs(redis::TlsCertificates { client_tls: None, root_cert: Some(pem.clone()) }),
        None => {}
    }
    b.build().map_err(|e| ConfigError::Url(e.to_string()))
}

fn sentinel(
    config: &RedisConfig,
    sentinels: Vec<(String, u16)>,
    master: &str,
    db: i64,
) -> Result<SentinelClient, ConfigError> {
    if config.ca_pem.is_some() {
        return Err(ConfigError::Url("TLS is not supported with redis+sentinel:// (yet)".into()));
    }
    let addrs = sentinels.into_iter().map(|(h, p)| redis::ConnectionAddr::Tcp(h, p));
    let mut b = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
        .map_err(|e| ConfigError::Url(e.to_string()))?
        .set_client_to_redis_db(db);
    if let Some(u) = &config.username {
        b = b.set_client_to_redis_username(u);
    }
    if let Some(p) = &config.password {
        b = b.set_client_to_redis_password(p);
    }
    b.build().map_err(|e| ConfigError::Url(e.to_string()))
}

/// A connection to the store, whatever its shape. Cheap to clone.
#[derive(Clone)]
enum Conn {
    /// One server: the connection manager reconnects with back-off.
    Single(ConnectionManager),
    /// Cluster or Sentinel: connected on first use, and again after a failure (for
    /// Sentinel: asking the Sentinels for the master anew, so a failover is followed).
    Lazy(Arc<Lazy>),
}

struct Lazy {
    source: Source,
    timeout: Duration,
    cached: tokio::sync::Mutex<Option<Live>>,
}

enum Source {
    Cluster(ClusterClient),
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

#[derive(Clone)]
enum Live {
    Cluster(ClusterConnection),
    Node(MultiplexedConnection),
}

impl Conn {
    fn lazy(source: Source, timeout: Duration) -> Self {
        Self::Lazy(Arc::new(Lazy { source, timeout, cached: tokio::sync::Mutex::new(None) }))
    }

    fn is_cluster(&self) -> bool {
        matches!(self, Self::Lazy(l) if matches!(l.source, Source::Cluster(_)))
    }
}

impl Lazy {
    async fn get(&self) -> redis::RedisResult<Live> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = &*cached {
            return Ok(c.clone());
        }
        let live = match &self.source {
            Source::Cluster(client) => Live::Cluster(client.get_async_connection().await?),
            Source::Sentinel(client) => {
                let t = self.timeout;
                let cfg =
                    redis::AsyncConnectionConfig::new().set_connection_timeout(Some(t)).set_response_timeout(Some(t));
                Live::Node(client.lock().await.get_async_connection_with_config(&cfg).await?)
            }
        };
        *cached = Some(live.clone());
        Ok(live)
    }

    async fn forget(&self) {
        *self.cached.lock().await = None;
    }
}

impl redis::aio::ConnectionLike for Live {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Cluster(c) => c.req_packed_command(cmd),
            Self::Node(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Node(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Cluster(c) => c.get_db(),
            Self::Node(c) => c.get_db(),
        }
    }
}

/// Whether a failed command means the connection should be made anew (not a script the
/// server lost, which `EVALSHA` handles by loading it again).
fn reconnect_after(e: &redis::RedisError) -> bool {
    !matches!(e.kind(), redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Lazy(l) => {
                let l = l.clone();
                Box::pin(async move {
                    let mut c = l.get().await?;
                    let r = c.req_packed_command(cmd).await;
                    if r.as_ref().is_err_and(reconnect_after) {
                        l.forget().await;
                    }
                    r
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Lazy(l) => {
                let l = l.clone();
                Box::pin(async move {
                    let mut c = l.get().await?;
                    let r = c.req_packed_commands(pipeline, offset, count).await;
                    if r.as_ref().is_err_and(reconnect_after) {
                        l.forget().await;
                    }
                    r
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Lazy(_) => 0,
        }
    }
}

/// One reserved entry: where it is and its member name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ticket {
    set: String,
    sum: String,
    member: String,
}

/// Counters in Redis/Valkey (async). Cheap to clone.
#[derive(Clone)]
pub struct RedisCounters {
    inner: Arc<RedisInner>,
}

struct RedisInner {
    conn: Conn,
    reserve: Script,
    rollback: Script,
    prefix: String,
    timeout: Duration,
    test_clock: bool,
    up: AtomicBool,
    errors: AtomicU64,
    round_trips: AtomicU64,
}

impl fmt::Debug for RedisCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCounters")
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .field("up", &self.is_up())
            .finish()
    }
}

impl RedisCounters {
    /// A store for `config`. Connects lazily (the first operation connects), so a proxy
    /// starts while the store is down and refuses limited calls until it is up. Must be
    /// called inside a Tokio runtime.
    pub fn new(config: &RedisConfig) -> Result<Self, ConfigError> {
        if config.prefix.contains(['{', '}']) || config.prefix.len() > 128 {
            return Err(ConfigError::Prefix(format!(
                "{:?}: at most 128 bytes, without `{{` or `}}` (the key's hash tag follows it)",
                config.prefix
            )));
        }
        let conn = match Endpoint::parse(&config.url)? {
            Endpoint::Single => Conn::Single(single(config)?),
            Endpoint::Cluster { tls, seeds } => {
                Conn::lazy(Source::Cluster(cluster(config, tls, &seeds)?), config.timeout)
            }
            Endpoint::Sentinel { sentinels, master, db } => Conn::lazy(
                Source::Sentinel(tokio::sync::Mutex::new(sentinel(config, sentinels, &master, db)?)),
                config.timeout,
            ),
        };
        Ok(Self {
            inner: Arc::new(RedisInner {
                conn,
                reserve: Script::new(RESERVE_LUA),
                rollback: Script::new(ROLLBACK_LUA),
                prefix: config.prefix.clone(),
                timeout: config.timeout,
                test_clock: config.test_clock,
                up: AtomicBool::new(false),
                errors: AtomicU64::new(0),
                round_trips: AtomicU64::new(0),
            }),
        })
    }

    /// Whether the store is a Redis Cluster (one script per slot).
    pub fn is_cluster(&self) -> bool {
        self.inner.conn.is_cluster()
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// Whether the last operation reached the store.
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Relaxed)
    }

    /// Operations that failed (timeouts and errors).
    pub fn errors(&self) -> u64 {
        self.inner.errors.load(Ordering::Relaxed)
    }

    /// Script invocations sent (one per decision with limits, one per rollback).
    pub fn round_trips(&self) -> u64 {
        self.inner.round_trips.load(Ordering::Relaxed)
    }

    async fn bounded<T>(&self, f: impl Future<Output = redis::RedisResult<T>>) -> Result<T, StoreError> {
        let r = match tokio::time::timeout(self.inner.timeout, f).await {
            Err(_) => Err(StoreError::Timeout(self.inner.timeout)),
            Ok(r) => r.map_err(StoreError::from),
        };
        self.inner.up.store(r.is_ok(), Ordering::Relaxed);
        if r.is_err() {
            self.inner.errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// `PING`: refreshes [`Self::is_up`] (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.inner.conn.clone();
        self.bounded(async move { redis::cmd("PING").query_async::<String>(&mut c).await.map(|_| ()) }).await
    }

    /// Reserves every demand or none, in one script run. `now` is used only with
    /// [`RedisConfig::test_clock`]; otherwise the server's `TIME` decides.
    ///
    /// On a Redis Cluster one script covers one slot: the limits of each policy document
    /// (one hash tag) are reserved by one script, documents one after another, and a
    /// refusal gives back what the earlier ones reserved (a moment stricter, never looser).
    pub async fn reserve(&self, demands: &[Demand], now: Duration) -> Result<Result<Vec<Ticket>, Refusal>, StoreError> {
        let rid = reservation_id()?;
        if !self.inner.conn.is_cluster() {
            let index: Vec<usize> = (0..demands.len()).collect();
            return self.reserve_group(&rid, demands, &index, now).await;
        }
        let mut groups: Vec<(&str, Vec<Demand>, Vec<usize>)> = Vec::new();
        for (i, d) in demands.iter().enumerate() {
            match groups.iter_mut().find(|g| g.0 == &*d.key.policy) {
                Some(g) => {
                    g.1.push(d.clone());
                    g.2.push(i);
                }
                None => groups.push((&d.key.policy, vec![d.clone()], vec![i])),
            }
        }
        let mut tickets = Vec::new();
        for (_, group, index) in &groups {
            match self.reserve_group(&rid, group, index, now).await {
                Ok(Ok(mut t)) => tickets.append(&mut t),
                other => {
                    if let Err(e) = self.rollback(&tickets).await {
                        tracing::warn!(error = %e, "could not give back a refused call's units");
                    }
                    return other;
                }
            }
        }
        Ok(Ok(tickets))
    }

    /// One script run for `demands` (at `index` in the call's demands).
    async fn reserve_group(
        &self,
        rid: &str,
        demands: &[Demand],
        index: &[usize],
        now: Duration,
    ) -> Result<Result<Vec<Ticket>, Refusal>, StoreError> {
        let mut inv = self.inner.reserve.prepare_invoke();
        inv.arg(if self.inner.test_clock { now.as_micros().to_string() } else { String::new() });
        inv.arg(rid);
        let mut tickets = Vec::new();
        for (i, d) in demands.iter().enumerate() {
            let (set, sum) = keys_for(&self.inner.prefix, &d.key);
            let window = u64::try_from(d.window.as_micros()).unwrap_or(u64::MAX).max(1);
            let max = d.max.min(MAX_EXACT);
            // An amount beyond `max` is refused by the script before any arithmetic.
            let amount = d.amount.min(MAX_EXACT + 1);
            inv.key(&set).key(&sum).arg(window).arg(max).arg(amount);
            if amount > 0 && amount <= max {
                tickets.push(Ticket { set, sum, member: format!("{rid}:{i}:{amount}") });
            }
        }
        let mut c = self.inner.conn.clone();
        self.inner.round_trips.fetch_add(1, Ordering::Relaxed);
        let answer: Vec<i64> = self.bounded(async move { inv.invoke_async(&mut c).await }).await?;
        match answer.as_slice() {
            [1] => Ok(Ok(tickets)),
            [0, i, retry] if (*i as usize) < demands.len() && *i >= 0 => Ok(Err(Refusal {
                index: index[*i as usize],
                retry_after: u64::try_from(*retry).ok().map(Duration::from_micros),
            })),
            other => Err(StoreError::Protocol(format!("{other:?}"))),
        }
    }

    /// Gives back the units of a reservation (one script per Cluster slot).
    pub async fn rollback(&self, tickets: &[Ticket]) -> Result<(), StoreError> {
        let mut groups: Vec<(&str, Vec<&Ticket>)> = Vec::new();
        for t in tickets {
            let tag = if self.inner.conn.is_cluster() { slot_tag(&t.set) } else { "" };
            match groups.iter_mut().find(|g| g.0 == tag) {
                Some(g) => g.1.push(t),
                None => groups.push((tag, vec![t])),
            }
        }
        for (_, group) in groups {
            let mut inv = self.inner.rollback.prepare_invoke();
            for t in group {
                inv.key(&t.set).key(&t.sum).arg(&t.member);
            }
            let mut c = self.inner.conn.clone();
            self.inner.round_trips.fetch_add(1, Ordering::Relaxed);
            self.bounded(async move { inv.invoke_async::<i64>(&mut c).await.map(|_| ()) }).await?;
        }
        Ok(())
    }
}

/// The Redis key of an approval remembered for `key` (see [`ApprovalMemory`]): hashed, so
/// no caller-chosen text reaches a key name.
pub fn approval_key(prefix: &str, key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let tag: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{{{tag}}}:a")
}

/// `<name length>:<name><0|1><decided_by>`: any text round-trips.
fn encode_approval(a: &RememberedApproval) -> String {
    let (flag, by) = match &a.decided_by {
        Some(b) => ('1', b.as_str()),
        None => ('0', ""),
    };
    format!("{}:{}{flag}{by}", a.name.len(), a.name)
}

fn decode_approval(v: &str) -> Option<RememberedApproval> {
    let (len, rest) = v.split_once(':')?;
    let len: usize = len.parse().ok()?;
    let name = rest.get(..len)?;
    let tail = rest.get(len..)?;
    let decided_by = match tail.strip_prefix('1') {
        Some(by) => Some(by.to_owned()),
        None if tail == "0" => None,
        None => return None,
    };
    Some(RememberedApproval { name: name.to_owned(), decided_by })
}

impl RedisCounters {
    /// `SET key value PX window`: an approval remembered for `window`.
    pub async fn remember_approval(
        &self,
        key: &str,
        a: &RememberedApproval,
        window: Duration,
    ) -> Result<(), StoreError> {
        let ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut cmd = redis::cmd("SET");
        cmd.arg(approval_key(&self.inner.prefix, key)).arg(encode_approval(a)).arg("PX").arg(ms);
        let mut c = self.inner.conn.clone();
        self.inner.round_trips.fetch_add(1, Ordering::Relaxed);
        self.bounded(async move { cmd.query_async::<()>(&mut c).await }).await
    }

    /// The approval remembered under `key`, if its window has not passed.
    pub async fn recall_approval(&self, key: &str) -> Result<Option<RememberedApproval>, StoreError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(approval_key(&self.inner.prefix, key));
        let mut c = self.inner.conn.clone();
        self.inner.round_trips.fetch_add(1, Ordering::Relaxed);
        let v: Option<String> = self.bounded(async move { cmd.query_async(&mut c).await }).await?;
        match v {
            None => Ok(None),
            Some(v) => decode_approval(&v).map(Some).ok_or_else(|| StoreError::Protocol(format!("approval {v:?}"))),
        }
    }
}

impl ApprovalMemory for SharedCounters {
    fn remember(&self, key: &str, approval: &RememberedApproval, window: Duration) {
        match self.wait(self.redis.remember_approval(key, approval, window)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) | Err(e) => {
                tracing::warn!(error = %e, "could not share an approval for reuse; other replicas will ask again");
            }
        }
    }

    fn recall(&self, key: &str) -> Option<RememberedApproval> {
        match self.wait(self.redis.recall_approval(key)) {
            Ok(Ok(found)) => found,
            Ok(Err(e)) | Err(e) => {
                // Fail closed: not reused, the call is asked about again.
                tracing::warn!(error = %e, "could not look up a shared approval; asking again");
                None
            }
        }
    }
}

fn reservation_id() -> Result<String, StoreError> {
    let mut b = [0u8; 12];
    getrandom::fill(&mut b).map_err(|_| StoreError::Runtime("no randomness for a reservation id"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// What a limited call gets when the store cannot decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// Refused (`store_unavailable`): the default.
    Closed,
    /// Counted in this process against `max / replicas` (rounded down): together the
    /// replicas still admit at most `max`, as long as there are at most `replicas` of them.
    Local {
        /// How many replicas share the limits.
        replicas: u64,
    },
    /// Admitted without counting.
    Open,
}

impl std::str::FromStr for OnFailure {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "closed" => Ok(Self::Closed),
            "open" => Ok(Self::Open),
            "local" => Ok(Self::Local { replicas: 1 }),
            other => Err(format!("{other:?}: use closed, local or open")),
        }
    }
}

/// The proxy's store: Redis, with the failure behaviour chosen, behind the policy crate's
/// synchronous [`CounterStore`].
///
/// Each demand is routed by its document's `counters` settings: `store: local` counts in
/// this process, anything else in Redis. When Redis cannot decide, each Redis demand gets
/// its document's `on_store_failure`, or this store's [`OnFailure`] when the document says
/// nothing; one `closed` demand refuses the whole call.
///
/// The gate decides synchronously; this adapter waits for the bounded async Redis call
/// with `block_in_place` on a multi-thread Tokio runtime (the worker's other tasks move to
/// another thread meanwhile), or `block_on` its runtime handle when called outside one
/// (tests). On a current-thread runtime it cannot wait, and answers `Unavailable`
/// (never a panic, never an admission). Rollbacks run in the background there.
#[derive(Clone, Debug)]
pub struct SharedCounters {
    redis: RedisCounters,
    on_failure: OnFailure,
    replicas: u64,
    /// Documents that count locally (`counters.store: local`).
    local: Limiter,
    /// Redis demands counted here while the store is down (`local` on failure).
    fallback: Limiter,
    fallbacks: Arc<Fallbacks>,
    handle: Handle,
}

/// Calls decided without the store while it was down, by how.
#[derive(Debug, Default)]
pub struct Fallbacks {
    /// Counted in this process against `max / replicas`.
    pub local: AtomicU64,
    /// Admitted uncounted.
    pub open: AtomicU64,
}

impl SharedCounters {
    /// Wraps `redis`; call it inside the Tokio runtime that will drive it.
    pub fn new(redis: RedisCounters, on_failure: OnFailure) -> Result<Self, StoreError> {
        let handle =
            Handle::try_current().map_err(|_| StoreError::Runtime("the counter store needs a Tokio runtime"))?;
        let replicas = match on_failure {
            OnFailure::Local { replicas } => replicas.max(1),
            _ => 1,
        };
        Ok(Self {
            redis,
            on_failure,
            replicas,
            local: Limiter::default(),
            fallback: Limiter::default(),
            fallbacks: Arc::default(),
            handle,
        })
    }

    /// How many replicas share the limits: a `local` fallback counts `max / replicas`
    /// (also when a policy, not the flag, asks for `local`).
    #[must_use]
    pub fn with_replicas(mut self, replicas: u64) -> Self {
        self.replicas = replicas.max(1);
        if let OnFailure::Local { replicas } = &mut self.on_failure {
            *replicas = self.replicas;
        }
        self
    }

    /// The Redis side (state, metrics).
    pub fn redis(&self) -> &RedisCounters {
        &self.redis
    }

    /// Calls decided without the store while it was down.
    pub fn fallbacks(&self) -> &Fallbacks {
        &self.fallbacks
    }

    fn wait<F: Future>(&self, f: F) -> Result<F::Output, StoreError> {
        match Handle::try_current() {
            Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
                Ok(tokio::task::block_in_place(|| h.block_on(f)))
            }
            Ok(_) => {
                Err(StoreError::Runtime("the Redis counter store needs a multi-thread runtime to wait for its answer"))
            }
            Err(_) => Ok(self.handle.block_on(f)),
        }
    }

    /// The failure behaviour of one Redis demand: its document's, else this store's.
    fn failure_mode(&self, d: &Demand) -> OnFailure {
        match d.counters.on_store_failure {
            Some(OnStoreFailure::Closed) => OnFailure::Closed,
            Some(OnStoreFailure::Local) => OnFailure::Local { replicas: self.replicas },
            Some(OnStoreFailure::Open) => OnFailure::Open,
            None => self.on_failure,
        }
    }

    /// Redis could not decide `demands` (indices into the call's demands in `index`).
    fn failed(
        &self,
        demands: &[Demand],
        index: &[usize],
        now: Duration,
        e: StoreError,
    ) -> Result<Reservation, StoreRefusal> {
        tracing::warn!(error = %e, "counter store unavailable");
        let modes: Vec<OnFailure> = demands.iter().map(|d| self.failure_mode(d)).collect();
        if modes.contains(&OnFailure::Closed) {
            return Err(StoreRefusal::Unavailable(e.to_string()));
        }
        let mut share = Vec::new();
        let mut at = Vec::new();
        for ((d, m), i) in demands.iter().zip(&modes).zip(index) {
            if let OnFailure::Local { replicas } = m {
                share.push(Demand { max: d.max / replicas.max(&1), ..d.clone() });
                at.push(*i);
            }
        }
        let r =
            self.fallback.reserve(&share, now).map_err(|r| StoreRefusal::Limit(Refusal { index: at[r.index], ..r }))?;
        if !share.is_empty() {
            self.fallbacks.local.fetch_add(1, Ordering::Relaxed);
        }
        if share.len() < demands.len() {
            self.fallbacks.open.fetch_add(1, Ordering::Relaxed);
        }
        Ok(r)
    }

    fn reserve_shared(&self, demands: &[Demand], index: &[usize], now: Duration) -> Result<Reservation, StoreRefusal> {
        match self.wait(self.redis.reserve(demands, now)) {
            Ok(Ok(Ok(tickets))) => Ok(Reservation::new(Box::new(RedisHold { store: self.clone(), tickets }))),
            Ok(Ok(Err(refusal))) => Err(StoreRefusal::Limit(Refusal { index: index[refusal.index], ..refusal })),
            Ok(Err(e)) | Err(e) => self.failed(demands, index, now, e),
        }
    }
}

impl CounterStore for SharedCounters {
    fn reserve(&self, demands: &[Demand], now: Duration) -> Result<Reservation, StoreRefusal> {
        let live = |d: &&Demand| d.amount > 0;
        let is_local = |d: &Demand| d.counters.store == Some(StoreKind::Local);
        if !demands.iter().filter(live).any(|d| !is_local(d)) {
            // Nothing for Redis: calls without limits (or with local ones only) never touch it.
            return self.local.reserve(demands, now).map_err(StoreRefusal::Limit);
        }
        if !demands.iter().any(is_local) {
            let index: Vec<usize> = (0..demands.len()).collect();
            return self.reserve_shared(demands, &index, now);
        }
        // Both kinds in one call: the local part first (no round trip when it refuses),
        // given back if the shared part refuses.
        let (mut local, mut shared) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
        for (i, d) in demands.iter().enumerate() {
            let part = if is_local(d) { &mut local } else { &mut shared };
            part.0.push(d.clone());
            part.1.push(i);
        }
        let here = self
            .local
            .reserve(&local.0, now)
            .map_err(|r| StoreRefusal::Limit(Refusal { index: local.1[r.index], ..r }))?;
        match self.reserve_shared(&shared.0, &shared.1, now) {
            Ok(there) => Ok(Reservation::new(Box::new(Both(here, there)))),
            Err(e) => {
                here.rollback();
                Err(e)
            }
        }
    }
}

/// A call's local and shared reservations, settled together.
#[derive(Debug)]
struct Both(Reservation, Reservation);

impl Hold for Both {
    fn commit(self: Box<Self>) {
        self.0.commit();
        self.1.commit();
    }

    fn rollback(self: Box<Self>) {
        self.0.rollback();
        self.1.rollback();
    }
}

#[derive(Debug)]
struct RedisHold {
    store: SharedCounters,
    tickets: Vec<Ticket>,
}

impl Hold for RedisHold {
    fn commit(self: Box<Self>) {}

    fn rollback(self: Box<Self>) {
        let RedisHold { store, tickets } = *self;
        let redis = store.redis.clone();
        let undo = async move {
            if let Err(e) = redis.rollback(&tickets).await {
                // The units stay spent until they leave the window: stricter, never looser.
                tracing::warn!(error = %e, "could not give back a failed call's units");
            }
        };
        match Handle::try_current() {
            Ok(h) => {
                h.spawn(undo);
            }
            Err(_) => store.handle.block_on(undo),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_a_hash_tag_and_hide_caller_text() {
        let k = CounterKey { policy: "ns/p".into(), counter: "c".into(), scope: "}{evil:*".into() };
        let (w, n) = keys_for("tg:", &k);
        assert!(w.starts_with("tg:{") && w.ends_with(":w"), "{w}");
        assert_eq!(w.trim_end_matches(":w"), n.trim_end_matches(":n"), "one counter, two keys");
        assert_eq!(slot_tag(&w), slot_tag(&n), "one slot for both keys");
        assert!(!w.contains("evil"));
        // Length-prefixed parts: moving text between fields changes the key.
        let a = CounterKey { policy: "a".into(), counter: "bc".into(), scope: "".into() };
        let b = CounterKey { policy: "ab".into(), counter: "c".into(), scope: "".into() };
        assert_ne!(keys_for("", &a), keys_for("", &b));
    }

    #[test]
    fn approvals_round_trip_and_keys_hide_their_text() {
        for a in [
            RememberedApproval { name: "start-pod-1".into(), decided_by: Some("a:b\n1".into()) },
            RememberedApproval { name: "x:1".into(), decided_by: None },
            RememberedApproval { name: String::new(), decided_by: Some(String::new()) },
        ] {
            assert_eq!(decode_approval(&encode_approval(&a)), Some(a));
        }
        assert_eq!(decode_approval("9:abc0"), None);
        assert_eq!(decode_approval("3:abc2"), None);
        let k = approval_key("tg:", "}{evil");
        assert!(k.starts_with("tg:{") && k.ends_with("}:a") && !k.contains("evil"), "{k}");
    }

    #[test]
    fn endpoints_parse_and_bad_ones_are_refused() {
        assert_eq!(Endpoint::parse("redis://h:6379/2").expect("parses"), Endpoint::Single);
        assert_eq!(
            Endpoint::parse("redis+cluster://a:7000,[::1]:7001").expect("parses"),
            Endpoint::Cluster { tls: false, seeds: vec![("a".into(), 7000), ("::1".into(), 7001)] }
        );
        assert!(matches!(
            Endpoint::parse("rediss+cluster://a:7000").expect("parses"),
            Endpoint::Cluster { tls: true, .. }
        ));
        assert_eq!(
            Endpoint::parse("redis+sentinel://s1:26379,s2:26379/main/3").expect("parses"),
            Endpoint::Sentinel {
                sentinels: vec![("s1".into(), 26379), ("s2".into(), 26379)],
                master: "main".into(),
                db: 3
            }
        );
        for bad in [
            "redis+cluster://a",
            "redis+cluster://a:0",
            "redis+cluster://a:7000/1",
            "redis+cluster://u:pw@a:7000",
            "redis+sentinel://s:26379",
            "redis+sentinel://s:26379/m/x",
            "redis+sentinel://s:26379/m/1/2",
        ] {
            let e = Endpoint::parse(bad).expect_err(bad);
            assert!(!e.to_string().contains("pw@"), "{e}");
        }
    }

    #[test]
    fn one_documents_keys_share_a_slot() {
        let k = |policy: &str, counter: &str| CounterKey {
            policy: policy.into(),
            counter: counter.into(),
            scope: "s".into(),
        };
        let (a, _) = keys_for("tg:", &k("ns/p", "minute"));
        let (b, _) = keys_for("tg:", &k("ns/p", "hour"));
        let (c, _) = keys_for("tg:", &k("ns/q", "minute"));
        assert_eq!(slot_tag(&a), slot_tag(&b), "one document, one slot: one script reserves all of its limits");
        assert_ne!(slot_tag(&a), slot_tag(&c));
        assert_ne!(a, b);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("rediss://u:secret@h:6380/0"), "rediss://u:<redacted>@h:6380/0");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
        let c = RedisConfig { password: Some("pw".into()), ..RedisConfig::new("redis://:pw@h") };
        assert!(!format!("{c:?}").contains("pw@") && !format!("{c:?}").contains("\"pw\""));
    }

    #[test]
    fn bad_prefix_is_refused() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let _g = rt.enter();
        let c = RedisConfig { prefix: "a{b".into(), ..RedisConfig::new("redis://127.0.0.1:1") };
        assert!(matches!(RedisCounters::new(&c), Err(ConfigError::Prefix(_))));
        assert!(matches!(RedisCounters::new(&RedisConfig::new("http://x")), Err(ConfigError::Url(_))));
    }
}
