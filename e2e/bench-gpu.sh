#!/usr/bin/env bash
# GPU fleet benchmarks on the test ground, written into target/bench/gpu.json:
# - "bind": Sluice's gang binder vs kube-scheduler on 1,000 KWOK GPU nodes (release build;
#   env BENCH_GPU_NODES (1000), BENCH_GPU_PODS (1000), BENCH_GPU_PER_POD (2), BENCH_GPU_RUNS (3));
# - "rollout": a 16-replica TP=4 InferenceSet rolled on a full fleet of 8 real nodes × 8
#   GPUs under load, with a model server that takes 20 s to load (env BENCH_ROLLOUT_*).
# BENCH_GPU_ONLY=bind|rollout runs one of them. Without SLUICE_E2E_KUBECONFIG the test
# ground is brought up first (`make cluster-up` is idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
export SLUICE_REPO=$PWD
if [[ -z "${SLUICE_E2E_KUBECONFIG:-}" ]]; then
  make -s cluster-up
  export SLUICE_E2E_KUBECONFIG=$PWD/target/e2e/kubeconfig
fi
only="${BENCH_GPU_ONLY:-}"
if [[ -z "$only" || "$only" == bind ]]; then
  cargo test --release -q -p sluice-operator --test inference_bench -- --ignored --nocapture
fi
if [[ -z "$only" || "$only" == rollout ]]; then
  # The operator (a host process), the extra real nodes (`sluice-e2e node`) and the images
  # come from target/debug.
  cargo build -q -p sluice-operator -p sluice-e2e -p sluice-agent --bins
  target/debug/sluice-e2e images
  cargo test -q -p sluice-operator --test inference_rollout gpu_fleet_rollout -- --ignored --nocapture
fi
