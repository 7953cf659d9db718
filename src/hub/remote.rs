//! A hub fed by a cluster (`cluster`): the bus, not the hub, sequences ticks, so the hub
//! takes each with its seq (`Hub::apply`), keeps a symbol's history only while local
//! subscriptions want it, and tells the cluster which symbols those are (`Interest`).
//! A subscription to a symbol not synced yet gets `SubscribeError::Syncing` and is
//! answered when the cluster has loaded the symbol's history (`Hub::set_live`).
//! The bus's health reaches sessions through `Hub::bus_generation`.
//!
//! Why here and not in the cluster: the seq, the last value, the history and the ring
//! must change together under the symbol's lock, exactly as a local publish does, so
//! that a subscription's snapshot or replay and its live ticks never overlap or leave
//! a hole.

use std::{
    collections::HashSet,
    mem,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::Waker,
};

use tokio::sync::Notify;

use super::{check_tick, Hub, PublishError, SubscribeError, SymbolSlot, SymbolState};
use crate::symbol::Symbol;

/// The symbols whose local interest changed, for the cluster to look at
/// (`Hub::wanted`). A set, so a symbol churned many times is looked at once.
#[derive(Default)]
pub struct Interest {
    changed: Mutex<HashSet<Symbol>>,
    notify: Notify,
}

impl Interest {
    fn mark(&self, symbol: &Symbol) {
        let mut changed = self.changed.lock().unwrap_or_else(|e| e.into_inner());
        changed.insert(Arc::clone(symbol));
        drop(changed);
        self.notify.notify_one();
    }

    /// Waits for, then takes, the symbols whose interest changed.
    pub async fn changed(&self) -> Vec<Symbol> {
        loop {
            let taken: Vec<Symbol> = {
                let mut changed = self.changed.lock().unwrap_or_else(|e| e.into_inner());
                changed.drain().collect()
            };
            if !taken.is_empty() {
                return taken;
            }
            self.notify.notified().await;
        }
    }
}

/// A symbol's sync with the bus, in its locked state.
#[derive(Default)]
pub(super) struct SyncState {
    phase: Phase,
    /// Subscriptions (and waiting subscribes) that want the symbol.
    wanted: usize,
    /// Bumped by every `begin_sync`, so ticks of an older sync are ignored.
    generation: u64,
    waiters: Vec<Waker>,
    /// Listed at start-up: subscribable before its first tick.
    pub(super) declared: bool,
}

#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// A hub that sequences its own ticks.
    #[default]
    Local,
    /// Not synced: nothing here can be trusted.
    Cold,
    /// The history is loaded and ticks arrive as the bus stores them.
    Live,
    /// The bus holds no tick of the symbol: subscribing is refused as unknown (once;
    /// the next subscribe asks the bus again).
    Absent,
}

impl SyncState {
    pub(super) fn new(clustered: bool) -> SyncState {
        SyncState {
            phase: if clustered { Phase::Cold } else { Phase::Local },
            ..SyncState::default()
        }
    }

    fn want(&mut self, slot: &SymbolSlot) {
        self.wanted += 1;
        if self.wanted == 1 {
            if let Some(interest) = &slot.interest {
                interest.mark(&slot.symbol);
            }
        }
    }

    fn unwant(&mut self, slot: &SymbolSlot) {
        self.wanted = self.wanted.saturating_sub(1);
        if self.wanted == 0 {
            if let Some(interest) = &slot.interest {
                interest.mark(&slot.symbol);
            }
        }
    }
}

/// Holds a symbol wanted: a subscribe waiting for its sync, or a CONFLATE
/// subscription (ring receivers count themselves). Dropping it lets go.
pub struct SyncWait {
    slot: Arc<SymbolSlot>,
}

impl SyncWait {
    pub(super) fn new(slot: Arc<SymbolSlot>, state: &mut SymbolState) -> SyncWait {
        state.sync.want(&slot);
        SyncWait { slot }
    }

