//! Delivery guarantees: resume after reconnect (inside and outside the history, across
//! an epoch change), CONFLATE, STRICT and mixed policies on one stream.

use crate::common;

use std::time::{Duration, Instant};

use common::{next, publish, ticks, within, Stream, TestServer};
use tickerd::{
    client::{self, Kind},
    pb::{PublishRequest, TickerRequest, TickerResponse},
};
use tonic::Code;

/// Price of the `i`-th published tick in these tests: varied, so high/low mean something.
fn price(i: u64) -> f64 {
    100.0 + ((i * 37) % 101) as f64 / 4.0
}

fn priced(symbol: &str, from: u64, to: u64) -> Vec<PublishRequest> {
    (from..=to)
        .map(|i| PublishRequest::new(symbol, price(i)))
        .collect()
}

/// Receives ticks of `symbol` and checks they are exactly seqs `from..=to`, in order.
async fn expect_seqs(stream: &mut Stream, symbol: &str, from: u64, to: u64) {
    for seq in from..=to {
        let t = stream.expect(Kind::Tick, symbol).await;
        assert_eq!(t.seq, seq, "no gap and no duplicate");
        assert_eq!(t.ltp, price(seq));
    }
}

#[tokio::test]
async fn a_reconnect_inside_the_history_resumes_without_gap_or_duplicate() {
    let server = TestServer::start().await;
    let mut publisher = server.client().await;
    publish(&mut publisher, priced("RES", 1, 5)).await;
    let mut first = Stream::open(&mut server.client().await).await;
    first.subscribed("RES").await;
    let snap = first.expect(Kind::Snapshot, "RES").await;
    assert_eq!(snap.seq, 5);
    assert_ne!(snap.epoch, 0, "ticks carry their epoch");
    publish(&mut publisher, priced("RES", 6, 8)).await;
    expect_seqs(&mut first, "RES", 6, 8).await;
    let epoch = snap.epoch;
    drop(first);

    // Missed while disconnected: 9..=30.
    publish(&mut publisher, priced("RES", 9, 30)).await;
    let mut second = Stream::open(&mut server.client().await).await;
    second
        .send(TickerRequest::subscribe("RES").resume(epoch, 8))
        .await;
    let ack = second.expect(Kind::Subscribed, "RES").await;
    assert!(ack.recovered, "{ack:?}");
    assert_eq!((ack.epoch, ack.seq), (epoch, 30));
    expect_seqs(&mut second, "RES", 9, 30).await;
    publish(&mut publisher, priced("RES", 31, 35)).await;
    expect_seqs(&mut second, "RES", 31, 35).await;
}

#[tokio::test]
async fn a_resume_outside_the_history_says_not_recovered_and_sends_a_snapshot() {
    let server = TestServer::with(|c| c.history_size = 10).await;
    let mut publisher = server.client().await;
    publish(&mut publisher, priced("OLD", 1, 5)).await;
    let epoch = server.hub.epoch();
    publish(&mut publisher, priced("OLD", 6, 40)).await;
    let mut stream = Stream::open(&mut server.client().await).await;
    stream
        .send(TickerRequest::subscribe("OLD").resume(epoch, 5))
        .await;
    let ack = stream.expect(Kind::Subscribed, "OLD").await;
    assert!(!ack.recovered);
    let snap = stream.expect(Kind::Snapshot, "OLD").await;
    assert_eq!(snap.seq, 40, "the client sees 35 ticks are gone");
    // Inside the 10 kept, it recovers.
    let mut near = Stream::open(&mut server.client().await).await;
    near.send(TickerRequest::subscribe("OLD").resume(epoch, 31))
        .await;
    assert!(near.expect(Kind::Subscribed, "OLD").await.recovered);
    expect_seqs(&mut near, "OLD", 32, 40).await;
}

