//! End to end over loopback: the real server, real tonic clients on one connection.
//! Ticks enter through the hub (so only the delivery path is timed); each iteration
//! publishes a batch and waits until every stream has received all of it.
//! `cargo bench --bench stream`. Throughput is in deliveries.

use std::{hint::black_box, sync::Arc, time::Duration, time::Instant};

use bytes::{BufMut, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use prost::Message;
use tickerd::{
    client::{self, Kind},
    feed::FeedKind,
    hub::Hub,
    pb::{TickerRequest, TickerResponse},
    server::config::Config,
    server::Server,
};
use tokio::{runtime::Runtime, sync::Semaphore};

const BATCH: u64 = 100;

struct Rig {
    rt: Runtime,
    hub: Hub,
    delivered: Arc<Semaphore>,
}

fn rig(streams: usize) -> Rig {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let delivered = Arc::new(Semaphore::new(0));
    let hub = rt.block_on(async {
        let mut config = Config::defaults();
        config.feed = FeedKind::None;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = Server::new(config).unwrap();
        let hub = server.hub().clone();
        tokio::spawn(server.serve(listener, std::future::pending()));
        hub.publish("E", 1.0, 0).unwrap();
        let client = client::connect(url).await.unwrap();
        for _ in 0..streams {
            let mut client = client.clone();
            let request = tokio_stream::iter(vec![TickerRequest::subscribe("E")])
                .chain(tokio_stream::pending());
            let mut rx = client.ticker_stream(request).await.unwrap().into_inner();
            // ack and snapshot first, so every stream is live before timing starts
            for _ in 0..2 {
                rx.message().await.unwrap().unwrap();
            }
            let delivered = delivered.clone();
            tokio::spawn(async move {
                while let Ok(Some(msg)) = rx.message().await {
                    if msg.kind() == Kind::Tick {
                        delivered.add_permits(1);
                    }
                }
            });
        }
        hub
    });
    Rig { rt, hub, delivered }
}

use tokio_stream::StreamExt as _;

fn deliveries(c: &mut Criterion) {
    let mut group = c.benchmark_group("loopback_one_connection");
    for streams in [1usize, 100] {
        let rig = rig(streams);
        group.throughput(Throughput::Elements(BATCH * streams as u64));
        group.bench_with_input(
            BenchmarkId::new("streams", streams),
            &streams,
            |b, &streams| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        for _ in 0..BATCH {
                            rig.hub.publish("E", 2.0, 0).unwrap();
                        }
                        let want = (BATCH * streams as u64) as u32;
                        rig.rt.block_on(async {
                            rig.delivered.acquire_many(want).await.unwrap().forget()
                        });
                    }
                    start.elapsed()
                })
            },
        );
    }
    group.finish();
}

/// What each stream pays per tick: re-encoding the message (what encode-once avoids)
/// against copying the hub's pre-encoded bytes into the stream's buffer.
fn encode(c: &mut Criterion) {
    let hub = Hub::new(Default::default());
    hub.publish("AAPL", 189.25, 0).unwrap();
    let tick = hub.last("AAPL").unwrap();
    let msg: TickerResponse = tick.to_response(Kind::Tick);
    let mut buf = BytesMut::with_capacity(1 << 16);
    let mut group = c.benchmark_group("encode_one_tick");
    group.throughput(Throughput::Elements(1));
    group.bench_function("prost_encode_per_stream", |b| {
        b.iter(|| {
            buf.clear();
            black_box(&msg).encode(&mut buf).unwrap();
        })
    });
    group.bench_function("copy_pre_encoded", |b| {
        b.iter(|| {
            buf.clear();
            buf.put_slice(black_box(tick.encoded()));
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    targets = deliveries, encode
}
criterion_main!(benches);