    /// Has `waker` woken when the symbol is synced (at once if it already is).
    pub fn notify(&self, waker: &Waker) {
        let mut state = self.slot.lock();
        if state.sync.phase == Phase::Cold {
            if !state.sync.waiters.iter().any(|w| w.will_wake(waker)) {
                state.sync.waiters.push(waker.clone());
            }
        } else {
            waker.wake_by_ref();
        }
    }
}

impl Drop for SyncWait {
    fn drop(&mut self) {
        let mut state = self.slot.lock();
        state.sync.unwant(&self.slot);
    }
}

impl std::fmt::Debug for SyncWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SyncWait").field(&self.slot.symbol).finish()
    }
}

impl PartialEq for SyncWait {
    fn eq(&self, other: &SyncWait) -> bool {
        Arc::ptr_eq(&self.slot, &other.slot)
    }
}

impl Clone for SyncWait {
    fn clone(&self) -> SyncWait {
        SyncWait::new(Arc::clone(&self.slot), &mut self.slot.lock())
    }
}

/// Counts a ring receiver as wanting its symbol (`Receiver::join` and its drop).
pub(super) fn receiver_joined(slot: &SymbolSlot, state: &mut SymbolState) {
    if slot.interest.is_some() {
        state.sync.want(slot);
    }
}

pub(super) fn receiver_left(slot: &SymbolSlot, state: &mut SymbolState) {
    if slot.interest.is_some() {
        state.sync.unwant(slot);
    }
}

/// What `Hub::apply` did with a tick from the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The symbol's next tick (or one past a hole, which readers see as a gap).
    Accepted,
    /// At or below the symbol's seq: already here.
    Duplicate,
    /// From an older sync, or for a symbol nobody here wants any more.
    Ignored,
}

/// The bus's health as sessions see it: a generation bumped at each change.
#[derive(Default)]
pub(super) struct Bus {
    generation: AtomicU64,
    stale: AtomicBool,
}

impl Hub {
    /// Whether local subscriptions want `symbol`.
    pub fn wanted(&self, symbol: &str) -> bool {
        self.slot(symbol)
            .is_some_and(|slot| slot.lock().sync.wanted > 0)
    }

    /// Whether `symbol` was declared (`declare`): subscribable before its first tick.
    pub fn is_declared(&self, symbol: &str) -> bool {
        self.slot(symbol)
            .is_some_and(|slot| slot.lock().sync.declared)
    }

    /// The generation of `symbol`'s current sync (see `begin_sync`).
    pub fn sync_generation(&self, symbol: &str) -> Option<u64> {
        self.slot(symbol).map(|slot| slot.lock().sync.generation)
    }

    /// Starts (again) a sync of `symbol` with the bus: the symbol goes cold, its old
    /// state is dropped, and ticks of earlier syncs are ignored from now on. Returns
    /// the generation to give `apply` and `set_live`.
    pub fn begin_sync(&self, symbol: &str) -> Option<u64> {
        let slot = self.slot(symbol)?;
        let mut state = slot.lock();
        state.sync.generation += 1;
        state.sync.phase = Phase::Cold;
        reset(&slot, &mut state);
        Some(state.sync.generation)
    }

    /// Ends the sync of `symbol` if nothing wants it any more; `false` if something
    /// does (then the sync goes on).
    pub fn cool(&self, symbol: &str, generation: u64) -> bool {
        let Some(slot) = self.slot(symbol) else {
            return true;
        };
        let mut state = slot.lock();
        if state.sync.wanted > 0 && state.sync.generation == generation {
            return false;
        }
        if state.sync.generation == generation {
            state.sync.generation += 1;
            state.sync.phase = Phase::Cold;
            reset(&slot, &mut state);
        }
        true
    }

