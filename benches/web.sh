#!/usr/bin/env bash
# WebSocket delivery beside gRPC delivery, one tickerd process, one run: the same
# tickerd-bench scenario over gRPC (--server), then over WebSocket sessions in proto3
# JSON (--web), then in the ticker.v1+proto binary subprotocol (--web --web-binary).
# Each stream is one WebSocket (one TCP connection) as a browser tab has; gRPC streams
# share --conns connections.
#   benches/web.sh [tickerd-bench flags...]   e.g. --rate 5000 --duration 10s
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin tickerd --bin tickerd-bench
GRPC=30081
WEB=30082
./target/release/tickerd --feed none --listen "127.0.0.1:$GRPC" --web-listen "127.0.0.1:$WEB" \
  > /tmp/web-bench-tickerd.log 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$WEB") 2>/dev/null && break; sleep 0.1; done
bench() { ./target/release/tickerd-bench --server "http://127.0.0.1:$GRPC" --server-pid "$pid" "$@"; }
echo "== gRPC"
bench "$@"
echo "== WebSocket, JSON"
bench --web "http://127.0.0.1:$WEB" "$@"
echo "== WebSocket, ticker.v1+proto"
bench --web "http://127.0.0.1:$WEB" --web-binary "$@"
