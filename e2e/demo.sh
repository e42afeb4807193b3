#!/usr/bin/env bash
# `make demo`: Sluice end to end on a fresh machine, in a few minutes.
#
# 1. builds everything and brings the local test ground up (`make cluster-up`: a real
#    control plane, the real node local-0 (kubelet, containerd, kube-proxy), a service proxy);
# 2. applies the CRDs and installs the chart with Helm: the operator runs as a pod on the
#    real node (watching the demo's namespace); OPERATOR=host installs the
#    chart with `replicas=0` and runs the operator as a host process instead;
# 3. deploys the quickstart (examples/quickstart/: the echo Deployment and Service, and a
#    Release) and shows the Release taking the Deployment over;
# 4. measures a rollout v1 → v2 of the same echo app (6 replicas, named port `http`,
#    `targetPort: http`, as in the quickstart) under load (200 keep-alive connections) behind a
#    load balancer that learns endpoint changes $DELAY s late, twice side by side: the B2
#    baseline (`preStop: sleep 15`, graceful app) and a Sluice Release; prints the table and
#    where the plot is. These runs start their own operator as a host process, scoped to
#    each run's namespace (the scenario runner stops and restarts it between runs).
#
# Environment: DELAY (default 5), RATE (default 1000 requests/s), OPERATOR (cluster|host),
# KEEP_DEMO=1 keeps the quickstart's namespace (and its operator) to play with.
set -euo pipefail
cd "$(dirname "$0")/.."
export SLUICE_REPO=$PWD

delay="${DELAY:-5}"
rate="${RATE:-1000}"
ns=sluice-demo
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Build (cargo build --workspace --bins)"
cargo build -q --workspace --bins

step "Test ground (make cluster-up)"
make -s cluster-up
export KUBECONFIG=$PWD/target/e2e/kubeconfig
export SLUICE_E2E_KUBECONFIG=$KUBECONFIG
eval "$(bash e2e/cluster/build.sh kubectl helm | sed -E 's/^[a-z-]+=(.*)$/PATH="\1:$PATH"/')"
export PATH

kubectl apply --server-side --force-conflicts -f crds/ >/dev/null
kubectl wait --for condition=established --timeout=30s crd/releases.sluice.dev >/dev/null
kubectl delete namespace "$ns" --ignore-not-found --wait=false >/dev/null
kubectl wait --for=delete "namespace/$ns" --timeout=60s >/dev/null 2>&1 || true
kubectl create namespace "$ns" >/dev/null
mkdir -p target/e2e/logs
operator=""
cleanup() {
  if [ -n "$operator" ]; then
    kill "$operator" 2>/dev/null || true
    wait "$operator" 2>/dev/null || true
    operator=""
  fi
}
trap cleanup EXIT
if [ "${OPERATOR:-cluster}" = cluster ]; then
  step "CRDs and the Helm chart: the operator runs in the cluster (a pod on local-0), watching $ns"
  helm upgrade --install sluice charts/sluice -n sluice-system --create-namespace \
    --set "image.tag=dev,agent.image=sluice/agent:dev,watchNamespace=$ns,replicas=1,leaderElection.leaseDuration=5s,leaderElection.renewDeadline=3s,leaderElection.retryPeriod=1s" \
    --set-string 'nodeSelector.kubernetes\.io/hostname=local-0' >/dev/null
  kubectl -n sluice-system rollout status deployment/sluice-operator --timeout=90s
else
  step "CRDs and the Helm chart (replicas 0: the operator runs as a host process)"
  helm upgrade --install sluice charts/sluice -n sluice-system --create-namespace \
    --set replicas=0 >/dev/null
  echo "starting sluice-operator as a host process (log: target/e2e/logs/operator-demo.log)"
  SLUICE_AGENT_IMAGE=sluice/agent:dev SLUICE_WATCH_NAMESPACE=$ns \
    target/debug/sluice-operator run --kubeconfig "$KUBECONFIG" --lease-namespace "$ns" \
    --admin-addr 127.0.0.1:0 --lease-duration 3s >target/e2e/logs/operator-demo.log 2>&1 &
  operator=$!
fi
helm list -n sluice-system

step "Quickstart: echo Deployment + Service + Release in namespace $ns"
kubectl -n "$ns" apply -f examples/quickstart/echo.yaml -f examples/quickstart/release.yaml
echo "waiting for the Release to take the Deployment over (its pods get the agent sidecar)..."
for _ in $(seq 1 120); do
  phase=$(kubectl -n "$ns" get release echo -o jsonpath='{.status.phase}' 2>/dev/null || true)
  dep=$(kubectl -n "$ns" get deployment echo -o jsonpath='{.spec.replicas}' 2>/dev/null || true)
  [ "$phase" = Completed ] && [ "$dep" = 0 ] && break
  sleep 1
done
kubectl -n "$ns" get release echo
kubectl -n "$ns" get pods -o custom-columns='POD:.metadata.name,READY:.status.conditions[?(@.type=="Ready")].status,CONTAINERS:.spec.initContainers[*].name'
if [ -z "${KEEP_DEMO:-}" ]; then
  # Deleting the Release hands the pods back to the Deployment (the operator removes its
  # finalizer); a host-process operator stops now, so its finalizer goes by hand.
  if [ -n "$operator" ]; then
    kubectl -n "$ns" patch release echo --type merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 || true
  fi
  kubectl delete namespace "$ns" --wait=false >/dev/null
else
  echo "kept: try  kubectl -n $ns set image deployment/echo echo=sluice/echo:v2; kubectl -n $ns get release echo -w"
fi
cleanup

step "Measured: B2 (preStop sleep 15) and Sluice, v1 → v2 under load, load balancer ${delay} s late"
echo "(each run: its own namespace, 6 replicas, 200 connections at $rate req/s; Sluice's run starts the operator as a host process)"
mkdir -p target/bench
if ! target/debug/sluice-e2e scenario b2,sluice --kubeconfig "$KUBECONFIG" --delays "$delay" \
  --rate "$rate" --steady 10s --tail 5s \
  --out target/bench/demo.json --svg target/bench/demo.svg \
  >target/e2e/logs/demo-scenario.out 2>target/e2e/logs/demo-scenario.log; then
  echo "the measured runs failed; see target/e2e/logs/demo-scenario.log" >&2
  exit 1
fi
python3 - <<'EOF'
import json
r = json.load(open("target/bench/demo.json"))
print()
print(f"{'strategy':<8} {'failed requests':>16} {'storm factor':>13} {'p99 release':>12} {'duration':>9}")
for x in r["runs"]:
    print(f"{x['strategy']:<8} {x['failed']:>8} of {x['requests']:<6} {x['storm']['factor']:>13.2f} "
          f"{x['p99_release_ms']:>9.1f} ms {x['release_s']:>7.1f} s")
EOF
echo
echo "plot: target/bench/demo.svg   report: target/bench/demo.json"
echo "full measurement (B1, B2, Sluice at 0, 5, 20 s): make bench-lossless"
