#!/usr/bin/env python3
"""Round trip of one JetStream publish against one atomic batch, on a scratch nats-server.

Why a round's ticks of several symbols are not sent as one atomic batch (README, "A cluster
on NATS JetStream"): starts nats-server with file storage on a free port, makes a stream of
100 subjects shaped as tickerd's, then times, over NATS's plain text protocol (no client
library in between), 2,000 single publishes each with Nats-Expected-Last-Subject-Sequence,
and 400 atomic batches of 5 messages (5 symbols, each with its own expected last subject
sequence), from sending to the answer.
    python3 benches/nats_batch_rtt.py [path/to/nats-server]
(default: the one tests/run.sh installs, target/test-tools/venv/bin/nats-server)
"""
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

NATS = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else "target/test-tools/venv/bin/nats-server"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    port = free_port()
    store = tempfile.mkdtemp()
    server = subprocess.Popen([NATS, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                sock = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                time.sleep(0.05)
        else:
            sys.exit(f"nats-server did not start on port {port}")
        run(sock)
    finally:
        server.terminate()
        server.wait()


def run(sock):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = sock.makefile("rb")
    reader.readline()  # INFO
    sock.sendall(b'CONNECT {"verbose":false,"headers":true,"protocol":1}\r\nSUB _R.> 1\r\n')

    def answer():
        while True:
            line = reader.readline()
            if line.startswith(b"PING"):
                sock.sendall(b"PONG\r\n")
            elif line.startswith((b"MSG", b"HMSG")):
                size = int(line.split()[-1])
                return json.loads(reader.read(size + 2)[:-2])
            elif not line:
                sys.exit("nats-server closed the connection")

    def hpub(subject, reply, headers):
        head = b"NATS/1.0\r\n" + b"".join(
            f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n"
        body = head + b"x"
        reply = f" {reply}" if reply else ""
        return f"HPUB {subject}{reply} {len(head)} {len(body)}\r\n".encode() + body + b"\r\n"

    config = {"name": "T", "subjects": ["T.t.>"], "storage": "file", "allow_atomic": True,
              "allow_direct": True, "max_msgs_per_subject": 1024}
    body = json.dumps(config).encode()
    sock.sendall(b"PUB $JS.API.STREAM.CREATE.T _R.c %d\r\n%s\r\n" % (len(body), body))
    answer()
    last = {}

    def single(symbol):
        start = time.perf_counter()
        sock.sendall(hpub(f"T.t.{symbol}", "_R.s",
                          {"Nats-Expected-Last-Subject-Sequence": last.get(symbol, 0)}))
        ack = answer()
        last[symbol] = ack["seq"]
        return time.perf_counter() - start

    def batch(n, symbols):
        out = b""
        for i, symbol in enumerate(symbols):
            headers = {"Nats-Batch-Id": f"b{n}", "Nats-Batch-Sequence": i + 1,
                       "Nats-Expected-Last-Subject-Sequence": last.get(symbol, 0)}
            commit = i + 1 == len(symbols)
            if commit:
                headers["Nats-Batch-Commit"] = 1
            out += hpub(f"T.t.{symbol}", "_R.b" if commit else None, headers)
        start = time.perf_counter()
        sock.sendall(out)
        ack = answer()
        elapsed = time.perf_counter() - start
        if "error" in ack:
            sys.exit(f"batch refused: {ack}")
        first = ack["seq"] - ack["count"] + 1
        for i, symbol in enumerate(symbols):
            last[symbol] = first + i
        return elapsed

    symbols = [f"S{i}" for i in range(100)]
    for symbol in symbols:
        single(symbol)
    singles = [single(symbols[i % 100]) for i in range(2000)]
    batches = [batch(i, [symbols[(5 * i + k) % 100] for k in range(5)]) for i in range(400)]
    for name, times in (("one publish", singles), ("atomic batch of 5 symbols", batches)):
        times.sort()
        print(f"{name}: median {statistics.median(times) * 1e6:.0f} us, "
              f"p99 {times[int(len(times) * 0.99)] * 1e6:.0f} us ({len(times)} round trips)")


if __name__ == "__main__":
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    main()
