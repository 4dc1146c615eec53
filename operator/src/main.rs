//! toolgate-operator: the McpPolicy controller, the sidecar-injecting admission webhook and
//! the policy push to sidecars, in one binary. See docs/operator.md.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::Selector;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::{mpsc, watch};
use toolgate_operator::auth::Authenticator;
use toolgate_operator::hub::{Hub, Scope};
use toolgate_operator::inject::{CounterStoreConfig, INJECT_LABEL, INJECTED_LABEL, InjectConfig};
use toolgate_operator::metrics::Metrics;
use toolgate_operator::server::{self, Ctx};
use toolgate_operator::tls::{self, CertStore, Lifetimes};
use toolgate_operator::{McpPolicy, acks, approvals, controller, leader};
use toolgate_policy::crd::McpApproval;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CertMode {
    /// The operator creates, stores (Secret) and rotates its CA and serving certificate.
    Operator,
    /// Certificate files written by someone else (cert-manager), re-read when they change.
    Files,
}

/// McpPolicy controller, sidecar injector and policy push server.
#[derive(Parser, Debug)]
#[command(name = "toolgate-operator", version, about)]
struct Args {
    /// HTTPS listener: admission webhook (/inject) and sidecar policy streams (/v1/stream, /v1/ack).
    #[arg(long, env = "TOOLGATE_OPERATOR_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Plain HTTP listener: /metrics, /healthz, /readyz.
    #[arg(long, env = "TOOLGATE_OPERATOR_ADMIN_LISTEN", default_value = "0.0.0.0:8080")]
    admin_listen: SocketAddr,
    /// The operator's own namespace (TLS Secret, leader Lease).
    #[arg(long, env = "POD_NAMESPACE", default_value = "toolgate-system")]
    namespace: String,
    /// This replica's name: its identity in leader election.
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Name of the operator's Service: its DNS names go into the serving certificate.
    #[arg(long, env = "TOOLGATE_SERVICE_NAME", default_value = "toolgate-operator")]
    service_name: String,
    /// More names or IP addresses for the serving certificate (repeatable).
    #[arg(long = "extra-san", env = "TOOLGATE_EXTRA_SANS", value_delimiter = ',')]
    extra_sans: Vec<String>,
    /// Where the webhook is reached when the operator runs outside the cluster
    /// (development); its host is added to the serving certificate.
    #[arg(long, env = "TOOLGATE_WEBHOOK_URL")]
    webhook_url: Option<hyper::Uri>,
    /// Secret (in --namespace) holding the CA and serving certificate.
    #[arg(long, env = "TOOLGATE_TLS_SECRET", default_value = "toolgate-operator-tls")]
    tls_secret: String,
    /// Who issues the serving certificate.
    #[arg(long, env = "TOOLGATE_CERT_MODE", value_enum, default_value = "operator")]
    cert_mode: CertMode,
    /// Serving certificate (PEM) in `files` mode.
    #[arg(long, env = "TOOLGATE_TLS_CERT_FILE", required_if_eq("cert_mode", "files"))]
    tls_cert_file: Option<PathBuf>,
    /// Serving key (PEM) in `files` mode.
    #[arg(long, env = "TOOLGATE_TLS_KEY_FILE", required_if_eq("cert_mode", "files"))]
    tls_key_file: Option<PathBuf>,
    /// CA bundle (PEM) sidecars trust, in `files` mode.
    #[arg(long, env = "TOOLGATE_TLS_CA_FILE", required_if_eq("cert_mode", "files"))]
    tls_ca_file: Option<PathBuf>,
    /// Lifetime of the serving certificate the operator issues, in seconds.
    #[arg(long, env = "TOOLGATE_SERVING_CERT_SECONDS", default_value_t = 90 * 86_400)]
    serving_cert_seconds: u64,
    /// Lifetime of the CA the operator creates, in seconds.
    #[arg(long, env = "TOOLGATE_CA_CERT_SECONDS", default_value_t = 5 * 365 * 86_400)]
    ca_cert_seconds: u64,
    /// MutatingWebhookConfiguration whose caBundle the operator keeps current.
    #[arg(long, env = "TOOLGATE_WEBHOOK_CONFIG", default_value = "toolgate-operator")]
    webhook_config: String,
    /// ConfigMap (ca.crt) published into namespaces with injected pods.
    #[arg(long, env = "TOOLGATE_CA_CONFIG_MAP", default_value = "toolgate-ca")]
    ca_config_map: String,
    /// Image of the injected toolgate-proxy sidecar.
    #[arg(long, env = "TOOLGATE_SIDECAR_IMAGE", default_value = "ghcr.io/toolgate/toolgate-proxy:0.1.0")]
    sidecar_image: String,
    /// URL sidecars stream their policy from (default: https://SERVICE.NAMESPACE.svc:8443).
    #[arg(long, env = "TOOLGATE_SIDECAR_OPERATOR_URL")]
    sidecar_operator_url: Option<String>,
    /// Host names the injected sidecars' MCP port accepts besides its defaults (localhost,
    /// IP addresses, Service short names, *.svc, *.svc.cluster.local), comma-separated;
    /// `*.example.com` for subdomains. Passed as the sidecar's --allowed-hosts.
    #[arg(long, env = "TOOLGATE_SIDECAR_ALLOWED_HOSTS", value_delimiter = ',')]
    sidecar_allowed_hosts: Vec<String>,
    /// Origins the injected sidecars accept besides http(s) on localhost and the allowed
    /// hosts, comma-separated. Passed as the sidecar's --allowed-origins.
    #[arg(long, env = "TOOLGATE_SIDECAR_ALLOWED_ORIGINS", value_delimiter = ',')]
    sidecar_allowed_origins: Vec<String>,
    /// Shared counter store of the injected sidecars: a `redis://` or `rediss://` URL
    /// (Redis or Valkey) without a password. Unset: each sidecar counts rate limits in its
    /// own memory. See docs/operator.md, "Shared rate-limit counters".
    #[arg(long, env = "TOOLGATE_SIDECAR_COUNTER_STORE")]
    sidecar_counter_store: Option<String>,
    /// Base key prefix; each sidecar gets `<prefix><its namespace>/`.
    #[arg(long, env = "TOOLGATE_SIDECAR_COUNTER_STORE_PREFIX", default_value = "toolgate:")]
    sidecar_counter_store_prefix: String,
    /// Secret, in each injected pod's own namespace, with the store's `password` (and
    /// optionally `username` and `ca.crt`), mounted into the sidecar only.
    #[arg(long, env = "TOOLGATE_SIDECAR_COUNTER_STORE_SECRET", default_value = "toolgate-counter-store")]
    sidecar_counter_store_secret: String,
    /// The Secret holds `ca.crt`, the roots of a `rediss://` store's certificate.
    #[arg(long, env = "TOOLGATE_SIDECAR_COUNTER_STORE_CA", default_value_t = false, action = clap::ArgAction::Set)]
    sidecar_counter_store_ca: bool,
    /// The sidecars' --counter-store-on-failure: `closed`, `local` or `open`.
    #[arg(long, env = "TOOLGATE_SIDECAR_COUNTER_STORE_ON_FAILURE", default_value = "closed")]
    sidecar_counter_store_on_failure: String,
    /// The sidecars' --counter-store-timeout-ms.
    #[arg(long, env = "TOOLGATE_SIDECAR_COUNTER_STORE_TIMEOUT_MS", default_value_t = 250)]
    sidecar_counter_store_timeout_ms: u64,
    /// Seconds between heartbeats on idle policy streams.
    #[arg(long, env = "TOOLGATE_HEARTBEAT_SECONDS", default_value_t = 10)]
    heartbeat_seconds: u64,
    /// Seconds between HTTP/2 keepalive pings on idle connections of the HTTPS listener
    /// (sidecar streams).
    #[arg(long, env = "TOOLGATE_KEEPALIVE_SECONDS", default_value_t = 10)]
    keepalive_seconds: u64,
    /// Seconds a keepalive ping may go unanswered before the connection (and the sidecar's
    /// stream: it no longer counts as enforcing) is dropped.
    #[arg(long, env = "TOOLGATE_KEEPALIVE_TIMEOUT_SECONDS", default_value_t = 10)]
    keepalive_timeout_seconds: u64,
    /// Accept a sidecar's stream only from its pod's IP address (status.podIP/podIPs).
    /// Turn off only where pod-to-Service traffic is source-NATed (the token alone then
    /// identifies the pod, and anyone who can mint it can pose as the sidecar).
    #[arg(long, env = "TOOLGATE_BIND_POD_IP", default_value_t = true, action = clap::ArgAction::Set)]
    bind_pod_ip: bool,
    /// Govern only namespaces whose labels match this selector (e.g. `team=ml`); default:
    /// every namespace. Policies, streams and injection elsewhere are left alone.
    #[arg(long, env = "TOOLGATE_NAMESPACE_SELECTOR")]
    namespace_selector: Option<String>,
    /// Lease (in --namespace) used for leader election.
    #[arg(long, env = "TOOLGATE_LEASE_NAME", default_value = "toolgate-operator-leader")]
    lease_name: String,
    /// Seconds a leader lease is valid without renewal.
    #[arg(long, env = "TOOLGATE_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
    /// Which service accounts may approve or deny held calls: `any`, `other-namespaces`
    /// (not those of the pod's namespace, which its editors can impersonate) or `none`
    /// (people only). Listed accounts are always allowed.
    #[arg(long, env = "TOOLGATE_DECIDER_SERVICE_ACCOUNTS", default_value = "other-namespaces")]
    decider_service_accounts: approvals::ServiceAccountDeciders,
    /// Service accounts (NAMESPACE/NAME, comma-separated) that may decide approvals whatever
    /// --decider-service-accounts says; never the requesting pod's own.
    #[arg(long, env = "TOOLGATE_ALLOWED_DECIDER_SERVICE_ACCOUNTS", value_delimiter = ',')]
    allowed_decider_service_accounts: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOOLGATE_LOG").unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("toolgate-operator: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("toolgate-operator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The user name the apiserver authenticates this process as (a SelfSubjectReview): the
/// only user whose McpApproval creations the `/approval` webhook admits.
async fn own_user(client: &Client) -> Result<String> {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    let review = Api::<SelfSubjectReview>::all(client.clone())
        .create(&kube::api::PostParams::default(), &SelfSubjectReview::default())
        .await
        .context("a SelfSubjectReview (who am I?) failed; the operator needs it to recognise its own McpApprovals")?;
    review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .filter(|u| !u.is_empty())
        .context("the SelfSubjectReview named no user")
}

fn serving_names(args: &Args) -> Vec<String> {
    let (svc, ns) = (&args.service_name, &args.namespace);
    let mut names =
        vec![format!("{svc}.{ns}.svc"), svc.clone(), format!("{svc}.{ns}"), format!("{svc}.{ns}.svc.cluster.local")];
    if let Some(host) = args.webhook_url.as_ref().and_then(|u| u.host()) {
        names.push(host.trim_start_matches('[').trim_end_matches(']').to_owned());
    }
    names.extend(args.extra_sans.iter().filter(|s| !s.is_empty()).cloned());
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

async fn run(args: Args) -> Result<()> {
    let counter_store = counter_store(&args)?;
    let client = Client::try_default().await.context("no Kubernetes configuration (in-cluster or KUBECONFIG)")?;
    // Fail early, with the fix, when a CRD is missing (after a short grace: a CRD
    // installed a moment ago takes a little while to be served).
    require_crd::<McpPolicy>(&client, "McpPolicy", "mcppolicies.toolgate.dev").await?;
    require_crd::<McpApproval>(&client, "McpApproval", "mcpapprovals.toolgate.dev").await?;
    let deciders = approvals::Deciders {
        operator_user: Some(own_user(&client).await?),
        service_accounts: args.decider_service_accounts,
        allowed: args
            .allowed_decider_service_accounts
            .iter()
            .filter(|e| !e.trim().is_empty())
            .map(|e| approvals::Deciders::service_account_user(e))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("--allowed-decider-service-accounts: {e}"))?,
    };
    let identity = args
        .pod_name
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("toolgate-operator-{}", std::process::id()));
    let metrics = Arc::new(Metrics::new());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    // Informer caches, shared by the webhook, the streams and (on the leader) the controller.
    let (policy_store, policy_writer) = reflector::store::<McpPolicy>();
    let (pod_store, pod_writer) = reflector::store::<Pod>();
    let (ns_store, ns_writer) = reflector::store::<Namespace>();
    let scope = match &args.namespace_selector {
        None => None,
        Some(text) => Some(Scope { namespaces: ns_store.clone(), selector: parse_selector(text)? }),
    };
    let (approval_store, approval_writer) = reflector::store::<McpApproval>();
    let operator_url = args
        .sidecar_operator_url
        .clone()
        .unwrap_or_else(|| format!("https://{}.{}.svc:{}", args.service_name, args.namespace, args.listen.port()));
    let inject = InjectConfig {
        image: args.sidecar_image.clone(),
        operator_url,
        ca_config_map: Some(args.ca_config_map.clone()),
        allowed_hosts: args
            .sidecar_allowed_hosts
            .iter()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .collect(),
        allowed_origins: args
            .sidecar_allowed_origins
            .iter()
            .map(|o| o.trim().to_owned())
            .filter(|o| !o.is_empty())
            .collect(),
        counter_store,
        ..InjectConfig::default()
    };
    let (hub, status_rx) = Hub::new(
        policy_store.clone(),
        pod_store.clone(),
        approval_store.clone(),
        metrics.clone(),
        scope,
        inject.clone(),
    );
    let policy_events = reflector::reflector(
        policy_writer,
        watcher(Api::<McpPolicy>::all(client.clone()), watcher::Config::default()).default_backoff(),
    );
    // Every pod, not only injected ones: status counts every pod a policy selects, and
    // those without the sidecar are reported as unprotected. Managed fields are dropped to
    // keep the cache small.
    let pod_events = reflector::reflector(
        pod_writer,
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()).default_backoff().modify(|pod| {
            pod.managed_fields_mut().clear();
        }),
    );
    let ns_events = reflector::reflector(
        ns_writer,
        watcher(Api::<Namespace>::all(client.clone()), watcher::Config::default()).default_backoff(),
    );
    let approval_events = reflector::reflector(
        approval_writer,
        watcher(Api::<McpApproval>::all(client.clone()), watcher::Config::default()).default_backoff(),
    );
    for events in [
        policy_events.map(|_| ()).boxed(),
        pod_events.map(|_| ()).boxed(),
        ns_events.map(|_| ()).boxed(),
        approval_events.map(|_| ()).boxed(),
    ] {
        let hub = hub.clone();
        tokio::spawn(events.for_each(move |()| {
            hub.changed.notify_one();
            async {}
        }));
    }
    // Pusher: every cache change recomputes the policy set of every connected sidecar.
    {
        let hub = hub.clone();
        tokio::spawn(async move {
            loop {
                hub.changed.notified().await;
                tokio::time::sleep(Duration::from_millis(10)).await;
                hub.push_all();
                hub.push_approvals();
                hub.prune();
            }
        });
    }

