//! Header blocks: a request's HEADERS (and CONTINUATION) decoded with `loona-hpack`
//! into an `http::Request` under the header-list limit, checked as RFC 9113 8.3 asks;
//! responses and trailers encoded as literals that never touch the dynamic table, so
//! the server keeps no HPACK state of its own to get wrong. `conn` owns one per
//! connection; the `h2_frames` fuzz target decodes arbitrary blocks through it.

use bytes::Bytes;
use http::{header::HeaderName, HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, Version};

use super::frame::{self, Error};

/// The HPACK dynamic table the server lets a client use (SETTINGS_HEADER_TABLE_SIZE's
/// default).
pub const TABLE_SIZE: usize = 4096;

/// Why a header block is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The stream is malformed or too large: RST_STREAM with the code.
    Stream(u32, &'static str),
    /// The connection cannot go on (its HPACK state is lost, or it is an attack).
    Connection(Error),
}

/// A decoded decoded request head, before its body.
pub type Head = Request<()>;

/// One connection's HPACK decoder and limits.
pub struct Decoder {
    hpack: loona_hpack::Decoder<'static>,
    max_list: usize,
}

impl Decoder {
    pub fn new(max_list: usize) -> Decoder {
        let mut hpack = loona_hpack::Decoder::new();
        hpack.set_max_allowed_table_size(TABLE_SIZE);
        Decoder { hpack, max_list }
    }

    /// Decodes every field, so the table stays in step, but keeps them only while the
    /// list is under the limit (RFC 9113 10.5.1 sizes: name + value + 32 each).
    fn fields(&mut self, block: &[u8]) -> Result<Vec<(Bytes, Bytes)>, Refused> {
        let mut fields = Vec::new();
        let mut size = 0usize;
        let max = self.max_list;
        self.hpack
            .decode_with_cb(block, |name, value| {
                size = size.saturating_add(name.len() + value.len() + 32);
                if size <= max {
                    fields.push((
                        Bytes::copy_from_slice(&name),
                        Bytes::copy_from_slice(&value),
                    ));
                }
            })
            .map_err(|_| {
                Refused::Connection(frame::error(
                    frame::COMPRESSION_ERROR,
                    "header block does not decode",
                ))
            })?;
        if size > max {
            // Far more decoded than sent is a table entry referenced over and over.
            if size > 8 * block.len().max(max) {
                return Err(Refused::Connection(frame::error(
                    frame::ENHANCE_YOUR_CALM,
                    "header list expands far past its limit",
                )));
            }
            return Err(Refused::Stream(
                frame::PROTOCOL_ERROR,
                "header list over the limit",
            ));
        }
        Ok(fields)
    }

    /// A request's head.
    pub fn request(&mut self, block: &[u8]) -> Result<Head, Refused> {
        let fields = self.fields(block)?;
        let malformed = |why| Refused::Stream(frame::PROTOCOL_ERROR, why);
        let (mut method, mut path, mut scheme, mut authority) = (None, None, None, None);
        let mut headers = HeaderMap::with_capacity(fields.len());
        let mut regular = false;
        for (name, value) in fields {
            if let Some(pseudo) = name.strip_prefix(b":") {
                if regular {
                    return Err(malformed("pseudo-header after a regular one"));
                }
                let slot = match pseudo {
                    b"method" => &mut method,
                    b"path" => &mut path,
                    b"scheme" => &mut scheme,
                    b"authority" => &mut authority,
                    _ => return Err(malformed("unknown pseudo-header")),
                };
                if slot.replace(value).is_some() {
                    return Err(malformed("repeated pseudo-header"));
                }
                continue;
            }
            regular = true;
            if name.iter().any(u8::is_ascii_uppercase) {
                return Err(malformed("upper-case header name"));
            }
            let name = HeaderName::from_bytes(&name).map_err(|_| malformed("bad header name"))?;
            if is_connection_specific(&name, &value) {
                return Err(malformed("connection-specific header"));
            }
            let value =
                HeaderValue::from_maybe_shared(value).map_err(|_| malformed("bad header value"))?;
            headers.append(name, value);
        }
        let (Some(method), Some(path), Some(_scheme)) = (method, path, scheme) else {
            return Err(malformed("missing :method, :path or :scheme"));
        };
        let method = Method::from_bytes(&method).map_err(|_| malformed("bad :method"))?;
        if path.first() != Some(&b'/') {
            return Err(malformed(":path is not absolute"));
        }
        let uri = Uri::from_maybe_shared(path).map_err(|_| malformed("bad :path"))?;
        let mut request = Request::new(());
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_2;
        *request.headers_mut() = headers;
        if let Some(authority) = authority.and_then(|a| HeaderValue::from_maybe_shared(a).ok()) {
            request
                .headers_mut()
                .entry(http::header::HOST)
                .or_insert(authority);
        }
        Ok(request)
    }

