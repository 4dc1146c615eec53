//! The shared test cluster: etcd + kube-apiserver as local processes (or an existing
//! cluster named by `TOOLGATE_TEST_KUBECONFIG`).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use futures::FutureExt as _;
use k8s_openapi::api::authentication::v1::{
    BoundObjectReference, TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec, TokenReviewStatus,
};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::{Discovery, Scope, verbs};

use crate::certs::{TestCa, to_pem};
use crate::process::{PROXY_ENV, Supervised, free_port, log_tail, remove_at_exit};
use crate::serve::http_get;
use crate::tools::{Tool, tool_path};

/// toolgate's generated CRDs (`make crds`), for [`TestCluster::install_toolgate_crds`].
const TOOLGATE_CRDS: [&str; 2] = [
    include_str!("../../crds/mcppolicies.toolgate.dev.yaml"),
    include_str!("../../crds/mcpapprovals.toolgate.dev.yaml"),
];

/// The audience of tokens meant for toolgate. Like a real cluster, the test apiserver does
/// not list it in `--api-audiences`: tokens get it only when asked for (a projected token's
/// `audience`, TokenRequest `audiences`), so a default API token is never a toolgate token.
pub const TOOLGATE_AUDIENCE: &str = "toolgate";
/// The service account issuer (and default API audience) of the local test apiserver.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The label set on every namespace made by [`TestCluster::with_temp_namespace`].
pub const TEST_NAMESPACE_LABEL: &str = "toolgate.dev/test-namespace";

/// How long the servers may take to get ready on a loaded 2-core machine.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(180);

/// A Kubernetes API for tests, shared by all tests of one test process.
///
/// Local mode (the default) runs etcd and kube-apiserver (see `make testbin`) on free
/// loopback ports, with a fresh CA, serving and client certificates, service-account
/// signing keys (TokenRequest/TokenReview work; the API audience is the issuer only, as in a
/// real cluster), RBAC (and Node) authorization and the default admission plugins including MutatingAdmissionWebhook
/// and ValidatingAdmissionWebhook. There is no kubelet, scheduler or controller-manager:
/// pods are API objects only, and the harness itself does the little the controllers would
/// otherwise do for test namespaces (the `default` service account, deleting contents).
///
/// With `TOOLGATE_TEST_KUBECONFIG=/path/to/kubeconfig` it uses that existing cluster
/// instead (its current context must be allowed to do everything).
pub struct TestCluster {
    config: kube::Config,
    kubeconfig_path: PathBuf,
    apiserver_url: String,
    ca_pem: String,
    test_ca: TestCa,
    work_dir: PathBuf,
    local: bool,
    /// The servers and the work-dir watchdog; never dropped (statics are not), so they
    /// stop when the test process exits (see `process`).
    _processes: Mutex<Vec<Supervised>>,
    _watchdogs: Mutex<Vec<std::process::Child>>,
}

