#!/usr/bin/env bash
# Can this machine run the node tests (`make test-node`)? Exit 0 if so; otherwise print the
# first missing prerequisite and exit 1. `make test` runs the node tests only when this
# passes (or when TOOLGATE_NODE_TESTS=1, as .ci/run sets it, makes them mandatory).
set -uo pipefail
[ "$(uname -s)" = Linux ] || { echo "not Linux"; exit 1; }
[ "$(id -u)" = 0 ] || { echo "not root (kubelet, containerd, iptables and a bridge need root)"; exit 1; }
for program in containerd ctr runc iptables iptables-save iptables-restore conntrack ip; do
  command -v "$program" >/dev/null 2>&1 ||
    { echo "'$program' is missing (apt-get install containerd runc containernetworking-plugins iptables conntrack iproute2)"; exit 1; }
done
for plugin in bridge host-local portmap loopback; do
  [ -x "/usr/lib/cni/$plugin" ] ||
    { echo "/usr/lib/cni/$plugin is missing (apt-get install containernetworking-plugins)"; exit 1; }
done
[ -d /sys/fs/cgroup ] || { echo "no /sys/fs/cgroup"; exit 1; }
env_sh="${TESTBIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/toolgate-testbin}/env.sh"
if ! grep -q TOOLGATE_KUBELET "$env_sh" 2>/dev/null; then
  command -v go >/dev/null 2>&1 || { echo "no Go to build kubelet and co. (make testbin-node)"; exit 1; }
fi
exit 0
