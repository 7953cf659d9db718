//! gRPC's length-prefixed message framing, in one place: the hub frames each tick once
//! (`hub::Tick::framed`) and the gRPC transport frames control replies and batches the
//! same way (`transport::grpc::routes`). Nothing here knows HTTP/2 or tonic.

use bytes::{BufMut, Bytes};
use prost::Message;

/// Bytes of the gRPC message prefix: compressed flag and big-endian length.
pub const GRPC_PREFIX: usize = 5;

/// Appends `msg` to `buf` as one uncompressed gRPC message: prefix, then protobuf.
/// The caller keeps messages under 4 GiB (ticks and control replies are tiny; the
/// encoding limit is checked by the stream before it frames).
pub fn put_grpc_message(msg: &impl Message, buf: &mut impl BufMut) {
    let len = msg.encoded_len();
    buf.put_u8(0);
    buf.put_u32(len as u32);
    msg.encode_raw(buf);
}

/// `msg` as one uncompressed gRPC message, in bytes of its own.
pub fn grpc_framed(msg: &impl Message) -> Bytes {
    let mut buf = Vec::with_capacity(GRPC_PREFIX + msg.encoded_len());
    put_grpc_message(msg, &mut buf);
    Bytes::from(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::TickerResponse;

    #[test]
    fn a_framed_message_is_its_length_prefix_and_its_protobuf() {
        let msg = TickerResponse {
            symbol: "A".into(),
            seq: 7,
            ..Default::default()
        };
        let framed = grpc_framed(&msg);
        assert_eq!(framed[0], 0, "uncompressed");
        let len = u32::from_be_bytes([framed[1], framed[2], framed[3], framed[4]]) as usize;
        assert_eq!(len, framed.len() - GRPC_PREFIX);
        assert_eq!(TickerResponse::decode(&framed[GRPC_PREFIX..]), Ok(msg));
    }
}