    // TLS.
    let certs = Arc::new(CertStore::default());
    let names = serving_names(&args);
    let lifetimes = Lifetimes {
        ca: Duration::from_secs(args.ca_cert_seconds.max(600)),
        serving: Duration::from_secs(args.serving_cert_seconds.max(10)),
    };
    let (leader_tx, leader_rx) = watch::channel(false);
    load_certificates(&client, &args, &names, &lifetimes, &certs, false)
        .await
        .context("loading the serving certificate")?;

    let ctx = Arc::new(Ctx {
        client: client.clone(),
        hub: hub.clone(),
        auth: Authenticator::new(client.clone()),
        namespaces: ns_store.clone(),
        namespace_api: Api::all(client.clone()),
        inject,
        deciders,
        heartbeat: Duration::from_secs(args.heartbeat_seconds.max(1)),
        bind_pod_ip: args.bind_pod_ip,
        keepalive: server::Keepalive {
            interval: Duration::from_secs(args.keepalive_seconds.max(1)),
            timeout: Duration::from_secs(args.keepalive_timeout_seconds.max(1)),
        },
        metrics: metrics.clone(),
        shutdown: shutdown_rx.clone(),
        ready: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let admin = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", args.admin_listen))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(certs.server_config());
    let https = tokio::spawn(server::serve(listener, Some(acceptor), ctx.clone(), server::handle, shutdown_rx.clone()));
    let admin = tokio::spawn(server::serve(admin, None, ctx.clone(), server::admin, shutdown_rx.clone()));
    tracing::info!(listen = %args.listen, admin = %args.admin_listen, %identity, names = ?names, "serving");

    // Ready once the caches are synced.
    {
        let (ctx, ps, os, ns, certs) =
            (ctx.clone(), policy_store.clone(), pod_store.clone(), ns_store.clone(), certs.clone());
        tokio::spawn(async move {
            let _ = tokio::join!(ps.wait_until_ready(), os.wait_until_ready(), ns.wait_until_ready());
            ctx.ready.store(certs.loaded(), Ordering::Relaxed);
            ctx.hub.changed.notify_one();
            tracing::info!("caches synced");
        });
    }

    // Leader election, and what only the leader does.
    tokio::spawn(leader::run(
        Api::<Lease>::namespaced(client.clone(), &args.namespace),
        args.lease_name.clone(),
        identity.clone(),
        leader::Timing {
            duration: Duration::from_secs(args.lease_seconds.max(2)),
            renew: Duration::from_secs((args.lease_seconds / 7).clamp(1, 5)),
        },
        leader_tx,
        shutdown_rx.clone(),
    ));
    let reports = tokio::spawn(acks::publish(
        Api::<Lease>::namespaced(client.clone(), &args.namespace),
        args.lease_name.clone(),
        identity.clone(),
        hub.clone(),
        shutdown_rx.clone(),
    ));
    let term_sender: Arc<Mutex<Option<mpsc::UnboundedSender<ObjectRef<McpPolicy>>>>> = Arc::default();
    {
        // The hub's status notifications go to the controller of the current term.
        let term_sender = term_sender.clone();
        let mut status_rx = status_rx;
        tokio::spawn(async move {
            while let Some(r) = status_rx.recv().await {
                if let Some(tx) = term_sender.lock().expect("term lock").as_ref() {
                    let _ = tx.send(r);
                }
            }
        });
    }
    let args = Arc::new(args);
    let lead = {
        let (client, hub, metrics, args, certs, names, identity, lifetimes) = (
            client.clone(),
            hub.clone(),
            metrics.clone(),
            args.clone(),
            certs.clone(),
            names.clone(),
            identity.clone(),
            lifetimes.clone(),
        );
        let mut leader_rx = leader_rx.clone();
        tokio::spawn(async move {
            loop {
                if leader_rx.wait_for(|l| *l).await.is_err() {
                    return;
                }
                metrics.set_leader(true);
                let (tx, rx) = mpsc::unbounded_channel();
                *term_sender.lock().expect("term lock") = Some(tx);
                let term = async {
                    tokio::join!(
                        controller::run(client.clone(), hub.clone(), rx, identity.clone()),
                        acks::collect(Api::namespaced(client.clone(), &args.namespace), identity.clone(), hub.clone()),
                        approvals::janitor(client.clone(), hub.clone()),
                        acks::abandon_replaced(client.clone(), hub.clone()),
                        leader_duties(&client, &args, &names, &lifetimes, &certs, &hub),
                    )
                };
                tokio::select! {
                    _ = term => {}
                    _ = async { let _ = leader_rx.wait_for(|l| !*l).await; } => {}
                }
                *term_sender.lock().expect("term lock") = None;
                metrics.set_leader(false);
                tracing::info!("no longer the leader: status writes and rotation stop here");
            }
        })
    };
    // Every replica keeps its certificate in sync with the Secret (or the files).
    {
        let (client, args, names, certs, lifetimes) =
            (client.clone(), args.clone(), names.clone(), certs.clone(), lifetimes.clone());
        let mut shutdown = shutdown_rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(reload_interval(&lifetimes)) => {}
                    _ = server::stopped(&mut shutdown) => return,
                }
                if let Err(e) = load_certificates(&client, &args, &names, &lifetimes, &certs, false).await {
                    tracing::warn!(error = %format!("{e:#}"), "cannot reload the serving certificate; keeping the current one");
                }
            }
        });
    }

    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    lead.abort();
    let _ = https.await;
    let _ = admin.await;
    let _ = reports.await;
    // Give the leader loop a moment to release the Lease.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// `key=value[,key=value...]` (equality only) as a label selector.
