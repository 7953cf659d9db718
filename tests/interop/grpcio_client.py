"""A gRPC client on grpcio (gRPC's C core), driven by tests/interop.rs.

It knows no protobuf: the Rust test hands it each request's bytes (hex) and decodes what
it prints, so the contract is checked by the same prost types as every other test. One
JSON object on stdin names the server and the steps; one JSON object on stdout answers,
step by step: status code name, details, and the responses' bytes in hex.
"""

import json
import sys
import time

import grpc

SERVICE = "/ticker.v1.TickerStreamService/"


def raw(channel, kind, method):
    ident = lambda b: b
    make = getattr(channel, kind)
    return make(SERVICE + method, request_serializer=ident, response_deserializer=ident)


def status(error):
    return {"code": error.code().name, "details": error.details() or ""}


def unary(channel, step):
    call = raw(channel, "unary_unary", step["method"])
    try:
        reply = call(bytes.fromhex(step["request"]), timeout=step.get("timeout", 10))
        return {"code": "OK", "responses": [reply.hex()]}
    except grpc.RpcError as e:
        return status(e)


def publish(channel, step):
    call = raw(channel, "stream_unary", "Publish")
    try:
        reply = call(iter(bytes.fromhex(r) for r in step["requests"]), timeout=10)
        return {"code": "OK", "responses": [reply.hex()]}
    except grpc.RpcError as e:
        return status(e)


def stream(channel, step):
    """TickerStream: send the requests, half-close if asked, read `read` responses
    (publishing `publish_after` ticks once `publish_at` have arrived), then cancel, or
    read to the end (a deadline or the server's status)."""
    call = raw(channel, "stream_stream", "TickerStream")
    requests = [bytes.fromhex(r) for r in step["requests"]]

    def source():
        for r in requests:
            yield r
        if not step.get("half_close", False):
            # Keep the request side open until the call ends.
            while not done:
                time.sleep(0.01)

    done = False
    responses = []
    call_iter = call(source(), timeout=step.get("timeout"))
    out = {}
    try:
        for reply in call_iter:
            responses.append(reply.hex())
            if step.get("publish_at") == len(responses):
                publish(channel, {"requests": step["publish_after"]})
            if len(responses) == step.get("read"):
                call_iter.cancel()
    except grpc.RpcError as e:
        out = status(e)
    else:
        out = {"code": "OK", "details": ""}
    done = True
    out["responses"] = responses
    return out


def main():
    spec = json.load(sys.stdin)
    channel = grpc.insecure_channel(spec["target"])
    grpc.channel_ready_future(channel).result(timeout=10)
    results = []
    for step in spec["steps"]:
        kind = step["kind"]
        if kind == "unary":
            results.append(unary(channel, step))
        elif kind == "publish":
            results.append(publish(channel, step))
        elif kind == "stream":
            results.append(stream(channel, step))
        else:
            raise SystemExit(f"unknown step {kind}")
    channel.close()
    json.dump({"grpcio": grpc.__version__, "results": results}, sys.stdout)


if __name__ == "__main__":
    main()
