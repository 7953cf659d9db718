//! A real WebSocket client (tokio-tungstenite) for the web listener's tests: JSON or
//! binary sessions, messages decoded with the contract's own JSON mapping.

use std::{net::SocketAddr, time::Duration};

use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tickerd::{
    client::Kind,
    pb::{TickerRequest, TickerResponse},
};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    tungstenite::{client::IntoClientRequest, http::HeaderValue, protocol::CloseFrame, Message},
    MaybeTlsStream, WebSocketStream,
};

use super::within;

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One WebSocket session on `/v1/stream`.
pub struct Ws {
    pub socket: Socket,
    pub binary: bool,
}

/// How a socket ended: its close frame's code and reason.
#[derive(Debug, PartialEq)]
pub struct Closed {
    pub code: u16,
    pub reason: String,
}

/// The upgrade request for `addr`'s `/v1/stream`, with `origin` and `protocol`.
pub fn request(
    addr: SocketAddr,
    origin: Option<&str>,
    protocol: Option<&str>,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut request = format!("ws://{addr}/v1/stream")
        .into_client_request()
        .expect("request");
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", HeaderValue::from_str(origin).expect("origin"));
    }
    if let Some(protocol) = protocol {
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(protocol).expect("protocol"),
        );
    }
    request
}

impl Ws {
    /// A JSON session.
    pub async fn connect(addr: SocketAddr) -> Ws {
        Self::open(request(addr, None, None), false).await
    }

    /// A `ticker.v1+proto` session.
    pub async fn connect_binary(addr: SocketAddr) -> Ws {
        Self::open(request(addr, None, Some("ticker.v1+proto")), true).await
    }

    pub async fn open(
        request: tokio_tungstenite::tungstenite::handshake::client::Request,
        binary: bool,
    ) -> Ws {
        let (socket, response) = within(tokio_tungstenite::connect_async(request))
            .await
            .expect("WebSocket upgrade");
        let chosen = response.headers().get("sec-websocket-protocol");
        assert_eq!(chosen.is_some(), binary, "subprotocol {chosen:?}");
        Ws { socket, binary }
    }

    /// Sends a raw JSON text frame.
    pub async fn send_text(&mut self, text: &str) {
        within(self.socket.send(Message::text(text)))
            .await
            .expect("send");
    }

    /// Sends a request in this session's encoding.
    pub async fn send(&mut self, request: &TickerRequest) {
        let frame = if self.binary {
            Message::binary(request.encode_to_vec())
        } else {
            Message::text(serde_json::to_string(request).expect("JSON"))
        };
        within(self.socket.send(frame)).await.expect("send");
    }

    pub async fn subscribe(&mut self, symbol: &str) {
        self.send(&TickerRequest::subscribe(symbol)).await;
    }

    /// The next message; fails on a close or after the deadline.
    pub async fn next(&mut self) -> TickerResponse {
        loop {
            let frame = within(self.socket.next())
                .await
                .expect("socket ended")
                .expect("socket error");
            match frame {
                Message::Text(text) => {
                    assert!(!self.binary, "text on a binary session");
                    return serde_json::from_str(text.as_str()).expect("a TickerResponse");
                }
                Message::Binary(bytes) => {
                    assert!(self.binary, "binary on a JSON session");
                    return TickerResponse::decode(bytes).expect("a TickerResponse");
                }
                Message::Close(frame) => panic!("closed: {frame:?}"),
                _ => continue,
            }
        }
    }

    /// The next message, which must be of `kind` for `symbol`.
    pub async fn expect(&mut self, kind: Kind, symbol: &str) -> TickerResponse {
        let msg = self.next().await;
        assert_eq!((msg.kind(), msg.symbol.as_str()), (kind, symbol), "{msg:?}");
        msg
    }

    /// Reads until the server's close frame; returns it.
    pub async fn closed(&mut self) -> Closed {
        loop {
            let frame = within(self.socket.next()).await;
            match frame {
                Some(Ok(Message::Close(Some(CloseFrame { code, reason })))) => {
                    return Closed {
                        code: code.into(),
                        reason: reason.to_string(),
                    }
                }
                Some(Ok(Message::Close(None))) | None => {
                    return Closed {
                        code: 1005,
                        reason: String::new(),
                    }
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("socket error before a close frame: {e}"),
            }
        }
    }

    /// Whether nothing arrives for `quiet`.
    pub async fn silent_for(&mut self, quiet: Duration) -> bool {
        tokio::time::timeout(quiet, self.socket.next())
            .await
            .is_err()
    }
}

/// A JSON session whose TCP receive buffer is tiny, so the server's writes back up
/// as soon as it stops reading (a browser tab that stalls).
pub async fn stalled(addr: SocketAddr, request_for: Option<&str>) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let tcp = within(socket.connect(addr)).await.expect("connect");
    let request = request(addr, None, request_for);
    let (socket, _) = within(tokio_tungstenite::client_async(
        request,
        MaybeTlsStream::Plain(tcp),
    ))
    .await
    .expect("WebSocket upgrade");
    Ws {
        socket,
        binary: request_for.is_some(),
    }
}
