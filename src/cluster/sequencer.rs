//! The sequencer: publishes ticks to the bus with their symbol's next seq. Each symbol
//! has a lane; a lane has one publish in flight at a time, which carries
//! `Nats-Expected-Last-Subject-Sequence` = the stream sequence of the symbol's last
//! stored tick. JetStream stores it only if no other writer stored a tick of that
//! symbol in between, so the seq stamped here (last seq + 1) is contiguous across every
//! node; when another node won, the lane re-reads the symbol's last tick and stamps
//! again. A publisher hears back (`Submit::reply`) only once JetStream has stored the
//! tick. Lanes of different symbols run concurrently.
//!
//! Ticks that queue up behind a lane's publish go out together as one JetStream atomic
//! batch (nats-server 2.12+): all stored, with consecutive seqs, or none; the expected
//! last subject sequence is checked on its first message. One round trip then carries
//! up to `MAX_BATCH` ticks, which is what lets a single busy symbol go faster than one
//! tick per round trip.

use std::{
    collections::{HashMap, VecDeque},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

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

/// Most ticks in one atomic batch (the server takes up to 1,000).
const MAX_BATCH: usize = 500;

/// Atomic batches in flight at once over all lanes: the server keeps at most 50 open
/// per stream; past this, lanes send one tick at a time.
const MAX_BATCHES_IN_FLIGHT: usize = 32;

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

/// A finished publish of one tick or one batch.
struct Flight {
    symbol: Symbol,
    submits: Vec<Submit>,
    outcome: Outcome,
}

enum Outcome {
    /// Stored; `stream_seq` and `seq` are the last tick's.
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
    let mut batches = 0usize;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(flight) = flights.next(), if !flights.is_empty() => {
                let flight: Flight = flight;
                if flight.submits.len() > 1 {
                    batches -= 1;
                }
                let symbol = flight.symbol.clone();
                if let Some(lane) = lanes.get_mut(&symbol) {
                    land(&cluster, lane, flight);
                }
                launch(&cluster, &mut lanes, &symbol, &mut flights, &mut batches);
            }
            submit = queue.recv() => {
                let Some(submit) = submit else { break };
                let symbol = submit.symbol.clone();
                lanes.entry(symbol.clone()).or_default().queue.push_back(submit);
                launch(&cluster, &mut lanes, &symbol, &mut flights, &mut batches);
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

/// Records a publish's outcome in its lane and answers its publishers.
fn land(cluster: &Cluster, lane: &mut Lane, flight: Flight) {
    lane.busy = false;
    match flight.outcome {
        Outcome::Stored { stream_seq, seq } => {
            lane.last = Some((stream_seq, seq));
            lane.conflicts = 0;
            let first = seq + 1 - flight.submits.len() as u64;
            for (i, submit) in flight.submits.into_iter().enumerate() {
                submit.answer(Ok(first + i as u64));
            }
        }
        Outcome::Conflict => {
            cluster.stats().conflicts.fetch_add(1, Ordering::Relaxed);
            lane.last = None;
            lane.conflicts += 1;
            if lane.conflicts > MAX_CONFLICTS {
                lane.conflicts = 0;
                for submit in flight.submits {
                    submit.answer(Err(IngestError::Rejected(format!(
                        "other writers of {} won {MAX_CONFLICTS} times in a row",
                        flight.symbol
                    ))));
                }
            } else {
                for submit in flight.submits.into_iter().rev() {
                    lane.queue.push_front(submit);
                }
            }
        }
        Outcome::Failed(e) => {
            // Whether JetStream stored it is unknown: read the last tick again.
            lane.last = None;
            for submit in flight.submits {
                submit.answer(Err(e.clone()));
            }
        }
    }
}

/// Sends the lane's queued ticks (one, or a batch) if nothing of the symbol is in
/// flight.
fn launch(
    cluster: &Cluster,
    lanes: &mut HashMap<Symbol, Lane>,
    symbol: &Symbol,
    flights: &mut FuturesUnordered<Fly>,
    batches: &mut usize,
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
    if lane.queue.is_empty() {
        if lane.last.is_none() {
            lanes.remove(symbol);
        }
        return;
    }
    let take = if *batches < MAX_BATCHES_IN_FLIGHT {
        lane.queue.len().min(MAX_BATCH)
    } else {
        1
    };
    if take > 1 {
        *batches += 1;
    }
    let submits: Vec<Submit> = lane.queue.drain(..take).collect();
    lane.busy = true;
    flights.push(fly(cluster.clone(), symbol.clone(), lane.last, submits));
}

/// A lane's type of in-flight future (one boxed type for `FuturesUnordered`).
type Fly = std::pin::Pin<Box<dyn std::future::Future<Output = Flight> + Send>>;

fn fly(cluster: Cluster, symbol: Symbol, last: Option<(u64, u64)>, submits: Vec<Submit>) -> Fly {
    Box::pin(async move {
        let outcome = publish(&cluster, &symbol, last, &submits).await;
        Flight {
            symbol,
            submits,
            outcome,
        }
    })
}

async fn publish(
    cluster: &Cluster,
    symbol: &str,
    last: Option<(u64, u64)>,
    submits: &[Submit],
) -> Outcome {
    let inner = &cluster.inner;
    let subject = codec::subject(&inner.name, symbol);
    let (stream_seq, seq) = match last {
        Some(last) => last,
        // Boxed, as are a batch's publish and the send below: each publish's future is
        // boxed (`fly`), and one over glibc's per-thread cache limit (1,032 bytes) cost
        // a `malloc_consolidate` per publish; this way it stays a few hundred bytes.
        // Bounded by the publish timeout too (the stream handle's own is 5 s), so a
        // publisher hears about every tick within it.
        None => match Box::pin(tokio::time::timeout(
            inner.args.cluster_publish_timeout,
            last_stored(&inner.stream, &subject),
        ))
        .await
        {
            Ok(Ok(last)) => last,
            Ok(Err(e)) => return Outcome::Failed(e),
            Err(_) => {
                return Outcome::Failed(IngestError::Rejected(format!(
                    "JetStream did not answer the read of {symbol}'s last tick within {}",
                    humantime::format_duration(inner.args.cluster_publish_timeout)
                )))
            }
        },
    };
    let tick = |i: usize| {
        codec::encode(&BusTick {
            symbol: symbol.to_string(),
            seq: seq + 1 + i as u64,
            ltp: submits[i].ltp,
            event_time: submits[i].event_time,
        })
    };
    if submits.len() > 1 {
        return Box::pin(publish_batch(
            cluster,
            subject,
            stream_seq,
            seq,
            submits.len(),
            tick,
        ))
        .await;
    }
    let message = PublishMessage::build()
        .payload(tick(0))
        .expected_last_subject_sequence(stream_seq);
    // Boxed too: its future alone is most of a kilobyte.
    let sent = match Box::pin(inner.publisher.send_publish(subject, message)).await {
        Ok(ack) => ack,
        Err(e) => return Outcome::Failed(unavailable(cluster, e.to_string())),
    };
    // `publisher`'s timeout is `--cluster-publish-timeout`: the ack's wait ends there.
    match sent.await {
        Ok(ack) => Outcome::Stored {
            stream_seq: ack.sequence,
            seq: seq + 1,
        },
        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Outcome::Conflict,
        Err(e) if e.kind() == PublishErrorKind::TimedOut => {
            Outcome::Failed(not_confirmed(inner.args.cluster_publish_timeout))
        }
        Err(e) => Outcome::Failed(unavailable(cluster, e.to_string())),
    }
}

/// `n` ticks as one atomic batch: every message but the last is sent without waiting,
/// the last commits and brings JetStream's answer for all of them.
async fn publish_batch(
    cluster: &Cluster,
    subject: String,
    stream_seq: u64,
    seq: u64,
    n: usize,
    tick: impl Fn(usize) -> bytes::Bytes,
) -> Outcome {
    static BATCHES: AtomicU64 = AtomicU64::new(0);
    let inner = &cluster.inner;
    let client = inner.context.client();
    let id = format!(
        "tickerd-{}-{}-{}",
        std::process::id(),
        crate::clock::now_unix_nanos(),
        BATCHES.fetch_add(1, Ordering::Relaxed)
    );
    for i in 0..n {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Batch-Id", id.as_str());
        headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
        if i == 0 {
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                stream_seq.to_string().as_str(),
            );
        }
        if i + 1 < n {
            if let Err(e) = client
                .publish_with_headers(subject.clone(), headers, tick(i))
                .await
            {
                return Outcome::Failed(unavailable(cluster, e.to_string()));
            }
            continue;
        }
        headers.insert("Nats-Batch-Commit", "1");
        let timeout = inner.args.cluster_publish_timeout;
        let request = client.request_with_headers(subject.clone(), headers, tick(i));
        let reply = match tokio::time::timeout(timeout, request).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => return Outcome::Failed(unavailable(cluster, e.to_string())),
            Err(_) => return Outcome::Failed(not_confirmed(timeout)),
        };
        return match serde_json::from_slice::<BatchReply>(&reply.payload) {
            Ok(BatchReply {
                error: Some(error), ..
            }) if error.err_code == WRONG_LAST_SEQUENCE => Outcome::Conflict,
            Ok(BatchReply {
                error: Some(error), ..
            }) => Outcome::Failed(IngestError::Rejected(format!(
                "JetStream refused the batch: {} (code {})",
                error.description, error.err_code
            ))),
            Ok(BatchReply {
                seq: Some(last),
                count: Some(count),
                ..
            }) if count == n as u64 => {
                cluster.stats().batches.fetch_add(1, Ordering::Relaxed);
                Outcome::Stored {
                    stream_seq: last,
                    seq: seq + n as u64,
                }
            }
            _ => Outcome::Failed(IngestError::Rejected(format!(
                "JetStream's answer to a batch was not understood: {}",
                String::from_utf8_lossy(&reply.payload)
            ))),
        };
    }
    Outcome::Failed(IngestError::Rejected("empty batch".into()))
}

/// JetStream's error code for a failed expected-last-sequence check.
const WRONG_LAST_SEQUENCE: u64 = 10071;

/// A batch commit's reply: an ack (stream sequence of the last message, how many were
/// stored) or an error.
#[derive(serde::Deserialize)]
struct BatchReply {
    seq: Option<u64>,
    count: Option<u64>,
    error: Option<BatchError>,
}

#[derive(serde::Deserialize)]
struct BatchError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
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
