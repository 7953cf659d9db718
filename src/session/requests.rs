//! The request side of a session: what the client asks on its stream (subscribe,
//! unsubscribe, a policy switch, a resume point, an in-band token) becomes a change of
//! the subscription set and a queued control reply (SUBSCRIBED, SNAPSHOT or replayed
//! ticks, UNSUBSCRIBED, REJECTED, TOKEN_REFRESHED). `delivery` then drains the set.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
    time::UNIX_EPOCH,
};

use futures_core::Stream;
use tokio::time::Instant;
use tonic::Status;

use super::{
    control, instant_of,
    policy::{conflated, resume_point, Feed, Sub},
    Ending, Outbound, Policy, Session, CONTROL_QUEUE_LIMIT,
};
use crate::{
    clock,
    hub::{Delivery, ResumePoint, SubscribeError, SyncWait},
    ops::metrics::ended,
    pb::{ticker_request::Action, ticker_response::Kind, TickerRequest, TickerResponse},
    symbol::{self, Symbol},
};

/// A subscribe waiting for a cluster to sync its symbol (`SubscribeError::Syncing`):
/// retried when the hub rings the session's doorbell.
pub(super) struct Pending {
    symbol: Symbol,
    policy: Policy,
    resume: Option<ResumePoint>,
    /// Keeps the symbol wanted meanwhile.
    _wait: SyncWait,
}

/// KIND_STALE's detail.
const STALE: &str = "this server lost its market-data bus: ticks may be missing until KIND_LIVE";
/// KIND_LIVE's detail.
const LIVE: &str =
    "the market-data bus is back: missed ticks follow in order, or KIND_LAGGED counts those gone";