impl std::fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCluster")
            .field("apiserver_url", &self.apiserver_url)
            .field("kubeconfig_path", &self.kubeconfig_path)
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl TestCluster {
    /// The cluster of this test process, started on first use (a few seconds; at most
    /// three minutes on a loaded machine). Panics with the reason, and with the servers'
    /// logs, if it cannot be started; every later call panics with the same message.
    ///
    /// Blocking: call it from a test before (or inside) the async part; it is fine inside
    /// `#[tokio::test]` since it starts its own thread.
    pub fn shared() -> &'static TestCluster {
        static CLUSTER: OnceLock<Result<TestCluster, String>> = OnceLock::new();
        let cluster = CLUSTER.get_or_init(|| {
            // Its own thread and runtime: the caller may be inside a (current-thread)
            // tokio runtime, where `block_on` would panic.
            std::thread::spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("building a tokio runtime: {e}"))?;
                runtime.block_on(TestCluster::start()).map_err(|e| format!("{e:#}"))
            })
            .join()
            .unwrap_or_else(|panic| {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "the start-up thread panicked".to_owned());
                Err(message)
            })
        });
        match cluster {
            Ok(cluster) => cluster,
            Err(message) => panic!("the test cluster could not be started: {message}"),
        }
    }

    async fn start() -> Result<TestCluster> {
        crate::install_crypto_provider();
        match std::env::var_os("TOOLGATE_TEST_KUBECONFIG").filter(|v| !v.is_empty()) {
            Some(path) => Self::existing(PathBuf::from(path)).await,
            None => Self::start_local(None).await,
        }
    }

    async fn existing(kubeconfig_path: PathBuf) -> Result<TestCluster> {
        let kubeconfig = Kubeconfig::read_from(&kubeconfig_path)
            .with_context(|| format!("reading {}", kubeconfig_path.display()))?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .with_context(|| format!("loading {}", kubeconfig_path.display()))?;
        let ca_pem = config.root_cert.iter().flatten().map(|der| to_pem("CERTIFICATE", der)).collect();
        let work_dir = temp_dir("toolgate-test-")?;
        let watchdog = remove_at_exit(&work_dir)?;
        let cluster = TestCluster {
            apiserver_url: config.cluster_url.to_string().trim_end_matches('/').to_owned(),
            config,
            kubeconfig_path,
            ca_pem,
            test_ca: TestCa::new("toolgate-test-ca")?,
            work_dir,
            local: false,
            _processes: Mutex::new(Vec::new()),
            _watchdogs: Mutex::new(vec![watchdog]),
        };
        let client = cluster.try_client()?;
        client.apiserver_version().await.context("the cluster in TOOLGATE_TEST_KUBECONFIG does not answer")?;
        Ok(cluster)
    }

    /// A cluster of its own for a test node (see [`crate::TestNode`]): the apiserver binds and
    /// advertises `node.address` (the `kubernetes` Service's endpoint, reachable from pods),
    /// and calls the kubelet with a client certificate. Stops when dropped.
    pub(crate) async fn start_for_node(node: &NodeApiserver) -> Result<TestCluster> {
        crate::install_crypto_provider();
        Self::start_local(Some(node)).await
    }

    async fn start_local(node: Option<&NodeApiserver>) -> Result<TestCluster> {
        let started = Instant::now();
        let apiserver_bin = tool_path(Tool::KubeApiserver);
        let etcd_bin = tool_path(Tool::Etcd);
        let dir = temp_dir("toolgate-cluster-")?;
        let mut processes = Vec::new();

        // etcd first: its wrapper removes the whole directory once etcd has stopped, after
        // the test process exits. (The apiserver writes nothing there.)
        let etcd_url = start_etcd(&etcd_bin, &dir, &mut processes).await?;

        // Certificates and keys.
        let ca = TestCa::new("toolgate-test-ca")?;
        let mut names = vec![
            "127.0.0.1",
            "localhost",
            "10.0.0.1",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ];
        if let Some(node) = node {
            names.push(&node.address);
        }
        let serving = ca.server_cert(&names)?;
        let admin = ca.client_cert("toolgate-admin", &["system:masters"])?;
        let sa_key = rcgen::KeyPair::generate().context("generating the SA signing key")?;
        let write = |name: &str, contents: &str| -> Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, contents).with_context(|| format!("writing {name}"))?;
            Ok(path)
        };
        let ca_file = write("ca.crt", ca.cert_pem())?;
        let serving_cert = write("apiserver.crt", &serving.cert_pem)?;
        let serving_key = write("apiserver.key", &serving.key_pem)?;
        let sa_key_file = write("sa.key", &sa_key.serialize_pem())?;
        // The verifying side wants the public key (PKIX); it does not read PKCS#8 keys.
        let sa_pub_file = write("sa.pub", &sa_key.public_key_pem())?;

        let mut last_error = None;
        let mut ready = None;
        let address = node.map_or("127.0.0.1", |n| n.address.as_str());
        let mut node_args = Vec::new();
        if node.is_some() {
            // The apiserver's client certificate towards the kubelet (logs, exec,
            // port-forward), which the kubelet accepts from this CA.
            let kubelet_client = ca.client_cert("kube-apiserver-kubelet-client", &["system:masters"])?;
            node_args.extend([
                format!(
                    "--kubelet-client-certificate={}",
                    write("kubelet-client.crt", &kubelet_client.cert_pem)?.display()
                ),
                format!("--kubelet-client-key={}", write("kubelet-client.key", &kubelet_client.key_pem)?.display()),
                "--kubelet-preferred-address-types=InternalIP,Hostname".to_owned(),
            ]);
        } else {
            // No kube-controller-manager: nothing would serve the endpoints of the
            // `kubernetes` Service at a loopback address anyway.
            node_args.push("--endpoint-reconciler-type=none".to_owned());
        }
        for _attempt in 0..3 {
            let port = free_port()?;
            let mut args = vec![
                format!("--etcd-servers={etcd_url}"),
                format!("--bind-address={address}"),
                format!("--advertise-address={address}"),
                format!("--secure-port={port}"),
                format!("--cert-dir={}", dir.join("apiserver-certs").display()),
                format!("--tls-cert-file={}", serving_cert.display()),
                format!("--tls-private-key-file={}", serving_key.display()),
                format!("--client-ca-file={}", ca_file.display()),
                "--authorization-mode=Node,RBAC".to_owned(),
                "--enable-admission-plugins=MutatingAdmissionWebhook,ValidatingAdmissionWebhook".to_owned(),
                format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
                format!("--service-account-key-file={}", sa_pub_file.display()),
                format!("--service-account-signing-key-file={}", sa_key_file.display()),
                format!("--api-audiences={SERVICE_ACCOUNT_ISSUER}"),
                "--service-cluster-ip-range=10.0.0.0/24".to_owned(),
                "--allow-privileged=true".to_owned(),
                "--profiling=false".to_owned(),
                "--v=0".to_owned(),
            ];
            args.extend(node_args.iter().cloned());
            // Without the proxy variables of the machine: the apiserver calls webhooks,
            // aggregated APIs and etcd directly, as in a cluster (a Service-based webhook
            // otherwise goes to the proxy, which cannot resolve `<svc>.<ns>.svc`).
            let mut apiserver = Supervised::spawn_without_env(
                "kube-apiserver",
                &apiserver_bin,
                &args,
                &dir.join(format!("kube-apiserver-{port}.log")),
                None,
                PROXY_ENV,
            )?;
            let url = format!("https://{address}:{port}");
            let kubeconfig = kubeconfig_yaml(&url, ca.cert_pem(), Credentials::Cert(&admin));
            let config = config_from_yaml(&kubeconfig).await?;
            match wait_apiserver_ready(&mut apiserver, &config).await {
                Ok(()) => {
                    processes.push(apiserver);
                    ready = Some((url, kubeconfig, config));
                    break;
                }
                Err(e) => {
                    apiserver.stop(Duration::from_secs(15));
                    last_error = Some(e);
                }
            }
        }
        let Some((apiserver_url, kubeconfig, config)) = ready else {
            return Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no apiserver")));
        };
        let kubeconfig_path = write("admin.kubeconfig", &kubeconfig)?;
        eprintln!(
            "toolgate-tests: kube-apiserver ready at {apiserver_url} after {:.1}s (kubeconfig {})",
            started.elapsed().as_secs_f64(),
            kubeconfig_path.display()
        );
        Ok(TestCluster {
            config,
            kubeconfig_path,
            apiserver_url,
            ca_pem: ca.cert_pem().to_owned(),
            test_ca: ca,
            work_dir: dir,
            local: true,
            _processes: Mutex::new(processes),
            _watchdogs: Mutex::new(Vec::new()),
        })
    }

    fn try_client(&self) -> Result<kube::Client> {
        kube::Client::try_from(self.config.clone()).context("building a kube client")
    }

    /// A new admin client (cluster-admin via the `system:masters` group in local mode).
    /// Must be called inside a tokio runtime; each test runtime needs its own client.
    pub fn client(&self) -> kube::Client {
        self.try_client().expect("building the admin kube client")
    }

    /// The admin client configuration.
    pub fn config(&self) -> kube::Config {
        self.config.clone()
    }

    /// The admin kubeconfig file (for kubectl, helm, or a process under test).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// The apiserver URL, e.g. `https://127.0.0.1:41234` (no trailing slash).
    pub fn apiserver_url(&self) -> &str {
        &self.apiserver_url
    }

    /// The PEM of the CA that signed the apiserver's serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A CA for certificates of servers that the apiserver calls (admission webhooks):
    /// put `test_ca().ca_bundle()` into `caBundle`. In local mode this is also the cluster
    /// CA (so it signs client certificates the apiserver accepts).
    pub fn test_ca(&self) -> &TestCa {
        &self.test_ca
    }

    /// Whether the cluster runs as local processes (false with `TOOLGATE_TEST_KUBECONFIG`).
    pub fn is_local(&self) -> bool {
        self.local
    }

    /// A scratch directory of this test process, removed when it exits.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// `kubectl --kubeconfig <admin kubeconfig> --cache-dir <in work_dir>`.
    pub fn kubectl(&self) -> tokio::process::Command {
        let mut cmd = crate::tools::command(Tool::Kubectl);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig_path)
            // Not ~/.kube/cache: every test apiserver has a new port.
            .arg("--cache-dir")
            .arg(self.work_dir.join("kubectl-cache"));
        cmd
    }

    /// `kubectl apply` of a YAML manifest (one or more documents; objects without a
    /// namespace go to `namespace` if given); returns kubectl's output.
    pub async fn kubectl_apply(&self, namespace: Option<&str>, manifest_yaml: &str) -> String {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let path = self.work_dir.join(format!("manifest-{}.yaml", COUNTER.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&path, manifest_yaml).expect("writing the manifest to the work directory");
        let mut cmd = self.kubectl();
        cmd.arg("apply").arg("-f").arg(&path);
        if let Some(ns) = namespace {
            cmd.arg("--namespace").arg(ns);
        }
        let out = crate::tools::run_ok(&mut cmd).await;
        let _ = std::fs::remove_file(&path);
        out
    }

    /// Applies toolgate's CRDs (`crds/`: McpPolicy, McpApproval) and waits until they are
    /// Established. Once per test process: concurrent first applies of the same CRD race
    /// (AlreadyExists), so every test calls this instead of applying them itself.
    pub async fn install_toolgate_crds(&self) {
        static INSTALLED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
        INSTALLED
            .get_or_init(|| async {
                for crd in TOOLGATE_CRDS {
                    self.kubectl_apply(None, crd).await;
                }
                crate::tools::run_ok(self.kubectl().args([
                    "wait",
                    "--for=condition=Established",
                    "--timeout=90s",
                    "crd/mcppolicies.toolgate.dev",
                    "crd/mcpapprovals.toolgate.dev",
                ]))
                .await;
            })
            .await;
    }

    /// `helm --kubeconfig <admin kubeconfig>`, with helm's cache, config and data
    /// directories inside [`Self::work_dir`].
    pub fn helm(&self) -> tokio::process::Command {
        let home = self.work_dir.join("helm");
        let mut cmd = crate::tools::command(Tool::Helm);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig_path)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        cmd
    }

    /// Runs `f` with a new namespace (named after the test, with a random suffix, labelled
    /// [`TEST_NAMESPACE_LABEL`], with a `default` service account) and deletes the namespace
    /// and everything in it afterwards, also when `f` panics (the panic then continues).
    pub async fn with_temp_namespace<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = T>,
    {
        let namespace = self.create_namespace().await;
        let result = AssertUnwindSafe(f(namespace.clone())).catch_unwind().await;
        self.delete_namespace(&namespace).await;
        match result {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Creates a test namespace (see [`Self::with_temp_namespace`]) and returns its name.
    pub async fn create_namespace(&self) -> String {
        let name = namespace_name();
        let client = self.client();
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(TEST_NAMESPACE_LABEL.to_owned(), "true".to_owned())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client)
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        // The controller-manager's job in a real cluster; pods need it (ServiceAccount
        // admission).
        self.ensure_service_account(&name, "default").await;
        name
    }

    /// Deletes a namespace and, in local mode (no namespace controller), its contents, then
    /// finalizes it so that it is really gone. Errors are reported on stderr only.
    pub async fn delete_namespace(&self, name: &str) {
        if let Err(e) = self.try_delete_namespace(name).await {
            eprintln!("toolgate-tests: cleaning up namespace {name}: {e:#}");
        }
    }

    async fn try_delete_namespace(&self, name: &str) -> Result<()> {
        let client = self.client();
        let namespaces = Api::<Namespace>::all(client.clone());
        if self.local {
            let discovery = Discovery::new(client.clone()).run_aggregated().await.context("discovery")?;
            for group in discovery.groups() {
                for (resource, caps) in group.recommended_resources() {
                    if caps.scope != Scope::Namespaced || !caps.supports_operation(verbs::DELETE_COLLECTION) {
                        continue;
                    }
                    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), name, &resource);
                    if let Err(e) = api.delete_collection(&DeleteParams::background(), &ListParams::default()).await {
                        eprintln!("toolgate-tests: deleting {} in {name}: {e}", resource.plural);
                    }
                }
            }
        }
        match namespaces.delete(name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            Err(e) => return Err(e).context("deleting the namespace"),
        }
        if self.local {
            // What the namespace controller does once the namespace is empty.
            let mut namespace = namespaces.get(name).await.context("reading the namespace")?;
            if let Some(spec) = namespace.spec.as_mut() {
                spec.finalizers = Some(Vec::new());
            }
            namespaces
                .replace_subresource("finalize", name, &PostParams::default(), &namespace)
                .await
                .context("finalizing the namespace")?;
        }
        Ok(())
    }

    /// Creates the service account unless it exists.
    pub async fn ensure_service_account(&self, namespace: &str, name: &str) {
        let sa = ServiceAccount {
            metadata: ObjectMeta { name: Some(name.to_owned()), ..Default::default() },
            ..Default::default()
        };
        match Api::<ServiceAccount>::namespaced(self.client(), namespace).create(&PostParams::default(), &sa).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => panic!("creating service account {namespace}/{name}: {e}"),
        }
    }

    /// Mints a token for a service account with the TokenRequest API, valid for an hour.
    /// Empty `audiences` means the apiserver's own. With `bound_pod = Some((name, uid))`
    /// the token is bound to that pod (it becomes invalid when the pod is deleted, and
    /// TokenReview reports the pod in `status.user.extra`).
    pub async fn mint_token(
        &self,
        namespace: &str,
        service_account: &str,
        audiences: &[&str],
        bound_pod: Option<(&str, &str)>,
    ) -> String {
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
                expiration_seconds: Some(3600),
                bound_object_ref: bound_pod.map(|(name, uid)| BoundObjectReference {
                    api_version: Some("v1".to_owned()),
                    kind: Some("Pod".to_owned()),
                    name: Some(name.to_owned()),
                    uid: Some(uid.to_owned()),
                }),
            },
            ..Default::default()
        };
        let response = Api::<ServiceAccount>::namespaced(self.client(), namespace)
            .create_token_request(service_account, &PostParams::default(), &request)
            .await
            .unwrap_or_else(|e| panic!("TokenRequest for service account {namespace}/{service_account}: {e}"));
        response
            .status
            .map(|s| s.token)
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| panic!("TokenRequest for {namespace}/{service_account}: no token"))
    }

    /// Reviews a token with the TokenReview API (as the admin) and returns the status.
    pub async fn review_token(&self, token: &str, audiences: &[&str]) -> TokenReviewStatus {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: (!audiences.is_empty()).then(|| audiences.iter().map(|a| (*a).to_owned()).collect()),
            },
            ..Default::default()
        };
        Api::<TokenReview>::all(self.client())
            .create(&PostParams::default(), &review)
            .await
            .expect("TokenReview")
            .status
            .expect("TokenReview without status")
    }

    /// A client authenticated as the service account `namespace/service_account` (created
    /// if missing), with a token from the TokenRequest API: it can do exactly what RBAC
    /// grants that service account.
    pub async fn client_as(&self, namespace: &str, service_account: &str) -> kube::Client {
        self.ensure_service_account(namespace, service_account).await;
        let token = self.mint_token(namespace, service_account, &[], None).await;
        self.client_with_token(&token).await
    }

    /// A client that authenticates with a bearer token.
    pub async fn client_with_token(&self, token: &str) -> kube::Client {
        let config = config_from_yaml(&self.kubeconfig_for_token(token)).await.expect("kube config for a token");
        kube::Client::try_from(config).expect("building a kube client")
    }

    /// A kubeconfig (YAML text) for this cluster that authenticates with a bearer token.
    pub fn kubeconfig_for_token(&self, token: &str) -> String {
        kubeconfig_yaml(&self.apiserver_url, &self.ca_pem, Credentials::Token(token))
    }
}

