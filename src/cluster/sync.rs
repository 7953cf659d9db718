//! Interest-driven syncs: a node reads from the bus only the symbols its own clients
//! want. When a symbol gains its first local subscription (`hub::Interest`), an ordered
//! JetStream consumer filtered on its subject loads the retained history into the hub
//! and then follows it live; once caught up, the hub answers the waiting subscribes.
//! When the last local subscription leaves, the consumer lingers for
//! `--cluster-linger`, then stops and the hub forgets the symbol.
//!
//! After the connection comes back, each sync makes a new consumer starting right after
//! the last stream sequence it read (rather than waiting for the old one's missed
//! heartbeats), so an outage is caught up at once; ticks the stream no longer holds
//! arrive as a seq hole, which sessions announce as KIND_LAGGED with its size.

use std::{
    collections::HashMap,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use futures_util::StreamExt as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{codec, Cluster};
use crate::{
    hub::{Hub, Interest},
    symbol::Symbol,
};

/// The syncs of one node.
pub(super) struct Syncs {
    cluster: Cluster,
    hub: Hub,
    allow_unknown: bool,
    running: HashMap<Symbol, Running>,
}

struct Running {
    generation: u64,
    stop: CancellationToken,
    /// Set while nothing wants the symbol: when to stop.
    linger_until: Option<Instant>,
}

impl Syncs {
    pub(super) fn new(cluster: Cluster, hub: Hub, allow_unknown: bool) -> Syncs {
        Syncs {
            cluster,
            hub,
            allow_unknown,
            running: HashMap::new(),
        }
    }

    pub(super) async fn run(mut self, interest: Arc<Interest>, shutdown: CancellationToken) {
        loop {
            let next_stop = self.running.values().filter_map(|r| r.linger_until).min();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = interest.changed() => {
                    for symbol in changed {
                        self.reconcile(symbol);
                    }
                }
                _ = sleep_until(next_stop) => self.stop_lingering(),
            }
        }
        for running in self.running.values() {
            running.stop.cancel();
        }
    }

    fn reconcile(&mut self, symbol: Symbol) {
        let wanted = self.hub.wanted(&symbol);
        let current = self.hub.sync_generation(&symbol);
        match self.running.get_mut(&symbol) {
            // Still the sync the hub knows: keep it.
            Some(running) if wanted && current == Some(running.generation) => {
                running.linger_until = None;
            }
            Some(running) if !wanted && running.linger_until.is_none() => {
                running.linger_until =
                    Some(Instant::now() + self.cluster.inner.args.cluster_linger);
            }
            Some(_) if !wanted => {}
            // The hub moved on (a symbol refused as unknown is asked about again).
            Some(_) => {
                self.stop(&symbol);
                self.start(symbol);
            }
            None if wanted => self.start(symbol),
            None => {}
        }
    }

    fn start(&mut self, symbol: Symbol) {
        let Some(generation) = self.hub.begin_sync(&symbol) else {
            return;
        };
        let stop = CancellationToken::new();
        let stats = self.cluster.stats();
        stats.syncing.fetch_add(1, Ordering::Relaxed);
        stats.syncs_started.fetch_add(1, Ordering::Relaxed);
        let subscribable = self.allow_unknown || self.hub.is_declared(&symbol);
        tokio::spawn(follow(
            self.cluster.clone(),
            self.hub.clone(),
            Arc::clone(&symbol),
            generation,
            subscribable,
            stop.clone(),
        ));
        tracing::debug!(%symbol, generation, "sync started");
        self.running.insert(
            symbol,
            Running {
                generation,
                stop,
                linger_until: None,
            },
        );
    }

    fn stop(&mut self, symbol: &Symbol) {
        if let Some(running) = self.running.remove(symbol) {
            running.stop.cancel();
            self.cluster.stats().syncing.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(%symbol, "sync stopped");
        }
    }

    fn stop_lingering(&mut self) {
        let now = Instant::now();
        let due: Vec<Symbol> = self
            .running
            .iter()
            .filter(|(_, r)| r.linger_until.is_some_and(|t| t <= now))
            .map(|(s, _)| Arc::clone(s))
            .collect();
        for symbol in due {
            let generation = self.running[&symbol].generation;
            if self.hub.cool(&symbol, generation) {
                self.stop(&symbol);
            } else if let Some(running) = self.running.get_mut(&symbol) {
                running.linger_until = None;
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Reads `symbol` from the bus into the hub until stopped: the retained history, then
/// live ticks. `subscribable`: the symbol may be subscribed before its first tick.
async fn follow(
    cluster: Cluster,
    hub: Hub,
    symbol: Symbol,
    generation: u64,
    subscribable: bool,
    stop: CancellationToken,
) {
    let inner = &cluster.inner;
    let subject = codec::subject(&inner.name, &symbol);
    let mut live = false;
    let mut next_stream_seq = 0u64;
    let mut connected = inner.connected.clone();
    let mut backoff = Duration::from_millis(100);
    loop {
        let config = OrderedConfig {
            filter_subject: subject.clone(),
            deliver_policy: match next_stream_seq {
                0 => DeliverPolicy::All,
                start_sequence => DeliverPolicy::ByStartSequence { start_sequence },
            },
            ..Default::default()
        };
        let created = tokio::select! {
            _ = stop.cancelled() => return,
            created = inner.stream.create_consumer(config) => created,
        };
        let consumer = match created {
            Ok(consumer) => consumer,
            Err(e) => {
                tracing::warn!(%symbol, error = %e, "cannot read the symbol from the bus; retrying");
                if !pause(&stop, &mut backoff).await {
                    return;
                }
                continue;
            }
        };
        if !live && consumer.cached_info().num_pending == 0 {
            hub.set_live(&symbol, generation, subscribable);
            live = true;
            if !subscribable {
                // Nothing on the bus and not subscribable: the waiting subscribes are
                // refused as unknown, and nothing is read.
                return;
            }
        }
        let mut messages = match consumer.messages().await {
            Ok(messages) => messages,
            Err(e) => {
                tracing::warn!(%symbol, error = %e, "cannot read the symbol from the bus; retrying");
                if !pause(&stop, &mut backoff).await {
                    return;
                }
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        connected.mark_unchanged();
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                next = messages.next() => next,
                // Back from an outage: read on from where this sync stopped.
                Ok(()) = connected.changed() => {
                    if *connected.borrow_and_update() {
                        break;
                    }
                    continue;
                }
            };
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(e)) => {
                    tracing::debug!(%symbol, error = %e, "bus read interrupted");
                    continue;
                }
                None => break,
            };
            let Ok(info) = message.info() else {
                continue;
            };
            let (stream_seq, pending) = (info.stream_sequence, info.pending);
            let stored = info.published.unix_timestamp_nanos() as i64;
            next_stream_seq = stream_seq + 1;
            if let Some(tick) = codec::decode(&message.payload) {
                inner.stats.received.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = hub.apply(
                    generation,
                    &symbol,
                    tick.seq,
                    tick.ltp,
                    tick.event_time,
                    stored,
                ) {
                    tracing::warn!(%symbol, seq = tick.seq, error = %e, "bad tick on the bus skipped");
                }
            }
            if !live && pending == 0 {
                hub.set_live(&symbol, generation, true);
                live = true;
            }
        }
    }
}

/// Waits `backoff` (doubling it up to 5 s) unless stopped; `false` when stopped.
async fn pause(stop: &CancellationToken, backoff: &mut Duration) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}