    /// Takes a tick the bus stored: `seq` as the bus sequenced it, `stored` the time
    /// (Unix ns) the bus stored it, for `--history-ttl`.
    pub fn apply(
        &self,
        generation: u64,
        symbol: &str,
        seq: u64,
        ltp: f64,
        event_time: i64,
        stored: i64,
    ) -> Result<Applied, PublishError> {
        check_tick(ltp, event_time)?;
        let Some(slot) = self.slot(symbol) else {
            return Ok(Applied::Ignored);
        };
        let mut state = slot.lock();
        if state.sync.generation != generation || state.sync.phase == Phase::Local {
            return Ok(Applied::Ignored);
        }
        if seq <= state.seq {
            return Ok(Applied::Duplicate);
        }
        if state.ring.as_ref().is_some_and(|_| seq > state.seq + 1) {
            // A hole the bus could not fill: the readers will see it as a gap.
            let missed = seq - state.seq - 1;
            self.stats().overflowed.fetch_add(missed, Ordering::Relaxed);
        }
        self.accept(&slot, &mut state, seq, ltp, event_time, stored);
        Ok(Applied::Accepted)
    }

    /// The sync of `symbol` caught up with the bus: subscribes waiting for it go on.
    /// `known`: the bus holds a tick of it, or it may be subscribed without one.
    pub fn set_live(&self, symbol: &str, generation: u64, known: bool) {
        let Some(slot) = self.slot(symbol) else {
            return;
        };
        let mut state = slot.lock();
        if state.sync.generation != generation {
            return;
        }
        state.sync.phase = if known { Phase::Live } else { Phase::Absent };
        for waker in mem::take(&mut state.sync.waiters) {
            waker.wake();
        }
    }

    /// For `subscribe_with` on a clustered hub: `Ok` when the symbol is live.
    pub(super) fn check_synced(
        &self,
        slot: &Arc<SymbolSlot>,
        state: &mut SymbolState,
    ) -> Result<(), SubscribeError> {
        match state.sync.phase {
            Phase::Live | Phase::Local => Ok(()),
            Phase::Absent => {
                // Refused once; the next subscribe asks the bus again.
                state.sync.phase = Phase::Cold;
                state.sync.generation += 1;
                Err(SubscribeError::Unknown)
            }
            Phase::Cold => Err(SubscribeError::Syncing(SyncWait::new(
                Arc::clone(slot),
                state,
            ))),
        }
    }

    /// Whether `symbol` is synced here (its last value and seq are the bus's).
    pub fn is_live(&self, symbol: &str) -> bool {
        self.slot(symbol)
            .is_some_and(|slot| matches!(slot.lock().sync.phase, Phase::Live | Phase::Local))
    }

    /// Marks the bus unreachable (`true`) or back, waking every session so each can
    /// tell its client (KIND_STALE, KIND_LIVE).
    pub fn set_bus_stale(&self, stale: bool) {
        let bus = &self.shared.bus;
        if bus.stale.swap(stale, Ordering::SeqCst) == stale {
            return;
        }
        bus.generation.fetch_add(1, Ordering::SeqCst);
        for entry in self.shared.symbols.iter() {
            let state = entry.value().lock();
            if let Some(ring) = &state.ring {
                ring.wake_all();
            }
            if let Some(conflation) = &state.conflation {
                conflation.wake_all();
            }
        }
    }

    /// Bumped at each change of `bus_stale`.
    pub fn bus_generation(&self) -> u64 {
        self.shared.bus.generation.load(Ordering::Acquire)
    }

    pub fn bus_stale(&self) -> bool {
        self.shared.bus.stale.load(Ordering::Acquire)
    }

    fn slot(&self, symbol: &str) -> Option<Arc<SymbolSlot>> {
        self.shared.symbols.get(symbol).map(|s| Arc::clone(&s))
    }
}

