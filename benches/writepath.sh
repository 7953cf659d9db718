#!/usr/bin/env bash
# The write path, side by side: for each delivery rate, the efficiency shape (1,000 streams on
# 50 connections, 10 random symbols of 100 each) on tickerd (its own HTTP/2), on tickerd
# --http2 hyper, and on the grpc-go reference peer, one after the other. Each run's
# tickerd-bench report (JSON) gets the server's write syscalls (perf's
# syscalls:sys_enter_{write,writev,sendto,sendmsg} tracepoints), so writes per second per
# connection and deliveries per write sit beside CPU per delivery and p99. The writes are
# counted in a second, shorter run on the same server at the same rate (WRITES_DURATION,
# 4s), not in the measured one: with the tracepoints on, the server's CPU per delivery
# at 500k/s read about 5% higher (eight alternating runs, benches/README.md).
#   GO_PEER_DIR=/path/to/go-peer bash benches/writepath.sh [rates...] > writepath.jsonl
#   python3 benches/plot.py writepath.jsonl > docs/writepath.svg
# Rates are ticks/s (x100 deliveries/s); default 1000 2000 3000 5000 7000 10000 14000.
# DURATION (10s) and WARMUP (2s) set each run's length; LAYOUT (random) the layout;
# BENCH_ARGS more tickerd-bench flags for both runs, e.g. the hot symbol's
# "--symbols 1 --subs-per-stream 1 --streams 2000".
set -euo pipefail
cd "$(dirname "$0")/.."
GO_PEER_DIR=${GO_PEER_DIR:-../shared/reference/go-peer}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
WRITES_DURATION=${WRITES_DURATION:-4}
LAYOUT=${LAYOUT:-random}
read -r -a BENCH_ARGS <<< "${BENCH_ARGS:-}"
RATES=("$@")
[ ${#RATES[@]} -gt 0 ] || RATES=(1000 2000 3000 5000 7000 10000 14000)
cargo build --release --quiet --bin tickerd --bin tickerd-bench
[ -x "$GO_PEER_DIR/bin/go-peer" ] || "$GO_PEER_DIR/build.sh" --no-test
perf stat -e syscalls:sys_enter_write -- true >/dev/null 2>&1 ||
  { echo "benches/writepath.sh: perf with syscall tracepoints is needed (Debian: linux-perf)" >&2; exit 1; }

run() { # server-name port rate command...
  local name=$1 port=$2 rate=$3; shift 3
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && { echo "benches/writepath.sh: port $port is taken: another server would be measured" >&2; exit 1; }
  "$@" > "/tmp/writepath-$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null || { echo "benches/writepath.sh: the server exited (port $port taken?): $(tail -n 2 "/tmp/writepath-$name.log")" >&2; exit 1; }
  local counts
  counts=$(mktemp)
  ./target/release/tickerd-bench --server "http://127.0.0.1:$port" --server-pid "$pid" \
    --layout "$LAYOUT" --rate "$rate" --duration "${DURATION}s" --warmup "${WARMUP}s" "${BENCH_ARGS[@]}" --json > "$counts.json" || true
  # The writes: the same load again, counted over the measured part of a shorter run.
  ( sleep "$WARMUP"; perf stat -x, -e 'syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_sendto,syscalls:sys_enter_sendmsg' \
      -p "$pid" -- sleep "$WRITES_DURATION" 2> "$counts" ) &
  local perf=$!
  ./target/release/tickerd-bench --server "http://127.0.0.1:$port" --layout "$LAYOUT" --rate "$rate" \
    --duration "$((WRITES_DURATION + 1))s" --warmup "${WARMUP}s" "${BENCH_ARGS[@]}" > /dev/null || true
  wait "$perf" || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
  python3 - "$name" "$counts" "$counts.json" "$WRITES_DURATION" <<'PY'
import json, sys
name, counts, report, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
writes = sum(int(l.split(",")[0]) for l in open(counts) if l.split(",")[0].isdigit())
try:
    r = json.load(open(report))
except ValueError:
    sys.exit(0)
step = r["steps"][0]
conns = r["options"]["conns"]
per_s = writes / seconds
step.update(server=name, writes_per_sec=per_s, writes_per_sec_per_conn=per_s / conns,
            deliveries_per_write=step["delivered_per_sec"] / per_s if per_s else None)
print(json.dumps(step))
PY
  rm -f "$counts" "$counts.json"
}

for rate in "${RATES[@]}"; do
  run tickerd 30071 "$rate" ./target/release/tickerd --feed none --listen 127.0.0.1:30071
  run tickerd-hyper 30072 "$rate" ./target/release/tickerd --feed none --listen 127.0.0.1:30072 --http2 hyper
  run grpc-go 30061 "$rate" "$GO_PEER_DIR/bin/go-peer" --listen 127.0.0.1:30061
done
