//! How ticks look on the bus: one subject per symbol (`{stream}.t.{symbol}`), and a
//! protobuf `TickerResponse` payload carrying symbol, price, seq and event time. The
//! sequencer writes them; syncs and quotes read them.

use bytes::Bytes;
use prost::Message;

use crate::{
    clock,
    pb::{ticker_response::Kind, TickerResponse},
};

/// Every symbol's subject of the stream `name`.
pub(super) fn all_subjects(name: &str) -> String {
    format!("{name}.t.>")
}

/// The subject of `symbol`. Symbols may hold `.`, NATS's token separator, and could
/// then make empty tokens (`A..B`), so it is written `%2E` (`%` is no symbol
/// character, so the mapping is one to one).
pub(super) fn subject(name: &str, symbol: &str) -> String {
    format!("{name}.t.{}", symbol.replace('.', "%2E"))
}

/// Where the stream republishes each stored tick of `symbol` (a plain subject, so a
/// node following it costs the bus one message, not a consumer).
pub(super) fn republished(name: &str, symbol: &str) -> String {
    format!("{name}.r.{}", symbol.replace('.', "%2E"))
}

/// The republish mapping of the stream `name`: every tick subject to its `republished`.
pub(super) fn republish(name: &str) -> (String, String) {
    (all_subjects(name), format!("{name}.r.>"))
}

/// A tick as the bus carries it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct BusTick {
    pub symbol: String,
    pub seq: u64,
    pub ltp: f64,
    pub event_time: i64,
}

pub(super) fn encode(tick: &BusTick) -> Bytes {
    TickerResponse {
        symbol: tick.symbol.clone(),
        ltp: tick.ltp,
        seq: tick.seq,
        event_time_unix_nanos: tick.event_time,
        ..Default::default()
    }
    .encode_to_vec()
    .into()
}

/// `None` for a payload that is not a tick (written by something else than tickerd).
pub(super) fn decode(payload: &[u8]) -> Option<BusTick> {
    let msg = TickerResponse::decode(payload).ok()?;
    (msg.seq > 0 && !msg.symbol.is_empty()).then_some(BusTick {
        symbol: msg.symbol,
        seq: msg.seq,
        ltp: msg.ltp,
        event_time: msg.event_time_unix_nanos,
    })
}

/// A tick from the bus as a KIND_SNAPSHOT of `epoch`.
pub(super) fn snapshot(tick: BusTick, epoch: u64) -> TickerResponse {
    TickerResponse {
        timestamp: clock::rfc3339_nanos(tick.event_time),
        symbol: tick.symbol,
        ltp: tick.ltp,
        seq: tick.seq,
        epoch,
        event_time_unix_nanos: tick.event_time,
        kind: Kind::Snapshot as i32,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_map_to_one_subject_each() {
        assert_eq!(subject("TICKERD", "BRK.B"), "TICKERD.t.BRK%2EB");
        assert_eq!(subject("M", "A..B"), "M.t.A%2E%2EB");
        assert_eq!(subject("M", "^GSPC:X/Y"), "M.t.^GSPC:X/Y");
        assert_ne!(subject("M", "A.B"), subject("M", "A_B"));
    }

    #[test]
    fn a_tick_round_trips_and_junk_is_not_a_tick() {
        let tick = BusTick {
            symbol: "A".into(),
            seq: 3,
            ltp: 1.5,
            event_time: 7,
        };
        assert_eq!(decode(&encode(&tick)), Some(tick));
        assert_eq!(decode(b"\xff\xff"), None);
        assert_eq!(decode(b""), None);
    }
}
