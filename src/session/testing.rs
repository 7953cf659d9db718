//! Helpers for the session's unit tests: a session on an in-process hub, drained
//! with a no-op waker.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures_core::Stream as _;
use futures_util::task::noop_waker_ref;
use tokio::sync::Semaphore;

use super::{Caller, Session, SessionLimits};
use crate::{
    auth::{Authenticator, Principal},
    hub::Hub,
    ops::metrics::{Metrics, StreamTicket},
    pb::{ticker_response::Kind, TickerResponse},
    shutdown::Shutdown,
};

pub(super) fn ticket(hub: &Hub) -> StreamTicket {
    let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
    let metrics = Metrics::new(hub.clone(), false, 0.0);
    metrics.ticket("TickerStream", "test".into(), "anonymous".into(), permit)
}

pub(super) fn anonymous() -> Caller {
    Caller {
        principal: Principal::anonymous(),
        auth: Authenticator::none(),
    }
}

pub(super) fn session(hub: &Hub) -> Session {
    session_until(hub, &Shutdown::new(), 10)
}

pub(super) fn session_until(hub: &Hub, shutdown: &Shutdown, max_subscriptions: usize) -> Session {
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
pub(super) fn subscribed(hub: &Hub, symbols: &[&str]) -> Session {
    let mut s = session(hub);
    for sym in symbols {
        hub.publish(sym, 1.0, 0).unwrap();
        s.subscribe(sym);
    }
    drain(&mut s);
    s
}

/// Everything the session yields before it would wait.
pub(super) fn drain(session: &mut Session) -> Vec<TickerResponse> {
    let mut cx = Context::from_waker(noop_waker_ref());
    let mut out = Vec::new();
    while let Poll::Ready(Some(item)) = Pin::new(&mut *session).poll_next(&mut cx) {
        out.push(item.unwrap().to_response());
    }
    out
}

pub(super) fn kinds(msgs: &[TickerResponse]) -> Vec<(Kind, u64)> {
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

/// Publishes one tick of `symbol` and drains `session`: what it got, as `kinds`.
pub(super) fn tick_and_drain(hub: &Hub, session: &mut Session, symbol: &str) -> Vec<(Kind, u64)> {
    hub.publish(symbol, 2.0, 0).unwrap();
    kinds(&drain(session))
}
