//! The load generator's side of the wire: opens a TickerStream through tonic with a codec
//! that decodes only what `reader` counts (kind, symbol, seq, event time, dropped),
//! without allocating, so the tool measuring a server costs less CPU than the server.
//! Neighbours: `reader` consumes the `Seen` values, `mod.rs` names the symbols.

use std::sync::Arc;

use bytes::Buf;
use prost::{
    encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType},
    DecodeError,
};
use tonic::{
    codec::{BufferSettings, Codec, DecodeBuf, Decoder, Streaming},
    transport::Channel,
    IntoStreamingRequest, Status,
};

use crate::pb::{ticker_response::Kind, TickerRequest};

/// The run's symbols by index; names are looked up without hashing or allocating.
#[derive(Debug)]
pub struct SymbolTable {
    names: Vec<String>,
}

impl SymbolTable {
    /// The symbols `B000`, `B001`, …: `count` of them, at least one.
    pub fn numbered(count: usize) -> SymbolTable {
        SymbolTable {
            names: (0..count.max(1)).map(|i| format!("B{i:03}")).collect(),
        }
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// The index of `name`, or None for a symbol this run never named.
    pub fn find(&self, name: &[u8]) -> Option<usize> {
        let digits = name.strip_prefix(b"B")?;
        if digits.is_empty() || digits.len() > 9 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let i = digits
            .iter()
            .fold(0usize, |n, d| n * 10 + usize::from(d - b'0'));
        (self.names.get(i)?.as_bytes() == name).then_some(i)
    }
}

/// What the load generator keeps of one TickerResponse.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Seen {
    pub kind: i32,
    /// Index in the `SymbolTable`; None for a symbol it does not hold (or none).
    pub symbol: Option<usize>,
    pub seq: u64,
    pub event_time_unix_nanos: i64,
    pub dropped: u64,
    /// Only for KIND_REJECTED, the one message whose text the report shows.
    pub detail: String,
}

impl Seen {
    pub fn kind(&self) -> Kind {
        Kind::try_from(self.kind).unwrap_or(Kind::Tick)
    }

    /// Decodes the fields the load generator uses and skips the rest.
    pub fn decode(buf: &mut impl Buf, table: &SymbolTable) -> Result<Seen, WireError> {
        let mut seen = Seen::default();
        let mut detail: Option<Vec<u8>> = None;
        while buf.has_remaining() {
            let (tag, wire_type) = decode_key(buf)?;
            match (tag, wire_type) {
                (1, WireType::LengthDelimited) => {
                    let len = length(buf)?;
                    seen.symbol = if buf.chunk().len() >= len {
                        let i = table.find(&buf.chunk()[..len]);
                        buf.advance(len);
                        i
                    } else {
                        table.find(&buf.copy_to_bytes(len))
                    };
                }
                (4, WireType::Varint) => seen.seq = decode_varint(buf)?,
                (5, WireType::Varint) => seen.event_time_unix_nanos = decode_varint(buf)? as i64,
                (6, WireType::Varint) => seen.kind = decode_varint(buf)? as i32,
                (7, WireType::LengthDelimited) => {
                    let len = length(buf)?;
                    detail = Some(buf.copy_to_bytes(len).to_vec());
                }
                (8, WireType::Varint) => seen.dropped = decode_varint(buf)?,
                _ => skip_field(wire_type, tag, buf, DecodeContext::default())?,
            }
        }
        if seen.kind() == Kind::Rejected {
            seen.detail = String::from_utf8_lossy(&detail.unwrap_or_default()).into_owned();
        }
        Ok(seen)
    }
}

/// Why a response did not decode.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Prost(#[from] DecodeError),
    #[error("a field's length runs past the message end")]
    Truncated,
}

fn length(buf: &mut impl Buf) -> Result<usize, WireError> {
    let len = decode_varint(buf)?;
    match usize::try_from(len) {
        Ok(len) if len <= buf.remaining() => Ok(len),
        _ => Err(WireError::Truncated),
    }
}

/// Opens a TickerStream on `channel` whose responses decode as `Seen`.
pub async fn ticker_stream(
    channel: Channel,
    table: Arc<SymbolTable>,
    requests: impl IntoStreamingRequest<Message = TickerRequest>,
) -> Result<Streaming<Seen>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("connection not ready: {e}")))?;
    let path = http::uri::PathAndQuery::from_static("/ticker.v1.TickerStreamService/TickerStream");
    let codec = SeenCodec { table };
    Ok(grpc
        .streaming(requests.into_streaming_request(), path, codec)
        .await?
        .into_inner())
}

/// Encodes requests with prost, decodes responses as `Seen`.
struct SeenCodec {
    table: Arc<SymbolTable>,
}

impl Codec for SeenCodec {
    type Encode = TickerRequest;
    type Decode = Seen;
    type Encoder = tonic_prost::ProstEncoder<TickerRequest>;
    type Decoder = SeenDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> SeenDecoder {
        SeenDecoder(self.table.clone())
    }
}

struct SeenDecoder(Arc<SymbolTable>);

impl Decoder for SeenDecoder {
    type Item = Seen;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Seen>, Status> {
        Seen::decode(src, &self.0)
            .map(Some)
            .map_err(|e| Status::internal(format!("response is not a TickerResponse: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::TickerResponse;
    use prost::Message;

    fn seen(msg: &TickerResponse, table: &SymbolTable) -> Seen {
        Seen::decode(&mut msg.encode_to_vec().as_slice(), table).unwrap()
    }

    #[test]
    fn decodes_the_counted_fields_and_skips_the_rest() {
        let table = SymbolTable::numbered(20);
        let msg = TickerResponse {
            symbol: "B017".into(),
            ltp: 101.25,
            timestamp: "2026-12-02T00:00:00.000000001Z".into(),
            seq: 42,
            event_time_unix_nanos: 1_700_000_000_123_456_789,
            kind: Kind::Lagged as i32,
            dropped: 7,
            epoch: 9,
            high: 3.0,
            ..TickerResponse::default()
        };
        assert_eq!(
            seen(&msg, &table),
            Seen {
                kind: Kind::Lagged as i32,
                symbol: Some(17),
                seq: 42,
                event_time_unix_nanos: 1_700_000_000_123_456_789,
                dropped: 7,
                detail: String::new(),
            }
        );
    }

    #[test]
    fn a_rejection_keeps_its_detail_and_unknown_symbols_have_no_index() {
        let table = SymbolTable::numbered(5);
        let msg = TickerResponse {
            symbol: "B005".into(),
            kind: Kind::Rejected as i32,
            detail: "unknown symbol".into(),
            ..TickerResponse::default()
        };
        let s = seen(&msg, &table);
        assert_eq!(
            (s.kind(), s.symbol, s.detail.as_str()),
            (Kind::Rejected, None, "unknown symbol")
        );
        for name in ["", "B", "B1", "B0001", "X001", "B00x", "B99999999999"] {
            assert_eq!(table.find(name.as_bytes()), None, "{name}");
        }
        assert_eq!(table.find(b"B004"), Some(4));
    }

    #[test]
    fn a_truncated_message_is_an_error_not_a_panic() {
        let table = SymbolTable::numbered(5);
        let bytes = TickerResponse {
            symbol: "B001".into(),
            seq: 3,
            ..TickerResponse::default()
        }
        .encode_to_vec();
        for cut in 1..bytes.len() {
            let _ = Seen::decode(&mut &bytes[..cut], &table);
        }
        assert!(Seen::decode(&mut &bytes[..3], &table).is_err());
    }
}
