//! push-bench: policy-push and admission-webhook latency of a real `toolgate-operator`
//! process against the real kube-apiserver of the test harness (`make bench-push`;
//! docs/benchmarks.md, "Policy push and admission").
//!
//! ```text
//! push-bench [--clients 1,100,1000] [--rounds 5] [--cold-rounds 1] [--webhook-requests 1000]
//! ```
//!
//! 1. Starts etcd + kube-apiserver ([`TestCluster::shared`], binaries from `make testbin`),
//!    installs the CRDs of crds/, creates an operator namespace and an app namespace, the
//!    McpPolicy `bench` (selector `app=bench`), max(N) Pods holding the sidecar exactly as
//!    the operator injects it (the patch of `toolgate_operator::inject`, applied here; no
//!    webhook on this path) with 127.0.0.1 reported as their IP (the operator streams only
//!    to such pods, from their address), and a pod-bound token (audience `toolgate`) per
//!    pod, with bounded parallelism.
//! 2. Starts `toolgate-operator` (release build next to this binary by default), scoped to
//!    the app namespace with `--namespace-selector`, and reads the published CA.
//! 3. For each N: N in-process sidecar clients, each on its own TLS + HTTP/2 connection,
//!    hold `GET /v1/stream` and POST `/v1/ack` on the same connection for every revision
//!    they have not acknowledged yet, noting when the line arrived and when the 204 came
//!    back. Once all N acknowledged the current set, `--rounds` edits of the McpPolicy
//!    (server-side apply, a new `max`) are timed: from just before the apply was sent and
//!    from the moment it returned (the apiserver's write) to each client's acknowledgement.
//!    For the largest N, `--cold-rounds` more edits follow after the operator's TokenReview
//!    cache (60 s) has expired, as for an edit made minutes after the sidecars connected:
//!    then every acknowledgement costs the operator a TokenReview.
//! 4. `--webhook-requests` AdmissionReviews of a Pod labelled `toolgate.dev/inject=enabled`
//!    are POSTed one after the other to the operator's `/inject` on one HTTPS/h2
//!    connection (like the apiserver's webhook client), timed client-side; the operator's
//!    own `toolgate_operator_webhook_duration_seconds` histogram is read before and after.
//!
//! Prints tables and one verdict line per target; a missed target is reported, not an
//! error (the exit status is 0 unless the benchmark itself fails).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures_util::{StreamExt, stream};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, ServiceAccount};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use toolgate_policy::push::{ACK_PATH, Ack, Message, STREAM_PATH};
use toolgate_tests::{Supervised, TestCluster, free_port, run_ok};

/// The CRDs (every file of crds/: the operator refuses to start without them).
const CRD_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds");
const POLICY: &str = "bench";
const SERVICE_ACCOUNT: &str = "agent";
/// The operator URL the bench's pods are injected with (and the operator is started with):
/// the operator recognises only the sidecar it would inject itself.
const SIDECAR_OPERATOR_URL: &str = "https://toolgate-operator.toolgate-bench.svc:8443";
/// The operator caches successful TokenReviews for this long (operator/src/auth.rs).
const TOKEN_CACHE_TTL: Duration = Duration::from_secs(60);

/// Policy-push and webhook latency of toolgate-operator against the test apiserver.
#[derive(clap::Parser, Debug)]
#[command(name = "push-bench", version, about)]
struct Args {
    /// Numbers of connected sidecar clients, one series each.
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    clients: Vec<usize>,
    /// McpPolicy edits per series (the operator's TokenReview cache warm).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Extra edits of the largest series after the TokenReview cache expired (each waits
    /// for the expiry, about a minute; 0 = none).
    #[arg(long, default_value_t = 1)]
    cold_rounds: usize,
    /// AdmissionReviews posted to /inject (0 = skip the webhook benchmark).
    #[arg(long, default_value_t = 1000)]
    webhook_requests: usize,
    /// Parallel apiserver calls while creating pods and tokens, and parallel connects.
    #[arg(long, default_value_t = 16)]
    parallel: usize,
    /// Pause after connecting and after each round (lets the status writes that acks
    /// trigger settle), ms.
    #[arg(long, default_value_t = 1000)]
    pause_ms: u64,
    /// Seconds to wait for every acknowledgement of one edit.
    #[arg(long, default_value_t = 30)]
    round_timeout: u64,
    /// The toolgate-operator binary (default: the one next to this binary).
    #[arg(long)]
    operator_bin: Option<PathBuf>,
    /// TOOLGATE_LOG of the operator (e.g. `info,toolgate_operator=debug`).
    #[arg(long, default_value = "info,kube=warn")]
    operator_log: String,
    /// Where the operator's log goes (replaced).
    #[arg(long, default_value = "target/bench-push-operator.log")]
    log: PathBuf,
    /// Also write the results as JSON here.
    #[arg(long, default_value = "target/bench-push.json")]
    json: PathBuf,
    /// Worker threads of this process's runtime (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> std::process::ExitCode {
    let args = <Args as clap::Parser>::parse();
    toolgate_tests::install_crypto_provider();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        builder.worker_threads(n.max(1));
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("push-bench: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("push-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Progress on stderr, with the time since start.
fn note(started: Instant, what: impl std::fmt::Display) {
    eprintln!("[{:6.1}s] {what}", started.elapsed().as_secs_f64());
}

async fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let mut clients = args.clients.clone();
    clients.retain(|n| *n > 0);
    if clients.is_empty() && args.webhook_requests == 0 {
        bail!("nothing to measure: --clients is empty and --webhook-requests is 0");
    }
    let max_n = clients.iter().copied().max().unwrap_or(1);
    let operator_bin = match &args.operator_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("the path of this binary")?.with_file_name("toolgate-operator"),
    };
    if !operator_bin.exists() {
        bail!(
            "{} does not exist: build it with `cargo build --release -p toolgate-operator` (or pass --operator-bin)",
            operator_bin.display()
        );
    }
    check_fd_limit(max_n);
    let load_before = load_average();
    note(started, format!("starting etcd + kube-apiserver (operator binary {})", operator_bin.display()));
    let cluster: &'static TestCluster =
        tokio::task::spawn_blocking(TestCluster::shared).await.context("starting the test cluster")?;
    let client = cluster.client();

