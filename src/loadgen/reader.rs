//! One subscribing stream of the load generator: opens a TickerStream, subscribes, and
//! records each tick into the statistics of the measurement step its event time falls in.

use std::sync::{Arc, Mutex, OnceLock};

use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::{
    step_of,
    websocket::{self, Responses},
    wire::{self, Seen, SymbolTable},
    ScheduleCell,
};
use crate::{client::Kind, clock, pb::TickerRequest};
use tonic::transport::Channel;

/// What one stream saw during one step.
#[derive(Debug, Clone)]
pub struct StepStats {
    pub delivered: u64,
    pub lag_notices: u64,
    pub dropped: u64,
    /// Seq jumps not announced by a KIND_LAGGED just before (must stay 0).
    pub unannounced_gaps: u64,
    /// End-to-end latency in microseconds: receive time minus `event_time_unix_nanos`,
    /// to 3 significant digits (0.1%). ~170 KB each: there is one per step for all the
    /// reading streams (and one for the slow ones), not one per stream.
    pub latency_us: Histogram<u64>,
}

impl StepStats {
    pub fn new() -> StepStats {
        StepStats {
            delivered: 0,
            lag_notices: 0,
            dropped: 0,
            unannounced_gaps: 0,
            latency_us: Histogram::new_with_bounds(1, 600_000_000, 3).expect("static bounds"),
        }
    }
}

impl Default for StepStats {
    fn default() -> Self {
        StepStats::new()
    }
}

/// Statistics shared by a group of streams, one entry per step.
pub type SharedStats = Arc<Mutex<Vec<StepStats>>>;

/// What a stream knows about one symbol, and (for the catch-up of slow streams) what it
/// received of it since its subscription's snapshot.
#[derive(Debug, Default, Clone)]
pub struct SymbolTrack {
    /// Index in the run's `SymbolTable`.
    pub symbol: usize,
    pub snapshot_seq: u64,
    pub last_seq: u64,
    /// Ticks a KIND_LAGGED announced just before the next tick.
    pub(super) announced: u64,
    pub received: u64,
    pub dropped: u64,
}

/// A stream's tracks when it ended, sorted by symbol index.
pub type CatchUp = Vec<SymbolTrack>;

/// How a reader reaches the server.
#[derive(Clone)]
pub enum Conn {
    Grpc(Channel),
    /// The web listener's base URL, and whether to use the binary subprotocol.
    Web(String, bool),
}

pub struct Reader {
    /// Indices in `table` of the symbols to subscribe to.
    pub symbols: Vec<usize>,
    pub table: Arc<SymbolTable>,
    pub stats: SharedStats,
    /// A slow stream reads nothing until `resume` is cancelled.
    pub resume: Option<CancellationToken>,
    /// Reading ends on `stop`, or once every symbol reached the seq (by symbol index)
    /// of the `start` argument `until` (set after publishing ends, for the catch-up of
    /// slow streams).
    pub stop: CancellationToken,
    pub schedule: ScheduleCell,
}

