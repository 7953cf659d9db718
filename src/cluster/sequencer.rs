//! The sequencer: publishes ticks to the bus with their symbol's next seq. Each symbol
//! has a lane; a lane has one publish in flight at a time, which carries
//! `Nats-Expected-Last-Subject-Sequence` = the stream sequence of the symbol's last
//! stored tick. JetStream stores it only if no other writer stored a tick of that
//! symbol in between, so the seq stamped here (last seq + 1) is contiguous across every
//! node; when another node won, the lane re-reads the symbol's last tick and stamps
//! again. A publisher hears back (`Submit::reply`) only once JetStream has stored the
//! tick. Lanes of different symbols run concurrently.

use std::{collections::HashMap, collections::VecDeque, sync::atomic::Ordering, time::Duration};

use async_nats::jetstream::{context::PublishErrorKind, message::PublishMessage, stream};
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{
    codec::{self, BusTick},
    Cluster, IngestError,
};
use crate::{
    hub::{Hub, Source},
    symbol::Symbol,
};

/// Ticks queued for the sequencer before submitters wait (bounded memory).
pub(super) const QUEUE: usize = 8192;

/// Times a lane re-stamps a tick after losing the race to another writer before the
/// tick is refused: only a storm of writers on one symbol gets there.
const MAX_CONFLICTS: u32 = 64;

/// One tick to publish, and who to tell its seq.
pub(super) struct Submit {
    pub symbol: Symbol,
    pub ltp: f64,
    pub event_time: i64,
    pub reply: oneshot::Sender<Result<u64, IngestError>>,
    /// The hub whose accepted/rejected counters count it, under `source`.
    pub hub: Hub,
    pub source: Source,
}

impl Submit {
    /// Counts the outcome and tells the publisher (who may have stopped listening).
    fn answer(self, result: Result<u64, IngestError>) {
        let counters = match &result {
            Ok(_) => &self.hub.stats().accepted,
            Err(e) => {
                if let IngestError::Rejected(reason) = e {
                    tracing::warn!(symbol = %self.symbol, %reason, "tick not stored");
                }
                &self.hub.stats().rejected
            }
        };
        counters[self.source as usize].fetch_add(1, Ordering::Relaxed);
        let _ = self.reply.send(result);
    }
}

#[derive(Default)]
struct Lane {
    /// (stream sequence, seq) of the symbol's last stored tick, when known.
    last: Option<(u64, u64)>,
    queue: VecDeque<Submit>,
    busy: bool,
    conflicts: u32,
}

/// A finished publish.
struct Flight {
    symbol: Symbol,
    submit: Submit,
    outcome: Outcome,
}

enum Outcome {
    Stored {
        stream_seq: u64,
        seq: u64,
    },
    /// Another writer stored a tick of the symbol first.
    Conflict,
    Failed(IngestError),
}

pub(super) async fn run(
    cluster: Cluster,
    mut queue: mpsc::Receiver<Submit>,
    shutdown: CancellationToken,
) {
    let mut lanes: HashMap<Symbol, Lane> = HashMap::new();
    let mut flights: FuturesUnordered<Fly> = FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(flight) = flights.next(), if !flights.is_empty() => {
                let flight: Flight = flight;
                let symbol = flight.symbol.clone();
                if let Some(lane) = lanes.get_mut(&symbol) {
                    land(&cluster, lane, flight);
                }
                launch(&cluster, &mut lanes, &symbol, &mut flights);
            }
            submit = queue.recv() => {
                let Some(submit) = submit else { break };
                let symbol = submit.symbol.clone();
                lanes.entry(symbol.clone()).or_default().queue.push_back(submit);
                launch(&cluster, &mut lanes, &symbol, &mut flights);
            }
        }
    }
    // Ticks never sent are refused as unavailable: nothing is dropped without a word.
    queue.close();
    while let Ok(submit) = queue.try_recv() {
        submit.answer(Err(shutting_down()));
    }
    for lane in lanes.into_values() {
        for submit in lane.queue {
            submit.answer(Err(shutting_down()));
        }
    }
}

fn shutting_down() -> IngestError {
    IngestError::Unavailable("server shutting down".into())
}

/// Records a publish's outcome in its lane and answers its publisher.
fn land(cluster: &Cluster, lane: &mut Lane, flight: Flight) {
    lane.busy = false;
    match flight.outcome {
        Outcome::Stored { stream_seq, seq } => {
            lane.last = Some((stream_seq, seq));
            lane.conflicts = 0;
            flight.submit.answer(Ok(seq));
        }
        Outcome::Conflict => {
            cluster.stats().conflicts.fetch_add(1, Ordering::Relaxed);
            lane.last = None;
            lane.conflicts += 1;
            if lane.conflicts > MAX_CONFLICTS {
                lane.conflicts = 0;
                flight.submit.answer(Err(IngestError::Rejected(format!(
                    "other writers of {} won {MAX_CONFLICTS} times in a row",
                    flight.symbol
                ))));
            } else {
                lane.queue.push_front(flight.submit);
            }
        }
        Outcome::Failed(e) => {
            // Whether JetStream stored it is unknown: read the last tick again.
            lane.last = None;
            flight.submit.answer(Err(e));
        }
    }
}

