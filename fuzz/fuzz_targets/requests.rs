//! Request decoding: arbitrary bytes as each request message the server decodes, and
//! as one gRPC-framed message. Invariants: no panic; whatever decodes re-encodes to
//! bytes that decode and re-encode to the very same bytes (a stable round trip; bytes,
//! because a NaN price is not equal to itself); a message framed by `tickerd::wire`
//! carries its exact length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tickerd::{
    pb::{GetQuotesRequest, PublishRequest, SubscribeRequest, TickerRequest},
    wire::{grpc_framed, GRPC_PREFIX},
};

fn round_trip<M: Message + Default>(bytes: &[u8]) {
    let Ok(first) = M::decode(bytes) else {
        return;
    };
    let encoded = first.encode_to_vec();
    let again = M::decode(encoded.as_slice()).expect("re-encoded bytes decode");
    assert_eq!(
        encoded,
        again.encode_to_vec(),
        "round trip changed the message"
    );
    let framed = grpc_framed(&first);
    let len = u32::from_be_bytes([framed[1], framed[2], framed[3], framed[4]]) as usize;
    assert_eq!((framed[0], len), (0, framed.len() - GRPC_PREFIX));
}

fuzz_target!(|data: &[u8]| {
    round_trip::<TickerRequest>(data);
    round_trip::<SubscribeRequest>(data);
    round_trip::<PublishRequest>(data);
    round_trip::<GetQuotesRequest>(data);
    // As a framed gRPC message: the prefix's flag and length, then the body.
    if data.len() >= GRPC_PREFIX {
        let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
        let body = &data[GRPC_PREFIX..];
        if data[0] == 0 && len <= body.len() {
            round_trip::<TickerRequest>(&body[..len]);
        }
    }
});
