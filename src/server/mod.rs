//! The server: builds the hub, the feed and the service from a `Config` (`config`, every
//! flag), serves them with health and reflection under explicit HTTP/2 limits on a
//! listener the caller bound (with TLS when configured: `transport::incoming`,
//! `transport::tls`; on `--io-threads` threads: `transport::shards`), and drains on the
//! caller's shutdown future. The `tickerd` binary is a thin wrapper.

pub mod config;

use std::{future::Future, io, path::PathBuf, pin::Pin, time::Duration};

use std::sync::Arc;

use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tonic::service::{interceptor::InterceptedService, Routes};
use tonic_health::ServingStatus;
use tower_layer::Layer as _;

pub use config::{Config, Http2};

use crate::{
    auth::{jwt::JwtKeyError, Authenticator, JwtVerifier},
    cluster::{Cluster, ClusterError, Ingest},
    feed::{self, Feed, FeedKind, Replay, Simulator},
    hub::Interest,
    hub::{Hub, HubConfig},
    ops::{admin, metrics::Metrics, observe::RpcMetricsLayer},
    pb::{self, ticker_stream_service_server::TickerStreamServiceServer},
    session::SessionLimits,
    shutdown::Shutdown,
    symbol::{self, Symbol},
    transport::{
        grpc::{MessageLimits, ServiceLimits, StreamRoutesLayer, TickerService},
        http2,
        incoming::{Incoming, IncomingOptions},
        shards::{ShardError, Shards},
        tls::{Tls, TlsError},
        web::{self, WebOptions},
    },
};

/// Why the server could not start or stopped serving. Each message names the input at fault.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot read symbols file {path}: {source}")]
    SymbolsFile { path: PathBuf, source: io::Error },
    #[error("symbols file {path}, line {line}: {reason}")]
    SymbolsFileLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("cannot open replay file {path}: {source}")]
    ReplayFile { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    JwtKey(#[from] JwtKeyError),
    #[error("reflection descriptors are invalid: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("serving failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot start an I/O thread: {0}")]
    IoThread(io::Error),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("--cluster needs Server::build, which connects to the bus")]
    ClusterNotConnected,
}

/// A configured server, not yet serving.
pub struct Server {
    config: Config,
    hub: Hub,
    service: TickerService,
    feed: Option<Feed>,
    shutdown: Shutdown,
    metrics_listener: Option<TcpListener>,
    web_listener: Option<TcpListener>,
    tls: Option<Tls>,
    /// With `--cluster`: the bus, and the hub's interest for it.
    cluster: Option<(Cluster, Arc<Interest>)>,
}

/// Re-reads the TLS files on demand (the binary calls it on SIGHUP); cheap to clone.
#[derive(Clone)]
pub struct TlsReloader {
    tls: Tls,
    metrics: Metrics,
}

impl TlsReloader {
    /// Re-reads certificate, key and client CA; on any problem logs it and keeps the
    /// ones in service. Returns whether the new files went into service.
    pub fn reload(&self) -> bool {
        match self.tls.reload() {
            Ok(served) => {
                self.metrics.tls_loaded(Some(served.not_after));
                tracing::info!(subject = %served.subject, not_after = %served.expiry(), "TLS certificates reloaded");
                true
            }
            Err(e) => {
                self.metrics.tls_loaded(None);
                tracing::error!(error = %e, "TLS reload refused; the previous certificates stay in service");
                false
            }
        }
    }
}

impl Server {
    /// Builds everything the config names and checks its input files; with
    /// `--cluster`, connects to the bus first.
    pub async fn build(config: Config) -> Result<Server, ServerError> {
        if !config.cluster.enabled() {
            return Server::new(config);
        }
        let cluster = Cluster::connect(&config.cluster, config.history_size).await?;
        let (hub, interest) = Hub::sequenced_by_cluster(hub_config(&config), cluster.epoch());
        let mut server = Server::with_hub(config, hub.clone())?;
        server.service = server
            .service
            .with_ingest(Ingest::Bus(hub, cluster.clone()));
        server.service.metrics().attach_cluster(cluster.clone());
        server.cluster = Some((cluster, interest));
        Ok(server)
    }

