//! CONFLATE delivery, owned by the hub: a symbol's `Conflation` is fed by the hub's
//! publisher (`Hub::publish`), and each CONFLATE subscriber's `Conflator` (held by its
//! session, as a ring `Receiver` is) takes from it, at the subscriber's rate,
//! everything since its last take. The session decides when to take (`session::policy`);
//! the fold itself lives here, beside the ring, so the dependency runs one way.
//!
//! The publisher's cost per tick does not grow with the number of conflating
//! subscribers: it updates one open segment, not one fold per subscriber. Segments
//! split the symbol's recent ticks at the points where some subscriber last took, so a
//! take combines the segments after its own start; a segment nobody starts at any more
//! is merged into its predecessor, so there are never more segments than subscribers
//! plus one, however slow they are.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    task::Waker,
};

use futures_util::task::AtomicWaker;

use super::Tick;

/// The conflating subscribers of one symbol, shared by the hub and their `Conflator`s.
pub(crate) struct Conflation {
    /// Seq of the latest tick folded in; written under `inner`'s lock.
    published: AtomicU64,
    inner: Mutex<Segments>,
}

struct Segments {
    /// Keyed by first seq; each runs up to the next key, the last up to `last`.
    segments: BTreeMap<u64, Segment>,
    last: Option<Arc<Tick>>,
    /// Subscribers waiting for the next tick; woken (and forgotten) by it.
    waiting: Vec<Arc<Signal>>,
}

struct Segment {
    high: f64,
    low: f64,
    /// Subscribers whose next range starts here.
    starts: usize,
}

impl Segment {
    const EMPTY: Segment = Segment {
        high: f64::MIN,
        low: f64::MAX,
        starts: 0,
    };

    fn absorb(&mut self, high: f64, low: f64) {
        self.high = self.high.max(high);
        self.low = self.low.min(low);
    }
}

#[derive(Default)]
struct Signal {
    waker: AtomicWaker,
    /// Whether this subscriber is in `waiting`, so it is listed once.
    listed: AtomicBool,
}

/// What a take covers: ticks `first_seq..=last.seq`, `count` of them.
#[derive(Debug, Clone)]
pub struct Fold {
    pub first_seq: u64,
    pub count: u64,
    pub high: f64,
    pub low: f64,
    pub last: Arc<Tick>,
}

impl Conflation {
    /// A conflation for a symbol whose latest tick is `last` (seq `seq`).
    pub(crate) fn new(seq: u64, last: Option<Arc<Tick>>) -> Arc<Conflation> {
        Arc::new(Conflation {
            published: AtomicU64::new(seq),
            inner: Mutex::new(Segments {
                segments: BTreeMap::new(),
                last,
                waiting: Vec::new(),
            }),
        })
    }

    // A poisoned lock only means a panic mid-update of plain numbers; keep serving.
    fn lock(&self) -> MutexGuard<'_, Segments> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Folds in the symbol's next tick. The hub calls this in seq order (under the
    /// symbol's lock), so ranges stay exact and consecutive.
    pub(crate) fn add(&self, tick: &Arc<Tick>) {
        let mut inner = self.lock();
        if let Some(mut open) = inner.segments.last_entry() {
            open.get_mut().absorb(tick.ltp, tick.ltp);
        }
        inner.last = Some(Arc::clone(tick));
        // Stored under the lock: a subscriber that lists itself after this sees it.
        self.published.store(tick.seq, Ordering::Release);
        for signal in inner.waiting.drain(..) {
            signal.listed.store(false, Ordering::Release);
            signal.waker.wake();
        }
    }

    /// A new subscriber whose first range starts after `seq`, the symbol's current seq
    /// (the hub holds the symbol's lock, so no tick comes in between).
    pub(crate) fn join(self: &Arc<Self>, seq: u64) -> Conflator {
        self.lock().start_at(seq + 1);
        Conflator {
            conflation: Arc::clone(self),
            wanted: None,
            start: seq + 1,
            signal: Arc::default(),
        }
    }

    /// Wakes every waiting subscriber (the bus's health changed).
    pub(crate) fn wake_all(&self) {
        let mut inner = self.lock();
        for signal in inner.waiting.drain(..) {
            signal.listed.store(false, Ordering::Release);
            signal.waker.wake();
        }
    }

    /// Whether any `Conflator` still uses this.
    pub(crate) fn is_used(self: &Arc<Self>) -> bool {
        Arc::strong_count(self) > 1
    }
}

impl Segments {
    fn start_at(&mut self, seq: u64) {
        self.segments.entry(seq).or_insert(Segment::EMPTY).starts += 1;
    }

