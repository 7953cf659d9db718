#!/usr/bin/env bash
# Server instructions per delivered tick, counted by valgrind's callgrind: repeatable on
# this noisy machine where CPU seconds are not. Runs the server under callgrind twice with
# the same load (200 streams on 10 connections, 10 subscriptions each over 100 symbols,
# 500 ticks/s = 10,000 deliveries/s), measured for 4 s and for 12 s; the difference of the
# two totals over the difference in deliveries leaves out start-up and connection set-up.
#   benches/instructions.sh [path/to/tickerd]      (default: target/release/tickerd)
#   TICKERD_HTTP2=hyper benches/instructions.sh    (the same through hyper and h2)
# Counts user-space instructions only (no kernel), of all the server's threads, and
# splits them by the crate of the function that executed them (inlined code counts for
# the function it was inlined into; "libc" is mostly memcpy called by h2).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin tickerd --bin tickerd-bench
BIN=${1:-target/release/tickerd}
PORT=${PORT:-30072}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

run() { # seconds -> prints "instructions deliveries"
  valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.$1" "$BIN" --feed none \
    --listen "127.0.0.1:$PORT" > "$OUT/server.$1.log" 2>&1 &
  local pid=$!
  for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.2; done
  local delivered
  delivered=$(./target/release/tickerd-bench --server "http://127.0.0.1:$PORT" --streams 200 \
    --conns 10 --rate 500 --duration "$1s" --warmup 1s --json |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print(sum(s["delivered"] for s in r["steps"]))')
  kill -INT "$pid"; wait "$pid" || true
  echo "$(sed -n 's/^totals: //p' "$OUT/cg.$1") $delivered"
}

read -r short_i short_d < <(run 4)
read -r long_i long_d < <(run 12)
echo "instructions: $short_i for $short_d deliveries (4 s), $long_i for $long_d (12 s)"
echo "per delivery: $(( (long_i - short_i) / (long_d - short_d) ))"
echo "per delivery, by crate:"
python3 - "$OUT/cg.4" "$OUT/cg.12" "$(( long_d - short_d ))" <<'PY'
import collections, re, subprocess, sys
CRATES = [("tickerd", "tickerd"), ("h2::", "h2"), ("slab::", "h2"), ("indexmap", "h2"),
          ("hyper", "hyper"), ("tokio", "tokio"), ("mio::", "tokio"), ("tonic", "tonic/tower"),
          ("tower", "tonic/tower"), ("axum", "tonic/tower"), ("http_body", "tonic/tower"),
          ("bytes::", "bytes"), ("prost", "prost"), ("tracing", "tracing"),
          ("loona_hpack", "hpack"), ("hashbrown", "std and other")]
def by_crate(path):
    out = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", path],
                         capture_output=True, text=True).stdout
    total = collections.Counter()
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+)\s+\([^)]*\)\s+\S+?:(.*)$", line)
        if not m or "PROGRAM TOTALS" in line:
            continue
        name = m.group(2).lstrip("<")
        crate = "libc" if "libc.so" in line or "ld-linux" in line else "std and other"
        for prefix, label in CRATES:
            if name.startswith(prefix):
                crate = label
                break
        total[crate] += int(m.group(1).replace(",", ""))
    return total
short, long, deliveries = by_crate(sys.argv[1]), by_crate(sys.argv[2]), int(sys.argv[3])
rows = sorted(((long[k] - short[k]) / deliveries, k) for k in set(short) | set(long))
for per, crate in reversed(rows):
    print(f"  {crate:14s} {per:7.0f}")
PY
