//! tickerd: a real-time market-data fan-out server over gRPC.
//!
//! Data flows feed → [`hub`] (per-symbol rings, last value, seq) → [`session`] (one
//! client stream) → [`service`] (gRPC status mapping, [`auth`] per call) → [`server`]
//! (limits, lifecycle; [`tls`] and [`incoming`] for connections).
//! [`client`] holds what the `ticker` CLI and the tests use to talk to a server.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod cli;
pub mod client;
pub mod clock;
pub mod codec;
pub mod config;
pub mod conflator;
pub mod devcerts;
pub mod feed;
pub mod hub;
pub mod incoming;
pub mod loadgen;
pub mod metrics;
pub mod observe;
pub mod server;
pub mod service;
pub mod session;
pub mod shards;
pub mod shutdown;
pub mod stream_routes;
pub mod symbol;
pub mod telemetry;
pub mod tls;

/// The `ticker.v1` contract: messages and client (prost), server trait (tonic-build).
#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("ticker.v1");
    include!(concat!(
        env!("OUT_DIR"),
        "/ticker.v1.TickerStreamService.rs"
    ));

    /// Encoded `FileDescriptorSet` of `proto/`, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/ticker_descriptor.bin"));
}