    // CRDs, namespaces, the policy, pods and tokens.
    run_ok(cluster.kubectl().args(["apply", "-f", CRD_DIR])).await;
    run_ok(cluster.kubectl().args(["wait", "--for=condition=Established", "--timeout=90s", "crd", "--all"])).await;
    let op_ns = cluster.create_namespace().await;
    let app = cluster.create_namespace().await;
    let scope_label = "toolgate.dev/bench-operator";
    Api::<Namespace>::all(client.clone())
        .patch(&app, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {scope_label: op_ns}}})))
        .await
        .context("labelling the app namespace")?;
    cluster.ensure_service_account(&app, SERVICE_ACCOUNT).await;
    let policies = policy_api(&client, &app);
    let mut edit = 0u32;
    let mut generation = apply_policy(&policies, edit).await?;
    let pods = create_pods(&client, &app, max_n, args.parallel, started).await?;
    let tokens = mint_tokens(&client, &app, &pods, args.parallel, started).await?;

    // The operator.
    let operator = Operator::start(cluster, &operator_bin, &op_ns, &format!("{scope_label}={op_ns}"), &args).await?;
    note(started, format!("operator ready on 127.0.0.1:{} (admin {})", operator.port, operator.admin));
    let apiserver_port = cluster.apiserver_url().rsplit(':').next().unwrap_or_default().to_owned();
    let pids = Pids::find(&format!("127.0.0.1:{}", operator.port), &apiserver_port);
    if pids.operator.is_none() || pids.apiserver.is_none() {
        eprintln!("push-bench: warning: cannot find the operator or apiserver process; CPU times are left out");
    }
    let ca = published_ca(&client, &app).await?;
    let tls = tls_config(&ca)?;

    let mut series = Vec::new();
    let mut webhook = None;
    for (i, &n) in clients.iter().enumerate() {
        let last = i + 1 == clients.len();
        let (events_tx, mut events) = mpsc::unbounded_channel();
        note(started, format!("N={n}: connecting {n} clients"));
        let connect_started = Instant::now();
        let connected: Vec<Result<SidecarClient>> = stream::iter(0..n)
            .map(|c| connect(c, operator.port, tls.clone(), tokens[c].clone(), events_tx.clone()))
            .buffer_unordered(args.parallel.max(1))
            .collect()
            .await;
        let connected: Vec<SidecarClient> = connected.into_iter().collect::<Result<_>>()?;
        let reviewed_at = Instant::now();
        let initial = collect_acks(&mut events, n, generation, Duration::from_secs(args.round_timeout.max(60))).await?;
        let missing = initial.iter().filter(|a| a.is_none()).count();
        if missing > 0 {
            bail!("N={n}: {missing} clients never acknowledged their first policy set");
        }
        note(started, format!("N={n}: connected and acknowledged in {:.1}s", connect_started.elapsed().as_secs_f64()));
        tokio::time::sleep(Duration::from_millis(args.pause_ms)).await;
        let push_before = operator.histogram("toolgate_operator_push_latency_seconds").await;
        let mut rounds = Vec::new();
        for r in 0..args.rounds {
            edit += 1;
            let (round, g) = measure_round(&client, &policies, &mut events, n, edit, &pids, &args).await?;
            generation = g;
            note(started, format!("N={n} round {}: {}", r + 1, round.summary()));
            rounds.push(round);
        }
        let push_hist = operator.histogram("toolgate_operator_push_latency_seconds").await.minus(&push_before);
        let mut result = Series { n, cold: false, rounds, operator_push: push_hist };
        if last && args.webhook_requests > 0 {
            // While waiting for the token cache to expire: the webhook, with every sidecar
            // connected.
            webhook = Some(webhook_bench(&operator, &tls, &pods[0], &app, args.webhook_requests, started).await?);
        }
        if last && args.cold_rounds > 0 {
            let mut cold = Vec::new();
            let push_before = operator.histogram("toolgate_operator_push_latency_seconds").await;
            for r in 0..args.cold_rounds {
                let expired =
                    if r == 0 { reviewed_at } else { Instant::now() } + TOKEN_CACHE_TTL + Duration::from_secs(2);
                let wait = expired.saturating_duration_since(Instant::now());
                note(started, format!("N={n}: waiting {:.0}s for the TokenReview cache to expire", wait.as_secs_f64()));
                tokio::time::sleep(wait).await;
                edit += 1;
                let (round, g) = measure_round(&client, &policies, &mut events, n, edit, &pids, &args).await?;
                generation = g;
                note(started, format!("N={n} cold round {}: {}", r + 1, round.summary()));
                cold.push(round);
            }
            let push_hist = operator.histogram("toolgate_operator_push_latency_seconds").await.minus(&push_before);
            series.push(result);
            result = Series { n, cold: true, rounds: cold, operator_push: push_hist };
        }
        series.push(result);
        drop(connected);
        drop(events_tx);
    }
    if webhook.is_none() && args.webhook_requests > 0 {
        webhook = Some(webhook_bench(&operator, &tls, &pods[0], &app, args.webhook_requests, started).await?);
    }
    let load_after = load_average();
    drop(operator);

    let report = Report { series, webhook, load_before, load_after, operator_bin, parallel: args.parallel };
    println!("{}", report.table());
    std::fs::write(&args.json, serde_json::to_string_pretty(&report.json())?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    note(
        started,
        format!("done; results also in {} and the operator's log in {}", args.json.display(), args.log.display()),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Cluster objects

fn policy_api(client: &kube::Client, namespace: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("toolgate.dev", "v1alpha1", "McpPolicy");
    Api::namespaced_with(client.clone(), namespace, &ApiResource::from_gvk_with_plural(&gvk, "mcppolicies"))
}

/// The seed policy (docs/policy.md) with `max` varied per edit, selecting `app=bench`.
fn policy_object(edit: u32) -> Value {
    json!({
        "apiVersion": "toolgate.dev/v1alpha1", "kind": "McpPolicy",
        "metadata": {"name": POLICY},
        "spec": {
            "selector": {"matchLabels": {"app": "bench"}},
            "version": "1",
            "default": "deny",
            "tools": {
                "list-pods": {},
                "start-pod": {"limits": [{"counter": "start-pod_rate", "window": "minute", "max": 10 + edit, "scope": "grant"}]},
            },
        },
    })
}

/// Server-side apply of the McpPolicy; its new generation.
async fn apply_policy(api: &Api<DynamicObject>, edit: u32) -> Result<i64> {
    let applied = api
        .patch(POLICY, &PatchParams::apply("push-bench").force(), &Patch::Apply(&policy_object(edit)))
        .await
        .context("applying the McpPolicy")?;
    applied.metadata.generation.context("the applied McpPolicy has no generation")
}

async fn create_pods(
    client: &kube::Client,
    namespace: &str,
    n: usize,
    parallel: usize,
    started: Instant,
) -> Result<Vec<Pod>> {
    note(started, format!("creating {n} pods ({parallel} in parallel)"));
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let config = toolgate_operator::inject::InjectConfig {
        operator_url: SIDECAR_OPERATOR_URL.into(),
        ..toolgate_operator::inject::InjectConfig::default()
    };
    let opted_in = BTreeMap::from([("toolgate.dev/inject".to_owned(), "enabled".to_owned())]);
    let (config, opted_in) = (&config, &opted_in);
    let results: Vec<Result<Pod>> = stream::iter(0..n)
        .map(|i| {
            let (api, done) = (api.clone(), &done);
            async move {
                let name = format!("bench-{i:04}");
                let mut pod = json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "labels": {"app": "bench"}},
                    "spec": {
                        "serviceAccountName": SERVICE_ACCOUNT,
                        "containers": [{"name": "mcp", "image": "mcp-server:bench", "ports": [{"containerPort": 3000}]}],
                    },
                });
                let patch = toolgate_operator::inject::inject(&serde_json::from_value(pod.clone())?, opted_in, config)
                    .map_err(|skip| anyhow::anyhow!("the bench pod is not injectable: {}", skip.as_str()))?;
                json_patch::patch(&mut pod, &patch).context("applying the injection patch")?;
                let pod: Pod = serde_json::from_value(pod)?;
                retry(|| async {
                    match api.create(&PostParams::default(), &pod).await {
                        Err(kube::Error::Api(e)) if e.code == 409 => api.get(&name).await,
                        other => other,
                    }
                })
                .await
                .with_context(|| format!("creating pod {name}"))?;
                // The kubelet's part: the pod's address (the bench's clients run here).
                let ip = json!({"status": {"podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}});
                let (params, patch) = (PatchParams::default(), Patch::Merge(&ip));
                let created = retry(|| api.patch_status(&name, &params, &patch))
                    .await
                    .with_context(|| format!("reporting the IP of pod {name}"))?;
                let k = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if k % 200 == 0 || k == n {
                    note(started, format!("  {k}/{n} pods"));
                }
                Ok(created)
            }
        })
        .buffered(parallel.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}

async fn mint_tokens(
    client: &kube::Client,
    namespace: &str,
    pods: &[Pod],
    parallel: usize,
    started: Instant,
) -> Result<Vec<Arc<str>>> {
    note(started, format!("minting {} pod-bound tokens", pods.len()));
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let results: Vec<Result<Arc<str>>> = stream::iter(pods)
        .map(|pod| {
            let api = api.clone();
            async move {
                let request = TokenRequest {
                    spec: TokenRequestSpec {
                        audiences: vec!["toolgate".into()],
                        expiration_seconds: Some(3600),
                        bound_object_ref: Some(BoundObjectReference {
                            api_version: Some("v1".into()),
                            kind: Some("Pod".into()),
                            name: pod.metadata.name.clone(),
                            uid: pod.metadata.uid.clone(),
                        }),
                    },
                    ..Default::default()
                };
                let params = PostParams::default();
                let answer = retry(|| api.create_token_request(SERVICE_ACCOUNT, &params, &request))
                    .await
                    .context("TokenRequest")?;
                let token = answer.status.map(|s| s.token).filter(|t| !t.is_empty()).context("no token")?;
                Ok(Arc::from(token))
            }
        })
        .buffered(parallel.max(1))
        .collect()
        .await;
    let tokens: Vec<Arc<str>> = results.into_iter().collect::<Result<_>>()?;
    note(started, format!("  {} tokens", tokens.len()));
    Ok(tokens)
}

/// Three attempts with a short pause (a loaded apiserver can time out a request).
async fn retry<T, F, Fut>(mut f: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let mut attempt = 0;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < 2 => {
                attempt += 1;
                eprintln!("  retrying after: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The CA the operator publishes into namespaces with injected pods (ConfigMap `toolgate-ca`).
async fn published_ca(client: &kube::Client, namespace: &str) -> Result<String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(cm) = api.get("toolgate-ca").await
            && let Some(ca) = cm.data.and_then(|d| d.get("ca.crt").cloned())
        {
            return Ok(ca);
        }
        if Instant::now() > deadline {
            bail!("the operator did not publish the toolgate-ca ConfigMap into {namespace} within 90 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tls_config(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for der in toolgate_tests::pem_blocks(ca_pem, "CERTIFICATE")? {
        roots.add(rustls::pki_types::CertificateDer::from(der)).context("the operator's CA")?;
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Soft limit of open files (this process and the operator each hold one socket per client).
fn check_fd_limit(clients: usize) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(soft) = soft
        && soft < clients + 512
    {
        eprintln!(
            "push-bench: warning: the open-files limit is {soft}, {clients} clients need about {}: raise it with `ulimit -n`",
            clients + 512
        );
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// The operator process

struct Operator {
    proc: Option<Supervised>,
    port: u16,
    admin: u16,
}

impl Operator {
    async fn start(cluster: &TestCluster, bin: &Path, namespace: &str, selector: &str, args: &Args) -> Result<Self> {
        let port = free_port()?;
        let admin = free_port()?;
        let flags = [
            format!("--listen=127.0.0.1:{port}"),
            format!("--admin-listen=127.0.0.1:{admin}"),
            format!("--namespace={namespace}"),
            "--pod-name=bench-operator".into(),
            "--extra-san=127.0.0.1".into(),
            // No such MutatingWebhookConfiguration: the apiserver never calls this operator;
            // the webhook benchmark posts to /inject itself.
            format!("--webhook-config=toolgate-bench-{namespace}"),
            format!("--sidecar-operator-url={SIDECAR_OPERATOR_URL}"),
            format!("--namespace-selector={selector}"),
        ];
        if let Some(dir) = args.log.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let _ = std::fs::remove_file(&args.log);
        let script = format!(
            "KUBECONFIG='{}' TOOLGATE_LOG='{}' exec '{}' {}",
            cluster.kubeconfig_path().display(),
            args.operator_log,
            bin.display(),
            flags.join(" ")
        );
        let mut proc =
            Supervised::spawn("toolgate-operator", "/bin/sh".as_ref(), &["-c".into(), script], &args.log, None)?;
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let (status, _, _) =
                tokio::task::spawn_blocking(move || toolgate_tests::mcp::http(admin, "GET", "/readyz", &[], b""))
                    .await?;
            if status == 200 {
                break;
            }
            proc.check_running()?;
            if Instant::now() > deadline {
                bail!("the operator was not ready within 90 s; see {}", args.log.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Self { proc: Some(proc), port, admin })
    }

    async fn metrics(&self) -> String {
        let admin = self.admin;
        let page = tokio::task::spawn_blocking(move || toolgate_tests::mcp::http(admin, "GET", "/metrics", &[], b""))
            .await
            .map(|(_, _, body)| body)
            .unwrap_or_default();
        String::from_utf8_lossy(&page).into_owned()
    }

    async fn histogram(&self, name: &str) -> Buckets {
        Buckets::parse(&self.metrics().await, name)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(5));
        }
    }
}

/// A Prometheus histogram: cumulative counts by upper bound (seconds), sum and count.
#[derive(Clone, Debug, Default)]
struct Buckets {
    le: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

impl Buckets {
    fn parse(page: &str, name: &str) -> Self {
        let mut b = Buckets::default();
        let bucket = format!("{name}_bucket{{");
        for line in page.lines() {
            let value = || line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            if let Some(rest) = line.strip_prefix(&bucket) {
                let le = rest
                    .split("le=\"")
                    .nth(1)
                    .and_then(|s| s.split('"').next())
                    .map(|s| if s == "+Inf" { f64::INFINITY } else { s.parse().unwrap_or(f64::INFINITY) })
                    .unwrap_or(f64::INFINITY);
                b.le.push((le, value()));
            } else if line.starts_with(&format!("{name}_sum")) {
                b.sum = value();
            } else if line.starts_with(&format!("{name}_count")) {
                b.count = value();
            }
        }
        b
    }

    fn minus(&self, before: &Buckets) -> Buckets {
        let le = self
            .le
            .iter()
            .map(|(le, c)| {
                let old = before.le.iter().find(|(l, _)| l == le).map_or(0.0, |(_, c)| *c);
                (*le, c - old)
            })
            .collect();
        Buckets { le, sum: self.sum - before.sum, count: self.count - before.count }
    }

    /// Upper bound (ms) of the bucket holding quantile `q`.
    fn quantile_bound_ms(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q * self.count;
        self.le.iter().find(|(_, c)| *c >= rank).map(|(le, _)| le * 1000.0)
    }

    fn mean_ms(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count * 1000.0)
    }
}

// ---------------------------------------------------------------------------------------
// Sidecar clients

enum Event {
    Acked { client: usize, generation: i64, received: Instant, acked: Instant },
    Failed { client: usize, why: String },
}

/// One connected client; dropping it closes its connection.
struct SidecarClient {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for SidecarClient {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn connect(
    id: usize,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    token: Arc<str>,
    events: mpsc::UnboundedSender<Event>,
) -> Result<SidecarClient> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.context("connecting to the operator")?;
    tcp.set_nodelay(true)?;
    let server = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    let tls = tokio_rustls::TlsConnector::from(tls).connect(server, tcp).await.context("TLS handshake")?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.context("h2 handshake")?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req =
        Request::get(STREAM_PATH).header(AUTHORIZATION, format!("Bearer {token}")).body(Full::new(Bytes::new()))?;
    let res = sender.send_request(req).await.context("GET /v1/stream")?;
    if res.status() != StatusCode::OK {
        let status = res.status();
        let body = res.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        bail!("client {id}: /v1/stream answered {status}: {}", String::from_utf8_lossy(&body));
    }
    let reader = tokio::spawn(read_stream(id, res.into_body(), sender, token, events));
    Ok(SidecarClient { tasks: vec![conn, reader] })
}

/// Reads the stream's lines and acknowledges every policy set not acknowledged yet, on the
/// stream's connection, like toolgate-proxy does.
async fn read_stream(
    id: usize,
    mut body: Incoming,
    mut sender: SendRequest<Full<Bytes>>,
    token: Arc<str>,
    events: mpsc::UnboundedSender<Event>,
) {
    let fail = |why: String| {
        let _ = events.send(Event::Failed { client: id, why });
    };
    let mut buf = Vec::new();
    let mut acked: Option<String> = None;
    loop {
        let frame = match body.frame().await {
            Some(Ok(f)) => f,
            Some(Err(e)) => return fail(format!("stream error: {e}")),
            None => return fail("the stream ended".into()),
        };
        let received = Instant::now();
        let Ok(data) = frame.into_data() else { continue };
        buf.extend_from_slice(&data);
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let set = match serde_json::from_slice::<Message>(&line) {
                Ok(Message::Policies(set)) => set,
                // Heartbeats (and anything else the stream carries).
                Ok(_) => continue,
                Err(e) => return fail(format!("not a stream message: {e}")),
            };
            if acked.as_deref() == Some(set.revision.as_str()) {
                continue;
            }
            let generation = set.policies.iter().find(|p| p.name == POLICY).map_or(-1, |p| p.generation);
            if let Err(e) = ack(&mut sender, &token, &set.revision).await {
                return fail(format!("ack of {}: {e:#}", set.revision));
            }
            let _ = events.send(Event::Acked { client: id, generation, received, acked: Instant::now() });
            acked = Some(set.revision);
        }
    }
}

async fn ack(sender: &mut SendRequest<Full<Bytes>>, token: &str, revision: &str) -> Result<()> {
    let body = serde_json::to_vec(&Ack { revision: revision.into(), error: None })?;
    let req = Request::post(ACK_PATH)
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    sender.ready().await.context("connection closed")?;
    let res = sender.send_request(req).await?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    if status != StatusCode::NO_CONTENT {
        bail!("{status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(())
}

/// Per client: when the set with `generation` arrived and when its ack returned (`None`:
/// not within `timeout`).
async fn collect_acks(
    events: &mut mpsc::UnboundedReceiver<Event>,
    n: usize,
    generation: i64,
    timeout: Duration,
) -> Result<Vec<Option<(Instant, Instant)>>> {
    let mut got = vec![None; n];
    let mut count = 0;
    let deadline = tokio::time::Instant::now() + timeout;
    while count < n {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::Acked { client, generation: g, received, acked })) if g == generation => {
                if got[client].is_none() {
                    got[client] = Some((received, acked));
                    count += 1;
                }
            }
            Ok(Some(Event::Acked { .. })) => {}
            Ok(Some(Event::Failed { client, why })) => bail!("client {client}: {why}"),
            Ok(None) => bail!("every client is gone"),
            Err(_) => break,
        }
    }
    Ok(got)
}

/// One edit and its acknowledgements.
#[derive(Debug)]
struct Round {
    /// Duration of the apply call, ms.
    apply_ms: f64,
    /// Per client, ms from the apply's return to the ack (negative: acked before the
    /// response arrived); clients that did not ack are left out (see `missing`).
    from_return_ms: Vec<f64>,
    /// The same from just before the apply was sent.
    from_send_ms: Vec<f64>,
    /// From the apply's return to the set's arrival at the client.
    received_ms: Vec<f64>,
    /// From the set's arrival to the ack's 204.
    ack_rtt_ms: Vec<f64>,
    missing: usize,
    /// TokenReviews the apiserver served around the round (the operator's, on acks).
    token_reviews: TokenReviews,
    /// CPU time used from just before the apply to the last ack.
    cpu: Cpu,
}

/// The processes whose CPU time is read per round.
#[derive(Debug, Default)]
struct Pids {
    operator: Option<u32>,
    apiserver: Option<u32>,
}

/// CPU time (user + system, ms; clock-tick resolution) of the operator, of this process
/// (the clients) and of kube-apiserver.
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    operator: f64,
    clients: f64,
    apiserver: f64,
}

impl Pids {
    /// Finds the processes by an argument only they have.
    fn find(operator_listen: &str, apiserver_port: &str) -> Self {
        let mut pids = Pids::default();
        let (op_arg, api_arg) = (format!("--listen={operator_listen}"), format!("--secure-port={apiserver_port}"));
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let exe = args.first().map(|a| String::from_utf8_lossy(a).into_owned()).unwrap_or_default();
            if exe.ends_with("toolgate-operator") && args.contains(&op_arg.as_bytes()) {
                pids.operator = Some(pid);
            } else if exe.ends_with("kube-apiserver") && args.contains(&api_arg.as_bytes()) {
                pids.apiserver = Some(pid);
            }
        }
        pids
    }

    fn cpu(&self) -> Cpu {
        let read = |pid: Option<String>| pid.map_or(f64::NAN, |p| process_cpu_ms(&p));
        Cpu {
            operator: read(self.operator.map(|p| p.to_string())),
            clients: read(Some("self".into())),
            apiserver: read(self.apiserver.map(|p| p.to_string())),
        }
    }
}

/// utime + stime of /proc/<pid>/stat in ms (assuming the usual 100 ticks per second).
fn process_cpu_ms(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return f64::NAN };
    let Some((_, rest)) = stat.rsplit_once(')') else { return f64::NAN };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    (ticks(11) + ticks(12)) * 10.0
}

impl Cpu {
    fn minus(&self, before: &Cpu) -> Cpu {
        Cpu {
            operator: self.operator - before.operator,
            clients: self.clients - before.clients,
            apiserver: self.apiserver - before.apiserver,
        }
    }
}

/// From the apiserver's own metrics: count and total duration of TokenReview requests,
/// and writes of McpPolicy status (each one is also a watch event the operator's pusher
/// reacts to).
#[derive(Clone, Copy, Debug, Default)]
struct TokenReviews {
    count: f64,
    seconds: f64,
    status_writes: f64,
}

impl TokenReviews {
    async fn scrape(client: &kube::Client) -> Self {
        let Ok(req) = Request::get("/metrics").body(Vec::new()) else { return Self::default() };
        let page = client.request_text(req).await.unwrap_or_default();
        let mut t = Self::default();
        let value = |line: &str| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        for line in page.lines() {
            if line.contains("resource=\"tokenreviews\"") {
                if line.starts_with("apiserver_request_duration_seconds_count{") {
                    t.count += value(line);
                } else if line.starts_with("apiserver_request_duration_seconds_sum{") {
                    t.seconds += value(line);
                }
            } else if line.starts_with("apiserver_request_total{")
                && line.contains("resource=\"mcppolicies\"")
                && line.contains("subresource=\"status\"")
                && ["APPLY", "PATCH", "UPDATE"].iter().any(|v| line.contains(&format!("verb=\"{v}\"")))
            {
                t.status_writes += value(line);
            }
        }
        t
    }

    fn minus(self, before: &Self) -> Self {
        Self {
            count: self.count - before.count,
            seconds: self.seconds - before.seconds,
            status_writes: self.status_writes - before.status_writes,
        }
    }

    fn mean_ms(&self) -> f64 {
        if self.count > 0.0 { self.seconds / self.count * 1000.0 } else { f64::NAN }
    }
}

fn signed_ms(later: Instant, earlier: Instant) -> f64 {
    match later.checked_duration_since(earlier) {
        Some(d) => d.as_secs_f64() * 1000.0,
        None => -(earlier.duration_since(later).as_secs_f64() * 1000.0),
    }
}

impl Round {
    fn last_from_return(&self) -> f64 {
        if self.missing > 0 { f64::INFINITY } else { max(&self.from_return_ms) }
    }

    fn last_from_send(&self) -> f64 {
        if self.missing > 0 { f64::INFINITY } else { max(&self.from_send_ms) }
    }

    fn summary(&self) -> String {
        format!(
            "apply {:.1} ms; last ack {:.1} ms after the apply returned ({:.1} ms after it was sent); per-client p50 {:.1} ms; first set arrived after {:.1} ms; {} TokenReviews (apiserver mean {} ms); {} status writes; CPU ms operator {:.0} / clients {:.0} / apiserver {:.0}{}",
            self.apply_ms,
            self.last_from_return(),
            self.last_from_send(),
            percentile(&self.from_return_ms, 50.0),
            min(&self.received_ms),
            self.token_reviews.count,
            ms(self.token_reviews.mean_ms()),
            self.token_reviews.status_writes,
            self.cpu.operator,
            self.cpu.clients,
            self.cpu.apiserver,
            if self.missing > 0 {
                format!("; {} clients did not acknowledge in time", self.missing)
            } else {
                String::new()
            },
        )
    }
}

async fn measure_round(
    client: &kube::Client,
    policies: &Api<DynamicObject>,
    events: &mut mpsc::UnboundedReceiver<Event>,
    n: usize,
    edit: u32,
    pids: &Pids,
    args: &Args,
) -> Result<(Round, i64)> {
    // Leftovers (heartbeat-time failures would show up here).
    while let Ok(e) = events.try_recv() {
        if let Event::Failed { client, why } = e {
            bail!("client {client}: {why}");
        }
    }
    let reviews_before = TokenReviews::scrape(client).await;
    let cpu_before = pids.cpu();
    let sent = Instant::now();
    let generation = apply_policy(policies, edit).await?;
    let returned = Instant::now();
    let acks = collect_acks(events, n, generation, Duration::from_secs(args.round_timeout)).await?;
    let cpu = pids.cpu().minus(&cpu_before);
    let done: Vec<(Instant, Instant)> = acks.iter().flatten().copied().collect();
    // What the acks set off (status writes) settles before the next edit, and is counted.
    tokio::time::sleep(Duration::from_millis(args.pause_ms)).await;
    let reviews = TokenReviews::scrape(client).await.minus(&reviews_before);
    let round = Round {
        token_reviews: reviews,
        cpu,
        apply_ms: signed_ms(returned, sent),
        from_return_ms: done.iter().map(|(_, a)| signed_ms(*a, returned)).collect(),
        from_send_ms: done.iter().map(|(_, a)| signed_ms(*a, sent)).collect(),
        received_ms: done.iter().map(|(r, _)| signed_ms(*r, returned)).collect(),
        ack_rtt_ms: done.iter().map(|(r, a)| signed_ms(*a, *r)).collect(),
        missing: n - done.len(),
    };
    Ok((round, generation))
}

// ---------------------------------------------------------------------------------------
// Webhook

struct WebhookResult {
    latencies_ms: Vec<f64>,
    operator: Buckets,
    injected: bool,
}

async fn webhook_bench(
    operator: &Operator,
    tls: &Arc<rustls::ClientConfig>,
    template: &Pod,
    namespace: &str,
    n: usize,
    started: Instant,
) -> Result<WebhookResult> {
    note(started, format!("webhook: {n} AdmissionReviews, one at a time, on one HTTPS/h2 connection"));
    // A pod as the apiserver sends it: defaulted by the apiserver (this is one it stored),
    // without what it only gets once stored, labelled for injection.
    let mut pod = serde_json::to_value(template)?;
    if let Some(meta) = pod.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in ["uid", "resourceVersion", "creationTimestamp", "managedFields", "generation"] {
            meta.remove(k);
        }
        meta.insert("labels".into(), json!({"app": "web", "toolgate.dev/inject": "enabled"}));
    }
    if let Some(obj) = pod.as_object_mut() {
        obj.remove("status");
    }
    // Without what injection added to the bench's pods (the webhook would admit it as is).
    if let Some(meta) = pod.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("annotations");
    }
    if let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) {
        spec.remove("initContainers");
        if let Some(volumes) = spec.get_mut("volumes").and_then(Value::as_array_mut) {
            volumes.retain(|v| !matches!(v["name"].as_str(), Some("toolgate-token" | "toolgate-state")));
        }
    }
    let review = |i: usize| -> Result<Bytes> {
        let mut object = pod.clone();
        object["metadata"]["name"] = json!(format!("web-{i}"));
        let body = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": format!("00000000-0000-0000-0000-{i:012}"),
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "name": format!("web-{i}"),
                "namespace": namespace,
                "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts", "system:authenticated"]},
                "object": object,
                "oldObject": null,
                "dryRun": false,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
            },
        });
        Ok(Bytes::from(serde_json::to_vec(&body)?))
    };
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", operator.port)).await?;
    tcp.set_nodelay(true)?;
    let server = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone()).connect(server, tcp).await?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let warmup = (n / 10).clamp(1, 100);
    let mut injected = true;
    let mut before = Buckets::default();
    let mut latencies = Vec::with_capacity(n);
    for i in 0..warmup + n {
        if i == warmup {
            before = operator.histogram("toolgate_operator_webhook_duration_seconds").await;
        }
        let body = review(i)?;
        let req = Request::post("/inject").header(CONTENT_TYPE, "application/json").body(Full::new(body))?;
        let t = Instant::now();
        sender.ready().await?;
        let res = sender.send_request(req).await?;
        let status = res.status();
        let answer = res.into_body().collect().await?.to_bytes();
        let elapsed = t.elapsed();
        if status != StatusCode::OK {
            bail!("/inject answered {status}: {}", String::from_utf8_lossy(&answer));
        }
        if i == 0 {
            let v: Value = serde_json::from_slice(&answer)?;
            injected = v["response"]["allowed"] == true && !v["response"]["patch"].is_null();
            if !injected {
                eprintln!("push-bench: warning: the first AdmissionReview was not answered with a patch: {v}");
            }
        }
        if i >= warmup {
            latencies.push(elapsed.as_secs_f64() * 1000.0);
        }
    }
    conn.abort();
    let operator = operator.histogram("toolgate_operator_webhook_duration_seconds").await.minus(&before);
    note(
        started,
        format!(
            "webhook: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            percentile(&latencies, 50.0),
            percentile(&latencies, 99.0),
            max(&latencies)
        ),
    );
    Ok(WebhookResult { latencies_ms: latencies, operator, injected })
}

