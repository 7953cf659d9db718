//! The hub: per-symbol seq (within the hub's epoch), last value, bounded history and
//! bounded ring of live ticks (`ring`). Feeds and the Publish RPC write into it
//! (`publish`); sessions read from it (`subscribe_with`), through a ring `Receiver` or,
//! for CONFLATE, a `Conflator` on the symbol's fold (`conflation`). Each tick is framed
//! once (`tick`, with `wire`'s gRPC framing). The hub imports no session or transport.
//!
//! Publishing never waits for a subscriber: a ring keeps the latest `channel_capacity`
//! ticks, so a receiver that falls that far behind loses the oldest (and sees the seq
//! gap). Each tick is encoded once, here, and its bytes are shared by every stream.

mod conflation;
mod remote;
mod ring;
mod tick;

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use dashmap::{mapref::entry::Entry, DashMap};

use crate::{
    clock,
    symbol::{self, Symbol, SymbolError},
};
use conflation::Conflation;
pub use conflation::{Conflator, Fold};
use remote::Bus;
pub use remote::{Applied, Interest, SyncWait};
use ring::Ring;
pub use ring::{Bell, DirectSink, Receiver};
use tick::encode_tick;
pub use tick::Tick;

/// Hub limits; see the matching `--` flags in `config`.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub channel_capacity: usize,
    pub max_symbols: usize,
    pub allow_unknown_symbols: bool,
    /// Ticks kept per symbol for resuming subscribers (0: no resume).
    pub history_size: usize,
    /// Ticks older than this (since they entered the hub) are not replayed.
    pub history_ttl: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            channel_capacity: 4096,
            max_symbols: 100_000,
            allow_unknown_symbols: false,
            history_size: 1024,
            history_ttl: Duration::from_secs(300),
        }
    }
}

/// Why a tick was not accepted. `Display` is the text a client or log sees.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Symbol(#[from] SymbolError),
    #[error("invalid price {0}: must be finite and positive")]
    Price(f64),
    #[error("invalid event time {0}: must not be negative")]
    EventTime(i64),
    #[error("symbol limit reached ({0} symbols): new symbol refused")]
    SymbolLimit(usize),
    /// A hub fed by a cluster takes ticks only from the cluster (`Hub::apply`).
    #[error("ticks of this server are sequenced by its cluster")]
    Sequenced,
}

/// Why a subscription was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubscribeError {
    #[error(transparent)]
    Symbol(#[from] SymbolError),
    #[error("unknown symbol")]
    Unknown,
    #[error("symbol limit reached ({0} symbols): new symbol refused")]
    SymbolLimit(usize),
    /// Cluster only: the symbol's history is being fetched from the bus. The caller
    /// keeps the `SyncWait` (it holds the symbol wanted) and asks again when the waker
    /// it gave is woken.
    #[error("symbol is being synced from the cluster")]
    Syncing(SyncWait),
}

/// A new subscription, made atomically with respect to `publish`: the live feed (a
/// receiver, or a conflator) starts right after `seq`, and
/// either `replay` holds every tick after the resume point up to `seq` or `snapshot` is
/// the last value. Nothing overlaps and nothing is left out.
pub struct Subscription {
    /// Live ticks, for `Delivery::Channel`.
    pub receiver: Option<Receiver>,
    /// Live ranges, for `Delivery::Conflate`.
    pub conflator: Option<Conflator>,
    pub snapshot: Option<Arc<Tick>>,
    /// `Some` when a resume was asked for and the history covers it (maybe empty).
    pub replay: Option<Vec<Arc<Tick>>>,
    /// The symbol's seq when the subscription was made.
    pub seq: u64,
    pub epoch: u64,
    /// The symbol's seq from now on.
    pub watch: SeqWatch,
}

/// The latest seq of one symbol, read without a lock: how far behind a subscription
/// is (for /streams). It is stored before the tick is broadcast, so it may run ahead
/// of what a receiver can take yet; it says nothing about whether a receiver's
/// wake-up is armed.
#[derive(Clone)]
pub struct SeqWatch(Arc<SymbolSlot>);

impl SeqWatch {
    pub fn seq(&self) -> u64 {
        self.0.published.load(Ordering::Acquire)
    }
}

/// Where a resuming subscriber left off: the last seq it saw, in `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumePoint {
    pub epoch: u64,
    pub seq: u64,
}

/// How a subscription receives live ticks.
#[derive(Clone, Copy)]
pub enum Delivery<'a> {
    /// Each tick, through the symbol's ring, waking the session through its bell.
    Channel(&'a Bell),
    /// Folded into ranges taken at the subscriber's pace; never falls behind.
    Conflate,
}

/// Where a tick came from, for the accepted/rejected counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The server's own feed (simulator, replay).
    Feed = 0,
    /// The Publish RPC.
    Publish = 1,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Feed => "feed",
            Source::Publish => "publish",
        }
    }
}

