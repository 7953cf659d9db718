//! A symbol's ring of recent ticks, its receivers, and the bell that wakes a session.
//! `hub::publish` pushes each tick into its symbol's ring under the symbol's lock and
//! rings the bells of the ring's readers; each ALL/STRICT subscription of a session holds
//! a `Receiver` that takes ticks out in batches, and the session holds one `Bell` for
//! all its receivers.
//!
//! Why not a broadcast channel (async-broadcast, the first choice): each of its receivers
//! keeps an event listener that is re-registered on every poll, so a session woken for
//! one symbol polled the listeners of all its symbols, about a fifth of the server's CPU
//! (`benches/README.md`). Here a session arms its bell once, right before it sleeps;
//! a publish rings only armed bells, so a session is woken once however many of its
//! symbols tick, and reading costs one lock per batch, not per tick. A publish also
//! marks the reader's bit in the bell's `news`, so a woken session looks only at the
//! subscriptions that have something (12% faster in process, `benches/session.rs`).
//!
//! A publish can skip the bell: a bell with a `DirectSink` (a stream's HTTP/2
//! connection, `transport::http2::direct`) is offered each tick its reader would be
//! woken for, as long as the reader has taken everything before it; a sink that takes
//! it frames the tick into the connection's buffer then and there, and the reader's
//! position moves past it, so the session is neither woken nor polled (the NATS
//! server's publish into each interested connection's buffer). Every `DIRECT_RUN`-th
//! tick in a row goes the ordinary way, so the session hears of the ones sent for it
//! (`Receiver::take_direct`: its counts and last seq) within that many ticks.
//!
//! The bell also serves as the session's doorbell for client requests
//! (`requests_waker`): the request stream is polled with that waker and only when it
//! rang, since each poll walks tonic, hyper and h2 (h2's connection lock included) and
//! cost about a tenth of the CPU when done per message. Sharing the bell's allocation
//! keeps one allocation per stream for both.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Wake, Waker},
};

use super::{SymbolSlot, SymbolState, Tick};

/// Ticks in a row a reader may be sent through its bell's sink before one goes the
/// ordinary way (see the module docs): how far a direct stream's counters may trail.
const DIRECT_RUN: u32 = 32;

/// Where a publish may send a tick for a session without waking it (see the module
/// docs). Called under the symbol's lock: it must not block or call back into the hub.
pub trait DirectSink: Send + Sync + std::fmt::Debug {
    /// Sends `tick` if the stream is open for it now (idle, with window and buffer
    /// room); `false` leaves it to the session.
    fn offer(&self, tick: &Tick) -> bool;

    /// Whether `offer` may take a tick now, read without its lock: a hint, which `offer`
    /// checks again. `false` leaves the tick to the session.
    fn is_open(&self) -> bool;

    /// Ticks sent so far (the stream's counters add them to its own).
    fn sent(&self) -> u64;
}

/// The ticks of one symbol some reader has not taken yet: consecutive seqs ending at the
/// symbol's seq (but for a hole the bus could not fill), at most the channel capacity of
/// them. The hub keeps a ring only while it has readers.
pub(super) struct Ring {
    ticks: VecDeque<Arc<Tick>>,
    /// Kept inline (not behind a pointer each) because a publish walks them all. Indexed
    /// by `Receiver::index`: a leaving reader's entry is vacated, not removed, so the
    /// others' indices stay put, and the next reader to join takes it.
    readers: Vec<Reader>,
    vacant: Vec<usize>,
    /// No reader's position is below this: positions only grow, and a new reader starts
    /// past every tick in the ring. Dropping a tick below it needs no look at the readers.
    min_next: u64,
}

/// A receiver as its ring sees it.
struct Reader {
    /// `None`: the entry is vacant.
    bell: Option<Arc<BellState>>,
    /// The bit a publish sets in the bell's `news` (0: none yet).
    hint: u64,
    /// The first seq the receiver has not taken, written under the symbol's lock by
    /// `Receiver::take`. Here rather than in the receiver's own allocation because a
    /// publish has just walked this array, so the store finds the line in cache: one
    /// cold line fewer per take (callgrind's cache simulation). A tick sent through the
    /// bell's sink moves it too.
    next: u64,
    /// Ticks sent through the sink since the receiver last took (see `DIRECT_RUN`).
    run: u32,
    /// This publish may offer the tick to the sink (`ring_bells`' first pass).
    offer: bool,
    /// The bell's sink as the receiver joined, so that a publish need not read the
    /// bell's line to find it (`None`: the sink came later, or there is none).
    sink: Option<Arc<dyn DirectSink>>,
}

