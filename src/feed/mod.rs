//! Feeds: where ticks come from besides the Publish RPC. Each feed is a task that
//! writes through `cluster::Ingest` (the hub itself, or a cluster's bus) until the
//! server's shutdown token is cancelled.

mod replay;
mod sim;

pub mod csv;

use std::{fmt, path::PathBuf, str::FromStr};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{cluster::Ingest, symbol::Symbol};

pub use replay::Replay;
pub use sim::Simulator;

/// `--feed`: which feed task runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedKind {
    /// Random-walk simulator.
    Sim,
    /// No feed: ticks come only from Publish.
    None,
    /// Replay of a CSV file.
    Replay(PathBuf),
}

impl FromStr for FeedKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sim" => Ok(FeedKind::Sim),
            "none" => Ok(FeedKind::None),
            _ => match s.strip_prefix("replay:") {
                Some(path) if !path.is_empty() => Ok(FeedKind::Replay(PathBuf::from(path))),
                _ => Err(format!(
                    "unknown feed {s:?}: expected sim, none or replay:PATH"
                )),
            },
        }
    }
}

impl fmt::Display for FeedKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FeedKind::Sim => f.write_str("sim"),
            FeedKind::None => f.write_str("none"),
            FeedKind::Replay(p) => write!(f, "replay:{}", p.display()),
        }
    }
}

/// A feed ready to run, built (and its inputs checked) before the server starts.
pub enum Feed {
    Sim(Simulator),
    Replay(Replay),
}

impl Feed {
    /// Starts the feed task.
    pub fn spawn(self, ingest: Ingest, shutdown: CancellationToken) -> JoinHandle<()> {
        match self {
            Feed::Sim(sim) => tokio::spawn(sim.run(ingest, shutdown)),
            Feed::Replay(replay) => tokio::spawn(replay.run(ingest, shutdown)),
        }
    }
}

/// Simulated symbol names when no `--symbols-file` is given: SYM00..SYM99 for 100.
pub fn sim_symbols(count: usize) -> Vec<Symbol> {
    let width = count.saturating_sub(1).to_string().len();
    (0..count)
        .map(|i| Symbol::from(format!("SYM{i:0width$}")))
        .collect()
}
