#!/usr/bin/env bash
# Rolling-release baselines under load on the local test ground.
#
# Runs B1 (no preStop, app exits on SIGTERM) and B2 (preStop sleep 15 + graceful app), each
# at service-proxy propagation delays of 0, 5 and 20 s: a rolling update v1 → v2 of a
# 6-replica echo Deployment on the process node under 200 keep-alive connections at
# $RATE requests/s (default 2000; the issue asks for at least 500). Writes target/bench/lossless.json and target/bench/lossless.svg.
#
# Environment: SCENARIO (default baselines), DELAYS (0,5,20), RATE (2000), CONNECTIONS (200),
# REPLICAS (6), SLUICE_E2E_KUBECONFIG (default target/e2e/kubeconfig; when unset the
# ground is brought up with `make cluster-up`, which is idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build -q -p sluice-e2e --bins
if [[ -z "${SLUICE_E2E_KUBECONFIG:-}" ]]; then
  make -s cluster-up
fi
kubeconfig="${SLUICE_E2E_KUBECONFIG:-target/e2e/kubeconfig}"

mkdir -p target/bench
started=$(date +%s)
target/debug/sluice-e2e scenario "${SCENARIO:-baselines}" \
  --kubeconfig "$kubeconfig" \
  --delays "${DELAYS:-0,5,20}" \
  --rate "${RATE:-2000}" \
  --connections "${CONNECTIONS:-200}" \
  --replicas "${REPLICAS:-6}" \
  --out target/bench/lossless.json \
  --svg target/bench/lossless.svg \
  "$@"
echo "bench-lossless took $(( $(date +%s) - started )) s; report: target/bench/lossless.json, plot: target/bench/lossless.svg"
