#!/usr/bin/env bash
# Obtain the pinned binaries that toolgate's real-cluster tests run as local processes
# (the envtest approach: no container engine, no kind/k3d, no kubelet):
#
#   kube-apiserver, kubectl  built from k8s.io/kubernetes via the Go module proxy
#   etcd                     built from go.etcd.io/etcd/server/v3 via the Go module proxy
#   helm                     built from helm.sh/helm/v3 via the Go module proxy
#   prometheus, promtool     Debian's `prometheus` package (.ci/run apt-installs it)
#
# With the argument `node` (`make testbin-node`) it also builds what the node tests
# (tests/tests/node.rs, `make test-node`) run besides Debian's containerd, runc and CNI plugins:
#
#   kubelet, kube-proxy,     built from k8s.io/kubernetes like kube-apiserver (kubelet is the
#   kube-controller-manager, biggest: ~14 min cold on a loaded 2-core machine)
#   kube-scheduler
#   coredns                  github.com/coredns/coredns with only the plugins a test cluster
#                            needs (kubernetes cache errors log health ready loadbalance)
#   pause                    a few lines of Go: the pod sandbox's process (sleeps, reaps)
#
# Everything is cached by version under $TESTBIN_CACHE/<name>-<version>/, so a second run
# only checks that the files are there (a second or two). The last step writes
# $TESTBIN_CACHE/env.sh, which exports TOOLGATE_KUBE_APISERVER, TOOLGATE_ETCD,
# TOOLGATE_KUBECTL, TOOLGATE_HELM, TOOLGATE_PROMETHEUS and TOOLGATE_PROMTOOL (absolute
# paths), and TOOLGATE_KUBELET, TOOLGATE_KUBE_PROXY, TOOLGATE_KUBE_CONTROLLER_MANAGER,
# TOOLGATE_KUBE_SCHEDULER, TOOLGATE_COREDNS and TOOLGATE_PAUSE once they are in the cache;
# `make test` sources it before `cargo test`.
#
# Builds are reproducible: pinned module versions (the go.sum is verified against the
# checksum database), CGO_ENABLED=0, -trimpath, no VCS stamping, fixed version ldflags.
set -euo pipefail

NODE=0
case "${1:-}" in
  "") ;;
  node) NODE=1 ;;
  *)
    echo "usage: $0 [node]" >&2
    exit 2
    ;;
esac

KUBE_VERSION=1.34.4     # kube-apiserver and kubectl (same minor as k8s-openapi's v1_34)
ETCD_VERSION=3.6.4      # the etcd release Kubernetes 1.34 ships with and depends on
HELM_VERSION=3.19.5     # built on the k8s.io 0.34 libraries, like the apiserver
COREDNS_VERSION=1.12.1  # the CoreDNS that Kubernetes 1.34 (kubeadm) deploys
PAUSE_VERSION=1         # tests/cluster/testbin.sh's own pause (bump when its source changes)
# A fixed build date keeps `--version` output and the binaries byte-for-byte reproducible.
BUILD_DATE=2026-01-01T00:00:00Z

TESTBIN_CACHE="${TESTBIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/toolgate-testbin}"
mkdir -p "$TESTBIN_CACHE"
TESTBIN_CACHE="$(cd "$TESTBIN_CACHE" && pwd -P)"

export GOTOOLCHAIN=local
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
# Go's own download location and build cache stay wherever the user keeps them.

