#!/usr/bin/env bash
# `make test`: unit tests, then e2e against a real local control plane. Reuses a running
# test ground (make cluster-up); otherwise starts one and stops it again at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export SLUICE_REPO=$PWD
export RUST_BACKTRACE=1

cargo build --workspace --bins
e2e=target/debug/sluice-e2e

started_here=0
if [ -z "${SLUICE_E2E_KUBECONFIG:-}" ]; then
  # Captured, not `| tee /dev/stderr`: opening /dev/stderr truncates the log file that a
  # redirected run writes to; and a failed `up` stops the script here.
  up_out=$($e2e cluster up)
  echo "$up_out"
  case $up_out in *"already runs"*) ;; *) started_here=1 ;; esac
  export SLUICE_E2E_KUBECONFIG=$PWD/target/e2e/kubeconfig
else
  # A ground someone else started: give its node the binaries just built.
  $e2e images
fi
stop() {
  rc=$?
  if [ "$started_here" = 1 ] && [ -z "${SLUICE_E2E_KEEP:-}" ]; then
    $e2e cluster down || true
  fi
  exit $rc
}
trap stop EXIT

# The upstream tools the e2e tests call (kubectl, helm) come from the same cache, and
# Traefik (the Gateway API tests deploy it) is built here, once, before the tests that
# share it start side by side (a cold build takes minutes).
eval "$(bash e2e/cluster/build.sh kubectl helm | sed -E 's/^[a-z-]+=(.*)$/PATH="\1:$PATH"/')"
export PATH
bash e2e/cluster/build.sh traefik >/dev/null

# Cluster tests find the ground through SLUICE_E2E_KUBECONFIG (a plain `cargo test` starts
# one itself). Benchmarks are #[ignore]d and run only from `make bench-*`.
cargo test --workspace --no-fail-fast -- --test-threads="${SLUICE_TEST_THREADS:-2}"