impl Reader {
    /// Opens the stream and subscribes; returns once every ack arrived, with the
    /// task that reads the rest.
    pub async fn start(
        self,
        conn: Conn,
        until: Arc<OnceLock<Vec<u64>>>,
    ) -> Result<tokio::task::JoinHandle<CatchUp>, tonic::Status> {
        let (tx, rx) = mpsc::channel(self.symbols.len().max(1));
        let mut tracks: Vec<SymbolTrack> = Vec::with_capacity(self.symbols.len());
        let mut requests = Vec::with_capacity(self.symbols.len());
        for &i in &self.symbols {
            requests.push(TickerRequest::subscribe(self.table.names()[i].clone()));
            tracks.push(SymbolTrack {
                symbol: i,
                ..SymbolTrack::default()
            });
        }
        tracks.sort_by_key(|t| t.symbol);
        let mut stream = match conn {
            Conn::Grpc(channel) => {
                for r in requests {
                    let _ = tx.try_send(r);
                }
                let stream =
                    wire::ticker_stream(channel, self.table.clone(), ReceiverStream::new(rx))
                        .await?;
                Responses::Grpc(stream)
            }
            Conn::Web(url, binary) => {
                Responses::Web(websocket::open(&url, binary, self.table.clone(), requests).await?)
            }
        };
        // Acks (and snapshots) first, so the caller knows the subscriptions are live.
        let mut acked = 0;
        while acked < tracks.len() {
            let msg = stream
                .message()
                .await?
                .ok_or_else(|| tonic::Status::unavailable("stream ended during subscribe"))?;
            if subscribing(&mut tracks, &msg).map_err(tonic::Status::failed_precondition)? {
                acked += 1;
            }
        }
        let task = tokio::spawn(async move {
            let _keep_open = tx;
            if let Some(resume) = &self.resume {
                tokio::select! {
                    _ = resume.cancelled() => {}
                    _ = self.stop.cancelled() => return tracks,
                }
            }
            // Made once and polled only when the stream has nothing, rather than a fresh
            // `cancelled()` (a waiter added and removed under the token's lock) per message.
            let stopped = self.stop.cancelled();
            tokio::pin!(stopped);
            loop {
                let msg = tokio::select! {
                    biased;
                    msg = stream.message() => msg,
                    _ = &mut stopped => break,
                };
                let Ok(Some(msg)) = msg else { break };
                let now = clock::now_unix_nanos();
                {
                    let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
                    record(&mut tracks, &msg, now, &self.schedule, &mut stats);
                }
                if let Some(target) = until.get() {
                    if tracks
                        .iter()
                        .all(|t| target.get(t.symbol).is_none_or(|&seq| t.last_seq >= seq))
                    {
                        break;
                    }
                }
            }
            tracks
        });
        Ok(task)
    }
}

/// What a message before the subscription acks does to a stream's tracks: true for an
/// ack, an error for a rejection (the run cannot measure what it asked for).
pub(super) fn subscribing(tracks: &mut [SymbolTrack], msg: &Seen) -> Result<bool, String> {
    let track = msg.symbol.and_then(|i| find(tracks, i));
    match (msg.kind(), track) {
        (Kind::Subscribed, Some(_)) => return Ok(true),
        (Kind::Snapshot, Some(track)) => {
            track.last_seq = msg.seq;
            track.snapshot_seq = msg.seq;
        }
        (Kind::Rejected, _) => {
            return Err(format!("a subscription was rejected: {}", msg.detail));
        }
        _ => {}
    }
    Ok(false)
}

/// What a message on a live stream does to its tracks and to the statistics of the step
/// it counts in; `now` is when it arrived.
pub(super) fn record(
    tracks: &mut [SymbolTrack],
    msg: &Seen,
    now: i64,
    schedule: &ScheduleCell,
    stats: &mut [StepStats],
) {
    let Some(track) = msg.symbol.and_then(|i| find(tracks, i)) else {
        return;
    };
    match msg.kind() {
        Kind::Tick => {
            let gap = msg.seq.saturating_sub(track.last_seq + 1);
            let step = step_of(schedule, msg.event_time_unix_nanos);
            if let Some(s) = stats.get_mut(step) {
                if track.last_seq > 0 && gap != track.announced {
                    s.unannounced_gaps += 1;
                }
                s.delivered += 1;
                let latency_us = (now - msg.event_time_unix_nanos) / 1000;
                let _ = s.latency_us.record(latency_us.max(1) as u64);
            }
            track.last_seq = msg.seq;
            track.announced = 0;
            track.received += 1;
        }
        Kind::Snapshot => {
            track.last_seq = msg.seq;
            track.snapshot_seq = msg.seq;
        }
        Kind::Lagged => {
            track.announced = msg.dropped;
            track.dropped += msg.dropped;
            let step = step_of(schedule, now);
            // Slow streams catch up after the schedule: count in the last step.
            let last = stats.len().saturating_sub(1);
            if let Some(s) = stats.get_mut(step.min(last)) {
                s.lag_notices += 1;
                s.dropped += msg.dropped;
            }
        }
        _ => {}
    }
}

fn find(tracks: &mut [SymbolTrack], symbol: usize) -> Option<&mut SymbolTrack> {
    let i = tracks.binary_search_by_key(&symbol, |t| t.symbol).ok()?;
    tracks.get_mut(i)
}
