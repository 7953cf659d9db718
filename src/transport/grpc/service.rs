//! The `ticker.v1.TickerStreamService` implementation: the only place that maps
//! outcomes to `tonic::Status`. It authenticates every call (`auth`), validates requests, checks
//! entitlements, admits streams under the server-wide cap and hands them to sessions
//! (streams) or the hub (Publish, GetQuotes). The server mounts it, and puts
//! reflection behind the same `AuthGuard`.

use std::sync::Arc;

use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::Semaphore;
use tonic::{service::Interceptor, Request, Response, Status, Streaming};

use crate::{
    auth::{Authenticator, PeerInfo, Principal},
    clock,
    cluster::{Ack, Ingest, IngestError},
    hub::{Hub, Source},
    ops::metrics::{ended, Metrics, StreamTicket},
    pb::{
        ticker_response::Kind, ticker_stream_service_server::TickerStreamService, GetQuotesRequest,
        GetQuotesResponse, PublishRequest, PublishResponse, SubscribeRequest, TickerRequest,
        TickerResponse,
    },
    session::{Caller, Requests, Session, SessionLimits},
    shutdown::Shutdown,
    symbol,
};

/// Most symbols one GetQuotes may name.
pub const MAX_QUOTE_SYMBOLS: usize = 1000;

/// Service limits; see the matching `--` flags in `config`.
#[derive(Debug, Clone, Copy)]
pub struct ServiceLimits {
    pub session: SessionLimits,
    /// Open TickerStream, Subscribe and Publish calls, server-wide.
    pub max_streams: usize,
}

/// The service; cheap to clone (tonic clones it per connection).
#[derive(Clone)]
pub struct TickerService {
    hub: Hub,
    /// Where Publish writes: the hub, or the cluster's bus.
    ingest: Ingest,
    limits: ServiceLimits,
    streams: Arc<Semaphore>,
    shutdown: Shutdown,
    metrics: Metrics,
    auth: Authenticator,
}

/// What every caller is told when its credentials are refused; the reason goes to the
/// log and `tickerd_auth_failures_total`, never to a prober.
pub const UNAUTHENTICATED: &str = "missing or invalid credentials";

impl TickerService {
    /// `shutdown` ends every open stream with UNAVAILABLE when cancelled.
    pub fn new(
        hub: Hub,
        limits: ServiceLimits,
        shutdown: Shutdown,
        metrics: Metrics,
        auth: Authenticator,
    ) -> TickerService {
        let streams = Arc::new(Semaphore::new(limits.max_streams));
        TickerService {
            ingest: Ingest::Hub(hub.clone()),
            hub,
            limits,
            streams,
            shutdown,
            metrics,
            auth,
        }
    }

    /// Where Publish writes.
    pub fn ingest(&self) -> &Ingest {
        &self.ingest
    }

    /// Publishes through `ingest` (a cluster's bus) instead of the hub.
    pub fn with_ingest(mut self, ingest: Ingest) -> TickerService {
        self.ingest = ingest;
        self
    }

    /// Whether `symbol` may be subscribed without `--allow-unknown-symbols`: it ticked
    /// (here, or on the cluster's bus) or was declared.
    async fn is_known(&self, symbol: &str) -> Result<bool, Status> {
        match self.ingest.cluster() {
            None => Ok(self.hub.is_known(symbol)),
            Some(_) if self.hub.is_declared(symbol) || self.hub.last(symbol).is_some() => Ok(true),
            Some(cluster) => Ok(cluster.last(symbol).await.map_err(bus_status)?.is_some()),
        }
    }

    /// The last tick of `symbol` as a snapshot: the hub's, or on a node that does not
    /// follow the symbol, the bus's.
    async fn quote(&self, symbol: &str) -> Result<Option<TickerResponse>, Status> {
        match self.ingest.cluster() {
            Some(cluster) if !self.hub.is_live(symbol) => {
                cluster.last(symbol).await.map_err(bus_status)
            }
            _ => Ok(self.hub.last(symbol).map(|t| t.to_response(Kind::Snapshot))),
        }
    }

