//! A real node for tests: its own kube-apiserver and etcd (a [`TestCluster`] bound to the
//! node's bridge address), kube-controller-manager, kube-scheduler, containerd (Debian's,
//! with its own config, root and state directories), kubelet, kube-proxy (iptables mode)
//! and CoreDNS, all as local processes; pods run from OCI image archives that the tests
//! write ([`crate::oci`]) and load with `ctr images import` (`imagePullPolicy: Never`).
//!
//! One node per machine at a time: the bridge, its address range, sysctls and iptables
//! are the machine's. `tests/cluster/node-host.sh watch` holds a lock for the node's whole
//! life, removes what an earlier (killed) run left, sets the host up, and tears everything
//! down when the test drops the [`TestNode`] or its process dies (its standard input is a
//! pipe from the test process, as for [`Supervised`] servers).
//!
//! Needs root, Linux, `make testbin-node` and Debian's containerd, runc,
//! containernetworking-plugins, iptables and conntrack (docs/testing.md).

use std::io::{BufRead as _, BufReader};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};

use crate::cluster::{Credentials, NodeApiserver, kubeconfig_yaml};
use crate::oci::{ImageEntry, OciImage};
use crate::process::{PROXY_ENV, Supervised, log_tail, remove_at_exit};
use crate::tools::{Tool, tool_path};
use crate::{TestCluster, eventually};

/// The node's name.
pub const NODE_NAME: &str = "toolgate-node";
/// The node's address: the CNI bridge's, where the apiserver and the kubelet listen.
pub const NODE_IP: &str = "10.244.0.1";
/// The pods' addresses (the bridge's subnet).
pub const POD_SUBNET: &str = "10.244.0.0/24";
/// The ClusterIP of the `kube-dns` Service (CoreDNS), in the apiserver's 10.0.0.0/24.
pub const CLUSTER_DNS: &str = "10.0.0.10";
/// The pod sandbox image (tests/cluster/testbin.sh's pause).
pub const PAUSE_IMAGE: &str = "toolgate.local/pause:1";
/// The CoreDNS image.
pub const COREDNS_IMAGE: &str = "toolgate.local/coredns:1";

const ROOT: &str = "/var/lib/toolgate-node";
const RUN: &str = "/run/toolgate-node";
const BRIDGE: &str = "tgnode0";
const CGROUP_ROOT: &str = "/toolgate-node";
const HOST_SCRIPT: &str = include_str!("../cluster/node-host.sh");
/// Generous: a loaded 2-core machine.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(240);

/// A running test node (see the module docs). Dereferences to its [`TestCluster`].
/// Dropping it stops every process and removes everything from the host (blocking, a few
/// seconds).
pub struct TestNode {
    cluster: Option<TestCluster>,
    processes: Vec<Supervised>,
    host: Option<Child>,
    log_dir: PathBuf,
    _log_watchdog: Child,
}

impl std::fmt::Debug for TestNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNode")
            .field("cluster", &self.cluster)
            .field("log_dir", &self.log_dir)
            .finish_non_exhaustive()
    }
}

impl Deref for TestNode {
    type Target = TestCluster;
    fn deref(&self) -> &TestCluster {
        self.cluster.as_ref().expect("the node's cluster runs until the node is dropped")
    }
}

impl TestNode {
    /// Starts the node (waits for the machine-wide lock first), with the node Ready and
    /// CoreDNS serving. Panics with the reason and the components' logs if it cannot.
    pub async fn start() -> TestNode {
        match Self::try_start().await {
            Ok(node) => node,
            Err(e) => panic!("the test node could not be started: {e:#}"),
        }
    }

