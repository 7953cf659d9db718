//! Prometheus metrics and the registry of open streams. Sessions fold their local counts
//! in once per write batch (never per tick); hub counters are read at scrape time by a
//! collector, so publishing pays nothing for them. Served by `admin` at /metrics and
//! /streams.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use dashmap::DashMap;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use tokio::sync::OwnedSemaphorePermit;

use crate::{
    cluster::Cluster,
    hub::{Hub, Source},
};

mod cluster;
mod streams;

pub use streams::{StreamInfo, StreamView};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabel {
    pub rpc: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodCodeLabel {
    pub method: String,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: String,
}

/// Why a stream ended (`tickerd_streams_ended_total{reason}`).
pub mod ended {
    pub const CLIENT_CANCEL: &str = "client_cancel";
    pub const CLIENT_ERROR: &str = "client_error";
    pub const COMPLETED: &str = "completed";
    pub const SHUTDOWN: &str = "shutdown";
    /// A STRICT stream fell behind its ring.
    pub const SLOW_CONSUMER: &str = "slow_consumer";
    /// The caller's token expired while the stream was open.
    pub const AUTH_EXPIRY: &str = "auth_expiry";
    /// An in-band token refresh failed its checks.
    pub const AUTH_REJECTED: &str = "auth_rejected";
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

/// Cheap-to-clone handle on every metric.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

pub struct Inner {
    registry: Registry,
    pub connections: Gauge,
    pub streams: Family<RpcLabel, Gauge>,
    pub subscriptions: Gauge,
    pub streams_ended: Family<ReasonLabel, Counter>,
    pub rpcs: Family<MethodCodeLabel, Counter>,
    pub rpc_seconds: Family<MethodLabel, Histogram>,
    pub publish_to_send_seconds: Histogram,
    pub auth_failures: Family<ReasonLabel, Counter>,
    tls_handshake_failures: Family<ReasonLabel, Counter>,
    tls_reloads: Family<OutcomeLabel, Counter>,
    tls_certificate_expiry: Gauge,
    streams_table: Arc<StreamTable>,
    cluster: Arc<OnceLock<Cluster>>,
    next_stream_id: AtomicU64,
}

/// Open streams and the totals of closed ones. Sessions write only their own
/// `StreamInfo` (uncontended atomics); the per-stream totals are summed at scrape time.
/// The mutex is taken only when a stream closes and when a scrape reads, so a scrape
/// never counts a closing stream twice or not at all.
#[derive(Debug, Default)]
struct StreamTable {
    open: DashMap<u64, Arc<StreamInfo>>,
    closed: std::sync::Mutex<Totals>,
    /// The last `ENDED_KEPT` streams to end, with their final counts and why they
    /// ended: /streams/ended, so every tick the totals count has a stream to answer for.
    ended: std::sync::Mutex<std::collections::VecDeque<StreamView>>,
}

/// How many ended streams /streams/ended keeps (about 200 bytes each).
pub const ENDED_KEPT: usize = 1024;

#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    sent: u64,
    /// Of `sent`, the ticks publishes framed themselves (`hub::DirectSink`).
    direct: u64,
    dropped: u64,
    lag_notices: u64,
}

impl StreamTable {
    fn totals(&self) -> Totals {
        let closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        let mut t = *closed;
        for s in self.open.iter() {
            t.sent += s.sent();
            t.direct += s.sent_direct();
            t.dropped += s.dropped.load(Ordering::Relaxed);
            t.lag_notices += s.lag_notices.load(Ordering::Relaxed);
        }
        t
    }

    fn close(&self, id: u64, reason: &'static str) {
        let mut closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, s)) = self.open.remove(&id) {
            closed.sent += s.sent();
            closed.direct += s.sent_direct();
            closed.dropped += s.dropped.load(Ordering::Relaxed);
            closed.lag_notices += s.lag_notices.load(Ordering::Relaxed);
            let mut view = s.view();
            view.ended = Some(reason.to_string());
            // Under `closed`'s lock, so the totals and this list never disagree.
            let mut ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
            if ended.len() == ENDED_KEPT {
                ended.pop_front();
            }
            ended.push_back(view);
        }
    }
}

