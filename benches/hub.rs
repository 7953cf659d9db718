//! In-process fan-out, no network: the hub's publish and its receivers' reads.
//! `cargo bench --bench hub`. Throughput is in deliveries (one tick read by one receiver).

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tickerd::hub::{Conflator, Delivery, Hub, HubConfig, Receiver};

/// Ticks between two takes of each conflating subscriber in `all_with_conflating`
/// (at 5,000 ticks/s: every conflator at 100 Hz).
const TAKE_EVERY: u64 = 50;

fn hub() -> Hub {
    Hub::new(HubConfig {
        channel_capacity: 1024,
        ..HubConfig::default()
    })
}

fn receivers(hub: &Hub, symbol: &str, n: usize) -> Vec<Receiver> {
    hub.publish(symbol, 1.0, 0).unwrap();
    (0..n)
        .map(|_| hub.subscribe(symbol).unwrap().receiver.unwrap())
        .collect()
}

fn fan_out_one_symbol(c: &mut Criterion) {
    let mut group = c.benchmark_group("fan_out_one_symbol");
    for n in [1usize, 100, 10_000] {
        let hub = hub();
        let mut rxs = receivers(&hub, "A", n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                hub.publish("A", 2.0, 0).unwrap();
                for rx in &mut rxs {
                    black_box(rx.try_next().unwrap());
                }
            })
        });
    }
    group.finish();
}

fn many_symbols(c: &mut Criterion) {
    let mut group = c.benchmark_group("symbols_1000_x_receivers_10");
    let hub = hub();
    let symbols: Vec<String> = (0..1000).map(|i| format!("S{i:04}")).collect();
    let mut rxs: Vec<Vec<_>> = symbols.iter().map(|s| receivers(&hub, s, 10)).collect();
    group.throughput(Throughput::Elements(10_000));
    group.bench_function("publish_each_then_drain", |b| {
        b.iter(|| {
            for s in &symbols {
                hub.publish(s, 2.0, 0).unwrap();
            }
            for set in &mut rxs {
                for rx in set {
                    black_box(rx.try_next().unwrap());
                }
            }
        })
    });
    group.finish();
}

/// ALL subscribers' fan-out with and without CONFLATE subscribers on the same symbol:
/// what conflation costs everyone else. The conflators take every `TAKE_EVERY` ticks,
/// outside the timed part: in the server their sessions do it on their own tasks.
fn all_with_conflating(c: &mut Criterion) {
    let mut group = c.benchmark_group("all_100_with_conflating");
    for conflating in [0usize, 10, 100] {
        let hub = hub();
        let mut rxs = receivers(&hub, "A", 100);
        let mut conflators: Vec<Conflator> = (0..conflating)
            .map(|_| {
                let sub = hub.subscribe_with("A", None, Delivery::Conflate).unwrap();
                sub.conflator.unwrap()
            })
            .collect();
        group.throughput(Throughput::Elements(100));
        group.bench_with_input(
            BenchmarkId::from_parameter(conflating),
            &conflating,
            |b, _| {
                b.iter_custom(|iters| {
                    let mut timed = Duration::ZERO;
                    let mut done = 0;
                    while done < iters {
                        let batch = (iters - done).min(TAKE_EVERY);
                        let start = Instant::now();
                        for _ in 0..batch {
                            hub.publish("A", 2.0, 0).unwrap();
                            for rx in &mut rxs {
                                black_box(rx.try_next().unwrap());
                            }
                        }
                        timed += start.elapsed();
                        done += batch;
                        for c in &mut conflators {
                            black_box(c.take());
                        }
                    }
                    timed
                })
            },
        );
    }
    group.finish();
}

fn publish_without_subscribers(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish_no_subscriber");
    let hub = hub();
    hub.publish("A", 1.0, 0).unwrap();
    group.throughput(Throughput::Elements(1));
    group.bench_function("publish", |b| {
        b.iter(|| hub.publish(black_box("A"), 2.0, 0).unwrap())
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = fan_out_one_symbol, many_symbols, all_with_conflating, publish_without_subscribers
}
criterion_main!(benches);