    async fn try_start() -> Result<TestNode> {
        crate::install_crypto_provider();
        let started = Instant::now();
        let uid = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| l.strip_prefix("Uid:").map(|v| v.split_whitespace().next().map(str::to_owned)))
            })
            .flatten();
        if uid.as_deref() != Some("0") {
            bail!("the node tests need root (kubelet, containerd, iptables, a bridge); run them as root");
        }
        let binaries = NodeBinaries::find()?;
        let log_dir = tempfile::Builder::new().prefix("toolgate-node-logs-").tempdir().context("log directory")?.keep();
        let log_watchdog = remove_at_exit(&log_dir)?;

        // The host: lock, leftovers of an earlier run, sysctls, bridge, cgroup parent.
        let host_log = log_dir.join("node-host.log");
        let mut host = Command::new("bash")
            .arg("-c")
            .arg(HOST_SCRIPT)
            .arg("node-host")
            .arg("watch")
            .env("TOOLGATE_NODE_ROOT", ROOT)
            .env("TOOLGATE_NODE_RUN", RUN)
            .env("TOOLGATE_NODE_BRIDGE", BRIDGE)
            .env("TOOLGATE_NODE_BRIDGE_CIDR", format!("{NODE_IP}/24"))
            .env("TOOLGATE_NODE_CGROUP", CGROUP_ROOT.trim_start_matches('/'))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&host_log).context("node-host log")?)
            .spawn()
            .context("starting tests/cluster/node-host.sh (bash)")?;
        let stdout = host.stdout.take().context("node-host stdout")?;
        let waited = Instant::now();
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        })
        .await
        .context("waiting for node-host")?
        .context("reading node-host's output")?;
        if line.trim() != "ready" {
            let _ = host.wait();
            bail!("setting up the host failed; node-host.sh said:\n{}", log_tail(&host_log, 30));
        }
        eprintln!(
            "toolgate-tests: node host ready after {:.1}s (waited for the machine's node lock)",
            waited.elapsed().as_secs_f64()
        );
        let mut node =
            TestNode { cluster: None, processes: Vec::new(), host: Some(host), log_dir, _log_watchdog: log_watchdog };
        // From here on, dropping `node` (also on an error) tears the host down again.
        if let Err(e) = node.start_components(&binaries).await {
            return Err(e.context(format!("the node's logs ({}):\n{}", node.log_dir.display(), node.logs_tail(25))));
        }
        eprintln!("toolgate-tests: node Ready, CoreDNS serving, after {:.1}s", started.elapsed().as_secs_f64());
        Ok(node)
    }

    async fn start_components(&mut self, bin: &NodeBinaries) -> Result<()> {
        let cluster = TestCluster::start_for_node(&NodeApiserver { address: NODE_IP.to_owned() }).await?;
        let ca = cluster.test_ca();
        let server = cluster.apiserver_url().to_owned();
        let root = Path::new(ROOT);
        let write = |name: &str, contents: &str| -> Result<PathBuf> {
            let path = root.join(name);
            std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        let kubeconfig = |name: &str, user: &str, groups: &[&str]| -> Result<PathBuf> {
            let pair = ca.client_cert(user, groups)?;
            write(&format!("{name}.kubeconfig"), &kubeconfig_yaml(&server, ca.cert_pem(), Credentials::Cert(&pair)))
        };
        let ca_file = write("ca.crt", ca.cert_pem())?;
        let kubelet_kubeconfig = kubeconfig("kubelet", &format!("system:node:{NODE_NAME}"), &["system:nodes"])?;
        let proxy_kubeconfig = kubeconfig("kube-proxy", "system:kube-proxy", &[])?;
        // The controller-manager runs every controller under its own identity here
        // (--use-service-account-credentials=false), so it needs more than its role.
        let cm_kubeconfig =
            kubeconfig("kube-controller-manager", "system:kube-controller-manager", &["system:masters"])?;
        let scheduler_kubeconfig = kubeconfig("kube-scheduler", "system:kube-scheduler", &[])?;
        let sa_key = root.join("sa.key");
        std::fs::copy(cluster.work_dir().join("sa.key"), &sa_key).context("copying the service-account key")?;
        self.cluster = Some(cluster);

        // containerd: its own directories, socket, CNI configuration and sandbox image.
        for dir in ["cni/net.d", "containerd", "kubelet", "pod-logs", "volume-plugins", "images"] {
            std::fs::create_dir_all(root.join(dir)).with_context(|| format!("creating {ROOT}/{dir}"))?;
        }
        write("cni/net.d/10-toolgate-node.conflist", &cni_config())?;
        let containerd_config = write("containerd.toml", &containerd_config())?;
        let log_dir = self.log_dir.clone();
        let log = |name: &str| log_dir.join(format!("{name}.log"));
        let containerd = Supervised::spawn_without_env(
            "containerd",
            &bin.containerd,
            &[format!("--config={}", containerd_config.display())],
            &log("containerd"),
            None,
            PROXY_ENV,
        )?;
        self.processes.push(containerd);
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            self.check_running()?;
            let out = ctr().arg("version").output().context("running ctr")?;
            if out.status.success() {
                break;
            }
            if Instant::now() > deadline {
                bail!("containerd did not answer within {STARTUP_TIMEOUT:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut pause = OciImage::new(PAUSE_IMAGE);
        pause.add_file_from("/pause", &bin.pause, 0o755)?;
        pause.entrypoint = vec!["/pause".into()];
        pause.user = "65535:65535".into();
        self.import_image(&pause)?;
        let mut coredns = OciImage::new(COREDNS_IMAGE);
        coredns.add_file_from("/coredns", &bin.coredns, 0o755)?;
        coredns.add("/etc/coredns", ImageEntry::Dir { mode: 0o755 })?;
        coredns.entrypoint = vec!["/coredns".into()];
        coredns.exposed_ports = vec!["53/tcp".into(), "53/udp".into()];
        self.import_image(&coredns)?;

        // Control plane besides the apiserver.
        let cm_args = vec![
            format!("--kubeconfig={}", cm_kubeconfig.display()),
            format!("--authentication-kubeconfig={}", cm_kubeconfig.display()),
            format!("--authorization-kubeconfig={}", cm_kubeconfig.display()),
            "--leader-elect=false".to_owned(),
            "--bind-address=127.0.0.1".to_owned(),
            "--secure-port=0".to_owned(),
            "--use-service-account-credentials=false".to_owned(),
            format!("--root-ca-file={}", ca_file.display()),
            format!("--service-account-private-key-file={}", sa_key.display()),
            format!("--cluster-cidr={POD_SUBNET}"),
            "--service-cluster-ip-range=10.0.0.0/24".to_owned(),
            "--cluster-name=toolgate-test".to_owned(),
            format!("--flex-volume-plugin-dir={ROOT}/volume-plugins"),
            "--profiling=false".to_owned(),
        ];
        let cm = Supervised::spawn_without_env(
            "kube-controller-manager",
            &bin.controller_manager,
            &cm_args,
            &log("kube-controller-manager"),
            None,
            PROXY_ENV,
        )?;
        self.processes.push(cm);
        let scheduler_args = vec![
            format!("--kubeconfig={}", scheduler_kubeconfig.display()),
            format!("--authentication-kubeconfig={}", scheduler_kubeconfig.display()),
            format!("--authorization-kubeconfig={}", scheduler_kubeconfig.display()),
            "--leader-elect=false".to_owned(),
            "--bind-address=127.0.0.1".to_owned(),
            "--secure-port=0".to_owned(),
            "--profiling=false".to_owned(),
        ];
        let scheduler = Supervised::spawn_without_env(
            "kube-scheduler",
            &bin.scheduler,
            &scheduler_args,
            &log("kube-scheduler"),
            None,
            PROXY_ENV,
        )?;
        self.processes.push(scheduler);

        // The node.
        let kubelet_config = write("kubelet.yaml", &kubelet_config(&ca_file))?;
        let kubelet_args = vec![
            format!("--config={}", kubelet_config.display()),
            format!("--kubeconfig={}", kubelet_kubeconfig.display()),
            format!("--root-dir={ROOT}/kubelet"),
            format!("--cert-dir={ROOT}/kubelet/pki"),
            format!("--node-ip={NODE_IP}"),
            format!("--hostname-override={NODE_NAME}"),
            "--v=1".to_owned(),
        ];
        let kubelet =
            Supervised::spawn_without_env("kubelet", &bin.kubelet, &kubelet_args, &log("kubelet"), None, PROXY_ENV)?;
        self.processes.push(kubelet);
        let proxy_config = write("kube-proxy.yaml", &kube_proxy_config(&proxy_kubeconfig))?;
        let proxy = Supervised::spawn_without_env(
            "kube-proxy",
            &bin.kube_proxy,
            &[format!("--config={}", proxy_config.display())],
            &log("kube-proxy"),
            None,
            PROXY_ENV,
        )?;
        self.processes.push(proxy);

        // Node Ready (kubelet registered, runtime and network ready, not-ready taint gone).
        let client = self.client();
        let nodes: Api<Node> = Api::all(client.clone());
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            self.check_running()?;
            if let Ok(node) = nodes.get(NODE_NAME).await {
                let ready = node
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                let tainted = node.spec.as_ref().and_then(|s| s.taints.as_ref()).is_some_and(|t| !t.is_empty());
                if ready && !tainted {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("node {NODE_NAME} was not Ready (and untainted) within {STARTUP_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }

        // Cluster DNS.
        self.kubectl_apply(None, &coredns_manifest()).await;
        let pods: Api<Pod> = Api::namespaced(client, "kube-system");
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            self.check_running()?;
            let list =
                pods.list(&ListParams::default().labels("k8s-app=kube-dns")).await.context("listing CoreDNS pods")?;
            if list.items.iter().any(pod_is_ready) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "CoreDNS was not Ready within {STARTUP_TIMEOUT:?}; its pods: {:?}",
                    list.items.iter().map(|p| &p.status).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(())
    }

    /// Fails with the end of its log if a node process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        for process in &mut self.processes {
            process.check_running()?;
        }
        Ok(())
    }

    /// Writes `image` as an OCI archive and loads it into the node's containerd (the CRI
    /// namespace `k8s.io`), where pods find it with `imagePullPolicy: Never`.
    pub fn import_image(&self, image: &OciImage) -> Result<String> {
        let file = image.name.replace(['/', ':'], "_");
        let archive = Path::new(ROOT).join("images").join(format!("{file}.tar"));
        let digest = image.write_archive(&archive)?;
        let out = ctr().args(["images", "import"]).arg(&archive).output().context("running ctr images import")?;
        if !out.status.success() {
            bail!(
                "ctr images import {} failed: {}{}",
                archive.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = std::fs::remove_file(&archive);
        Ok(digest)
    }

    /// The directory of the node processes' logs (removed when the test process exits).
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// The last `lines` lines of every node log, for a failure message.
    pub fn logs_tail(&self, lines: usize) -> String {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.log_dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        names.sort();
        names.iter().map(|p| format!("--- {}\n{}\n", p.display(), log_tail(p, lines))).collect()
    }

    /// Waits until a pod matching `selector` in `namespace` is Ready; returns it.
    pub async fn wait_pod_ready(&self, namespace: &str, selector: &str, timeout: Duration) -> Pod {
        let pods: Api<Pod> = Api::namespaced(self.client(), namespace);
        eventually(&format!("a Ready pod {selector} in {namespace}"), timeout, || {
            let pods = pods.clone();
            async move {
                let list = pods.list(&ListParams::default().labels(selector)).await.ok()?;
                list.items.into_iter().find(pod_is_ready)
            }
        })
        .await
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        // Closing the pipes: the wrappers stop the node processes, node-host.sh stops what
        // is left (pods, shims), unmounts, removes iptables chains, bridge, cgroups and
        // directories, restores the sysctls and releases the lock. Wait for it, so that
        // the next node (of this or another test process) finds a clean machine.
        self.processes.clear();
        if let Some(mut host) = self.host.take() {
            drop(host.stdin.take());
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                match host.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        eprintln!(
                            "toolgate-tests: the node's cleanup did not finish within 120 s; see {}",
                            self.log_dir.join("node-host.log").display()
                        );
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        }
        // The apiserver and etcd stop last.
        self.cluster.take();
    }
}

/// `ctr` for the node's containerd, in the CRI's namespace.
pub fn ctr() -> Command {
    let mut cmd = Command::new("ctr");
    cmd.arg(format!("--address={RUN}/containerd/containerd.sock")).args(["--namespace", "k8s.io"]);
    cmd
}

/// Whether the pod's Ready condition is True.
pub fn pod_is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

struct NodeBinaries {
    kubelet: PathBuf,
    kube_proxy: PathBuf,
    controller_manager: PathBuf,
    scheduler: PathBuf,
    coredns: PathBuf,
    pause: PathBuf,
    containerd: PathBuf,
}

impl NodeBinaries {
    fn find() -> Result<Self> {
        for (program, package) in [
            ("containerd", "containerd"),
            ("ctr", "containerd"),
            ("runc", "runc"),
            ("iptables", "iptables"),
            ("conntrack", "conntrack"),
            ("ip", "iproute2"),
        ] {
            if which(program).is_none() {
                bail!(
                    "`{program}` is missing: install Debian's {package} package (.ci/run does: containerd runc containernetworking-plugins iptables conntrack)"
                );
            }
        }
        for plugin in ["bridge", "host-local", "portmap", "loopback"] {
            if !Path::new("/usr/lib/cni").join(plugin).is_file() {
                bail!("/usr/lib/cni/{plugin} is missing: install Debian's containernetworking-plugins package");
            }
        }
        Ok(Self {
            kubelet: tool_path(Tool::Kubelet),
            kube_proxy: tool_path(Tool::KubeProxy),
            controller_manager: tool_path(Tool::KubeControllerManager),
            scheduler: tool_path(Tool::KubeScheduler),
            coredns: tool_path(Tool::Coredns),
            pause: tool_path(Tool::Pause),
            containerd: which("containerd").context("containerd")?,
        })
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

fn cni_config() -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "toolgate-node",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET, "gateway": NODE_IP}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": format!("{ROOT}/cni/ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ],
    })
    .to_string()
}

fn containerd_config() -> String {
    format!(
        r#"version = 2
root = "{ROOT}/containerd"
state = "{RUN}/containerd"

[grpc]
  address = "{RUN}/containerd/containerd.sock"

[ttrpc]
  address = "{RUN}/containerd/containerd.sock.ttrpc"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{ROOT}/containerd-opt"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{PAUSE_IMAGE}"
    # The kubelet asks for oom_score_adj -998 for sandboxes; without CAP_SYS_RESOURCE
    # (a container or VM sandbox) runc then fails every pod. Clamp to ours instead.
    restrict_oom_score_adj = true
    # Network namespaces under the state directory, so that teardown finds them.
    netns_mounts_under_state_dir = true
    disable_apparmor = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
          Root = "{RUN}/runc"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "{ROOT}/cni/net.d"
"#
    )
}

fn kubelet_config(ca_file: &Path) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {NODE_IP}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: false
  x509:
    clientCAFile: {ca}
authorization:
  mode: AlwaysAllow
containerRuntimeEndpoint: unix://{RUN}/containerd/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: {CGROUP_ROOT}
clusterDNS:
- {CLUSTER_DNS}
clusterDomain: cluster.local
failSwapOn: false
oomScoreAdj: 0
podLogsDir: {ROOT}/pod-logs
volumePluginDir: {ROOT}/volume-plugins
staticPodPath: ""
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 1Mi
  nodefs.available: 1%
  imagefs.available: 1%
  nodefs.inodesFree: 1%
maxPods: 60
rotateCertificates: false
serverTLSBootstrap: false
shutdownGracePeriod: 0s
shutdownGracePeriodCriticalPods: 0s
"#,
        ca = ca_file.display()
    )
}