    /// Builds a single node (no `--cluster`) and checks its input files.
    pub fn new(config: Config) -> Result<Server, ServerError> {
        if config.cluster.enabled() {
            return Err(ServerError::ClusterNotConnected);
        }
        let hub = Hub::new(hub_config(&config));
        Server::with_hub(config, hub)
    }

    /// Like `new`, serving an existing hub (its symbols, seqs and last values), e.g. to
    /// restart the network side while the market state lives on. The hub's own limits
    /// stay as they were built.
    pub fn with_hub(config: Config, hub: Hub) -> Result<Server, ServerError> {
        let listed = match &config.symbols_file {
            Some(path) => Some(read_symbols_file(path)?),
            None => None,
        };
        let feed = match &config.feed {
            FeedKind::Sim => {
                let symbols = listed
                    .clone()
                    .unwrap_or_else(|| feed::sim_symbols(config.symbols));
                Some(Feed::Sim(Simulator::new(symbols, config.rate, config.seed)))
            }
            FeedKind::None => None,
            FeedKind::Replay(path) => Some(Feed::Replay(
                Replay::open(path.clone(), config.replay_speed, config.rate).map_err(|source| {
                    ServerError::ReplayFile {
                        path: path.clone(),
                        source,
                    }
                })?,
            )),
        };
        // Simulated symbols are known from the start, like a listed file's.
        let known = match (&listed, &feed) {
            (Some(listed), _) => listed.clone(),
            (None, Some(Feed::Sim(_))) => feed::sim_symbols(config.symbols),
            (None, _) => Vec::new(),
        };
        for s in &known {
            if let Err(e) = hub.declare(s) {
                tracing::warn!(symbol = %s, error = %e, "symbol not declared");
            }
        }
        let shutdown = Shutdown::new();
        let limits = ServiceLimits {
            session: SessionLimits {
                max_subscriptions: config.max_subscriptions_per_stream,
            },
            max_streams: config.max_streams,
        };
        let feed_rate = match &config.feed {
            FeedKind::Sim => config.rate,
            _ => 0.0,
        };
        let metrics = Metrics::new(hub.clone(), config.metrics_per_symbol, feed_rate);
        let tls = match config.tls() {
            Some(files) => {
                let (tls, served) = Tls::load(files)?;
                metrics.tls_loaded(Some(served.not_after));
                tracing::info!(
                    subject = %served.subject,
                    not_after = %served.expiry(),
                    mutual = tls.mutual(),
                    "TLS on"
                );
                Some(tls)
            }
            None => None,
        };
        let auth = match config.jwt() {
            Some(settings) => {
                let verifier = JwtVerifier::load(&settings)?;
                tracing::info!(algorithm = ?verifier.algorithm(), "JWT bearer auth on");
                Authenticator::jwt(verifier)
            }
            None => Authenticator::none(),
        };
        let service = TickerService::new(hub.clone(), limits, shutdown.clone(), metrics, auth);
        let metrics_listener = None;
        Ok(Server {
            config,
            hub,
            service,
            feed,
            shutdown,
            metrics_listener,
            web_listener: None,
            tls,
            cluster: None,
        })
    }