/// Counters for operators and tests; relaxed atomics, never a lock.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Indexed by `Source as usize`.
    pub accepted: [AtomicU64; 2],
    pub rejected: [AtomicU64; 2],
    /// Ticks pushed out of a full ring before some receiver took them: that receiver
    /// will see a gap.
    pub overflowed: AtomicU64,
}

/// Cheap-to-clone handle on the shared hub.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

struct Shared {
    config: HubConfig,
    epoch: u64,
    symbols: DashMap<Symbol, Arc<SymbolSlot>>,
    stats: HubStats,
    /// `Some` when a cluster sequences the ticks (`remote`).
    interest: Option<Arc<Interest>>,
    bus: Bus,
}

struct SymbolSlot {
    symbol: Symbol,
    /// The hub's, for the drops that end a symbol's last subscription (`remote`).
    interest: Option<Arc<Interest>>,
    /// `state.seq`, readable without the lock; stored (SeqCst, see `Bell::arm`) after
    /// the tick is in the ring and before its readers' bells ring.
    published: AtomicU64,
    state: Mutex<SymbolState>,
}

#[derive(Default)]
struct SymbolState {
    seq: u64,
    last: Option<Arc<Tick>>,
    /// Present while the symbol has receivers, so idle symbols hold no queue.
    ring: Option<Ring>,
    /// The latest ticks (at most `history_size`) with the time each entered the hub.
    history: VecDeque<(i64, Arc<Tick>)>,
    /// Present while the symbol has CONFLATE subscribers; dropped like `sender`.
    conflation: Option<Arc<Conflation>>,
    /// Cluster only (`remote`): whether the history is synced from the bus, how many
    /// subscriptions want the symbol, and who waits for the sync.
    sync: remote::SyncState,
}

impl SymbolSlot {
    // A poisoned lock only means another thread panicked mid-update of plain values;
    // the state is still consistent enough to keep serving.
    fn lock(&self) -> MutexGuard<'_, SymbolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("symbols", &self.symbol_count())
            .finish()
    }
}

impl Hub {
    pub fn new(config: HubConfig) -> Hub {
        Hub::build(config, new_epoch(), None)
    }

    /// A hub whose ticks a cluster sequences under `epoch` (the bus's): they arrive
    /// through `apply`, and `Interest` tells the cluster which symbols are wanted here.
    pub fn sequenced_by_cluster(config: HubConfig, epoch: u64) -> (Hub, Arc<Interest>) {
        let interest = Arc::new(Interest::default());
        let hub = Hub::build(config, epoch, Some(Arc::clone(&interest)));
        (hub, interest)
    }

    fn build(config: HubConfig, epoch: u64, interest: Option<Arc<Interest>>) -> Hub {
        Hub {
            shared: Arc::new(Shared {
                config,
                epoch,
                symbols: DashMap::new(),
                stats: HubStats::default(),
                interest,
                bus: Bus::default(),
            }),
        }
    }

    /// Whether a cluster sequences this hub's ticks.
    pub fn is_clustered(&self) -> bool {
        self.shared.interest.is_some()
    }

    pub fn config(&self) -> &HubConfig {
        &self.shared.config
    }

    /// The epoch of every seq this hub hands out: a new hub (a restarted process)
    /// starts its seqs again under a new epoch.
    pub fn epoch(&self) -> u64 {
        self.shared.epoch
    }

    pub fn stats(&self) -> &HubStats {
        &self.shared.stats
    }

    /// Number of known symbols.
    pub fn symbol_count(&self) -> usize {
        self.shared.symbols.len()
    }

    pub fn is_known(&self, symbol: &str) -> bool {
        self.shared.symbols.contains_key(symbol)
    }

    /// Makes symbols known without a tick (`--symbols-file`), within the symbol limit.
    pub fn declare(&self, symbol: &str) -> Result<(), PublishError> {
        symbol::validate(symbol)?;
        let slot = self
            .slot_or_insert(symbol)
            .map_err(PublishError::SymbolLimit)?;
        slot.lock().sync.declared = true;
        Ok(())
    }

    /// Accepts one tick from a publisher: assigns the next seq, stores it as the last value
    /// and offers it to the symbol's subscribers without waiting.
    /// `event_time_unix_nanos == 0` means "now". Returns the tick's seq.
    pub fn publish(
        &self,
        symbol: &str,
        ltp: f64,
        event_time_unix_nanos: i64,
    ) -> Result<u64, PublishError> {
        self.publish_from(Source::Publish, symbol, ltp, event_time_unix_nanos)
    }

