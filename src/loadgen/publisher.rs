//! The load generator's publisher: one Publish call fed at the schedule's rate, in 1 ms
//! rounds, stamping each tick with its send time. It never waits for the server: a tick
//! the call cannot take right away (its buffer is full) is counted as refused, which is
//! how a server that slows its publishers shows up.
//!
//! It runs on a thread of its own, with its own runtime and connection: on the readers'
//! runtime a round's ticks waited behind the reading tasks after being stamped (0.2 ms
//! at the median, over 1 ms at the tail, at 500k deliveries/s), which the report then
//! counted as the server's latency, and rounds that waited went out together, so the
//! server wrote fewer, fuller frames than a steady feed makes it write.

use std::{
    io,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{
    mpsc::{self, error::TrySendError},
    oneshot,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use super::{step_of, ScheduleCell};
use crate::{
    client::Client,
    clock,
    pb::{PublishRequest, PublishResponse},
};

/// Ticks the Publish call may have queued client-side before the publisher counts refusals.
const SEND_BUFFER: usize = 4096;

/// Per step: ticks offered, and ticks sent per symbol index.
#[derive(Debug, Clone, Default)]
pub struct PublishCounts {
    pub offered: Vec<u64>,
    pub sent_per_symbol: Vec<Vec<u64>>,
    /// Every tick sent, warm-up included (what the server must have accepted).
    pub total_sent: u64,
}

/// A publisher running on its own thread.
pub struct Publishing {
    thread: std::thread::JoinHandle<()>,
    reply: oneshot::Receiver<Result<PublishResponse, tonic::Status>>,
}

impl Publishing {
    /// Starts `run` on a new thread with a single-threaded runtime and its own connection
    /// to `endpoint`.
    pub fn spawn(
        endpoint: Endpoint,
        symbols: Arc<Vec<String>>,
        cell: ScheduleCell,
        counts: Arc<Mutex<PublishCounts>>,
        stop: CancellationToken,
    ) -> io::Result<Publishing> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (tx, reply) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("publisher".into())
            .spawn(move || {
                let result = runtime.block_on(async move {
                    let channel = endpoint.connect().await.map_err(|e| {
                        tonic::Status::unavailable(format!("publisher cannot connect: {e}"))
                    })?;
                    run(Client::new(channel), symbols, cell, counts, stop).await
                });
                let _ = tx.send(result);
            })?;
        Ok(Publishing { thread, reply })
    }

    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// The Publish call's reply, once the publisher ends.
    pub async fn reply(self) -> Result<PublishResponse, tonic::Status> {
        self.reply.await.unwrap_or_else(|_| {
            Err(tonic::Status::internal(
                "publisher thread ended without a reply",
            ))
        })
    }
}

/// Publishes `symbols` round-robin following `schedule` until it ends or `stop` fires.
/// `counts` is updated every round; returns the server's Publish reply.
pub async fn run(
    mut client: Client,
    symbols: Arc<Vec<String>>,
    cell: ScheduleCell,
    counts: Arc<Mutex<PublishCounts>>,
    stop: CancellationToken,
) -> Result<PublishResponse, tonic::Status> {
    let Some(schedule) = cell.get() else {
        return Err(tonic::Status::failed_precondition(
            "publisher started without a schedule",
        ));
    };
    let (tx, rx) = mpsc::channel(SEND_BUFFER);
    let call = tokio::spawn(async move { client.publish(ReceiverStream::new(rx)).await });
    *counts.lock().unwrap_or_else(|e| e.into_inner()) = PublishCounts {
        offered: vec![0; schedule.steps.len()],
        sent_per_symbol: vec![vec![0; symbols.len()]; schedule.steps.len()],
        total_sent: 0,
    };
    let mut round = tokio::time::interval(Duration::from_millis(1));
    round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut next_symbol = 0usize;
    let mut carry = 0.0f64;
    let mut last = clock::now_unix_nanos();
    let mut ended_early = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = round.tick() => {}
        }
        let now = clock::now_unix_nanos();
        if now >= schedule.end() {
            break;
        }
        // Ticks due since the last round at the current rate (fractions carried over).
        let rate = schedule.rate_at(now);
        carry += rate * (now - last) as f64 / 1e9;
        last = now;
        let due = carry.floor() as u64;
        carry -= due as f64;
        let mut counts = counts.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..due {
            let event_time = clock::now_unix_nanos();
            let step = step_of(&cell, event_time);
            let i = next_symbol;
            next_symbol = (next_symbol + 1) % symbols.len();
            if let Some(offered) = counts.offered.get_mut(step) {
                *offered += 1;
            }
            let tick = PublishRequest {
                symbol: symbols[i].clone(),
                ltp: 100.0 + (event_time % 1000) as f64 / 100.0,
                event_time_unix_nanos: event_time,
            };
            match tx.try_send(tick) {
                Ok(()) => {
                    if let Some(sent) = counts.sent_per_symbol.get_mut(step) {
                        sent[i] += 1;
                    }
                    counts.total_sent += 1;
                }
                Err(TrySendError::Full(_)) => {}
                Err(TrySendError::Closed(_)) => {
                    ended_early = true;
                    break;
                }
            }
        }
        if ended_early {
            break;
        }
    }
    drop(tx);
    if ended_early {
        // The call is over: its own status says why.
        return match call.await {
            Ok(Err(status)) => Err(status),
            Ok(Ok(reply)) => Err(tonic::Status::unavailable(format!(
                "Publish call ended early, after {} ticks accepted",
                reply.into_inner().accepted
            ))),
            Err(e) => Err(tonic::Status::internal(format!(
                "publisher task failed: {e}"
            ))),
        };
    }
    let reply = call
        .await
        .map_err(|e| tonic::Status::internal(format!("publisher task failed: {e}")))??;
    Ok(reply.into_inner())
}