    fn leave(&mut self, seq: u64) {
        let Some(segment) = self.segments.get_mut(&seq) else {
            return;
        };
        segment.starts = segment.starts.saturating_sub(1);
        if segment.starts > 0 {
            return;
        }
        if let Some(gone) = self.segments.remove(&seq) {
            if let Some((_, before)) = self.segments.range_mut(..seq).next_back() {
                before.absorb(gone.high, gone.low);
            }
        }
    }
}

/// One CONFLATE subscription's position in its symbol's conflation. Dropping it
/// (unsubscribe, stream end) releases what it held.
pub struct Conflator {
    conflation: Arc<Conflation>,
    /// On a clustered hub: keeps the symbol wanted while this subscription lives.
    wanted: Option<super::SyncWait>,
    /// First seq of the next range.
    start: u64,
    signal: Arc<Signal>,
}

impl Conflator {
    /// Keeps the symbol wanted on a clustered hub while this conflator lives.
    pub(crate) fn hold(&mut self, wanted: super::SyncWait) {
        self.wanted = Some(wanted);
    }

    /// Whether ticks wait to be taken.
    pub fn is_pending(&self) -> bool {
        self.conflation.published.load(Ordering::Acquire) >= self.start
    }

    /// The session's task, to wake at the next tick.
    pub fn register(&self, waker: &Waker) {
        self.signal.waker.register(waker);
        if !self.signal.listed.swap(true, Ordering::AcqRel) {
            self.conflation
                .lock()
                .waiting
                .push(Arc::clone(&self.signal));
        }
    }

    /// Everything since the last take, if anything.
    pub fn take(&mut self) -> Option<Fold> {
        if !self.is_pending() {
            return None;
        }
        let mut inner = self.conflation.lock();
        let last = inner.last.clone().filter(|t| t.seq >= self.start)?;
        let (high, low) = inner
            .segments
            .range(self.start..)
            .fold((f64::MIN, f64::MAX), |(h, l), (_, s)| {
                (h.max(s.high), l.min(s.low))
            });
        let fold = Fold {
            first_seq: self.start,
            count: last.seq - self.start + 1,
            high,
            low,
            last,
        };
        let next = fold.last.seq + 1;
        inner.start_at(next);
        inner.leave(self.start);
        self.start = next;
        Some(fold)
    }
}

impl Drop for Conflator {
    fn drop(&mut self) {
        let mut inner = self.conflation.lock();
        inner.leave(self.start);
        if self.signal.listed.load(Ordering::Acquire) {
            inner.waiting.retain(|s| !Arc::ptr_eq(s, &self.signal));
        }
    }
}

impl super::Hub {
    /// Drops the fold state of symbols with no CONFLATE subscriber left. Publishing
    /// prunes lazily too; this sweep covers symbols that stopped ticking. (Rings go with
    /// their last receiver.)
    pub fn prune_idle_conflations(&self) -> usize {
        let mut pruned = 0;
        for entry in self.shared.symbols.iter() {
            let mut state = entry.value().lock();
            if state.conflation.as_ref().is_some_and(|c| !c.is_used()) {
                state.conflation = None;
                pruned += 1;
            }
        }
        pruned
    }