T0=$SECONDS
log() { printf '[testbin %4ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }
die() {
  printf '[testbin] ERROR: %s\n' "$*" >&2
  exit 1
}

need_go() {
  command -v go >/dev/null 2>&1 ||
    die "the 'go' command is missing: install Go >= 1.24 (it builds kube-apiserver, kubectl, etcd and helm from the Go module proxy)"
  local v
  v="$(go env GOVERSION)"
  v="${v#go}"
  [ "$(printf '%s\n' 1.24 "${v%%[!0-9.]*}" | sort -V | head -n1)" = 1.24 ] ||
    die "Go $v is too old: Kubernetes $KUBE_VERSION needs Go >= 1.24"
}

# Run a go command that downloads from the module proxy, its chatter ("go: downloading ...")
# into a log; on failure show the log's end and say which registry it was.
go_fetch() {
  local what=$1 log
  shift
  log="$(mktemp "$RUN_DIR/go-XXXXXX.log")"
  if ! "$@" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    rm -f "$log"
    die "could not obtain $what from the Go module proxy ($(go env GOPROXY)); check access to it (GOPROXY, GONOSUMDB, GOFLAGS) and rerun 'make testbin'"
  fi
  rm -f "$log"
}

# ---------------------------------------------------------------- kube-apiserver, kubectl
# k8s.io/kubernetes is not meant to be imported: its go.mod replaces every staging module
# (k8s.io/api, k8s.io/apiserver, ...) with ./staging/src/k8s.io/<name>, which does not exist
# in the module download. A throwaway module requires k8s.io/kubernetes and points each of
# those replaces at the published staging module of the matching version (v0.34.x).
build_kube() {
  local want=() bin
  for bin in "$@"; do
    [ -x "$TESTBIN_CACHE/$bin-$KUBE_VERSION/$bin" ] || want+=("$bin")
  done
  [ ${#want[@]} -eq 0 ] && return 0
  need_go
  log "building ${want[*]} v$KUBE_VERSION from k8s.io/kubernetes (cold: ~10 min on 2 cores)"
  local started=$SECONDS
  local work
  work="$(mktemp -d "$RUN_DIR/kubernetes-XXXXXX")"
  local gomod info
  info="$(cd "$work" && go mod download -json "k8s.io/kubernetes@v$KUBE_VERSION" 2>&1)" || {
    printf '%s\n' "$info" >&2
    die "could not obtain k8s.io/kubernetes@v$KUBE_VERSION from the Go module proxy ($(go env GOPROXY))"
  }
  gomod="$(printf '%s\n' "$info" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
  [ -f "$gomod" ] || die "no go.mod for k8s.io/kubernetes@v$KUBE_VERSION in the module cache"
  local staging_version="v0.${KUBE_VERSION#1.}"
  {
    echo "module toolgate.local/testbin/kubernetes"
    echo
    echo "go $(sed -n 's/^go \([0-9.]*\)$/\1/p' "$gomod")"
    echo
    echo "require k8s.io/kubernetes v$KUBE_VERSION"
    echo
    echo "replace ("
    sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._/-]*\) => \./staging/src/k8s\.io/.*$#\t\1 => \1 '"$staging_version"'#p' "$gomod"
    echo ")"
  } >"$work/go.mod"
  grep -q "k8s.io/apiserver => k8s.io/apiserver $staging_version" "$work/go.mod" ||
    die "could not derive the staging replaces from k8s.io/kubernetes@v$KUBE_VERSION's go.mod"
  # A package of the main module that imports what the wanted commands import makes
  # `go mod tidy` resolve (and checksum) exactly their dependency graph.
  {
    printf 'package main\n\nimport (\n'
    for bin in "${want[@]}"; do
      case "$bin" in
        kubectl) printf '\t_ "k8s.io/kubectl/pkg/cmd"\n' ;;
        *) printf '\t_ "k8s.io/kubernetes/cmd/%s/app"\n' "$bin" ;;
      esac
    done
    printf ')\n\nfunc main() {}\n'
  } >"$work/main.go"
  # The version stamps that Kubernetes' own build (hack/lib/version.sh) sets.
  local x="" p minor
  minor="$(echo "$KUBE_VERSION" | cut -d. -f2)"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    x+=" -X $p.gitVersion=v$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
    x+=" -X $p.gitCommit=0000000000000000000000000000000000000000 -X $p.buildDate=$BUILD_DATE"
  done
  (
    cd "$work"
    go_fetch "the dependencies of k8s.io/kubernetes@v$KUBE_VERSION" go mod tidy
    for bin in "${want[@]}"; do
      local out="$TESTBIN_CACHE/$bin-$KUBE_VERSION" t0=$SECONDS
      mkdir -p "$work/out-$bin"
      go build -trimpath -ldflags="-s -w$x" -o "$work/out-$bin/$bin" "k8s.io/kubernetes/cmd/$bin" ||
        die "go build k8s.io/kubernetes/cmd/$bin failed (see above)"
      rm -rf "$out" && mv "$work/out-$bin" "$out"
      local version_args=(--version)
      [ "$bin" = kubectl ] && version_args=(version --client)
      log "  built $bin in $((SECONDS - t0))s: $("$out/$bin" "${version_args[@]}" 2>&1 | head -n1)"
    done
  )
  rm -rf "$work"
  log "built ${want[*]} in $((SECONDS - started))s"
}

