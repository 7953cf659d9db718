//! tickerd: a real-time market-data fan-out server over gRPC.
//!
//! The modules follow a tick's path. [`feed`] (simulator, CSV replay) and the Publish
//! RPC write into the [`hub`] (per-symbol seq, last value, history, rings, CONFLATE
//! folds); a [`session`] is one client stream draining the hub under backpressure
//! (subscriptions, policies, lag notices); a [`transport`] carries sessions to clients
//! (gRPC with its own response body; connections, TLS and I/O threads); the [`server`]
//! assembles them (flags, limits, health, lifecycle). With `--cluster`, [`cluster`] sits
//! beside the hub as its source of ticks (NATS JetStream orders and stores them; feeds
//! and Publish write through `cluster::Ingest`). [`auth`] decides who may do what;
//! [`ops`] is what operators see (metrics, the HTTP endpoint, RPC accounting, logs).
//! [`wire`] is gRPC's message framing, shared by the hub's encode-once ticks and the
//! transports. [`client`], [`cli`] and [`loadgen`] are the client side.
//!
//! Dependencies run one way, from the server down: server → transport → session →
//! hub → wire, with `cluster` between the transports and feeds above it and the hub
//! below; `auth`, `ops`, `clock`, `symbol` and `shutdown` sit beside, imported by the
//! layers above them.
#![forbid(unsafe_code)]

pub mod auth;
pub mod cli;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod feed;
pub mod hub;
pub mod loadgen;
pub mod ops;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod symbol;
pub mod transport;
pub mod wire;

/// The `ticker.v1` contract: messages and client (prost), server trait (tonic-build).
#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("ticker.v1");
    // The proto3 JSON mapping (pbjson): int64 as strings, enum names, lowerCamelCase.
    include!(concat!(env!("OUT_DIR"), "/ticker.v1.serde.rs"));
    include!(concat!(
        env!("OUT_DIR"),
        "/ticker.v1.TickerStreamService.rs"
    ));

    /// Encoded `FileDescriptorSet` of `proto/`, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/ticker_descriptor.bin"));
}
