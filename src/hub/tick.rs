//! A tick as the hub keeps it: its fields, and its `TickerResponse` encoded and framed
//! once (`wire`), so every stream that sends it shares the same bytes.

use std::sync::{Arc, OnceLock};

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
    /// The same message in the proto3 JSON mapping, made by the first WebSocket session
    /// that sends it, then shared like `framed`.
    json: OnceLock<Bytes>,
}

impl Tick {
    /// The protobuf bytes of `framed`, without the gRPC prefix.
    pub fn encoded(&self) -> &[u8] {
        &self.framed[GRPC_PREFIX..]
    }

    /// The KIND_TICK message as proto3 JSON (one WebSocket text frame).
    pub fn json(&self) -> &Bytes {
        self.json.get_or_init(|| {
            // Serializing plain fields into a Vec cannot fail.
            Bytes::from(serde_json::to_vec(&self.to_response(Kind::Tick)).unwrap_or_default())
        })
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
        json: OnceLock::new(),
    }
}