    /// `publish`, counted under `source`.
    pub fn publish_from(
        &self,
        source: Source,
        symbol: &str,
        ltp: f64,
        event_time_unix_nanos: i64,
    ) -> Result<u64, PublishError> {
        let result = self.try_publish(symbol, ltp, event_time_unix_nanos);
        let counters = if result.is_ok() {
            &self.stats().accepted
        } else {
            &self.stats().rejected
        };
        counters[source as usize].fetch_add(1, Ordering::Relaxed);
        result
    }

    fn try_publish(&self, symbol: &str, ltp: f64, event_time: i64) -> Result<u64, PublishError> {
        check_tick(ltp, event_time)?;
        if self.is_clustered() {
            return Err(PublishError::Sequenced);
        }
        let slot = match self.shared.symbols.get(symbol) {
            Some(slot) => Arc::clone(&slot),
            None => {
                symbol::validate(symbol)?;
                self.slot_or_insert(symbol)
                    .map_err(PublishError::SymbolLimit)?
            }
        };
        let config = &self.shared.config;
        // The clock is read only for a server stamp or the history's entry time.
        let now = if event_time == 0 || config.history_size > 0 {
            clock::now_unix_nanos()
        } else {
            0
        };
        let event_time = if event_time == 0 { now } else { event_time };

        let mut state = slot.lock();
        let seq = state.seq + 1;
        self.accept(&slot, &mut state, seq, ltp, event_time, now);
        Ok(seq)
    }

    /// Makes `seq` the symbol's latest tick: last value, history (entered at
    /// `entered`), CONFLATE fold, ring, then the published seq and the readers' bells.
    /// The caller holds the symbol's lock and gives a seq past the current one.
    fn accept(
        &self,
        slot: &SymbolSlot,
        state: &mut SymbolState,
        seq: u64,
        ltp: f64,
        event_time: i64,
        entered: i64,
    ) {
        let config = &self.shared.config;
        state.seq = seq;
        let tick = Arc::new(encode_tick(
            &slot.symbol,
            seq,
            self.epoch(),
            ltp,
            event_time,
        ));
        state.last = Some(Arc::clone(&tick));
        if config.history_size > 0 {
            if state.history.len() >= config.history_size {
                state.history.pop_front();
            }
            state.history.push_back((entered, Arc::clone(&tick)));
        }
        if let Some(conflation) = &state.conflation {
            if conflation.is_used() {
                conflation.add(&tick);
            } else {
                state.conflation = None;
            }
        }
        if let Some(ring) = state.ring.as_mut() {
            if ring.push(Arc::clone(&tick), config.channel_capacity.max(1)) {
                self.stats().overflowed.fetch_add(1, Ordering::Relaxed);
            }
            slot.published.store(seq, Ordering::SeqCst);
            ring.ring_bells(&tick);
        } else {
            slot.published.store(seq, Ordering::SeqCst);
        }
    }

    /// Opens a receiver on `symbol`'s ring together with its last value, atomically
    /// with respect to `publish`, so the snapshot and the live ticks never overlap or
    /// leave a hole. Its bell is never armed: for callers that read without waiting.
    pub fn subscribe(&self, symbol: &str) -> Result<Subscription, SubscribeError> {
        self.subscribe_with(symbol, None, Delivery::Channel(&Bell::new()))
    }

    /// `subscribe`, resuming after `resume` when the history allows, with live ticks
    /// delivered as `delivery` says.
    pub fn subscribe_with(
        &self,
        symbol: &str,
        resume: Option<ResumePoint>,
        delivery: Delivery,
    ) -> Result<Subscription, SubscribeError> {
        symbol::validate(symbol)?;
        let slot = match self.shared.symbols.get(symbol) {
            Some(slot) => Arc::clone(&slot),
            None if self.shared.config.allow_unknown_symbols || self.is_clustered() => self
                .slot_or_insert(symbol)
                .map_err(SubscribeError::SymbolLimit)?,
            None => return Err(SubscribeError::Unknown),
        };
        let mut guard = slot.lock();
        let state = &mut *guard;
        if self.is_clustered() {
            self.check_synced(&slot, state)?;
        }
        let (mut receiver, mut conflator) = (None, None);
        match delivery {
            Delivery::Conflate => {
                let conflation = state
                    .conflation
                    .get_or_insert_with(|| Conflation::new(state.seq, state.last.clone()));
                let mut joined = conflation.join(state.seq);
                if self.is_clustered() {
                    joined.hold(SyncWait::new(Arc::clone(&slot), state));
                }
                conflator = Some(joined);
            }
            Delivery::Channel(bell) => {
                receiver = Some(Receiver::join(Arc::clone(&slot), state, bell));
            }
        }
        let replay = resume.and_then(|from| self.replay(state, from));
        Ok(Subscription {
            receiver,
            conflator,
            snapshot: if replay.is_some() {
                None
            } else {
                state.last.clone()
            },
            replay,
            seq: state.seq,
            epoch: self.epoch(),
            watch: SeqWatch(Arc::clone(&slot)),
        })
    }

