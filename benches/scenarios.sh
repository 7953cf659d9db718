#!/usr/bin/env bash
# Runs every scenario of the performance tables (README, docs/performance.md; method: benches/README.md) on tickerd and the
# grpc-go peer via benches/compare.sh; about 12 minutes on 2 cores.
#   benches/scenarios.sh > scenarios.log
cd "$(dirname "$0")/.."
echo "### efficiency"; bash benches/compare.sh --duration 10s 2>&1 | grep -v "^\s*$"
echo "### efficiency again"; bash benches/compare.sh --duration 10s 2>&1 | grep -v "^\s*$"
echo "### ramp"; bash benches/compare.sh --ramp --rate 6000 --ramp-factor 1.2 --ramp-steps 16 --duration 4s --warmup 1s 2>&1 | grep -v "^\s*$"
echo "### hot"; bash benches/compare.sh --symbols 1 --subs-per-stream 1 --streams 2000 --rate 500 --duration 10s 2>&1 | grep -v "^\s*$"
echo "### slow"; TICKERD_ARGS="--channel-capacity 256" bash benches/compare.sh --slow-streams 10 --stream-window 65536 --duration 10s 2>&1 | grep -v "^\s*$"
echo "### noslow"; TICKERD_ARGS="--channel-capacity 256" bash benches/compare.sh --stream-window 65536 --duration 10s 2>&1 | grep -v "^\s*$"
echo "### idle"; bash benches/compare.sh --idle-streams 10000 2>&1 | grep -v "^\s*$"
