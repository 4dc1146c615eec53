//! Wiring: [`run`] starts every part of the operator from a checked [`Config`] and stops
//! them on SIGTERM or Ctrl-C. Each part is one named function below.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ListParams};
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use toolgate_policy::crd::{McpApproval, McpPolicy};

use crate::admission::Admission;
use crate::auth::{Authenticator, ConnAuth};
use crate::cli::Config;
use crate::http::{self, stopped};
use crate::leader::duties::{CertConfig, load_certificates};
use crate::leader::{Leader, lease};
use crate::metrics::Metrics;
use crate::push::server::Server;
use crate::push::{Hub, Scope, acks};
use crate::router::{self, Ctx};
use crate::tls::CertStore;

/// Runs the operator until SIGTERM or Ctrl-C.
pub async fn run(mut config: Config) -> Result<()> {
    let client = Client::try_default().await.context("no Kubernetes configuration (in-cluster or KUBECONFIG)")?;
    // Fail early, with the fix, when a CRD is missing (after a short grace: a CRD
    // installed a moment ago takes a little while to be served).
    require_crd::<McpPolicy>(&client, "McpPolicy", "mcppolicies.toolgate.dev").await?;
    require_crd::<McpApproval>(&client, "McpApproval", "mcpapprovals.toolgate.dev").await?;
    config.deciders.operator_user = Some(own_user(&client).await?);
    let metrics = Arc::new(Metrics::new());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    // Informer caches, shared by the webhook, the streams and (on the leader) the controller.
    let (caches, writers) = caches();
    let scope =
        config.namespace_selector.take().map(|selector| Scope { namespaces: caches.namespaces.clone(), selector });
    let (hub, status_rx) = Hub::new(
        caches.policies.clone(),
        caches.pods.clone(),
        caches.approvals.clone(),
        metrics.clone(),
        scope,
        config.inject.clone(),
    );
    informers(&client, writers, &hub);
    spawn_pusher(hub.clone());

    let certs = Arc::new(CertStore::default());
    load_certificates(&client, &config.duties.certs, &certs, false).await.context("loading the serving certificate")?;
    let ctx = context(&config, &client, &hub, &caches, &metrics, &shutdown_rx);
    let servers = serve(&config, ctx.clone(), &certs, &shutdown_rx).await?;
    mark_ready_when_synced(ctx, caches, certs.clone());
    let (lead, reports) = leadership(&client, &config, hub, certs.clone(), status_rx, &shutdown_rx);
    cert_reload(client, config.duties.certs.clone(), certs, shutdown_rx);

    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    lead.abort();
    for server in servers {
        let _ = server.await;
    }
    let _ = reports.await;
    // Give the leader loop a moment to release the Lease.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// The informer caches (readers).
struct Caches {
    policies: Store<McpPolicy>,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    approvals: Store<McpApproval>,
}

/// Their writers, handed to [`informers`].
struct Writers {
    policies: Writer<McpPolicy>,
    pods: Writer<Pod>,
    namespaces: Writer<Namespace>,
    approvals: Writer<McpApproval>,
}

fn caches() -> (Caches, Writers) {
    let (policies, policy_writer) = reflector::store::<McpPolicy>();
    let (pods, pod_writer) = reflector::store::<Pod>();
    let (namespaces, ns_writer) = reflector::store::<Namespace>();
    let (approvals, approval_writer) = reflector::store::<McpApproval>();
    (
        Caches { policies, pods, namespaces, approvals },
        Writers { policies: policy_writer, pods: pod_writer, namespaces: ns_writer, approvals: approval_writer },
    )
}

/// Starts the watches that fill the caches; every event wakes the pusher.
fn informers(client: &Client, writers: Writers, hub: &Arc<Hub>) {
    let policy_events = reflector::reflector(
        writers.policies,
        watcher(Api::<McpPolicy>::all(client.clone()), watcher::Config::default()).default_backoff(),
    );
    // Every pod, not only injected ones: status counts every pod a policy selects, and
    // those without the sidecar are reported as unprotected. Managed fields are dropped to
    // keep the cache small.
    let pod_events = reflector::reflector(
        writers.pods,
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()).default_backoff().modify(|pod| {
            pod.managed_fields_mut().clear();
        }),
    );
    let ns_events = reflector::reflector(
        writers.namespaces,
        watcher(Api::<Namespace>::all(client.clone()), watcher::Config::default()).default_backoff(),
    );
    let approval_events = reflector::reflector(
        writers.approvals,
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
}

/// Pusher: every cache change recomputes the policy set of every connected sidecar.
fn spawn_pusher(hub: Arc<Hub>) {
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

/// What the handlers of both listeners share.
fn context(
    config: &Config,
    client: &Client,
    hub: &Arc<Hub>,
    caches: &Caches,
    metrics: &Arc<Metrics>,
    shutdown: &watch::Receiver<bool>,
) -> Arc<Ctx> {
    Arc::new(Ctx {
        admission: Admission {
            hub: hub.clone(),
            namespaces: caches.namespaces.clone(),
            namespace_api: Api::all(client.clone()),
            inject: config.inject.clone(),
            deciders: config.deciders.clone(),
            metrics: metrics.clone(),
        },
        push: Server {
            client: client.clone(),
            hub: hub.clone(),
            auth: Authenticator::new(client.clone()),
            inject: config.inject.clone(),
            heartbeat: config.heartbeat,
            bind_pod_ip: config.bind_pod_ip,
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
        },
        metrics: metrics.clone(),
        ready: Default::default(),
    })
}

/// Binds both listeners (an error names the address) and serves them until shutdown.
async fn serve(
    config: &Config,
    ctx: Arc<Ctx>,
    certs: &Arc<CertStore>,
    shutdown: &watch::Receiver<bool>,
) -> Result<[JoinHandle<()>; 2]> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", config.admin_listen))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(certs.server_config());
    // Per HTTPS connection: what a token proved there (see `ConnAuth`).
    let https = tokio::spawn(http::serve::<_, ConnAuth, _, _>(
        listener,
        Some(acceptor),
        ctx.clone(),
        router::handle,
        config.keepalive,
        shutdown.clone(),
    ));
    let admin =
        tokio::spawn(http::serve::<_, (), _, _>(admin, None, ctx, router::admin, config.keepalive, shutdown.clone()));
    tracing::info!(listen = %config.listen, admin = %config.admin_listen, identity = %config.identity,
        names = ?config.duties.certs.names, "serving");
    Ok([https, admin])
}

/// Ready once the caches are synced (and a certificate is loaded).
fn mark_ready_when_synced(ctx: Arc<Ctx>, caches: Caches, certs: Arc<CertStore>) {
    tokio::spawn(async move {
        let _ = tokio::join!(
            caches.policies.wait_until_ready(),
            caches.pods.wait_until_ready(),
            caches.namespaces.wait_until_ready()
        );
        ctx.ready.store(certs.loaded(), Ordering::Relaxed);
        ctx.push.hub.changed.notify_one();
        tracing::info!("caches synced");
    });
}

/// Leader election, this replica's acknowledgement reports, and the leader task (what
/// only the leader does). Returns the leader task and the report publisher.
fn leadership(
    client: &Client,
    config: &Config,
    hub: Arc<Hub>,
    certs: Arc<CertStore>,
    status: mpsc::UnboundedReceiver<ObjectRef<McpPolicy>>,
    shutdown: &watch::Receiver<bool>,
) -> (JoinHandle<()>, JoinHandle<()>) {
    let (leader_tx, leader_rx) = watch::channel(false);
    let leases = || Api::<Lease>::namespaced(client.clone(), &config.namespace);
    tokio::spawn(lease::run(
        leases(),
        config.lease_name.clone(),
        config.identity.clone(),
        config.lease.clone(),
        leader_tx,
        shutdown.clone(),
    ));
    let reports = tokio::spawn(acks::publish(
        leases(),
        config.lease_name.clone(),
        config.identity.clone(),
        hub.clone(),
        shutdown.clone(),
    ));
    let leader = Leader {
        client: client.clone(),
        hub,
        identity: config.identity.clone(),
        namespace: config.namespace.clone(),
        duties: config.duties.clone(),
        certs,
        status,
    };
    (tokio::spawn(leader.run(leader_rx)), reports)
}

/// Every replica keeps its certificate in sync with the Secret (or the files).
fn cert_reload(client: Client, config: CertConfig, certs: Arc<CertStore>, mut shutdown: watch::Receiver<bool>) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(config.reload_interval()) => {}
                _ = stopped(&mut shutdown) => return,
            }
            if let Err(e) = load_certificates(&client, &config, &certs, false).await {
                tracing::warn!(error = %format!("{e:#}"), "cannot reload the serving certificate; keeping the current one");
            }
        }
    });
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