impl Ring {
    /// Appends `tick` (the symbol's next seq), dropping the oldest past `capacity`.
    /// Returns whether the dropped tick was one some reader had not taken yet.
    pub(super) fn push(&mut self, tick: Arc<Tick>, capacity: usize) -> bool {
        let mut overflowed = false;
        if self.ticks.len() >= capacity {
            if let Some(oldest) = self.ticks.pop_front() {
                if oldest.seq >= self.min_next {
                    self.min_next = self
                        .readers
                        .iter()
                        .filter(|r| r.bell.is_some())
                        .map(|r| r.next)
                        .min()
                        .unwrap_or(u64::MAX);
                    overflowed = self.min_next <= oldest.seq;
                }
            }
        }
        self.ticks.push_back(tick);
        overflowed
    }

    /// Sends `tick` through the sink of every reader that can take it that way, and
    /// marks the news of the others and wakes those that sleep. Call it after the
    /// symbol's published seq is stored.
    pub(super) fn ring_bells(&mut self, tick: &Tick) {
        // First every sink's flag, with no locked instruction in between: each sink is a
        // cold line, and an offer's lock would keep the next line's load from starting,
        // so read this way their misses overlap instead of queueing (`perf annotate`: the
        // two cold loads were most of the publish's own time).
        for reader in &mut self.readers {
            let Some(bell) = &reader.bell else {
                continue;
            };
            // Only a reader with nothing untaken: its stream sends in seq order.
            reader.offer = reader.next == tick.seq
                && reader.run < DIRECT_RUN
                && reader
                    .sink
                    .as_ref()
                    .or_else(|| bell.sink.get())
                    .is_some_and(|sink| sink.is_open());
        }
        let mut min_next = u64::MAX;
        for reader in &mut self.readers {
            let Some(bell) = &reader.bell else {
                continue;
            };
            if reader.offer {
                if let Some(sink) = reader.sink.as_ref().or_else(|| bell.sink.get()) {
                    if sink.offer(tick) {
                        reader.next += 1;
                        reader.run += 1;
                        min_next = min_next.min(reader.next);
                        continue;
                    }
                }
            }
            bell.ring(reader.hint);
            min_next = min_next.min(reader.next);
        }
        self.trim(min_next);
    }

    /// Drops the ticks every reader has taken (`min_next`: the lowest reader position,
    /// found by the walk that just rang them). The ring then holds what some reader
    /// still lacks, not `capacity` ticks of every symbol with readers: with readers
    /// that keep up it is about empty, and the memory goes with the laggards.
    fn trim(&mut self, min_next: u64) {
        self.min_next = min_next;
        while self.ticks.front().is_some_and(|t| t.seq < min_next) {
            self.ticks.pop_front();
        }
    }

    /// Marks every reader's news and wakes those that sleep, with no tick to send.
    pub(super) fn wake_all(&self) {
        for reader in &self.readers {
            if let Some(bell) = &reader.bell {
                bell.ring(reader.hint);
            }
        }
    }

    pub(super) fn reader_count(&self) -> usize {
        self.readers.len() - self.vacant.len()
    }
}

/// One subscription's read position in a symbol's ring. Dropping it leaves the ring;
/// the ring is freed with its last receiver.
pub struct Receiver {
    slot: Arc<SymbolSlot>,
    /// Its entry in the ring's `readers`.
    index: usize,
    /// The first seq not taken yet.
    next: u64,
    /// The last seq sent through the bell's sink that the session has not heard of
    /// (0: none; seqs start at 1).
    direct_last: u64,
}

impl Receiver {
    /// A receiver of every tick after the symbol's current seq, rung through `bell`.
    /// `state` is the symbol's locked state.
    pub(super) fn join(slot: Arc<SymbolSlot>, state: &mut SymbolState, bell: &Bell) -> Receiver {
        let next = state.seq + 1;
        let reader = Reader {
            bell: Some(Arc::clone(&bell.state)),
            hint: 0,
            next,
            run: 0,
            offer: false,
            sink: bell.state.sink.get().cloned(),
        };
        super::remote::receiver_joined(&slot, state);
        let ring = state.ring.get_or_insert_with(|| Ring {
            ticks: VecDeque::new(),
            readers: Vec::new(),
            vacant: Vec::new(),
            min_next: next,
        });
        let index = match ring.vacant.pop() {
            Some(index) => {
                ring.readers[index] = reader;
                index
            }
            None => {
                ring.readers.push(reader);
                ring.readers.len() - 1
            }
        };
        Receiver {
            slot,
            index,
            next,
            direct_last: 0,
        }
    }

    /// Whether a tick this receiver has not taken has been published. Lock-free.
    pub fn has_news(&self) -> bool {
        self.slot.published.load(Ordering::SeqCst) >= self.next
    }

