//! The connection's life on the server's own HTTP/2, seen from a raw client:
//! `--max-connection-age` sends GOAWAY `NO_ERROR` while the open stream goes on, and the
//! connection ends after the grace; at shutdown, GOAWAY and the stream's UNAVAILABLE
//! trailers; a stream window smaller than a message; the stream window given back in
//! quarter-window steps.

use crate::common;

use std::time::Duration;

use common::{h2raw::*, TestServer};
use prost::Message as _;
use tickerd::{pb::TickerRequest, server::Http2};

const WAIT: Duration = Duration::from_secs(10);

fn subscribe(symbol: &str) -> Vec<u8> {
    let msg = TickerRequest::subscribe(symbol).encode_to_vec();
    let mut framed = vec![0];
    framed.extend((msg.len() as u32).to_be_bytes());
    framed.extend(msg);
    framed
}

/// Reads until the connection ends; the frame kinds seen on the way.
async fn until_closed(raw: &mut Raw, within: Duration) -> Vec<u8> {
    let until = tokio::time::Instant::now() + within;
    let mut kinds = Vec::new();
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        assert!(!left.is_zero(), "the connection outlived {within:?}");
        match raw.next_frame(left).await {
            Some((kind, ..)) => kinds.push(kind),
            None => return kinds,
        }
    }
}

