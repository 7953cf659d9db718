//! The cluster: many tickerd nodes serving one market through NATS JetStream, which
//! orders, stores and replicates the ticks; tickerd writes no consensus of its own. It
//! sits beside the hub as the hub's source of ticks: every publish goes to the bus
//! (`sequencer` stamps the symbol's next seq under JetStream's per-subject
//! optimistic-concurrency check), and each symbol wanted by local subscriptions is read
//! back from the bus into the hub (`sync`: history first, then live). `health` turns the
//! bus's reachability into in-band notices and the server's health. Feeds and the
//! Publish RPC write through `Ingest`, which is the hub itself without `--cluster`.

mod codec;
mod health;
mod ingest;
mod sequencer;
mod sync;

use std::{
    path::PathBuf,
    sync::{atomic::AtomicU64, Arc},
    time::Duration,
};

use async_nats::jetstream::{self, stream};
use clap::Args;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    hub::{Hub, Interest},
    pb::TickerResponse,
};

pub use ingest::{Ack, Ingest, IngestError};

/// The oldest nats-server tickerd runs on: its `Nats-Expected-Last-Subject-Sequence`
/// check is atomic (2.9.15 to 2.9.20 could accept two publishes expecting the same last
/// sequence, nats-server issue 4320), and it has direct get and atomic batch publish
/// (2.12), which the sequencer uses for busy symbols.
pub const MIN_SERVER: (u64, u64, u64) = (2, 12, 0);

/// `--cluster*` flags.
#[derive(Args, Debug, Clone, Default)]
pub struct ClusterArgs {
    /// NATS server URL of the cluster's JetStream (repeat, or separate with commas, for
    /// several). Without it tickerd runs alone and needs nothing else.
    #[arg(long = "cluster", env = "TICKERD_CLUSTER", value_delimiter = ',')]
    pub urls: Vec<String>,

    /// JetStream stream holding the market's ticks; several markets can share one NATS
    /// under different names.
    #[arg(long, env = "TICKERD_CLUSTER_STREAM", default_value = "TICKERD")]
    pub cluster_stream: String,

    /// NATS credentials file (JWT and NKey seed), as `nsc` writes it.
    #[arg(long, env = "TICKERD_CLUSTER_CREDS")]
    pub cluster_creds: Option<PathBuf>,

    /// File holding an NKey seed to authenticate to NATS with.
    #[arg(long, env = "TICKERD_CLUSTER_NKEY_FILE")]
    pub cluster_nkey_file: Option<PathBuf>,

    /// Token to authenticate to NATS with (prefer the environment variable).
    #[arg(long, env = "TICKERD_CLUSTER_TOKEN", hide_env_values = true)]
    pub cluster_token: Option<String>,

    /// PEM CA bundle to verify the NATS servers with (turns TLS on).
    #[arg(long, env = "TICKERD_CLUSTER_CA")]
    pub cluster_ca: Option<PathBuf>,

    /// PEM client certificate for NATS (mutual TLS), with --cluster-key.
    #[arg(long, env = "TICKERD_CLUSTER_CERT", requires = "cluster_key")]
    pub cluster_cert: Option<PathBuf>,

    /// PEM key of --cluster-cert.
    #[arg(long, env = "TICKERD_CLUSTER_KEY", requires = "cluster_cert")]
    pub cluster_key: Option<PathBuf>,

    /// Replicas of the stream when tickerd creates it (JetStream R1/R3/R5).
    #[arg(long, env = "TICKERD_CLUSTER_REPLICAS", default_value_t = 1)]
    pub cluster_replicas: usize,

