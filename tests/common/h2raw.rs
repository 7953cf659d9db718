//! Hand-built HTTP/2 frames on a plain TCP socket, for the abuse tests: a well-formed
//! client cannot send what an attacker sends (resets by the thousand, endless
//! CONTINUATION, window overflows), so these are written byte by byte (RFC 9113 frame
//! layout, RFC 7541 literal header fields without Huffman coding).

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;

/// HTTP/2 error codes the server may answer with.
pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const FLOW_CONTROL_ERROR: u32 = 0x3;
pub const REFUSED_STREAM: u32 = 0x7;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One frame as read: (type, flags, stream id, payload).
pub type Frame = (u8, u8, u32, Vec<u8>);

/// A frame's bytes.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A literal header field without indexing, new name (RFC 7541 6.2.2), no Huffman.
pub fn literal(name: &str, value: &[u8]) -> Vec<u8> {
    field(0x00, name, value)
}

/// A literal header field with incremental indexing, new name (RFC 7541 6.2.1): it
/// enters the dynamic table at index 62.
pub fn literal_indexed(name: &str, value: &[u8]) -> Vec<u8> {
    field(0x40, name, value)
}

fn field(first: u8, name: &str, value: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    integer(&mut out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    integer(&mut out, 0, 7, value.len());
    out.extend_from_slice(value);
    out
}

/// An indexed header field (RFC 7541 6.1).
pub fn indexed(index: usize) -> Vec<u8> {
    let mut out = Vec::new();
    integer(&mut out, 0x80, 7, index);
    out
}

/// RFC 7541 5.1 integer with an `n`-bit prefix, `first` holding the high bits.
fn integer(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// The header block of a gRPC call to `method` (e.g. `TickerStream`).
pub fn grpc_headers(method: &str) -> Vec<u8> {
    let mut block = Vec::new();
    block.extend(literal(":method", b"POST"));
    block.extend(literal(":scheme", b"http"));
    block.extend(literal(
        ":path",
        format!("/ticker.v1.TickerStreamService/{method}").as_bytes(),
    ));
    block.extend(literal(":authority", b"localhost"));
    block.extend(literal("content-type", b"application/grpc"));
    block.extend(literal("te", b"trailers"));
    block
}

/// A gRPC message: compressed flag 0, big-endian length, then `body`.
pub fn grpc_message(body: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The gRPC messages whole in `bytes`, taken out of it.
pub fn take_messages(bytes: &mut Vec<u8>) -> Vec<tickerd::pb::TickerResponse> {
    let mut out = Vec::new();
    while bytes.len() >= 5 {
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        if bytes.len() < 5 + len {
            break;
        }
        let msg: Vec<u8> = bytes.drain(..5 + len).skip(5).collect();
        out.push(
            <tickerd::pb::TickerResponse as prost::Message>::decode(&msg[..])
                .expect("a whole message"),
        );
    }
    out
}

/// A raw HTTP/2 client connection.
pub struct Raw {
    pub socket: TcpStream,
    read: Vec<u8>,
}

impl Raw {
    /// Connects and sends the preface and a SETTINGS frame with `settings`.
    pub async fn connect(addr: SocketAddr, settings: &[(u16, u32)]) -> Raw {
        let mut socket = TcpStream::connect(addr).await.expect("connect");
        let mut payload = Vec::new();
        for (id, value) in settings {
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(&value.to_be_bytes());
        }
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &payload));
        socket.write_all(&hello).await.expect("preface");
        Raw {
            socket,
            read: Vec::new(),
        }
    }

    /// Opens a TickerStream call on stream `id` (its HEADERS; the body follows).
    pub async fn open(&mut self, id: u32) -> bool {
        self.send(&frame(
            HEADERS,
            END_HEADERS,
            id,
            &grpc_headers("TickerStream"),
        ))
        .await
    }

    /// Writes bytes; `false` once the server closed the connection.
    pub async fn send(&mut self, bytes: &[u8]) -> bool {
        self.socket.write_all(bytes).await.is_ok()
    }

    /// The next frame, `None` at the end of the connection or after `wait` of silence.
    pub async fn next_frame(&mut self, wait: Duration) -> Option<Frame> {
        loop {
            if self.read.len() >= 9 {
                let len =
                    u32::from_be_bytes([0, self.read[0], self.read[1], self.read[2]]) as usize;
                if self.read.len() >= 9 + len {
                    let head: Vec<u8> = self.read.drain(..9 + len).collect();
                    let stream =
                        u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    return Some((head[3], head[4], stream, head[9..].to_vec()));
                }
            }
            let mut buf = [0u8; 16 * 1024];
            match tokio::time::timeout(wait, self.socket.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.read.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Reads frames until the server's GOAWAY (its error code) or the connection's end
    /// (`None`), failing past `deadline`.
    pub async fn goaway(&mut self, deadline: Duration) -> Option<u32> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            assert!(!left.is_zero(), "the server neither sent GOAWAY nor closed");
            match self.next_frame(left).await {
                Some((GOAWAY, _, _, payload)) if payload.len() >= 8 => {
                    return Some(u32::from_be_bytes([
                        payload[4], payload[5], payload[6], payload[7],
                    ]));
                }
                Some(_) => continue,
                None => return None,
            }
        }
    }

    /// Reads frames until a RST_STREAM for `stream` (its error code), a GOAWAY or the
    /// end (`None`).
    pub async fn reset_of(&mut self, stream: u32, deadline: Duration) -> Option<u32> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match self.next_frame(left).await {
                Some((RST_STREAM, _, id, payload)) if id == stream && payload.len() >= 4 => {
                    return Some(u32::from_be_bytes([
                        payload[0], payload[1], payload[2], payload[3],
                    ]));
                }
                Some((GOAWAY, ..)) | None => return None,
                Some(_) => continue,
            }
        }
    }
}
