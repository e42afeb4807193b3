#!/usr/bin/env bash
# Placement benchmark: replays the Alibaba GPU trace (FGD paper) and synthetic inference
# fleets with every policy; writes target/bench/placement.json and placement.svg.
# Usage: placement/bench/run.sh [--trace DIR] [--seed N] [--workloads a,b] [--scale-nodes N]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
trace_default="$root/../shared/data/alibaba-gpu-v2023"
args=("$@")
if [[ " $* " != *" --trace "* ]]; then
  args+=(--trace "$trace_default")
fi
cargo build --release -q -p sluice-placement --bin sluice-placement-sim
target_dir="${CARGO_TARGET_DIR:-$root/target}"
mkdir -p "$root/target/bench"
"$target_dir/release/sluice-placement-sim" --out "$root/target/bench" "${args[@]}"