// ---------------------------------------------------------------------------------------
// Report

struct Series {
    n: usize,
    /// The operator's TokenReview cache had expired (cold rounds).
    cold: bool,
    rounds: Vec<Round>,
    operator_push: Buckets,
}

impl Series {
    fn all(&self, f: impl Fn(&Round) -> &Vec<f64>) -> Vec<f64> {
        self.rounds.iter().flat_map(|r| f(r).iter().copied()).collect()
    }

    fn lasts_from_return(&self) -> Vec<f64> {
        self.rounds.iter().map(Round::last_from_return).collect()
    }

    fn lasts_from_send(&self) -> Vec<f64> {
        self.rounds.iter().map(Round::last_from_send).collect()
    }

    fn label(&self) -> String {
        if self.cold { format!("{} (cold)", self.n) } else { self.n.to_string() }
    }
}

struct Report {
    series: Vec<Series>,
    webhook: Option<WebhookResult>,
    load_before: String,
    load_after: String,
    operator_bin: PathBuf,
    parallel: usize,
}

/// Nearest-rank percentile (NaN for no values).
fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NAN, f64::max)
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NAN, f64::min)
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v.is_infinite() {
        "timeout".into()
    } else if v.abs() < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

fn bound(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v.is_infinite() => "> largest bucket".into(),
        Some(v) => format!("≤ {}", ms(v)),
    }
}

