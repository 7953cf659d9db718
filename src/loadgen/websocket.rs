//! The load generator's WebSocket side (`--web`): a stream is a session on the web
//! listener's `/v1/stream`, in proto3 JSON as a browser speaks it, or in the
//! `ticker.v1+proto` binary subprotocol (`--web-binary`). Responses decode to the same
//! `Seen` as over gRPC, so `reader` counts both alike.

use std::sync::Arc;

use futures_util::{SinkExt as _, StreamExt as _};
use prost::Message as _;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_tungstenite::{
    tungstenite::{client::IntoClientRequest, http::HeaderValue, Message},
    MaybeTlsStream, WebSocketStream,
};
use tonic::{codec::Streaming, Status};

use super::wire::{Seen, SymbolTable};
use crate::pb::{ticker_response::Kind, TickerRequest};

/// Where a reader's responses come from.
pub enum Responses {
    Grpc(Streaming<Seen>),
    Web(WebResponses),
}

impl Responses {
    /// The next response; `None` when the stream ends.
    pub async fn message(&mut self) -> Result<Option<Seen>, Status> {
        match self {
            Responses::Grpc(stream) => stream.message().await,
            Responses::Web(web) => web.message().await,
        }
    }
}

/// One WebSocket session.
pub struct WebResponses {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    table: Arc<SymbolTable>,
}

/// Opens a session on `base` (`http://host:port` of the web listener) and sends
/// `requests`.
pub async fn open(
    base: &str,
    binary: bool,
    table: Arc<SymbolTable>,
    requests: Vec<TickerRequest>,
) -> Result<WebResponses, Status> {
    let url = format!(
        "{}/v1/stream",
        base.replacen("http://", "ws://", 1)
            .replacen("https://", "wss://", 1)
    );
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| Status::invalid_argument(format!("{url}: {e}")))?;
    if binary {
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("ticker.v1+proto"),
        );
    }
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|e| Status::unavailable(format!("{url}: {e}")))?;
    for r in requests {
        let frame = if binary {
            Message::binary(r.encode_to_vec())
        } else {
            Message::text(serde_json::to_string(&r).map_err(|e| Status::internal(e.to_string()))?)
        };
        socket
            .feed(frame)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
    }
    socket
        .flush()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    Ok(WebResponses { socket, table })
}

impl WebResponses {
    async fn message(&mut self) -> Result<Option<Seen>, Status> {
        loop {
            let frame = match self.socket.next().await {
                None | Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Err(e)) => return Err(Status::unavailable(e.to_string())),
                Some(Ok(frame)) => frame,
            };
            return match frame {
                Message::Binary(bytes) => Seen::decode(&mut bytes.as_ref(), &self.table)
                    .map(Some)
                    .map_err(|e| Status::internal(e.to_string())),
                Message::Text(text) => seen_of_json(text.as_str(), &self.table).map(Some),
                _ => continue,
            };
        }
    }
}

/// The fields `Seen` keeps, from a TickerResponse in the proto3 JSON mapping (64-bit
/// integers as strings, the kind by name and absent for a tick).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonSeen<'a> {
    #[serde(default, borrow)]
    kind: Option<&'a str>,
    #[serde(default, borrow)]
    symbol: Option<&'a str>,
    #[serde(default, borrow)]
    seq: Option<&'a str>,
    #[serde(default, borrow)]
    event_time_unix_nanos: Option<&'a str>,
    #[serde(default, borrow)]
    dropped: Option<&'a str>,
    #[serde(default)]
    detail: Option<String>,
}

fn seen_of_json(text: &str, table: &SymbolTable) -> Result<Seen, Status> {
    let json: JsonSeen<'_> = serde_json::from_str(text)
        .map_err(|e| Status::internal(format!("not a TickerResponse: {e}")))?;
    let number = |s: Option<&str>| s.and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
    let kind = json
        .kind
        .and_then(Kind::from_str_name)
        .unwrap_or(Kind::Tick);
    Ok(Seen {
        kind: kind as i32,
        symbol: json.symbol.and_then(|s| table.find(s.as_bytes())),
        seq: number(json.seq) as u64,
        event_time_unix_nanos: number(json.event_time_unix_nanos),
        dropped: number(json.dropped) as u64,
        detail: json.detail.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::TickerResponse;

    #[test]
    fn json_responses_decode_like_binary_ones() {
        let table = SymbolTable::numbered(20);
        let msg = TickerResponse {
            symbol: "B017".into(),
            ltp: 1.5,
            seq: 42,
            event_time_unix_nanos: 1_700_000_000_123_456_789,
            kind: Kind::Lagged as i32,
            dropped: 7,
            ..TickerResponse::default()
        };
        let json = serde_json::to_string(&msg).unwrap();
        let binary = Seen::decode(&mut msg.encode_to_vec().as_slice(), &table).unwrap();
        assert_eq!(seen_of_json(&json, &table).unwrap(), binary);
        let tick = serde_json::to_string(&TickerResponse {
            symbol: "B001".into(),
            seq: 3,
            ..TickerResponse::default()
        })
        .unwrap();
        assert_eq!(seen_of_json(&tick, &table).unwrap().kind(), Kind::Tick);
    }
}