impl std::ops::Deref for Metrics {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Metrics {
    /// `feed_rate`: the configured feed rate in ticks/s (0 without a paced feed).
    pub fn new(hub: Hub, per_symbol: bool, feed_rate: f64) -> Metrics {
        let mut registry = Registry::with_prefix("tickerd");
        let connections = Gauge::default();
        registry.register(
            "connections_active",
            "Open client connections",
            connections.clone(),
        );
        let streams = Family::<RpcLabel, Gauge>::default();
        registry.register("streams_active", "Open streams by RPC", streams.clone());
        let subscriptions = Gauge::default();
        registry.register(
            "subscriptions_active",
            "Symbol subscriptions over all streams",
            subscriptions.clone(),
        );
        let streams_ended = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "streams_ended",
            "Streams ended, by reason",
            streams_ended.clone(),
        );
        for reason in [
            ended::CLIENT_CANCEL,
            ended::CLIENT_ERROR,
            ended::COMPLETED,
            ended::SHUTDOWN,
            ended::SLOW_CONSUMER,
            ended::AUTH_EXPIRY,
            ended::AUTH_REJECTED,
        ] {
            let _ = streams_ended.get_or_create(&ReasonLabel { reason });
        }
        let rpcs = Family::<MethodCodeLabel, Counter>::default();
        registry.register(
            "rpcs",
            "RPCs finished, by method and gRPC status code",
            rpcs.clone(),
        );
        let rpc_seconds = Family::<MethodLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 4.0, 12))
        });
        registry.register(
            "rpc_duration_seconds",
            "RPC and stream durations",
            rpc_seconds.clone(),
        );
        let publish_to_send_seconds = Histogram::new(exponential_buckets(0.00001, 2.0, 20));
        registry.register(
            "publish_to_send_seconds",
            "From a tick's event time to its hand-over to the transport (sampled: at most every 100 ms per stream)",
            publish_to_send_seconds.clone(),
        );
        let auth_failures = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "auth_failures",
            "Refused credentials, by reason",
            auth_failures.clone(),
        );
        let tls_handshake_failures = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed, by reason (docs/security.md lists them)",
            tls_handshake_failures.clone(),
        );
        let tls_reloads = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "tls_reloads",
            "Certificate reloads (SIGHUP, --tls-reload-interval), by outcome",
            tls_reloads.clone(),
        );
        let tls_certificate_expiry = Gauge::default();
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "Expiry (Unix seconds) of the server certificate in service; 0 without TLS",
            tls_certificate_expiry.clone(),
        );
        let streams_table = Arc::new(StreamTable::default());
        let cluster = Arc::new(OnceLock::new());
        let collector = HubCollector {
            hub,
            per_symbol,
            feed_rate,
            streams: streams_table.clone(),
            cluster: Arc::clone(&cluster),
        };
        registry.register_collector(Box::new(collector));
        Metrics(Arc::new(Inner {
            registry,
            connections,
            streams,
            subscriptions,
            streams_ended,
            rpcs,
            rpc_seconds,
            publish_to_send_seconds,
            auth_failures,
            tls_handshake_failures,
            tls_reloads,
            tls_certificate_expiry,
            streams_table,
            cluster,
            next_stream_id: AtomicU64::new(1),
        }))
    }

    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn tls_handshake_failures(&self, reason: &'static str) {
        self.tls_handshake_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Records a certificate load: `Some(expiry)` when it went into service.
    pub fn tls_loaded(&self, expiry_unix_seconds: Option<i64>) {
        let outcome = if expiry_unix_seconds.is_some() {
            "ok"
        } else {
            "error"
        };
        self.tls_reloads
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        if let Some(expiry) = expiry_unix_seconds {
            self.tls_certificate_expiry.set(expiry);
        }
    }

    /// Adds the cluster's series (bus reachability, ticks read, syncs, conflicts).
    pub fn attach_cluster(&self, cluster: Cluster) {
        let _ = self.cluster.set(cluster);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// A stream's ticket: `permit` (its place under the stream cap) plus its entry in
    /// /streams and the gauges, released with the reason set on it when dropped.
    pub fn ticket(
        &self,
        rpc: &'static str,
        peer: String,
        principal: String,
        permit: OwnedSemaphorePermit,
    ) -> StreamTicket {
        let info = self.open_stream(rpc, peer, principal);
        StreamTicket {
            info,
            metrics: self.clone(),
            reason: ended::CLIENT_CANCEL,
            _permit: permit,
        }
    }

    /// Registers a new stream for /streams and the stream gauges.
    pub fn open_stream(
        &self,
        rpc: &'static str,
        peer: String,
        principal: String,
    ) -> Arc<StreamInfo> {
        let id = self.next_stream_id.fetch_add(1, Ordering::Relaxed);
        let info = Arc::new(StreamInfo {
            id,
            rpc,
            peer,
            principal,
            started: Instant::now(),
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            subscriptions: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            direct: std::sync::OnceLock::new(),
            dropped: AtomicU64::new(0),
            lag_notices: AtomicU64::new(0),
            behind: AtomicU64::new(0),
        });
        self.streams_table.open.insert(id, Arc::clone(&info));
        self.streams.get_or_create(&RpcLabel { rpc }).inc();
        info
    }

    /// Unregisters a stream, counting why it ended.
    pub fn close_stream(&self, info: &StreamInfo, reason: &'static str) {
        self.streams_table.close(info.id, reason);
        self.streams
            .get_or_create(&RpcLabel { rpc: info.rpc })
            .dec();
        self.streams_ended
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Every open stream, oldest first, for /streams and `ticker streams`.
    pub fn stream_list(&self) -> Vec<StreamView> {
        let mut list: Vec<StreamView> = self
            .streams_table
            .open
            .iter()
            .map(|e| e.value().view())
            .collect();
        list.sort_by_key(|s| s.id);
        list
    }

    /// The last `ENDED_KEPT` streams to end, oldest first, with their final counts.
    pub fn ended_list(&self) -> Vec<StreamView> {
        let ended = self
            .streams_table
            .ended
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        ended.iter().cloned().collect()
    }
}

/// See `Metrics::ticket`.
pub struct StreamTicket {
    pub info: Arc<StreamInfo>,
    pub metrics: Metrics,
    /// Why the stream ends; `client_cancel` unless the stream says otherwise.
    pub reason: &'static str,
    _permit: OwnedSemaphorePermit,
}

impl Drop for StreamTicket {
    fn drop(&mut self) {
        self.metrics.close_stream(&self.info, self.reason);
    }
}

/// Hub counters, build info and the feed rate, read at scrape time.
#[derive(Debug)]
struct HubCollector {
    hub: Hub,
    per_symbol: bool,
    feed_rate: f64,
    streams: Arc<StreamTable>,
    /// Set by `Metrics::attach_cluster`: its series appear from then on.
    cluster: Arc<OnceLock<Cluster>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SymbolLabel {
    symbol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    version: &'static str,
    git_sha: &'static str,
}

impl Collector for HubCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.hub.stats();
        let build = ConstGauge::new(1i64);
        let mut m = encoder.encode_descriptor(
            "build_info",
            "Version and git commit",
            None,
            build.metric_type(),
        )?;
        let label = BuildLabel {
            version: env!("CARGO_PKG_VERSION"),
            git_sha: env!("TICKERD_GIT_SHA"),
        };
        build.encode(m.encode_family(&label)?)?;

        for (name, help, values) in [
            (
                "ticks_accepted",
                "Ticks accepted, by source",
                &stats.accepted,
            ),
            (
                "ticks_rejected",
                "Ticks rejected (bad symbol, price, time, symbol limit), by source",
                &stats.rejected,
            ),
        ] {
            let mut m = encoder.encode_descriptor(
                name,
                help,
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for source in [Source::Feed, Source::Publish] {
                let value = ConstCounter::new(values[source as usize].load(Ordering::Relaxed));
                value.encode(m.encode_family(&SourceLabel {
                    source: source.name(),
                })?)?;
            }
        }
        let totals = self.streams.totals();
        for (name, help, value) in [
            (
                "ticks_delivered",
                "Ticks handed to the transport, over all streams",
                totals.sent,
            ),
            (
                "ticks_delivered_direct",
                "Of ticks_delivered, those a publish framed straight into the connection's buffer (--direct-publish)",
                totals.direct,
            ),
            (
                "ticks_dropped",
                "Ticks skipped for streams that fell behind",
                totals.dropped,
            ),
            (
                "lag_notices",
                "KIND_LAGGED notices sent",
                totals.lag_notices,
            ),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        let overflowed = ConstCounter::new(stats.overflowed.load(Ordering::Relaxed));
        let m = encoder.encode_descriptor(
            "ticks_overflowed",
            "Ticks dropped from a full symbol ring before some subscriber took them",
            None,
            overflowed.metric_type(),
        )?;
        overflowed.encode(m)?;
        let symbols = ConstGauge::new(self.hub.symbol_count() as i64);
        symbols.encode(encoder.encode_descriptor(
            "symbols_known",
            "Known symbols",
            None,
            symbols.metric_type(),
        )?)?;
        let rate = ConstGauge::new(self.feed_rate);
        rate.encode(encoder.encode_descriptor(
            "feed_rate_ticks_per_second",
            "Configured feed rate (0: no paced feed)",
            None,
            rate.metric_type(),
        )?)?;

        if let Some(cluster) = self.cluster.get() {
            cluster::encode(cluster, &mut encoder)?;
        }
        if self.per_symbol {
            let snapshot = self.hub.symbol_seqs();
            let mut m = encoder.encode_descriptor(
                "symbol_ticks",
                "Ticks accepted per symbol (its seq)",
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for (symbol, seq, _) in &snapshot {
                ConstCounter::new(*seq).encode(m.encode_family(&SymbolLabel {
                    symbol: symbol.to_string(),
                })?)?;
            }
            let mut m = encoder.encode_descriptor(
                "symbol_subscribers",
                "Open receivers per symbol",
                None,
                ConstGauge::new(0i64).metric_type(),
            )?;
            for (symbol, _, receivers) in &snapshot {
                ConstGauge::new(*receivers as i64).encode(m.encode_family(&SymbolLabel {
                    symbol: symbol.to_string(),
                })?)?;
            }
        }
        Ok(())
    }
}
