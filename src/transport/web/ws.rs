//! WebSocket sessions (`/v1/stream`): one socket is one TickerStream session, driven by
//! the same `Session` as a gRPC stream. Requests arrive as frames (proto3 JSON text,
//! or protobuf binary under the `ticker.v1+proto` subprotocol), replies leave the same
//! way, one message per frame, every ready message written before one flush. Above it
//! the web listener (`web`), below it the session and the hub.
//!
//! Backpressure is the session's: the socket's writer polls it only when the last
//! burst is written, so a browser that stops reading backs up into its own rings
//! (KIND_LAGGED with exact counts later, or for STRICT the close below). A ping goes
//! out every `--web-ping-interval`; a socket whose writes make no progress, or that stays
//! silent (no pong, no frame), for three intervals is dropped.

use std::{
    future::poll_fn,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::Poll,
    time::Duration,
};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures_util::{
    stream::{SplitSink, SplitStream},
    SinkExt as _, StreamExt as _,
};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::{
    auth::PeerInfo,
    clock,
    pb::{ticker_response::Kind, TickerRequest, TickerResponse},
    session::{Outbound, Requests, Session},
    transport::grpc::{service::UNAUTHENTICATED, TickerService},
    wire::GRPC_PREFIX,
};

/// The subprotocol of protobuf binary frames; without it frames are proto3 JSON text.
pub const PROTO_SUBPROTOCOL: &str = "ticker.v1+proto";

/// Largest request frame accepted, in bytes; a larger one closes with `TOO_BIG`.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// How a socket is kept: see `--web-auth-timeout` and `--web-ping-interval`.
#[derive(Debug, Clone, Copy)]
pub struct Keeping {
    pub auth_timeout: Duration,
    pub ping_every: Duration,
}

impl Keeping {
    /// Silent (no pong, no frame) or unable to write for this long, a socket is dropped.
    fn silence_limit(&self) -> Duration {
        self.ping_every * 3
    }
}

/// Requests read ahead of the session; past it the socket is not read (backpressure).
const REQUEST_QUEUE: usize = 64;

/// Most messages written before a flush; the rest wait for the next burst.
const MAX_BURST: usize = 256;

/// Close codes (RFC 6455 section 7.4; 4000-4999 are the application's).
pub mod close {
    /// The client closed, or the session ended normally.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down (the gRPC stream would end UNAVAILABLE).
    pub const GOING_AWAY: u16 = 1001;
    /// A binary frame on a JSON session, or text on a `ticker.v1+proto` one.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// A frame that is not valid WebSocket (bad UTF-8, bad framing).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A request frame over `MAX_REQUEST_BYTES`.
    pub const TOO_BIG: u16 = 1009;
    /// The condition that ends a gRPC stream with status code `c` closes a WebSocket
    /// with `4000 + c`, the status message as the reason: 4003 INVALID_ARGUMENT, 4008
    /// RESOURCE_EXHAUSTED (a STRICT subscription fell behind; the server's stream
    /// limit), 4016 UNAUTHENTICATED (no, a bad, or an expired token).
    pub const fn of_status(code: tonic::Code) -> u16 {
        4000 + code as u16
    }
}

/// How the socket's messages are encoded, chosen by the subprotocol.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Encoding {
    Json,
    Proto,
}

/// What the reader tells the writer.
enum Notice {
    /// A malformed request: answered in-band with KIND_REJECTED.
    Reject(String),
    /// A frame the session cannot take: the socket closes.
    Close(u16, String),
}

/// Serves one upgraded socket until it closes.
pub async fn run(
    socket: WebSocket,
    encoding: Encoding,
    service: TickerService,
    peer: PeerInfo,
    keeping: Keeping,
) {
    let peer_addr = peer
        .addr
        .map_or_else(|| "unknown".to_string(), |a| a.to_string());
    let (sink, mut stream) = socket.split();
    let mut writer = Writer {
        sink,
        limit: keeping.silence_limit(),
    };
    let heard = Arc::new(AtomicU64::new(now_millis()));
    let auth = service.authenticator().clone();
    let (principal, first) = if auth.requires_token() {
        match first_token(&mut stream, encoding, keeping.auth_timeout, &heard).await {
            Ok((token, first)) => match auth.verify(&token) {
                Ok(principal) => (principal, first),
                Err(e) => {
                    service.refused(&peer_addr, &e);
                    let code = close::of_status(tonic::Code::Unauthenticated);
                    return writer.close(code, UNAUTHENTICATED).await;
                }
            },
            Err((code, reason)) => return writer.close(code, &reason).await,
        }
    } else {
        match auth.authenticate(&Default::default(), Some(&peer)) {
            Ok(principal) => (principal, None),
            Err(e) => {
                service.refused(&peer_addr, &e);
                let code = close::of_status(tonic::Code::Unauthenticated);
                return writer.close(code, UNAUTHENTICATED).await;
            }
        }
    };
    let (requests_tx, requests_rx) = mpsc::channel(REQUEST_QUEUE);
    if let Some(first) = first {
        let _ = requests_tx.send(Ok(first)).await;
    }
    let requests: Requests = Box::pin(ReceiverStream::new(requests_rx));
    let session = match service.open_session("WebSocket", peer_addr, principal, requests) {
        Ok(session) => session,
        Err(status) => {
            return writer
                .close(close::of_status(status.code()), status.message())
                .await
        }
    };
    let (notices_tx, notices) = mpsc::channel(16);
    let reader = tokio::spawn(read(
        stream,
        encoding,
        requests_tx,
        notices_tx,
        Arc::clone(&heard),
    ));
    writer
        .write(session, encoding, notices, heard, keeping.ping_every)
        .await;
    reader.abort();
}