fn kube_proxy_config(kubeconfig: &Path) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {NODE_NAME}
mode: iptables
clusterCIDR: {POD_SUBNET}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
oomScoreAdj: 0
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
iptables:
  localhostNodePorts: false
nodePortAddresses:
- {NODE_IP}/32
"#,
        kubeconfig = kubeconfig.display()
    )
}

fn coredns_manifest() -> String {
    format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata:
  name: coredns
  namespace: kube-system
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: system:coredns
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: system:coredns
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: system:coredns
subjects:
- kind: ServiceAccount
  name: coredns
  namespace: kube-system
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: coredns
  namespace: kube-system
data:
  Corefile: |
    .:53 {{
        errors
        health {{
            lameduck 1s
        }}
        ready
        kubernetes cluster.local in-addr.arpa ip6.arpa {{
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
        }}
        cache 30
        loadbalance
    }}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: coredns
  namespace: kube-system
  labels:
    k8s-app: kube-dns
spec:
  replicas: 1
  selector:
    matchLabels:
      k8s-app: kube-dns
  template:
    metadata:
      labels:
        k8s-app: kube-dns
    spec:
      serviceAccountName: coredns
      priorityClassName: system-cluster-critical
      dnsPolicy: Default
      containers:
      - name: coredns
        image: {COREDNS_IMAGE}
        imagePullPolicy: Never
        args: [-conf, /etc/coredns/Corefile]
        ports:
        - {{name: dns, containerPort: 53, protocol: UDP}}
        - {{name: dns-tcp, containerPort: 53, protocol: TCP}}
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities:
            drop: [ALL]
            add: [NET_BIND_SERVICE]
        livenessProbe:
          httpGet: {{path: /health, port: 8080}}
          periodSeconds: 10
          failureThreshold: 6
        readinessProbe:
          httpGet: {{path: /ready, port: 8181}}
          periodSeconds: 2
        volumeMounts:
        - {{name: config, mountPath: /etc/coredns, readOnly: true}}
      volumes:
      - name: config
        configMap:
          name: coredns
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels:
    k8s-app: kube-dns
spec:
  clusterIP: {CLUSTER_DNS}
  selector:
    k8s-app: kube-dns
  ports:
  - {{name: dns, port: 53, protocol: UDP}}
  - {{name: dns-tcp, port: 53, protocol: TCP}}
"#
    )
}

/// `target/release` of this build (the test runs from `target/debug/deps`): the binaries
/// `make build` and the Dockerfile's build stage produce. `TOOLGATE_NODE_IMAGE_BINARIES`
/// names another directory (e.g. `target/debug`, for a quicker edit-test loop).
pub fn release_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TOOLGATE_NODE_IMAGE_BINARIES").filter(|d| !d.is_empty()) {
        return dir.into();
    }
    let exe = std::env::current_exe().expect("test executable");
    exe.ancestors().nth(3).expect("target directory").join("release")
}

/// The sidecar container's status in a pod (a native sidecar: an init container).
pub fn sidecar_status(pod: &Pod) -> Option<k8s_openapi::api::core::v1::ContainerStatus> {
    pod.status.as_ref()?.init_container_statuses.as_ref()?.iter().find(|s| s.name == "toolgate-proxy").cloned()
}