    /// An interceptor that lets through only callers this service would accept (for
    /// reflection: it describes the API to the same callers that may use it).
    pub fn guard(&self) -> AuthGuard {
        AuthGuard {
            auth: self.auth.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// The caller of `request`, or UNAUTHENTICATED.
    fn caller<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        authenticate(&self.auth, &self.metrics, request)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Streams open right now (TickerStream, Subscribe, Publish).
    pub fn active_streams(&self) -> usize {
        self.limits.max_streams - self.streams.available_permits()
    }

    /// A ticket for a new stream of `rpc`, or why there is none.
    fn admit<T>(
        &self,
        rpc: &'static str,
        request: &Request<T>,
        principal: &Principal,
    ) -> Result<StreamTicket, Status> {
        self.admit_peer(rpc, peer_addr(request), principal)
    }

    fn admit_peer(
        &self,
        rpc: &'static str,
        peer: String,
        principal: &Principal,
    ) -> Result<StreamTicket, Status> {
        if self.shutdown.is_triggered() {
            return Err(Status::unavailable("server shutting down"));
        }
        let permit = Arc::clone(&self.streams).try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "server stream limit reached ({} open streams); retry later",
                self.limits.max_streams
            ))
        })?;
        Ok(self
            .metrics
            .ticket(rpc, peer, principal.name.clone(), permit))
    }

    /// A TickerStream session for a transport that authenticated its caller itself
    /// (WebSocket): admitted under the same stream cap, listed under `rpc`.
    pub fn open_session(
        &self,
        rpc: &'static str,
        peer: String,
        principal: Principal,
        requests: Requests,
    ) -> Result<Session, Status> {
        let ticket = self.admit_peer(rpc, peer, &principal)?;
        Ok(self.session(ticket, Some(requests), principal))
    }

    pub fn authenticator(&self) -> &Authenticator {
        &self.auth
    }

    /// Counts and logs refused credentials; what the caller is told is `UNAUTHENTICATED`.
    pub fn refused(&self, peer: &str, e: &crate::auth::AuthError) {
        self.metrics.auth_failure(e.reason());
        tracing::warn!(%peer, reason = e.reason(), error = %e, "credentials refused");
    }

    fn session(
        &self,
        ticket: StreamTicket,
        requests: Option<Requests>,
        principal: Principal,
    ) -> Session {
        let caller = Caller {
            principal,
            auth: self.auth.clone(),
        };
        Session::new(
            self.hub.clone(),
            self.limits.session,
            requests,
            self.shutdown.clone(),
            ticket,
            caller,
        )
    }

    /// PERMISSION_DENIED for the first of `symbols` the caller may not see.
    fn check_entitled(principal: &Principal, symbols: &[String]) -> Result<(), Status> {
        match symbols.iter().find(|s| !principal.entitled(s)) {
            Some(s) => Err(Status::permission_denied(format!("not entitled to {s}"))),
            None => Ok(()),
        }
    }

    /// Checks a symbol list shared by Subscribe and GetQuotes.
    fn check_symbols(symbols: &[String], max: usize) -> Result<(), Status> {
        if symbols.is_empty() {
            return Err(Status::invalid_argument("symbols must not be empty"));
        }
        if symbols.len() > max {
            return Err(Status::invalid_argument(format!(
                "too many symbols: {} given, at most {max} per request",
                symbols.len()
            )));
        }
        for s in symbols {
            symbol::validate(s).map_err(|e| Status::invalid_argument(format!("{s:?}: {e}")))?;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl TickerStreamService for TickerService {
    type TickerStreamStream = Session;
    type SubscribeStream = Session;

    async fn ticker_stream(
        &self,
        request: Request<Streaming<TickerRequest>>,
    ) -> Result<Response<Session>, Status> {
        let principal = self.caller(&request)?;
        let ticket = self.admit("TickerStream", &request, &principal)?;
        let requests: Requests = Box::pin(request.into_inner().map(|r| r.map_err(blame_client)));
        Ok(Response::new(self.session(
            ticket,
            Some(requests),
            principal,
        )))
    }

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Session>, Status> {
        let principal = self.caller(&request)?;
        let symbols = &request.get_ref().symbols;
        Self::check_symbols(symbols, self.limits.session.max_subscriptions)?;
        Self::check_entitled(&principal, symbols)?;
        if !self.hub.config().allow_unknown_symbols {
            for s in symbols {
                if !self.is_known(s).await? {
                    return Err(Status::not_found(format!("unknown symbol {s:?}")));
                }
            }
        }
        let ticket = self.admit("Subscribe", &request, &principal)?;
        let mut session = self.session(ticket, None, principal);
        for s in &request.into_inner().symbols {
            session.subscribe(s);
        }
        Ok(Response::new(session))
    }

    async fn publish(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<PublishResponse>, Status> {
        let principal = self.caller(&request)?;
        if !principal.can_publish {
            return Err(Status::permission_denied(
                "publishing needs the `publish` scope in the token",
            ));
        }
        let mut ticket = self.admit("Publish", &request, &principal)?;
        let mut requests = request.into_inner();
        let mut counts = PublishResponse::default();
        let expiry = expiry_of(&principal);
        tokio::pin!(expiry);
        // Ticks handed to the bus and not confirmed stored yet (a cluster pipelines).
        let mut waiting = FuturesUnordered::new();
        loop {
            let next = tokio::select! {
                biased;
                Some(stored) = waiting.next(), if !waiting.is_empty() => {
                    if let Err(status) = tally(&mut counts, stored) {
                        ticket.reason = ended::CLIENT_ERROR;
                        return Err(status);
                    }
                    continue;
                }
                _ = self.shutdown.token().cancelled() => {
                    ticket.reason = ended::SHUTDOWN;
                    return Err(Status::unavailable(format!(
                        "server shutting down ({} accepted, {} rejected before it)",
                        counts.accepted, counts.rejected
                    )));
                }
                _ = &mut expiry => {
                    ticket.reason = ended::AUTH_EXPIRY;
                    return Err(Status::unauthenticated(format!(
                        "token expired ({} accepted, {} rejected before it)",
                        counts.accepted, counts.rejected
                    )));
                }
                next = requests.message(), if waiting.len() < PUBLISH_WINDOW => next,
            };
            match next {
                Ok(Some(tick)) if !principal.entitled(&tick.symbol) => {
                    tracing::debug!(symbol = %tick.symbol, "publish rejected: not entitled");
                    counts.rejected += 1;
                }
                Ok(Some(tick)) => {
                    let ack = self
                        .ingest
                        .submit(
                            Source::Publish,
                            &tick.symbol,
                            tick.ltp,
                            tick.event_time_unix_nanos,
                        )
                        .await;
                    let done = match ack {
                        Ack::Done(result) => result,
                        Ack::Waiting(stored) => {
                            waiting.push(stored.stored());
                            continue;
                        }
                    };
                    if let Err(status) = tally(&mut counts, done) {
                        ticket.reason = ended::CLIENT_ERROR;
                        return Err(status);
                    }
                }
                Ok(None) => {
                    while let Some(stored) = waiting.next().await {
                        if let Err(status) = tally(&mut counts, stored) {
                            ticket.reason = ended::CLIENT_ERROR;
                            return Err(status);
                        }
                    }
                    ticket.reason = ended::COMPLETED;
                    return Ok(Response::new(counts));
                }
                Err(status) => {
                    ticket.reason = ended::CLIENT_ERROR;
                    let status = blame_client(status);
                    let msg = format!(
                        "{} ({} accepted, {} rejected before it)",
                        status.message(),
                        counts.accepted,
                        counts.rejected
                    );
                    return Err(Status::new(status.code(), msg));
                }
            }
        }
    }

    async fn get_quotes(
        &self,
        request: Request<GetQuotesRequest>,
    ) -> Result<Response<GetQuotesResponse>, Status> {
        let principal = self.caller(&request)?;
        let symbols = request.into_inner().symbols;
        Self::check_symbols(&symbols, MAX_QUOTE_SYMBOLS)?;
        Self::check_entitled(&principal, &symbols)?;
        let mut quotes = Vec::with_capacity(symbols.len());
        for s in &symbols {
            quotes.extend(self.quote(s).await?);
        }
        Ok(Response::new(GetQuotesResponse { quotes }))
    }
}

/// tonic reports a request stream that ends inside a message (its length prefix
/// announced more than was sent) as INTERNAL; it is the client's fault.
fn blame_client(status: Status) -> Status {
    if status.code() == tonic::Code::Internal && status.message().starts_with("Unexpected EOF") {
        return Status::invalid_argument(
            "the request stream ended inside a message: its length prefix announced more \
             bytes than were sent",
        );
    }
    status
}

/// Ticks of one Publish call the bus may still be storing; past it the call reads no
/// further request until some are confirmed (backpressure to the publisher).
const PUBLISH_WINDOW: usize = 1024;

/// Counts one tick's outcome; a bus that cannot be reached ends the call.
fn tally(counts: &mut PublishResponse, outcome: Result<u64, IngestError>) -> Result<(), Status> {
    match outcome {
        Ok(_) => counts.accepted += 1,
        Err(IngestError::Rejected(reason)) => {
            tracing::debug!(%reason, "published tick rejected");
            counts.rejected += 1;
        }
        Err(IngestError::Unavailable(reason)) => {
            return Err(Status::unavailable(format!(
                "{reason} ({} accepted, {} rejected before it)",
                counts.accepted, counts.rejected
            )));
        }
    }
    Ok(())
}

fn bus_status(e: IngestError) -> Status {
    Status::unavailable(e.to_string())
}

/// Resolves when the principal's credentials expire; never for ones that do not.
async fn expiry_of(principal: &Principal) {
    match principal.expires {
        Some(at) => tokio::time::sleep(clock::time_left(at)).await,
        None => std::future::pending().await,
    }
}

fn peer_addr<T>(request: &Request<T>) -> String {
    request
        .extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.addr)
        .map_or_else(|| "unknown".to_string(), |a| a.to_string())
}

fn authenticate<T>(
    auth: &Authenticator,
    metrics: &Metrics,
    request: &Request<T>,
) -> Result<Principal, Status> {
    let peer = request.extensions().get::<PeerInfo>();
    auth.authenticate(request.metadata(), peer).map_err(|e| {
        metrics.auth_failure(e.reason());
        tracing::warn!(
            peer = %peer_addr(request),
            reason = e.reason(),
            error = %e,
            "credentials refused"
        );
        Status::unauthenticated(UNAUTHENTICATED)
    })
}

/// Lets through only authenticated callers; see `TickerService::guard`.
#[derive(Clone)]
pub struct AuthGuard {
    auth: Authenticator,
    metrics: Metrics,
}

impl Interceptor for AuthGuard {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        authenticate(&self.auth, &self.metrics, &request)?;
        Ok(request)
    }
}