    /// How long the bus may be unreachable before gRPC health and /healthz turn
    /// NOT_SERVING, so balancers move clients to healthy nodes; and how long the stream
    /// may be missing before the node stops.
    #[arg(long, env = "TICKERD_CLUSTER_UNHEALTHY_AFTER", default_value = "5s",
          value_parser = humantime::parse_duration)]
    pub cluster_unhealthy_after: Duration,

    /// How long a node keeps reading a symbol from the bus after its last local
    /// subscriber left (a quick resubscribe then needs no new sync).
    #[arg(long, env = "TICKERD_CLUSTER_LINGER", default_value = "10s",
          value_parser = humantime::parse_duration)]
    pub cluster_linger: Duration,

    /// How long JetStream may take to confirm a stored tick (and to answer the read
    /// of its symbol's last tick, when the node must read it first); past it the tick
    /// counts as rejected for its publisher.
    #[arg(long, env = "TICKERD_CLUSTER_PUBLISH_TIMEOUT", default_value = "2s",
          value_parser = humantime::parse_duration)]
    pub cluster_publish_timeout: Duration,

    /// How often the connection to NATS is pinged; two missed pings count as a lost
    /// connection (a partition is noticed within about three of these). Also how often
    /// the node checks that its stream was not deleted or created anew.
    #[arg(long, env = "TICKERD_CLUSTER_PING_INTERVAL", default_value = "1s",
          value_parser = humantime::parse_duration)]
    pub cluster_ping_interval: Duration,
}

impl ClusterArgs {
    pub fn enabled(&self) -> bool {
        !self.urls.is_empty()
    }
}

/// Why the cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot read {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect to NATS at {urls}: {reason}")]
    Connect { urls: String, reason: String },
    #[error(
        "nats-server {found} is too old: tickerd needs {}.{}.{} or later (its per-subject \
         sequence check orders the cluster's ticks)",
        MIN_SERVER.0, MIN_SERVER.1, MIN_SERVER.2
    )]
    OldServer { found: String },
    #[error("NATS at {urls} has JetStream off: start nats-server with -js")]
    NoJetStream { urls: String },
    #[error("cannot create or open JetStream stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
    #[error(
        "JetStream stream {stream} {reason}: the seqs this node holds no longer name the \
         stream's ticks; start the node again to follow it anew"
    )]
    StreamLost { stream: String, reason: String },
}

/// The epoch of a stream: its creation time in nanoseconds (never 0).
fn epoch_of(info: &stream::Info) -> u64 {
    (info.created.unix_timestamp_nanos() as u64).max(1)
}

/// Counters for operators and tests.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Ticks this node read from the bus (history and live).
    pub received: AtomicU64,
    /// Symbols this node reads from the bus now.
    pub syncing: AtomicU64,
    /// Publishes refused by JetStream because another writer got there first, retried.
    pub conflicts: AtomicU64,
    /// Syncs of a symbol started (each one a consumer created on the bus).
    pub syncs_started: AtomicU64,
    /// Atomic batches stored (each several ticks of one symbol in one round trip).
    pub batches: AtomicU64,
    /// Reads of a symbol's stored ticks: its history on a new sync, and after an
    /// outage or a missed tick.
    pub catch_ups: AtomicU64,
}

/// A connected cluster; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    epoch: u64,
    stream: stream::Stream,
    context: jetstream::Context,
    /// The same client with `--cluster-publish-timeout` as its timeout, for the
    /// sequencer's publishes: their acks then need no timer of ours besides
    /// async-nats's own.
    publisher: jetstream::Context,
    args: ClusterArgs,
    history_size: usize,
    connected: watch::Receiver<bool>,
    stats: ClusterStats,
    submit: mpsc::Sender<sequencer::Submit>,
    /// Taken by `start`.
    queue: std::sync::Mutex<Option<mpsc::Receiver<sequencer::Submit>>>,
    /// Why the node must stop (`health::watch_stream`), once it must.
    lost: watch::Sender<Option<String>>,
}

