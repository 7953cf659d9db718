//! A session is one client response stream (TickerStream or Subscribe): its subscription
//! set, the control replies it owes, and the drain of the hub's rings under the
//! transport's backpressure. Below it the hub; above it a transport, which builds
//! sessions and writes the `Outbound` messages they yield. The session knows no
//! transport: its requests arrive as a `Requests` stream and leave as `Outbound`.
//!
//! Backpressure: a session is a `Stream` polled (by the transport, e.g. `transport::grpc::routes::SessionBody`) only
//! when the transport can take more, and it returns every ready message before
//! `Pending`, so all ready ticks leave in one DATA frame. A stream that cannot keep up
//! falls behind in the hub's bounded rings; the hub drops the oldest, and the session
//! turns the resulting seq gap into a KIND_LAGGED notice (with the exact count) just
//! before the next tick, or, for a STRICT subscription, ends the stream. A backlog
//! past half the ring is announced first (KIND_BACKLOG). CONFLATE subscriptions never
//! fall behind: the hub folds their ticks (`hub::Conflator`) and the session takes the fold
//! at their rate.
//! The jobs are split by side: `requests` applies what the client asks (subscribe,
//! unsubscribe, policy switches, resume, in-band token refresh, rejections);
//! `delivery` walks the news of the hub's bell and takes ticks (round-robin, lag and
//! backlog notices, STRICT ends); `policy` holds the per-subscription parts. The
//! session's `Bell` (in the hub's ring) also says when the client's requests need a poll.

mod delivery;
mod policy;
mod requests;
#[cfg(test)]
mod testing;

use std::{
    collections::VecDeque,
    future::Future as _,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
    time::SystemTime,
};

use futures_core::Stream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::Status;

use crate::{
    auth::{Authenticator, Principal},
    clock,
    hub::{Bell, Hub, Tick},
    ops::metrics::{ended, StreamTicket},
    pb::{ticker_response::Kind, TickerRequest, TickerResponse},
    shutdown::Shutdown,
};

use policy::{Feed, Sub};
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

/// A client's requests, as its transport decodes them; an `Err` ends the stream with
/// that status.
pub type Requests = Pin<Box<dyn Stream<Item = Result<TickerRequest, Status>> + Send>>;

/// One message a session yields, for its transport to write.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A live or replayed tick, already encoded and framed by the hub.
    Tick(Arc<Tick>),
    /// Anything else: acks, snapshots, rejections, lag notices. Boxed so that an
    /// `Outbound` is two words: every delivered tick is moved through several
    /// `Poll<Option<Result<…>>>` returns, and copying the ~200-byte message variant's
    /// room each time was a measurable share of the session's instructions.
    Message(Box<TickerResponse>),
}

impl Outbound {
    pub fn message(response: TickerResponse) -> Outbound {
        Outbound::Message(Box::new(response))
    }

    /// The message as a client will decode it (for tests and in-process consumers).
    pub fn to_response(&self) -> TickerResponse {
        match self {
            Outbound::Tick(tick) => tick.to_response(Kind::Tick),
            Outbound::Message(m) => (**m).clone(),
        }
    }
}

/// Why a stream ends early: the `streams_ended_total` reason and the status sent.
type Ending = (&'static str, Status);

/// One client response stream. See the module docs.
///
/// `repr(C)` and in this order on purpose: the fields every poll reads (`is_quiet`, the
/// pass over the subscriptions) come first, so a quiet poll reads two or three cache
/// lines of its `SessionBody` instead of the six the compiler's layout spread them
/// over. 1,000 sessions do not fit a core's L2, so each such line is a miss
/// (`benches/README.md`: callgrind's cache simulation).
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
    /// Subscribes waiting for a cluster to sync their symbol (`requests`).
    pending: Vec<requests::Pending>,
    /// The hub's `bus_generation` this stream last told its client about.
    bus_seen: u64,
    /// Replies and replayed ticks, ahead of live ticks.
    control: VecDeque<Outbound>,
    hub: Hub,
    ticket: StreamTicket,
    /// Wakes this stream when its earliest CONFLATE message falls due.
    conflate_timer: Option<Pin<Box<Sleep>>>,
    limits: SessionLimits,
    /// The client's requests (TickerStream); `None` for Subscribe or after half-close.
    requests: Option<Requests>,
    /// Polled once, to have this stream's task woken on shutdown (and kept, as dropping
    /// it would unregister the task); later polls only read the lock-free flag.
    shutdown_wake: Pin<Box<WaitForCancellationFutureOwned>>,
    caller: Caller,
    span: tracing::Span,
}

/// Running totals since the stream opened. Only the stream's own `Session` writes its
/// `StreamInfo`, so a fold stores the totals instead of adding to the shared ones: a plain store waits
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

/// Latency samples and "behind" refreshes happen at most this often per stream: the
/// histogram takes a lock, so it must not be touched per tick.
const SAMPLE_EVERY_NANOS: i64 = 100_000_000;

impl Session {
    /// `ticket` is this stream's place under the stream cap and in the metrics.
    pub fn new(
        hub: Hub,
        limits: SessionLimits,
        requests: Option<Requests>,
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
        let bus_seen = hub.bus_generation();
        Session {
            hub,
            limits,
            requests,
            subs: Vec::new(),
            bell: Bell::new(),
            todo: u64::MAX,
            always: 0,
            control: VecDeque::new(),
            pending: Vec::new(),
            bus_seen,
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

    /// Lets publishes send this stream's ticks straight into its connection's buffer
    /// while it is idle (`hub::DirectSink`; the HTTP/2 path's `--direct-publish`).
    pub fn set_direct(&self, sink: std::sync::Arc<dyn crate::hub::DirectSink>) {
        self.bell.set_sink(std::sync::Arc::clone(&sink));
        let _ = self.ticket.info.direct.set(sink);
    }

    /// Hears of the ticks publishes sent for subscription `idx` straight into the
    /// connection (see `set_direct`): its last seq.
    pub(super) fn sync_direct(&mut self, idx: usize) {
        if !self.bell.has_sink() {
            return;
        }
        let Some(sub) = self.subs.get_mut(idx) else {
            return;
        };
        if let Feed::Channel { receiver, .. } = &mut sub.feed {
            receiver.sync();
            if let Some(last) = receiver.take_direct() {
                sub.last_seq = last;
            }
        }
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
            // The last seqs publishes sent straight to the connection, first.
            for idx in 0..self.subs.len() {
                self.sync_direct(idx);
            }
            let behind: u64 = self
                .subs
                .iter()
                .map(|s| s.watch.seq().saturating_sub(s.last_seq))
                .sum();
            self.ticket.info.behind.store(behind, Ordering::Relaxed);
        }
    }

    fn finish(&mut self, reason: &'static str) {
        self.finished = true;
        self.ticket.reason = reason;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for idx in 0..self.subs.len() {
            self.sync_direct(idx);
        }
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
        if this.bus_seen != this.hub.bus_generation() {
            this.announce_bus();
        }
        this.retry_pending();
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
    use futures_util::task::noop_waker_ref;

    use super::{testing::session_until, *};
    use crate::hub::HubConfig;

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