/// The shared counter store the sidecars get, from the `--sidecar-counter-store*` flags;
/// a bad value stops the operator rather than inject sidecars that cannot start.
fn counter_store(args: &Args) -> Result<Option<CounterStoreConfig>> {
    let Some(url) = args.sidecar_counter_store.as_deref().map(str::trim).filter(|u| !u.is_empty()) else {
        return Ok(None);
    };
    let store = CounterStoreConfig {
        url: url.to_owned(),
        prefix: args.sidecar_counter_store_prefix.clone(),
        secret: args.sidecar_counter_store_secret.clone(),
        ca: args.sidecar_counter_store_ca,
        on_failure: args.sidecar_counter_store_on_failure.clone(),
        timeout_ms: args.sidecar_counter_store_timeout_ms,
    };
    store.validate().map_err(|e| anyhow::anyhow!("--sidecar-counter-store: {e}"))?;
    Ok(Some(store))
}

fn parse_selector(text: &str) -> Result<Selector> {
    text.split(',')
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
            _ => bail!("--namespace-selector: {pair:?} is not key=value (only equality selectors are supported)"),
        })
        .collect()
}

async fn require_crd<K>(client: &Client, kind: &str, crd: &str) -> Result<()>
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let api: Api<K> = Api::all(client.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(kube::Error::Api(e)) if e.code == 404 => bail!(
                "the {kind} CRD ({crd}) is not installed: `kubectl apply -f crds/` or install/upgrade the Helm chart (charts/toolgate)"
            ),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot list {kind}s (is the ServiceAccount allowed to?)"));
            }
        }
    }
}