impl Cluster {
    /// Connects to NATS, checks the server, and opens (or creates) the market's stream.
    /// `history_size` ticks are kept per symbol (at least 1: the last tick carries the
    /// symbol's seq, so it is never aged out).
    pub async fn connect(args: &ClusterArgs, history_size: usize) -> Result<Cluster, ClusterError> {
        let urls = args.urls.join(",");
        let (connected_tx, connected) = watch::channel(true);
        let options = health::connect_options(args, connected_tx).await?;
        let client =
            options
                .connect(args.urls.as_slice())
                .await
                .map_err(|e| ClusterError::Connect {
                    urls: urls.clone(),
                    reason: e.to_string(),
                })?;
        let info = client.server_info();
        if !version_at_least(&info.version, MIN_SERVER) {
            return Err(ClusterError::OldServer {
                found: info.version,
            });
        }
        if !info.jetstream {
            return Err(ClusterError::NoJetStream { urls });
        }
        let context = jetstream::new(client);
        let name = args.cluster_stream.clone();
        let mut stream = context
            .get_or_create_stream(stream_config(&name, history_size, args.cluster_replicas))
            .await
            .map_err(|e| ClusterError::Stream {
                stream: name.clone(),
                reason: e.to_string(),
            })?;
        let mut info = stream
            .info()
            .await
            .map_err(|e| ClusterError::Stream {
                stream: name.clone(),
                reason: e.to_string(),
            })?
            .clone();
        let republish = codec::republish(&name);
        let republishes = info.config.republish.as_ref().is_some_and(|r| {
            (r.source.as_str(), r.destination.as_str(), r.headers_only)
                == (republish.0.as_str(), republish.1.as_str(), false)
        });
        if !info.config.allow_atomic_publish || !republishes {
            // A stream made by an older tickerd: batches need the flag, and nodes
            // follow ticks on the republish subjects.
            let mut config = info.config.clone();
            config.allow_atomic_publish = true;
            config.republish = Some(stream::Republish {
                source: republish.0,
                destination: republish.1,
                headers_only: false,
            });
            info = context
                .update_stream(config)
                .await
                .map_err(|e| ClusterError::Stream {
                    stream: name.clone(),
                    reason: format!("cannot allow atomic batches and republish: {e}"),
                })?;
        }
        let kept = info.config.max_messages_per_subject;
        if kept != history_size.max(1) as i64 {
            tracing::warn!(stream = %name, kept, history_size, "the stream keeps another history size than --history-size; its own setting wins");
        }
        if !info.config.allow_direct {
            return Err(ClusterError::Stream {
                stream: name,
                reason: "the stream does not allow direct get (allow_direct); recreate it or \
                         choose another --cluster-stream"
                    .into(),
            });
        }
        let epoch = epoch_of(&info);
        tracing::info!(stream = %name, epoch, server = %client_version(&context), "cluster connected");
        let (submit, queue) = mpsc::channel(sequencer::QUEUE);
        let publisher = jetstream::ContextBuilder::new()
            .timeout(args.cluster_publish_timeout)
            .build(context.client());
        Ok(Cluster {
            inner: Arc::new(Inner {
                name,
                epoch,
                stream,
                context,
                publisher,
                args: args.clone(),
                history_size: kept.max(1) as usize,
                connected,
                lost: watch::channel(None).0,
                stats: ClusterStats::default(),
                submit,
                queue: std::sync::Mutex::new(Some(queue)),
            }),
        })
    }

    /// The epoch of every seq in this market: the stream's creation time. It changes
    /// only when the stream is recreated.
    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    pub fn stats(&self) -> &ClusterStats {
        &self.inner.stats
    }

    /// Ticks kept per symbol by the stream.
    pub fn history_size(&self) -> usize {
        self.inner.history_size
    }

    /// Whether the node is connected to the bus now.
    pub fn is_connected(&self) -> bool {
        *self.inner.connected.borrow()
    }