impl Session {
    /// Applies one client request, queueing its reply; `Err` ends the stream.
    pub(super) fn apply(&mut self, request: TickerRequest) -> Result<(), Ending> {
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
    pub(super) fn refresh(&mut self, token: &str) -> Result<(), Ending> {
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
    pub(super) fn subscribe_with(
        &mut self,
        symbol: &str,
        policy: Policy,
        resume: Option<ResumePoint>,
    ) {
        if let Err(e) = symbol::validate(symbol) {
            return self.reject(symbol, e.to_string());
        }
        if !self.caller.principal.entitled(symbol) {
            return self.reject(symbol, format!("not entitled to {symbol}"));
        }
        // A new subscribe replaces one still waiting for the same symbol.
        self.pending.retain(|p| &*p.symbol != symbol);
        let (resume, detail) = match self.subs.iter().position(|s| &*s.symbol == symbol) {
            Some(idx) if self.subs[idx].policy == policy && resume.is_none() => {
                return self.push(control(Kind::Subscribed, symbol, "already subscribed"));
            }
            Some(idx) => {
                self.sync_direct(idx);
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
            None if self.subs.len() + self.pending.len() >= self.limits.max_subscriptions => {
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
            Err(SubscribeError::Syncing(wait)) => {
                // Answered once the cluster has the symbol's history (`retry_pending`).
                wait.notify(&self.bell.doorbell());
                self.pending.push(Pending {
                    symbol: Arc::from(symbol),
                    policy,
                    resume,
                    _wait: wait,
                });
                return;
            }
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
        if self.hub.bus_stale() {
            self.push(control(Kind::Stale, symbol, STALE));
        }
    }

    /// Subscribes again to every symbol whose sync this stream waited for, once the
    /// hub rang the doorbell (a symbol still syncing just waits again).
    pub(super) fn retry_pending(&mut self) {
        if self.pending.is_empty() || !self.bell.requests_rung() {
            return;
        }
        if self.requests.is_none() {
            // Nobody else answers the doorbell on a stream without requests.
            self.bell.take_requests_rung();
        }
        for waiting in std::mem::take(&mut self.pending) {
            // `waiting` keeps the symbol wanted until the subscription holds it.
            self.subscribe_with(&waiting.symbol, waiting.policy, waiting.resume);
        }
    }

    /// Tells the client the bus went away or came back, for every symbol it has.
    pub(super) fn announce_bus(&mut self) {
        self.bus_seen = self.hub.bus_generation();
        let (kind, detail) = if self.hub.bus_stale() {
            (Kind::Stale, STALE)
        } else {
            (Kind::Live, LIVE)
        };
        let symbols: Vec<Symbol> = self.subs.iter().map(|s| Arc::clone(&s.symbol)).collect();
        for symbol in symbols {
            self.push(control(kind, &symbol, detail));
        }
    }

    /// Ends `old`, queueing what it folded but did not send yet; returns the last seq
    /// this stream has been given of its symbol.
    pub(super) fn flush(&mut self, mut old: Sub) -> u64 {
        if let Feed::Conflate { conflator, .. } = &mut old.feed {
            if let Some(fold) = conflator.take() {
                // A delivery like any conflated message (the chaos soak's accounting).
                self.local.delivered += 1;
                self.local.dirty = true;
                self.control.push_back(Outbound::message(conflated(&fold)));
                return fold.last.seq;
            }
        }
        old.last_seq
    }

    pub(super) fn unsubscribe(&mut self, symbol: &str, detail: &str) {
        if let Err(e) = symbol::validate(symbol) {
            return self.reject(symbol, e.to_string());
        }
        // Dropping the receiver (or conflator) is what stops delivery; a held tick of
        // it goes too.
        let before = self.subs.len();
        self.pending.retain(|p| &*p.symbol != symbol);
        if let Some(idx) = self.subs.iter().position(|s| &*s.symbol == symbol) {
            self.sync_direct(idx);
        }
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
    pub(super) fn reindex(&mut self) {
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

    pub(super) fn reject(&mut self, symbol: &str, detail: String) {
        tracing::debug!(parent: &self.span, symbol, %detail, "request rejected");
        self.push(TickerResponse {
            symbol: symbol.to_string(),
            kind: Kind::Rejected as i32,
            detail,
            ..Default::default()
        });
    }

    pub(super) fn push(&mut self, msg: TickerResponse) {
        self.control.push_back(Outbound::message(msg));
    }

    /// Reads requests while the reply queue has room. `Err` ends the stream.
    pub(super) fn poll_requests(&mut self, cx: &Context<'_>) -> Result<(), Ending> {
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
}

#[cfg(test)]
mod tests {
    use super::super::testing::{drain, kinds, session_until, subscribed, tick_and_drain};
    use super::*;
    use crate::{
        hub::{Hub, HubConfig},
        shutdown::Shutdown,
    };

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
        assert_eq!(tick_and_drain(&hub, &mut s, "A"), [(Kind::Tick, 2)]);
    }

    #[test]
    fn news_reaches_a_subscription_whose_place_moved() {
        let hub = Hub::new(HubConfig::default());
        let mut s = subscribed(&hub, &["A", "B", "C"]);
        s.unsubscribe("A", "");
        drain(&mut s);
        // C moved from place 2 to 1: its ticks must mark bit 1 now.
        assert_eq!(tick_and_drain(&hub, &mut s, "C"), [(Kind::Tick, 2)]);
        assert_eq!(tick_and_drain(&hub, &mut s, "B"), [(Kind::Tick, 2)]);
    }

    #[test]
    fn a_repeated_subscribe_is_acked_again_and_never_doubles_delivery() {
        let hub = Hub::new(HubConfig::default());
        let mut s = subscribed(&hub, &["A"]);
        s.subscribe("A");
        let again = drain(&mut s);
        assert_eq!(kinds(&again), [(Kind::Subscribed, 0)]);
        assert_eq!(again[0].detail, "already subscribed");
        assert_eq!(tick_and_drain(&hub, &mut s, "A"), [(Kind::Tick, 2)]);
    }

    #[test]
    fn bad_requests_are_rejected_in_band_and_the_stream_goes_on() {
        let hub = Hub::new(HubConfig::default());
        hub.publish("A", 1.0, 0).unwrap();
        hub.publish("B", 1.0, 0).unwrap();
        let mut s = session_until(&hub, &Shutdown::new(), 1);
        s.subscribe("NOPE");
        s.subscribe("bad symbol");
        s.apply(TickerRequest {
            symbol: "A".into(),
            action: 9,
            ..Default::default()
        })
        .unwrap();
        s.subscribe("A");
        s.subscribe("B");
        let got = drain(&mut s);
        let rejected: Vec<(&str, &str)> = got
            .iter()
            .filter(|m| m.kind() == Kind::Rejected)
            .map(|m| (m.symbol.as_str(), m.detail.as_str()))
            .collect();
        assert_eq!(rejected.len(), 4, "{got:?}");
        assert_eq!(rejected[0], ("NOPE", "unknown symbol"));
        assert_eq!(rejected[1].0, "bad symbol");
        assert!(
            rejected[2].1.starts_with("unknown action 9"),
            "{rejected:?}"
        );
        assert_eq!(
            rejected[3],
            ("B", "too many subscriptions on this stream (limit 1)")
        );
        assert_eq!(tick_and_drain(&hub, &mut s, "A"), [(Kind::Tick, 2)]);
    }

    #[test]
    fn unsubscribing_acks_and_stops_the_symbol() {
        let hub = Hub::new(HubConfig::default());
        let mut s = subscribed(&hub, &["A"]);
        s.unsubscribe("A", "");
        assert_eq!(kinds(&drain(&mut s)), [(Kind::Unsubscribed, 0)]);
        assert!(tick_and_drain(&hub, &mut s, "A").is_empty());
        assert_eq!(hub.receiver_count("A"), 0, "the ring reader is gone");
    }
}
