//! TickerStream (bidirectional) semantics against a real server and tonic client.

use crate::common;

use common::{publish, ticks, Stream, TestServer};
use tickerd::{
    client::Kind,
    clock,
    pb::{PublishRequest, TickerRequest},
};

#[tokio::test]
async fn subscribe_acks_then_snapshot_then_newer_live_ticks() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    publish(&mut client, ticks("AAPL", 3)).await;

    let mut stream = Stream::open(&mut client).await;
    stream.subscribe("AAPL").await;
    stream.expect(Kind::Subscribed, "AAPL").await;
    let snap = stream.expect(Kind::Snapshot, "AAPL").await;
    assert_eq!((snap.seq, snap.ltp), (3, 3.0));
    assert_eq!(
        snap.timestamp,
        clock::rfc3339_nanos(snap.event_time_unix_nanos)
    );

    let stamped = 1_700_000_000_123_456_789;
    let mut more = ticks("AAPL", 1);
    more.push(PublishRequest {
        symbol: "AAPL".into(),
        ltp: 9.5,
        event_time_unix_nanos: stamped,
    });
    publish(&mut client, more).await;
    let t4 = stream.expect(Kind::Tick, "AAPL").await;
    assert_eq!(t4.seq, 4);
    assert!(
        t4.timestamp.ends_with('Z') && t4.timestamp.contains('.'),
        "{}",
        t4.timestamp
    );
    assert_eq!(t4.timestamp, clock::rfc3339_nanos(t4.event_time_unix_nanos));
    let t5 = stream.expect(Kind::Tick, "AAPL").await;
    assert_eq!(
        (t5.seq, t5.ltp, t5.event_time_unix_nanos),
        (5, 9.5, stamped)
    );
    assert_eq!(t5.timestamp, "2023-11-14T22:13:20.123456789Z");
}

#[tokio::test]
async fn subscribing_mid_flow_sees_ack_snapshot_and_no_gap_or_overlap() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    publish(&mut client, ticks("FLOW", 1)).await;
    // A publisher keeps ticking while the subscription is made.
    let mut publisher = client.clone();
    let feeding = tokio::spawn(async move { publish(&mut publisher, ticks("FLOW", 3000)).await });

    let mut stream = Stream::open(&mut client).await;
    stream.subscribe("FLOW").await;
    stream.expect(Kind::Subscribed, "FLOW").await;
    let snap = stream.expect(Kind::Snapshot, "FLOW").await;
    assert_eq!(feeding.await.unwrap().accepted, 3000);
    let mut expected = snap.seq + 1;
    while expected <= 3001 {
        let tick = stream.expect(Kind::Tick, "FLOW").await;
        assert_eq!(
            tick.seq, expected,
            "live ticks continue right after the snapshot"
        );
        expected += 1;
    }
}

#[tokio::test]
async fn unknown_symbol_waits_for_first_tick_only_when_allowed() {
    let strict = TestServer::start().await;
    let mut stream = Stream::open(&mut strict.client().await).await;
    stream.subscribe("NEW").await;
    let reject = stream.expect(Kind::Rejected, "NEW").await;
    assert_eq!(reject.detail, "unknown symbol");

    let lenient = TestServer::with(|c| c.allow_unknown_symbols = true).await;
    let mut client = lenient.client().await;
    let mut stream = Stream::open(&mut client).await;
    stream.subscribe("NEW").await;
    stream.expect(Kind::Subscribed, "NEW").await;
    publish(&mut client, ticks("NEW", 1)).await;
    let first = stream.expect(Kind::Tick, "NEW").await;
    assert_eq!(first.seq, 1, "no snapshot for a symbol that never ticked");
}

#[tokio::test]
async fn duplicate_subscribe_is_acked_and_never_doubles_delivery() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    publish(&mut client, ticks("DUP", 1)).await;
    publish(&mut client, ticks("END", 1)).await;
    let mut stream = Stream::open(&mut client).await;
    stream.subscribe("DUP").await;
    stream.expect(Kind::Subscribed, "DUP").await;
    stream.expect(Kind::Snapshot, "DUP").await;
    stream.subscribe("DUP").await;
    stream.expect(Kind::Subscribed, "DUP").await;
    stream.subscribe("END").await;
    stream.expect(Kind::Subscribed, "END").await;
    stream.expect(Kind::Snapshot, "END").await;

    publish(&mut client, ticks("DUP", 3)).await;
    publish(&mut client, ticks("END", 1)).await;
    let mut seen = Vec::new();
    loop {
        let msg = stream.next().await;
        if msg.symbol == "END" {
            break;
        }
        assert_eq!(msg.kind(), Kind::Tick);
        seen.push(msg.seq);
    }
    assert_eq!(seen, vec![2, 3, 4]);
}