/// Waits for the first request, which must carry a token; returns it and the rest of
/// that request (if it asks for more than authentication).
async fn first_token(
    stream: &mut SplitStream<WebSocket>,
    encoding: Encoding,
    deadline: Duration,
    heard: &AtomicU64,
) -> Result<(String, Option<TickerRequest>), (u16, String)> {
    let unauthenticated = close::of_status(tonic::Code::Unauthenticated);
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let frame = match tokio::time::timeout_at(until, stream.next()).await {
            Err(_) => {
                return Err((
                    unauthenticated,
                    format!("no token within {deadline:?}: the first message must carry `token`"),
                ))
            }
            Ok(None) => return Err((close::NORMAL, String::new())),
            Ok(Some(Err(e))) => return Err(frame_error(&e)),
            Ok(Some(Ok(frame))) => frame,
        };
        heard.store(now_millis(), Ordering::Relaxed);
        match decode(frame, encoding) {
            Decoded::Control => continue,
            Decoded::Closed => return Err((close::NORMAL, String::new())),
            Decoded::Close(code, reason) => return Err((code, reason)),
            Decoded::Malformed(_) => {
                return Err((
                    unauthenticated,
                    "the first message must carry `token`".into(),
                ))
            }
            Decoded::Request(mut request) => {
                if request.token.is_empty() {
                    return Err((
                        unauthenticated,
                        "the first message must carry `token`".into(),
                    ));
                }
                let token = std::mem::take(&mut request.token);
                let rest = (!request.symbol.is_empty()).then_some(request);
                return Ok((token, rest));
            }
        }
    }
}

enum Decoded {
    Request(TickerRequest),
    Malformed(String),
    /// Ping or pong: nothing for the session.
    Control,
    Closed,
    Close(u16, String),
}

fn decode(frame: Message, encoding: Encoding) -> Decoded {
    match (frame, encoding) {
        (Message::Text(text), Encoding::Json) => match parse_json(text.as_str()) {
            Ok(request) => Decoded::Request(request),
            Err(detail) => Decoded::Malformed(detail),
        },
        (Message::Binary(bytes), Encoding::Proto) => match TickerRequest::decode(bytes) {
            Ok(request) => Decoded::Request(request),
            Err(e) => Decoded::Malformed(format!("malformed request: {e}")),
        },
        (Message::Binary(_), Encoding::Json) => Decoded::Close(
            close::UNSUPPORTED_DATA,
            format!(
                "binary frame on a JSON session (protobuf needs subprotocol {PROTO_SUBPROTOCOL})"
            ),
        ),
        (Message::Text(_), Encoding::Proto) => Decoded::Close(
            close::UNSUPPORTED_DATA,
            format!("text frame on a {PROTO_SUBPROTOCOL} session"),
        ),
        (Message::Ping(_) | Message::Pong(_), _) => Decoded::Control,
        (Message::Close(_), _) => Decoded::Closed,
    }
}

/// A JSON text frame as a request (the proto3 JSON mapping; unknown fields and enum
/// names refused), or the KIND_REJECTED detail saying why not.
pub fn parse_json(text: &str) -> Result<TickerRequest, String> {
    serde_json::from_str::<TickerRequest>(text).map_err(|e| format!("malformed request: {e}"))
}

/// The close code and reason for a socket error (oversize and invalid frames).
fn frame_error(e: &axum::Error) -> (u16, String) {
    let text = e.to_string();
    let code = if text.contains("Space limit exceeded") || text.contains("too long") {
        close::TOO_BIG
    } else {
        close::INVALID_PAYLOAD
    };
    let reason = if code == close::TOO_BIG {
        format!("request frame over {MAX_REQUEST_BYTES} bytes")
    } else {
        text
    };
    (code, reason)
}

