//! The integration tests, as one test binary: each file beside this one is a module
//! (`cargo test --test suite cluster::` runs one), sharing `common/`, the one harness.
//! One binary compiles the harness once and links once (a binary per file would do
//! both eighteen times: a clean `cargo test --no-run` took 317 s that way, 213 s this
//! way, on the 2-core VM, 2026-12-06). Two stay apart: `abuse.rs`, whose memory bound
//! is measured on the whole process and so must not share it with other tests, and
//! `soak/`, which `tests/run.sh` runs on its own for a set time.

mod common;

mod auth;
mod backpressure;
mod board;
mod cli;
mod cluster;
mod delivery;
mod direct;
mod grpc_web;
mod grpcurl;
mod http2;
mod interop;
mod loadgen;
mod metrics;
mod rpcs;
mod server;
mod ticker_stream;
mod tls;
mod web;