    /// Ticks published that this receiver has not taken (some may be dropped already).
    pub fn pending(&self) -> u64 {
        (self.slot.published.load(Ordering::Acquire) + 1).saturating_sub(self.next)
    }

    /// Moves up to `max` untaken ticks, oldest first, to `out`, under one lock; returns
    /// how many. Ticks the ring dropped before they were taken show as a seq gap.
    pub fn take(&mut self, max: usize, out: &mut VecDeque<Arc<Tick>>) -> usize {
        self.take_each(max, |tick| out.push_back(tick))
    }

    /// `take`, but the oldest tick is returned rather than queued: a lone tick, the
    /// common case, then never touches `out` (a cold line per subscription).
    pub fn take_first(&mut self, max: usize, out: &mut VecDeque<Arc<Tick>>) -> Option<Arc<Tick>> {
        let mut first = None;
        self.take_each(max, |tick| match first {
            None => first = Some(tick),
            Some(_) => out.push_back(tick),
        });
        first
    }

    /// The last seq sent through the bell's sink since the last call, as of the last
    /// take or `sync`.
    pub fn take_direct(&mut self) -> Option<u64> {
        Some(std::mem::take(&mut self.direct_last)).filter(|&last| last > 0)
    }

    /// Hears of the ticks sent through the bell's sink without taking any (for
    /// `take_direct` before the subscription ends).
    pub fn sync(&mut self) {
        self.take_each(0, |_| {});
    }

    fn take_each(&mut self, max: usize, mut each: impl FnMut(Arc<Tick>)) -> usize {
        let mut state = self.slot.lock();
        let Some(ring) = state.ring.as_mut() else {
            return 0;
        };
        if let Some(reader) = ring.readers.get_mut(self.index) {
            // Only the sink moves the ring's position past this one's.
            if reader.next > self.next {
                self.direct_last = reader.next - 1;
                self.next = reader.next;
            }
            reader.run = 0;
        }
        let Some(first) = ring.ticks.front().map(|t| t.seq) else {
            return 0;
        };
        let start = self.next.max(first);
        let guess = (start - first) as usize;
        // Seqs are consecutive but where the bus left a hole (`remote`): there, find
        // the place by seq, not by the distance from the front (which would also run
        // past the end for a reader that joined after the hole).
        let skip = match ring.ticks.get(guess) {
            Some(t) if t.seq == start => guess,
            None if ring.ticks.back().is_some_and(|t| t.seq < start) => ring.ticks.len(),
            _ => ring.ticks.partition_point(|t| t.seq < start),
        };
        let n = ring.ticks.len().saturating_sub(skip).min(max);
        ring.ticks
            .range(skip..skip + n)
            .cloned()
            .for_each(&mut each);
        let last = n.checked_sub(1).and_then(|i| ring.ticks.get(skip + i));
        self.next = last.map_or(start, |t| t.seq + 1);
        if let Some(reader) = ring.readers.get_mut(self.index) {
            reader.next = self.next;
        }
        n
    }

    /// Sets the bit this receiver marks in its bell's news from now on (a lock and a
    /// walk of the symbol's readers: for subscription changes, not per tick). A tick
    /// published before may have marked the old bit: after a change, look at every
    /// receiver once.
    pub fn set_hint(&self, bit: u64) {
        let mut state = self.slot.lock();
        let mine = state
            .ring
            .as_mut()
            .and_then(|r| r.readers.get_mut(self.index));
        if let Some(reader) = mine {
            reader.hint = bit;
        }
    }

    /// The next untaken tick, if any (one lock per tick: for tests and benchmarks).
    pub fn try_next(&mut self) -> Option<Arc<Tick>> {
        let mut next = None;
        self.take_each(1, |tick| next = Some(tick));
        next
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut state = self.slot.lock();
        if let Some(ring) = state.ring.as_mut() {
            if let Some(reader) = ring.readers.get_mut(self.index) {
                reader.bell = None;
                reader.sink = None;
                reader.hint = 0;
                ring.vacant.push(self.index);
            }
            if ring.reader_count() == 0 {
                state.ring = None;
            }
        }
        super::remote::receiver_left(&self.slot, &mut state);
    }
}

/// A session's wake-up, shared by all its receivers. See the module docs.
pub struct Bell {
    state: Arc<BellState>,
    /// The task registered in `state.task`, kept here so that the common case (the same
    /// task as last time) costs a comparison instead of the lock.
    registered: Option<Waker>,
    /// Wakes the task and sets `state.rung`; see `answer_requests`.
    requests_waker: Waker,
}

