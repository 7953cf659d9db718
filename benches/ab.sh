#!/usr/bin/env bash
# Two (or more) tickerd builds compared on this noisy machine: the builds take turns, run
# after run, so a slow or fast phase of the VM falls on all of them; then each build's
# runs and their median. One run: `tickerd --feed none` and tickerd-bench's efficiency
# shape at RATE ticks/s (5000 = 500k deliveries/s) for DURATION after a 2 s warm-up.
#   benches/ab.sh RUNS BIN_A BIN_B [BIN...]     e.g. benches/ab.sh 5 /tmp/before /tmp/after
# RATE (5000), DURATION (6s), LAYOUT (random); server flags after a build's path, quoted:
#   benches/ab.sh 5 "target/release/tickerd --io-threads 2" target/release/tickerd
# The word grpc-go stands for the reference peer ($GO_PEER_DIR/bin/go-peer, default
# ../shared/reference/go-peer), for runs paired with it:
#   benches/ab.sh 4 target/release/tickerd grpc-go; benches/ab.sh 4 grpc-go target/release/tickerd
# The word floor stands for no server at all: `cargo bench --bench floor -- --round`, the
# same shape's bare fan-out (50 loopback connections, one 900-byte write each per 1 ms,
# read by one single-threaded runtime): the latency the kernel and the machine allow in
# that run's conditions; its CPU is the writer's per write over 10.8 ticks a write. Words
# after it go to the floor, quoted with it: "floor --writer-cpu 0" moves its writer alone to
# CPU 0 (with LOADGEN_PREFIX="taskset -c 1": the readers' wake-ups then cross CPUs);
# "floor --reader-process" reads from a process of its own, as the load generator does.
# Prints, per build: each run's "CPU µs per delivery / p99 µs / share delivered / the
# server's preemptions per second", then the median CPU (of an even count, the mean of the
# middle two). JSONL=path appends each run's report, one line with the build (and the
# prefixes below, when set, and the machine's steal and idle shares over the run), to that
# file; benches/sittings.py tabulates such files.
# SERVER_PREFIX runs every server, grpc-go's too, under a command that execs it (e.g.
# "chrt -f 1": real-time priority, so the load generator's threads never preempt it);
# LOADGEN_PREFIX the same for the load generator (e.g. SERVER_PREFIX="taskset -c 0"
# LOADGEN_PREFIX="taskset -c 1": each on a core of its own).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=$1; shift
RATE=${RATE:-5000}
DURATION=${DURATION:-6s}
LAYOUT=${LAYOUT:-random}
# Below Linux's ephemeral range (32768-60999): a port in it can be held by some client
# socket of the run before (the floor's, the load generator's), and the next server fails
# to bind it.
PORT=${PORT:-30074}
GO_PEER_DIR=${GO_PEER_DIR:-../shared/reference/go-peer}
cargo build --release --quiet --bin tickerd-bench
case " $* " in *" floor "*) cargo bench --quiet --bench floor --no-run ;; esac
declare -A runs
for _ in $(seq "$RUNS"); do
  for build in "$@"; do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && { echo "benches/ab.sh: port $PORT is taken: another server would be measured" >&2; exit 1; }
    # The whole machine's CPU time over the run (/proc/stat's first line, in ticks): a
    # phase where the host takes the vCPUs away shows as steal, whatever ran.
    stat_before=$(head -n 1 /proc/stat)
    if [ "${build%% *}" = floor ]; then
      seconds=$(python3 -c 'import sys; d=sys.argv[1]
print(float(d[:-2]) / 1000 if d.endswith("ms") else float(d.rstrip("s")))' "$DURATION")
      floor_args=${build#floor}
      # shellcheck disable=SC2086
      report=$(${LOADGEN_PREFIX:-} cargo bench --quiet --bench floor -- --round --json --seconds "$seconds" $floor_args)
    else
      if [ "$build" = grpc-go ]; then
        [ -x "$GO_PEER_DIR/bin/go-peer" ] || "$GO_PEER_DIR/build.sh" --no-test
        # shellcheck disable=SC2086
        ${SERVER_PREFIX:-} "$GO_PEER_DIR/bin/go-peer" --listen "127.0.0.1:$PORT" > /tmp/ab-server.log 2>&1 &
      else
        # shellcheck disable=SC2086
        ${SERVER_PREFIX:-} $build --feed none --listen "127.0.0.1:$PORT" > /tmp/ab-server.log 2>&1 &
      fi
      pid=$!
      for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null || { echo "benches/ab.sh: the server exited (port $PORT taken?): $(tail -n 2 /tmp/ab-server.log)" >&2; exit 1; }
      # shellcheck disable=SC2086
      report=$(${LOADGEN_PREFIX:-} ./target/release/tickerd-bench --server "http://127.0.0.1:$PORT" --server-pid "$pid" \
        --layout "$LAYOUT" --rate "$RATE" --duration "$DURATION" --warmup 2s --json)
      kill "$pid"; wait "$pid" 2>/dev/null || true
    fi
    stat_after=$(head -n 1 /proc/stat)
    run=$(python3 -c 'import json,sys; s=json.loads(sys.argv[1])["steps"][0]
p = s.get("server_preemptions_per_sec")
print("%.3f/%d/%.4f/%s" % (s["server_cpu_us_per_delivery"], s["latency_us"]["p99"], s["delivery_ratio"],
      "-" if p is None else "%.0f" % p))' "$report")
    runs[$build]="${runs[$build]:-} $run"
    if [ -n "${JSONL:-}" ]; then
      # The prefixes go with the run, so a sitting's file says what each run ran under.
      python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["build"]=sys.argv[2]
r.update({k: v for k, v in (("server_prefix", sys.argv[3]), ("loadgen_prefix", sys.argv[4])) if v})
# cpu user nice system idle iowait irq softirq steal: shares of the ticks of the run, in %.
d = [int(b) - int(a) for a, b in zip(sys.argv[5].split()[1:9], sys.argv[6].split()[1:9])]
r["machine"] = {"steal_pct": round(100 * d[7] / max(sum(d), 1), 2),
                "idle_pct": round(100 * (d[3] + d[4]) / max(sum(d), 1), 2)}
print(json.dumps(r))' "$report" "$build" "${SERVER_PREFIX:-}" "${LOADGEN_PREFIX:-}" \
        "$stat_before" "$stat_after" >> "$JSONL"
    fi
  done
done
for build in "$@"; do
  median=$(echo "${runs[$build]}" | tr ' ' '\n' | grep . | cut -d/ -f1 | sort -n |
    awk '{v[NR]=$1} END {if (NR % 2) print v[(NR+1)/2]; else printf "%.3f\n", (v[NR/2]+v[NR/2+1])/2}')
  echo "$build:${runs[$build]}  median $median µs"
done
