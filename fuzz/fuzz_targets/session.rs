//! A client's TickerStream requests, decoded from arbitrary bytes (length-delimited
//! `TickerRequest`s), applied by a real session on an in-process hub with ticks
//! published in between. Invariants: no panic; every reply is a documented kind; a
//! symbol's ticks reach the stream in increasing seq; a gap is announced
//! (KIND_LAGGED) with exactly its size; nothing comes after KIND_UNSUBSCRIBED.
#![no_main]

use std::{
    collections::HashMap,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::{task::noop_waker_ref, Stream};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tickerd::{
    auth::{Authenticator, Principal},
    hub::{Hub, HubConfig},
    ops::metrics::Metrics,
    pb::{ticker_response::Kind, TickerRequest, TickerResponse},
    session::{Caller, Requests, Session, SessionLimits},
    shutdown::Shutdown,
};
use tokio::sync::Semaphore;

const SYMBOLS: [&str; 4] = ["A", "B", "C.D", "E"];

fn drain(session: &mut Session, out: &mut Vec<TickerResponse>) -> bool {
    let mut cx = Context::from_waker(noop_waker_ref());
    loop {
        match Pin::new(&mut *session).poll_next(&mut cx) {
            Poll::Ready(Some(Ok(msg))) => out.push(msg.to_response()),
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => return false,
            Poll::Pending => return true,
        }
    }
}

/// (kind, seq, dropped, detail) of every message of `symbol`, for failure messages.
fn history(out: &[TickerResponse], symbol: &str) -> Vec<(Kind, u64, u64, String)> {
    out.iter()
        .filter(|m| m.symbol == symbol)
        .map(|m| (m.kind(), m.seq, m.dropped, m.detail.clone()))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let mut requests = Vec::new();
    let mut rest = data;
    while !rest.is_empty() && requests.len() < 64 {
        match TickerRequest::decode_length_delimited(&mut rest) {
            Ok(request) => requests.push(request),
            Err(_) => break,
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let hub = Hub::new(HubConfig {
            channel_capacity: 8,
            history_size: 16,
            ..HubConfig::default()
        });
        for s in SYMBOLS {
            hub.publish(s, 1.0, 0).expect("publish");
        }
        let metrics = Metrics::new(hub.clone(), false, 0.0);
        let permit = Arc::new(Semaphore::new(1))
            .try_acquire_owned()
            .expect("permit");
        let ticket = metrics.ticket("TickerStream", "fuzz".into(), "anonymous".into(), permit);
        let caller = Caller {
            principal: Principal::anonymous(),
            auth: Authenticator::none(),
        };
        let stream: Requests = Box::pin(futures_util::stream::iter(
            requests.into_iter().map(Ok::<_, tonic::Status>),
        ));
        let limits = SessionLimits {
            max_subscriptions: 3,
        };
        let mut session = Session::new(
            hub.clone(),
            limits,
            Some(stream),
            Shutdown::new(),
            ticket,
            caller,
        );
        let mut out = Vec::new();
        let mut open = drain(&mut session, &mut out);
        for (round, byte) in data.iter().take(32).enumerate() {
            if !open {
                break;
            }
            let symbol = SYMBOLS[usize::from(*byte) % SYMBOLS.len()];
            for _ in 0..(byte % 20) {
                hub.publish(symbol, 1.0 + round as f64, 0).expect("publish");
            }
            open = drain(&mut session, &mut out);
        }
        let mut last: HashMap<String, u64> = HashMap::new();
        let mut lagged: HashMap<String, u64> = HashMap::new();
        for msg in &out {
            match msg.kind() {
                Kind::Tick if msg.count > 0 => {
                    // A CONFLATE range: consecutive with what this stream had.
                    let seen = last.get(&msg.symbol).copied().unwrap_or(0);
                    assert!(msg.first_seq > seen, "conflated range overlaps: {msg:?}");
                    last.insert(msg.symbol.clone(), msg.seq);
                }
                Kind::Tick => {
                    if let Some(&seen) = last.get(&msg.symbol) {
                        let dropped = lagged.remove(&msg.symbol).unwrap_or(0);
                        assert_eq!(
                            msg.seq,
                            seen + 1 + dropped,
                            "unannounced gap or repeat in {:?}",
                            history(&out, &msg.symbol)
                        );
                    }
                    last.insert(msg.symbol.clone(), msg.seq);
                }
                // A repeated subscribe is acked again without a seq: nothing changes.
                Kind::Subscribed if msg.detail == "already subscribed" => {}
                Kind::Subscribed => {
                    last.insert(msg.symbol.clone(), msg.seq);
                    lagged.remove(&msg.symbol);
                }
                Kind::Snapshot => {
                    last.insert(msg.symbol.clone(), msg.seq);
                }
                Kind::Lagged => {
                    assert!(msg.dropped > 0);
                    lagged.insert(msg.symbol.clone(), msg.dropped);
                }
                Kind::Unsubscribed => {
                    last.remove(&msg.symbol);
                    lagged.remove(&msg.symbol);
                }
                Kind::Rejected | Kind::Backlog | Kind::TokenRefreshed => {}
                Kind::Stale | Kind::Live => panic!("a single node has no bus: {msg:?}"),
            }
        }
    });
});
