//! Publishes that frame ticks straight into idle streams' connection buffers
//! (`--direct-publish`, on by default) keep every rule of the stream: per symbol the
//! ack, then the snapshot, then ticks in seq order with every gap announced; nothing
//! after UNSUBSCRIBED; exact counters while the stream is open; a policy change that goes
//! on after the last tick sent; HTTP/2 flow control on a tiny stream window and on the
//! connection's window; a client that stops reading its socket. Each case runs with the option on and off, to the same
//! expectations.

use crate::common;

use std::{collections::HashMap, time::Duration};

use common::{publish, within, Stream, TestServer};
use tickerd::{
    client::Kind,
    ops::metrics::StreamView,
    pb::{
        ticker_stream_service_client::TickerStreamServiceClient, PublishRequest, TickerRequest,
        TickerResponse,
    },
};
use tokio::sync::watch;

async fn server(direct: bool) -> TestServer {
    TestServer::with(|c| c.direct_publish = direct).await
}

/// Publishes rounds of one tick for each of `symbols` until `stop` turns true.
fn keep_publishing(
    server: &TestServer,
    symbols: &'static [&'static str],
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<u64> {
    let url = server.url();
    tokio::spawn(async move {
        let mut client = TickerStreamServiceClient::connect(url)
            .await
            .expect("connect");
        let mut rounds = 0;
        while !*stop.borrow() {
            let batch: Vec<PublishRequest> = (0..20)
                .flat_map(|_| symbols.iter().map(|s| PublishRequest::new(*s, 1.0)))
                .collect();
            publish(&mut client, batch).await;
            rounds += 20;
        }
        rounds
    })
}

/// What the stream has shown of one symbol.
#[derive(Default, Debug)]
struct Seen {
    subscribed: bool,
    /// The last seq shown (snapshot or tick); 0 before the snapshot.
    last: u64,
    gap: u64,
    ticks: u64,
}

/// Checks `msg` against the rules and records it.
fn check(seen: &mut HashMap<String, Seen>, msg: &TickerResponse) {
    let s = seen.entry(msg.symbol.clone()).or_default();
    match msg.kind() {
        Kind::Subscribed => {
            assert!(!s.subscribed, "a second ack: {msg:?}");
            *s = Seen {
                subscribed: true,
                ticks: s.ticks,
                ..Seen::default()
            };
        }
        Kind::Unsubscribed => s.subscribed = false,
        Kind::Snapshot => {
            assert!(s.subscribed && s.last == 0, "{msg:?} out of place: {s:?}");
            s.last = msg.seq;
        }
        Kind::Lagged => s.gap = msg.dropped,
        Kind::Tick => {
            assert!(s.subscribed, "a tick while not subscribed: {msg:?}");
            assert!(s.last > 0, "a tick before the snapshot: {msg:?}");
            assert_eq!(msg.seq, s.last + 1 + s.gap, "{} out of order", msg.symbol);
            s.last = msg.seq;
            s.gap = 0;
            s.ticks += 1;
        }
        Kind::Backlog => {}
        other => panic!("unexpected {other:?}: {msg:?}"),
    }
}

/// Reads until `kind` for `symbol`, checking everything on the way.
async fn read_until(
    stream: &mut Stream,
    seen: &mut HashMap<String, Seen>,
    kind: Kind,
    symbol: &str,
) {
    loop {
        let msg = stream.next().await;
        check(seen, &msg);
        if msg.kind() == kind && msg.symbol == symbol {
            return;
        }
    }
}

