//! HTTP/2 and gRPC abuse against the real server on port 0, each case while a
//! well-behaved client streams ticks: afterwards that client must have every tick in
//! order, the server must still answer, and its resident memory must have grown by less
//! than `MEMORY_BOUND`. The server's answer to each case is what the README's security
//! section lists.

mod common;

use std::time::Duration;

use common::{h2raw::*, publish, quotes, ticks, Stream, TestServer};
use prost::Message as _;
use tickerd::{client::Kind, pb::TickerRequest};
use tokio::task::JoinHandle;

/// Most the server process may grow during one case (it holds the test harness too).
const MEMORY_BOUND: u64 = 32 * 1024 * 1024;

/// Ticks the bystander's publisher sends during a case.
const BYSTANDER_TICKS: u64 = 2_000;

const WAIT: Duration = Duration::from_secs(10);

/// A server with short keepalive timers (so silent connections end within seconds) and
/// few streams per connection (so the limit is cheap to reach).
async fn server() -> (Alone, TestServer) {
    // Taken before the server starts: another case's start-up would count in this
    // case's memory.
    let alone = ONE_AT_A_TIME.lock().await;
    let server = TestServer::with(|c| {
        // A silent connection is closed within 3 s; a stalled one outlives its case.
        c.http2_keepalive_interval = Duration::from_secs(2);
        c.http2_keepalive_timeout = Duration::from_secs(1);
        c.max_concurrent_streams = 16;
    })
    .await;
    (alone, server)
}

/// A server, a bystander streaming beside it, and a raw connection sending `settings`.
async fn case(settings: &[(u16, u32)]) -> (TestServer, Bystander, Raw) {
    let (alone, server) = server().await;
    let bystander = Bystander::start(&server, alone).await;
    let raw = Raw::connect(server.addr, settings).await;
    (server, bystander, raw)
}

/// The server answered with GOAWAY `code`, or by closing: the reset of a close can
/// overtake the GOAWAY before it is read.
fn answered(answer: Option<u32>, code: u32) {
    assert!(
        answer.is_none() || answer == Some(code),
        "GOAWAY {answer:?}, not {code}"
    );
}

/// A well-behaved client: a stream subscribed to `OK`, and a publisher that sends
/// `BYSTANDER_TICKS` ticks of it in small paced batches while the abuse runs.
struct Bystander {
    stream: Stream,
    publisher: JoinHandle<()>,
    rss_before: u64,
    /// One case at a time: the memory bound is measured on the whole process.
    _alone: Alone,
}

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One case at a time (see `Bystander`).
type Alone = tokio::sync::MutexGuard<'static, ()>;