fn reload_interval(life: &Lifetimes) -> Duration {
    (life.serving / 10).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// Loads (and, when allowed, creates or renews) the serving certificate into `certs`.
async fn load_certificates(
    client: &Client,
    args: &Args,
    names: &[String],
    life: &Lifetimes,
    certs: &CertStore,
    leader: bool,
) -> Result<bool> {
    let (cert, key, ca) = match args.cert_mode {
        CertMode::Files => {
            let read = |p: &Option<PathBuf>| -> Result<String> {
                let p = p.as_ref().context("file path missing")?;
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            (read(&args.tls_cert_file)?, read(&args.tls_key_file)?, read(&args.tls_ca_file)?)
        }
        CertMode::Operator => {
            let api: Api<Secret> = Api::namespaced(client.clone(), &args.namespace);
            let (bundle, wrote) = tls::reconcile_secret(&api, &args.tls_secret, names, life, leader).await?;
            if wrote {
                tracing::info!(secret = %args.tls_secret, "issued a serving certificate");
            }
            (bundle.cert, bundle.key, bundle.ca_bundle)
        }
    };
    let changed = certs.install(&cert, &key, &ca)?;
    if changed {
        tracing::info!("serving certificate loaded");
    }
    Ok(changed)
}

/// Certificate rotation, caBundle and CA ConfigMaps: the leader's periodic duties.
async fn leader_duties(client: &Client, args: &Args, names: &[String], life: &Lifetimes, certs: &CertStore, hub: &Hub) {
    let mut published: std::collections::HashMap<String, String> = Default::default();
    loop {
        if args.cert_mode == CertMode::Operator {
            match load_certificates(client, args, names, life, certs, true).await {
                Ok(true) => hub.metrics.certificate_issued(),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "certificate rotation failed"),
            }
            if let Err(e) = patch_ca_bundle(client, &args.webhook_config, &certs.ca_bundle()).await {
                tracing::warn!(error = %format!("{e:#}"), webhook = %args.webhook_config, "cannot patch the caBundle");
            }
        }
        publish_ca(client, args, certs, hub, &mut published).await;
        tokio::time::sleep(reload_interval(life).min(Duration::from_secs(5))).await;
    }
}

/// Sets every webhook's `caBundle` of the configuration to `ca` where it differs.
async fn patch_ca_bundle(client: &Client, name: &str, ca: &str) -> Result<()> {
    use base64::Engine as _;
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Some(config) = api.get_opt(name).await? else {
        tracing::debug!(webhook = %name, "no MutatingWebhookConfiguration to patch");
        return Ok(());
    };
    let mut ops = Vec::new();
    for (i, hook) in config.webhooks.iter().flatten().enumerate() {
        if hook.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(ca.as_bytes()) {
            ops.push(serde_json::json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": hook.name}));
            ops.push(serde_json::json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"),
                "value": base64::engine::general_purpose::STANDARD.encode(ca)}));
        }
    }
    if ops.is_empty() {
        return Ok(());
    }
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))?;
    api.patch(name, &PatchParams::default(), &Patch::<()>::Json(patch)).await?;
    tracing::info!(webhook = %name, "caBundle updated");
    Ok(())
}

