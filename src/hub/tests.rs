//! The hub's unit tests: seq, snapshots, the ring's drops, rejections, rings and folds freed.

use prost::Message;

use super::*;
use crate::pb::{ticker_response::Kind, TickerResponse};

fn hub(capacity: usize) -> Hub {
    Hub::new(HubConfig {
        channel_capacity: capacity,
        max_symbols: 3,
        allow_unknown_symbols: false,
        ..HubConfig::default()
    })
}

#[test]
fn seq_starts_at_one_and_snapshot_precedes_live_ticks() {
    let hub = hub(8);
    assert_eq!(hub.publish("A", 1.0, 5), Ok(1));
    assert_eq!(hub.publish("A", 2.0, 0), Ok(2));
    let mut sub = hub.subscribe("A").unwrap();
    assert_eq!(sub.snapshot.as_ref().map(|t| t.seq), Some(2));
    hub.publish("A", 3.0, 0).unwrap();
    let next = sub.receiver.as_mut().unwrap().try_next().unwrap();
    assert_eq!((next.seq, next.ltp), (3, 3.0));
    let decoded = TickerResponse::decode(next.encoded()).unwrap();
    assert_eq!(decoded.seq, 3);
    assert_eq!(decoded.kind, Kind::Tick as i32);
    assert_eq!(
        decoded.timestamp,
        clock::rfc3339_nanos(decoded.event_time_unix_nanos)
    );
}

#[test]
fn publish_never_blocks_and_drops_the_oldest() {
    let hub = hub(4);
    hub.publish("A", 1.0, 0).unwrap();
    let mut sub = hub.subscribe("A").unwrap();
    for i in 0..10 {
        hub.publish("A", 10.0 + f64::from(i), 0).unwrap();
    }
    assert_eq!(hub.stats().overflowed.load(Ordering::Relaxed), 6);
    let receiver = sub.receiver.as_mut().unwrap();
    assert_eq!(receiver.pending(), 10);
    // seqs 2..=7 are gone: the gap says how many
    assert_eq!(receiver.try_next().unwrap().seq, 8);
    // a tick dropped after every receiver took it is no overflow
    hub.publish("A", 1.0, 0).unwrap();
    assert_eq!(hub.stats().overflowed.load(Ordering::Relaxed), 6);
}

#[test]
fn rejects_bad_ticks_and_unknown_or_excess_symbols() {
    let hub = hub(4);
    assert!(matches!(hub.publish("A", f64::NAN, 0), Err(PublishError::Price(p)) if p.is_nan()));
    assert!(matches!(
        hub.publish("A", f64::INFINITY, 0),
        Err(PublishError::Price(_))
    ));
    assert!(matches!(
        hub.publish("A", -1.0, 0),
        Err(PublishError::Price(_))
    ));
    assert!(matches!(
        hub.publish("A", 1.0, -5),
        Err(PublishError::EventTime(-5))
    ));
    assert!(matches!(
        hub.publish("A B", 1.0, 0),
        Err(PublishError::Symbol(_))
    ));
    assert!(matches!(
        hub.subscribe("NOPE"),
        Err(SubscribeError::Unknown)
    ));
    for s in ["A", "B", "C"] {
        hub.publish(s, 1.0, 0).unwrap();
    }
    assert_eq!(hub.publish("D", 1.0, 0), Err(PublishError::SymbolLimit(3)));
    assert_eq!(hub.symbol_count(), 3);
    assert_eq!(
        hub.stats().rejected[Source::Publish as usize].load(Ordering::Relaxed),
        6
    );
}

#[test]
fn a_new_receiver_after_the_last_left_gets_a_fresh_ring_that_works() {
    let hub = hub(4);
    hub.publish("A", 1.0, 0).unwrap();
    let sub = hub.subscribe("A").unwrap();
    hub.publish("A", 2.0, 0).unwrap();
    drop(sub);
    assert_eq!(hub.receiver_count("A"), 0);
    let mut sub = hub.subscribe("A").unwrap();
    assert_eq!(sub.seq, 2);
    hub.publish("A", 3.0, 0).unwrap();
    assert_eq!(sub.receiver.as_mut().unwrap().try_next().unwrap().seq, 3);
    assert!(sub.receiver.as_mut().unwrap().try_next().is_none());
}

#[test]
fn idle_conflations_are_pruned() {
    let hub = hub(4);
    hub.publish("A", 1.0, 0).unwrap();
    let sub = hub.subscribe_with("A", None, Delivery::Conflate).unwrap();
    assert_eq!(hub.prune_idle_conflations(), 0);
    drop(sub);
    assert_eq!(hub.prune_idle_conflations(), 1);
}