/// How [`TestCluster::start_for_node`] differs from the default local cluster.
#[derive(Debug, Clone)]
pub(crate) struct NodeApiserver {
    /// The address the apiserver binds and advertises (the node's bridge address).
    pub address: String,
}

pub(crate) enum Credentials<'a> {
    Cert(&'a crate::certs::CertPair),
    Token(&'a str),
}

pub(crate) fn kubeconfig_yaml(server: &str, ca_pem: &str, credentials: Credentials<'_>) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let user = match credentials {
        Credentials::Cert(pair) => format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            b64(&pair.cert_pem),
            b64(&pair.key_pem)
        ),
        Credentials::Token(token) => format!("    token: {token}\n"),
    };
    let ca =
        if ca_pem.is_empty() { String::new() } else { format!("    certificate-authority-data: {}\n", b64(ca_pem)) };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: toolgate-test\n  cluster:\n    server: {server}\n{ca}users:\n- name: toolgate-test\n  user:\n{user}contexts:\n- name: toolgate-test\n  context:\n    cluster: toolgate-test\n    user: toolgate-test\ncurrent-context: toolgate-test\n"
    )
}

async fn config_from_yaml(yaml: &str) -> Result<kube::Config> {
    let kubeconfig = Kubeconfig::from_yaml(yaml).context("parsing a generated kubeconfig")?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("loading a generated kubeconfig")
}