# ---------------------------------------------------------------------------------- etcd
# Debian's etcd-server is 3.4.23: etcd 3.4 is out of support for Kubernetes 1.34 (which is
# built against and tested with etcd 3.6), and 3.4.23 predates the watch progress-notify
# fixes (3.4.31) that the apiserver's consistent reads from its cache rely on. So etcd is
# built from go.etcd.io/etcd/server/v3 with a two-line main (its own go.mod has local
# replaces, which rules out `go install ...@version`).
build_etcd() {
  local out="$TESTBIN_CACHE/etcd-$ETCD_VERSION"
  [ -x "$out/etcd" ] && return 0
  need_go
  log "building etcd v$ETCD_VERSION from go.etcd.io/etcd/server/v3 (cold: ~1 min)"
  local started=$SECONDS
  local work
  work="$(mktemp -d "$RUN_DIR/etcd-XXXXXX")"
  printf 'module toolgate.local/testbin/etcd\n\ngo 1.24\n\nrequire go.etcd.io/etcd/server/v3 v%s\n' "$ETCD_VERSION" >"$work/go.mod"
  printf 'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\nfunc main() { etcdmain.Main(os.Args) }\n' >"$work/main.go"
  (
    cd "$work"
    go_fetch "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" go mod tidy
    go build -trimpath -ldflags="-s -w" -o "$work/out/etcd" . || die "go build of etcd failed (see above)"
  )
  rm -rf "$out" && mv "$work/out" "$out"
  log "built etcd in $((SECONDS - started))s: $("$out/etcd" --version 2>&1 | head -n1)"
}

# ---------------------------------------------------------------------------------- helm
build_helm() {
  local out="$TESTBIN_CACHE/helm-$HELM_VERSION"
  [ -x "$out/helm" ] && return 0
  need_go
  log "building helm v$HELM_VERSION from helm.sh/helm/v3 (cold: ~3 min)"
  local started=$SECONDS work
  work="$(mktemp -d "$RUN_DIR/helm-XXXXXX")"
  # `go install pkg@version` builds with helm's own go.mod and go.sum, exactly pinned.
  go_fetch "helm.sh/helm/v3@v$HELM_VERSION" env GOBIN="$work/out" GOFLAGS=-buildvcs=false \
    go install -trimpath \
    -ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
    "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION"
  rm -rf "$out" && mv "$work/out" "$out"
  log "built helm in $((SECONDS - started))s: $("$out/helm" version --short 2>&1 | head -n1)"
}

# ------------------------------------------------------------------------------- coredns
# Cluster DNS for the node tests, with a plugin list of its own: a main that imports only
# the wanted plugin packages and sets their order (CoreDNS's plugin.cfg order), instead of
# the full build's ~60 plugins (cloud DNS providers, etcd, ...).
build_coredns() {
  local out="$TESTBIN_CACHE/coredns-$COREDNS_VERSION"
  [ -x "$out/coredns" ] && return 0
  need_go
  log "building coredns v$COREDNS_VERSION from github.com/coredns/coredns (cold: ~2 min)"
  local started=$SECONDS work
  work="$(mktemp -d "$RUN_DIR/coredns-XXXXXX")"
  printf 'module toolgate.local/testbin/coredns\n\ngo 1.24\n\nrequire github.com/coredns/coredns v%s\n' "$COREDNS_VERSION" >"$work/go.mod"
  cat >"$work/main.go" <<'GO'
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	dnsserver.Directives = []string{"ready", "health", "errors", "log", "loadbalance", "cache", "kubernetes"}
}

func main() { coremain.Run() }
GO
  (
    cd "$work"
    go_fetch "github.com/coredns/coredns@v$COREDNS_VERSION" go mod tidy
    go build -trimpath -ldflags="-s -w" -o "$work/out/coredns" . || die "go build of coredns failed (see above)"
  )
  rm -rf "$out" && mv "$work/out" "$out"
  log "built coredns in $((SECONDS - started))s: $("$out/coredns" -version 2>&1 | head -n1)"
}

# --------------------------------------------------------------------------------- pause
# The pod sandbox's process (what registry.k8s.io/pause does): holds the pod's namespaces,
# reaps children when it is the pod's PID 1, exits on SIGINT/SIGTERM. Static, so its image
# is this one file.
build_pause() {
  local out="$TESTBIN_CACHE/pause-$PAUSE_VERSION"
  [ -x "$out/pause" ] && return 0
  need_go
  local work
  work="$(mktemp -d "$RUN_DIR/pause-XXXXXX")"
  printf 'module toolgate.local/testbin/pause\n\ngo 1.24\n' >"$work/go.mod"
  cat >"$work/main.go" <<'GO'
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			if pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil); pid <= 0 || err != nil {
				break
			}
		}
	}
}
GO
  (cd "$work" && go build -trimpath -ldflags="-s -w" -o "$work/out/pause" .) || die "go build of pause failed (see above)"
  rm -rf "$out" && mv "$work/out" "$out"
  log "built pause"
}

