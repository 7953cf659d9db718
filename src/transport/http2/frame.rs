//! HTTP/2 framing (RFC 9113 section 4 and 6): the 9-byte frame header, each frame type's
//! payload checked and split, and the few frames the server writes. Pure functions over
//! bytes; `conn` reads and writes with them, `headers` decodes the header blocks they
//! carry, and the `h2_frames` fuzz target holds them to their invariants.

use bytes::{BufMut, Bytes, BytesMut};

/// What every client connection opens with.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Bytes of a frame header.
pub const HEAD: usize = 9;
/// SETTINGS_MAX_FRAME_SIZE's floor, and what both sides use until told otherwise.
pub const DEFAULT_MAX_FRAME: u32 = 16_384;
/// The largest flow-control window (2^31 - 1).
pub const MAX_WINDOW: i64 = 0x7fff_ffff;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

/// SETTINGS parameters (RFC 9113 6.5.2).
pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// Error codes (RFC 9113 7).
pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const INTERNAL_ERROR: u32 = 0x2;
pub const FLOW_CONTROL_ERROR: u32 = 0x3;
pub const STREAM_CLOSED: u32 = 0x5;
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const COMPRESSION_ERROR: u32 = 0x9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    pub fn parse(b: &[u8; HEAD]) -> Head {
        Head {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            // The reserved bit is ignored on receipt.
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

/// A connection error: the GOAWAY code and why (for the log and the GOAWAY's debug data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: u32,
    pub reason: &'static str,
}

pub fn error(code: u32, reason: &'static str) -> Error {
    Error { code, reason }
}

/// One frame, its payload checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream: u32,
        end: bool,
        /// The bytes a request body gets (padding removed).
        data: Bytes,
        /// What the frame costs in flow control: its whole payload, padding included.
        flow: usize,
    },
    Headers {
        stream: u32,
        end_stream: bool,
        end_headers: bool,
        block: Bytes,
    },
    Continuation {
        stream: u32,
        end_headers: bool,
        block: Bytes,
    },
    Priority,
    Reset {
        stream: u32,
        code: u32,
    },
    Settings {
        ack: bool,
        values: Vec<(u16, u32)>,
    },
    Ping {
        ack: bool,
        data: [u8; 8],
    },
    GoAway {
        last: u32,
        code: u32,
    },
    WindowUpdate {
        stream: u32,
        increment: u32,
    },
    /// PUSH_PROMISE: a client must never send it.
    PushPromise,
    /// Unknown types are ignored (RFC 9113 4.1).
    Unknown,
}

