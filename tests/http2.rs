//! The connection's life on the server's own HTTP/2, seen from a raw client:
//! `--max-connection-age` sends GOAWAY `NO_ERROR` while the open stream goes on, and the
//! connection ends after the grace; at shutdown, GOAWAY and the stream's UNAVAILABLE
//! trailers.

mod common;

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