/// Forgets what the symbol's old sync brought (no subscription can be reading it: a
/// cold symbol has none, and `cool` only resets an unwanted one).
fn reset(slot: &SymbolSlot, state: &mut SymbolState) {
    state.seq = 0;
    state.last = None;
    state.history.clear();
    state.conflation = None;
    slot.published.store(0, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use std::{sync::atomic::AtomicUsize, task::Wake};

    use super::*;
    use crate::hub::{Bell, Delivery, HubConfig, ResumePoint};

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn now() -> i64 {
        crate::clock::now_unix_nanos()
    }

    /// Subscribes to "A", which is not synced yet: the wait.
    fn syncing(hub: &Hub, bell: &Bell) -> SyncWait {
        match hub.subscribe_with("A", None, Delivery::Channel(bell)) {
            Err(SubscribeError::Syncing(wait)) => wait,
            other => panic!("not syncing: {:?}", other.map(|s| s.seq)),
        }
    }

    fn clustered() -> (Hub, Arc<Interest>) {
        Hub::sequenced_by_cluster(HubConfig::default(), 42)
    }

    #[tokio::test]
    async fn a_subscribe_waits_for_the_sync_then_sees_the_buses_seq_and_epoch() {
        let (hub, interest) = clustered();
        let bell = Bell::new();
        let wait = syncing(&hub, &bell);
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        wait.notify(&Waker::from(Arc::clone(&woken)));
        assert_eq!(interest.changed().await, vec![Arc::from("A")]);
        assert!(hub.wanted("A"));
        let generation = hub.begin_sync("A").unwrap();
        for seq in 5..=7 {
            let applied = hub.apply(generation, "A", seq, 1.0, 1, now()).unwrap();
            assert_eq!(applied, Applied::Accepted);
        }
        assert_eq!(
            hub.apply(generation, "A", 6, 1.0, 1, 1),
            Ok(Applied::Duplicate)
        );
        assert_eq!(
            hub.apply(generation - 1, "A", 8, 1.0, 1, 1),
            Ok(Applied::Ignored)
        );
        assert_eq!(woken.0.load(Ordering::SeqCst), 0, "not live yet");
        hub.set_live("A", generation, true);
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        let sub = hub
            .subscribe_with("A", None, Delivery::Channel(&bell))
            .unwrap();
        drop(wait);
        assert_eq!((sub.seq, sub.epoch), (7, 42));
        assert!(hub.wanted("A"), "the receiver holds it");
        // A resume inside what the bus kept works; one before it does not.
        let replay = |seq| {
            let resume = Some(ResumePoint { epoch: 42, seq });
            hub.subscribe_with("A", resume, Delivery::Conflate)
                .unwrap()
                .replay
                .map(|r| r.iter().map(|t| t.seq).collect::<Vec<_>>())
        };
        assert_eq!(replay(5), Some(vec![6, 7]));
        assert_eq!(replay(3), None, "ticks 4 and 5 are not here");
    }

    #[tokio::test]
    async fn a_hole_from_the_bus_is_a_gap_for_readers_and_not_replayed_over() {
        let (hub, _interest) = clustered();
        let bell = Bell::new();
        let wait = syncing(&hub, &bell);
        let generation = hub.begin_sync("A").unwrap();
        hub.apply(generation, "A", 1, 1.0, 1, 1).unwrap();
        hub.set_live("A", generation, true);
        let mut sub = hub
            .subscribe_with("A", None, Delivery::Channel(&bell))
            .unwrap();
        drop(wait);
        hub.apply(generation, "A", 4, 1.0, 1, 1).unwrap();
        let next = sub.receiver.as_mut().unwrap().try_next().unwrap();
        assert_eq!(next.seq, 4, "the session turns 2..=3 into KIND_LAGGED");
        let resume = Some(ResumePoint { epoch: 42, seq: 1 });
        let again = hub
            .subscribe_with("A", resume, Delivery::Channel(&bell))
            .unwrap();
        assert!(again.replay.is_none(), "2 and 3 cannot be replayed");
    }

    #[tokio::test]
    async fn an_unknown_symbol_is_refused_once_and_an_unwanted_one_cools() {
        let (hub, _interest) = clustered();
        let bell = Bell::new();
        let wait = syncing(&hub, &bell);
        let generation = hub.begin_sync("A").unwrap();
        hub.set_live("A", generation, false);
        assert!(matches!(
            hub.subscribe_with("A", None, Delivery::Channel(&bell)),
            Err(SubscribeError::Unknown)
        ));
        drop(wait);
        assert!(!hub.wanted("A"));
        assert!(hub.cool("A", generation));
        assert!(!hub.is_live("A"));
        assert!(matches!(
            hub.subscribe_with("A", None, Delivery::Channel(&bell)),
            Err(SubscribeError::Syncing(_))
        ));
        assert!(hub.publish("A", 1.0, 0).is_err(), "the cluster sequences");
    }
}