# ---------------------------------------------------------------------------- prometheus
# From Debian (the ordinary way to get it here); linked into the cache by version so the
# env.sh paths name the version that the tests ran with.
link_prometheus() {
  local bin
  for bin in prometheus promtool; do
    command -v "$bin" >/dev/null 2>&1 ||
      die "'$bin' is missing: install Debian's package with 'apt-get install prometheus' (.ci/run does this), then rerun 'make testbin'"
  done
  local version
  version="$(prometheus --version 2>&1 | sed -n 's/^prometheus, version \([^ ]*\).*/\1/p')"
  [ -n "$version" ] || die "could not read the version of $(command -v prometheus)"
  local out="$TESTBIN_CACHE/prometheus-$version"
  mkdir -p "$out"
  for bin in prometheus promtool; do
    ln -sfn "$(readlink -f "$(command -v "$bin")")" "$out/$bin"
  done
  PROMETHEUS_DIR="$out"
}

# One run at a time per cache (a second one waits, then finds everything built). The node
# binaries have a lock of their own, so that a long cold kubelet build does not hold up a
# plain `make testbin` (which only waits for the short env.sh step).
take_lock() {
  command -v flock >/dev/null 2>&1 || return 0
  case "$1" in
    node) exec 8>"$TESTBIN_CACHE/.lock-node" && flock 8 ;;
    *) exec 9>"$TESTBIN_CACHE/.lock" && flock 9 ;;
  esac
}
# This run's scratch modules and logs, removed also after a failure. Leftovers of a killed
# run are removed once they are a day old (a concurrent run's are younger).
RUN_DIR="$(mktemp -d "$TESTBIN_CACHE/.build-XXXXXX")"
trap 'rm -rf "$RUN_DIR"' EXIT
find "$TESTBIN_CACHE" -maxdepth 1 \( -name '.build-*' -o -name '.go-*.log' \) -mmin +1440 -exec rm -rf {} + 2>/dev/null || true
log "cache: $TESTBIN_CACHE"
if [ "$NODE" = 1 ]; then
  take_lock node
  build_kube kubelet kube-proxy kube-controller-manager kube-scheduler
  build_coredns
  build_pause
fi
take_lock base
build_kube kube-apiserver kubectl
build_etcd
build_helm
link_prometheus

{
  cat <<EOF
# Generated by tests/cluster/testbin.sh; source it before running the real-cluster tests.
export TOOLGATE_KUBE_APISERVER='$TESTBIN_CACHE/kube-apiserver-$KUBE_VERSION/kube-apiserver'
export TOOLGATE_KUBECTL='$TESTBIN_CACHE/kubectl-$KUBE_VERSION/kubectl'
export TOOLGATE_ETCD='$TESTBIN_CACHE/etcd-$ETCD_VERSION/etcd'
export TOOLGATE_HELM='$TESTBIN_CACHE/helm-$HELM_VERSION/helm'
export TOOLGATE_PROMETHEUS='$PROMETHEUS_DIR/prometheus'
export TOOLGATE_PROMTOOL='$PROMETHEUS_DIR/promtool'
EOF
  # The node binaries, whichever `testbin.sh node` has put into the cache.
  for entry in "kubelet kubelet-$KUBE_VERSION KUBELET" "kube-proxy kube-proxy-$KUBE_VERSION KUBE_PROXY" \
    "kube-controller-manager kube-controller-manager-$KUBE_VERSION KUBE_CONTROLLER_MANAGER" \
    "kube-scheduler kube-scheduler-$KUBE_VERSION KUBE_SCHEDULER" \
    "coredns coredns-$COREDNS_VERSION COREDNS" "pause pause-$PAUSE_VERSION PAUSE"; do
    read -r bin dir var <<<"$entry"
    if [ -x "$TESTBIN_CACHE/$dir/$bin" ]; then
      echo "export TOOLGATE_$var='$TESTBIN_CACHE/$dir/$bin'"
    fi
  done
} >"$TESTBIN_CACHE/env.sh.tmp"
mv "$TESTBIN_CACHE/env.sh.tmp" "$TESTBIN_CACHE/env.sh"
log "ready; wrote $TESTBIN_CACHE/env.sh"
