//! WebSocket JSON requests, parsed as the web listener parses a text frame. Invariants:
//! no panic; a refusal is the documented "malformed request: ..." detail; an accepted
//! request survives a protobuf round trip unchanged, and a JSON round trip too when its
//! one double is finite. The proto3 JSON mapping reads "NaN", "Infinity" and overflowing
//! decimal strings ("1e400") as non-finite doubles, as protobuf can carry them; serde_json
//! writes those as `null`, which the mapping does not read back. The session refuses a
//! non-finite `max_rate_hz` for CONFLATE and ignores it otherwise, as over gRPC.
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
            if request.max_rate_hz.is_finite() {
                let json = serde_json::to_string(&request).expect("a parsed request serializes");
                let again = parse_json(&json).expect("its own JSON parses");
                assert_eq!(again, request, "JSON round trip of {text:?}");
            }
            let bytes = request.encode_to_vec();
            let decoded = TickerRequest::decode(bytes.as_slice()).expect("its protobuf decodes");
            // NaN is not equal to itself (and -0.0, proto3's default, comes back as 0.0).
            let (sent, got) = (request.max_rate_hz, decoded.max_rate_hz);
            assert!(
                sent == got || (sent.is_nan() && got.is_nan()),
                "{sent} {got}"
            );
            let finite = |r: &TickerRequest| TickerRequest {
                max_rate_hz: 0.0,
                ..r.clone()
            };
            assert_eq!(finite(&decoded), finite(&request));
        }
    }
});
