#!/usr/bin/env bash
# Runs the same tickerd-bench scenario against tickerd and the grpc-go reference peer,
# one after the other on this machine, and prints both reports.
#   benches/compare.sh [tickerd-bench flags...]      e.g. --rate 5000 --duration 10s
# Builds release binaries; builds ../shared/reference/go-peer if needed (its build.sh).
# TICKERD_ARGS / GO_PEER_ARGS add server flags; SERVER_PREFIX runs both servers under a
# command that execs them (as in ab.sh, e.g. "python3 benches/slice.py 300000").
set -euo pipefail
cd "$(dirname "$0")/.."
GO_PEER_DIR=${GO_PEER_DIR:-../shared/reference/go-peer}
cargo build --release --quiet --bin tickerd --bin tickerd-bench
[ -x "$GO_PEER_DIR/bin/go-peer" ] || "$GO_PEER_DIR/build.sh" --no-test
TICKERD_ARGS=${TICKERD_ARGS:-}
GO_PEER_ARGS=${GO_PEER_ARGS:-}

run() { # name port command...
  local name=$1 port=$2; shift 2
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && { echo "benches/compare.sh: port $port is taken: another server would be measured" >&2; exit 1; }
  # shellcheck disable=SC2086
  ${SERVER_PREFIX:-} "$@" > "/tmp/compare-$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null || { echo "benches/compare.sh: the server exited (port $port taken?): $(tail -n 2 "/tmp/compare-$name.log")" >&2; exit 1; }
  echo "== $name"
  ./target/release/tickerd-bench --server "http://127.0.0.1:$port" --server-pid "$pid" "${BENCH_ARGS[@]}" || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

BENCH_ARGS=("$@")
# shellcheck disable=SC2086
run tickerd 30071 ./target/release/tickerd --feed none --listen 127.0.0.1:30071 $TICKERD_ARGS
# shellcheck disable=SC2086
run go-peer 30061 "$GO_PEER_DIR/bin/go-peer" --listen 127.0.0.1:30061 $GO_PEER_ARGS
