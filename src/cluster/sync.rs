//! Interest-driven syncs: a node reads from the bus only the symbols its own clients
//! want. When a symbol gains its first local subscription (`hub::Interest`), the node
//! subscribes to the symbol's republished ticks, loads the retained history into the
//! hub with a short-lived ordered consumer, and then follows the live ticks; once
//! caught up, the hub answers the waiting subscribes. When the last local subscription
//! leaves, the sync lingers for `--cluster-linger`, then stops and the hub forgets the
//! symbol.
//!
//! After the connection comes back, each sync reads what the stream stored after the
//! last tick it applied, so an outage is caught up at once; ticks the stream no longer
//! holds arrive as a seq hole, which sessions announce as KIND_LAGGED with its size.

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
    clock,
    hub::{Applied, Hub, Interest},
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
///
/// Live ticks come from the stream's republish subject, a plain NATS subscription
/// that costs the bus one message per node (no consumer per symbol and node); each
/// carries its stream sequence and that of the subject's previous tick, so a tick
/// this node did not see (dropped while the connection was down, or by a slow
/// subscription) shows as a hole and is fetched from the stream (`catch_up`). The
/// subscription is made before the history is read, so nothing stored in between is
/// missed.
async fn follow(
    cluster: Cluster,
    hub: Hub,
    symbol: Symbol,
    generation: u64,
    subscribable: bool,
    stop: CancellationToken,
) {
    let inner = &cluster.inner;
    let client = inner.context.client();
    let mut backoff = Duration::from_millis(100);
    let mut live = loop {
        match client
            .subscribe(codec::republished(&inner.name, &symbol))
            .await
        {
            Ok(live) => break live,
            Err(e) => {
                tracing::warn!(%symbol, error = %e, "cannot follow the symbol on the bus; retrying");
                if !pause(&stop, &mut backoff).await {
                    return;
                }
            }
        }
    };
    let reader = Reader {
        cluster: &cluster,
        hub: &hub,
        symbol: &symbol,
        generation,
        stop: &stop,
    };
    let Some(mut last) = reader.catch_up(0).await else {
        return;
    };
    hub.set_live(&symbol, generation, last > 0 || subscribable);
    if last == 0 && !subscribable {
        // Nothing on the bus and not subscribable: the waiting subscribes are refused
        // as unknown, and nothing is read.
        return;
    }
    let mut connected = inner.connected.clone();
    connected.mark_unchanged();
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return,
            // Back from an outage: fetch what was stored meanwhile.
            Ok(()) = connected.changed() => {
                if *connected.borrow_and_update() {
                    match reader.catch_up(last).await {
                        Some(caught_up) => last = caught_up,
                        None => return,
                    }
                }
                continue;
            }
            message = live.next() => message,
        };
        let Some(message) = message else {
            tracing::warn!(%symbol, "the bus ended the symbol's subscription");
            return;
        };
        let Some((stream_seq, previous)) = republish_headers(&message) else {
            continue;
        };
        if stream_seq <= last {
            continue; // read already, from the history or a catch-up
        }
        if previous != last {
            match reader.catch_up(last).await {
                Some(caught_up) => last = caught_up,
                None => return,
            }
            if stream_seq <= last {
                continue;
            }
        }
        reader.apply(&message.payload, clock::now_unix_nanos());
        last = stream_seq;
    }
}

/// (stream sequence, the subject's previous stream sequence) of a republished tick.
fn republish_headers(message: &async_nats::Message) -> Option<(u64, u64)> {
    let headers = message.headers.as_ref()?;
    let number = |name: &str| headers.get_last(name)?.as_str().parse::<u64>().ok();
    Some((
        number("Nats-Sequence")?,
        number("Nats-Last-Sequence").unwrap_or(0),
    ))
}

/// Applies ticks of one symbol's sync to the hub.
struct Reader<'a> {
    cluster: &'a Cluster,
    hub: &'a Hub,
    symbol: &'a Symbol,
    generation: u64,
    stop: &'a CancellationToken,
}

impl Reader<'_> {
    fn apply(&self, payload: &[u8], stored: i64) {
        let Some(tick) = codec::decode(payload) else {
            return;
        };
        let inner = &self.cluster.inner;
        inner.stats.received.fetch_add(1, Ordering::Relaxed);
        let applied = self.hub.apply(
            self.generation,
            self.symbol,
            tick.seq,
            tick.ltp,
            tick.event_time,
            stored,
        );
        match applied {
            // Every tick read here is newer on the stream than the last one applied, so
            // a seq at or below the symbol's means its seqs went back (the stream or the
            // subject purged): the seqs this node holds now name other ticks.
            Ok(Applied::Duplicate) => self.cluster.lose(format!(
                "stored a new tick of {} with seq {}, at or below one this node holds \
                 (was it purged?)",
                self.symbol, tick.seq
            )),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(symbol = %self.symbol, seq = tick.seq, error = %e, "bad tick on the bus skipped");
            }
        }
    }

    /// Reads the stream's ticks of the symbol after stream sequence `after` (all it
    /// holds for 0) until none is pending; retries until it succeeds. Returns the stream
    /// sequence of the last one (`after` if there was none), or `None` once stopped.
    async fn catch_up(&self, after: u64) -> Option<u64> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.try_catch_up(after).await {
                Ok(Some(last)) => return Some(last),
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!(symbol = %self.symbol, error = %e, "cannot read the symbol's history from the bus; retrying");
                    if !pause(self.stop, &mut backoff).await {
                        return None;
                    }
                }
            }
        }
    }

    async fn try_catch_up(&self, after: u64) -> Result<Option<u64>, String> {
        let inner = &self.cluster.inner;
        let config = OrderedConfig {
            filter_subject: codec::subject(&inner.name, self.symbol),
            deliver_policy: match after {
                0 => DeliverPolicy::All,
                last => DeliverPolicy::ByStartSequence {
                    start_sequence: last + 1,
                },
            },
            ..Default::default()
        };
        let consumer = tokio::select! {
            _ = self.stop.cancelled() => return Ok(None),
            created = inner.stream.create_consumer(config) => created.map_err(|e| e.to_string())?,
        };
        self.cluster
            .stats()
            .catch_ups
            .fetch_add(1, Ordering::Relaxed);
        if consumer.cached_info().num_pending == 0 {
            return Ok(Some(after));
        }
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        loop {
            let next = tokio::select! {
                _ = self.stop.cancelled() => return Ok(None),
                next = tokio::time::timeout(CATCH_UP_STALL, messages.next()) => next,
            };
            let message = match next {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(e))) => return Err(e.to_string()),
                Ok(None) => return Err("the consumer ended".into()),
                Err(_) => return Err("no tick from the bus for 5 s".into()),
            };
            let info = message.info().map_err(|e| e.to_string())?;
            let (stream_seq, pending) = (info.stream_sequence, info.pending);
            let stored = info.published.unix_timestamp_nanos() as i64;
            self.apply(&message.payload, stored);
            if pending == 0 {
                return Ok(Some(stream_seq));
            }
        }
    }
}

/// How long a catch-up waits for its next tick before starting over.
const CATCH_UP_STALL: Duration = Duration::from_secs(5);

/// Waits `backoff` (doubling it up to 5 s) unless stopped; `false` when stopped.
async fn pause(stop: &CancellationToken, backoff: &mut Duration) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}
