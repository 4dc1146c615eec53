# toolgate — the README names `make test` as the test command.
SHELL := /bin/bash
CARGO ?= cargo
# Pinned binaries for the real-cluster tests (kube-apiserver, etcd, kubectl, helm,
# prometheus) are built or installed once and cached here, outside the repository.
TESTBIN_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/toolgate-testbin
export TESTBIN_CACHE

.PHONY: all build test unit lint fmt clippy bench bench-proxy testbin node crds help

all: build

help:
	@echo "make build   - build every binary (release)"
	@echo "make test    - fmt check, clippy -D warnings, every test (unit + real-cluster + e2e)"
	@echo "make unit    - only the fast tests (no apiserver, no node)"
	@echo "make bench   - criterion benchmarks of the policy engine"

build:
	$(CARGO) build --release --workspace --bins

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

lint: fmt clippy

unit:
	$(CARGO) test --workspace --locked --lib --bins

test: lint testbin node
	source "$(TESTBIN_CACHE)/env.sh" && $(CARGO) test --workspace --locked

bench:
	$(CARGO) bench -p toolgate-policy --bench decide

bench-proxy:
	bash bench/run.sh

testbin:
	bash tests/cluster/testbin.sh

# Regenerates crds/ from the Rust types (policy/src/crd.rs); a test fails when it is stale.
crds:
	$(CARGO) run --quiet --locked -p toolgate-operator --bin crdgen -- crds

node:
	@if [ -f tests/node/package-lock.json ]; then cd tests/node && npm ci --no-audit --no-fund --loglevel=error; fi
