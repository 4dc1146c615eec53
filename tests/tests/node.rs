//! Tests on a real node (kubelet + containerd + kube-proxy + CoreDNS; `TestNode`). They need
//! root and the node binaries, so they are ignored in a plain `cargo test`: `make test-node`
//! runs them (and `make test` does when this machine can, see docs/testing.md).

use std::net::UdpSocket;
use std::time::Duration;

use toolgate_tests::node::{CLUSTER_DNS, NODE_IP};
use toolgate_tests::{TestNode, eventually, run_ok};

/// An A query for `name` (recursion desired), id 0x7467.
fn dns_query(name: &str) -> Vec<u8> {
    let mut q = vec![0x74, 0x67, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        q.push(u8::try_from(label.len()).expect("short label"));
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The IPv4 addresses in the answer section of a response to [`dns_query`].
fn dns_answers(query: &[u8], response: &[u8]) -> Option<Vec<[u8; 4]>> {
    if response.len() < query.len() || response[..2] != query[..2] || response[3] & 0x0f != 0 {
        return None;
    }
    let answers = u16::from_be_bytes([response[6], response[7]]);
    // The question is echoed: the answers start after it; each is a name (labels, or a
    // pointer), type, class (4), TTL (4), length (2), data.
    let mut at = query.len();
    let mut out = Vec::new();
    for _ in 0..answers {
        loop {
            let len = *response.get(at)?;
            if len == 0 {
                at += 1;
                break;
            }
            if len & 0xc0 == 0xc0 {
                at += 2;
                break;
            }
            at += 1 + usize::from(len);
        }
        let kind = u16::from_be_bytes([*response.get(at)?, *response.get(at + 1)?]);
        let len = usize::from(u16::from_be_bytes([*response.get(at + 8)?, *response.get(at + 9)?]));
        let data = response.get(at + 10..at + 10 + len)?;
        if kind == 1 && len == 4 {
            out.push([data[0], data[1], data[2], data[3]]);
        }
        at += 10 + len;
    }
    Some(out)
}

fn resolve(server: &str, name: &str) -> Option<Vec<[u8; 4]>> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let query = dns_query(name);
    socket.send_to(&query, server).ok()?;
    let mut buf = [0u8; 1500];
    let n = socket.recv(&mut buf).ok()?;
    dns_answers(&query, &buf[..n])
}

/// The node turns Ready, runs CoreDNS from an image the harness wrote (pause sandbox
/// included), and the `kube-dns` Service routes to it through kube-proxy's rules; CoreDNS
/// itself reaches the apiserver through the `kubernetes` Service (10.0.0.1 → the node's
/// address), and the apiserver reaches the kubelet (logs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a node: make test-node"]
async fn node_runs_pods_from_local_images_and_routes_services() {
    let sysctls = ["kernel/panic", "kernel/panic_on_oops", "vm/overcommit_memory", "net/ipv4/ip_forward"];
    let read = |key: &str| std::fs::read_to_string(format!("/proc/sys/{key}")).unwrap_or_default();
    let before: Vec<String> = sysctls.iter().map(|k| read(k)).collect();
    // Fixed paths the kubelet, containerd's shims and libcni use outside the node's own
    // directories: as they were before.
    let fixed =
        ["/var/lib/kubelet", "/var/lib/cni", "/run/containerd", "/var/log/containers", "/usr/libexec/kubernetes"];
    let existed: Vec<bool> = fixed.iter().map(|p| std::path::Path::new(p).exists()).collect();
    let node = TestNode::start().await;

    let server = format!("{CLUSTER_DNS}:53");
    let answers = eventually("CoreDNS answering through the kube-dns Service", Duration::from_secs(120), || {
        let server = server.clone();
        async move {
            tokio::task::spawn_blocking(move || resolve(&server, "kubernetes.default.svc.cluster.local"))
                .await
                .ok()
                .flatten()
                .filter(|a| !a.is_empty())
        }
    })
    .await;
    assert_eq!(answers, vec![[10, 0, 0, 1]], "kubernetes.default's ClusterIP");
    let dns = format!("{CLUSTER_DNS}:53");
    let missing =
        tokio::task::spawn_blocking(move || resolve(&dns, "nope.default.svc.cluster.local")).await.expect("join");
    assert_eq!(missing, None, "an unknown Service name gets NXDOMAIN, not an address");

    // The kubelet answers the apiserver (logs through the node address).
    let pod = node.wait_pod_ready("kube-system", "k8s-app=kube-dns", Duration::from_secs(60)).await;
    let name = pod.metadata.name.clone().expect("pod name");
    let logs = run_ok(node.kubectl().args(["logs", "-n", "kube-system", &name])).await;
    assert!(logs.contains("CoreDNS-"), "CoreDNS's start banner in its logs:\n{logs}");
    let status = pod.status.expect("pod status");
    let ip = status.pod_ip.expect("pod IP");
    assert!(ip.starts_with("10.244.0.") && ip != NODE_IP, "pod IP {ip} from the bridge's range");
    assert_eq!(status.host_ip.as_deref(), Some(NODE_IP));
    drop(node);

    // Teardown left nothing behind.
    assert!(!std::path::Path::new("/sys/class/net/tgnode0").exists(), "the bridge is gone");
    assert!(!std::path::Path::new("/var/lib/toolgate-node").exists(), "the node's directories are gone");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!mounts.contains("toolgate-node"), "no mounts left:\n{mounts}");
    let nat = std::process::Command::new("iptables-save").args(["-t", "nat"]).output().expect("iptables-save");
    let nat = String::from_utf8_lossy(&nat.stdout);
    assert!(!nat.contains("KUBE-") && !nat.contains("CNI-"), "no iptables chains left:\n{nat}");
    assert!(!std::path::Path::new("/sys/fs/cgroup/memory/toolgate-node").exists(), "no cgroups left");
    let after: Vec<String> = sysctls.iter().map(|k| read(k)).collect();
    assert_eq!(before, after, "the sysctls {sysctls:?} are restored");
    let exist: Vec<bool> = fixed.iter().map(|p| std::path::Path::new(p).exists()).collect();
    assert_eq!(existed, exist, "{fixed:?} exist as before");
}
