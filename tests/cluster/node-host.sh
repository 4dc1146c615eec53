#!/usr/bin/env bash
# The host side of the test node (tests/src/node.rs): what a kubelet, containerd, kube-proxy
# and the CNI bridge plugin change on this machine, set up and taken down again.
#
#   node-host.sh cleanup   remove everything a test node leaves behind (also after a killed
#                          run): its processes and pods, mounts under its directories,
#                          iptables rules and chains (KUBE-*, CNI-*), the bridge, the cgroup
#                          directories, the directories; restores the saved sysctls
#   node-host.sh setup     cleanup, then save the sysctls, create the bridge and the cgroup
#                          parent, set ip_forward and bridge-nf-call-iptables
#   node-host.sh watch     what the harness runs: take the machine-wide lock, setup, print
#                          "ready", wait until standard input closes (the test is done, or
#                          its process died), cleanup, release the lock
#
# Needs root. One test node per machine at a time: the bridge, its addresses, the sysctls
# and iptables are shared by the whole machine (the lock serialises test processes).
set -uo pipefail

ROOT="${TOOLGATE_NODE_ROOT:-/var/lib/toolgate-node}"      # persistent dirs (kubelet, containerd)
RUN="${TOOLGATE_NODE_RUN:-/run/toolgate-node}"            # state dirs and sockets
LOCK="${TOOLGATE_NODE_LOCK:-/run/toolgate-node.lock}"
SAVED="${TOOLGATE_NODE_SYSCTLS:-/run/toolgate-node.sysctl}" # sysctl values before the node
CGROUP="${TOOLGATE_NODE_CGROUP:-toolgate-node}"           # the kubelet's --cgroup-root
BRIDGE="${TOOLGATE_NODE_BRIDGE:-tgnode0}"
BRIDGE_CIDR="${TOOLGATE_NODE_BRIDGE_CIDR:-10.244.0.1/24}"

# The directories are removed recursively: refuse anything but a path of two or more
# components (an empty or "/" value from the environment must not get that far).
for dir in "$ROOT" "$RUN"; do
  case "$dir" in
    /*/*) ;;
    *)
      echo "node-host: refusing directory ${dir@Q}: give an absolute path below a top-level directory" >&2
      exit 2
      ;;
  esac
done
case "$ROOT$RUN" in
  *..*)
    echo "node-host: refusing a directory with '..'" >&2
    exit 2
    ;;
esac

# What kubelet (setupKernelTunables), kube-proxy and this script change.
SYSCTLS=(
  net.ipv4.ip_forward
  net.bridge.bridge-nf-call-iptables
  net.bridge.bridge-nf-call-ip6tables
  net.ipv4.conf.all.route_localnet
  net.netfilter.nf_conntrack_max
  net.netfilter.nf_conntrack_tcp_timeout_established
  net.netfilter.nf_conntrack_tcp_timeout_close_wait
  vm.overcommit_memory
  vm.panic_on_oom
  kernel.panic
  kernel.panic_on_oops
  kernel.keys.root_maxkeys
  kernel.keys.root_maxbytes
)

say() { printf 'node-host: %s\n' "$*" >&2; }

sysctl_path() { printf '/proc/sys/%s' "${1//.//}"; }

# The pids of this script and its ancestors (the test process among them): never killed.
own_pids() {
  local pid=$$
  while [ -n "$pid" ] && [ "$pid" != 0 ]; do
    echo "$pid"
    pid="$(awk '/^PPid:/ {print $2}' "/proc/$pid/status" 2>/dev/null)"
  done
  echo "$BASHPID"
}

# The node's processes: everything in its cgroups (the pods' containers) and every process
# whose command line names its directories (kubelet, kube-proxy, containerd and its shims,
# controller-manager, scheduler, and their watchdog wrappers). The first character in
# brackets keeps grep from matching its own command line.
node_pids() {
  local keep
  keep="$(own_pids)"
  {
    find /sys/fs/cgroup/*/"$CGROUP" -name cgroup.procs -exec cat {} + 2>/dev/null
    grep -lsE -e "[${ROOT:0:1}]${ROOT:1}/" -e "[${RUN:0:1}]${RUN:1}/" /proc/[0-9]*/cmdline 2>/dev/null |
      sed -n 's#^/proc/\([0-9]*\)/cmdline$#\1#p'
  } | sort -un | grep -vxF -f <(printf '%s\n' $keep) || true
}

stop_processes() {
  local pids i
  pids="$(node_pids)"
  [ -z "$pids" ] && return 0
  say "stopping $(echo $pids | wc -w) node processes"
  kill -TERM $pids 2>/dev/null
  for i in $(seq 1 50); do
    pids="$(node_pids)"
    [ -z "$pids" ] && return 0
    sleep 0.2
  done
  kill -KILL $pids 2>/dev/null
  for i in $(seq 1 50); do
    pids="$(node_pids)"
    [ -z "$pids" ] && return 0
    sleep 0.2
  done
  say "warning: processes still running: $pids"
}

unmount_all() {
  local dir mounts m i
  for i in 1 2 3; do
    mounts="$(awk -v a="$ROOT" -v b="$RUN" '$5 == a || index($5, a "/") == 1 || $5 == b || index($5, b "/") == 1 {print $5}' /proc/self/mountinfo | sort -r)"
    [ -z "$mounts" ] && return 0
    for m in $mounts; do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
  done
  say "warning: mounts left: $(echo $mounts)"
}

