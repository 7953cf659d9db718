//! Slow and stalled consumers never delay the publisher or other clients; what a stream
//! misses is always visible to it (KIND_LAGGED with the exact count, then a seq gap).
//! The stalled and slow clients are plain tonic channels with default settings, so the
//! h2 client's small-DATA-frame guard (h2 >= 0.4.16) is in force.

use crate::common;

use common::{next, publish, ticks, within, Stream, TestServer};
use tickerd::{
    client::{Client, Kind},
    pb::{ticker_stream_service_client::TickerStreamServiceClient, TickerResponse},
};
use tonic::{transport::Channel, Streaming};

const TICKS: u64 = 50_000;
const CHUNK: u64 = 1000;

async fn default_tonic_client(server: &TestServer) -> Client {
    let channel = Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    TickerStreamServiceClient::new(channel)
}

/// Reads `symbol` until `last_seq`, checking the delivery rules on the way: seq only
/// increases, and a gap comes only right after a KIND_LAGGED whose `dropped` is the
/// gap. Returns (ticks received, ticks reported dropped).
async fn read_until(
    rx: &mut Streaming<TickerResponse>,
    symbol: &str,
    mut seq: u64,
    last_seq: u64,
) -> (u64, u64) {
    let (mut received, mut dropped) = (0, 0);
    let mut announced_gap = 0;
    while seq < last_seq {
        let msg = next(rx).await;
        assert_eq!(msg.symbol, symbol);
        match msg.kind() {
            Kind::Lagged => {
                assert!(msg.dropped > 0);
                announced_gap = msg.dropped;
                dropped += msg.dropped;
            }
            Kind::Tick => {
                assert_eq!(
                    msg.seq,
                    seq + 1 + announced_gap,
                    "gap must equal the lag notice just before it"
                );
                announced_gap = 0;
                seq = msg.seq;
                received += 1;
            }
            other => panic!("unexpected {other:?}: {msg:?}"),
        }
    }
    (received, dropped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_delays_nobody_and_sees_its_loss_on_resume() {
    let server = TestServer::with(|c| c.channel_capacity = 4096).await;
    let mut publisher = server.client().await;
    publish(&mut publisher, ticks("HOT", 1)).await;

    let mut stalled = Stream::open(&mut default_tonic_client(&server).await).await;
    stalled.subscribed("HOT").await;
    stalled.expect(Kind::Snapshot, "HOT").await;

    let mut reader = Stream::open(&mut server.client().await).await;
    reader.subscribed("HOT").await;
    reader.expect(Kind::Snapshot, "HOT").await;
    let (progress_tx, mut progress) = tokio::sync::watch::channel(1u64);
    let reading = tokio::spawn(async move {
        let mut seq = 1;
        while seq < TICKS + 1 {
            let msg = next(&mut reader.rx).await;
            assert_eq!(
                (msg.kind(), msg.seq),
                (Kind::Tick, seq + 1),
                "no gap, no lag notice"
            );
            seq = msg.seq;
            let _ = progress_tx.send(seq);
        }
    });

    // The stalled stream reads nothing while all 50,000 are published. Each Publish
    // call completes without waiting for any subscriber; between calls the test only
    // lets the reading subscriber catch up, so "reading" means keeping pace.
    for chunk in 1..=TICKS / CHUNK {
        let counts = publish(&mut publisher, ticks("HOT", CHUNK as usize)).await;
        assert_eq!(counts.accepted, CHUNK);
        within(progress.wait_for(|seq| *seq > chunk * CHUNK))
            .await
            .expect("reader alive");
    }
    within(reading).await.unwrap();

    let (received, dropped) = read_until(&mut stalled.rx, "HOT", 1, TICKS + 1).await;
    assert!(dropped > 0, "the stalled stream must have lagged");
    assert_eq!(
        received + dropped,
        TICKS,
        "everything is either delivered or reported"
    );
    assert!(
        server
            .hub
            .stats()
            .overflowed
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "the hub dropped oldest ticks instead of waiting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_on_default_h2_settings_keeps_its_connection() {
    let server = TestServer::with(|c| c.channel_capacity = 512).await;
    let mut publisher = server.client().await;
    publish(&mut publisher, ticks("SLOW", 1)).await;
    let mut slow = Stream::open(&mut default_tonic_client(&server).await).await;
    slow.subscribed("SLOW").await;
    slow.expect(Kind::Snapshot, "SLOW").await;

    // Published in many small batches, so the server has few ticks ready at a time,
    // while the client reads one message per few microseconds.
    let feeding = tokio::spawn(async move {
        for _ in 0..(TICKS / 100) {
            publish(&mut publisher, ticks("SLOW", 100)).await;
        }
    });
    let (mut seq, mut received, mut dropped) = (1, 0, 0);
    let mut announced_gap = 0;
    while seq < TICKS + 1 {
        let msg = next(&mut slow.rx).await;
        match msg.kind() {
            Kind::Lagged => {
                announced_gap = msg.dropped;
                dropped += msg.dropped;
            }
            _ => {
                assert_eq!(msg.seq, seq + 1 + announced_gap);
                announced_gap = 0;
                seq = msg.seq;
                received += 1;
                if received % 64 == 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
        }
    }
    within(feeding).await.unwrap();
    assert_eq!(received + dropped, TICKS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_abruptly_dropped_streams_leave_nothing_behind() {
    let server = TestServer::start().await;
    let mut publisher = server.client().await;
    publish(&mut publisher, ticks("DROP", 1)).await;
    let url = server.url();

    // The clients live in their own runtime; shutting it down kills their connections
    // mid-stream, with no RST_STREAM or GOAWAY: the server only sees sockets close.
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let (kill_tx, kill_rx) = std::sync::mpsc::channel::<()>();
    let clients = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut streams = Vec::new();
        rt.block_on(async {
            for _ in 0..4 {
                let mut client = tickerd::client::connect(url.clone()).await.unwrap();
                for _ in 0..50 {
                    let mut stream = Stream::open(&mut client).await;
                    stream.subscribed("DROP").await;
                    stream.expect(Kind::Snapshot, "DROP").await;
                    streams.push(stream);
                }
            }
        });
        opened_tx.send(streams.len()).unwrap();
        kill_rx.recv().unwrap();
        rt.shutdown_background();
        drop(streams);
    });
    let opened = tokio::task::spawn_blocking(move || opened_rx.recv().unwrap())
        .await
        .unwrap();
    assert_eq!(opened, 200);
    assert_eq!(server.service.active_streams(), 200);
    assert_eq!(server.hub.receiver_count("DROP"), 200);

    kill_tx.send(()).unwrap();
    tokio::task::spawn_blocking(move || clients.join().unwrap())
        .await
        .unwrap();
    common::eventually("stream count back to zero", || {
        server.service.active_streams() == 0
    })
    .await;
    common::eventually("receivers released", || {
        server.hub.receiver_count("DROP") == 0
    })
    .await;

    // and the server still serves
    let mut stream = Stream::open(&mut publisher).await;
    stream.subscribed("DROP").await;
    stream.expect(Kind::Snapshot, "DROP").await;
}

/// The case batching cannot help: ticks trickle out one per DATA frame while a stream
/// is stalled. tickerd's own client keeps its connection (its windows keep h2's small
/// frame budget out of reach); see docs/architecture.md on tonic's default windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundled_client_survives_a_stall_under_single_tick_frames() {
    let server = TestServer::with(|c| c.channel_capacity = 64).await;
    server.hub.publish("TRICKLE", 1.0, 0).unwrap();
    let mut stalled = Stream::open(&mut server.client().await).await;
    stalled.subscribed("TRICKLE").await;
    stalled.expect(Kind::Snapshot, "TRICKLE").await;
    let mut pacer = Stream::open(&mut server.client().await).await;
    pacer.subscribed("TRICKLE").await;
    pacer.expect(Kind::Snapshot, "TRICKLE").await;

    const N: u64 = 20_000;
    for i in 0..N {
        server.hub.publish("TRICKLE", 2.0, 0).unwrap();
        assert_eq!(pacer.expect(Kind::Tick, "TRICKLE").await.seq, i + 2);
    }
    let (received, dropped) = read_until(&mut stalled.rx, "TRICKLE", 1, N + 1).await;
    assert_eq!(received + dropped, N);
}
