//! The bus's reachability: the NATS connection options (credentials, TLS, a ping
//! interval short enough to notice a partition), and a monitor that turns connection
//! events into in-band notices (`Hub::set_bus_stale`: KIND_STALE, then KIND_LIVE) and,
//! after `--cluster-unhealthy-after`, into the server's health; and a check that the
//! market's stream is still the one the node started with (`watch_stream`).

use async_nats::{
    jetstream::{context::GetStreamErrorKind, ErrorCode},
    ConnectOptions, Event,
};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{Cluster, ClusterArgs, ClusterError};
use crate::hub::Hub;

/// Connection options from the `--cluster-*` flags; `connected` follows the
/// connection's events.
pub(super) async fn connect_options(
    args: &ClusterArgs,
    connected: watch::Sender<bool>,
) -> Result<ConnectOptions, ClusterError> {
    let mut options = match &args.cluster_creds {
        Some(path) => ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|source| ClusterError::File {
                path: path.clone(),
                source,
            })?,
        None => ConnectOptions::new(),
    };
    if let Some(path) = &args.cluster_nkey_file {
        let seed = std::fs::read_to_string(path).map_err(|source| ClusterError::File {
            path: path.clone(),
            source,
        })?;
        options = options.nkey(seed.trim().to_string());
    }
    if let Some(token) = &args.cluster_token {
        options = options.token(token.clone());
    }
    if let Some(ca) = &args.cluster_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&args.cluster_cert, &args.cluster_key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(options
        .name("tickerd")
        .ping_interval(args.cluster_ping_interval)
        .connection_timeout(std::time::Duration::from_secs(5))
        .max_reconnects(None)
        .event_callback(move |event| {
            let connected = connected.clone();
            async move {
                match event {
                    Event::Connected => {
                        connected.send_replace(true);
                    }
                    Event::Disconnected => {
                        connected.send_replace(false);
                    }
                    other => tracing::warn!(event = %other, "NATS connection event"),
                }
            }
        }))
}

/// Follows the connection: stale notices at once, unhealthy after the grace period.
/// The returned receiver says whether the node should serve.
pub(super) fn spawn(
    cluster: Cluster,
    hub: Hub,
    shutdown: CancellationToken,
) -> watch::Receiver<bool> {
    let (healthy, healthy_rx) = watch::channel(true);
    let mut connected = cluster.inner.connected.clone();
    let grace = cluster.inner.args.cluster_unhealthy_after;
    tokio::spawn(async move {
        loop {
            let up = *connected.borrow_and_update();
            hub.set_bus_stale(!up);
            let mut deadline = None;
            if up {
                if !*healthy.borrow() {
                    tracing::info!("market-data bus reachable again: serving");
                }
                healthy.send_replace(true);
            } else {
                tracing::warn!(grace = %humantime::format_duration(grace), "market-data bus unreachable: streams told KIND_STALE");
                deadline = Some(Instant::now() + grace);
            }
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    changed = connected.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        break;
                    }
                    _ = until(deadline) => {
                        deadline = None;
                        tracing::error!("market-data bus still unreachable: health NOT_SERVING");
                        healthy.send_replace(false);
                    }
                }
            }
        }
    });
    healthy_rx
}

/// Checks, every ping interval while connected, that the market's stream is the one
/// the node started with, and reports it lost (`Cluster::lost`) when it was created anew
/// (another creation time: a new epoch) or has been missing for
/// `--cluster-unhealthy-after`. Either way the node's seqs name nothing any more: a new
/// stream's seqs start again at 1, below the ones the node holds, so its syncs would
/// take every new tick for one already seen, and its subscribers would hear nothing.
pub(super) fn watch_stream(cluster: Cluster, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let inner = &cluster.inner;
        let mut missing_since: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(inner.args.cluster_ping_interval) => {}
            }
            if !cluster.is_connected() {
                // A stream missing before an outage says nothing about after it.
                missing_since = None;
                continue;
            }
            let reason = match inner.context.get_stream(&inner.name).await {
                Ok(stream) => {
                    missing_since = None;
                    let epoch = super::epoch_of(stream.cached_info());
                    if epoch == inner.epoch {
                        continue;
                    }
                    format!("was created anew (epoch {} is now {epoch})", inner.epoch)
                }
                Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(ref js) if js.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
                {
                    // Not at the first look: a nats-server restarting may not have
                    // loaded its streams yet.
                    let since = *missing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() < inner.args.cluster_unhealthy_after {
                        continue;
                    }
                    "was deleted".to_string()
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot look at the market's stream");
                    continue;
                }
            };
            return cluster.lose(reason);
        }
    });
}

async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