struct BellState {
    armed: AtomicBool,
    /// The hint bits of the receivers that got a tick since the session last took them.
    news: AtomicU64,
    /// The request stream woke `requests_waker` since the last `answer_requests`;
    /// true at first, as the requests have never been polled.
    rung: AtomicBool,
    /// Kept across rings, so one registration serves every wake-up.
    task: Mutex<Option<Waker>>,
    /// Where a publish may send this session's ticks itself (see the module docs).
    sink: std::sync::OnceLock<Arc<dyn DirectSink>>,
}

impl Default for Bell {
    fn default() -> Bell {
        let state = Arc::new(BellState {
            armed: AtomicBool::new(false),
            news: AtomicU64::new(0),
            rung: AtomicBool::new(true),
            task: Mutex::new(None),
            sink: std::sync::OnceLock::new(),
        });
        Bell {
            requests_waker: Waker::from(Arc::clone(&state)),
            state,
            registered: None,
        }
    }
}

impl Bell {
    pub fn new() -> Bell {
        Bell::default()
    }

    /// Whether publishes may send ticks through a sink (see `set_sink`).
    pub fn has_sink(&self) -> bool {
        self.state.sink.get().is_some()
    }

    /// Lets publishes send ticks through `sink` from now on (see the module docs); a
    /// bell takes one sink for its life.
    pub fn set_sink(&self, sink: Arc<dyn DirectSink>) {
        let _ = self.state.sink.set(sink);
    }

    /// A waker that rings this bell's request doorbell: for other news that must be
    /// looked at outside the receivers (a cluster's sync of a symbol).
    pub fn doorbell(&self) -> Waker {
        self.requests_waker.clone()
    }

    /// Has `waker`'s task woken by the next tick of any receiver of this bell. Arm it
    /// before the last look at the receivers (`take_news`, `has_news`): a tick published
    /// after that look then rings, and one published before it is seen by the look.
    /// (All SeqCst: the publisher stores the seq, marks `news`, then reads `armed`; the
    /// session stores `armed`, then takes `news` or reads the seq; at least one of them
    /// sees the other's store.)
    pub fn arm(&mut self, waker: &Waker) {
        self.register(waker);
        self.state.armed.store(true, Ordering::SeqCst);
    }

    /// Records `cx`'s task as the one to wake. If the request stream rang since the
    /// last answer, silences it and returns the waker to poll the requests with.
    pub fn answer_requests(&mut self, cx: &Context<'_>) -> Option<Waker> {
        // Register before reading the flag, so a ring in between is not lost: the
        // ringer takes the lock after setting the flag.
        self.register(cx.waker());
        self.state
            .rung
            .swap(false, Ordering::AcqRel)
            .then(|| self.requests_waker.clone())
    }

    /// Rings for the requests from inside: they were left unread (the reply queue was
    /// full) and must be polled again next time.
    pub fn ring_requests(&self) {
        self.state.rung.store(true, Ordering::Release);
    }

    fn register(&mut self, waker: &Waker) {
        if !self.registered.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *self.state.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker.clone());
            self.registered = Some(waker.clone());
        }
    }

    /// Whether the bell is still armed for `waker`'s task: no tick has rung it since
    /// `arm` (a ring disarms it), so a new look at the receivers would find nothing
    /// that this task will not be woken for.
    pub fn still_armed_for(&self, waker: &Waker) -> bool {
        self.registered.as_ref().is_some_and(|w| w.will_wake(waker))
            && self.state.armed.load(Ordering::SeqCst)
    }

    /// Silences the request doorbell without polling requests; whether it had rung.
    pub fn take_requests_rung(&self) -> bool {
        self.state.rung.swap(false, Ordering::AcqRel)
    }

    /// Whether the request stream rang since the last `answer_requests`.
    pub fn requests_rung(&self) -> bool {
        self.state.rung.load(Ordering::Acquire)
    }

    /// The hint bits marked since the last take, left in place.
    pub fn peek_news(&self) -> u64 {
        self.state.news.load(Ordering::Relaxed)
    }

    /// The hint bits marked since the last take (see `Receiver::set_hint`).
    pub fn take_news(&self) -> u64 {
        self.state.news.swap(0, Ordering::SeqCst)
    }
}

impl Wake for BellState {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.rung.store(true, Ordering::Release);
        self.wake_task();
    }
}

impl BellState {
    fn wake_task(&self) {
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }

    fn ring(&self, hint: u64) {
        // Loads first: on a busy symbol most bits are marked and most bells rung already.
        if self.news.load(Ordering::SeqCst) & hint != hint {
            self.news.fetch_or(hint, Ordering::SeqCst);
        }
        if self.armed.load(Ordering::SeqCst) && self.armed.swap(false, Ordering::SeqCst) {
            self.wake_task();
        }
    }
}

#[cfg(test)]
mod tests;