clean_iptables() {
  local cmd table saved
  for cmd in iptables ip6tables; do
    command -v "$cmd-save" >/dev/null 2>&1 || continue
    for table in filter nat mangle; do
      saved="$("$cmd-save" -t "$table" 2>/dev/null)" || continue
      grep -qE 'KUBE-|CNI-' <<<"$saved" || continue
      # The table without the chains of kube-proxy, the kubelet and the CNI plugins and
      # without the rules that jump to them (restored in one transaction).
      grep -vE 'KUBE-|CNI-' <<<"$saved" | "$cmd-restore" -T "$table" ||
        say "warning: could not restore the $cmd $table table"
    done
  done
}

remove_cgroups() {
  local dir
  for dir in /sys/fs/cgroup/*/"$CGROUP"; do
    [ -d "$dir" ] || continue
    find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null ||
      find "$dir" -depth -type d -exec rmdir {} \; 2>/dev/null ||
      say "warning: could not remove $dir"
  done
}

restore_sysctls() {
  [ -f "$SAVED" ] || return 0
  local key value
  while read -r key value; do
    [ -n "$key" ] && [ -w "$(sysctl_path "$key")" ] &&
      { echo "$value" >"$(sysctl_path "$key")"; } 2>/dev/null
  done <"$SAVED"
  rm -f "$SAVED"
}

# What the node puts at fixed paths outside its directories (the kubelet's device-plugin
# socket, libcni's result cache, the log symlinks, containerd's shim socket directory, the
# controller-manager's flex-volume directory), and those directories when that leaves them
# empty.
remove_fixed_paths() {
  local file id
  for file in /var/lib/cni/results/toolgate-node-*; do
    [ -e "$file" ] || continue
    id="${file#/var/lib/cni/results/toolgate-node-}"
    id="${id%-*}"
    rm -f "$file" "/var/lib/cni/results/cni-loopback-$id-lo"
  done
  [ -d /var/log/containers ] && find /var/log/containers -maxdepth 1 -type l -lname "$ROOT/*" -delete
  rm -f /var/lib/kubelet/device-plugins/kubelet.sock
  rmdir -p --ignore-fail-on-non-empty /var/lib/cni/results /var/lib/kubelet/device-plugins /var/log/containers \
    /run/containerd/s /usr/libexec/kubernetes/kubelet-plugins/volume/exec 2>/dev/null
  true
}

cleanup() {
  stop_processes
  unmount_all
  remove_fixed_paths
  clean_iptables
  ip link show "$BRIDGE" >/dev/null 2>&1 && ip link delete "$BRIDGE"
  remove_cgroups
  restore_sysctls
  rm -rf --one-file-system "$ROOT" "$RUN" 2>/dev/null || say "warning: could not remove $ROOT or $RUN"
  true
}

setup() {
  cleanup
  [ "$(id -u)" = 0 ] || { say "needs root"; return 1; }
  mkdir -p "$ROOT" "$RUN" || return 1
  local key path
  for key in "${SYSCTLS[@]}"; do
    path="$(sysctl_path "$key")"
    [ -r "$path" ] && printf '%s %s\n' "$key" "$(tr '\t' ' ' <"$path")"
  done >"$SAVED.tmp" && mv "$SAVED.tmp" "$SAVED" || return 1
  echo 1 >/proc/sys/net/ipv4/ip_forward || return 1
  if [ ! -e /proc/sys/net/bridge/bridge-nf-call-iptables ]; then
    modprobe br_netfilter 2>/dev/null ||
      { say "no /proc/sys/net/bridge: the kernel lacks br_netfilter (Service routing between pods on the bridge needs it)"; return 1; }
  fi
  echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables || return 1
  ip link add "$BRIDGE" type bridge || return 1
  ip addr add "$BRIDGE_CIDR" dev "$BRIDGE" || return 1
  ip link set "$BRIDGE" up || return 1
  # The kubelet's --cgroup-root must exist in every hierarchy (cgroup v1); a new cpuset
  # needs cpus and mems before a task can join it.
  local hierarchy
  for hierarchy in /sys/fs/cgroup/*/; do
    [ -f "$hierarchy/cgroup.procs" ] || continue
    mkdir -p "$hierarchy$CGROUP" || return 1
    if [ -f "$hierarchy/cpuset.cpus" ]; then
      cat "$hierarchy/cpuset.cpus" >"$hierarchy$CGROUP/cpuset.cpus" &&
        cat "$hierarchy/cpuset.mems" >"$hierarchy$CGROUP/cpuset.mems" || return 1
    fi
  done
}

watch() {
  # Ctrl-C reaches the whole process group: the cleanup must still run (on end of input).
  trap '' INT TERM HUP
  exec 9>"$LOCK"
  if command -v flock >/dev/null 2>&1; then
    flock 9
  fi
  if ! setup; then
    echo "failed"
    cleanup
    exit 1
  fi
  echo "ready"
  cat >/dev/null
  say "the test is done: cleaning up"
  cleanup
  say "clean"
}

case "${1:-}" in
  cleanup) cleanup ;;
  setup) setup ;;
  watch) watch ;;
  *)
    echo "usage: $0 cleanup|setup|watch" >&2
    exit 2
    ;;
esac
