//! A session is one client response stream (TickerStream or Subscribe): its subscription
//! set, the control replies it owes, and the drain of the hub's channels under HTTP/2
//! backpressure. The service builds sessions; the codec writes what they yield.
//!
//! Backpressure: a session is a `Stream` polled by tonic only when the transport can take
//! more, and it returns every ready message before `Pending`, so tonic packs all ready
//! ticks into one DATA frame. A stream that cannot keep up falls behind in the hub's
//! bounded channels; the hub drops the oldest, and the session turns the resulting seq
//! gap into a KIND_LAGGED notice (with the exact count) just before the next tick.

use std::{
    collections::VecDeque,
    future::Future as _,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use async_broadcast::{Receiver, RecvError};
use futures_core::Stream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::{Status, Streaming};

use crate::{
    codec::Outbound,
    hub::{Hub, SubscribeError, Tick},
    pb::{ticker_request::Action, ticker_response::Kind, TickerRequest, TickerResponse},
    shutdown::Shutdown,
    symbol::{self, Symbol},
};

/// Replies queued beyond this stop the session from reading further requests, so a
/// client that floods requests without reading gets HTTP/2 backpressure, not memory.
const CONTROL_QUEUE_LIMIT: usize = 64;

/// Per-stream limits; see `--max-subscriptions-per-stream`.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub max_subscriptions: usize,
}

/// One client response stream. See the module docs.
pub struct Session {
    hub: Hub,
    limits: SessionLimits,
    /// The client's requests (TickerStream); `None` for Subscribe or after half-close.
    requests: Option<Streaming<TickerRequest>>,
    subs: Vec<Sub>,
    control: VecDeque<TickerResponse>,
    /// A tick held back while the KIND_LAGGED notice for its gap goes first.
    held: Option<Arc<Tick>>,
    /// Round-robin start, so one busy symbol cannot starve the others.
    cursor: usize,
    shutdown: Shutdown,
    /// Polled once, to have this stream's task woken on shutdown (and kept, as dropping
    /// it would unregister the task); later polls only read the lock-free flag.
    shutdown_wake: Pin<Box<WaitForCancellationFutureOwned>>,
    shutdown_armed: bool,
    finished: bool,
    _permit: OwnedSemaphorePermit,
}

struct Sub {
    symbol: Symbol,
    receiver: Receiver<Arc<Tick>>,
    /// Highest seq delivered (or announced by the snapshot) on this stream.
    last_seq: u64,
}

impl Session {
    /// `permit` is this stream's place under the server-wide stream cap, released on drop.
    pub fn new(
        hub: Hub,
        limits: SessionLimits,
        requests: Option<Streaming<TickerRequest>>,
        shutdown: Shutdown,
        permit: OwnedSemaphorePermit,
    ) -> Session {
        let shutdown_wake = Box::pin(shutdown.token().clone().cancelled_owned());
        Session {
            hub,
            limits,
            requests,
            subs: Vec::new(),
            control: VecDeque::new(),
            held: None,
            cursor: 0,
            shutdown,
            shutdown_wake,
            shutdown_armed: false,
            finished: false,
            _permit: permit,
        }
    }

    /// Number of symbols this stream is subscribed to.
    pub fn subscription_count(&self) -> usize {
        self.subs.len()
    }

    /// Applies one client request, queueing its reply.
    pub fn apply(&mut self, request: TickerRequest) {
        match Action::try_from(request.action) {
            Ok(Action::Unspecified | Action::Subscribe) => self.subscribe(&request.symbol),
            Ok(Action::Unsubscribe) => self.unsubscribe(&request.symbol),
            Err(_) => self.reject(
                &request.symbol,
                format!(
                    "unknown action {}: use ACTION_SUBSCRIBE or ACTION_UNSUBSCRIBE",
                    request.action
                ),
            ),
        }
    }

    /// Subscribes to `symbol`: queues KIND_SUBSCRIBED then the snapshot, or KIND_REJECTED.
    pub fn subscribe(&mut self, symbol: &str) {
        if let Err(e) = symbol::validate(symbol) {
            return self.reject(symbol, e.to_string());
        }
        if self.subs.iter().any(|s| &*s.symbol == symbol) {
            return self.push(control(Kind::Subscribed, symbol, "already subscribed"));
        }
        if self.subs.len() >= self.limits.max_subscriptions {
            let max = self.limits.max_subscriptions;
            return self.reject(
                symbol,
                format!("too many subscriptions on this stream (limit {max})"),
            );
        }
        match self.hub.subscribe(symbol) {
            Ok(sub) => {
                let last_seq = sub.snapshot.as_ref().map_or(0, |t| t.seq);
                self.subs.push(Sub {
                    symbol: Arc::from(symbol),
                    receiver: sub.receiver,
                    last_seq,
                });
                self.push(control(Kind::Subscribed, symbol, ""));
                if let Some(snapshot) = sub.snapshot {
                    self.push(snapshot.to_response(Kind::Snapshot));
                }
            }
            Err(
                e @ (SubscribeError::Unknown
                | SubscribeError::SymbolLimit(_)
                | SubscribeError::Symbol(_)),
            ) => self.reject(symbol, e.to_string()),
        }
    }

    fn unsubscribe(&mut self, symbol: &str) {
        if let Err(e) = symbol::validate(symbol) {
            return self.reject(symbol, e.to_string());
        }
        // Dropping the receiver is what stops delivery; a held tick of it goes too.
        self.subs.retain(|s| &*s.symbol != symbol);
        if self.held.as_ref().is_some_and(|t| &*t.symbol == symbol) {
            self.held = None;
        }
        self.push(control(Kind::Unsubscribed, symbol, ""));
    }