impl Report {
    fn table(&self) -> String {
        let mut out = String::new();
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        out.push_str(&format!(
            "\npush-bench: {} · {cpus} CPUs · load average {} before, {} after\n",
            self.operator_bin.display(),
            self.load_before,
            self.load_after
        ));
        if !self.series.is_empty() {
            out.push_str(
                "\nPolicy push: McpPolicy edit (server-side apply) → acknowledgement (204) of every client; ms\n\n",
            );
            out.push_str("| clients | rounds | apply call p50 | last ack after apply returned: p50 / max | last ack after apply sent: p50 / max | per-client ack after apply returned: p50 / p99 / max | set arrived after apply returned: first / p50 / p99 | ack round trip: p50 / p99 | operator send→ack p99 (bucket) | TokenReviews per round (apiserver mean ms) | status writes per round | CPU ms per round, apply → last ack: operator / clients / apiserver (p50) |\n");
            out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
            for s in &self.series {
                let per = s.all(|r| &r.from_return_ms);
                let recv = s.all(|r| &r.received_ms);
                let rtt = s.all(|r| &r.ack_rtt_ms);
                let apply: Vec<f64> = s.rounds.iter().map(|r| r.apply_ms).collect();
                let firsts: Vec<f64> = s.rounds.iter().map(|r| min(&r.received_ms)).collect();
                let reviews = s.rounds.iter().fold(TokenReviews::default(), |a, r| TokenReviews {
                    count: a.count + r.token_reviews.count,
                    seconds: a.seconds + r.token_reviews.seconds,
                    status_writes: a.status_writes + r.token_reviews.status_writes,
                });
                let (lr, ls) = (s.lasts_from_return(), s.lasts_from_send());
                out.push_str(&format!(
                    "| {} | {} | {} | {} / {} | {} / {} | {} / {} / {} | {} / {} / {} | {} / {} | {} | {:.0} ({}) | {:.1} | {:.0} / {:.0} / {:.0} |\n",
                    s.label(),
                    s.rounds.len(),
                    ms(percentile(&apply, 50.0)),
                    ms(percentile(&lr, 50.0)),
                    ms(max(&lr)),
                    ms(percentile(&ls, 50.0)),
                    ms(max(&ls)),
                    ms(percentile(&per, 50.0)),
                    ms(percentile(&per, 99.0)),
                    ms(max(&per)),
                    ms(percentile(&firsts, 50.0)),
                    ms(percentile(&recv, 50.0)),
                    ms(percentile(&recv, 99.0)),
                    ms(percentile(&rtt, 50.0)),
                    ms(percentile(&rtt, 99.0)),
                    bound(s.operator_push.quantile_bound_ms(0.99)),
                    reviews.count / s.rounds.len().max(1) as f64,
                    ms(reviews.mean_ms()),
                    reviews.status_writes / s.rounds.len().max(1) as f64,
                    percentile(&s.rounds.iter().map(|r| r.cpu.operator).collect::<Vec<_>>(), 50.0),
                    percentile(&s.rounds.iter().map(|r| r.cpu.clients).collect::<Vec<_>>(), 50.0),
                    percentile(&s.rounds.iter().map(|r| r.cpu.apiserver).collect::<Vec<_>>(), 50.0),
                ));
            }
        }
        if let Some(w) = &self.webhook {
            let l = &w.latencies_ms;
            out.push_str(&format!(
                "\nAdmission webhook: {} AdmissionReviews, sequential, one HTTPS/h2 connection; ms\n\n",
                l.len()
            ));
            out.push_str(
                "| client-side p50 | p90 | p99 | max | operator histogram: mean | p50 (bucket) | p99 (bucket) |\n",
            );
            out.push_str("|---|---|---|---|---|---|---|\n");
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                ms(percentile(l, 50.0)),
                ms(percentile(l, 90.0)),
                ms(percentile(l, 99.0)),
                ms(max(l)),
                w.operator.mean_ms().map_or("–".into(), ms),
                bound(w.operator.quantile_bound_ms(0.5)),
                bound(w.operator.quantile_bound_ms(0.99)),
            ));
            if !w.injected {
                out.push_str("(warning: the reviews were not answered with an injection patch)\n");
            }
        }
        out.push('\n');
        for line in self.verdicts() {
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    fn verdicts(&self) -> Vec<String> {
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        let mut lines = Vec::new();
        for s in &self.series {
            let lasts = s.lasts_from_return();
            let per = s.all(|r| &r.from_return_ms);
            let cache = if s.cold { ", TokenReview cache expired" } else { "" };
            match s.n {
                1 | 100 => {
                    let target = if s.n == 1 { 100.0 } else { 500.0 };
                    let within = lasts.iter().filter(|v| **v <= target).count();
                    lines.push(format!(
                        "target: {} client(s){cache}: last ack ≤ {target:.0} ms after the write: {} ({within}/{} rounds; p50 {} ms, max {} ms)",
                        s.n,
                        verdict(within == lasts.len()),
                        lasts.len(),
                        ms(percentile(&lasts, 50.0)),
                        ms(max(&lasts)),
                    ));
                }
                1000 => {
                    let p99 = percentile(&per, 99.0);
                    let missing: usize = s.rounds.iter().map(|r| r.missing).sum();
                    lines.push(format!(
                        "target: 1000 clients{cache}: p99 ack ≤ 1000 ms after the write: {} (p99 {} ms over {} acks{}; last ack p50 {} ms, max {} ms)",
                        verdict(p99 <= 1000.0 && missing == 0),
                        ms(p99),
                        per.len(),
                        if missing > 0 { format!(", {missing} missing") } else { String::new() },
                        ms(percentile(&lasts, 50.0)),
                        ms(max(&lasts)),
                    ));
                }
                _ => {}
            }
        }
        if let Some(w) = &self.webhook {
            let p99 = percentile(&w.latencies_ms, 99.0);
            lines.push(format!(
                "target: webhook admission p99 ≤ 10 ms: {} (client-side p99 {} ms; operator's histogram p99 {} ms)",
                verdict(p99 <= 10.0 && w.injected),
                ms(p99),
                bound(w.operator.quantile_bound_ms(0.99)),
            ));
        }
        lines
    }

    fn json(&self) -> Value {
        let series: Vec<Value> = self
            .series
            .iter()
            .map(|s| {
                let per = s.all(|r| &r.from_return_ms);
                json!({
                    "clients": s.n,
                    "token_cache": if s.cold { "cold" } else { "warm" },
                    "rounds": s.rounds.iter().map(|r| json!({
                        "apply_ms": r.apply_ms,
                        "last_ack_after_return_ms": finite(r.last_from_return()),
                        "last_ack_after_send_ms": finite(r.last_from_send()),
                        "per_client_p50_ms": finite(percentile(&r.from_return_ms, 50.0)),
                        "per_client_p99_ms": finite(percentile(&r.from_return_ms, 99.0)),
                        "first_set_arrived_ms": finite(min(&r.received_ms)),
                        "set_arrived_p50_ms": finite(percentile(&r.received_ms, 50.0)),
                        "set_arrived_p99_ms": finite(percentile(&r.received_ms, 99.0)),
                        "ack_rtt_p99_ms": finite(percentile(&r.ack_rtt_ms, 99.0)),
                        "token_reviews": r.token_reviews.count,
                        "token_review_apiserver_mean_ms": finite(r.token_reviews.mean_ms()),
                        "status_writes": r.token_reviews.status_writes,
                        "cpu_ms": {"operator": finite(r.cpu.operator), "clients": finite(r.cpu.clients), "apiserver": finite(r.cpu.apiserver)},
                        "ack_rtt_p50_ms": finite(percentile(&r.ack_rtt_ms, 50.0)),
                        "missing": r.missing,
                    })).collect::<Vec<_>>(),
                    "per_client_ms": {"p50": finite(percentile(&per, 50.0)), "p99": finite(percentile(&per, 99.0)), "max": finite(max(&per))},
                    "operator_push_latency": buckets_json(&s.operator_push),
                })
            })
            .collect();
        let webhook = self.webhook.as_ref().map(|w| {
            let l = &w.latencies_ms;
            json!({
                "requests": l.len(),
                "injected": w.injected,
                "client_ms": {"p50": finite(percentile(l, 50.0)), "p90": finite(percentile(l, 90.0)), "p99": finite(percentile(l, 99.0)), "max": finite(max(l))},
                "operator_histogram": buckets_json(&w.operator),
            })
        });
        json!({
            "operator_bin": self.operator_bin.display().to_string(),
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "load_average_before": self.load_before,
            "load_average_after": self.load_after,
            "setup_parallelism": self.parallel,
            "push": series,
            "webhook": webhook,
            "verdicts": self.verdicts(),
        })
    }
}

fn finite(v: f64) -> Value {
    if v.is_finite() { json!(v) } else { Value::Null }
}

fn buckets_json(b: &Buckets) -> Value {
    let le: BTreeMap<String, f64> = b.le.iter().map(|(le, c)| (format!("{le}"), *c)).collect();
    json!({"count": b.count, "sum_seconds": b.sum, "cumulative_by_le_seconds": le})
}