    /// The cluster's bus, with `--cluster`.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref().map(|(cluster, _)| cluster)
    }

    /// Serves /metrics, /healthz and /streams on `listener` too (`--metrics-listen`).
    pub fn metrics_listener(mut self, listener: TcpListener) -> Server {
        self.metrics_listener = Some(listener);
        self
    }

    /// Serves browsers on `listener` too (`--web-listen`): WebSocket, gRPC-Web, board.
    pub fn web_listener(mut self, listener: TcpListener) -> Server {
        self.web_listener = Some(listener);
        self
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    pub fn service(&self) -> &TickerService {
        &self.service
    }

    /// The TLS reload handle, when TLS is on.
    pub fn tls_reloader(&self) -> Option<TlsReloader> {
        self.tls.as_ref().map(|tls| TlsReloader {
            tls: tls.clone(),
            metrics: self.service.metrics().clone(),
        })
    }

    /// Serves on `listener` until `signal` resolves (or a cluster node's stream is lost:
    /// then this returns that error), then: health NOT_SERVING, open streams end with
    /// UNAVAILABLE "server shutting down", and this returns once they are gone or
    /// `--drain-timeout` has passed, whichever is first.
    pub async fn serve(
        self,
        listener: TcpListener,
        signal: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let reloader = self.tls_reloader();
        let Server {
            config,
            hub,
            service,
            feed,
            shutdown,
            metrics_listener,
            web_listener,
            tls,
            cluster,
        } = self;
        let ingest = service.ingest().clone();
        let bus = cluster.as_ref().map(|(cluster, _)| cluster.clone());
        let healthy = match cluster {
            Some((cluster, interest)) => cluster.start(
                hub.clone(),
                interest,
                config.allow_unknown_symbols,
                shutdown.token().clone(),
            ),
            None => watch::channel(true).1,
        };
        let metrics = service.metrics().clone();
        let admin_stop = CancellationToken::new();
        let _stop_admin_on_return = admin_stop.clone().drop_guard();
        if let Some(listener) = metrics_listener {
            let admin = admin::serve(
                listener,
                metrics.clone(),
                shutdown.clone(),
                healthy.clone(),
                admin_stop.clone(),
            );
            tokio::spawn(admin);
        }
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<TickerStreamServiceServer<TickerService>>()
            .await;
        tokio::spawn(follow_bus_health(
            healthy,
            health.clone(),
            shutdown.token().clone(),
        ));
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let reflection_v1 = InterceptedService::new(reflection_v1, service.guard());
        let reflection_v1alpha = InterceptedService::new(reflection_v1alpha, service.guard());
        let ticker = TickerStreamServiceServer::new(service.clone())
            .max_decoding_message_size(config.max_decoding_message_size)
            .max_encoding_message_size(config.max_encoding_message_size);

        let feed_task = feed.map(|f| f.spawn(ingest, shutdown.token().clone()));
        let prune = hub
            .clone()
            .prune_idle_conflations_every(config.prune_interval, shutdown.token().clone());
        tokio::spawn(prune);

        if let (Some(reloader), Some(every)) = (reloader, config.tls_reload_interval) {
            tokio::spawn(reload_every(reloader, every, shutdown.token().clone()));
        }
        let age = config.max_connection_age.map(|age| {
            let jitter = config.max_connection_age_jitter.clamp(0.0, 0.9);
            let seed = crate::clock::now_unix_nanos() as u64 ^ u64::from(std::process::id());
            let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(seed);
            let factor = 1.0 + rand::Rng::random_range(&mut rng, -jitter..=jitter);
            let age = age.mul_f64(factor);
            tracing::info!(?age, grace = ?config.max_connection_age_grace, "connections are recycled");
            age
        });
        let options = IncomingOptions {
            tcp_keepalive: config.tcp_keepalive,
            tls: tls.map(|tls| (tls, config.tls_handshake_timeout)),
            close_after: match config.http2 {
                Http2::Hyper => age.map(|age| age + config.max_connection_age_grace),
                Http2::Tickerd => None,
            },
        };
        let stop_accepting = CancellationToken::new();
        if let Some(listener) = web_listener {
            let web_incoming = IncomingOptions {
                tcp_keepalive: config.tcp_keepalive,
                close_after: None,
                tls: options
                    .tls
                    .as_ref()
                    .map(|(tls, bound)| (tls.for_web(), *bound)),
            };
            let router = web::router(
                service.clone(),
                WebOptions {
                    allowed_origins: config.web_allowed_origins.clone(),
                    auth_timeout: config.web_auth_timeout,
                    ping_interval: config.web_ping_interval,
                    tls: options.tls.is_some(),
                    max_decoding_message_size: config.max_decoding_message_size,
                    max_encoding_message_size: config.max_encoding_message_size,
                },
            );
            let incoming = Incoming::new(listener, web_incoming, metrics.clone());
            tokio::spawn(web::serve(incoming, router, stop_accepting.clone()));
        }
        let limits = MessageLimits {
            max_decoding: config.max_decoding_message_size,
            max_encoding: config.max_encoding_message_size,
        };
        let others = usize::from(config.io_threads) - 1;
        let incoming = Incoming::new(listener, options.clone(), metrics.clone());
        let serving: Pin<Box<dyn Future<Output = Result<(), ServerError>> + Send>> = match config
            .http2
        {
            Http2::Tickerd => {
                let routes = Routes::new(health_service)
                    .add_service(reflection_v1)
                    .add_service(reflection_v1alpha)
                    .add_service(ticker)
                    .prepare();
                let stack = http2::boxed(
                    RpcMetricsLayer::new(metrics.clone())
                        .layer(StreamRoutesLayer::new(service.clone(), limits).layer(routes)),
                );
                let h2 = http2::Options {
                    max_concurrent_streams: config.max_concurrent_streams,
                    max_header_list_size: config.http2_max_header_list_size,
                    keepalive_interval: config.http2_keepalive_interval,
                    keepalive_timeout: config.http2_keepalive_timeout,
                    max_pending_accept_reset_streams: config.http2_max_pending_accept_reset_streams,
                    max_local_error_reset_streams: config.http2_max_local_error_reset_streams,
                    max_connection_age: age.map(|age| (age, config.max_connection_age_grace)),
                    stream_window: http2::STREAM_WINDOW,
                    connection_window: http2::CONNECTION_WINDOW,
                    direct_publish: config.direct_publish,
                };
                let mut shards = Shards::start(others, &options, &metrics, &stop_accepting, {
                    let (stack, h2) = (Arc::clone(&stack), h2.clone());
                    move |incoming, stopping| {
                        http2::serve(incoming, Arc::clone(&stack), h2.clone(), stopping)
                    }
                })
                .map_err(ServerError::IoThread)?;
                let incoming = incoming.share_with(shards.hand_offs());
                let stopping = stop_accepting.clone().cancelled_owned();
                Box::pin(async move {
                    http2::serve(incoming, stack, h2, stopping).await?;
                    shards.join().await?;
                    Ok::<(), ServerError>(())
                })
            }
            Http2::Hyper => {
                let mut builder = tonic::transport::Server::builder();
                // The age alone: given a grace too, tonic 0.14 sleeps age + grace and
                // then drops the connection without a GOAWAY. Without one it sends
                // GOAWAY at the age, and `close_after` (above) ends the grace.
                if let Some(age) = age {
                    builder = builder.max_connection_age(age);
                }
                let router = builder
                    .max_concurrent_streams(config.max_concurrent_streams)
                    .http2_max_pending_accept_reset_streams(Some(
                        config.http2_max_pending_accept_reset_streams,
                    ))
                    .http2_max_local_error_reset_streams(Some(
                        config.http2_max_local_error_reset_streams,
                    ))
                    .http2_max_header_list_size(config.http2_max_header_list_size)
                    .http2_keepalive_interval(Some(config.http2_keepalive_interval))
                    .http2_keepalive_timeout(Some(config.http2_keepalive_timeout))
                    .tcp_nodelay(true)
                    .layer(RpcMetricsLayer::new(metrics.clone()))
                    .layer(StreamRoutesLayer::new(service.clone(), limits))
                    .add_service(health_service)
                    .add_service(reflection_v1)
                    .add_service(reflection_v1alpha)
                    .add_service(ticker);
                let mut shards = Shards::start(others, &options, &metrics, &stop_accepting, {
                    let router = router.clone();
                    move |incoming, stopping| {
                        router
                            .clone()
                            .serve_with_incoming_shutdown(incoming, stopping)
                    }
                })
                .map_err(ServerError::IoThread)?;
                let incoming = incoming.share_with(shards.hand_offs());
                let stopping = stop_accepting.clone().cancelled_owned();
                Box::pin(async move {
                    router
                        .serve_with_incoming_shutdown(incoming, stopping)
                        .await?;
                    // Only a stop ends this thread's serving without an error; the
                    // others follow.
                    shards.join().await?;
                    Ok::<(), ServerError>(())
                })
            }
        };
        let mut serving = serving;

        // A cluster node whose stream was deleted, recreated or purged stops as if signalled,
        // then says why (`Cluster::lost`).
        let stream_lost = async move {
            match bus {
                Some(bus) => bus.lost().await,
                None => std::future::pending().await,
            }
        };
        let lost = tokio::select! {
            result = &mut serving => {
                shutdown.trigger();
                return result;
            }
            _ = signal => None,
            e = stream_lost => Some(e),
        };
        tracing::info!(
            open_streams = service.active_streams(),
            drain_timeout = ?config.drain_timeout,
            "shutting down: draining streams"
        );
        health
            .set_not_serving::<TickerStreamServiceServer<TickerService>>()
            .await;
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        shutdown.trigger();
        stop_accepting.cancel();
        if let Some(task) = feed_task {
            task.abort();
        }
        match tokio::time::timeout(config.drain_timeout, &mut serving).await {
            Ok(result) => result?,
            Err(_) => tracing::warn!(
                open_streams = service.active_streams(),
                "drain timeout passed; closing the remaining streams"
            ),
        }
        tracing::info!("stopped");
        lost.map_or(Ok(()), |e| Err(e.into()))
    }
}

