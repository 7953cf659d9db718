//! The ring, its receivers and the bell, driven directly.

use std::{
    sync::atomic::AtomicUsize,
    task::{Context, Wake, Waker},
};

use super::*;
use crate::hub::{Delivery, Hub, HubConfig};

struct Count(AtomicUsize);

/// A hub whose rings keep `capacity` ticks, with one tick of "A" published.
fn hub_with_a(capacity: usize) -> Hub {
    let hub = Hub::new(HubConfig {
        channel_capacity: capacity,
        ..HubConfig::default()
    });
    hub.publish("A", 1.0, 0).unwrap();
    hub
}

impl Wake for Count {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn an_armed_bell_rings_once_for_any_number_of_ticks_and_symbols() {
    let hub = Hub::new(HubConfig::default());
    let mut bell = Bell::new();
    let mut rxs: Vec<Receiver> = ["A", "B"]
        .iter()
        .map(|s| {
            hub.declare(s).unwrap();
            let sub = hub.subscribe_with(s, None, Delivery::Channel(&bell));
            sub.unwrap().receiver.unwrap()
        })
        .collect();
    rxs[0].set_hint(0b01);
    rxs[1].set_hint(0b10);
    let count = Arc::new(Count(AtomicUsize::new(0)));
    let waker = Waker::from(Arc::clone(&count));
    hub.publish("A", 1.0, 0).unwrap();
    assert_eq!(count.0.load(Ordering::SeqCst), 0, "not armed: no wake");
    assert_eq!(bell.take_news(), 0b01, "but the news is marked");
    assert_eq!(bell.take_news(), 0);
    bell.arm(&waker);
    for _ in 0..3 {
        hub.publish("A", 1.0, 0).unwrap();
        hub.publish("B", 1.0, 0).unwrap();
    }
    assert_eq!(count.0.load(Ordering::SeqCst), 1);
    assert_eq!(bell.take_news(), 0b11);
    let mut out = VecDeque::new();
    assert!(rxs.iter().all(Receiver::has_news));
    assert_eq!(rxs[0].take(10, &mut out), 4);
    assert_eq!(rxs[1].take(2, &mut out), 2);
    assert_eq!(rxs[1].pending(), 1);
    assert!(!rxs[0].has_news());
    bell.arm(&waker);
    hub.publish("B", 1.0, 0).unwrap();
    assert_eq!(count.0.load(Ordering::SeqCst), 2);
}

#[test]
fn answers_requests_once_per_ring_and_wakes_the_task() {
    let task = Arc::new(Count(AtomicUsize::new(0)));
    let waker = Waker::from(task.clone());
    let cx = Context::from_waker(&waker);
    let mut bell = Bell::new();
    let polled_with = bell.answer_requests(&cx).expect("rung at first");
    assert!(bell.answer_requests(&cx).is_none(), "nothing new");
    polled_with.wake_by_ref();
    assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task is woken");
    assert!(
        bell.answer_requests(&cx).is_some(),
        "rung by the request stream"
    );
    assert!(bell.answer_requests(&cx).is_none());
    polled_with.wake_by_ref();
    assert_eq!(task.0.load(Ordering::SeqCst), 2, "woken on every ring");
    assert!(bell.answer_requests(&cx).is_some());
    bell.ring_requests();
    assert!(bell.answer_requests(&cx).is_some(), "rung from inside");
    assert!(bell.take_news() == 0 && !bell.state.armed.load(Ordering::SeqCst));
}

#[test]
fn a_leaving_receiver_moves_no_other_and_its_entry_is_reused() {
    let hub = hub_with_a(2);
    let bell = Bell::new();
    let join = || {
        let sub = hub.subscribe_with("A", None, Delivery::Channel(&bell));
        sub.unwrap().receiver.unwrap()
    };
    let (mut a, b, mut c) = (join(), join(), join());
    c.set_hint(0b100);
    let readers = || {
        let slot = hub.shared.symbols.get("A").unwrap();
        let state = slot.lock();
        state.ring.as_ref().map_or(0, |r| r.readers.len())
    };
    drop(b);
    assert_eq!(readers(), 3, "the entry stays, vacant");
    hub.publish("A", 2.0, 0).unwrap();
    assert_eq!(bell.take_news(), 0b100, "c still has its own entry");
    let mut out = VecDeque::new();
    let first = c.take_first(32, &mut out).map(|t| t.seq);
    assert_eq!(
        (first, out.len()),
        (Some(2), 0),
        "a lone tick is not queued"
    );
    assert_eq!(a.try_next().map(|t| t.seq), Some(2));
    // b left at seq 2; a and c took everything, so the ring drops nothing untaken
    // however far it moves past b's old position.
    for _ in 0..5 {
        hub.publish("A", 3.0, 0).unwrap();
        assert!(a.try_next().is_some() && c.try_next().is_some());
    }
    assert_eq!(hub.stats().overflowed.load(Ordering::Relaxed), 0);
    let mut d = join();
    assert_eq!(readers(), 3, "d took b's entry");
    hub.publish("A", 4.0, 0).unwrap();
    hub.publish("A", 5.0, 0).unwrap();
    assert_eq!(d.take_first(32, &mut out).map(|t| t.seq), Some(8));
    assert_eq!(
        out.pop_front().map(|t| t.seq),
        Some(9),
        "the rest is queued"
    );
    for rx in [&mut a, &mut c] {
        while rx.try_next().is_some() {}
    }
    assert!(d.take_first(32, &mut out).is_none());
    hub.publish("A", 6.0, 0).unwrap();
    hub.publish("A", 7.0, 0).unwrap();
    for rx in [&mut a, &mut c] {
        while rx.try_next().is_some() {}
    }
    assert_eq!(hub.stats().overflowed.load(Ordering::Relaxed), 0);
    hub.publish("A", 8.0, 0).unwrap();
    assert_eq!(
        hub.stats().overflowed.load(Ordering::Relaxed),
        1,
        "seq 10 left the ring untaken by d alone: d's position is in its entry"
    );
}

#[test]
fn the_ring_is_freed_with_its_last_receiver() {
    let hub = Hub::new(HubConfig::default());
    hub.publish("A", 1.0, 0).unwrap();
    let a = hub.subscribe("A").unwrap().receiver.unwrap();
    let b = hub.subscribe("A").unwrap().receiver.unwrap();
    hub.publish("A", 2.0, 0).unwrap();
    assert_eq!(hub.receiver_count("A"), 2);
    drop(a);
    assert_eq!(hub.receiver_count("A"), 1);
    drop(b);
    assert_eq!(hub.receiver_count("A"), 0);
    assert!(hub.shared.symbols.get("A").unwrap().lock().ring.is_none());
}

/// The ticks `hub`'s ring of "A" holds, by seq.
fn ring_seqs(hub: &Hub) -> Vec<u64> {
    let slot = hub.shared.symbols.get("A").unwrap();
    let state = slot.lock();
    let ring = state.ring.as_ref();
    ring.map_or_else(Vec::new, |r| r.ticks.iter().map(|t| t.seq).collect())
}

#[test]
fn the_ring_holds_only_what_its_slowest_reader_has_not_taken() {
    let hub = hub_with_a(8);
    let (mut fast, mut slow) = (
        hub.subscribe("A").unwrap().receiver.unwrap(),
        hub.subscribe("A").unwrap().receiver.unwrap(),
    );
    for _ in 0..3 {
        hub.publish("A", 2.0, 0).unwrap();
        assert!(fast.try_next().is_some());
    }
    assert_eq!(ring_seqs(&hub), vec![2, 3, 4], "the slow reader lacks them");
    assert_eq!(slow.try_next().map(|t| t.seq), Some(2));
    hub.publish("A", 3.0, 0).unwrap();
    assert_eq!(ring_seqs(&hub), vec![3, 4, 5], "2 went at the next publish");
    let mut out = VecDeque::new();
    assert_eq!(slow.take(32, &mut out), 3);
    assert_eq!(fast.take(32, &mut out), 1);
    hub.publish("A", 4.0, 0).unwrap();
    assert_eq!(ring_seqs(&hub), vec![6], "everyone took the rest");
    // Falling a full ring behind still drops and counts, as before.
    for _ in 0..10 {
        hub.publish("A", 5.0, 0).unwrap();
        while fast.try_next().is_some() {}
    }
    assert_eq!(ring_seqs(&hub).len(), 8);
    assert_eq!(hub.stats().overflowed.load(Ordering::Relaxed), 3);
    assert_eq!(
        slow.try_next().map(|t| t.seq),
        Some(9),
        "6..=8 dropped: a gap"
    );
}

#[tokio::test]
async fn a_reader_behind_a_hole_from_the_bus_takes_every_tick_after_it() {
    let (hub, _interest) = Hub::sequenced_by_cluster(HubConfig::default(), 7);
    let bell = Bell::new();
    let wait = match hub.subscribe_with("A", None, Delivery::Channel(&bell)) {
        Err(crate::hub::SubscribeError::Syncing(wait)) => wait,
        other => panic!("not syncing: {:?}", other.map(|s| s.seq)),
    };
    let generation = hub.begin_sync("A").unwrap();
    hub.apply(generation, "A", 1, 1.0, 1, 1).unwrap();
    hub.set_live("A", generation, true);
    drop(wait);
    let sub = hub.subscribe_with("A", None, Delivery::Channel(&bell));
    let (mut behind, mut other) = (
        sub.unwrap().receiver.unwrap(),
        hub.subscribe("A").unwrap().receiver.unwrap(),
    );
    // 2 and 3, then a hole (4, 5) the bus could not fill, then 6 and 7.
    for seq in [2, 3, 6, 7] {
        hub.apply(generation, "A", seq, 1.0, 1, 1).unwrap();
    }
    assert_eq!(behind.try_next().map(|t| t.seq), Some(2));
    let mut out = VecDeque::new();
    assert_eq!(other.take(32, &mut out), 4);
    // A reader joining after the hole, while the ring still holds ticks from before
    // it, starts at the symbol's seq (the distance from the front overshoots).
    let mut late = hub.subscribe("A").unwrap().receiver.unwrap();
    hub.apply(generation, "A", 8, 1.0, 1, 1).unwrap();
    assert_eq!(ring_seqs(&hub), vec![3, 6, 7, 8]);
    assert_eq!(late.try_next().map(|t| t.seq), Some(8));
    // A reader past the hole while the ring still holds ticks from before it: the
    // distance from the front lands on a later tick (10 for 8), so its place is found
    // by seq and nothing between is skipped.
    for seq in [9, 10] {
        hub.apply(generation, "A", seq, 1.0, 1, 1).unwrap();
    }
    assert_eq!(ring_seqs(&hub), vec![3, 6, 7, 8, 9, 10]);
    out.clear();
    assert_eq!(other.take(32, &mut out), 3);
    let taken: Vec<u64> = out.iter().map(|t| t.seq).collect();
    assert_eq!(taken, vec![8, 9, 10], "from its own place, by seq");
    let mut seqs = Vec::new();
    while let Some(t) = behind.try_next() {
        seqs.push(t.seq);
    }
    assert_eq!(seqs, vec![3, 6, 7, 8, 9, 10], "after the hole, by seq");
    hub.apply(generation, "A", 11, 1.0, 1, 1).unwrap();
    assert_eq!(behind.try_next().map(|t| t.seq), Some(11));
    assert_eq!(behind.try_next().map(|t| t.seq), None);
}

/// A sink that takes ticks while `open`, keeping their seqs.
#[derive(Default, Debug)]
struct Sink {
    open: std::sync::atomic::AtomicBool,
    seqs: Mutex<Vec<u64>>,
}

impl DirectSink for Sink {
    fn offer(&self, tick: &Tick) -> bool {
        let open = self.open.load(Ordering::SeqCst);
        if open {
            self.seqs.lock().unwrap().push(tick.seq);
        }
        open
    }

