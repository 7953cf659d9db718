//! Unit tests of a session's delivery side, on an in-process hub: order, lag and
//! backlog notices, round-robin, the bell's last look, CONFLATE timing, and the
//! counters and latency samples a delivery feeds.

use futures_util::task::noop_waker_ref;

use super::super::testing::{
    anonymous, drain, kinds, session, session_until, subscribed, tick_and_drain, ticket,
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
    let sent = |s: &Session| s.ticket.info.sent.load(Ordering::Relaxed);
    let sent_before = sent(&s);
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
    assert!(poll(&mut s).is_none());
    assert_eq!(
        sent(&s) - sent_before,
        3,
        "each conflated message counted as sent"
    );
}

/// The publish-to-send latency is sampled at most once per 100 ms of event time, as
/// the time from the tick's event to its send.
#[test]
fn the_publish_to_send_latency_is_sampled_at_most_every_100_ms() {
    let hub = Hub::new(HubConfig::default());
    let mut s = subscribed(&hub, &["A"]);
    let metric = |s: &Session, name: &str| -> f64 {
        let text = s.ticket.metrics.render();
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"));
        line[name.len() + 1..].trim().parse().unwrap()
    };
    let (count, sum) = (
        "tickerd_publish_to_send_seconds_count",
        "tickerd_publish_to_send_seconds_sum",
    );
    assert_eq!(metric(&s, count), 0.0, "a snapshot is not sampled");
    let sent = |s: &Session| s.ticket.info.sent.load(Ordering::Relaxed);
    let sent_before = sent(&s);
    // Sampled: its event two seconds ago.
    hub.publish("A", 2.0, clock::now_unix_nanos() - 2_000_000_000)
        .unwrap();
    // Not sampled: stamped now, inside the 100 ms after the last sample.
    hub.publish("A", 3.0, 0).unwrap();
    assert_eq!(drain(&mut s).len(), 2);
    assert_eq!(sent(&s) - sent_before, 2, "both counted as sent");
    assert_eq!(metric(&s, count), 1.0);
    let seconds = metric(&s, sum);
    assert!((2.0..2.5).contains(&seconds), "{seconds}");
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

/// A hub whose rings hold `capacity` ticks, and a session subscribed to A (seq 1),
/// its ack and snapshot drained.
fn on_a_ring_of(capacity: usize) -> (Hub, Session) {
    let hub = Hub::new(HubConfig {
        channel_capacity: capacity,
        ..HubConfig::default()
    });
    hub.publish("A", 1.0, 0).unwrap();
    let mut s = session(&hub);
    s.subscribe("A");
    drain(&mut s);
    (hub, s)
}

#[test]
fn overflow_becomes_an_exact_lag_notice_before_the_next_tick() {
    let (hub, mut s) = on_a_ring_of(4);
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
    let (hub, mut s) = on_a_ring_of(64);
    // Their events a second old: the warning gives the age of the tick it came with.
    let a_second_ago = clock::now_unix_nanos() - 1_000_000_000;
    for _ in 0..60 {
        hub.publish("A", 1.0, a_second_ago).unwrap();
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
    let age = Duration::from_nanos(msgs[warning].queue_age_nanos);
    assert!(
        (Duration::from_secs(1)..Duration::from_millis(1500)).contains(&age),
        "{age:?}"
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

    let (hub, mut s) = on_a_ring_of(64);
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

/// While open, takes every tick of one symbol, as a publish framing it straight into
/// the connection would.
#[derive(Debug)]
struct SinkFor(&'static str, std::sync::atomic::AtomicBool);

impl crate::hub::DirectSink for SinkFor {
    fn offer(&self, tick: &Tick) -> bool {
        self.is_open() && &*tick.symbol == self.0
    }

    fn is_open(&self) -> bool {
        self.1.load(Ordering::SeqCst)
    }

    fn sent(&self) -> u64 {
        0
    }
}

/// A subscription looked at for news that was all sent straight into the connection
/// (news, and nothing to take) leaves the other subscriptions' news in place: a tick
/// the walk did not reach is still taken on the next poll.
#[test]
fn news_sent_directly_leaves_the_other_subscriptions_news() {
    use futures_core::Stream as _;

    let hub = Hub::new(HubConfig::default());
    let mut s = subscribed(&hub, &["X", "Y", "Z"]);
    let sink = Arc::new(SinkFor("Y", false.into()));
    s.set_direct(sink.clone());
    let next = |s: &mut Session| {
        let mut cx = Context::from_waker(noop_waker_ref());
        match std::pin::Pin::new(s).poll_next(&mut cx) {
            Poll::Ready(Some(Ok(out))) => out.to_response().symbol,
            _ => panic!("a message was due"),
        }
    };
    // X, then Y, then X served: the walk starts at Y next, and Y's hint is still set.
    assert_eq!(tick_and_drain(&hub, &mut s, "X"), [(Kind::Tick, 2)]);
    hub.publish("Y", 2.0, 0).unwrap();
    hub.publish("X", 3.0, 0).unwrap();
    assert_eq!((next(&mut s), next(&mut s)), ("Y".into(), "X".into()));
    // Y's next tick goes straight to the connection; Z and X wait in their rings.
    sink.1.store(true, Ordering::SeqCst);
    for symbol in ["Y", "Z", "X"] {
        hub.publish(symbol, 4.0, 0).unwrap();
    }
    let symbols: String = drain(&mut s).iter().map(|m| m.symbol.clone()).collect();
    assert_eq!(symbols, "ZX");
}
