# Sluice: the few commands people need. `make help` lists them.
SHELL := /bin/bash
CARGO ?= cargo
E2E := target/debug/sluice-e2e
export SLUICE_REPO := $(CURDIR)

.PHONY: help build test unit lint fmt crds cluster-up cluster-down demo bench bench-agent bench-placement bench-lossless bench-gpu fuzz

help: ## List the commands
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | column -t -s $$'\t'

build: ## Build every binary (debug)
	$(CARGO) build --workspace --bins

test: ## The whole suite: unit tests, then e2e against a real local control plane
	./e2e/test.sh

unit: ## Unit tests only (no cluster)
	$(CARGO) test --workspace --lib --bins

lint: ## cargo fmt --check and clippy -D warnings
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all

crds: ## Regenerate crds/ (and the chart's copy) from the Rust types
	$(CARGO) run -q -p sluice-operator --bin sluice-operator -- crds > crds/sluice.dev.yaml
	cp crds/sluice.dev.yaml charts/sluice/crds/sluice.dev.yaml

cluster-up: ## Start the local test ground (idempotent); kubeconfig in target/e2e/kubeconfig
	$(CARGO) build -q -p sluice-e2e --bins
	$(E2E) cluster up

cluster-down: ## Stop everything cluster-up started and remove its state
	@if [ -x $(E2E) ]; then $(E2E) cluster down; else echo "nothing to stop (no $(E2E))"; fi

demo: ## Bring the test ground up, install Sluice and show it working
	./e2e/demo.sh

bench: bench-agent bench-placement bench-lossless bench-gpu ## All benchmarks; JSON under target/bench/

bench-agent: ## Agent overhead: direct vs sluice-agent vs HAProxy
	./agent/bench/run.sh

bench-placement: ## GPU placement policies on the Alibaba trace and synthetic fleets
	./placement/bench/run.sh

bench-lossless: ## Rolling-release baselines (and Sluice) under load on the test ground
	./e2e/bench-lossless.sh

bench-gpu: ## Gang binding throughput (Sluice vs kube-scheduler) and InferenceSet rollouts
	./e2e/bench-gpu.sh

FUZZ_SECONDS ?= 60
FUZZ_TARGETS := agent_headers agent_procfs agent_duration operator_duration agent_metrics gang_request gpu_topology
fuzz: ## Fuzz every untrusted-input parser with libFuzzer (nightly, cargo-fuzz), FUZZ_SECONDS each
	@command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz
	for t in $(FUZZ_TARGETS); do mkdir -p target/fuzz/corpus/$$t && \
		$(CARGO) +nightly fuzz run --fuzz-dir fuzz/cargo-fuzz $$t target/fuzz/corpus/$$t fuzz/seeds/$$t \
		-- -max_total_time=$(FUZZ_SECONDS) -max_len=4096 || exit 1; done
