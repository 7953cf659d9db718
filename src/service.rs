//! The `ticker.v1.TickerStreamService` implementation: the only place that speaks
//! `tonic::Status`. It validates requests, admits streams under the server-wide cap and
//! hands them to sessions (streams) or the hub (Publish, GetQuotes). The server mounts it.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    hub::Hub,
    metrics::{ended, Metrics, StreamTicket},
    pb::{
        ticker_response::Kind, ticker_stream_service_server::TickerStreamService, GetQuotesRequest,
        GetQuotesResponse, PublishRequest, PublishResponse, SubscribeRequest, TickerRequest,
    },
    session::{Session, SessionLimits},
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
    limits: ServiceLimits,
    streams: Arc<Semaphore>,
    shutdown: Shutdown,
    metrics: Metrics,
}

impl TickerService {
    /// `shutdown` ends every open stream with UNAVAILABLE when cancelled.
    pub fn new(
        hub: Hub,
        limits: ServiceLimits,
        shutdown: Shutdown,
        metrics: Metrics,
    ) -> TickerService {
        let streams = Arc::new(Semaphore::new(limits.max_streams));
        TickerService {
            hub,
            limits,
            streams,
            shutdown,
            metrics,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Streams open right now (TickerStream, Subscribe, Publish).
    pub fn active_streams(&self) -> usize {
        self.limits.max_streams - self.streams.available_permits()
    }

    /// A ticket for a new stream of `rpc`, or why there is none.
    fn admit<T>(&self, rpc: &'static str, request: &Request<T>) -> Result<StreamTicket, Status> {
        if self.shutdown.is_triggered() {
            return Err(Status::unavailable("server shutting down"));
        }
        let permit = Arc::clone(&self.streams).try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "server stream limit reached ({} open streams); retry later",
                self.limits.max_streams
            ))
        })?;
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        // Until authentication exists every caller is anonymous.
        Ok(self
            .metrics
            .ticket(rpc, peer, "anonymous".to_string(), permit))
    }

    fn session(&self, ticket: StreamTicket, requests: Option<Streaming<TickerRequest>>) -> Session {
        Session::new(
            self.hub.clone(),
            self.limits.session,
            requests,
            self.shutdown.clone(),
            ticket,
        )
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
        let ticket = self.admit("TickerStream", &request)?;
        Ok(Response::new(
            self.session(ticket, Some(request.into_inner())),
        ))
    }

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Session>, Status> {
        let symbols = &request.get_ref().symbols;
        Self::check_symbols(symbols, self.limits.session.max_subscriptions)?;
        if !self.hub.config().allow_unknown_symbols {
            if let Some(unknown) = symbols.iter().find(|s| !self.hub.is_known(s)) {
                return Err(Status::not_found(format!("unknown symbol {unknown:?}")));
            }
        }
        let ticket = self.admit("Subscribe", &request)?;
        let mut session = self.session(ticket, None);
        for s in &request.into_inner().symbols {
            session.subscribe(s);
        }
        Ok(Response::new(session))
    }

    async fn publish(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<PublishResponse>, Status> {
        let mut ticket = self.admit("Publish", &request)?;
        let mut requests = request.into_inner();
        let mut counts = PublishResponse::default();
        loop {
            let next = tokio::select! {
                biased;
                _ = self.shutdown.token().cancelled() => {
                    ticket.reason = ended::SHUTDOWN;
                    return Err(Status::unavailable(format!(
                        "server shutting down ({} accepted, {} rejected before it)",
                        counts.accepted, counts.rejected
                    )));
                }
                next = requests.message() => next,
            };
            match next {
                Ok(Some(tick)) => {
                    match self
                        .hub
                        .publish(&tick.symbol, tick.ltp, tick.event_time_unix_nanos)
                    {
                        Ok(_) => counts.accepted += 1,
                        Err(e) => {
                            tracing::debug!(symbol = %tick.symbol, error = %e, "publish rejected");
                            counts.rejected += 1;
                        }
                    }
                }
                Ok(None) => {
                    ticket.reason = ended::COMPLETED;
                    return Ok(Response::new(counts));
                }
                Err(status) => {
                    ticket.reason = ended::CLIENT_ERROR;
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
        let symbols = request.into_inner().symbols;
        Self::check_symbols(&symbols, MAX_QUOTE_SYMBOLS)?;
        let quotes = symbols
            .iter()
            .filter_map(|s| self.hub.last(s))
            .map(|tick| tick.to_response(Kind::Snapshot))
            .collect();
        Ok(Response::new(GetQuotesResponse { quotes }))
    }
}