    /// `prune_idle_conflations` every `every` (at least 10 ms) until `shutdown`.
    pub async fn prune_idle_conflations_every(
        self,
        every: std::time::Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(every.max(std::time::Duration::from_millis(10)));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {
                    let pruned = self.prune_idle_conflations();
                    if pruned > 0 {
                        tracing::debug!(pruned, "idle conflation state freed");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{Delivery, Hub, HubConfig};

    fn hub() -> Hub {
        Hub::new(HubConfig {
            allow_unknown_symbols: true,
            ..HubConfig::default()
        })
    }

    fn conflator(hub: &Hub, symbol: &str) -> Conflator {
        let sub = hub
            .subscribe_with(symbol, None, Delivery::Conflate)
            .unwrap();
        sub.conflator.unwrap()
    }

    fn summary(fold: &Fold) -> (u64, u64, f64, f64, u64) {
        (
            fold.first_seq,
            fold.count,
            fold.high,
            fold.low,
            fold.last.seq,
        )
    }

    #[test]
    fn takes_cover_consecutive_ranges_with_their_extremes() {
        let hub = hub();
        hub.publish("A", 5.0, 0).unwrap();
        let mut c = conflator(&hub, "A");
        assert!(!c.is_pending());
        assert!(c.take().is_none());
        for p in [3.0, 9.0, 4.0] {
            hub.publish("A", p, 0).unwrap();
        }
        assert!(c.is_pending());
        assert_eq!(c.take().map(|f| summary(&f)), Some((2, 3, 9.0, 3.0, 4)));
        assert!(c.take().is_none());
        hub.publish("A", 7.0, 0).unwrap();
        assert_eq!(c.take().map(|f| summary(&f)), Some((5, 1, 7.0, 7.0, 5)));
    }

    #[test]
    fn subscribers_taking_at_different_points_each_get_their_own_range() {
        let hub = hub();
        let mut fast = conflator(&hub, "A");
        let mut slow = conflator(&hub, "A");
        let mut prices = [10.0, 2.0, 8.0, 30.0, 6.0, 1.5, 7.0].into_iter();
        let mut publish = |n| {
            for _ in 0..n {
                hub.publish("A", prices.next().unwrap(), 0).unwrap();
            }
        };
        publish(2);
        assert_eq!(fast.take().map(|f| summary(&f)), Some((1, 2, 10.0, 2.0, 2)));
        publish(2);
        assert_eq!(fast.take().map(|f| summary(&f)), Some((3, 2, 30.0, 8.0, 4)));
        let mut late = conflator(&hub, "A");
        publish(3);
        assert_eq!(slow.take().map(|f| summary(&f)), Some((1, 7, 30.0, 1.5, 7)));
        assert_eq!(late.take().map(|f| summary(&f)), Some((5, 3, 7.0, 1.5, 7)));
        assert_eq!(fast.take().map(|f| summary(&f)), Some((5, 3, 7.0, 1.5, 7)));
    }

    #[test]
    fn segments_stay_bounded_by_subscribers_and_are_freed_on_drop() {
        let hub = hub();
        let mut slow = conflator(&hub, "A");
        let mut fast: Vec<Conflator> = (0..3).map(|_| conflator(&hub, "A")).collect();
        for round in 0..100 {
            hub.publish("A", 1.0 + f64::from(round), 0).unwrap();
            fast[round as usize % 3].take();
        }
        let conflation = Arc::clone(&slow.conflation);
        assert!(conflation.lock().segments.len() <= 5);
        let all = slow.take().unwrap();
        assert_eq!(
            (all.first_seq, all.count, all.high, all.low),
            (1, 100, 100.0, 1.0)
        );
        drop(slow);
        fast.clear();
        assert!(conflation.lock().segments.is_empty());
        // Only the hub and this test hold it now: the next tick lets it go.
        assert_eq!(Arc::strong_count(&conflation), 2);
    }

    #[test]
    fn a_waiting_subscriber_is_woken_once_by_the_next_tick() {
        use std::task::Wake;
        #[derive(Default)]
        struct Count(AtomicU64);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let hub = hub();
        let c = conflator(&hub, "A");
        let count = Arc::new(Count::default());
        let waker = Waker::from(Arc::clone(&count));
        c.register(&waker);
        c.register(&waker);
        hub.publish("A", 1.0, 0).unwrap();
        hub.publish("A", 2.0, 0).unwrap();
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        drop(c);
        hub.publish("A", 3.0, 0).unwrap();
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
    }
}
