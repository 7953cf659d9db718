//! One subscribing stream of the load generator: opens a TickerStream, subscribes, and
//! records each tick into the statistics of the measurement step its event time falls in.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
};

use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::{step_of, ScheduleCell};
use crate::{
    client::{Client, Kind},
    clock,
    pb::TickerRequest,
};

/// What one stream saw during one step.
#[derive(Debug, Clone)]
pub struct StepStats {
    pub delivered: u64,
    pub lag_notices: u64,
    pub dropped: u64,
    /// Seq jumps not announced by a KIND_LAGGED just before (must stay 0).
    pub unannounced_gaps: u64,
    /// End-to-end latency in microseconds: receive time minus `event_time_unix_nanos`,
    /// to 2 significant digits (1%): at 3 digits each histogram took ~170 KB, and there
    /// is one per stream and step (1.7 GB for a 10-step ramp of 1,000 streams).
    pub latency_us: Histogram<u64>,
}

impl StepStats {
    pub fn new() -> StepStats {
        StepStats {
            delivered: 0,
            lag_notices: 0,
            dropped: 0,
            unannounced_gaps: 0,
            latency_us: Histogram::new_with_bounds(1, 600_000_000, 2).expect("static bounds"),
        }
    }

    pub fn merge(&mut self, other: &StepStats) {
        self.delivered += other.delivered;
        self.lag_notices += other.lag_notices;
        self.dropped += other.dropped;
        self.unannounced_gaps += other.unannounced_gaps;
        let _ = self.latency_us.add(&other.latency_us);
    }
}

impl Default for StepStats {
    fn default() -> Self {
        StepStats::new()
    }
}

/// A stream's statistics, one entry per step, plus totals outside any step.
pub type SharedStats = Arc<Mutex<Vec<StepStats>>>;

/// What a stream knows about one symbol.
#[derive(Default)]
struct SymbolTrack {
    last_seq: u64,
    announced: u64,
    received: u64,
    dropped: u64,
}

/// Result of a stream's catch-up at the end (slow streams): per symbol, ticks received
/// and ticks announced as dropped since its subscription's snapshot.
#[derive(Debug, Default, Clone)]
pub struct CatchUp {
    pub snapshot_seq: HashMap<String, u64>,
    pub received: HashMap<String, u64>,
    pub dropped: HashMap<String, u64>,
    pub last_seq: HashMap<String, u64>,
}

pub struct Reader {
    pub symbols: Vec<String>,
    pub stats: SharedStats,
    /// A slow stream reads nothing until `resume` is cancelled.
    pub resume: Option<CancellationToken>,
    /// Reading ends on `stop`, or once every symbol reached the seqs of the `start`
    /// argument `until` (set after publishing ends, for the catch-up of slow streams).
    pub stop: CancellationToken,
    pub schedule: ScheduleCell,
}

impl Reader {
    /// Opens the stream and subscribes; returns once every ack arrived, with the
    /// task that reads the rest.
    pub async fn start(
        self,
        client: &mut Client,
        until: Arc<OnceLock<HashMap<String, u64>>>,
    ) -> Result<tokio::task::JoinHandle<CatchUp>, tonic::Status> {
        let (tx, rx) = mpsc::channel(self.symbols.len().max(1));
        for s in &self.symbols {
            let _ = tx.try_send(TickerRequest::subscribe(s.clone()));
        }
        let mut stream = client
            .ticker_stream(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let mut tracks: HashMap<String, SymbolTrack> = HashMap::new();
        let mut catch_up = CatchUp::default();
        // Acks (and snapshots) first, so the caller knows the subscriptions are live.
        while tracks.len() < self.symbols.len() {
            let msg = stream
                .message()
                .await?
                .ok_or_else(|| tonic::Status::unavailable("stream ended during subscribe"))?;
            match msg.kind() {
                Kind::Subscribed => {
                    tracks.entry(msg.symbol).or_default();
                }
                Kind::Snapshot => {
                    tracks.entry(msg.symbol.clone()).or_default().last_seq = msg.seq;
                    catch_up.snapshot_seq.insert(msg.symbol, msg.seq);
                }
                Kind::Rejected => {
                    return Err(tonic::Status::failed_precondition(format!(
                        "subscription to {} rejected: {}",
                        msg.symbol, msg.detail
                    )))
                }
                _ => {}
            }
        }
        let task = tokio::spawn(async move {
            let _keep_open = tx;
            if let Some(resume) = &self.resume {
                tokio::select! {
                    _ = resume.cancelled() => {}
                    _ = self.stop.cancelled() => return catch_up,
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
                let Some(track) = tracks.get_mut(&msg.symbol) else {
                    continue;
                };
                match msg.kind() {
                    Kind::Tick => {
                        let gap = msg.seq.saturating_sub(track.last_seq + 1);
                        let step = step_of(&self.schedule, msg.event_time_unix_nanos);
                        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(s) = stats.get_mut(step) {
                            if track.last_seq > 0 && gap != track.announced {
                                s.unannounced_gaps += 1;
                            }
                            s.delivered += 1;
                            let latency_us = (now - msg.event_time_unix_nanos) / 1000;
                            let _ = s.latency_us.record(latency_us.max(1) as u64);
                        }
                        drop(stats);
                        track.last_seq = msg.seq;
                        track.announced = 0;
                        track.received += 1;
                    }
                    Kind::Snapshot => {
                        track.last_seq = msg.seq;
                        catch_up.snapshot_seq.insert(msg.symbol.clone(), msg.seq);
                    }
                    Kind::Lagged => {
                        track.announced = msg.dropped;
                        track.dropped += msg.dropped;
                        let step = step_of(&self.schedule, now);
                        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
                        // Slow streams catch up after the schedule: count in the last step.
                        let last = stats.len().saturating_sub(1);
                        if let Some(s) = stats.get_mut(step.min(last)) {
                            s.lag_notices += 1;
                            s.dropped += msg.dropped;
                        }
                    }
                    _ => {}
                }
                if let Some(target) = until.get() {
                    if tracks
                        .iter()
                        .all(|(s, t)| target.get(s).is_none_or(|&seq| t.last_seq >= seq))
                    {
                        break;
                    }
                }
            }
            for (symbol, t) in tracks {
                catch_up.received.insert(symbol.clone(), t.received);
                catch_up.dropped.insert(symbol.clone(), t.dropped);
                catch_up.last_seq.insert(symbol, t.last_seq);
            }
            catch_up
        });
        Ok(task)
    }
}
