//! WebSocket JSON requests, parsed as the web listener parses a text frame. Invariants:
//! no panic; a refusal is the documented "malformed request: ..." detail; an accepted
//! request survives a JSON round trip and a protobuf round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tickerd::{pb::TickerRequest, transport::web::ws::parse_json};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_json(text) {
        Err(detail) => assert!(detail.starts_with("malformed request: "), "{detail}"),
        Ok(request) => {
            let json = serde_json::to_string(&request).expect("a parsed request serializes");
            let again = parse_json(&json).expect("its own JSON parses");
            assert_eq!(again, request, "JSON round trip of {text:?}");
            let bytes = request.encode_to_vec();
            assert_eq!(TickerRequest::decode(bytes.as_slice()).ok(), Some(request));
        }
    }
});