fn temp_dir(prefix: &str) -> Result<PathBuf> {
    Ok(tempfile::Builder::new().prefix(prefix).tempdir().context("creating a temporary directory")?.keep())
}

async fn start_etcd(binary: &Path, dir: &Path, processes: &mut Vec<Supervised>) -> Result<String> {
    let mut last_error = None;
    for attempt in 0..3 {
        // etcd's wrapper removes `dir` (everything of this cluster) once the test process
        // exits and etcd has stopped.
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let args = vec![
            "--name=toolgate-test".to_owned(),
            format!("--data-dir={}", dir.join(format!("etcd-{attempt}")).display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=toolgate-test={peer_url}"),
            // A throwaway store: durability is not needed, speed on a busy disk is.
            "--unsafe-no-fsync=true".to_owned(),
            "--log-level=warn".to_owned(),
        ];
        let log = dir.join(format!("etcd-{attempt}.log"));
        let mut etcd = Supervised::spawn_without_env("etcd", binary, &args, &log, Some(dir), PROXY_ENV)?;
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let result = loop {
            if let Err(e) = etcd.check_running() {
                break Err(e);
            }
            if let Ok((status, body)) = http_get(&format!("{client_url}/health")).await
                && status.is_success()
                && body.contains("true")
            {
                break Ok(());
            }
            if Instant::now() > deadline {
                break Err(anyhow::anyhow!(
                    "etcd was not healthy within {STARTUP_TIMEOUT:?}; its log:\n{}",
                    log_tail(&log, 40)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        match result {
            Ok(()) => {
                processes.push(etcd);
                return Ok(client_url);
            }
            Err(e) => {
                etcd.stop(Duration::from_secs(15));
                last_error = Some(e);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| anyhow::anyhow!("etcd did not start")))
}

async fn wait_apiserver_ready(apiserver: &mut Supervised, config: &kube::Config) -> Result<()> {
    let client = kube::Client::try_from(config.clone()).context("building a kube client")?;
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let mut last: String;
    loop {
        apiserver.check_running()?;
        let request = hyper::Request::get("/readyz").body(Vec::new()).context("building the /readyz request")?;
        match client.request_text(request).await {
            Ok(body) if body.trim() == "ok" => return Ok(()),
            Ok(body) => last = body,
            Err(e) => last = e.to_string(),
        }
        if Instant::now() > deadline {
            bail!(
                "kube-apiserver was not ready within {STARTUP_TIMEOUT:?} (last: {last}); its log:\n{}",
                log_tail(apiserver.log_path(), 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `<test name>-<random>`, a valid namespace name (the test name comes from libtest's
/// thread name; it keeps leftovers and logs readable).
fn namespace_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("test");
    let test = test.rsplit("::").next().unwrap_or(test);
    let mut base: String =
        test.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    base.truncate(40);
    let base = base.trim_matches('-');
    let base = if base.is_empty() || base == "main" || base.starts_with("tokio-runtime") { "test" } else { base };
    let seed = {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u32(std::process::id());
        h.finish()
    };
    format!("{base}-{:06x}", seed & 0xff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names_are_valid_and_unique() {
        let a = namespace_name();
        let b = namespace_name();
        assert_ne!(a, b);
        for name in [a, b] {
            assert!(name.len() <= 63, "{name}");
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'), "{name}");
            assert!(name.starts_with("namespace-names-are-valid-and-unique-"), "{name}");
        }
    }

    #[test]
    fn kubeconfigs_parse() {
        let ca = TestCa::new("ca").expect("ca");
        let admin = ca.client_cert("admin", &["system:masters"]).expect("cert");
        for yaml in [
            kubeconfig_yaml("https://127.0.0.1:1", ca.cert_pem(), Credentials::Cert(&admin)),
            kubeconfig_yaml("https://127.0.0.1:1", ca.cert_pem(), Credentials::Token("t")),
        ] {
            let kc = Kubeconfig::from_yaml(&yaml).expect("parses");
            assert_eq!(kc.current_context.as_deref(), Some("toolgate-test"));
        }
    }
}