async fn an_old_connection_is_told_to_go_then_closed(http2: Http2) {
    let server = TestServer::with(|c| {
        c.http2 = http2;
        c.max_connection_age = Some(Duration::from_secs(1));
        c.max_connection_age_jitter = 0.0;
        c.max_connection_age_grace = Duration::from_secs(1);
    })
    .await;
    let started = tokio::time::Instant::now();
    let mut raw = Raw::connect(server.addr, &[]).await;
    raw.open(1).await;
    raw.send(&frame(DATA, 0, 1, &subscribe("AGE"))).await;
    assert_eq!(raw.goaway(WAIT).await, Some(NO_ERROR));
    let told = started.elapsed();
    assert!(told >= Duration::from_millis(900), "GOAWAY after {told:?}");
    // The open stream is not cut at the GOAWAY: the connection lasts until the grace ends.
    until_closed(&mut raw, WAIT).await;
    let closed = started.elapsed();
    assert!(
        closed >= told + Duration::from_millis(800),
        "closed {:?} after the GOAWAY, before the grace",
        closed - told
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connection_age_on_the_servers_own_http2() {
    an_old_connection_is_told_to_go_then_closed(Http2::Tickerd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connection_age_on_hyper() {
    an_old_connection_is_told_to_go_then_closed(Http2::Hyper).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_goaway_and_ends_the_stream_with_unavailable() {
    let mut server = TestServer::with(|c| c.http2 = Http2::Tickerd).await;
    let mut raw = Raw::connect(server.addr, &[]).await;
    raw.open(1).await;
    raw.send(&frame(DATA, 0, 1, &subscribe("BYE"))).await;
    common::eventually("the stream is open", || {
        server.service.active_streams() == 1
    })
    .await;
    let serving = server.shutdown();
    let mut saw_goaway = false;
    let mut trailers_end = false;
    let until = tokio::time::Instant::now() + WAIT;
    while let Some((kind, flags, stream, payload)) = raw
        .next_frame(until.saturating_duration_since(tokio::time::Instant::now()))
        .await
    {
        if kind == GOAWAY {
            saw_goaway = true;
        }
        if kind == HEADERS && stream == 1 && flags & END_STREAM != 0 {
            // grpc-status 14 (UNAVAILABLE), as a literal in the trailers.
            trailers_end = payload.windows(2).any(|w| w == b"14");
        }
    }
    serving.await.expect("serve task").expect("a clean stop");
    assert!(saw_goaway, "no GOAWAY at shutdown");
    assert!(
        trailers_end,
        "the stream did not end with UNAVAILABLE trailers"
    );
}

/// A stream window smaller than a message: what fits goes straight into the
/// connection's buffer, what does not is split over DATA frames as the window opens,
/// and the client reassembles every tick once, in order, never past its window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_smaller_than_a_message_splits_it_and_loses_nothing() {
    use tickerd::pb::{ticker_response::Kind, TickerResponse};
    const WINDOW: u32 = 100;
    const TICKS: usize = 60;
    let server = TestServer::start().await;
    let mut client = server.client().await;
    common::publish(&mut client, common::ticks("SPLIT", 1)).await;
    let mut raw = Raw::connect(server.addr, &[(SETTINGS_INITIAL_WINDOW_SIZE, WINDOW)]).await;
    raw.open(1).await;
    raw.send(&frame(DATA, 0, 1, &subscribe("SPLIT"))).await;

    let mut bytes = Vec::new();
    let mut messages = Vec::new();
    let mut window = i64::from(WINDOW);
    let mut published = false;
    let until = tokio::time::Instant::now() + WAIT;
    while messages
        .iter()
        .filter(|m: &&TickerResponse| m.kind() == Kind::Tick)
        .count()
        < TICKS
    {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let Some((kind, _, stream, payload)) = raw.next_frame(left).await else {
            panic!("{} of {TICKS} ticks before the end", messages.len());
        };
        if kind != DATA || stream != 1 {
            continue;
        }
        window -= payload.len() as i64;
        assert!(window >= 0, "a DATA frame past the stream's window");
        bytes.extend_from_slice(&payload);
        messages.extend(take_messages(&mut bytes));
        if !published && messages.iter().any(|m| m.kind() == Kind::Subscribed) {
            // Many ticks queued at once, so the window, not the feed, decides the frames.
            common::publish(&mut client, common::ticks("SPLIT", TICKS)).await;
            published = true;
        }
        // Grant back only what this frame took: the window stays under a message's
        // size, so messages keep straddling its edge.
        let grant = payload.len() as u32;
        raw.send(&frame(WINDOW_UPDATE, 0, 1, &grant.to_be_bytes()))
            .await;
        raw.send(&frame(WINDOW_UPDATE, 0, 0, &grant.to_be_bytes()))
            .await;
        window += i64::from(grant);
    }
    let seqs: Vec<u64> = messages
        .iter()
        .filter(|m| m.kind() == Kind::Tick)
        .map(|m| m.seq)
        .collect();
    let first = seqs[0];
    assert_eq!(
        seqs,
        (first..first + TICKS as u64).collect::<Vec<_>>(),
        "every tick once, in order"
    );
}

/// A client sending a steady trickle (a Subscribe per round trip here; a feed's ticks on
/// a Publish call) gets its stream window back in quarter-window steps, not a
/// WINDOW_UPDATE per frame read: each would cost the server a write and wake the client.
/// Once it has sent more than a quarter of the window, it gets that back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_window_comes_back_in_quarters_not_per_frame() {
    use tickerd::pb::{ticker_response::Kind, PublishRequest};
    let server = TestServer::start().await;
    let mut raw = Raw::connect(server.addr, &[]).await;
    raw.open(1).await;
    let (mut updates, mut answers, mut bytes) = (0, 0, Vec::new());
    for i in 0..20 {
        raw.send(&frame(DATA, 0, 1, &subscribe(&format!("Q{i}"))))
            .await;
        // Until its answer: the service has read the request by then.
        while answers <= i {
            let (kind, _, stream, payload) = raw.next_frame(WAIT).await.expect("an answer");
            match (kind, stream) {
                (WINDOW_UPDATE, 1) => updates += 1,
                (DATA, 1) => {
                    bytes.extend_from_slice(&payload);
                    answers += take_messages(&mut bytes)
                        .iter()
                        .filter(|m| matches!(m.kind(), Kind::Subscribed | Kind::Rejected))
                        .count();
                }
                _ => {}
            }
        }
    }
    // A PING's answer comes after anything the server queued before it.
    raw.send(&frame(PING, 0, 0, &[7; 8])).await;
    loop {
        let (kind, flags, stream, _) = raw.next_frame(WAIT).await.expect("the PING's answer");
        match (kind, stream) {
            (WINDOW_UPDATE, 1) => updates += 1,
            (PING, 0) if flags & 1 == 1 => break,
            _ => {}
        }
    }
    assert_eq!(updates, 0, "stream WINDOW_UPDATEs for 20 small requests");

    // 320 KB of ticks on a Publish call, more than a quarter of the 1 MiB window.
    let mut body = Vec::new();
    let mut i = 0;
    while body.len() < 320_000 {
        body.extend(grpc_message(
            &PublishRequest::new("QUARTER", f64::from(i)).encode_to_vec(),
        ));
        i += 1;
    }
    raw.send(&frame(HEADERS, END_HEADERS, 3, &grpc_headers("Publish")))
        .await;
    for chunk in body.chunks(16_384) {
        raw.send(&frame(DATA, 0, 3, chunk)).await;
    }
    let granted = loop {
        let (kind, _, stream, payload) = raw
            .next_frame(WAIT)
            .await
            .expect("the Publish stream's window back");
        if (kind, stream) == (WINDOW_UPDATE, 3) {
            break u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
        }
    };
    assert!(
        (256 * 1024..=320_000).contains(&granted),
        "a first grant of {granted} bytes"
    );
}
