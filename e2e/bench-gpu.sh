#!/usr/bin/env bash
# GPU binding throughput: Sluice's gang binder vs kube-scheduler on 1,000 KWOK GPU nodes.
# Writes target/bench/gpu.json. Env: BENCH_GPU_NODES (1000), BENCH_GPU_PODS (2000),
# BENCH_GPU_PER_POD (2). Needs the test ground (make cluster-up).
set -euo pipefail
cd "$(dirname "$0")/.."
export SLUICE_E2E_KUBECONFIG="${SLUICE_E2E_KUBECONFIG:-$PWD/target/e2e/kubeconfig}"
cargo test -q -p sluice-operator --test inference_bench -- --ignored --nocapture