async fn streams(server: &TestServer) -> Vec<StreamView> {
    let (_, body) = server.http_get("/streams").await;
    serde_json::from_str(&body).expect(&body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_keeps_each_symbols_order_and_the_counts_exact() {
    for direct in [true, false] {
        let server = server(direct).await;
        let mut client = server.client().await;
        publish(
            &mut client,
            ["A", "B", "C"]
                .map(|s| PublishRequest::new(s, 1.0))
                .to_vec(),
        )
        .await;
        let (stop, stopped) = watch::channel(false);
        let publisher = keep_publishing(&server, &["A", "B", "C"], stopped);

        let mut stream = Stream::open(&mut client).await;
        let mut seen = HashMap::new();
        for symbol in ["A", "B", "C"] {
            stream.subscribe(symbol).await;
            read_until(&mut stream, &mut seen, Kind::Snapshot, symbol).await;
        }
        for _ in 0..30 {
            stream.unsubscribe("B").await;
            read_until(&mut stream, &mut seen, Kind::Unsubscribed, "B").await;
            stream.subscribe("B").await;
            read_until(&mut stream, &mut seen, Kind::Snapshot, "B").await;
            read_until(&mut stream, &mut seen, Kind::Tick, "B").await;
            read_until(&mut stream, &mut seen, Kind::Tick, "A").await;
        }
        stop.send(true).expect("publisher");
        let rounds = within(publisher).await.expect("publisher task");
        assert!(rounds > 0);

        // Quiet now: every tick published has been sent; the counters say so too.
        let last_seq = |symbol: &str| server.hub.seq(symbol);
        for symbol in ["A", "B", "C"] {
            while seen[symbol].last < last_seq(symbol) {
                let msg = stream.next().await;
                check(&mut seen, &msg);
            }
        }
        let ticks: u64 = seen.values().map(|s| s.ticks).sum();
        let views = streams(&server).await;
        let view = views
            .iter()
            .find(|v| v.rpc == "TickerStream")
            .expect("the stream");
        assert_eq!(view.ticks_sent, ticks, "direct {direct}: {views:?}");
        assert_eq!(view.ticks_dropped, 0, "direct {direct}");
        // The totals too, and the share publishes framed themselves.
        assert_eq!(server.counter("tickerd_ticks_delivered_total").await, ticks);
        let framed = server.counter("tickerd_ticks_delivered_direct_total").await;
        if direct {
            assert!(framed > 0 && framed <= ticks, "{framed} of {ticks}");
        } else {
            assert_eq!(framed, 0);
        }
    }
}

/// Publishes stop framing where a window ends (an h2 client errs on any byte past it,
/// and closes the whole connection past the connection's window) and fall back on the
/// ring, announcing what it dropped: a client that grants 1 KiB per stream and reads
/// slowly, and one whose streams may take 1 MiB each but whose connection takes 64 KiB at
/// a time (HTTP/2's initial size) and reads nothing until everything is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_window_is_obeyed_and_every_loss_announced() {
    for direct in [true, false] {
        windowed(direct, 1024, None).await;
        windowed(direct, 1024 * 1024, Some(65_535)).await;
    }
}

async fn windowed(direct: bool, stream_window: u32, conn_window: Option<u32>) {
    let server = server(direct).await;
    let mut client = server.client().await;
    publish(&mut client, vec![PublishRequest::new("W", 1.0)]).await;
    let mut endpoint = tickerd::client::endpoint(server.url())
        .expect("endpoint")
        .initial_stream_window_size(stream_window);
    if let Some(window) = conn_window {
        endpoint = endpoint.initial_connection_window_size(window);
    }
    let channel = endpoint.connect().await.expect("connect");
    let mut slow = TickerStreamServiceClient::new(channel);
    let mut stream = Stream::open(&mut slow).await;
    let mut seen = HashMap::new();
    stream.send(TickerRequest::subscribe("W")).await;
    read_until(&mut stream, &mut seen, Kind::Snapshot, "W").await;
    let total = 5_000;
    publish(
        &mut client,
        (0..total).map(|_| PublishRequest::new("W", 2.0)).collect(),
    )
    .await;
    let mut lost = 0;
    while seen["W"].last < 1 + total {
        let msg = stream.next().await;
        if msg.kind() == Kind::Lagged {
            lost += msg.dropped;
        }
        check(&mut seen, &msg);
        if seen["W"].ticks % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let case = format!("direct {direct}, windows {stream_window} and {conn_window:?}");
    assert_eq!(seen["W"].ticks + lost, total, "{case}");
}

/// The same when the client stops reading its socket while its HTTP/2 windows stay wide
/// open: the server's writes stall with its buffer full. Read again, every tick comes
/// in seq order or is announced. Two ways into the stall: big batches, where the stream
/// backs up into its ring; and small ones only, where the stream keeps up with each
/// batch, so publishes go on framing its ticks while the connection's last write is
/// unfinished (what they framed must still leave ahead of what the stream's next poll
/// adds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_socket_keeps_each_streams_order() {
    // (batches, ticks in each): about 9 MB in all, twice what the kernel buffers on
    // loopback (4 MiB at most on the server's side).
    let big_then_small: &[(u64, usize)] = &[(20, 5_000), (200, 50)];
    let small_only: &[(u64, usize)] = &[(2_100, 50)];
    for direct in [true, false] {
        for plan in [big_then_small, small_only] {
            stalled(direct, plan).await;
        }
    }
}

async fn stalled(direct: bool, batches: &[(u64, usize)]) {
    use common::h2raw::{self, Raw};
    use prost::Message as _;

    let server = server(direct).await;
    let mut client = server.client().await;
    publish(&mut client, vec![PublishRequest::new("S", 1.0)]).await;
    let window = 1 << 30;
    let mut raw = Raw::connect(
        server.addr,
        &[(h2raw::SETTINGS_INITIAL_WINDOW_SIZE, window)],
    )
    .await;
    let mut hello = h2raw::frame(h2raw::WINDOW_UPDATE, 0, 0, &(window - 65_535).to_be_bytes());
    hello.extend(h2raw::frame(
        h2raw::HEADERS,
        h2raw::END_HEADERS,
        1,
        &h2raw::grpc_headers("TickerStream"),
    ));
    hello.extend(h2raw::frame(
        h2raw::DATA,
        0,
        1,
        &h2raw::grpc_message(&TickerRequest::subscribe("S").encode_to_vec()),
    ));
    assert!(raw.send(&hello).await);

    let (mut body, mut ready) = (Vec::new(), Default::default());
    let mut seen = HashMap::new();
    loop {
        let msg = next_message(&mut raw, &mut body, &mut ready).await;
        check(&mut seen, &msg);
        if msg.kind() == Kind::Snapshot {
            break;
        }
    }

    // Not a byte read while the batches are published: the server's writes stall.
    for &(count, size) in batches {
        for _ in 0..count {
            publish(
                &mut client,
                (0..size).map(|_| PublishRequest::new("S", 2.0)).collect(),
            )
            .await;
        }
    }
    let total: u64 = batches
        .iter()
        .map(|&(count, size)| count * size as u64)
        .sum();
    let mut lost = 0;
    while seen["S"].last < 1 + total {
        let msg = next_message(&mut raw, &mut body, &mut ready).await;
        if msg.kind() == Kind::Lagged {
            lost += msg.dropped;
        }
        check(&mut seen, &msg);
    }
    assert_eq!(
        seen["S"].ticks + lost,
        total,
        "direct {direct}, batches {batches:?}"
    );
}

/// A subscription changing policy goes on from the last tick the client got, also when
/// publishes sent that tick straight into the connection (the session hears of those
/// only when it looks): no tick again, none missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_goes_on_after_the_ticks_sent_directly() {
    for direct in [true, false] {
        let server = server(direct).await;
        // Publishes on a connection of their own: one read in the stream's connection
        // pass finds that connection's window taken back, and rings the bell instead.
        let mut publisher = server.client().await;
        publish(&mut publisher, vec![PublishRequest::new("P", 1.0)]).await;
        let mut stream = Stream::open(&mut server.client().await).await;
        stream.subscribed("P").await;
        assert_eq!(stream.expect(Kind::Snapshot, "P").await.seq, 1);
        // One tick at a time, each read before the next: the stream is idle for each.
        for seq in 2..=6 {
            publish(&mut publisher, vec![PublishRequest::new("P", 1.0)]).await;
            assert_eq!(stream.expect(Kind::Tick, "P").await.seq, seq);
        }
        let sent_directly = server.counter("tickerd_ticks_delivered_direct_total").await;
        assert_eq!(
            sent_directly > 0,
            direct,
            "direct {direct}: {sent_directly}"
        );

        stream.send(TickerRequest::subscribe("P").strict()).await;
        let ack = stream.expect(Kind::Subscribed, "P").await;
        assert!(ack.recovered, "direct {direct}: {ack:?}");
        publish(&mut publisher, vec![PublishRequest::new("P", 2.0)]).await;
        let next = stream.next().await;
        assert_eq!(
            (next.kind(), next.seq),
            (Kind::Tick, 7),
            "direct {direct}: {next:?}"
        );
    }
}

/// The next message of stream 1: `ready` holds those already out of its DATA frames,
/// `body` what is left of a message not whole yet.
async fn next_message(
    raw: &mut common::h2raw::Raw,
    body: &mut Vec<u8>,
    ready: &mut std::collections::VecDeque<TickerResponse>,
) -> TickerResponse {
    loop {
        if let Some(msg) = ready.pop_front() {
            return msg;
        }
        match raw.next_frame(Duration::from_secs(10)).await {
            Some((common::h2raw::DATA, _, 1, payload)) => {
                body.extend_from_slice(&payload);
                ready.extend(common::h2raw::take_messages(body));
            }
            Some(_) => {}
            None => panic!("the connection ended or fell silent"),
        }
    }
}
