#!/usr/bin/env bash
# Cache misses per delivered tick, simulated by callgrind (repeatable where CPU time is
# not): the server runs under `valgrind --tool=callgrind --cache-sim=yes` with a 32 KiB L1
# and a 512 KiB last level (about a core's share of L2 here), loaded by 1,000 streams on
# 50 connections (10 random symbols of 100) at RATE ticks/s (100 = 10,000 deliveries/s;
# higher rates batch differently under valgrind's slowdown and stop being repeatable), for
# 4 s and for 12 s; the difference over the difference in deliveries leaves out set-up.
#   benches/misses.sh [path/to/tickerd]        (default: target/release/tickerd)
# Prints per delivery: Ir (instructions), Dr/Dw (data reads/writes), D1mr/D1mw (L1
# misses), DLmr/DLmw (last-level misses). Compare builds only: at this rate every delivery
# also refreshes its stream's "behind" figure, which the 500k/s case does rarely.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin tickerd --bin tickerd-bench
BIN=${1:-target/release/tickerd}
RATE=${RATE:-100}
PORT=${PORT:-30073}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

run() { # seconds -> prints "events totals deliveries"
  valgrind --tool=callgrind --cache-sim=yes --D1=32768,8,64 --LL=524288,16,64 \
    --callgrind-out-file="$OUT/cg.$1" "$BIN" --feed none --listen "127.0.0.1:$PORT" \
    > "$OUT/server.$1.log" 2>&1 &
  local pid=$!
  for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.2; done
  local delivered
  delivered=$(./target/release/tickerd-bench --server "http://127.0.0.1:$PORT" --streams 1000 \
    --conns 50 --rate "$RATE" --duration "$1s" --warmup 2s --json |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print(sum(s["delivered"] for s in r["steps"]))')
  kill -INT "$pid"; wait "$pid" || true
  echo "$(sed -n 's/^events: //p' "$OUT/cg.$1" | tr ' ' ,) $(sed -n 's/^totals: //p' "$OUT/cg.$1" | tr ' ' ,) $delivered"
}

read -r events short short_d < <(run 4)
read -r _ long long_d < <(run 12)
python3 - "$events" "$short" "$short_d" "$long" "$long_d" <<'PY'
import sys
events = sys.argv[1].split(",")
a = [int(x) for x in sys.argv[2].split(",")]
b = [int(x) for x in sys.argv[4].split(",")]
d = int(sys.argv[5]) - int(sys.argv[3])
print(f"per delivery ({d} deliveries):", " ".join(f"{e} {(y - x) / d:.1f}" for e, x, y in zip(events, a, b)))
PY