    /// A request's trailers: decoded (to keep the table in step) and dropped, as gRPC
    /// gives them no meaning.
    pub fn trailers(&mut self, block: &[u8]) -> Result<(), Refused> {
        self.fields(block).map(drop)
    }
}

fn is_connection_specific(name: &HeaderName, value: &[u8]) -> bool {
    use http::header::{CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};
    *name == CONNECTION
        || *name == TRANSFER_ENCODING
        || *name == UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
        || (*name == TE && value != b"trailers")
}

/// A response head: `:status`, then every header as a literal never indexed.
pub fn response(status: StatusCode, headers: &HeaderMap, out: &mut Vec<u8>) {
    if status == StatusCode::OK {
        // Indexed field 8 of the static table: ":status: 200".
        out.push(0x88);
    } else {
        // Literal without indexing, name from static index 8 (":status").
        out.push(0x08);
        string(out, status.as_str().as_bytes());
    }
    fields(headers, out);
}

/// Trailers (or the headers of a trailers-only response, with `response` first).
pub fn fields(headers: &HeaderMap, out: &mut Vec<u8>) {
    for (name, value) in headers {
        literal(name.as_str().as_bytes(), value.as_bytes(), out);
    }
}

/// One field as a literal without indexing, new name (RFC 7541 6.2.2); also how the
/// load generator's own reader writes its requests' pseudo-headers.
pub fn literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    string(out, name);
    string(out, value);
}

/// A string literal, not Huffman-coded (RFC 7541 5.2).
fn string(out: &mut Vec<u8>, s: &[u8]) {
    integer(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// An integer with an `n`-bit prefix (RFC 7541 5.1).
fn integer(out: &mut Vec<u8>, high: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(high | value as u8);
        return;
    }
    out.push(high | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in fields {
            out.push(0x00);
            string(&mut out, name.as_bytes());
            string(&mut out, value.as_bytes());
        }
        out
    }

    const GRPC: &[(&str, &str)] = &[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/ticker.v1.TickerStreamService/TickerStream"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];

    #[test]
    fn a_grpc_request_decodes() {
        let head = Decoder::new(16 * 1024).request(&block(GRPC)).unwrap();
        assert_eq!(head.method(), Method::POST);
        assert_eq!(
            head.uri().path(),
            "/ticker.v1.TickerStreamService/TickerStream"
        );
        assert_eq!(head.headers()["content-type"], "application/grpc");
        assert_eq!(head.headers()["host"], "localhost");
    }

    #[test]
    fn malformed_requests_are_stream_errors() {
        let mut cases = vec![
            block(&[(":method", "POST"), (":path", "/x")]),
            block(&[("a", "b"), (":method", "POST")]),
            block(&[(":method", "POST"), (":scheme", "http"), (":path", "x")]),
            block(&[(":bogus", "1")]),
        ];
        let mut upper = block(GRPC);
        upper.extend(block(&[("X-Up", "1")]));
        cases.push(upper);
        let mut te = block(GRPC);
        te.extend(block(&[("connection", "close")]));
        cases.push(te);
        for case in cases {
            let refused = Decoder::new(16 * 1024).request(&case).unwrap_err();
            assert!(
                matches!(refused, Refused::Stream(frame::PROTOCOL_ERROR, _)),
                "{refused:?}"
            );
        }
    }

    #[test]
    fn a_bomb_ends_the_connection_and_a_large_list_the_stream() {
        let mut bomb = block(GRPC);
        // Literal with incremental indexing, then index 62 a thousand times.
        bomb.push(0x40);
        string(&mut bomb, b"x-bomb");
        string(&mut bomb, &[b'z'; 4000]);
        bomb.extend(std::iter::repeat_n(0xbe, 1000));
        assert!(matches!(
            Decoder::new(16 * 1024).request(&bomb),
            Err(Refused::Connection(Error {
                code: frame::ENHANCE_YOUR_CALM,
                ..
            }))
        ));
        let mut big = block(GRPC);
        big.extend(block(&[("x-big", &"y".repeat(20_000))]));
        assert!(matches!(
            Decoder::new(16 * 1024).request(&big),
            Err(Refused::Stream(frame::PROTOCOL_ERROR, _))
        ));
    }

    #[test]
    fn what_the_server_encodes_decodes() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/grpc"));
        headers.insert(
            "grpc-message",
            HeaderValue::from_str(&"m".repeat(300)).unwrap(),
        );
        let mut out = Vec::new();
        response(StatusCode::NOT_FOUND, &headers, &mut out);
        let decoded = loona_hpack::Decoder::new().decode(&out).unwrap();
        assert_eq!(decoded[0], (b":status".to_vec(), b"404".to_vec()));
        assert_eq!(decoded[2].1, "m".repeat(300).into_bytes());
    }
}
