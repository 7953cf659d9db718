//! A stream as /streams shows it: the counters its session keeps current per batch,
//! and the ticks publishes sent it themselves (`hub::DirectSink`). `mod` keeps the
//! table of them and sums them for the Prometheus counters.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::Instant,
};

use serde::Serialize;

use crate::hub::DirectSink;

/// What /streams shows of one open stream; the session keeps it current per batch.
#[derive(Debug)]
pub struct StreamInfo {
    pub id: u64,
    pub rpc: &'static str,
    pub peer: String,
    pub principal: String,
    pub started: Instant,
    pub started_unix: u64,
    pub subscriptions: AtomicU64,
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
    pub lag_notices: AtomicU64,
    /// Ticks published to its symbols that it has not sent yet (updated at most 4×/s).
    pub behind: AtomicU64,
    /// Where publishes send its ticks themselves, counting them (`hub::DirectSink`).
    pub direct: OnceLock<Arc<dyn DirectSink>>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct StreamView {
    pub id: u64,
    pub rpc: String,
    pub peer: String,
    pub principal: String,
    pub age_seconds: f64,
    pub subscriptions: u64,
    pub ticks_sent: u64,
    pub ticks_dropped: u64,
    pub behind: u64,
    /// Why it ended (`client_cancel`, `token_expired`, ...); only in /streams/ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
}

impl StreamInfo {
    /// Ticks handed to the transport: by the session, and by publishes.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed) + self.sent_direct()
    }

    /// Of `sent`, the ticks publishes framed themselves.
    pub fn sent_direct(&self) -> u64 {
        self.direct.get().map_or(0, |d| d.sent())
    }

    pub(super) fn view(&self) -> StreamView {
        StreamView {
            id: self.id,
            rpc: self.rpc.to_string(),
            peer: self.peer.clone(),
            principal: self.principal.clone(),
            age_seconds: self.started.elapsed().as_secs_f64(),
            subscriptions: self.subscriptions.load(Ordering::Relaxed),
            ticks_sent: self.sent(),
            ticks_dropped: self.dropped.load(Ordering::Relaxed),
            behind: self.behind.load(Ordering::Relaxed),
            ended: None,
        }
    }
}