#[tokio::test]
async fn an_epoch_change_is_detected() {
    let before = TestServer::start().await;
    publish(&mut before.client().await, priced("EPO", 1, 5)).await;
    let old_epoch = before.hub.epoch();
    // A restarted server: a new hub, its seqs start again.
    let after = TestServer::start().await;
    publish(&mut after.client().await, priced("EPO", 1, 7)).await;
    let mut stream = Stream::open(&mut after.client().await).await;
    stream
        .send(TickerRequest::subscribe("EPO").resume(old_epoch, 5))
        .await;
    let ack = stream.expect(Kind::Subscribed, "EPO").await;
    assert!(!ack.recovered);
    assert_ne!(ack.epoch, old_epoch);
    let snap = stream.expect(Kind::Snapshot, "EPO").await;
    assert_eq!((snap.seq, snap.epoch), (7, ack.epoch));
}

/// Publishes `rate` ticks/s of `symbol` for `for_how_long`, in 1 ms steps; returns
/// the count.
async fn paced(server: &TestServer, symbol: &str, rate: u64, for_how_long: Duration) -> u64 {
    let per_ms = rate / 1000;
    let mut interval = tokio::time::interval(Duration::from_millis(1));
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < for_how_long {
        interval.tick().await;
        for _ in 0..per_ms {
            n += 1;
            server.hub.publish(symbol, price(n), 0).unwrap();
        }
    }
    n
}

/// Reads CONFLATE messages of `symbol` until they cover seq `upto`, checking that the
/// ranges are consecutive from `after + 1` and their counts, high and low are right
/// (seq `s` was published at `price(s - shift)`).
async fn conflated_upto(
    stream: &mut Stream,
    symbol: &str,
    after: u64,
    upto: u64,
    shift: u64,
) -> usize {
    let mut covered = after;
    let mut messages = 0;
    while covered < upto {
        let m: TickerResponse = stream.expect(Kind::Tick, symbol).await;
        assert_eq!(m.first_seq, covered + 1, "consecutive ranges: {m:?}");
        assert_eq!(m.count, m.seq - m.first_seq + 1);
        let prices: Vec<f64> = (m.first_seq - shift..=m.seq - shift).map(price).collect();
        let high = prices.iter().cloned().fold(f64::MIN, f64::max);
        let low = prices.iter().cloned().fold(f64::MAX, f64::min);
        assert_eq!((m.high, m.low, m.ltp), (high, low, price(m.seq - shift)));
        covered = m.seq;
        messages += 1;
    }
    assert_eq!(covered, upto);
    messages
}

#[tokio::test]
async fn conflate_at_5hz_folds_a_5000_per_second_symbol_losing_nothing() {
    let server = TestServer::start().await;
    server.hub.publish("FAST", price(0), 0).unwrap();
    let mut stream = Stream::open(&mut server.client().await).await;
    stream
        .send(TickerRequest::subscribe("FAST").conflate(5.0))
        .await;
    stream.expect(Kind::Subscribed, "FAST").await;
    stream.expect(Kind::Snapshot, "FAST").await;
    let start = Instant::now();
    let published = paced(&server, "FAST", 5000, Duration::from_millis(1200)).await;
    // Seq 1 was the snapshot's tick (price(0)); the paced ones are seqs 2..=published+1,
    // priced price(1).. — shift the check accordingly.
    // Seq 1 was the snapshot's tick (price(0)); the paced ones are seqs 2..=n+1 at
    // price(seq - 1).
    let messages = conflated_upto(&mut stream, "FAST", 1, published + 1, 1).await;
    let elapsed = start.elapsed().as_secs_f64();
    assert!(published > 3000, "the publisher kept its pace: {published}");
    assert!(
        messages >= 3 && (messages as f64) <= elapsed * 5.0 + 2.0,
        "{messages} messages in {elapsed:.2}s at 5 Hz"
    );
}

