//! The delivery side of a session: after the bell names the subscriptions with news,
//! take their ticks round-robin (a batch under one lock), turn a seq gap into an exact
//! KIND_LAGGED just before the next tick (or end a STRICT stream), warn of a backlog
//! past half the ring (KIND_BACKLOG), take CONFLATE folds when due, and arm the bell
//! before `Pending`. `requests` changes the set this walks.

use std::{
    future::Future as _,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::Instant;
use tonic::Status;

use super::{
    policy::{backlog, conflated, lagged, Feed, BACKLOG_CHECK_EVERY, TAKE_BATCH},
    Ending, Outbound, Policy, Session, SAMPLE_EVERY_NANOS,
};
use crate::{clock, hub::Tick, ops::metrics::ended};

/// The indices of the set bits of a hint mask, lowest first.
struct Bits(u64);

impl Iterator for Bits {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.0 == 0 {
            return None;
        }
        let idx = self.0.trailing_zeros() as usize;
        self.0 &= self.0 - 1;
        Some(idx)
    }
}

impl Session {
    /// The next live message of any subscription, round-robin: a tick, a conflated
    /// range that fell due, or a notice (lag, backlog) with its tick held for the next
    /// call. `Err` ends the stream (a STRICT subscription fell behind). Before it
    /// returns `Pending` it arms the bell and looks once more (see `Bell::arm`).
    pub(super) fn poll_ticks(&mut self, cx: &mut Context<'_>) -> Poll<Result<Outbound, Ending>> {
        let mut due: Option<Instant> = None;
        self.todo |= self.bell.take_news();
        if let Some(ready) = self.next_live(cx, &mut due) {
            return Poll::Ready(ready);
        }
        self.bell.arm(cx.waker());
        self.todo |= self.bell.take_news();
        if let Some(ready) = self.next_live(cx, &mut due) {
            return Poll::Ready(ready);
        }
        if let Some(due) = due {
            let timer = self
                .conflate_timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            if timer.deadline() != due {
                timer.as_mut().reset(due);
            }
            if timer.as_mut().poll(cx).is_ready() {
                // Already due: come straight back.
                cx.waker().wake_by_ref();
            }
        }
        self.fold();
        self.waiting = true;
        Poll::Pending
    }

    /// Whether a poll with `cx` now would only return `Pending` again, known without
    /// looking at the subscriptions: the last poll returned `Pending`, and since then
    /// no tick or request rang the bell, the credentials have not expired and the
    /// server is not shutting down. Streams with a CONFLATE subscription are never
    /// quiet (their timer and folds wake the task without the bell).
    ///
    /// Why: HTTP/2 polls a response body two or three times per wake-up (after each
    /// send and each grant of window), and each such poll cost a full look at the
    /// subscriptions, two thirds of this module's instructions per delivered tick.
    /// Every source that could make a poll productive has this task's waker, so one
    /// that fires after this check wakes the task again.
    pub fn is_quiet(&self, cx: &Context<'_>) -> bool {
        self.waiting
            && self.always == 0
            && self.bell.still_armed_for(cx.waker())
            && !(self.bell.requests_rung() && (self.requests.is_some() || !self.pending.is_empty()))
            && self.bus_seen == self.hub.bus_generation()
            && !self.shutdown.is_triggered()
            && !self.expiry.as_ref().is_some_and(|e| e.is_elapsed())
    }

    /// Reads what a poll with news reads first, down to the subscriptions the news names
    /// (see `transport::http2::ResponseBody::warm`), and returns a sum of it.
    pub fn warm(&self, depth: u8) -> u64 {
        match depth {
            // The session's first lines: flags, hints, and where its subscriptions are.
            0 => return self.todo ^ self.always ^ self.subs.len() as u64,
            // The bell's news, and the `/streams` counters the poll's `fold` stores to:
            // a store to a line not in cache stalls the next locked instruction.
            1 => {
                let info = &self.ticket.info;
                return self.bell.peek_news()
                    ^ info.sent.load(Ordering::Relaxed)
                    ^ info.lag_notices.load(Ordering::Relaxed);
            }
            _ => {}
        }
        let hinted = self.todo | self.always | self.bell.peek_news();
        let mut sum = hinted;
        for idx in Bits(hinted).take(4) {
            if let Some(sub) = self.subs.get(idx) {
                // Both ends of the entry: it may straddle two lines.
                sum = sum.wrapping_add(sub.last_seq) ^ u64::from(sub.warned);
                if let Feed::Channel { taken, .. } = &sub.feed {
                    sum = sum.wrapping_add(taken.len() as u64);
                }
            }
        }
        sum
    }

