#!/usr/bin/env bash
# Runs a tickerd-bench scenario on a two-node cluster (one nats-server with JetStream,
# file storage in a temporary directory) and then on a single node, one after the
# other on this machine, and prints both reports. The publisher talks to the first
# node; the reading streams are spread over both.
#   benches/cluster.sh [tickerd-bench flags...]      e.g. --rate 5000 --duration 10s
# nats-server: $TICKERD_NATS_SERVER, else the one tests/run.sh installs.
# TICKERD_ARGS adds flags to every tickerd.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin tickerd --bin tickerd-bench
NATS=${TICKERD_NATS_SERVER:-target/test-tools/venv/bin/nats-server}
[ -x "$NATS" ] || { echo "no nats-server at $NATS: run bash tests/run.sh once, or set TICKERD_NATS_SERVER" >&2; exit 1; }
TICKERD_ARGS=${TICKERD_ARGS:-}
BENCH_ARGS=("$@")
store=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$store"; }
trap cleanup EXIT

wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

"$NATS" -js -a 127.0.0.1 -p 14299 -sd "$store" > /tmp/cluster-nats.log 2>&1 &
nats_pid=$!; pids+=("$nats_pid"); wait_port 14299
# shellcheck disable=SC2086
./target/release/tickerd --feed none --listen 127.0.0.1:30081 --cluster nats://127.0.0.1:14299 $TICKERD_ARGS > /tmp/cluster-a.log 2>&1 &
a=$!; pids+=("$a")
# shellcheck disable=SC2086
./target/release/tickerd --feed none --listen 127.0.0.1:30082 --cluster nats://127.0.0.1:14299 $TICKERD_ARGS > /tmp/cluster-b.log 2>&1 &
b=$!; pids+=("$b")
wait_port 30081; wait_port 30082
echo "== cluster: 2 tickerd nodes on one nats-server ($("$NATS" --version))"
./target/release/tickerd-bench --server http://127.0.0.1:30081,http://127.0.0.1:30082 \
  --server-pid "$a,$b" --bus-pid "$nats_pid" "${BENCH_ARGS[@]}" || true
kill "$a" "$b" "$nats_pid"; wait "$a" "$b" "$nats_pid" 2>/dev/null || true
pids=()

# shellcheck disable=SC2086
./target/release/tickerd --feed none --listen 127.0.0.1:30083 $TICKERD_ARGS > /tmp/cluster-single.log 2>&1 &
s=$!; pids+=("$s"); wait_port 30083
echo "== single node"
./target/release/tickerd-bench --server http://127.0.0.1:30083 --server-pid "$s" "${BENCH_ARGS[@]}" || true
