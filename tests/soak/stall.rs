//! The abuse suite's minute-long case, run beside the soak (it takes as long): a client
//! that opens a stream on the real `tickerd` binary, subscribes to every simulated
//! symbol, grants itself all the window HTTP/2 allows and then never reads a byte, so
//! the server's writes fill the TCP window and stay stuck. Meanwhile a well-behaved
//! client on the same server receives every tick of every symbol without a gap, the
//! server's resident memory stays under `STALL_MEMORY_BOUND`, and the server answers.
//! The server's answer to the stalled client: its stream falls behind its own ring
//! (counted dropped in /streams), then the HTTP/2 keepalive (PING unanswered, 30 s +
//! 10 s by default) closes the connection and /streams/ended shows why.
//! `TICKERD_STALL_SECONDS` (default 60) sets how long the client stalls.

use std::{collections::HashMap, time::Duration};

use tickerd::{client::Kind, ops::metrics::StreamView, pb::TickerRequest};

use super::common::{
    self,
    h2raw::{frame, grpc_message, Raw, DATA, SETTINGS_INITIAL_WINDOW_SIZE, WINDOW_UPDATE},
    Stream, TickerdProcess,
};
use prost::Message;

/// Ticks kept per symbol for a laggard: the stalled stream's whole cost is at most
/// this many ticks of each of its symbols (about 200 bytes each), not a byte more
/// however long it stalls.
const CHANNEL_CAPACITY: usize = 256;
/// The server process's resident memory stays under this while the client stalls.
const STALL_MEMORY_BOUND: u64 = 64 * 1024 * 1024;
const SYMBOLS: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: tests/run.sh runs it beside the soak"]
async fn a_client_that_never_reads_for_a_minute_hurts_nobody() {
    let seconds = super::env_or("TICKERD_STALL_SECONDS", 60);
    let server = TickerdProcess::spawn(&[
        "--metrics-listen",
        "127.0.0.1:0",
        "--symbols",
        &SYMBOLS.to_string(),
        "--rate",
        "20000",
        "--channel-capacity",
        &CHANNEL_CAPACITY.to_string(),
    ])
    .await;
    let metrics = server.metrics_addr.expect("metrics endpoint");
    let symbols: Vec<String> = (0..SYMBOLS).map(|i| format!("SYM{i:02}")).collect();

    // The well-behaved client: every symbol, every tick.
    let mut client = tickerd::client::Client::connect(server.url())
        .await
        .expect("connect");
    let mut good = Stream::open(&mut client).await;
    for s in &symbols {
        good.subscribe(s).await;
    }

    // The stalled client: all the window there is, every symbol, then silence.
    let mut stuck = Raw::connect(server.addr, &[(SETTINGS_INITIAL_WINDOW_SIZE, 0x7fff_ffff)]).await;
    stuck
        .send(&frame(WINDOW_UPDATE, 0, 0, &0x7fff_0000u32.to_be_bytes()))
        .await;
    stuck.open(1).await;
    for s in &symbols {
        stuck
            .send(&frame(
                DATA,
                0,
                1,
                &grpc_message(&TickerRequest::subscribe(s.as_str()).encode_to_vec()),
            ))
            .await;
    }
    let stuck_peer = stuck.socket.local_addr().expect("local addr").to_string();

    let until = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let mut last: HashMap<String, u64> = HashMap::new();
    let (mut ticks, mut peak) = (0u64, 0u64);
    let mut next_probe = tokio::time::Instant::now();
    while tokio::time::Instant::now() < until {
        let msg = good.next().await;
        match msg.kind() {
            Kind::Subscribed => {}
            Kind::Snapshot => {
                last.insert(msg.symbol.clone(), msg.seq);
            }
            Kind::Tick => {
                let before = last.get(&msg.symbol).copied();
                assert!(
                    before.is_none_or(|b| msg.seq == b + 1),
                    "{}: seq {} after {before:?}: the well-behaved client missed a tick",
                    msg.symbol,
                    msg.seq
                );
                last.insert(msg.symbol.clone(), msg.seq);
                ticks += 1;
            }
            other => panic!("the well-behaved client got {other:?}: {msg:?}"),
        }
        if tokio::time::Instant::now() >= next_probe {
            next_probe += Duration::from_secs(1);
            peak = peak.max(rss(server.child.id()));
        }
    }
    // The stalled stream fell behind its rings: the ticks it never took were dropped
    // from them (the stream announces the exact count when it next reads).
    let (_, body) = common::http_get(metrics, "/metrics").await;
    let overflowed = body
        .lines()
        .find_map(|l| {
            l.strip_prefix("tickerd_ticks_overflowed_total ")?
                .parse::<f64>()
                .ok()
        })
        .expect("tickerd_ticks_overflowed_total") as u64;
    eprintln!(
        "stall: {seconds} s; the well-behaved client got {ticks} ticks in order; \
         server peak resident memory {} MiB; {overflowed} ticks dropped from the stalled stream's rings",
        peak >> 20
    );
    assert!(ticks > seconds * 1000, "the feed ran: {ticks} ticks");
    assert!(
        peak < STALL_MEMORY_BOUND,
        "the server's resident memory peaked at {peak} bytes"
    );
    assert!(overflowed > 0, "the stalled stream fell behind its rings");
    // The server still answers.
    let quotes = common::quotes(&mut client, &["SYM00"]).await;
    assert_eq!(quotes.len(), 1);
    // Keepalive ended the stalled connection, and /streams/ended says so.
    if seconds >= 45 {
        let (_, body) = common::http_get(metrics, "/streams/ended").await;
        let ended: Vec<StreamView> = serde_json::from_str(&body).expect("/streams/ended JSON");
        let view = ended.iter().find(|v| v.peer == stuck_peer);
        assert!(
            view.is_some(),
            "keepalive closed the stalled connection within {seconds} s: {body}"
        );
        eprintln!("stall: the stalled stream ended: {view:?}");
    }
}

/// A process's resident memory, from /proc.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}
