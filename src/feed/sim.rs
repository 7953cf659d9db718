//! The random-walk simulator (`--feed sim`): `rate` ticks per second spread over its
//! symbols, prices drifting in small relative steps, repeatable for a given seed.

use std::time::Duration;

use rand::{rngs::SmallRng, Rng, SeedableRng};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::{
    cluster::{Ack, Ingest},
    hub::Source,
    symbol::Symbol,
};

/// Publishing is paced in 1 ms rounds; a late round catches up at most this much.
const ROUND: Duration = Duration::from_millis(1);
const MAX_CATCH_UP: Duration = Duration::from_millis(100);

pub struct Simulator {
    symbols: Vec<Symbol>,
    rate: f64,
    seed: u64,
}

impl Simulator {
    pub fn new(symbols: Vec<Symbol>, rate: f64, seed: u64) -> Simulator {
        Simulator {
            symbols,
            rate,
            seed,
        }
    }

    pub async fn run(self, ingest: Ingest, shutdown: CancellationToken) {
        if self.symbols.is_empty() || self.rate.is_nan() || self.rate <= 0.0 {
            tracing::info!("simulator idle: no symbols or zero rate");
            return;
        }
        let mut rng = SmallRng::seed_from_u64(self.seed);
        let mut prices: Vec<f64> = self
            .symbols
            .iter()
            .map(|_| rng.random_range(20.0..500.0))
            .collect();
        let mut round = tokio::time::interval(ROUND);
        round.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let start = Instant::now();
        let mut sent: u64 = 0;
        tracing::info!(
            symbols = self.symbols.len(),
            rate = self.rate,
            seed = self.seed,
            "simulator started"
        );
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = round.tick() => {}
            }
            let due = (start.elapsed().as_secs_f64() * self.rate) as u64;
            let backlog_cap = (MAX_CATCH_UP.as_secs_f64() * self.rate).ceil() as u64;
            if due.saturating_sub(sent) > backlog_cap {
                sent = due - backlog_cap; // fell far behind (a paused process): skip, don't burst
            }
            while sent < due {
                let i = rng.random_range(0..self.symbols.len());
                let step: f64 = rng.random_range(-0.001..0.001);
                prices[i] = (prices[i] * (1.0 + step)).max(0.01);
                // A cluster's outcome is counted and logged by its sequencer.
                let ack = ingest
                    .submit(Source::Feed, &self.symbols[i], prices[i], 0)
                    .await;
                if let Ack::Done(Err(e)) = ack {
                    tracing::warn!(symbol = %self.symbols[i], error = %e, "simulated tick rejected");
                }
                sent += 1;
            }
        }
    }
}
