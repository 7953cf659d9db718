//! The replay feed (`--feed replay:PATH`): publishes a CSV file's ticks, paced by the
//! lines' timestamps divided by `--replay-speed` (lines without one at `--rate`).
//! Replayed ticks are stamped with the time they are published, as a live feed's are.

use std::{path::PathBuf, time::Duration};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::csv::{Line, TickReader};
use crate::{
    cluster::{Ack, Ingest},
    hub::Source,
};

pub struct Replay {
    path: PathBuf,
    file: std::fs::File,
    speed: f64,
    rate: f64,
}

impl Replay {
    /// Opens the file now, so a missing file stops start-up with its name.
    pub fn open(path: PathBuf, speed: f64, rate: f64) -> std::io::Result<Replay> {
        let file = std::fs::File::open(&path)?;
        Ok(Replay {
            path,
            file,
            speed,
            rate,
        })
    }

    pub async fn run(self, ingest: Ingest, shutdown: CancellationToken) {
        let path = self.path.display().to_string();
        let mut reader = TickReader::new(tokio::fs::File::from_std(self.file));
        let start = Instant::now();
        let mut first_ts: Option<i64> = None;
        let mut due = start;
        let (mut published, mut malformed) = (0u64, 0u64);
        tracing::info!(file = %path, speed = self.speed, "replay started");
        loop {
            let line = tokio::select! {
                _ = shutdown.cancelled() => return,
                line = reader.next() => line,
            };
            let tick = match line {
                Line::Tick(tick) => tick,
                Line::End => break,
                Line::Malformed { line, reason } => {
                    malformed += 1;
                    tracing::warn!(file = %path, line, %reason, "malformed replay line skipped");
                    continue;
                }
                Line::Failed { line, error } => {
                    tracing::error!(file = %path, line, %error, "replay read failed; stopping");
                    break;
                }
            };
            if self.speed > 0.0 {
                due = match tick.unix_nanos {
                    Some(ts) => {
                        let t0 = *first_ts.get_or_insert(ts);
                        let offset = (ts.saturating_sub(t0).max(0) as f64 / self.speed) as u64;
                        start + Duration::from_nanos(offset)
                    }
                    None if self.rate > 0.0 => due + Duration::from_secs_f64(1.0 / self.rate),
                    None => due,
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(due) => {}
                }
            }
            match ingest
                .submit(Source::Feed, &tick.symbol, tick.price, 0)
                .await
            {
                Ack::Done(Err(e)) => {
                    tracing::warn!(file = %path, line = reader.line(), error = %e, "replayed tick rejected")
                }
                // A cluster's outcome is counted and logged by its sequencer.
                Ack::Done(Ok(_)) | Ack::Waiting(_) => published += 1,
            }
        }
        tracing::info!(file = %path, published, malformed, "replay finished");
    }
}
