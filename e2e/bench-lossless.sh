#!/usr/bin/env bash
# Rolling releases under load on the local test ground: the baselines and Sluice side by side.
#
# Runs B1 (no preStop, app exits on SIGTERM), B2 (preStop sleep 15 + graceful app) and
# Sluice (a Release in proxy mode; the operator runs as a host process for each run), each
# at service-proxy propagation delays of 0, 5 and 20 s: a rolling update v1 → v2 of a
# 6-replica echo Deployment on the real node local-0 under 200 keep-alive connections at
# $RATE requests/s (default 2000; the issue asks for at least 500). Writes target/bench/lossless.json and target/bench/lossless.svg.
#
# Then the gateway scenario (e2e/tests/bench_gateway.rs, an #[ignore]d test run here): the
# same release through Traefik v3.6 (Gateway API) under load from a client of the gateway,
# once as a user would run it without Sluice (B2's Deployment behind an HTTPRoute to its
# Service) and once with Sluice (a Release whose spec.trafficRouting steers the HTTPRoute,
# steps 25% → 50% → 100%), each in its own namespace with its own Traefik, on
# $GATEWAY_CONNECTIONS keep-alive connections (16) at $GATEWAY_RATE requests/s (500).
# Writes target/bench/lossless-gateway.json (both runs, ratios Sluice/baseline).
#
# Environment: SCENARIO (default all: B1, B2 and Sluice, then the gateway scenario; also
# gateway alone, baselines, b1, b2, sluice, sluice-observe, sluice-rollback-5xx,
# sluice-rollback-slow, sluice-kill9), DELAYS (0,5,20), RATE (2000), CONNECTIONS (200),
# GATEWAY_RATE (500), GATEWAY_CONNECTIONS (16), REPLICAS (6, both), SLUICE_E2E_KUBECONFIG
# (default target/e2e/kubeconfig; when unset the ground is brought up with
# `make cluster-up`, which is idempotent). For Sluice's Release (both):
# SLUICE_E2E_MAX_SURGE (25%, as B2), SLUICE_E2E_MAX_CONCURRENT (drains at once, 6),
# SLUICE_E2E_AGENT_CPU (the agent's CPU request, default the operator's 10m).
# SLUICE_E2E_RECORDS_DIR writes every request of each scenario run there (docs/testing.md;
# not the gateway scenario's).
set -euo pipefail
cd "$(dirname "$0")/.."

# The operator and the agent too: Sluice's runs start target/debug/sluice-operator, and
# the node runs the agent sidecar from the image built from the binary.
cargo build -q --workspace --bins
# The agent sits in every request's path: measure the build users run (the image takes
# the newer of target/release and target/debug).
cargo build -q --release -p sluice-agent --bin sluice-agent
if [[ -z "${SLUICE_E2E_KUBECONFIG:-}" ]]; then
  make -s cluster-up
else
  target/debug/sluice-e2e images
fi
kubeconfig="${SLUICE_E2E_KUBECONFIG:-target/e2e/kubeconfig}"
export SLUICE_E2E_KUBECONFIG="$kubeconfig"

mkdir -p target/bench
started=$(date +%s)
scenario="${SCENARIO:-all}"
reports=()
if [[ $scenario != gateway ]]; then
  target/debug/sluice-e2e scenario "$scenario" \
    --kubeconfig "$kubeconfig" \
    --delays "${DELAYS:-0,5,20}" \
    --rate "${RATE:-2000}" \
    --connections "${CONNECTIONS:-200}" \
    --replicas "${REPLICAS:-6}" \
    --out target/bench/lossless.json \
    --svg target/bench/lossless.svg \
    "$@"
  reports+=(target/bench/lossless.json target/bench/lossless.svg)
fi
if [[ $scenario == all || $scenario == gateway ]]; then
  SLUICE_BENCH_GATEWAY_RATE="${GATEWAY_RATE:-500}" \
    SLUICE_BENCH_GATEWAY_CONNECTIONS="${GATEWAY_CONNECTIONS:-16}" \
    SLUICE_BENCH_GATEWAY_REPLICAS="${REPLICAS:-6}" \
    SLUICE_BENCH_GATEWAY_OUT="$PWD/target/bench/lossless-gateway.json" \
    cargo test -q -p sluice-e2e --test bench_gateway -- --ignored --nocapture
  reports+=(target/bench/lossless-gateway.json)
fi
echo "bench-lossless took $(( $(date +%s) - started )) s; wrote ${reports[*]}"