    /// Every tick after `from`, if the history still holds them all (none expired).
    fn replay(&self, state: &SymbolState, from: ResumePoint) -> Option<Vec<Arc<Tick>>> {
        if from.epoch != self.epoch() || from.seq > state.seq {
            return None;
        }
        // A cluster's history may have a hole (ticks the bus no longer held): the
        // range must start right after `from`.
        let missing = (state.seq - from.seq) as usize;
        if missing == 0 {
            return Some(Vec::new());
        }
        if missing > state.history.len() {
            return None;
        }
        let oldest_allowed =
            clock::now_unix_nanos() - self.shared.config.history_ttl.as_nanos() as i64;
        let wanted = state.history.range(state.history.len() - missing..);
        let mut ticks = Vec::with_capacity(missing);
        for (entered, tick) in wanted {
            if *entered < oldest_allowed {
                return None;
            }
            ticks.push(Arc::clone(tick));
        }
        (ticks[0].seq == from.seq + 1).then_some(ticks)
    }

    /// The last tick of `symbol`, if it is known and has ticked.
    pub fn last(&self, symbol: &str) -> Option<Arc<Tick>> {
        let slot = self.shared.symbols.get(symbol).map(|s| Arc::clone(&s))?;
        let last = slot.lock().last.clone();
        last
    }

    /// The seq of `symbol`'s latest tick (0 if unknown or never ticked).
    pub fn seq(&self, symbol: &str) -> u64 {
        self.shared
            .symbols
            .get(symbol)
            .map_or(0, |slot| slot.published.load(Ordering::Acquire))
    }

    /// (symbol, seq, open receivers) of every known symbol, for per-symbol metrics.
    pub fn symbol_seqs(&self) -> Vec<(Symbol, u64, usize)> {
        let slots: Vec<Arc<SymbolSlot>> = self
            .shared
            .symbols
            .iter()
            .map(|e| Arc::clone(e.value()))
            .collect();
        slots
            .iter()
            .map(|slot| {
                let state = slot.lock();
                let receivers = state.ring.as_ref().map_or(0, Ring::reader_count);
                (Arc::clone(&slot.symbol), state.seq, receivers)
            })
            .collect()
    }

    /// Receivers currently open on `symbol` (0 for an unknown or idle symbol).
    pub fn receiver_count(&self, symbol: &str) -> usize {
        let Some(slot) = self.shared.symbols.get(symbol).map(|s| Arc::clone(&s)) else {
            return 0;
        };
        let state = slot.lock();
        state.ring.as_ref().map_or(0, Ring::reader_count)
    }

    /// The slot of `symbol`, created if the symbol limit allows; `Err(max)` otherwise.
    fn slot_or_insert(&self, symbol: &str) -> Result<Arc<SymbolSlot>, usize> {
        let max = self.shared.config.max_symbols;
        // The length check races with other inserters by at most one per shard lock
        // holder; the limit is a memory guard, not an exact quota.
        if self.shared.symbols.len() >= max && !self.shared.symbols.contains_key(symbol) {
            return Err(max);
        }
        let symbol: Symbol = Arc::from(symbol);
        let slot = match self.shared.symbols.entry(Arc::clone(&symbol)) {
            Entry::Occupied(e) => Arc::clone(e.get()),
            Entry::Vacant(e) => {
                let slot = Arc::new(SymbolSlot {
                    symbol,
                    interest: self.shared.interest.clone(),
                    published: AtomicU64::new(0),
                    state: Mutex::new(SymbolState {
                        sync: remote::SyncState::new(self.shared.interest.is_some()),
                        ..SymbolState::default()
                    }),
                });
                e.insert(Arc::clone(&slot));
                slot
            }
        };
        Ok(slot)
    }
}

/// Checks a tick's symbol, price and event time, as `publish` does.
pub fn check(symbol: &str, ltp: f64, event_time: i64) -> Result<(), PublishError> {
    check_tick(ltp, event_time)?;
    symbol::validate(symbol)?;
    Ok(())
}

/// Checks a tick's price and event time.
fn check_tick(ltp: f64, event_time: i64) -> Result<(), PublishError> {
    if !(ltp.is_finite() && ltp > 0.0) {
        return Err(PublishError::Price(ltp));
    }
    if event_time < 0 {
        return Err(PublishError::EventTime(event_time));
    }
    Ok(())
}

/// A new epoch: the start time in nanoseconds, mixed with a per-process count so two
/// hubs made in the same instant differ. Never 0 (0 means "no epoch" on the wire).
fn new_epoch() -> u64 {
    static MADE: AtomicU64 = AtomicU64::new(0);
    let made = MADE.fetch_add(1, Ordering::Relaxed);
    (clock::now_unix_nanos() as u64).wrapping_add(made).max(1)
}

#[cfg(test)]
mod tests;
