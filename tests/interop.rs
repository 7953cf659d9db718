//! Interoperability with the two other gRPC stacks clients use most: gRPC's C core (Python
//! grpcio, `tests/interop/grpcio_client.py`) and grpc-go (`tests/interop/grpcgo_client.go`)
//! call the real server, on the server's own HTTP/2 and on hyper's, with every call shape:
//! client-streaming Publish, unary GetQuotes, an error status in trailers, an unknown
//! method, a bidirectional TickerStream that half-closes, keeps receiving, and is
//! cancelled, and one that runs into its deadline. Both clients come from `tests/run.sh`
//! (grpcio in a virtual environment, the grpc-go client built with Debian's Go and
//! grpc-go); without them the tests fail with that hint.

use crate::common;

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use common::TestServer;
use prost::Message;
use serde_json::{json, Value};
use tickerd::{
    pb::{
        ticker_response::Kind, GetQuotesRequest, GetQuotesResponse, PublishRequest,
        PublishResponse, TickerRequest, TickerResponse,
    },
    server::Http2,
};

/// A Python with grpcio: `$TICKERD_PYTHON`, else the test tools' virtual environment.
fn python() -> PathBuf {
    let python = std::env::var_os("TICKERD_PYTHON").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-tools/venv/bin/python"),
        PathBuf::from,
    );
    let has_grpcio = Command::new(&python)
        .args(["-c", "import grpc"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_grpcio,
        "{} cannot import grpc: the interop test needs Python grpcio. Run the suite with \
         `bash tests/run.sh` (it installs grpcio into target/test-tools/venv), or set \
         TICKERD_PYTHON to a Python that has it",
        python.display()
    );
    python
}

fn hex(msg: &impl Message) -> String {
    msg.encode_to_vec()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn unhex(s: &Value) -> Vec<u8> {
    let s = s.as_str().expect("hex string");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn responses<M: Message + Default>(result: &Value) -> Vec<M> {
    result["responses"]
        .as_array()
        .expect("responses")
        .iter()
        .map(|r| M::decode(unhex(r).as_slice()).expect("a response the client received decodes"))
        .collect()
}

/// The grpc-go client: `$TICKERD_GRPCGO_CLIENT`, else the one `tests/run.sh` builds.
fn grpcgo_client() -> PathBuf {
    let client = std::env::var_os("TICKERD_GRPCGO_CLIENT").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-tools/grpcgo-client"),
        PathBuf::from,
    );
    assert!(
        client.is_file(),
        "{} is missing: the interop test needs the grpc-go client. Run the suite with \
         `bash tests/run.sh` (it installs Debian's golang-go and golang-google-grpc-dev and \
         builds tests/interop/grpcgo_client.go), or set TICKERD_GRPCGO_CLIENT to a build of it",
        client.display()
    );
    client
}

/// A client that takes steps as JSON and answers as JSON.
#[derive(Clone, Copy, Debug)]
enum Client {
    Grpcio,
    GrpcGo,
}

/// Runs `client` on `steps` against `server`; its results, step by step.
fn run(client: Client, server: &TestServer, steps: Value) -> Vec<Value> {
    let spec = json!({ "target": server.addr.to_string(), "steps": steps });
    let mut command = match client {
        Client::Grpcio => {
            let mut c = Command::new(python());
            c.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/grpcio_client.py"));
            c
        }
        Client::GrpcGo => Command::new(grpcgo_client()),
    };
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start the {client:?} client: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(spec.to_string().as_bytes())
        .expect("write the steps");
    let out = child.wait_with_output().expect("the client ran");
    assert!(
        out.status.success(),
        "the {client:?} client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).expect("the client's JSON");
    eprintln!(
        "{client:?} {}",
        answer
            .get("grpcio")
            .or(answer.get("grpcgo"))
            .unwrap_or(&Value::Null)
    );
    answer["results"].as_array().expect("results").clone()
}

fn publish_hex(symbol: &str, prices: &[f64]) -> Value {
    prices
        .iter()
        .map(|p| hex(&PublishRequest::new(symbol, *p)))
        .collect()
}

async fn every_call_shape(client: Client, http2: Http2) {
    let server = TestServer::with(|c| c.http2 = http2).await;
    let steps = json!([
        { "kind": "publish", "requests": publish_hex("IA", &[1.0, 2.0, 3.0]) },
        { "kind": "unary", "method": "GetQuotes",
          "request": hex(&GetQuotesRequest { symbols: vec!["IA".into()] }) },
        { "kind": "unary", "method": "GetQuotes",
          "request": hex(&GetQuotesRequest { symbols: vec!["not a symbol!".into()] }) },
        { "kind": "unary", "method": "NoSuchMethod", "request": "" },
        { "kind": "stream", "requests": [hex(&TickerRequest::subscribe("IA"))],
          "half_close": true, "read": 4, "publish_at": 2,
          "publish_after": publish_hex("IA", &[4.0, 5.0]) },
        { "kind": "stream", "requests": [hex(&TickerRequest::subscribe("IA"))],
          "timeout": 0.5 },
    ]);
    let results = run(client, &server, steps);

    assert_eq!(results[0]["code"], "OK", "{}", results[0]);
    let published: Vec<PublishResponse> = responses(&results[0]);
    assert_eq!(published[0].accepted, 3);

    assert_eq!(results[1]["code"], "OK", "{}", results[1]);
    let quotes: Vec<GetQuotesResponse> = responses(&results[1]);
    assert_eq!(quotes[0].quotes[0].seq, 3);

    assert_eq!(results[2]["code"], "INVALID_ARGUMENT", "{}", results[2]);
    assert!(
        results[2]["details"]
            .as_str()
            .is_some_and(|d| d.contains("not a symbol!")),
        "the status message arrives in the trailers: {}",
        results[2]
    );
    assert_eq!(results[3]["code"], "UNIMPLEMENTED", "{}", results[3]);

    // Half-closed after its subscribe, the stream still receives; then cancelled.
    assert_eq!(results[4]["code"], "CANCELLED", "{}", results[4]);
    let seen: Vec<(Kind, u64)> = responses::<TickerResponse>(&results[4])
        .iter()
        .map(|r| (r.kind(), r.seq))
        .collect();
    assert_eq!(
        seen,
        vec![
            (Kind::Subscribed, 3),
            (Kind::Snapshot, 3),
            (Kind::Tick, 4),
            (Kind::Tick, 5)
        ]
    );

    assert_eq!(results[5]["code"], "DEADLINE_EXCEEDED", "{}", results[5]);
    assert_eq!(responses::<TickerResponse>(&results[5]).len(), 2);

    // The cancelled and timed-out streams are gone from the server too.
    common::eventually("every client stream closed on the server", || {
        server.service.active_streams() == 0
    })
    .await;
    let (_, ended) = server.http_get("/streams/ended").await;
    assert!(ended.contains("client_cancel"), "{ended}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_makes_every_call_shape_on_the_servers_own_http2() {
    every_call_shape(Client::Grpcio, Http2::Tickerd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_makes_every_call_shape_on_hyper() {
    every_call_shape(Client::Grpcio, Http2::Hyper).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_go_makes_every_call_shape_on_the_servers_own_http2() {
    every_call_shape(Client::GrpcGo, Http2::Tickerd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_go_makes_every_call_shape_on_hyper() {
    every_call_shape(Client::GrpcGo, Http2::Hyper).await;
}