/// Sends the lane's next tick if nothing of the symbol is in flight.
fn launch(
    cluster: &Cluster,
    lanes: &mut HashMap<Symbol, Lane>,
    symbol: &Symbol,
    flights: &mut FuturesUnordered<Fly>,
) {
    let Some(lane) = lanes.get_mut(symbol) else {
        return;
    };
    if lane.busy {
        return;
    }
    if !cluster.is_connected() {
        // Fail fast: the publisher learns now, not after a timeout.
        for submit in lane.queue.drain(..) {
            submit.answer(Err(IngestError::Unavailable(
                "market-data bus unreachable".into(),
            )));
        }
    }
    let Some(submit) = lane.queue.pop_front() else {
        if lane.last.is_none() {
            lanes.remove(symbol);
        }
        return;
    };
    lane.busy = true;
    flights.push(fly(cluster.clone(), symbol.clone(), lane.last, submit));
}

/// A lane's type of in-flight future (one boxed type for `FuturesUnordered`).
type Fly = std::pin::Pin<Box<dyn std::future::Future<Output = Flight> + Send>>;

fn fly(cluster: Cluster, symbol: Symbol, last: Option<(u64, u64)>, submit: Submit) -> Fly {
    Box::pin(async move {
        let outcome = publish(&cluster, &symbol, last, &submit).await;
        Flight {
            symbol,
            submit,
            outcome,
        }
    })
}

async fn publish(
    cluster: &Cluster,
    symbol: &str,
    last: Option<(u64, u64)>,
    submit: &Submit,
) -> Outcome {
    let inner = &cluster.inner;
    let subject = codec::subject(&inner.name, symbol);
    let (stream_seq, seq) = match last {
        Some(last) => last,
        None => match last_stored(&inner.stream, &subject).await {
            Ok(last) => last,
            Err(e) => return Outcome::Failed(e),
        },
    };
    let tick = BusTick {
        symbol: symbol.to_string(),
        seq: seq + 1,
        ltp: submit.ltp,
        event_time: submit.event_time,
    };
    let message = PublishMessage::build()
        .payload(codec::encode(&tick))
        .expected_last_subject_sequence(stream_seq);
    let timeout = inner.args.cluster_publish_timeout;
    let sent = match inner.context.send_publish(subject, message).await {
        Ok(ack) => ack,
        Err(e) => return Outcome::Failed(unavailable(cluster, e.to_string())),
    };
    match tokio::time::timeout(timeout, sent).await {
        Ok(Ok(ack)) => Outcome::Stored {
            stream_seq: ack.sequence,
            seq: tick.seq,
        },
        Ok(Err(e)) if e.kind() == PublishErrorKind::WrongLastSequence => Outcome::Conflict,
        Ok(Err(e)) if e.kind() == PublishErrorKind::TimedOut => {
            Outcome::Failed(not_confirmed(timeout))
        }
        Ok(Err(e)) => Outcome::Failed(unavailable(cluster, e.to_string())),
        Err(_) => Outcome::Failed(not_confirmed(timeout)),
    }
}

fn not_confirmed(timeout: Duration) -> IngestError {
    IngestError::Rejected(format!(
        "JetStream did not confirm storing the tick within {}",
        humantime::format_duration(timeout)
    ))
}

/// Unavailable while the bus is unreachable; otherwise JetStream's own refusal.
fn unavailable(cluster: &Cluster, reason: String) -> IngestError {
    if cluster.is_connected() {
        IngestError::Rejected(format!("JetStream refused the tick: {reason}"))
    } else {
        IngestError::Unavailable(format!("market-data bus unreachable: {reason}"))
    }
}

/// (stream sequence, seq) of the subject's last stored tick; (0, 0) for none.
async fn last_stored(stream: &stream::Stream, subject: &str) -> Result<(u64, u64), IngestError> {
    match stream.direct_get_last_for_subject(subject).await {
        Ok(message) => match codec::decode(&message.payload) {
            Some(tick) => Ok((message.sequence, tick.seq)),
            None => Err(IngestError::Rejected(format!(
                "the bus's last message on {subject} is not a tickerd tick"
            ))),
        },
        Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok((0, 0)),
        Err(e) => Err(IngestError::Unavailable(format!(
            "market-data bus unreachable: {e}"
        ))),
    }
}
