//! A session is one client response stream (TickerStream or Subscribe): its subscription
//! set, the control replies it owes, and the drain of the hub's rings under HTTP/2
//! backpressure. The service builds sessions; the codec writes what they yield.
//!
//! Backpressure: a session is a `Stream` polled (by `stream_routes::SessionBody`) only
//! when the transport can take more, and it returns every ready message before
//! `Pending`, so all ready ticks leave in one DATA frame. A stream that cannot keep up
//! falls behind in the hub's bounded rings; the hub drops the oldest, and the session
//! turns the resulting seq gap into a KIND_LAGGED notice (with the exact count) just
//! before the next tick, or, for a STRICT subscription, ends the stream. A backlog
//! past half the ring is announced first (KIND_BACKLOG). CONFLATE subscriptions never
//! fall behind: the hub folds their ticks (`conflator`) and the session takes the fold
//! at their rate.
//! `policy` holds the per-subscription parts. The session's `Bell` (in the hub's ring)
//! also says when the client's requests need a poll.

mod policy;

use std::{
    collections::VecDeque,
    future::Future as _,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_core::Stream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::{Status, Streaming};

use crate::{
    auth::{Authenticator, Principal},
    clock,
    codec::Outbound,
    hub::{Bell, Delivery, Hub, ResumePoint, SubscribeError, Tick},
    metrics::{ended, StreamTicket},
    pb::{ticker_request::Action, ticker_response::Kind, TickerRequest, TickerResponse},
    shutdown::Shutdown,
    symbol::{self, Symbol},
};

use policy::{
    backlog, conflated, lagged, resume_point, Feed, Sub, BACKLOG_CHECK_EVERY, TAKE_BATCH,
};
pub use policy::{Policy, MAX_CONFLATE_HZ};

/// Replies queued beyond this stop the session from reading further requests, so a
/// client that floods requests without reading gets HTTP/2 backpressure, not memory.
const CONTROL_QUEUE_LIMIT: usize = 64;

/// Per-stream limits; see `--max-subscriptions-per-stream`.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub max_subscriptions: usize,
}

/// The caller of a stream, and how to check the tokens it sends in-band.
pub struct Caller {
    pub principal: Principal,
    pub auth: Authenticator,
}

