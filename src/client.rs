//! Client side of `ticker.v1`, for the `ticker` CLI, tests and embedding programs:
//! connecting, and request constructors that read like the protocol.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::pb::{
    ticker_request::{Action, DeliveryPolicy},
    ticker_stream_service_client::TickerStreamServiceClient,
    PublishRequest, TickerRequest,
};

pub use crate::pb::ticker_response::Kind;

/// A connected client.
pub type Client = TickerStreamServiceClient<Channel>;

/// Connects to `url` (`http://host:port`) with HTTP/2 keepalive, so a dead server is
/// noticed within seconds.
pub async fn connect(url: impl Into<String>) -> Result<Client, tonic::transport::Error> {
    let channel = endpoint(url)?.connect().await?;
    Ok(TickerStreamServiceClient::new(channel))
}

/// The endpoint `connect` uses, for callers that need to adjust it further.
///
/// Windows: h2 (>= 0.4.16) closes a connection once unread small DATA frames exceed a
/// budget of half the connection window. A 16 MiB connection window with 1 MiB stream
/// windows keeps even three fully stalled streams (a paused terminal, say) under it,
/// whatever the server's framing.
pub fn endpoint(url: impl Into<String>) -> Result<Endpoint, tonic::transport::Error> {
    Ok(quiet_endpoint(url)?
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true))
}

/// `endpoint` without keepalive PINGs, for connections that must outlive a strict
/// server's ping policy: grpc-go servers allow one PING per 5 minutes by default and
/// close a connection that pings more often while they send it nothing
/// (`too_many_pings`), as a publish-only connection is. The load generator uses it.
pub fn quiet_endpoint(url: impl Into<String>) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.into())?
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(16 << 20)
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true))
}

impl TickerRequest {
    pub fn subscribe(symbol: impl Into<String>) -> TickerRequest {
        TickerRequest {
            symbol: symbol.into(),
            action: Action::Subscribe as i32,
            ..TickerRequest::default()
        }
    }

    pub fn unsubscribe(symbol: impl Into<String>) -> TickerRequest {
        TickerRequest {
            symbol: symbol.into(),
            action: Action::Unsubscribe as i32,
            ..TickerRequest::default()
        }
    }

    /// This subscribe, resuming after `seq` of `epoch` (the last tick this client saw).
    pub fn resume(mut self, epoch: u64, seq: u64) -> TickerRequest {
        self.epoch = epoch;
        self.resume_from_seq = seq;
        self
    }

    /// This subscribe with DELIVERY_POLICY_CONFLATE at most `max_rate_hz` messages/s.
    pub fn conflate(mut self, max_rate_hz: f64) -> TickerRequest {
        self.policy = DeliveryPolicy::Conflate as i32;
        self.max_rate_hz = max_rate_hz;
        self
    }

    /// This subscribe with DELIVERY_POLICY_STRICT: lossless, or the stream ends.
    pub fn strict(mut self) -> TickerRequest {
        self.policy = DeliveryPolicy::Strict as i32;
        self
    }

    /// Replaces this stream's token (same subject) without touching subscriptions.
    pub fn refresh_token(token: impl Into<String>) -> TickerRequest {
        TickerRequest {
            token: token.into(),
            ..TickerRequest::default()
        }
    }
}

impl PublishRequest {
    /// A tick stamped by the server on arrival.
    pub fn new(symbol: impl Into<String>, ltp: f64) -> PublishRequest {
        PublishRequest {
            symbol: symbol.into(),
            ltp,
            event_time_unix_nanos: 0,
        }
    }
}
