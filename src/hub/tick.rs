//! A tick as the hub keeps it: its fields, and its `TickerResponse` encoded and framed
//! once (`wire`), so every stream that sends it shares the same bytes.

use std::sync::Arc;

use bytes::Bytes;

use crate::{
    clock,
    pb::{ticker_response::Kind, TickerResponse},
    symbol::Symbol,
    wire::{grpc_framed, GRPC_PREFIX},
};

/// One accepted tick. Shared (`Arc`) by the last-value slot and every receiver.
#[derive(Debug)]
pub struct Tick {
    pub symbol: Symbol,
    pub seq: u64,
    pub epoch: u64,
    pub ltp: f64,
    pub event_time_unix_nanos: i64,
    /// The `TickerResponse` (kind KIND_TICK) as one gRPC message: the 5-byte prefix
    /// (uncompressed, length) and the protobuf bytes, encoded once. A stream with only
    /// this tick ready sends these very bytes.
    pub framed: Bytes,
}

impl Tick {
    /// The protobuf bytes of `framed`, without the gRPC prefix.
    pub fn encoded(&self) -> &[u8] {
        &self.framed[GRPC_PREFIX..]
    }

    /// This tick as a message of the given kind (snapshots, quotes).
    pub fn to_response(&self, kind: Kind) -> TickerResponse {
        TickerResponse {
            symbol: self.symbol.to_string(),
            ltp: self.ltp,
            timestamp: clock::rfc3339_nanos(self.event_time_unix_nanos),
            seq: self.seq,
            epoch: self.epoch,
            event_time_unix_nanos: self.event_time_unix_nanos,
            kind: kind as i32,
            ..Default::default()
        }
    }
}

pub(super) fn encode_tick(
    symbol: &Symbol,
    seq: u64,
    epoch: u64,
    ltp: f64,
    event_time_unix_nanos: i64,
) -> Tick {
    let msg = TickerResponse {
        symbol: symbol.to_string(),
        ltp,
        timestamp: clock::rfc3339_nanos(event_time_unix_nanos),
        seq,
        epoch,
        event_time_unix_nanos,
        ..Default::default()
    };
    Tick {
        symbol: Arc::clone(symbol),
        seq,
        epoch,
        ltp,
        event_time_unix_nanos,
        framed: grpc_framed(&msg),
    }
}