/// Checks and splits one frame's payload. Errors are connection errors.
pub fn parse(head: Head, mut payload: Bytes) -> Result<Frame, Error> {
    debug_assert_eq!(head.len, payload.len());
    let needs_stream = |f: Frame| {
        if head.stream == 0 {
            Err(error(PROTOCOL_ERROR, "frame needs a stream"))
        } else {
            Ok(f)
        }
    };
    let no_stream = |f: Frame| {
        if head.stream != 0 {
            Err(error(PROTOCOL_ERROR, "connection frame on a stream"))
        } else {
            Ok(f)
        }
    };
    match head.kind {
        DATA => {
            let flow = payload.len();
            let data = unpad(head.flags, &mut payload)?;
            needs_stream(Frame::Data {
                stream: head.stream,
                end: head.flags & END_STREAM != 0,
                data,
                flow,
            })
        }
        HEADERS => {
            let mut block = unpad(head.flags, &mut payload)?;
            if head.flags & PRIORITY_FLAG != 0 {
                if block.len() < 5 {
                    return Err(error(FRAME_SIZE_ERROR, "HEADERS priority too short"));
                }
                let _ = block.split_to(5);
            }
            needs_stream(Frame::Headers {
                stream: head.stream,
                end_stream: head.flags & END_STREAM != 0,
                end_headers: head.flags & END_HEADERS != 0,
                block,
            })
        }
        CONTINUATION => needs_stream(Frame::Continuation {
            stream: head.stream,
            end_headers: head.flags & END_HEADERS != 0,
            block: payload,
        }),
        PRIORITY => {
            if payload.len() != 5 {
                return Err(error(FRAME_SIZE_ERROR, "PRIORITY of the wrong size"));
            }
            needs_stream(Frame::Priority)
        }
        RST_STREAM => {
            let code = be32(&payload).ok_or(error(FRAME_SIZE_ERROR, "RST_STREAM size"))?;
            needs_stream(Frame::Reset {
                stream: head.stream,
                code,
            })
        }
        SETTINGS => {
            let ack = head.flags & ACK != 0;
            if ack && !payload.is_empty() {
                return Err(error(FRAME_SIZE_ERROR, "SETTINGS ack with a payload"));
            }
            if !payload.len().is_multiple_of(6) {
                return Err(error(FRAME_SIZE_ERROR, "SETTINGS size"));
            }
            let values = payload
                .chunks_exact(6)
                .map(|c| {
                    (
                        u16::from_be_bytes([c[0], c[1]]),
                        u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                    )
                })
                .collect();
            no_stream(Frame::Settings { ack, values })
        }
        PING => {
            let data: [u8; 8] = payload[..]
                .try_into()
                .map_err(|_| error(FRAME_SIZE_ERROR, "PING size"))?;
            no_stream(Frame::Ping {
                ack: head.flags & ACK != 0,
                data,
            })
        }
        GOAWAY => {
            if payload.len() < 8 {
                return Err(error(FRAME_SIZE_ERROR, "GOAWAY size"));
            }
            let last = be32(&payload[..4]).unwrap_or(0) & 0x7fff_ffff;
            let code = be32(&payload[4..8]).unwrap_or(0);
            no_stream(Frame::GoAway { last, code })
        }
        WINDOW_UPDATE => {
            let increment =
                be32(&payload).ok_or(error(FRAME_SIZE_ERROR, "WINDOW_UPDATE size"))? & 0x7fff_ffff;
            Ok(Frame::WindowUpdate {
                stream: head.stream,
                increment,
            })
        }
        PUSH_PROMISE => Ok(Frame::PushPromise),
        _ => Ok(Frame::Unknown),
    }
}

fn be32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.try_into().ok()?))
}

/// The payload without its padding (RFC 9113 6.1).
fn unpad(flags: u8, payload: &mut Bytes) -> Result<Bytes, Error> {
    if flags & PADDED == 0 {
        return Ok(payload.clone());
    }
    let Some(&pad) = payload.first() else {
        return Err(error(
            FRAME_SIZE_ERROR,
            "padded frame without its pad length",
        ));
    };
    let pad = usize::from(pad);
    if pad >= payload.len() {
        return Err(error(PROTOCOL_ERROR, "padding as long as the frame"));
    }
    Ok(payload.slice(1..payload.len() - pad))
}

/// Appends a frame header.
pub fn put_head(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    out.put_slice(&head(len, kind, flags, stream));
}

/// Writes a frame header over the first `HEAD` bytes of `at` (a place kept for it
/// before its payload's length was known).
pub fn set_head(at: &mut [u8], len: usize, kind: u8, flags: u8, stream: u32) {
    at[..HEAD].copy_from_slice(&head(len, kind, flags, stream));
}

fn head(len: usize, kind: u8, flags: u8, stream: u32) -> [u8; HEAD] {
    debug_assert!(len < 1 << 24);
    let [_, l0, l1, l2] = (len as u32).to_be_bytes();
    let [s0, s1, s2, s3] = (stream & 0x7fff_ffff).to_be_bytes();
    [l0, l1, l2, kind, flags, s0, s1, s2, s3]
}

pub fn put_settings(out: &mut BytesMut, values: &[(u16, u32)]) {
    put_head(out, values.len() * 6, SETTINGS, 0, 0);
    for &(id, value) in values {
        out.put_u16(id);
        out.put_u32(value);
    }
}

pub fn put_settings_ack(out: &mut BytesMut) {
    put_head(out, 0, SETTINGS, ACK, 0);
}

pub fn put_ping(out: &mut BytesMut, ack: bool, data: [u8; 8]) {
    put_head(out, 8, PING, if ack { ACK } else { 0 }, 0);
    out.put_slice(&data);
}

