#!/usr/bin/env bash
# make bench-agent: sluice-agent overhead on loopback — direct vs sluice-agent (http, tcp)
# vs HAProxy (http, tcp). Writes target/bench/agent.json (in the repository root).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

if ! command -v haproxy >/dev/null 2>&1; then
  echo "installing haproxy (Debian package) ..." >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y haproxy >/dev/null 2>&1 || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y haproxy >/dev/null; } || \
    echo "warning: could not install haproxy; its rows will be missing" >&2
fi

cargo build --release -q -p sluice-agent --bins
mkdir -p "$ROOT/target/bench"
HAPROXY_ARG=()
if command -v haproxy >/dev/null 2>&1; then HAPROXY_ARG=(--haproxy "$(command -v haproxy)"); fi
# Bounded, about 70 s: 5 targets x (0.5 s warm-up + 5 s saturation, in rounds) + 7 latency
# rounds x 5 targets x 1 s (each round: every target, direct included, one fixed-rate run,
# pinned to one core at real-time priority). Extra arguments go to the bench, e.g.
# `--baseline-agent OLD_BINARY` (an older build measured alongside as baseline_agent_http),
# `--only agent_http,haproxy_http`, `--proxy-threads N` (the agent's SLUICE_AGENT_WORKERS
# and HAProxy's nbthread, default 2), `--pin same|split|none`, `--no-rt`.
"$TARGET/release/sluice-agent-bench" \
  --agent "$TARGET/release/sluice-agent" "${HAPROXY_ARG[@]}" \
  --out "$ROOT/target/bench/agent.json" "$@"
echo "wrote target/bench/agent.json" >&2