#[tokio::test]
async fn strict_ends_a_stalled_stream_with_the_last_seq_delivered() {
    let server = TestServer::with(|c| c.channel_capacity = 64).await;
    server.hub.publish("STR", 1.0, 0).unwrap();
    // tonic's default 64 KiB windows, so a stalled reader really stops the server.
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = client::Client::new(channel);
    let mut stream = Stream::open(&mut client).await;
    stream.send(TickerRequest::subscribe("STR").strict()).await;
    stream.expect(Kind::Subscribed, "STR").await;
    stream.expect(Kind::Snapshot, "STR").await;
    // Not reading while 20,000 ticks (far more than window + channel) go out.
    publish(&mut server.client().await, ticks("STR", 20_000)).await;
    let mut last = 1;
    let status = loop {
        match within(stream.rx.message()).await {
            Ok(Some(m)) if m.kind() == Kind::Tick => {
                assert_eq!(m.seq, last + 1, "STRICT never skips");
                last = m.seq;
            }
            Ok(Some(m)) => assert_eq!(m.kind(), Kind::Backlog, "{m:?}"),
            Ok(None) => panic!("ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status
            .message()
            .contains(&format!("last seq delivered {last} in epoch")),
        "{} (last received {last})",
        status.message()
    );
    assert!(last < 20_001);
    let (_, metrics) = server.http_get("/metrics").await;
    assert!(
        metrics.contains(r#"tickerd_streams_ended_total{reason="slow_consumer"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn policies_mix_on_one_stream_and_can_be_switched() {
    let server = TestServer::start().await;
    for s in ["ALLS", "CONF", "STRI"] {
        server.hub.publish(s, price(0), 0).unwrap();
    }
    let mut stream = Stream::open(&mut server.client().await).await;
    stream.subscribed("ALLS").await;
    stream.expect(Kind::Snapshot, "ALLS").await;
    stream
        .send(TickerRequest::subscribe("CONF").conflate(20.0))
        .await;
    stream.expect(Kind::Subscribed, "CONF").await;
    stream.expect(Kind::Snapshot, "CONF").await;
    stream.send(TickerRequest::subscribe("STRI").strict()).await;
    stream.expect(Kind::Subscribed, "STRI").await;
    stream.expect(Kind::Snapshot, "STRI").await;

    let mut publisher = server.client().await;
    let mut batch = Vec::new();
    for i in 1..=50 {
        for s in ["ALLS", "CONF", "STRI"] {
            batch.push(PublishRequest::new(s, price(i)));
        }
    }
    publish(&mut publisher, batch).await;
    let (mut alls, mut stri, mut conf) = (1, 1, 1);
    while alls < 51 || stri < 51 || conf < 51 {
        let m = next(&mut stream.rx).await;
        assert_eq!(m.kind(), Kind::Tick, "{m:?}");
        match m.symbol.as_str() {
            "ALLS" | "STRI" => {
                let last = if m.symbol == "ALLS" {
                    &mut alls
                } else {
                    &mut stri
                };
                assert_eq!((m.seq, m.count), (*last + 1, 0), "every tick, unfolded");
                *last = m.seq;
            }
            _ => {
                assert_eq!(m.first_seq, conf + 1, "consecutive ranges");
                assert!(m.count >= 1);
                conf = m.seq;
            }
        }
    }

    // Switch ALLS to CONFLATE: the next range starts right after what was delivered.
    stream
        .send(TickerRequest::subscribe("ALLS").conflate(20.0))
        .await;
    let ack = stream.expect(Kind::Subscribed, "ALLS").await;
    assert_eq!(ack.detail, "policy CONFLATE");
    assert!(ack.recovered);
    publish(&mut publisher, priced("ALLS", 51, 80)).await;
    let folded = conflated_upto(&mut stream, "ALLS", 51, 81, 1).await;
    assert!(folded >= 1);
    // And back to ALL: every tick again, from the next seq.
    stream.subscribed("ALLS").await;
    publish(&mut publisher, priced("ALLS", 81, 85)).await;
    for seq in 82..=86 {
        let t = stream.expect(Kind::Tick, "ALLS").await;
        assert_eq!((t.seq, t.count), (seq, 0));
    }
    // A CONFLATE without a rate is refused in-band.
    stream
        .send(TickerRequest::subscribe("CONF").conflate(0.0))
        .await;
    let r = stream.expect(Kind::Rejected, "CONF").await;
    assert!(r.detail.contains("max_rate_hz"), "{}", r.detail);
}