pub fn put_goaway(out: &mut BytesMut, last: u32, code: u32, debug: &str) {
    put_head(out, 8 + debug.len(), GOAWAY, 0, 0);
    out.put_u32(last);
    out.put_u32(code);
    out.put_slice(debug.as_bytes());
}

pub fn put_reset(out: &mut BytesMut, stream: u32, code: u32) {
    put_head(out, 4, RST_STREAM, 0, stream);
    out.put_u32(code);
}

pub fn put_window_update(out: &mut BytesMut, stream: u32, increment: u32) {
    put_head(out, 4, WINDOW_UPDATE, 0, stream);
    out.put_u32(increment);
}

/// A header block, split into HEADERS and CONTINUATION frames of at most `max_frame`.
pub fn put_headers(out: &mut BytesMut, stream: u32, block: &[u8], end_stream: bool, max: usize) {
    let mut chunks = block.chunks(max.max(1)).peekable();
    let mut first = true;
    if block.is_empty() {
        let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
        put_head(out, 0, HEADERS, flags, stream);
        return;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let mut flags = if last { END_HEADERS } else { 0 };
        let kind = if first { HEADERS } else { CONTINUATION };
        if first && end_stream {
            flags |= END_STREAM;
        }
        put_head(out, chunk.len(), kind, flags, stream);
        out.put_slice(chunk);
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_of(out: &[u8]) -> Head {
        Head::parse(out[..HEAD].try_into().unwrap())
    }

    #[test]
    fn a_written_frame_reads_back() {
        let mut out = BytesMut::new();
        put_goaway(&mut out, 7, ENHANCE_YOUR_CALM, "calm");
        let head = head_of(&out);
        assert_eq!((head.len, head.kind, head.stream), (12, GOAWAY, 0));
        let frame = parse(head, Bytes::copy_from_slice(&out[HEAD..])).unwrap();
        assert_eq!(
            frame,
            Frame::GoAway {
                last: 7,
                code: ENHANCE_YOUR_CALM
            }
        );
    }

    #[test]
    fn padding_is_removed_and_still_costs_window() {
        let head = Head {
            len: 6,
            kind: DATA,
            flags: PADDED | END_STREAM,
            stream: 1,
        };
        let frame = parse(head, Bytes::from_static(&[2, b'h', b'i', b'!', 0, 0])).unwrap();
        assert_eq!(
            frame,
            Frame::Data {
                stream: 1,
                end: true,
                data: Bytes::from_static(b"hi!"),
                flow: 6
            }
        );
        let bad = Head { len: 2, ..head };
        assert_eq!(
            parse(bad, Bytes::from_static(&[5, 0])).unwrap_err().code,
            PROTOCOL_ERROR
        );
    }

    #[test]
    fn stream_and_connection_frames_are_where_they_belong() {
        let data = Head {
            len: 0,
            kind: DATA,
            flags: 0,
            stream: 0,
        };
        assert!(parse(data, Bytes::new()).is_err());
        let ping = Head {
            len: 8,
            kind: PING,
            flags: 0,
            stream: 3,
        };
        assert!(parse(ping, Bytes::from_static(&[0; 8])).is_err());
        let settings = Head {
            len: 5,
            kind: SETTINGS,
            flags: 0,
            stream: 0,
        };
        assert_eq!(
            parse(settings, Bytes::from_static(&[0; 5]))
                .unwrap_err()
                .code,
            FRAME_SIZE_ERROR
        );
    }

    #[test]
    fn a_long_header_block_continues() {
        let mut out = BytesMut::new();
        put_headers(&mut out, 5, &[1; 40], true, 16);
        let first = head_of(&out);
        assert_eq!(
            (first.kind, first.flags, first.len),
            (HEADERS, END_STREAM, 16)
        );
        let second = head_of(&out[HEAD + 16..]);
        assert_eq!((second.kind, second.flags), (CONTINUATION, 0));
        let third = head_of(&out[2 * (HEAD + 16)..]);
        assert_eq!(
            (third.kind, third.flags, third.len),
            (CONTINUATION, END_HEADERS, 8)
        );
    }
}
