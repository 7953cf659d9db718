// A gRPC client on grpc-go, driven by tests/interop.rs, the twin of grpcio_client.py.
//
// It knows no protobuf: the Rust test hands it each request's bytes (hex) and decodes what
// it prints, so the contract is checked by the same prost types as every other test. One
// JSON object on stdin names the server and the steps; one JSON object on stdout answers,
// step by step: status code name, details, and the responses' bytes in hex.
//
// Built by tests/run.sh with Debian's Go and grpc-go (GOPATH mode, no module download).
package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

const service = "/ticker.v1.TickerStreamService/"

// raw passes messages through as bytes; its name keeps the content type application/grpc+proto.
type raw struct{}

func (raw) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (raw) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (raw) Name() string { return "proto" }

// The canonical names, as grpcio prints them.
var codeNames = []string{"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
	"NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
	"FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
	"UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"}

type step struct {
	Kind         string   `json:"kind"`
	Method       string   `json:"method"`
	Request      string   `json:"request"`
	Requests     []string `json:"requests"`
	Timeout      *float64 `json:"timeout"`
	HalfClose    bool     `json:"half_close"`
	Read         int      `json:"read"`
	PublishAt    int      `json:"publish_at"`
	PublishAfter []string `json:"publish_after"`
}

type result struct {
	Code      string   `json:"code"`
	Details   string   `json:"details"`
	Responses []string `json:"responses"`
}

func outcome(err error, responses []string) result {
	if err == nil {
		return result{Code: "OK", Responses: responses}
	}
	s := status.Convert(err)
	name := fmt.Sprintf("CODE_%d", s.Code())
	if int(s.Code()) < len(codeNames) {
		name = codeNames[s.Code()]
	}
	return result{Code: name, Details: s.Message(), Responses: responses}
}

func decode(hexes []string) [][]byte {
	out := make([][]byte, 0, len(hexes))
	for _, h := range hexes {
		b, err := hex.DecodeString(h)
		if err != nil {
			fail("a request is not hex: %v", err)
		}
		out = append(out, b)
	}
	return out
}

func seconds(t *float64, otherwise time.Duration) time.Duration {
	if t == nil {
		return otherwise
	}
	return time.Duration(*t * float64(time.Second))
}

func unary(conn *grpc.ClientConn, s step) result {
	ctx, cancel := context.WithTimeout(context.Background(), seconds(s.Timeout, 10*time.Second))
	defer cancel()
	req := decode([]string{s.Request})[0]
	var reply []byte
	err := conn.Invoke(ctx, service+s.Method, &req, &reply, grpc.ForceCodec(raw{}))
	if err != nil {
		return outcome(err, nil)
	}
	return outcome(nil, []string{hex.EncodeToString(reply)})
}

func publish(conn *grpc.ClientConn, requests []string) result {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	desc := &grpc.StreamDesc{ClientStreams: true}
	cs, err := conn.NewStream(ctx, desc, service+"Publish", grpc.ForceCodec(raw{}))
	if err != nil {
		return outcome(err, nil)
	}
	for _, r := range decode(requests) {
		r := r
		if err := cs.SendMsg(&r); err != nil {
			break // the status comes with the reply
		}
	}
	if err := cs.CloseSend(); err != nil {
		return outcome(err, nil)
	}
	var reply []byte
	if err := cs.RecvMsg(&reply); err != nil {
		return outcome(err, nil)
	}
	return outcome(nil, []string{hex.EncodeToString(reply)})
}

// stream runs a TickerStream: send the requests, half-close if asked, read `read`
// responses (publishing `publish_after` ticks once `publish_at` have arrived), then
// cancel, or read to the end (a deadline or the server's status).
func stream(conn *grpc.ClientConn, s step) result {
	ctx, cancel := context.WithCancel(context.Background())
	if s.Timeout != nil {
		ctx, cancel = context.WithTimeout(context.Background(), seconds(s.Timeout, 0))
	}
	defer cancel()
	desc := &grpc.StreamDesc{ClientStreams: true, ServerStreams: true}
	cs, err := conn.NewStream(ctx, desc, service+"TickerStream", grpc.ForceCodec(raw{}))
	if err != nil {
		return outcome(err, nil)
	}
	for _, r := range decode(s.Requests) {
		r := r
		if err := cs.SendMsg(&r); err != nil {
			break
		}
	}
	if s.HalfClose {
		if err := cs.CloseSend(); err != nil {
			return outcome(err, nil)
		}
	}
	responses := []string{}
	for {
		var reply []byte
		err := cs.RecvMsg(&reply)
		if errors.Is(err, io.EOF) {
			return outcome(nil, responses)
		}
		if err != nil {
			return outcome(err, responses)
		}
		responses = append(responses, hex.EncodeToString(reply))
		if s.PublishAt == len(responses) {
			publish(conn, s.PublishAfter)
		}
		if s.Read == len(responses) {
			cancel()
		}
	}
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "grpcgo_client: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	var spec struct {
		Target string `json:"target"`
		Steps  []step `json:"steps"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&spec); err != nil {
		fail("reading the steps: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, spec.Target, grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		fail("connecting to %s: %v", spec.Target, err)
	}
	defer conn.Close()
	results := []result{}
	for _, s := range spec.Steps {
		switch s.Kind {
		case "unary":
			results = append(results, unary(conn, s))
		case "publish":
			results = append(results, publish(conn, s.Requests))
		case "stream":
			results = append(results, stream(conn, s))
		default:
			fail("unknown step %q", s.Kind)
		}
	}
	out := map[string]interface{}{"grpcgo": grpc.Version, "results": results}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail("writing the results: %v", err)
	}
}