#[tokio::test]
async fn unsubscribe_acks_and_stops_delivery() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    publish(&mut client, ticks("GONE", 1)).await;
    publish(&mut client, ticks("STAY", 1)).await;
    let mut stream = Stream::open(&mut client).await;
    for s in ["GONE", "STAY"] {
        stream.subscribe(s).await;
        stream.expect(Kind::Subscribed, s).await;
        stream.expect(Kind::Snapshot, s).await;
    }
    stream.unsubscribe("GONE").await;
    stream.expect(Kind::Unsubscribed, "GONE").await;
    // Not subscribed at all: acked all the same.
    stream.unsubscribe("NEVER").await;
    stream.expect(Kind::Unsubscribed, "NEVER").await;

    publish(&mut client, ticks("GONE", 5)).await;
    publish(&mut client, ticks("STAY", 1)).await;
    let next = stream.next().await;
    assert_eq!(
        (next.kind(), next.symbol.as_str(), next.seq),
        (Kind::Tick, "STAY", 2)
    );
    assert_eq!(server.hub.receiver_count("GONE"), 0);
}

#[tokio::test]
async fn bad_requests_are_rejected_in_band_and_the_stream_stays_usable() {
    let server = TestServer::with(|c| c.max_subscriptions_per_stream = 2).await;
    let mut client = server.client().await;
    publish(
        &mut client,
        vec![PublishRequest::new("A", 1.0), PublishRequest::new("B", 1.0)],
    )
    .await;
    publish(&mut client, ticks("C", 1)).await;
    let mut stream = Stream::open(&mut client).await;

    let long = "X".repeat(33);
    for (symbol, why) in [
        ("", "invalid symbol: empty"),
        ("BAD SYM", "not allowed"),
        (long.as_str(), "at most 32"),
        ("ZZZ", "unknown symbol"),
    ] {
        stream.subscribe(symbol).await;
        let r = stream.expect(Kind::Rejected, symbol).await;
        assert!(r.detail.contains(why), "{symbol:?}: {}", r.detail);
    }
    stream
        .send(TickerRequest {
            symbol: "A".into(),
            action: 9,
            ..TickerRequest::default()
        })
        .await;
    let r = stream.expect(Kind::Rejected, "A").await;
    assert!(r.detail.contains("unknown action 9"), "{}", r.detail);

    // Bare symbol (ACTION_UNSPECIFIED) subscribes.
    stream
        .send(TickerRequest {
            symbol: "A".into(),
            action: 0,
            ..TickerRequest::default()
        })
        .await;
    stream.expect(Kind::Subscribed, "A").await;
    stream.expect(Kind::Snapshot, "A").await;
    stream.subscribe("B").await;
    stream.expect(Kind::Subscribed, "B").await;
    stream.expect(Kind::Snapshot, "B").await;
    stream.subscribe("C").await;
    let r = stream.expect(Kind::Rejected, "C").await;
    assert!(
        r.detail
            .contains("too many subscriptions on this stream (limit 2)"),
        "{}",
        r.detail
    );

    publish(&mut client, ticks("A", 1)).await;
    let t = stream.expect(Kind::Tick, "A").await;
    assert_eq!(t.seq, 2);
}

#[tokio::test]
async fn symbol_limit_rejects_new_symbols_visibly() {
    let server = TestServer::with(|c| {
        c.max_symbols = 2;
        c.allow_unknown_symbols = true;
    })
    .await;
    let mut client = server.client().await;
    let counts = publish(
        &mut client,
        vec![
            PublishRequest::new("S1", 1.0),
            PublishRequest::new("S2", 1.0),
            PublishRequest::new("S3", 1.0),
        ],
    )
    .await;
    assert_eq!((counts.accepted, counts.rejected), (2, 1));
    let mut stream = Stream::open(&mut client).await;
    stream.subscribe("S4").await;
    let r = stream.expect(Kind::Rejected, "S4").await;
    assert!(
        r.detail.contains("symbol limit reached (2 symbols)"),
        "{}",
        r.detail
    );
}

#[tokio::test]
async fn half_close_keeps_ticks_flowing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    publish(&mut client, ticks("HC", 1)).await;
    let mut stream = Stream::open(&mut client).await;
    stream.subscribe("HC").await;
    stream.expect(Kind::Subscribed, "HC").await;
    stream.expect(Kind::Snapshot, "HC").await;
    stream.half_close();
    publish(&mut client, ticks("HC", 2)).await;
    assert_eq!(stream.expect(Kind::Tick, "HC").await.seq, 2);
    assert_eq!(stream.expect(Kind::Tick, "HC").await.seq, 3);
}

#[tokio::test]
async fn every_stream_sees_the_same_seq_for_the_same_tick() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut other = server.client().await;
    publish(&mut client, ticks("SAME", 1)).await;
    let mut a = Stream::open(&mut client).await;
    let mut b = Stream::open(&mut other).await;
    for s in [&mut a, &mut b] {
        s.subscribe("SAME").await;
        s.expect(Kind::Subscribed, "SAME").await;
        s.expect(Kind::Snapshot, "SAME").await;
    }
    publish(&mut client, vec![PublishRequest::new("SAME", 42.0)]).await;
    let (ta, tb) = (
        a.expect(Kind::Tick, "SAME").await,
        b.expect(Kind::Tick, "SAME").await,
    );
    assert_eq!(ta, tb);
    assert_eq!((ta.seq, ta.ltp), (2, 42.0));
}
