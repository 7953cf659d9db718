//! One client stream's share of the work, in process: the hub's publish, the bells and the
//! sessions draining their subscriptions, without encoding or HTTP/2.
//! `cargo bench --bench session`. Throughput is in deliveries (one tick yielded by one
//! session).

use std::{
    hint::black_box,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll, Wake, Waker},
    time::Duration,
};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures_core::Stream;
use rand::{rngs::SmallRng, seq::index::sample, Rng, SeedableRng};
use tickerd::{
    auth::{Authenticator, Principal},
    hub::{Hub, HubConfig},
    ops::metrics::Metrics,
    session::{Caller, Session, SessionLimits},
    shutdown::Shutdown,
};

const SESSIONS: usize = 1000;
const SUBS: usize = 10;
const SYMBOLS: usize = 100;
const ROUNDS: usize = 20;
const TICKS_PER_ROUND: usize = 5;

/// A session's waker: queues the session's index once until it is polled again.
struct Woken {
    index: usize,
    queued: AtomicBool,
    queue: Arc<Mutex<Vec<usize>>>,
}

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(self.index);
        }
    }
}

/// Polls a session until it waits, as tonic does; returns how many messages it yielded.
fn drain(session: &mut Session, woken: &Arc<Woken>) -> u64 {
    woken.queued.store(false, Ordering::Release);
    let waker = Waker::from(Arc::clone(woken));
    let mut cx = Context::from_waker(&waker);
    let mut n = 0;
    while let Poll::Ready(Some(item)) = Pin::new(&mut *session).poll_next(&mut cx) {
        black_box(item.ok());
        n += 1;
    }
    n
}

/// The efficiency shape of `tickerd-bench` (default random layout): 1,000 sessions with
/// 10 random subscriptions each over 100 symbols; each round publishes 5 ticks, then every
/// woken session is polled until it waits.
fn random_layout(c: &mut Criterion) {
    let hub = Hub::new(HubConfig::default());
    let metrics = Metrics::new(hub.clone(), false, 0.0);
    let permits = Arc::new(tokio::sync::Semaphore::new(SESSIONS));
    let names: Vec<String> = (0..SYMBOLS).map(|i| format!("B{i:03}")).collect();
    for name in &names {
        hub.publish(name, 1.0, 0).unwrap();
    }
    let mut rng = SmallRng::seed_from_u64(7);
    let queue = Arc::new(Mutex::new(Vec::new()));
    let mut subscribers = vec![0u64; SYMBOLS];
    let mut sessions: Vec<(Session, Arc<Woken>)> = (0..SESSIONS)
        .map(|index| {
            let permit = Arc::clone(&permits).try_acquire_owned().unwrap();
            let ticket = metrics.ticket("TickerStream", "bench".into(), "bench".into(), permit);
            let caller = Caller {
                principal: Principal::anonymous(),
                auth: Authenticator::none(),
            };
            let limits = SessionLimits {
                max_subscriptions: SUBS,
            };
            let shutdown = Shutdown::new();
            let mut session = Session::new(hub.clone(), limits, None, shutdown, ticket, caller);
            for i in sample(&mut rng, SYMBOLS, SUBS) {
                session.subscribe(&names[i]);
                subscribers[i] += 1;
            }
            let woken = Arc::new(Woken {
                index,
                queued: AtomicBool::new(false),
                queue: Arc::clone(&queue),
            });
            drain(&mut session, &woken);
            (session, woken)
        })
        .collect();
    let published: Vec<usize> = (0..ROUNDS * TICKS_PER_ROUND)
        .map(|_| rng.random_range(0..SYMBOLS))
        .collect();
    let deliveries: u64 = published.iter().map(|&i| subscribers[i]).sum();
    let mut group = c.benchmark_group("sessions_1000_x_10_random_over_100");
    group.throughput(Throughput::Elements(deliveries));
    group.bench_function("publish_5_then_poll_woken", |b| {
        let mut woken = Vec::new();
        b.iter(|| {
            let mut got = 0;
            for round in published.chunks(TICKS_PER_ROUND) {
                for &i in round {
                    hub.publish(&names[i], 2.0, 0).unwrap();
                }
                std::mem::swap(&mut woken, &mut *queue.lock().unwrap());
                for index in woken.drain(..) {
                    let (session, w) = &mut sessions[index];
                    got += drain(session, w);
                }
            }
            assert_eq!(got, deliveries, "every tick reaches every subscriber");
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = random_layout
}
criterion_main!(benches);