/// Reads requests into the session until the socket closes; tells the writer about
/// malformed frames and frames that close the socket.
async fn read(
    mut stream: SplitStream<WebSocket>,
    encoding: Encoding,
    requests: mpsc::Sender<Result<TickerRequest, Status>>,
    notices: mpsc::Sender<Notice>,
    heard: Arc<AtomicU64>,
) {
    while let Some(frame) = stream.next().await {
        heard.store(now_millis(), Ordering::Relaxed);
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                let (code, reason) = frame_error(&e);
                let _ = notices.send(Notice::Close(code, reason)).await;
                return;
            }
        };
        match decode(frame, encoding) {
            Decoded::Request(request) => {
                if requests.send(Ok(request)).await.is_err() {
                    return;
                }
            }
            Decoded::Malformed(detail) => {
                if notices.send(Notice::Reject(detail)).await.is_err() {
                    return;
                }
            }
            Decoded::Control => {}
            Decoded::Closed => break,
            Decoded::Close(code, reason) => {
                let _ = notices.send(Notice::Close(code, reason)).await;
                return;
            }
        }
    }
    // The client is gone: a normal end, not a half-close (a WebSocket has none).
    let _ = notices
        .send(Notice::Close(close::NORMAL, String::new()))
        .await;
}

/// What one poll of the session gave: the messages ready now, and, if the session
/// ended, how (`Ok` for a normal end, the status otherwise).
type Burst = (Vec<Outbound>, Option<Result<(), Status>>);

/// Writes the session's messages until it ends, the client goes, or the socket stalls.
struct Writer {
    sink: SplitSink<WebSocket, Message>,
    /// A write that makes no progress for this long drops the socket.
    limit: Duration,
}

impl Writer {
    async fn write(
        &mut self,
        mut session: Session,
        encoding: Encoding,
        mut notices: mpsc::Receiver<Notice>,
        heard: Arc<AtomicU64>,
        ping_every: Duration,
    ) {
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        loop {
            let burst = tokio::select! {
                biased;
                notice = notices.recv() => match notice {
                    Some(Notice::Reject(detail)) => {
                        let reply = Outbound::message(TickerResponse {
                            kind: Kind::Rejected as i32,
                            detail,
                            ..Default::default()
                        });
                        (vec![reply], None)
                    }
                    Some(Notice::Close(code, reason)) => {
                        return self.close(code, &reason).await;
                    }
                    None => return,
                },
                burst = poll_fn(|cx| {
                    let mut out = Vec::new();
                    loop {
                        match session.poll_next_unpin(cx) {
                            Poll::Ready(Some(Ok(msg))) => {
                                out.push(msg);
                                if out.len() == MAX_BURST {
                                    return Poll::Ready((out, None));
                                }
                            }
                            Poll::Ready(Some(Err(status))) => {
                                return Poll::Ready((out, Some(Err(status))))
                            }
                            Poll::Ready(None) => return Poll::Ready((out, Some(Ok(())))),
                            Poll::Pending if out.is_empty() => return Poll::Pending,
                            Poll::Pending => return Poll::Ready((out, None)),
                        }
                    }
                }) => burst,
                _ = ping.tick() => {
                    let silent = now_millis().saturating_sub(heard.load(Ordering::Relaxed));
                    if silent > self.limit.as_millis() as u64 {
                        tracing::debug!("WebSocket silent past its limit; dropped");
                        return;
                    }
                    if !self.send(Message::Ping(Bytes::new())).await {
                        return;
                    }
                    continue;
                }
            };
            let (messages, end): Burst = burst;
            for out in messages {
                if !self.feed(frame_of(&out, encoding)).await {
                    return;
                }
            }
            if !self.flush().await {
                return;
            }
            match end {
                None => {}
                Some(Ok(())) => return self.close(close::NORMAL, "").await,
                Some(Err(status)) => {
                    let code = match status.code() {
                        tonic::Code::Unavailable => close::GOING_AWAY,
                        code => close::of_status(code),
                    };
                    return self.close(code, status.message()).await;
                }
            }
        }
    }

    async fn feed(&mut self, frame: Message) -> bool {
        matches!(
            tokio::time::timeout(self.limit, self.sink.feed(frame)).await,
            Ok(Ok(()))
        )
    }

    async fn flush(&mut self) -> bool {
        matches!(
            tokio::time::timeout(self.limit, self.sink.flush()).await,
            Ok(Ok(()))
        )
    }

    async fn send(&mut self, frame: Message) -> bool {
        self.feed(frame).await && self.flush().await
    }

    /// Sends a close frame (reasons are cut to the 123 bytes a close frame holds).
    async fn close(&mut self, code: u16, reason: &str) {
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(&reason[..end]),
        }));
        let _ = self.send(frame).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.sink.close()).await;
    }
}

