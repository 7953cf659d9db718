//! Where published ticks go: straight into the hub when tickerd runs alone, or to the
//! bus through the sequencer in a cluster. Feeds and the Publish RPC write through
//! this, so they work the same either way; the hub's accepted/rejected counters count
//! both.

use std::sync::atomic::Ordering;

use tokio::sync::oneshot;

use super::{sequencer::Submit, Cluster};
use crate::{
    clock,
    hub::{self, Hub, PublishError, Source},
};

/// Why a tick was not accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IngestError {
    /// The tick itself is bad, or the bus refused to store it; the publisher goes on.
    #[error("{0}")]
    Rejected(String),
    /// The bus cannot be reached: nothing can be published now.
    #[error("{0}")]
    Unavailable(String),
}

impl From<PublishError> for IngestError {
    fn from(e: PublishError) -> IngestError {
        IngestError::Rejected(e.to_string())
    }
}

/// A tick handed over: accepted already (alone), or waiting for the bus to store it.
pub enum Ack {
    Done(Result<u64, IngestError>),
    Waiting(Waiting),
}

/// A tick the bus has not confirmed yet. Dropping it is fine: the outcome is counted
/// (and a refusal logged) either way.
pub struct Waiting {
    reply: oneshot::Receiver<Result<u64, IngestError>>,
}

impl Waiting {
    /// The tick's seq once stored, or why not.
    pub async fn stored(self) -> Result<u64, IngestError> {
        self.reply
            .await
            .unwrap_or_else(|_| Err(IngestError::Unavailable("server shutting down".into())))
    }
}

impl Ack {
    /// Waits for the outcome.
    pub async fn outcome(self) -> Result<u64, IngestError> {
        match self {
            Ack::Done(result) => result,
            Ack::Waiting(waiting) => waiting.stored().await,
        }
    }
}

/// The way in for ticks; cheap to clone.
#[derive(Clone)]
pub enum Ingest {
    Hub(Hub),
    Bus(Hub, Cluster),
}

impl Ingest {
    /// Hands over one tick; waits only for room in the sequencer's queue.
    /// `event_time == 0` means "now".
    pub async fn submit(&self, source: Source, symbol: &str, ltp: f64, event_time: i64) -> Ack {
        match self {
            Ingest::Hub(hub) => Ack::Done(
                hub.publish_from(source, symbol, ltp, event_time)
                    .map_err(IngestError::from),
            ),
            Ingest::Bus(hub, cluster) => {
                if let Err(e) = hub::check(symbol, ltp, event_time) {
                    count(hub, source, false);
                    return Ack::Done(Err(e.into()));
                }
                if !cluster.is_connected() {
                    count(hub, source, false);
                    return Ack::Done(Err(IngestError::Unavailable(
                        "market-data bus unreachable".into(),
                    )));
                }
                let event_time = if event_time == 0 {
                    clock::now_unix_nanos()
                } else {
                    event_time
                };
                let (reply, waiting) = oneshot::channel();
                let submit = Submit {
                    symbol: symbol.into(),
                    ltp,
                    event_time,
                    reply,
                    hub: hub.clone(),
                    source,
                };
                if cluster.inner.submit.send(submit).await.is_err() {
                    count(hub, source, false);
                    return Ack::Done(Err(IngestError::Unavailable("server shutting down".into())));
                }
                Ack::Waiting(Waiting { reply: waiting })
            }
        }
    }

    pub fn hub(&self) -> &Hub {
        match self {
            Ingest::Hub(hub) | Ingest::Bus(hub, _) => hub,
        }
    }

    pub fn cluster(&self) -> Option<&Cluster> {
        match self {
            Ingest::Hub(_) => None,
            Ingest::Bus(_, cluster) => Some(cluster),
        }
    }
}

fn count(hub: &Hub, source: Source, accepted: bool) {
    let counters = if accepted {
        &hub.stats().accepted
    } else {
        &hub.stats().rejected
    };
    counters[source as usize].fetch_add(1, Ordering::Relaxed);
}
