//! The cluster's series (`--cluster`), read at scrape time from `cluster::ClusterStats`:
//! bus reachability, symbols read, ticks read, syncs, catch-ups, batches, conflicts.

use std::sync::atomic::Ordering;

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

use crate::cluster::Cluster;

/// The cluster's series (`--cluster`).
pub(super) fn encode(
    cluster: &Cluster,
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let stats = cluster.stats();
    let connected = ConstGauge::new(i64::from(cluster.is_connected()));
    connected.encode(encoder.encode_descriptor(
        "cluster_connected",
        "1 while the market-data bus (NATS) is reachable",
        None,
        connected.metric_type(),
    )?)?;
    let syncing = ConstGauge::new(stats.syncing.load(Ordering::Relaxed) as i64);
    syncing.encode(encoder.encode_descriptor(
        "cluster_symbols_synced",
        "Symbols this node reads from the bus (wanted by its clients, or lingering)",
        None,
        syncing.metric_type(),
    )?)?;
    for (name, help, value) in [
        (
            "cluster_ticks_received",
            "Ticks this node read from the bus (history and live)",
            &stats.received,
        ),
        (
            "cluster_syncs",
            "Syncs of a symbol started (one bus consumer each)",
            &stats.syncs_started,
        ),
        (
            "cluster_catch_ups",
            "Reads of a symbol's stored ticks: history on a new sync, after an outage or a missed tick",
            &stats.catch_ups,
        ),
        (
            "cluster_publish_batches",
            "Atomic batches stored: ticks of one symbol that queued behind its last publish",
            &stats.batches,
        ),
        (
            "cluster_publish_conflicts",
            "Publishes re-stamped because another node stored a tick of the symbol first",
            &stats.conflicts,
        ),
    ] {
        let counter = ConstCounter::new(value.load(Ordering::Relaxed));
        counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
    }
    Ok(())
}