/// Publishes the CA bundle as a ConfigMap into every namespace that is labelled for
/// injection, has injected pods or has McpPolicies.
async fn publish_ca(
    client: &Client,
    args: &Args,
    certs: &CertStore,
    hub: &Hub,
    published: &mut std::collections::HashMap<String, String>,
) {
    let ca = certs.ca_bundle();
    if ca.is_empty() {
        return;
    }
    let mut namespaces: std::collections::BTreeSet<String> = hub
        .pods
        .state()
        .iter()
        .filter(|p| p.labels().get(INJECTED_LABEL).is_some_and(|v| v == "true"))
        .filter_map(|p| p.namespace())
        .collect();
    namespaces.extend(hub.policies.state().iter().filter_map(|p| p.namespace()));
    let ns_api: Api<Namespace> = Api::all(client.clone());
    if let Ok(list) = ns_api.list_metadata(&ListParams::default().labels(&format!("{INJECT_LABEL}=enabled"))).await {
        namespaces.extend(list.items.iter().map(|n| n.name_any()));
    }
    for ns in namespaces {
        if published.get(&ns) == Some(&ca) || !hub.governs(&ns) {
            continue;
        }
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        let cm = serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": args.ca_config_map, "labels": {"app.kubernetes.io/managed-by": "toolgate-operator"}},
            "data": {"ca.crt": ca},
        });
        match api
            .patch(&args.ca_config_map, &PatchParams::apply(controller::FIELD_MANAGER).force(), &Patch::Apply(&cm))
            .await
        {
            Ok(_) => {
                published.insert(ns, ca.clone());
            }
            Err(e) => tracing::warn!(namespace = %ns, error = %e, "cannot publish the CA ConfigMap"),
        }
    }
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