    /// Starts the sequencer, the interest-driven syncs of `hub` and the health monitor.
    /// Symbols the hub declared, or every symbol with `allow_unknown`, are
    /// subscribable before their first tick. The receiver returned says whether the
    /// node should serve: false once the bus was unreachable for
    /// `--cluster-unhealthy-after`.
    pub fn start(
        &self,
        hub: Hub,
        interest: Arc<Interest>,
        allow_unknown: bool,
        shutdown: CancellationToken,
    ) -> watch::Receiver<bool> {
        let queue = self
            .inner
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(queue) = queue {
            tokio::spawn(sequencer::run(self.clone(), queue, shutdown.clone()));
        }
        let syncs = sync::Syncs::new(self.clone(), hub.clone(), allow_unknown);
        tokio::spawn(syncs.run(interest, shutdown.clone()));
        health::watch_stream(self.clone(), shutdown.clone());
        health::spawn(self.clone(), hub, shutdown)
    }

    /// Reports the stream lost (`lost`): the first reason wins.
    fn lose(&self, reason: String) {
        if self.inner.lost.borrow().is_some() {
            return;
        }
        tracing::error!(stream = %self.inner.name, %reason, "the market's stream changed under this node: stopping");
        self.inner.lost.send_replace(Some(reason));
    }

    /// Resolves if the market's stream is deleted or created anew while this node runs
    /// (checked every `--cluster-ping-interval`), or a symbol's seqs on it went back
    /// (a purge): the node must then stop, since the seqs it holds no longer name the
    /// stream's ticks. Never resolves otherwise.
    pub async fn lost(&self) -> ClusterError {
        let mut lost = self.inner.lost.subscribe();
        let reason = lost
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|r| r.clone());
        let Some(reason) = reason else {
            // The sender lives as long as this handle: not reached.
            return std::future::pending().await;
        };
        ClusterError::StreamLost {
            stream: self.inner.name.clone(),
            reason,
        }
    }

    /// The last tick of `symbol` as the bus holds it (GetQuotes on a symbol this node
    /// does not read).
    pub async fn last(&self, symbol: &str) -> Result<Option<TickerResponse>, IngestError> {
        match self
            .inner
            .stream
            .direct_get_last_for_subject(codec::subject(&self.inner.name, symbol))
            .await
        {
            Ok(message) => {
                Ok(codec::decode(&message.payload).map(|tick| codec::snapshot(tick, self.epoch())))
            }
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(IngestError::Unavailable(format!(
                "market-data bus unreachable: {e}"
            ))),
        }
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("stream", &self.inner.name)
            .field("epoch", &self.inner.epoch)
            .finish()
    }
}

fn client_version(context: &jetstream::Context) -> String {
    context.client().server_info().version
}

/// The stream: one subject per symbol, the last `history_size` ticks of each kept (and
/// never aged out, so the last tick and its seq survive quiet periods; the history's
/// age limit is applied when replaying), direct get for last values.
fn stream_config(name: &str, history_size: usize, replicas: usize) -> stream::Config {
    stream::Config {
        name: name.to_string(),
        subjects: vec![codec::all_subjects(name)],
        max_messages_per_subject: history_size.max(1) as i64,
        storage: stream::StorageType::File,
        num_replicas: replicas.max(1),
        allow_direct: true,
        allow_atomic_publish: true,
        republish: Some(stream::Republish {
            source: codec::republish(name).0,
            destination: codec::republish(name).1,
            headers_only: false,
        }),
        discard: stream::DiscardPolicy::Old,
        description: Some("tickerd market ticks, one subject per symbol".into()),
        ..Default::default()
    }
}

/// Whether a `major.minor.patch[-tag]` version is at least `min`.
fn version_at_least(version: &str, min: (u64, u64, u64)) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let found = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    found >= min
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_servers_are_refused() {
        assert!(version_at_least("2.15.1", MIN_SERVER));
        assert!(version_at_least("2.12.0", MIN_SERVER));
        assert!(!version_at_least("2.11.9", MIN_SERVER));
        assert!(version_at_least("v3.0.0-beta", MIN_SERVER));
        assert!(!version_at_least("2.9.20", MIN_SERVER));
        assert!(!version_at_least("2.9.10", MIN_SERVER));
        assert!(!version_at_least("garbage", MIN_SERVER));
    }
}
