//! Ticks a publish frames straight into a connection's buffer (`hub::DirectSink`, the
//! NATS server's publish into each interested connection's buffer): each stream's
//! sink, and the side buffer of its connection they fill. `hub::ring` offers the
//! ticks; `conn::direct` opens a stream's sink while the stream is idle, lends it the
//! stream's window and part of the connection's, and moves the side buffer into its
//! own at the start of every pass, so what publishes framed leaves in the pass's one
//! write and always ahead of anything the pass adds.

use std::sync::{
    atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    Arc, Mutex, MutexGuard,
};

use bytes::BytesMut;

use super::{conn::HIGH_WATER, frame, stream::Shared};
use crate::hub::{DirectSink, Tick};

/// What publishes framed since the connection's last pass, and the connection window
/// lent to them.
#[derive(Default)]
pub struct SideBuffer {
    pub out: BytesMut,
    pub conn_budget: i64,
}

pub fn lock(m: &Mutex<SideBuffer>) -> MutexGuard<'_, SideBuffer> {
    // A panic while holding it leaves bytes and a number: still usable.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One stream's sink. `open` and `budget` change only under the side buffer's lock.
/// Aligned to a cache line so that the publish's first look (`open`) brings in every
/// field its offer reads: a sink is a cold line per delivery, and one straddling two
/// lines costs a second miss.
#[repr(align(64))]
pub struct StreamSink {
    id: u32,
    shared: Arc<Shared>,
    /// The stream is idle: its body's last poll was `Pending` with nothing of its own
    /// held, so a tick framed now is next in its order.
    pub(super) open: AtomicBool,
    /// The stream's send window while `open` (the connection takes it back on close).
    pub(super) budget: AtomicI64,
    /// Ticks framed here, for the stream's counters (`StreamInfo::sent`).
    sent: AtomicU64,
}

impl std::fmt::Debug for StreamSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSink").field("id", &self.id).finish()
    }
}

impl StreamSink {
    pub fn new(id: u32, shared: Arc<Shared>) -> Arc<StreamSink> {
        Arc::new(StreamSink {
            id,
            shared,
            open: AtomicBool::new(false),
            budget: AtomicI64::new(0),
            sent: AtomicU64::new(0),
        })
    }
}

impl DirectSink for StreamSink {
    fn offer(&self, tick: &Tick) -> bool {
        // Read again under the lock; a stale `false` only sends the tick the usual way.
        if !self.open.load(Ordering::Relaxed) {
            return false;
        }
        let n = tick.framed.len();
        let mut side = lock(&self.shared.direct);
        let budget = self.budget.load(Ordering::Relaxed);
        let fits = n as i64 <= budget
            && n as i64 <= side.conn_budget
            && n <= frame::DEFAULT_MAX_FRAME as usize
            // Bounded as the connection's own buffer, besides the window lent.
            && side.out.len() + frame::HEAD + n <= HIGH_WATER;
        if !self.open.load(Ordering::Relaxed) || !fits {
            return false;
        }
        let wake = side.out.is_empty();
        frame::put_head(&mut side.out, n, frame::DATA, 0, self.id);
        side.out.extend_from_slice(&tick.framed);
        side.conn_budget -= n as i64;
        self.budget.store(budget - n as i64, Ordering::Relaxed);
        // Written under the lock only: no locked add needed.
        let sent = self.sent.load(Ordering::Relaxed);
        self.sent.store(sent + 1, Ordering::Relaxed);
        drop(side);
        if wake {
            self.shared.task.wake();
        }
        true
    }

    fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

/// A stream's sink in its request's extensions, for `grpc::routes` to give the
/// session (only with `Options::direct_publish`).
#[derive(Clone)]
pub struct Direct(pub Arc<StreamSink>);