    /// One round-robin pass of `poll_ticks`; `due` gathers when the earliest CONFLATE
    /// message that is not due yet falls due.
    pub(super) fn next_live(
        &mut self,
        cx: &mut Context<'_>,
        due: &mut Option<Instant>,
    ) -> Option<Result<Outbound, Ending>> {
        let n = self.subs.len();
        // One division per pass, not per subscription: `%` showed as 7% of this function.
        let start = if n == 0 { 0 } else { self.cursor % n };
        if n <= 64 {
            // Visit only the hinted subscriptions, jumping from bit to bit: a pass over
            // every subscription, three per wake-up, was most of this function's
            // instructions with ten subscriptions and one of them ticking.
            let live = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
            let hinted = (self.todo | self.always) & live;
            let from_start = hinted & (u64::MAX << start);
            for idx in Bits(from_start).chain(Bits(hinted & !(u64::MAX << start))) {
                if let Some(found) = self.look_at(idx, cx, due) {
                    return Some(found);
                }
            }
            return None;
        }
        for i in 0..n {
            let idx = if start + i < n {
                start + i
            } else {
                start + i - n
            };
            if let Some(found) = self.look_at(idx, cx, due) {
                return Some(found);
            }
        }
        None
    }

    /// The next message of subscription `idx`, if it has one now.
    pub(super) fn look_at(
        &mut self,
        idx: usize,
        cx: &mut Context<'_>,
        due: &mut Option<Instant>,
    ) -> Option<Result<Outbound, Ending>> {
        let bit = 1u64 << (idx % 64);
        let sub = &mut self.subs[idx];
        let (receiver, taken) = match &mut sub.feed {
            Feed::Channel { receiver, taken } => (receiver, taken),
            Feed::Conflate {
                conflator,
                every,
                next_emit,
            } => {
                if !conflator.is_pending() {
                    conflator.register(cx.waker());
                    if !conflator.is_pending() {
                        return None;
                    }
                }
                let now = Instant::now();
                if now < *next_emit {
                    *due = Some(due.map_or(*next_emit, |d| d.min(*next_emit)));
                    return None;
                }
                let fold = conflator.take()?;
                *next_emit = now + *every;
                sub.last_seq = fold.last.seq;
                self.cursor = idx + 1;
                self.local.delivered += 1;
                self.local.dirty = true;
                return Some(Ok(Outbound::message(conflated(&fold))));
            }
        };
        let next = if taken.is_empty() {
            if !receiver.has_news() {
                self.todo &= !bit;
                return None;
            }
            let first = receiver.take_first(TAKE_BATCH, taken);
            if let Some(last) = receiver.take_direct() {
                // Sent by publishes straight into the connection (`hub::DirectSink`,
                // which counts them for `StreamInfo`).
                sub.last_seq = last;
            }
            first
        } else {
            taken.pop_front()
        };
        let Some(tick) = next else {
            self.todo &= !bit;
            return None;
        };
        // The ring starts after the snapshot's seq, so no tick repeats; a gap is
        // what the ring dropped before this stream took it.
        let dropped = tick.seq.saturating_sub(sub.last_seq + 1);
        if dropped > 0 && sub.policy == Policy::Strict {
            let status = Status::resource_exhausted(format!(
                "slow consumer: this stream fell {dropped} ticks behind on {} (STRICT); \
                 last seq delivered {} in epoch {}: resume from it",
                sub.symbol, sub.last_seq, tick.epoch
            ));
            return Some(Err((ended::SLOW_CONSUMER, status)));
        }
        sub.last_seq = tick.seq;
        self.cursor = idx + 1;
        if dropped > 0 {
            let notice = lagged(&sub.symbol, dropped);
            tracing::debug!(parent: &self.span, symbol = %notice.symbol, dropped, "stream lagged");
            self.local.dropped += dropped;
            self.local.lag_notices += 1;
            self.local.dirty = true;
            self.held = Some(tick);
            return Some(Ok(Outbound::message(notice)));
        }
        sub.unchecked += 1;
        if sub.unchecked >= BACKLOG_CHECK_EVERY {
            sub.unchecked = 0;
            let capacity = self.hub.config().channel_capacity.max(1);
            let depth = receiver.pending() as usize + taken.len();
            if depth * 2 >= capacity && !sub.warned {
                sub.warned = true;
                let age = clock::now_unix_nanos() - tick.event_time_unix_nanos;
                let age = Duration::from_nanos(age.max(0) as u64);
                let notice = backlog(&sub.symbol, depth, capacity, age);
                tracing::debug!(parent: &self.span, symbol = %notice.symbol, depth, "backlog warning");
                self.held = Some(tick);
                return Some(Ok(Outbound::message(notice)));
            }
            if depth * 4 < capacity {
                sub.warned = false;
            }
        }
        Some(Ok(self.deliver(tick)))
    }

    /// Counts a tick going out. The tick's own event time gates the (rare) latency
    /// sample, so the common case reads no clock.
    pub(super) fn deliver(&mut self, tick: Arc<Tick>) -> Outbound {
        self.local.delivered += 1;
        self.local.dirty = true;
        if tick.event_time_unix_nanos >= self.next_sample {
            let now = clock::now_unix_nanos();
            self.next_sample = now + SAMPLE_EVERY_NANOS;
            let seconds = (now - tick.event_time_unix_nanos) as f64 / 1e9;
            self.ticket
                .metrics
                .publish_to_send_seconds
                .observe(seconds.max(0.0));
            self.local.refresh_behind = true;
        }
        Outbound::Tick(tick)
    }
}

#[cfg(test)]
mod tests;