impl Bystander {
    async fn start(server: &TestServer, alone: Alone) -> Bystander {
        let mut client = server.client().await;
        publish(&mut client, ticks("OK", 1)).await;
        let mut stream = Stream::open(&mut client).await;
        stream.subscribed("OK").await;
        stream.expect(Kind::Snapshot, "OK").await;
        let rss_before = rss();
        let publisher = tokio::spawn(async move {
            for _ in 0..BYSTANDER_TICKS / 100 {
                publish(&mut client, ticks("OK", 100)).await;
                // Paced, so the ticks flow during the whole case.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Bystander {
            stream,
            publisher,
            rss_before,
            _alone: alone,
        }
    }

    /// Every tick arrived, in order; the server answers; memory stayed bounded.
    async fn unharmed(mut self, server: &TestServer) {
        self.publisher.await.expect("publisher");
        for seq in 2..=BYSTANDER_TICKS + 1 {
            let msg = self.stream.next().await;
            assert_eq!(
                (msg.kind(), msg.seq),
                (Kind::Tick, seq),
                "the well-behaved stream lost or reordered a tick"
            );
        }
        let quote = quotes(&mut server.client().await, &["OK"]).await;
        assert_eq!(
            quote[0].seq,
            BYSTANDER_TICKS + 1,
            "the server still answers"
        );
        let grown = rss().saturating_sub(self.rss_before);
        eprintln!("resident memory grew by {} KiB", grown / 1024);
        assert!(
            grown < MEMORY_BOUND,
            "resident memory grew by {grown} bytes (bound {MEMORY_BOUND})"
        );
    }
}

/// This process's resident memory (the server runs in it).
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// A TickerStream request for `symbol` as one gRPC message.
fn subscribe_message(symbol: &str) -> Vec<u8> {
    grpc_message(&TickerRequest::subscribe(symbol).encode_to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_ends_the_connection_with_enhance_your_calm() {
    let (server, bystander, mut raw) = case(&[]).await;
    let headers = grpc_headers("TickerStream");
    let mut burst = Vec::new();
    for i in 0..2_000u32 {
        let id = 2 * i + 1;
        burst.extend(frame(HEADERS, END_HEADERS, id, &headers));
        burst.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    raw.send(&burst).await;
    assert_eq!(raw.goaway(WAIT).await, Some(ENHANCE_YOUR_CALM));
    bystander.unharmed(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_ends_the_connection() {
    let (server, bystander, mut raw) = case(&[]).await;
    let mut opening = grpc_headers("TickerStream");
    opening.extend(literal("x-pad", &[b'a'; 100]));
    raw.send(&frame(HEADERS, 0, 1, &opening)).await;
    let chunk = literal("x-more", &[b'b'; 1000]);
    let mut sent = 0;
    while sent < 100_000 && raw.send(&frame(CONTINUATION, 0, 1, &chunk)).await {
        sent += 1;
    }
    // Cut off long before the flood ends: with a GOAWAY, or by closing.
    assert!(
        sent < 100_000,
        "the server read 100,000 CONTINUATION frames"
    );
    let answer = raw.goaway(WAIT).await;
    // GOAWAY ENHANCE_YOUR_CALM, unless the close's reset overtook it.
    answered(answer, ENHANCE_YOUR_CALM);
    bystander.unharmed(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_and_ping_floods_from_a_client_that_never_reads_stay_bounded() {
    let (server, bystander, mut raw) = case(&[]).await;
    let mut flood = Vec::new();
    for i in 0..50_000u64 {
        flood.extend(frame(SETTINGS, 0, 0, &[]));
        flood.extend(frame(PING, 0, 0, &i.to_be_bytes()));
    }
    // The acks pile up unread: the server stops reading (or gives up) rather than
    // buffering them without bound.
    let _ = tokio::time::timeout(Duration::from_secs(3), raw.send(&flood)).await;
    bystander.unharmed(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_empty_data_frames_hurts_nobody() {
    let (server, bystander, mut raw) = case(&[]).await;
    raw.open(1).await;
    let mut flood = Vec::new();
    for _ in 0..100_000 {
        flood.extend(frame(DATA, 0, 1, &[]));
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), raw.send(&flood)).await;
    let answer = raw.goaway(WAIT).await;
    answered(answer, ENHANCE_YOUR_CALM);
    bystander.unharmed(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_overflow_is_a_flow_control_error() {
    let (server, bystander, mut raw) = case(&[]).await;
    let increment = 0x7fff_ffffu32.to_be_bytes();
    raw.send(&frame(WINDOW_UPDATE, 0, 0, &increment)).await;
    raw.send(&frame(WINDOW_UPDATE, 0, 0, &increment)).await;
    assert_eq!(raw.goaway(WAIT).await, Some(FLOW_CONTROL_ERROR));
    bystander.unharmed(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_window_stays_zero_only_backs_up_its_own_ring() {
    let (server, bystander, mut raw) = case(&[(SETTINGS_INITIAL_WINDOW_SIZE, 0)]).await;
    let opened = tokio::time::Instant::now();
    raw.open(1).await;
    raw.send(&frame(DATA, 0, 1, &subscribe_message("OK"))).await;
    common::eventually("its stream is open", || {
        server.service.active_streams() == 2
    })
    .await;
    // It never grants a byte of window, and never reads.
    bystander.unharmed(&server).await;
    // The bystander's stream ends with `unharmed`; the zero-window one must remain.
    let peer = raw.socket.local_addr().expect("local addr").to_string();
    let (_, open) = server.http_get("/streams").await;
    if !open.contains(&peer) {
        // Only the keepalive may have ended it (its PING unanswered), never the window.
        let keepalive = Duration::from_secs(3);
        assert!(
            opened.elapsed() >= keepalive,
            "closed before its keepalive ran out"
        );
        answered(raw.goaway(WAIT).await, NO_ERROR);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hpack_bomb_and_oversized_headers_are_refused() {
    let (alone, server) = server().await;
    let bystander = Bystander::start(&server, alone).await;
    // A 4 KiB value put in the dynamic table once, then referenced 1,000 times: 4 MiB of
    // headers from 5 KiB on the wire.
    let mut bomb = grpc_headers("TickerStream");
    bomb.extend(literal_indexed("x-bomb", &[b'z'; 4000]));
    for _ in 0..1_000 {
        bomb.extend(indexed(62));
    }
    let mut raw = Raw::connect(server.addr, &[]).await;
    raw.send(&frame(HEADERS, END_HEADERS, 1, &bomb)).await;
    let bombed = raw.goaway(WAIT).await;
    answered(bombed, ENHANCE_YOUR_CALM);
    // One header over --http2-max-header-list-size (16 KiB).
    let mut big = grpc_headers("TickerStream");
    big.extend(literal("x-big", &vec![b'y'; 20_000]));
    let mut raw2 = Raw::connect(server.addr, &[]).await;
    let mut sent = frame(HEADERS, 0, 1, &big[..16_000]);
    sent.extend(frame(CONTINUATION, END_HEADERS, 1, &big[16_000..]));
    raw2.send(&sent).await;
    let oversized = raw2.reset_of(1, WAIT).await;
    assert!(
        matches!(oversized, Some(PROTOCOL_ERROR) | None),
        "RST_STREAM PROTOCOL_ERROR (or the connection's end): {oversized:?}"
    );
    // Neither remains a stream (a refused one may be torn down a moment after the reset).
    common::eventually("only the bystander's stream is open", || {
        server.service.active_streams() == 1
    })
    .await;
    bystander.unharmed(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_max_concurrent_streams_are_refused() {
    let (server, bystander, mut raw) = case(&[]).await;
    // Let the server's SETTINGS (max 16 streams) arrive first.
    let _ = raw.next_frame(WAIT).await;
    raw.send(&frame(SETTINGS, 0x1, 0, &[])).await;
    let headers = grpc_headers("TickerStream");
    let mut opening = Vec::new();
    for i in 0..20u32 {
        opening.extend(frame(HEADERS, END_HEADERS, 2 * i + 1, &headers));
    }
    raw.send(&opening).await;
    // Stream 17 (the 17th) and after are refused (REFUSED_STREAM, 0x7).
    assert_eq!(raw.reset_of(33, WAIT).await, Some(REFUSED_STREAM));
    bystander.unharmed(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_the_preface_and_then_nothing_is_closed() {
    let (server, bystander, mut raw) = case(&[]).await;
    // Never answers the server's keepalive PING: closed after interval + timeout.
    let started = tokio::time::Instant::now();
    let answer = raw.goaway(WAIT).await;
    answered(answer, NO_ERROR);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed only after {:?}",
        started.elapsed()
    );
    bystander.unharmed(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_and_a_reader_that_never_reads_hurt_nobody() {
    let (alone, server) = server().await;
    let bystander = Bystander::start(&server, alone).await;
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(
            tokio::net::TcpStream::connect(server.addr)
                .await
                .expect("connect"),
        );
    }
    // A stream subscribed to the busy symbol whose client never reads a byte.
    let mut stuck = Raw::connect(server.addr, &[]).await;
    stuck.open(1).await;
    stuck
        .send(&frame(DATA, 0, 1, &subscribe_message("OK")))
        .await;
    bystander.unharmed(&server).await;
    drop(idle);
}

/// Sends one TickerStream request whose body is `body` (raw bytes, so the gRPC length
/// prefix can lie) and returns the call's `grpc-status` and `grpc-message`.
async fn grpc_status_of_raw_body(server: &TestServer, body: Vec<u8>) -> (String, String) {
    let tcp = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    let request = http::Request::post(format!(
        "http://{}/ticker.v1.TickerStreamService/TickerStream",
        server.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .expect("request");
    let (response, mut send) = client.send_request(request, false).expect("send");
    send.send_data(body.into(), true).expect("body");
    let response = common::within(response).await.expect("response");
    let status = |headers: &http::HeaderMap| {
        let get = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        (get("grpc-status"), get("grpc-message"))
    };
    let trailers_only = status(response.headers());
    if !trailers_only.0.is_empty() {
        return trailers_only;
    }
    let mut body = response.into_body();
    while let Some(chunk) = common::within(body.data()).await {
        let chunk = chunk.expect("data");
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = common::within(body.trailers())
        .await
        .expect("trailers")
        .expect("trailers present");
    status(&trailers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_messages_over_the_limit_or_with_a_lying_length_are_refused() {
    let (alone, server) = server().await;
    let bystander = Bystander::start(&server, alone).await;
    // A prefix announcing 100 MiB (past --max-decoding-message-size, 64 KiB).
    let mut huge = vec![0u8];
    huge.extend_from_slice(&(100u32 << 20).to_be_bytes());
    huge.extend_from_slice(&[0u8; 1024]);
    let (code, message) = grpc_status_of_raw_body(&server, huge).await;
    assert_eq!(code, "11", "OUT_OF_RANGE: {message}");
    assert!(message.contains("too%20large"), "{message}");
    // A prefix announcing 100 bytes, and the stream ends after 10.
    let mut short = vec![0u8];
    short.extend_from_slice(&100u32.to_be_bytes());
    short.extend_from_slice(&[0x0a; 10]);
    let (code, message) = grpc_status_of_raw_body(&server, short).await;
    assert_eq!(
        code, "3",
        "INVALID_ARGUMENT for a truncated message: {message}"
    );
    bystander.unharmed(&server).await;
}