/// Why a stream ends early: the `streams_ended_total` reason and the status sent.
type Ending = (&'static str, Status);

/// One client response stream. See the module docs.
///
/// `repr(C)` and in this order on purpose: the fields every poll reads (`is_quiet`, the
/// pass over the subscriptions) come first, so a quiet poll reads two or three cache
/// lines of its `SessionBody` instead of the six the compiler's layout spread them
/// over. 1,000 sessions do not fit a core's L2, so each such line is a miss (README,
/// "Performance": callgrind's cache simulation).
#[repr(C)]
pub struct Session {
    /// The last poll returned `Pending` (see `is_quiet`).
    waiting: bool,
    finished: bool,
    shutdown_armed: bool,
    expiry_armed: bool,
    /// Subscriptions to look at, as hint bits (`subs[i]` is bit `i % 64`): those the
    /// bell's news named, those not drained yet, and every CONFLATE one (`always`).
    /// Past 64 subscriptions every one is looked at.
    todo: u64,
    always: u64,
    /// Round-robin start, so one busy symbol cannot starve the others.
    cursor: usize,
    /// Rung by the hub when a tick arrives for any of `subs` while this stream sleeps,
    /// and by `requests` when they may have something new.
    bell: Bell,
    shutdown: Shutdown,
    /// Fires when the caller's credentials expire; armed (polled once, like
    /// `shutdown_wake`) so the timer wakes this task, then read with `is_elapsed`.
    expiry: Option<Pin<Box<Sleep>>>,
    /// A tick held back while the KIND_LAGGED notice for its gap goes first.
    held: Option<Arc<Tick>>,
    subs: Vec<Sub>,
    /// This stream's counts, copied into its `StreamInfo` at the end of each batch.
    local: LocalCounts,
    /// Event time (Unix ns) from which the next tick samples latency and "behind".
    next_sample: i64,
    /// Replies and replayed ticks, ahead of live ticks.
    control: VecDeque<Outbound>,
    hub: Hub,
    ticket: StreamTicket,
    /// Wakes this stream when its earliest CONFLATE message falls due.
    conflate_timer: Option<Pin<Box<Sleep>>>,
    limits: SessionLimits,
    /// The client's requests (TickerStream); `None` for Subscribe or after half-close.
    requests: Option<Streaming<TickerRequest>>,
    /// Polled once, to have this stream's task woken on shutdown (and kept, as dropping
    /// it would unregister the task); later polls only read the lock-free flag.
    shutdown_wake: Pin<Box<WaitForCancellationFutureOwned>>,
    caller: Caller,
    span: tracing::Span,
}

/// Running totals since the stream opened. Only this session writes its `StreamInfo`,
/// so a fold stores the totals instead of adding to the shared ones: a plain store waits
/// for nothing, while a `lock add` on that cold line stalled the session (3.7% of the
/// server's CPU at 500k deliveries/s).
#[derive(Default)]
struct LocalCounts {
    delivered: u64,
    dropped: u64,
    lag_notices: u64,
    /// Changed since the last fold.
    dirty: bool,
    /// Refresh /streams' "behind" at the end of this batch.
    refresh_behind: bool,
}

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

/// Latency samples and "behind" refreshes happen at most this often per stream: the
/// histogram takes a lock, so it must not be touched per tick.
const SAMPLE_EVERY_NANOS: i64 = 100_000_000;

impl Session {
    /// `ticket` is this stream's place under the stream cap and in the metrics.
    pub fn new(
        hub: Hub,
        limits: SessionLimits,
        requests: Option<Streaming<TickerRequest>>,
        shutdown: Shutdown,
        ticket: StreamTicket,
        caller: Caller,
    ) -> Session {
        let span = tracing::info_span!(
            "stream",
            id = ticket.info.id,
            rpc = ticket.info.rpc,
            peer = %ticket.info.peer,
            principal = %ticket.info.principal
        );
        let shutdown_wake = Box::pin(shutdown.token().clone().cancelled_owned());
        let expiry = caller
            .principal
            .expires
            .map(|at| Box::pin(tokio::time::sleep_until(instant_of(at))));
        Session {
            hub,
            limits,
            requests,
            subs: Vec::new(),
            bell: Bell::new(),
            todo: u64::MAX,
            always: 0,
            control: VecDeque::new(),
            conflate_timer: None,
            held: None,
            cursor: 0,
            shutdown,
            shutdown_wake,
            shutdown_armed: false,
            caller,
            expiry,
            expiry_armed: false,
            finished: false,
            waiting: false,
            local: LocalCounts::default(),
            next_sample: 0,
            span,
            ticket,
        }
    }

    /// Applies one client request, queueing its reply; `Err` ends the stream.
    fn apply(&mut self, request: TickerRequest) -> Result<(), Ending> {
        if !request.token.is_empty() {
            self.refresh(&request.token)?;
            if request.symbol.is_empty() && request.action == 0 {
                return Ok(());
            }
        }
        match Action::try_from(request.action) {
            Ok(Action::Unspecified | Action::Subscribe) => match Policy::of(&request) {
                Ok(policy) => self.subscribe_with(&request.symbol, policy, resume_point(&request)),
                Err(why) => self.reject(&request.symbol, why),
            },
            Ok(Action::Unsubscribe) => self.unsubscribe(&request.symbol, ""),
            Err(_) => self.reject(
                &request.symbol,
                format!(
                    "unknown action {}: use ACTION_SUBSCRIBE or ACTION_UNSUBSCRIBE",
                    request.action
                ),
            ),
        }
        Ok(())
    }

    /// Swaps in the caller of a fresh in-band token: new expiry and entitlements
    /// (subscriptions it no longer covers end). A refused token ends the stream.
    fn refresh(&mut self, token: &str) -> Result<(), Ending> {
        if !self.caller.auth.requires_token() {
            self.reject(
                "",
                "this server does not use tokens; refresh ignored".into(),
            );
            return Ok(());
        }
        let principal = match self.caller.auth.refresh(&self.caller.principal, token) {
            Ok(principal) => principal,
            Err(e) => {
                self.ticket.metrics.auth_failure(e.reason());
                tracing::warn!(parent: &self.span, reason = e.reason(), error = %e, "in-band token refused");
                let status = Status::unauthenticated(
                    "token refresh refused: missing or invalid credentials",
                );
                return Err((ended::AUTH_REJECTED, status));
            }
        };
        let until = principal.expires;
        if let (Some(expiry), Some(at)) = (self.expiry.as_mut(), until) {
            expiry.as_mut().reset(instant_of(at));
            self.expiry_armed = false;
        }
        self.caller.principal = principal;
        let revoked: Vec<Symbol> = self
            .subs
            .iter()
            .filter(|s| !self.caller.principal.entitled(&s.symbol))
            .map(|s| s.symbol.clone())
            .collect();
        for symbol in revoked {
            self.unsubscribe(&symbol, "not entitled under the refreshed token");
        }
        let detail = match until.and_then(|t| t.duration_since(UNIX_EPOCH).ok()) {
            Some(d) => format!(
                "token accepted; valid until {}",
                clock::rfc3339_nanos(d.as_nanos() as i64)
            ),
            None => "token accepted".into(),
        };
        tracing::debug!(parent: &self.span, "token refreshed in-band");
        self.push(control(Kind::TokenRefreshed, "", &detail));
        Ok(())
    }

    /// Subscribes to `symbol` with the ALL policy (the Subscribe RPC).
    pub fn subscribe(&mut self, symbol: &str) {
        self.subscribe_with(symbol, Policy::All, None);
    }

    /// Subscribes to `symbol`: queues KIND_SUBSCRIBED, then either the replayed ticks
    /// after `resume` (when the hub's history covers them) or the snapshot; or
    /// KIND_REJECTED. On a symbol already subscribed with another policy (or with a
    /// resume point), the subscription is remade from where this stream is, so the
    /// switch neither skips nor repeats a tick while the history covers it.
    fn subscribe_with(&mut self, symbol: &str, policy: Policy, resume: Option<ResumePoint>) {
        if let Err(e) = symbol::validate(symbol) {
            return self.reject(symbol, e.to_string());
        }
        if !self.caller.principal.entitled(symbol) {
            return self.reject(symbol, format!("not entitled to {symbol}"));
        }
        let (resume, detail) = match self.subs.iter().position(|s| &*s.symbol == symbol) {
            Some(idx) if self.subs[idx].policy == policy && resume.is_none() => {
                return self.push(control(Kind::Subscribed, symbol, "already subscribed"));
            }
            Some(idx) => {
                let old = self.subs.remove(idx);
                self.reindex();
                self.ticket.metrics.subscriptions.dec();
                let last_seq = self.flush(old);
                let from = ResumePoint {
                    epoch: self.hub.epoch(),
                    seq: last_seq,
                };
                (
                    Some(resume.unwrap_or(from)),
                    format!("policy {}", policy.name()),
                )
            }
            None if self.subs.len() >= self.limits.max_subscriptions => {
                let max = self.limits.max_subscriptions;
                return self.reject(
                    symbol,
                    format!("too many subscriptions on this stream (limit {max})"),
                );
            }
            None => (resume, String::new()),
        };
        let delivery = match policy {
            Policy::Conflate { .. } => Delivery::Conflate,
            Policy::All | Policy::Strict => Delivery::Channel(&self.bell),
        };
        let sub = match self.hub.subscribe_with(symbol, resume, delivery) {
            Ok(sub) => sub,
            Err(
                e @ (SubscribeError::Unknown
                | SubscribeError::SymbolLimit(_)
                | SubscribeError::Symbol(_)),
            ) => return self.reject(symbol, e.to_string()),
        };
        let feed = match (sub.receiver, sub.conflator, policy) {
            (Some(receiver), _, _) => Feed::Channel {
                receiver,
                taken: VecDeque::new(),
            },
            (None, Some(conflator), Policy::Conflate { every }) => Feed::Conflate {
                conflator,
                every,
                next_emit: Instant::now(),
            },
            // The hub returns what `delivery` asked for.
            (None, _, _) => return self.reject(symbol, "internal: no feed".into()),
        };
        self.subs.push(Sub {
            symbol: Arc::from(symbol),
            policy,
            feed,
            last_seq: sub.seq,
            watch: sub.watch,
            unchecked: 0,
            warned: false,
        });
        self.reindex();
        self.ticket.metrics.subscriptions.inc();
        self.ticket
            .info
            .subscriptions
            .store(self.subs.len() as u64, Ordering::Relaxed);
        let recovered = resume.is_some() && sub.replay.is_some();
        tracing::debug!(parent: &self.span, symbol, seq = sub.seq, policy = policy.name(), recovered, "subscribed");
        self.push(TickerResponse {
            seq: sub.seq,
            epoch: sub.epoch,
            recovered,
            ..control(Kind::Subscribed, symbol, &detail)
        });
        match (sub.replay, sub.snapshot) {
            (Some(replay), _) => self.control.extend(replay.into_iter().map(Outbound::Tick)),
            (None, Some(snapshot)) => self.push(snapshot.to_response(Kind::Snapshot)),
            (None, None) => {}
        }
    }

    /// Ends `old`, queueing what it folded but did not send yet; returns the last seq
    /// this stream has been given of its symbol.
    fn flush(&mut self, mut old: Sub) -> u64 {
        if let Feed::Conflate { conflator, .. } = &mut old.feed {
            if let Some(fold) = conflator.take() {
                self.control.push_back(Outbound::message(conflated(&fold)));
                return fold.last.seq;
            }
        }
        old.last_seq
    }

    fn unsubscribe(&mut self, symbol: &str, detail: &str) {
        if let Err(e) = symbol::validate(symbol) {
            return self.reject(symbol, e.to_string());
        }
        // Dropping the receiver (or conflator) is what stops delivery; a held tick of
        // it goes too.
        let before = self.subs.len();
        self.subs.retain(|s| &*s.symbol != symbol);
        self.reindex();
        self.ticket
            .metrics
            .subscriptions
            .dec_by((before - self.subs.len()) as i64);
        self.ticket
            .info
            .subscriptions
            .store(self.subs.len() as u64, Ordering::Relaxed);
        tracing::debug!(parent: &self.span, symbol, "unsubscribed");
        if self.held.as_ref().is_some_and(|t| &*t.symbol == symbol) {
            self.held = None;
        }
        self.push(control(Kind::Unsubscribed, symbol, detail));
    }

    /// Gives each receiver the hint bit of its place in `subs` and has every
    /// subscription looked at once (a tick may have marked an old bit).
    fn reindex(&mut self) {
        self.always = 0;
        for (i, sub) in self.subs.iter().enumerate() {
            let bit = 1u64 << (i % 64);
            match &sub.feed {
                Feed::Channel { receiver, .. } => receiver.set_hint(bit),
                Feed::Conflate { .. } => self.always |= bit,
            }
        }
        self.todo = u64::MAX;
    }

    fn reject(&mut self, symbol: &str, detail: String) {
        tracing::debug!(parent: &self.span, symbol, %detail, "request rejected");
        self.push(TickerResponse {
            symbol: symbol.to_string(),
            kind: Kind::Rejected as i32,
            detail,
            ..Default::default()
        });
    }

    fn push(&mut self, msg: TickerResponse) {
        self.control.push_back(Outbound::message(msg));
    }

    /// Reads requests while the reply queue has room. `Err` ends the stream.
    fn poll_requests(&mut self, cx: &Context<'_>) -> Result<(), Ending> {
        if self.requests.is_none() {
            return Ok(());
        }
        let Some(waker) = self.bell.answer_requests(cx) else {
            return Ok(());
        };
        let mut cx = Context::from_waker(&waker);
        while self.control.len() < CONTROL_QUEUE_LIMIT {
            let Some(requests) = self.requests.as_mut() else {
                return Ok(());
            };
            match Pin::new(requests).poll_next(&mut cx) {
                Poll::Ready(Some(Ok(request))) => self.apply(request)?,
                Poll::Ready(Some(Err(status))) => return Err((ended::CLIENT_ERROR, status)),
                // Half-close: the client sends no more, but ticks keep flowing.
                Poll::Ready(None) => self.requests = None,
                Poll::Pending => return Ok(()),
            }
        }
        self.bell.ring_requests();
        Ok(())
    }

    /// The next live message of any subscription, round-robin: a tick, a conflated
    /// range that fell due, or a notice (lag, backlog) with its tick held for the next
    /// call. `Err` ends the stream (a STRICT subscription fell behind). Before it
    /// returns `Pending` it arms the bell and looks once more (see `Bell::arm`).
    fn poll_ticks(&mut self, cx: &mut Context<'_>) -> Poll<Result<Outbound, Ending>> {
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
            && (!self.bell.requests_rung() || self.requests.is_none())
            && !self.shutdown.is_triggered()
            && !self.expiry.as_ref().is_some_and(|e| e.is_elapsed())
    }

    /// One round-robin pass of `poll_ticks`; `due` gathers when the earliest CONFLATE
    /// message that is not due yet falls due.
    fn next_live(
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
    fn look_at(
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
            receiver.take_first(TAKE_BATCH, taken)
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
    fn deliver(&mut self, tick: Arc<Tick>) -> Outbound {
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

    /// Publishes this stream's counts in its `StreamInfo` (end of batch, and on drop).
    fn fold(&mut self) {
        let local = &mut self.local;
        let info = &self.ticket.info;
        if std::mem::take(&mut local.dirty) {
            info.sent.store(local.delivered, Ordering::Relaxed);
            info.dropped.store(local.dropped, Ordering::Relaxed);
            info.lag_notices.store(local.lag_notices, Ordering::Relaxed);
        }
        if std::mem::take(&mut local.refresh_behind) {
            let behind: u64 = self
                .subs
                .iter()
                .map(|s| s.watch.seq().saturating_sub(s.last_seq))
                .sum();
            info.behind.store(behind, Ordering::Relaxed);
        }
    }

    fn finish(&mut self, reason: &'static str) {
        self.finished = true;
        self.ticket.reason = reason;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.fold();
        self.ticket
            .metrics
            .subscriptions
            .dec_by(self.subs.len() as i64);
        tracing::debug!(parent: &self.span, reason = self.ticket.reason, "stream closed");
    }
}

impl Stream for Session {
    type Item = Result<Outbound, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        this.waiting = false;
        if this.finished {
            return Poll::Ready(None);
        }
        if !this.shutdown_armed {
            // Registers this stream's task; the token's wake-up lands here again.
            let _ = this.shutdown_wake.as_mut().poll(cx);
            this.shutdown_armed = true;
        }
        if this.shutdown.is_triggered() {
            this.finish(ended::SHUTDOWN);
            return Poll::Ready(Some(Err(Status::unavailable("server shutting down"))));
        }
        if let Some(expiry) = this.expiry.as_mut() {
            if !this.expiry_armed {
                let _ = expiry.as_mut().poll(cx);
                this.expiry_armed = true;
            }
            if expiry.is_elapsed() {
                this.finish(ended::AUTH_EXPIRY);
                return Poll::Ready(Some(Err(Status::unauthenticated("token expired"))));
            }
        }
        if let Some(tick) = this.held.take() {
            return Poll::Ready(Some(Ok(this.deliver(tick))));
        }
        if let Err((reason, status)) = this.poll_requests(cx) {
            this.finish(reason);
            return Poll::Ready(Some(Err(status)));
        }
        if let Some(out) = this.control.pop_front() {
            // A replayed tick counts like a live one. Its subscription's `last_seq`
            // already stands at the end of the replay.
            if matches!(out, Outbound::Tick(_)) {
                this.local.delivered += 1;
                this.local.dirty = true;
            }
            return Poll::Ready(Some(Ok(out)));
        }
        match this.poll_ticks(cx) {
            Poll::Ready(Ok(out)) => Poll::Ready(Some(Ok(out))),
            Poll::Ready(Err((reason, status))) => {
                this.finish(reason);
                Poll::Ready(Some(Err(status)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The tokio instant of a wall-clock time (now, if it has passed).
fn instant_of(at: SystemTime) -> Instant {
    Instant::now() + clock::time_left(at)
}

fn control(kind: Kind, symbol: &str, detail: &str) -> TickerResponse {
    TickerResponse {
        symbol: symbol.to_string(),
        kind: kind as i32,
        detail: detail.to_string(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures_util::task::noop_waker_ref;
    use tokio::sync::Semaphore;

    use super::*;
    use crate::hub::HubConfig;

    fn ticket(hub: &Hub) -> StreamTicket {
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        let metrics = crate::metrics::Metrics::new(hub.clone(), false, 0.0);
        metrics.ticket("TickerStream", "test".into(), "anonymous".into(), permit)
    }

    fn anonymous() -> Caller {
        Caller {
            principal: Principal::anonymous(),
            auth: Authenticator::none(),
        }
    }

    fn session(hub: &Hub) -> Session {
        session_until(hub, &Shutdown::new(), 10)
    }

    fn session_until(hub: &Hub, shutdown: &Shutdown, max_subscriptions: usize) -> Session {
        let limits = SessionLimits { max_subscriptions };
        Session::new(
            hub.clone(),
            limits,
            None,
            shutdown.clone(),
            ticket(hub),
            anonymous(),
        )
    }

    /// A session subscribed to `symbols` (each published once first), its acks and
    /// snapshots drained.
    fn subscribed(hub: &Hub, symbols: &[&str]) -> Session {
        let mut s = session(hub);
        for sym in symbols {
            hub.publish(sym, 1.0, 0).unwrap();
            s.subscribe(sym);
        }
        drain(&mut s);
        s
    }

    /// Everything the session yields before it would wait.
    fn drain(session: &mut Session) -> Vec<TickerResponse> {
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut out = Vec::new();
        while let Poll::Ready(Some(item)) = Pin::new(&mut *session).poll_next(&mut cx) {
            out.push(item.unwrap().to_response());
        }
        out
    }

    fn kinds(msgs: &[TickerResponse]) -> Vec<(Kind, u64)> {
        msgs.iter()
            .map(|m| {
                (
                    m.kind(),
                    if m.kind() == Kind::Lagged {
                        m.dropped
                    } else {
                        m.seq
                    },
                )
            })
            .collect()
    }

    #[test]
    fn quiet_only_until_a_tick_shutdown_or_conflate_subscription() {
        let hub = Hub::new(HubConfig::default());
        hub.publish("A", 1.0, 0).unwrap();
        hub.publish("B", 1.0, 0).unwrap();
        let shutdown = Shutdown::new();
        let mut s = session_until(&hub, &shutdown, 10);
        let cx = Context::from_waker(noop_waker_ref());
        assert!(!s.is_quiet(&cx), "never polled");
        s.subscribe("A");
        drain(&mut s);
        assert!(s.is_quiet(&cx), "drained and waiting");
        hub.publish("B", 2.0, 0).unwrap();
        assert!(s.is_quiet(&cx), "a symbol it does not want");
        hub.publish("A", 2.0, 0).unwrap();
        assert!(!s.is_quiet(&cx), "its symbol ticked");
        assert_eq!(kinds(&drain(&mut s)), [(Kind::Tick, 2)]);
        assert!(s.is_quiet(&cx));
        s.subscribe_with(
            "B",
            Policy::Conflate {
                every: Duration::from_millis(10),
            },
            None,
        );
        drain(&mut s);
        assert!(!s.is_quiet(&cx), "CONFLATE wakes without the bell");
        s.unsubscribe("B", "test");
        drain(&mut s);
        assert!(s.is_quiet(&cx));
        shutdown.trigger();
        assert!(!s.is_quiet(&cx), "shutting down");
    }

    #[test]
    fn every_ready_tick_is_yielded_in_one_poll_pass() {
        let hub = Hub::new(HubConfig::default());
        hub.publish("A", 1.0, 0).unwrap();
        let mut s = session(&hub);
        s.subscribe("A");
        assert_eq!(
            kinds(&drain(&mut s)),
            [(Kind::Subscribed, 1), (Kind::Snapshot, 1)]
        );
        for i in 0..10 {
            hub.publish("A", 2.0 + f64::from(i), 0).unwrap();
        }
        let seqs: Vec<u64> = drain(&mut s).iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (2..=11).collect::<Vec<_>>());
    }

    #[test]
    fn overflow_becomes_an_exact_lag_notice_before_the_next_tick() {
        let hub = Hub::new(HubConfig {
            channel_capacity: 4,
            ..HubConfig::default()
        });
        hub.publish("A", 1.0, 0).unwrap();
        let mut s = session(&hub);
        s.subscribe("A");
        drain(&mut s);
        for _ in 0..10 {
            hub.publish("A", 1.0, 0).unwrap();
        }
        assert_eq!(
            kinds(&drain(&mut s)),
            [
                (Kind::Lagged, 6),
                (Kind::Tick, 8),
                (Kind::Tick, 9),
                (Kind::Tick, 10),
                (Kind::Tick, 11)
            ]
        );
    }

    #[test]
    fn a_backlog_past_half_the_channel_is_announced_before_any_loss() {
        let hub = Hub::new(HubConfig {
            channel_capacity: 64,
            ..HubConfig::default()
        });
        hub.publish("A", 1.0, 0).unwrap();
        let mut s = session(&hub);
        s.subscribe("A");
        drain(&mut s);
        for _ in 0..60 {
            hub.publish("A", 1.0, 0).unwrap();
        }
        let msgs = drain(&mut s);
        let warning = msgs
            .iter()
            .position(|m| m.kind() == Kind::Backlog)
            .expect("a backlog warning");
        assert_eq!(
            warning,
            BACKLOG_CHECK_EVERY as usize - 1,
            "at the first check"
        );
        assert_eq!(
            msgs[warning].queue_depth,
            60 - u64::from(BACKLOG_CHECK_EVERY)
        );
        assert!(msgs.iter().all(|m| m.kind() != Kind::Lagged));
        assert_eq!(msgs.len(), 61, "60 ticks and one warning");
    }

    #[test]
    fn round_robin_serves_every_symbol() {
        let hub = Hub::new(HubConfig::default());
        let mut s = subscribed(&hub, &["A", "B"]);
        for _ in 0..3 {
            hub.publish("A", 1.0, 0).unwrap();
            hub.publish("B", 1.0, 0).unwrap();
        }
        let symbols: String = drain(&mut s).iter().map(|m| m.symbol.clone()).collect();
        assert_eq!(symbols, "ABABAB");
    }

    #[test]
    fn round_robin_resumes_after_the_last_served_subscription() {
        let hub = Hub::new(HubConfig::default());
        let mut s = subscribed(&hub, &["A", "B", "C", "D"]);
        for sym in ["B", "B", "B", "D", "A"] {
            hub.publish(sym, 1.0, 0).unwrap();
        }
        let symbols: String = drain(&mut s).iter().map(|m| m.symbol.clone()).collect();
        assert_eq!(
            symbols, "ABDBB",
            "each pass starts after the one served last"
        );
        assert_eq!(Bits(0b1010_0001).collect::<Vec<_>>(), [0, 5, 7]);
    }

    #[test]
    fn news_of_a_subscription_removed_before_it_was_read_is_ignored() {
        let hub = Hub::new(HubConfig::default());
        let mut s = subscribed(&hub, &["A", "B", "C"]);
        hub.publish("C", 2.0, 0).unwrap();
        s.unsubscribe("C", "");
        assert!(
            drain(&mut s)
                .iter()
                .all(|m| m.symbol != "C" || m.kind != Kind::Tick as i32),
            "C's tick is not delivered after its unsubscribe"
        );
        hub.publish("A", 2.0, 0).unwrap();
        assert_eq!(kinds(&drain(&mut s)), [(Kind::Tick, 2)]);
    }

    #[test]
    fn news_reaches_a_subscription_whose_place_moved() {
        let hub = Hub::new(HubConfig::default());
        let mut s = subscribed(&hub, &["A", "B", "C"]);
        s.unsubscribe("A", "");
        drain(&mut s);
        // C moved from place 2 to 1: its ticks must mark bit 1 now.
        hub.publish("C", 2.0, 0).unwrap();
        assert_eq!(kinds(&drain(&mut s)), [(Kind::Tick, 2)]);
        hub.publish("B", 2.0, 0).unwrap();
        assert_eq!(kinds(&drain(&mut s)), [(Kind::Tick, 2)]);
    }

    #[test]
    fn past_64_subscriptions_every_one_is_still_served() {
        let hub = Hub::new(HubConfig::default());
        let limits = SessionLimits {
            max_subscriptions: 100,
        };
        let mut s = Session::new(
            hub.clone(),
            limits,
            None,
            Shutdown::new(),
            ticket(&hub),
            anonymous(),
        );
        let symbols: Vec<String> = (0..70).map(|i| format!("S{i}")).collect();
        for sym in &symbols {
            hub.publish(sym, 1.0, 0).unwrap();
            s.subscribe(sym);
        }
        drain(&mut s);
        for sym in [&symbols[69], &symbols[5], &symbols[0]] {
            hub.publish(sym, 2.0, 0).unwrap();
            let got = drain(&mut s);
            assert_eq!(kinds(&got), [(Kind::Tick, 2)]);
            assert_eq!(&got[0].symbol, sym);
        }
    }

    #[test]
    fn shutdown_ends_the_stream_with_unavailable() {
        let hub = Hub::new(HubConfig::default());
        let shutdown = Shutdown::new();
        let mut s = session_until(&hub, &shutdown, 1);
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(Pin::new(&mut s).poll_next(&mut cx).is_pending());
        shutdown.trigger();
        match Pin::new(&mut s).poll_next(&mut cx) {
            Poll::Ready(Some(Err(status))) => {
                assert_eq!(
                    (status.code(), status.message()),
                    (tonic::Code::Unavailable, "server shutting down")
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Pin::new(&mut s).poll_next(&mut cx),
            Poll::Ready(None)
        ));
    }
}