/// One outbound message as a frame. Ticks reuse the bytes the hub encoded once.
fn frame_of(out: &Outbound, encoding: Encoding) -> Message {
    match (out, encoding) {
        (Outbound::Tick(tick), Encoding::Proto) => {
            Message::Binary(tick.framed.slice(GRPC_PREFIX..))
        }
        (Outbound::Tick(tick), Encoding::Json) => match Utf8Bytes::try_from(tick.json().clone()) {
            Ok(text) => Message::Text(text),
            // serde_json writes UTF-8; this arm only keeps the type checker honest.
            Err(_) => Message::Text(Utf8Bytes::from(String::new())),
        },
        (Outbound::Message(m), Encoding::Proto) => Message::Binary(Bytes::from(m.encode_to_vec())),
        (Outbound::Message(m), Encoding::Json) => Message::Text(Utf8Bytes::from(
            serde_json::to_string(&**m).unwrap_or_default(),
        )),
    }
}

fn now_millis() -> u64 {
    (clock::now_unix_nanos() / 1_000_000) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_follow_the_grpc_status() {
        assert_eq!(close::of_status(tonic::Code::Unauthenticated), 4016);
        assert_eq!(close::of_status(tonic::Code::ResourceExhausted), 4008);
        assert_eq!(close::of_status(tonic::Code::InvalidArgument), 4003);
    }

    #[test]
    fn a_long_decimal_parses_to_the_nearest_double_and_round_trips() {
        // Found by fuzz/ws_json: without serde_json's float_roundtrip the parse was one
        // ulp off, so the request changed on a round trip.
        let digits = "3333333333333333333333333333333333333333333333333333333333333333333333335";
        let request = parse_json(&format!(r#"{{"symbol":"A","maxRateHz":{digits}}}"#)).unwrap();
        assert_eq!(request.max_rate_hz, digits.parse::<f64>().unwrap());
        let again = parse_json(&serde_json::to_string(&request).unwrap()).unwrap();
        assert_eq!(again, request);
    }

    #[test]
    fn non_finite_rates_parse_as_the_mapping_says_and_conflate_refuses_them() {
        // Found by fuzz/ws_json (fuzz/corpus/ws_json/nonfinite-rate-string): proto3 JSON
        // reads these strings as non-finite doubles, which protobuf can carry too; the
        // policy, not the parse, refuses them, as it does over gRPC.
        use crate::{pb::ticker_request::DeliveryPolicy, session::Policy};
        for (spelling, finite) in [
            ("\"NaN\"", false),
            ("\"Infinity\"", false),
            ("\"615.E00452\"", false),
            ("\"5\"", true),
        ] {
            let text = format!(
                r#"{{"symbol":"A","policy":"DELIVERY_POLICY_CONFLATE","maxRateHz":{spelling}}}"#
            );
            let request = parse_json(&text).unwrap();
            assert_eq!(request.policy, DeliveryPolicy::Conflate as i32);
            assert_eq!(request.max_rate_hz.is_finite(), finite, "{spelling}");
            let policy = Policy::of(&request);
            assert_eq!(policy.is_ok(), finite, "{spelling}: {policy:?}");
        }
        assert!(
            parse_json(r#"{"maxRateHz":1e400}"#).is_err(),
            "a bare number out of range"
        );
    }

    #[test]
    fn frames_decode_by_the_session_encoding() {
        let json = Message::Text(
            r#"{"symbol":"AAPL","action":"ACTION_SUBSCRIBE","resumeFromSeq":"7"}"#.into(),
        );
        match decode(json, Encoding::Json) {
            Decoded::Request(r) => {
                assert_eq!((r.symbol.as_str(), r.resume_from_seq), ("AAPL", 7));
            }
            _ => panic!("a good JSON request"),
        }
        let bad = Message::Text(r#"{"symbol":"AAPL","bogus":1}"#.into());
        assert!(
            matches!(decode(bad, Encoding::Json), Decoded::Malformed(d) if d.contains("bogus"))
        );
        let policy = Message::Text(r#"{"symbol":"A","policy":"DELIVERY_POLICY_NOPE"}"#.into());
        assert!(matches!(
            decode(policy, Encoding::Json),
            Decoded::Malformed(_)
        ));
        let binary = Message::Binary(TickerRequest::subscribe("X").encode_to_vec().into());
        assert!(matches!(
            decode(binary.clone(), Encoding::Json),
            Decoded::Close(close::UNSUPPORTED_DATA, _)
        ));
        assert!(matches!(decode(binary, Encoding::Proto), Decoded::Request(r) if r.symbol == "X"));
    }
}