/// gRPC health of `ticker.v1.TickerStreamService` follows the bus: NOT_SERVING while a
/// cluster node is cut from it (so readiness checks move clients to healthy nodes),
/// SERVING again when it is back, until the drain, which owns the status from then on.
/// The server-wide status ("") stays SERVING: the process is alive, and a liveness
/// probe must not restart a node for an outage of NATS.
async fn follow_bus_health(
    mut healthy: watch::Receiver<bool>,
    health: tonic_health::server::HealthReporter,
    draining: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = draining.cancelled() => return,
            changed = healthy.changed() => if changed.is_err() { return },
        }
        let status = if *healthy.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if draining.is_cancelled() {
            return;
        }
        health
            .set_service_status("ticker.v1.TickerStreamService", status)
            .await;
    }
}

fn hub_config(config: &Config) -> HubConfig {
    HubConfig {
        history_size: config.history_size,
        history_ttl: config.history_ttl,
        channel_capacity: config.channel_capacity,
        max_symbols: config.max_symbols,
        allow_unknown_symbols: config.allow_unknown_symbols,
    }
}

async fn reload_every(reloader: TlsReloader, every: Duration, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(every.max(Duration::from_secs(1)));
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {
                reloader.reload();
            }
        }
    }
}

/// Reads `--symbols-file`: one symbol per line, blank lines and `#` comments skipped.
fn read_symbols_file(path: &PathBuf) -> Result<Vec<Symbol>, ServerError> {
    let text = std::fs::read_to_string(path).map_err(|source| ServerError::SymbolsFile {
        path: path.clone(),
        source,
    })?;
    let mut symbols = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let name = line.split('#').next().unwrap_or_default().trim();
        if name.is_empty() {
            continue;
        }
        symbol::validate(name).map_err(|e| ServerError::SymbolsFileLine {
            path: path.clone(),
            line: i + 1,
            reason: e.to_string(),
        })?;
        symbols.push(Symbol::from(name));
    }
    Ok(symbols)
}
