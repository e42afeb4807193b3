#!/usr/bin/env bash
# Builds the test ground's upstream components from the pinned Go wrapper modules beside
# this script and caches the binaries outside the repo, keyed by component and version:
#   ${SLUICE_CACHE:-~/.cache/sluice}/bin/<component>-<version>/<binary>
# A cached binary is reused; a fresh machine builds everything by itself (cold: ~20-40 min
# on 2 cores, most of it kube-apiserver). Prints the bin directory of each component.
# Without arguments it builds the ground's own components; others are built on demand by
# name (`build.sh traefik`: the Gateway API implementation the e2e tests deploy).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${SLUICE_CACHE:-$HOME/.cache/sluice}

K8S_VERSION=v1.34.4
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.7.0
HELM_VERSION=v3.19.5
TRAEFIK_VERSION=v3.6.12

die() { echo "build.sh: $*" >&2; exit 1; }
# Go is needed only when something must be built; cached binaries run without it.
need_go() {
  command -v go >/dev/null 2>&1 || die "no Go toolchain on PATH, and $1 is not cached yet. Install Go >= 1.26 (https://go.dev/dl) and run again."
  local v; v=$(go env GOVERSION 2>/dev/null); v=${v#go}
  case $v in
    1.2[0-5]|1.2[0-5].*|1.1[0-9]*|1.[0-9]|1.[0-9].*) die "Go $v is too old to build $1: the pinned modules need Go >= 1.26 (https://go.dev/dl)." ;;
  esac
}

export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local
build_date=$(date -u +%Y-%m-%dT%H:%M:%SZ)

# build <component> <version> <module dir> <package> <binary> [ldflags] [build tags]
build() {
  local comp=$1 ver=$2 dir=$3 pkg=$4 bin=$5 ldflags=${6:-} tags=${7-selinux,notest}
  local out="$cache/bin/$comp-$ver"
  if [ -x "$out/$bin" ]; then return 0; fi
  # One build of a component at a time: callers that need it at once (tests running side
  # by side) wait for the first and take its result.
  mkdir -p "$cache/bin"
  local lock
  exec {lock}>"$out.lock"
  flock "$lock"
  if [ -x "$out/$bin" ]; then exec {lock}>&-; return 0; fi
  need_go "$bin $ver"
  echo "build.sh: building $bin $ver (cached afterwards in $out)" >&2
  local tmp; tmp=$(mktemp -d "$out.tmp.XXXXXX") && chmod 755 "$tmp"
  (cd "$here/$dir" && go build -trimpath -tags "$tags" -ldflags "-s -w $ldflags" -o "$tmp/$bin" "$pkg") \
    || { rm -rf "$tmp"; die "building $bin failed (see the Go output above)"; }
  rm -rf "$out" && mv "$tmp" "$out"
  exec {lock}>&-
}

kube_ldflags() {
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local f=""
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    f="$f -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    f="$f -X $p.gitCommit=0000000000000000000000000000000000000000 -X $p.gitTreeState=clean -X $p.buildDate=$build_date"
  done
  echo "$f"
}

want=${*:-etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy kwok helm}
for c in $want; do
  case $c in
    etcd) build etcd "$ETCD_VERSION" etcd go.etcd.io/etcd/server/v3 etcd ;;
    kube-apiserver|kube-controller-manager|kube-scheduler|kubectl|kubelet|kube-proxy)
      build "$c" "$K8S_VERSION" kubernetes "k8s.io/kubernetes/cmd/$c" "$c" "$(kube_ldflags)" ;;
    kwok) build kwok "$KWOK_VERSION" kwok sigs.k8s.io/kwok/cmd/kwok kwok \
            "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" ;;
    helm) build helm "$HELM_VERSION" helm helm.sh/helm/v3/cmd/helm helm \
            "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" ;;
    # Traefik's release ldflags (its Makefile); its web UI is not built, the module's
    # webui/static holds a placeholder that go:embed takes.
    traefik) build traefik "$TRAEFIK_VERSION" traefik github.com/traefik/traefik/v3/cmd/traefik traefik \
            "-X github.com/traefik/traefik/v3/pkg/version.Version=$TRAEFIK_VERSION -X github.com/traefik/traefik/v3/pkg/version.BuildDate=$build_date" "" ;;
    *) die "unknown component '$c'" ;;
  esac
done
for c in $want; do
  case $c in
    etcd) v=$ETCD_VERSION ;; kwok) v=$KWOK_VERSION ;; helm) v=$HELM_VERSION ;;
    traefik) v=$TRAEFIK_VERSION ;; *) v=$K8S_VERSION ;;
  esac
  echo "$c=$cache/bin/$c-$v"
done
