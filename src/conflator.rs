//! CONFLATE delivery: a `Conflator` is one subscriber's fold of ticks, filled by the
//! hub's publisher (`hub::publish`) and drained by the session at the subscriber's rate.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc, Mutex, MutexGuard,
};

use futures_util::task::AtomicWaker;

use crate::hub::Tick;

/// Ticks folded for a CONFLATE subscriber: the publisher adds every tick (under the
/// symbol's lock, so ranges are exact and consecutive) and wakes the session when the
/// first one of a new range arrives; the session takes the fold at its own pace. Memory
/// is constant however slow the session is.
#[derive(Default)]
pub struct Conflator {
    fold: Mutex<Fold>,
    pending: AtomicBool,
    waker: AtomicWaker,
}

/// Everything since the last take: ticks `first_seq..=last.seq`.
#[derive(Debug, Clone)]
pub struct Fold {
    pub first_seq: u64,
    pub count: u64,
    pub high: f64,
    pub low: f64,
    pub last: Option<Arc<Tick>>,
}

impl Default for Fold {
    fn default() -> Self {
        Fold {
            first_seq: 0,
            count: 0,
            high: f64::MIN,
            low: f64::MAX,
            last: None,
        }
    }
}

impl Conflator {
    fn lock(&self) -> MutexGuard<'_, Fold> {
        self.fold.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn add(&self, tick: &Arc<Tick>) {
        let first = {
            let mut fold = self.lock();
            if fold.count == 0 {
                fold.first_seq = tick.seq;
            }
            fold.count += 1;
            fold.high = fold.high.max(tick.ltp);
            fold.low = fold.low.min(tick.ltp);
            fold.last = Some(Arc::clone(tick));
            fold.count == 1
        };
        if first {
            self.pending.store(true, Ordering::Release);
            self.waker.wake();
        }
    }

    /// Whether ticks wait to be taken.
    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// The session's task, to wake when a new range starts.
    pub fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    /// Everything folded since the last take, if anything.
    pub fn take(&self) -> Option<Fold> {
        let mut fold = self.lock();
        self.pending.store(false, Ordering::Release);
        (fold.count > 0).then(|| std::mem::take(&mut *fold))
    }
}
