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
mod tests {
    use futures_util::task::noop_waker_ref;

    use super::super::testing::{
        anonymous, drain, kinds, session, session_until, subscribed, ticket,
    };
    use super::*;
    use crate::{
        hub::{Hub, HubConfig},
        pb::ticker_response::Kind,
        session::SessionLimits,
        shutdown::Shutdown,
    };

    #[test]
    fn warming_reads_the_news_without_taking_it() {
        let hub = Hub::new(HubConfig::default());
        let symbols: Vec<String> = (0..70).map(|i| format!("S{i}")).collect();
        for s in &symbols {
            hub.publish(s, 1.0, 0).unwrap();
        }
        // Past 64 subscriptions hint bits alias; warming must stay in bounds.
        let mut s = session_until(&hub, &Shutdown::new(), 100);
        for name in &symbols {
            s.subscribe(name);
        }
        drain(&mut s);
        for name in ["S3", "S69"] {
            hub.publish(name, 2.0, 0).unwrap();
        }
        let news = s.bell.peek_news();
        assert_ne!(news, 0);
        for depth in 0..4 {
            std::hint::black_box(s.warm(depth));
        }
        assert_eq!(s.bell.peek_news(), news, "warming takes nothing");
        assert_eq!(kinds(&drain(&mut s)), [(Kind::Tick, 2), (Kind::Tick, 2)]);
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

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Wakes(std::sync::atomic::AtomicU32);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A CONFLATE subscription waits for its next message on a timer set to when it
    /// falls due, moved on after each message: the task is woken then, not before and
    /// not over and over (a timer left at a past deadline would wake it on every poll).
    #[tokio::test(start_paused = true)]
    async fn a_conflated_subscription_sleeps_until_its_next_message_is_due() {
        use futures_core::Stream as _;
        use std::pin::Pin;

        let every = Duration::from_millis(100);
        let hub = Hub::new(HubConfig::default());
        hub.publish("C", 1.0, 0).unwrap();
        let mut s = session(&hub);
        s.subscribe_with("C", Policy::Conflate { every }, None);
        drain(&mut s);
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut poll = |s: &mut Session| match Pin::new(s).poll_next(&mut cx) {
            Poll::Ready(Some(Ok(out))) => Some(out.to_response()),
            Poll::Pending => None,
            Poll::Ready(_) => panic!("the stream ended or failed"),
        };
        for round in 1..=3 {
            hub.publish("C", 2.0, 0).unwrap();
            hub.publish("C", 3.0, 0).unwrap();
            if round > 1 {
                assert!(poll(&mut s).is_none(), "round {round}: not due yet");
                let before = wakes.0.load(Ordering::SeqCst);
                assert!(poll(&mut s).is_none());
                assert_eq!(
                    wakes.0.load(Ordering::SeqCst),
                    before,
                    "round {round}: woken before due"
                );
                tokio::time::advance(every).await;
                assert!(
                    wakes.0.load(Ordering::SeqCst) > before,
                    "round {round}: not woken when due"
                );
            }
            let msg = poll(&mut s).expect("a conflated message when due");
            assert_eq!((msg.kind(), msg.count), (Kind::Tick, 2), "round {round}");
        }
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

    /// One warning per backlog: none below half the ring, none again while the backlog
    /// stays above a quarter, and a new one once it fell below a quarter and rose past
    /// half again.
    #[test]
    fn a_backlog_warns_once_until_it_falls_below_a_quarter() {
        use crate::pb::TickerResponse;
        use futures_core::Stream as _;

        let hub = Hub::new(HubConfig {
            channel_capacity: 64,
            ..HubConfig::default()
        });
        hub.publish("A", 1.0, 0).unwrap();
        let mut s = session(&hub);
        s.subscribe("A");
        drain(&mut s);
        let publish = |n: usize| {
            for _ in 0..n {
                hub.publish("A", 1.0, 0).unwrap();
            }
        };
        let warnings = |msgs: &[TickerResponse]| -> Vec<u64> {
            msgs.iter()
                .filter(|m| m.kind() == Kind::Backlog)
                .map(|m| m.queue_depth)
                .collect()
        };
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut take = |s: &mut Session, ticks: usize| {
            let mut out = Vec::new();
            while out
                .iter()
                .filter(|m: &&TickerResponse| m.kind() == Kind::Tick)
                .count()
                < ticks
            {
                match std::pin::Pin::new(&mut *s).poll_next(&mut cx) {
                    Poll::Ready(Some(Ok(msg))) => out.push(msg.to_response()),
                    _ => panic!("the stream waits or ended with ticks still behind"),
                }
            }
            out
        };

        // A check every 16 ticks: 32 leave the count at a check.
        publish(32);
        assert!(warnings(&drain(&mut s)).is_empty(), "under half the ring");

        // 60 behind: warned at the first check (44 left); 32 taken, 28 left, 28 more
        // published: between a quarter and a half all the way down to 8 left.
        publish(60);
        let mut msgs = take(&mut s, 32);
        publish(28);
        msgs.extend(drain(&mut s));
        assert_eq!(warnings(&msgs), [44], "one warning while above a quarter");

        // 88 taken since: the next check comes 8 ticks in.
        publish(60);
        assert_eq!(
            warnings(&drain(&mut s)),
            [52],
            "warned again after falling below"
        );
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

    /// A waker that publishes a tick of `symbol` when its last clone is dropped.
    struct PublishOnDrop {
        hub: Hub,
        symbol: &'static str,
        fired: Arc<std::sync::atomic::AtomicBool>,
    }

    impl std::task::Wake for PublishOnDrop {
        fn wake(self: Arc<Self>) {}
    }

    impl Drop for PublishOnDrop {
        fn drop(&mut self) {
            self.hub.publish(self.symbol, 2.0, 0).unwrap();
            self.fired.store(true, Ordering::SeqCst);
        }
    }

    /// A tick published after a poll's first look at the bell's news, but before it arms
    /// the bell, is found by the look after arming, not left for a later tick to bring
    /// (no ring wakes a bell that is not armed). The tick is published from that very
    /// window: by the drop of the last waker, which the bell lets go of as it registers
    /// the poll's new one, just before it arms.
    #[test]
    fn a_tick_published_just_before_the_bell_is_armed_is_not_left_behind() {
        use futures_core::Stream as _;
        use std::{pin::Pin, sync::atomic::AtomicBool};

        let hub = Hub::new(HubConfig::default());
        let mut s = subscribed(&hub, &["B"]);
        let fired = Arc::new(AtomicBool::new(false));
        let last = std::task::Waker::from(Arc::new(PublishOnDrop {
            hub: hub.clone(),
            symbol: "B",
            fired: fired.clone(),
        }));
        assert!(Pin::new(&mut s)
            .poll_next(&mut Context::from_waker(&last))
            .is_pending());
        drop(last);
        assert!(!fired.load(Ordering::SeqCst), "the bell holds the waker");

        let got = Pin::new(&mut s).poll_next(&mut Context::from_waker(noop_waker_ref()));
        assert!(fired.load(Ordering::SeqCst), "published during the poll");
        match got {
            Poll::Ready(Some(Ok(out))) => {
                let msg = out.to_response();
                assert_eq!(
                    (msg.kind(), msg.symbol.as_str(), msg.seq),
                    (Kind::Tick, "B", 2)
                );
            }
            Poll::Ready(_) => panic!("the stream ended or failed"),
            Poll::Pending => panic!("the tick published before the bell was armed waits"),
        }
    }
}