    fn reject(&mut self, symbol: &str, detail: String) {
        self.push(TickerResponse {
            symbol: symbol.to_string(),
            kind: Kind::Rejected as i32,
            detail,
            ..Default::default()
        });
    }

    fn push(&mut self, msg: TickerResponse) {
        self.control.push_back(msg);
    }

    /// Reads requests while the reply queue has room. `Err` ends the stream.
    fn poll_requests(&mut self, cx: &mut Context<'_>) -> Result<(), Status> {
        while self.control.len() < CONTROL_QUEUE_LIMIT {
            let Some(requests) = self.requests.as_mut() else {
                return Ok(());
            };
            match Pin::new(requests).poll_next(cx) {
                Poll::Ready(Some(Ok(request))) => self.apply(request),
                Poll::Ready(Some(Err(status))) => return Err(status),
                // Half-close: the client sends no more, but ticks keep flowing.
                Poll::Ready(None) => self.requests = None,
                Poll::Pending => return Ok(()),
            }
        }
        Ok(())
    }

    /// The next live tick of any subscription, round-robin; a gap comes out as
    /// KIND_LAGGED first, with the tick held for the next call.
    fn poll_ticks(&mut self, cx: &mut Context<'_>) -> Poll<Outbound> {
        let n = self.subs.len();
        for i in 0..n {
            let idx = (self.cursor + i) % n;
            let sub = &mut self.subs[idx];
            loop {
                match Pin::new(&mut sub.receiver).poll_recv(cx) {
                    Poll::Ready(Some(Ok(tick))) => {
                        // At or below what the snapshot already showed: skip.
                        if tick.seq <= sub.last_seq {
                            continue;
                        }
                        let dropped = tick.seq - sub.last_seq - 1;
                        sub.last_seq = tick.seq;
                        self.cursor = idx + 1;
                        if dropped == 0 {
                            return Poll::Ready(Outbound::Tick(tick));
                        }
                        let notice = lagged(&sub.symbol, dropped);
                        self.held = Some(tick);
                        return Poll::Ready(Outbound::Message(notice));
                    }
                    // The seq gap of the next tick reports the exact count.
                    Poll::Ready(Some(Err(RecvError::Overflowed(_)))) => continue,
                    // Closed cannot happen while this receiver is open; treat as idle.
                    Poll::Ready(Some(Err(RecvError::Closed)) | None) | Poll::Pending => break,
                }
            }
        }
        Poll::Pending
    }
}

impl Stream for Session {
    type Item = Result<Outbound, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        if !this.shutdown_armed {
            // Registers this stream's task; the token's wake-up lands here again.
            let _ = this.shutdown_wake.as_mut().poll(cx);
            this.shutdown_armed = true;
        }
        if this.shutdown.is_triggered() {
            this.finished = true;
            return Poll::Ready(Some(Err(Status::unavailable("server shutting down"))));
        }
        if let Some(tick) = this.held.take() {
            return Poll::Ready(Some(Ok(Outbound::Tick(tick))));
        }
        if let Err(status) = this.poll_requests(cx) {
            this.finished = true;
            return Poll::Ready(Some(Err(status)));
        }
        if let Some(msg) = this.control.pop_front() {
            return Poll::Ready(Some(Ok(Outbound::Message(msg))));
        }
        this.poll_ticks(cx).map(|out| Some(Ok(out)))
    }
}

fn control(kind: Kind, symbol: &str, detail: &str) -> TickerResponse {
    TickerResponse {
        symbol: symbol.to_string(),
        kind: kind as i32,
        detail: detail.to_string(),
        ..Default::default()
    }
}

fn lagged(symbol: &str, dropped: u64) -> TickerResponse {
    TickerResponse {
        symbol: symbol.to_string(),
        kind: Kind::Lagged as i32,
        dropped,
        detail: format!("stream fell behind: {dropped} oldest ticks of {symbol} dropped"),
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

    fn session(hub: &Hub) -> Session {
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        let limits = SessionLimits {
            max_subscriptions: 10,
        };
        Session::new(hub.clone(), limits, None, Shutdown::new(), permit)
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
    fn every_ready_tick_is_yielded_in_one_poll_pass() {
        let hub = Hub::new(HubConfig::default());
        hub.publish("A", 1.0, 0).unwrap();
        let mut s = session(&hub);
        s.subscribe("A");
        assert_eq!(
            kinds(&drain(&mut s)),
            [(Kind::Subscribed, 0), (Kind::Snapshot, 1)]
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
    fn round_robin_serves_every_symbol() {
        let hub = Hub::new(HubConfig::default());
        for s in ["A", "B"] {
            hub.publish(s, 1.0, 0).unwrap();
        }
        let mut s = session(&hub);
        s.subscribe("A");
        s.subscribe("B");
        drain(&mut s);
        for _ in 0..3 {
            hub.publish("A", 1.0, 0).unwrap();
            hub.publish("B", 1.0, 0).unwrap();
        }
        let symbols: String = drain(&mut s).iter().map(|m| m.symbol.clone()).collect();
        assert_eq!(symbols, "ABABAB");
    }

    #[test]
    fn shutdown_ends_the_stream_with_unavailable() {
        let hub = Hub::new(HubConfig::default());
        let shutdown = Shutdown::new();
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        let mut s = Session::new(
            hub,
            SessionLimits {
                max_subscriptions: 1,
            },
            None,
            shutdown.clone(),
            permit,
        );
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