    fn sent(&self) -> u64 {
        self.seqs.lock().unwrap().len() as u64
    }

    fn is_open(&self) -> bool {
        self.open.load(Ordering::SeqCst)
    }
}

/// A receiver of "A" rung through `bell`, which gets a (closed) sink.
fn direct_reader(hub: &Hub, bell: &Bell) -> (Arc<Sink>, Receiver) {
    let sink = Arc::new(Sink::default());
    bell.set_sink(sink.clone());
    let sub = hub.subscribe_with("A", None, Delivery::Channel(bell));
    (sink, sub.unwrap().receiver.unwrap())
}

#[test]
fn a_sink_takes_ticks_in_order_and_the_receiver_hears_of_them() {
    let hub = hub_with_a(4);
    let mut bell = Bell::new();
    let (sink, mut rx) = direct_reader(&hub, &bell);
    rx.set_hint(1);
    let count = Arc::new(Count(AtomicUsize::new(0)));
    let waker = Waker::from(Arc::clone(&count));
    bell.arm(&waker);

    // Closed: the ordinary way.
    hub.publish("A", 2.0, 0).unwrap();
    assert_eq!(count.0.load(Ordering::SeqCst), 1, "woken");
    assert_eq!(bell.take_news(), 1);
    // Open, but the receiver has an untaken tick: still the ordinary way, in order.
    sink.open.store(true, Ordering::SeqCst);
    hub.publish("A", 3.0, 0).unwrap();
    assert!(sink.seqs.lock().unwrap().is_empty());
    let mut out = VecDeque::new();
    assert_eq!(rx.take(10, &mut out), 2);
    assert_eq!(rx.take_direct(), None);
    bell.take_news();
    // Nothing untaken: the sink takes the next ticks, nobody is woken.
    bell.arm(&waker);
    for _ in 0..3 {
        hub.publish("A", 4.0, 0).unwrap();
    }
    assert_eq!(*sink.seqs.lock().unwrap(), [4, 5, 6]);
    assert_eq!(count.0.load(Ordering::SeqCst), 1, "not woken");
    assert_eq!(bell.take_news(), 0, "no news");
    // Closed again: the next tick is the receiver's, after those the sink took.
    sink.open.store(false, Ordering::SeqCst);
    hub.publish("A", 5.0, 0).unwrap();
    assert_eq!(rx.try_next().map(|t| t.seq), Some(7));
    assert_eq!(rx.take_direct(), Some(6), "the last seq sent");
    assert_eq!(rx.take_direct(), None);
    // Ticks the sink took are not untaken: the ring drops them without a lag.
    sink.open.store(true, Ordering::SeqCst);
    for _ in 0..8 {
        hub.publish("A", 6.0, 0).unwrap();
    }
    assert_eq!(hub.stats().overflowed.load(Ordering::Relaxed), 0);
    rx.sync();
    assert_eq!(rx.take_direct(), Some(15));
    assert!(rx.try_next().is_none());
}

#[test]
fn a_sink_set_after_the_receiver_joined_is_used_and_a_leaving_receiver_lets_it_go() {
    let hub = hub_with_a(4);
    // As a Subscribe call's session: subscribed before its stream's sink is known.
    let bell = Bell::new();
    let late = hub.subscribe_with("A", None, Delivery::Channel(&bell));
    let late = late.unwrap().receiver.unwrap();
    let sink = Arc::new(Sink::default());
    sink.open.store(true, Ordering::SeqCst);
    bell.set_sink(sink.clone());
    hub.publish("A", 2.0, 0).unwrap();
    assert_eq!(*sink.seqs.lock().unwrap(), [2]);
    drop(late);
    // Joined after the sink: the ring keeps it beside the reader, until the reader leaves
    // (another receiver keeps the ring itself).
    let _keep = hub.subscribe("A").unwrap().receiver.unwrap();
    let bell = Bell::new();
    let (sink, rx) = direct_reader(&hub, &bell);
    assert_eq!(Arc::strong_count(&sink), 3, "this test, the bell, the ring");
    drop(rx);
    assert_eq!(Arc::strong_count(&sink), 2, "the ring let it go");
}

#[test]
fn every_direct_run_th_tick_goes_the_ordinary_way() {
    let hub = hub_with_a(4096);
    let bell = Bell::new();
    let (sink, mut rx) = direct_reader(&hub, &bell);
    sink.open.store(true, Ordering::SeqCst);
    for _ in 0..DIRECT_RUN + 1 {
        hub.publish("A", 2.0, 0).unwrap();
    }
    assert_eq!(sink.seqs.lock().unwrap().len(), DIRECT_RUN as usize);
    let last = 1 + u64::from(DIRECT_RUN);
    assert_eq!(rx.try_next().map(|t| t.seq), Some(last + 1));
    assert_eq!(rx.take_direct(), Some(last));
    // The take started a new run.
    hub.publish("A", 3.0, 0).unwrap();
    assert_eq!(sink.seqs.lock().unwrap().last(), Some(&(last + 2)));
}
