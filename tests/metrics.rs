//! The operations endpoint of a real server during real sessions: /metrics parsed with a
//! Prometheus text parser, /healthz across a drain, /streams.

use crate::common;

use common::{end, h2raw::*, publish, ticks, within, Stream, TestServer};
use prometheus_parse::{Scrape, Value};
use prost::Message as _;
use tickerd::{client::Kind, ops::metrics::StreamView, pb::TickerRequest};
use tonic::Code;

async fn scrape(server: &TestServer) -> Scrape {
    let (status, body) = server.http_get("/metrics").await;
    assert_eq!(status, 200, "{body}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("valid Prometheus text")
}

/// The value of `name` whose labels include every pair of `labels` (0 when absent).
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{name} is not a number: {other:?}"),
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_and_gauges_follow_a_real_session() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    publish(&mut client, ticks("M", 1)).await;
    let before = scrape(&server).await;
    assert_eq!(
        value(
            &before,
            "tickerd_streams_active",
            &[("rpc", "TickerStream")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &before,
            "tickerd_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    let mut a = Stream::open(&mut client).await;
    let mut b = Stream::open(&mut server.client().await).await;
    for s in [&mut a, &mut b] {
        s.subscribed("M").await;
        s.expect(Kind::Snapshot, "M").await;
    }
    publish(&mut client, ticks("M", 100)).await;
    let mut received = 0;
    for s in [&mut a, &mut b] {
        for _ in 0..100 {
            s.expect(Kind::Tick, "M").await;
            received += 1;
        }
    }
    let during = scrape(&server).await;
    assert_eq!(
        value(
            &during,
            "tickerd_streams_active",
            &[("rpc", "TickerStream")]
        ),
        2.0
    );
    assert_eq!(value(&during, "tickerd_subscriptions_active", &[]), 2.0);
    assert!(value(&during, "tickerd_connections_active", &[]) >= 2.0);
    assert_eq!(
        value(&during, "tickerd_ticks_delivered_total", &[]),
        f64::from(received)
    );
    assert_eq!(
        value(
            &during,
            "tickerd_ticks_accepted_total",
            &[("source", "publish")]
        ),
        101.0
    );
    assert_eq!(value(&during, "tickerd_symbols_known", &[]), 1.0);
    let publish_ok = [
        ("method", "/ticker.v1.TickerStreamService/Publish"),
        ("code", "OK"),
    ];
    assert_eq!(value(&during, "tickerd_rpcs_total", &publish_ok), 2.0);
    assert!(value(&during, "tickerd_publish_to_send_seconds_count", &[]) >= 1.0);

    drop((a, b));
    let mut after = scrape(&server).await;
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    while value(&after, "tickerd_streams_active", &[("rpc", "TickerStream")]) != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "streams never closed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        after = scrape(&server).await;
    }
    assert_eq!(value(&after, "tickerd_subscriptions_active", &[]), 0.0);
    assert_eq!(
        value(
            &after,
            "tickerd_streams_ended_total",
            &[("reason", "client_cancel")]
        ),
        2.0
    );
    let cancelled = [
        ("method", "/ticker.v1.TickerStreamService/TickerStream"),
        ("code", "CANCELLED"),
    ];
    assert_eq!(value(&after, "tickerd_rpcs_total", &cancelled), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_shows_as_lag_and_in_streams() {
    let server = TestServer::with(|c| c.channel_capacity = 16).await;
    let mut client = server.client().await;
    publish(&mut client, ticks("LAG", 1)).await;
    let mut stalled = Stream::open(&mut server.client().await).await;
    stalled.subscribed("LAG").await;
    stalled.expect(Kind::Snapshot, "LAG").await;

    let (status, body) = server.http_get("/streams").await;
    assert_eq!(status, 200);
    let streams: Vec<StreamView> = serde_json::from_str(&body).expect(&body);
    assert_eq!(streams.len(), 1, "{body}");
    let s = &streams[0];
    assert_eq!(
        (s.rpc.as_str(), s.principal.as_str(), s.subscriptions),
        ("TickerStream", "anonymous", 1)
    );
    assert!(s.peer.starts_with("127.0.0.1:"), "{body}");

    // 40,000 ticks: more than the client's window and the channel can hold.
    publish(&mut client, ticks("LAG", 40_000)).await;
    let mut dropped = 0;
    let mut seq = 1;
    while seq < 40_001 {
        let msg = stalled.next().await;
        match msg.kind() {
            Kind::Lagged => dropped += msg.dropped,
            _ => seq = msg.seq,
        }
    }
    assert!(dropped > 0);
    let scrape = scrape(&server).await;
    assert_eq!(
        value(&scrape, "tickerd_ticks_dropped_total", &[]),
        dropped as f64
    );
    assert!(value(&scrape, "tickerd_lag_notices_total", &[]) >= 1.0);
    assert!(value(&scrape, "tickerd_ticks_overflowed_total", &[]) >= dropped as f64);
    let (_, body) = server.http_get("/streams").await;
    let streams: Vec<StreamView> = serde_json::from_str(&body).expect(&body);
    assert_eq!(streams[0].ticks_dropped, dropped, "{body}");
    assert_eq!(streams[0].ticks_sent + dropped, 40_000, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_turns_503_while_draining() {
    let mut server = TestServer::start().await;
    assert_eq!(
        server.http_get("/healthz").await,
        (200, "serving\n".to_string())
    );
    let mut client = server.client().await;
    publish(&mut client, ticks("H", 1)).await;
    // A stream that never gets a byte of window cannot be ended: it keeps the drain going
    // for the drain timeout.
    let mut stalled = Raw::connect(server.addr, &[(SETTINGS_INITIAL_WINDOW_SIZE, 0)]).await;
    stalled.open(1).await;
    let subscribe = TickerRequest::subscribe("H").encode_to_vec();
    let mut framed = vec![0];
    framed.extend((subscribe.len() as u32).to_be_bytes());
    framed.extend(subscribe);
    stalled.send(&frame(DATA, 0, 1, &framed)).await;
    common::eventually("the stalled stream is open", || {
        server.service.active_streams() == 1
    })
    .await;
    let mut reading = Stream::open(&mut client).await;
    reading.subscribed("H").await;
    publish(&mut client, ticks("H", 40_000)).await;

    let serving = server.shutdown();
    let status = end(&mut reading.rx).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        server.http_get("/healthz").await,
        (503, "draining\n".to_string())
    );
    assert_eq!(server.http_get("/nope").await.0, 404);
    within(serving).await.unwrap().unwrap();
    drop(stalled);
}

#[tokio::test]
async fn feed_ticks_and_per_symbol_series() {
    let server = TestServer::with(|c| {
        c.feed = tickerd::feed::FeedKind::Sim;
        c.symbols = 2;
        c.rate = 2000.0;
        c.metrics_per_symbol = true;
    })
    .await;
    // Wait for the simulator through a subscriber: its first tick proves the feed runs.
    let mut stream = Stream::open(&mut server.client().await).await;
    stream.subscribed("SYM1").await;
    while stream.next().await.kind() != Kind::Tick {}
    let s = scrape(&server).await;
    assert!(value(&s, "tickerd_ticks_accepted_total", &[("source", "feed")]) >= 1.0);
    assert_eq!(
        value(&s, "tickerd_ticks_accepted_total", &[("source", "publish")]),
        0.0
    );
    assert_eq!(value(&s, "tickerd_symbols_known", &[]), 2.0);
    assert_eq!(value(&s, "tickerd_feed_rate_ticks_per_second", &[]), 2000.0);
    assert!(value(&s, "tickerd_symbol_ticks_total", &[("symbol", "SYM1")]) >= 1.0);
    assert_eq!(
        value(&s, "tickerd_symbol_subscribers", &[("symbol", "SYM1")]),
        1.0
    );
}
