# toolgate — the README names `make test` as the test command.
SHELL := /bin/bash
CARGO ?= cargo
# Pinned binaries for the real-cluster tests (kube-apiserver, etcd, kubectl, helm,
# prometheus) are built or installed once and cached here, outside the repository.
TESTBIN_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/toolgate-testbin
export TESTBIN_CACHE

.PHONY: all build test unit lint fmt clippy bench bench-proxy testbin testbin-node test-node node crds help

all: build

help:
	@echo "make build   - build every binary (release)"
	@echo "make test    - fmt check, clippy -D warnings, every test (unit + real-cluster + e2e)"
	@echo "make unit    - only the fast tests (no apiserver, no node)"
	@echo "make test-node - the tests on a real kubelet + containerd node (root; part of make test when possible)"
	@echo "make bench   - criterion benchmarks of the policy engine"
	@echo "make bench-proxy - the proxy against direct, a byte relay, a peer and the Redis store (bench/run.sh)"
	@echo "make bench-count - instructions and syscalls per proxied call (callgrind, strace)"

build:
	$(CARGO) build --release --workspace --bins

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

lint: fmt clippy

unit:
	$(CARGO) test --workspace --locked --lib --bins

# The node tests run when tests/cluster/node-check.sh says this machine can (Linux, root,
# Debian's containerd, runc, CNI plugins, iptables, conntrack, and Go or the cached node
# binaries); TOOLGATE_NODE_TESTS=1 (.ci/run) makes them mandatory, =0 skips them.
TOOLGATE_NODE_TESTS ?=
test: lint testbin node
	source "$(TESTBIN_CACHE)/env.sh" && $(CARGO) test --workspace --locked
	@if [ "$(TOOLGATE_NODE_TESTS)" = 0 ]; then \
	  echo "make test: node tests skipped (TOOLGATE_NODE_TESTS=0)" >&2; \
	elif [ "$(TOOLGATE_NODE_TESTS)" = 1 ] || reason="$$(bash tests/cluster/node-check.sh)"; then \
	  $(MAKE) --no-print-directory test-node; \
	else \
	  echo "make test: node tests skipped: $$reason (see docs/testing.md; make test-node runs them)" >&2; \
	fi

# Tests on a real node (tests/tests/node.rs; ignored in a plain `cargo test`): kubelet,
# containerd, kube-proxy, CoreDNS on this machine, one node per machine at a time.
# The images the node runs are made from the release binaries (as the Dockerfile's build
# stage makes them), so those are built first.
test-node: testbin-node node
	$(CARGO) build --release --locked -p toolgate-operator -p toolgate-proxy -p toolgate --bins
	source "$(TESTBIN_CACHE)/env.sh" && $(CARGO) test -p toolgate-tests --locked --test node --test node_identity -- --ignored --test-threads=1

bench:
	$(CARGO) bench -p toolgate-policy --bench decide

bench-proxy:
	bash bench/run.sh

# User-space instructions (callgrind) and system calls (strace -c -f) per proxied
# tools/call, over BENCH_COUNT_CALLS calls minus a BENCH_COUNT_BASE-call run; the byte
# relay counted alike (bench/count.sh, docs/benchmarks.md). Needs valgrind and strace.
.PHONY: bench-count
bench-count:
	bash bench/count.sh

# Policy push (McpPolicy edit -> acks of 1, 100, 1000 sidecar clients) and admission-webhook
# latency of a release toolgate-operator against the test apiserver (bench/src/bin/push-bench.rs,
# docs/benchmarks.md). BENCH_PUSH_ARGS passes options, e.g. "--clients 1,100 --rounds 3".
.PHONY: bench-push
bench-push: testbin
	$(CARGO) build --release --locked -p toolgate-operator --bin toolgate-operator
	$(CARGO) build --release --locked -p toolgate-bench --bin push-bench
	ulimit -n "$$(ulimit -Hn)" 2>/dev/null || ulimit -n 8192 2>/dev/null || true; \
	source "$(TESTBIN_CACHE)/env.sh" && $(CARGO) run --release --locked --quiet -p toolgate-bench --bin push-bench -- $(BENCH_PUSH_ARGS)

testbin:
	bash tests/cluster/testbin.sh

# testbin plus kubelet, kube-proxy, kube-controller-manager, kube-scheduler, CoreDNS, pause.
testbin-node:
	bash tests/cluster/testbin.sh node

# Regenerates crds/ from the Rust types (policy/src/crd.rs); a test fails when it is stale.
crds:
	$(CARGO) run --quiet --locked -p toolgate-operator --bin crdgen -- crds
	cp crds/*.yaml charts/toolgate/crds/

node:
	@if [ -f tests/node/package-lock.json ]; then cd tests/node && npm ci --no-audit --no-fund --loglevel=error; fi

# Container images of toolgate-operator and toolgate-proxy (Dockerfile; the build stage runs
# the same cargo command as `build`). Needs docker (with a reachable daemon), podman or
# buildah; CONTAINER_ENGINE=... picks one. Tags: $(IMAGE_REGISTRY)/toolgate-operator:$(IMAGE_TAG)
# and .../toolgate-proxy:$(IMAGE_TAG), the chart's defaults.
IMAGE_REGISTRY ?= ghcr.io/toolgate
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
RUST_VERSION ?= $(shell sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)
CONTAINER_ENGINE ?= $(firstword $(foreach e,docker podman buildah,$(if $(shell command -v $(e) 2>/dev/null),$(e))))

.PHONY: images chart-lint
images:
	@if [ -z "$(CONTAINER_ENGINE)" ]; then \
	  echo "make images: no container engine found: install docker, podman or buildah (or set CONTAINER_ENGINE)" >&2; exit 1; fi
	@if [ "$(CONTAINER_ENGINE)" = docker ] && ! docker info >/dev/null 2>&1; then \
	  echo "make images: docker is installed but its daemon is not reachable (docker info failed): start it, or use CONTAINER_ENGINE=podman" >&2; exit 1; fi
	set -e; for target in toolgate-operator toolgate-proxy; do \
	  $(if $(filter buildah,$(CONTAINER_ENGINE)),buildah build,$(CONTAINER_ENGINE) build) \
	    --build-arg RUST_VERSION=$(RUST_VERSION) --target $$target \
	    -t $(IMAGE_REGISTRY)/$$target:$(IMAGE_TAG) -f Dockerfile . ; \
	done

# helm lint --strict of the chart (helm from `make testbin`, else from PATH).
chart-lint:
	@helm="$$( . "$(TESTBIN_CACHE)/env.sh" 2>/dev/null; echo "$${TOOLGATE_HELM:-helm}")"; \
	"$$helm" lint --strict charts/toolgate && \
	"$$helm" lint --strict charts/toolgate --set certManager.enabled=true,metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true,metrics.prometheusRule.enabled=true,networkPolicy.enabled=true,networkPolicy.namespaces[0]=agents,dashboard.enabled=true
