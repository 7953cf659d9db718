//! Transports: how sessions reach clients. Below them the sessions (`session`), above
//! them the server that mounts them (`server`).
//!
//! - `grpc`: the `ticker.v1` service, its codecs, and the response body that writes
//!   TickerStream and Subscribe straight from their sessions.
//! - `http2`: the server's own HTTP/2 connections: one task and one write buffer per
//!   connection for all its streams (`--http2 tickerd`, the default).
//! - `incoming`: accepted connections (TCP options, bounded TLS handshakes, the peer's
//!   identity, the connection count); `tls` the certificates behind them, reloadable;
//!   `shards` the extra `--io-threads`; `devcerts` development certificates.
//! - `web`: the browsers' listener: WebSocket sessions, gRPC-Web, the board page.

pub mod devcerts;
pub mod grpc;
pub mod http2;
pub mod incoming;
pub mod shards;
pub mod tls;
pub mod web;
