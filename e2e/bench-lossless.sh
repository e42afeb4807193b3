#!/usr/bin/env bash
# Rolling releases under load on the local test ground: the baselines and Sluice side by side.
#
# Runs B1 (no preStop, app exits on SIGTERM), B2 (preStop sleep 15 + graceful app) and
# Sluice (a Release in proxy mode; the operator runs as a host process for each run), each
# at service-proxy propagation delays of 0, 5 and 20 s: a rolling update v1 → v2 of a
# 6-replica echo Deployment on the real node local-0 under 200 keep-alive connections at
# $RATE requests/s (default 2000; the issue asks for at least 500). Writes target/bench/lossless.json and target/bench/lossless.svg.
#
# Environment: SCENARIO (default all: B1, B2 and Sluice; also baselines, b1, b2, sluice,
# sluice-observe, sluice-rollback-5xx, sluice-rollback-slow, sluice-kill9), DELAYS (0,5,20), RATE (2000), CONNECTIONS (200),
# REPLICAS (6), SLUICE_E2E_KUBECONFIG (default target/e2e/kubeconfig; when unset the
# ground is brought up with `make cluster-up`, which is idempotent). For Sluice's Release:
# SLUICE_E2E_MAX_SURGE (100%), SLUICE_E2E_MAX_CONCURRENT (drains at once, 6),
# SLUICE_E2E_AGENT_CPU (the agent's CPU request, default the operator's 10m).
# SLUICE_E2E_RECORDS_DIR writes every request of each run there (docs/testing.md).
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
target/debug/sluice-e2e scenario "${SCENARIO:-all}" \
  --kubeconfig "$kubeconfig" \
  --delays "${DELAYS:-0,5,20}" \
  --rate "${RATE:-2000}" \
  --connections "${CONNECTIONS:-200}" \
  --replicas "${REPLICAS:-6}" \
  --out target/bench/lossless.json \
  --svg target/bench/lossless.svg \
  "$@"
echo "bench-lossless took $(( $(date +%s) - started )) s; report: target/bench/lossless.json, plot: target/bench/lossless.svg"
