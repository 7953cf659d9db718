//! Subscribe (server streaming), Publish (client streaming) and GetQuotes (unary).

use crate::common;

use bytes::{BufMut, Bytes};
use common::{end, next, publish, ticks, TestServer};
use prost::Message;
use tickerd::{
    client::Kind,
    pb::{GetQuotesRequest, PublishRequest, PublishResponse, SubscribeRequest},
};
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    Code, Status,
};

#[tokio::test]
async fn subscribe_streams_acks_snapshots_and_ticks_for_its_list() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    publish(&mut client, ticks("A", 2)).await;
    publish(&mut client, ticks("B", 1)).await;
    let mut rx = client
        .subscribe(SubscribeRequest {
            symbols: vec!["A".into(), "B".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let mut msgs = Vec::new();
    for _ in 0..4 {
        let m = next(&mut rx).await;
        msgs.push((m.kind(), m.symbol, m.seq));
    }
    assert_eq!(
        msgs,
        vec![
            (Kind::Subscribed, "A".into(), 2),
            (Kind::Snapshot, "A".into(), 2),
            (Kind::Subscribed, "B".into(), 1),
            (Kind::Snapshot, "B".into(), 1),
        ]
    );
    publish(&mut client, ticks("B", 1)).await;
    let t = next(&mut rx).await;
    assert_eq!((t.kind(), t.symbol.as_str(), t.seq), (Kind::Tick, "B", 2));
}

#[tokio::test]
async fn subscribe_fails_before_any_message_on_a_bad_list() {
    let server = TestServer::with(|c| c.max_subscriptions_per_stream = 3).await;
    let mut client = server.client().await;
    publish(&mut client, ticks("A", 1)).await;
    let cases: [(&[&str], Code, &str); 4] = [
        (&[], Code::InvalidArgument, "must not be empty"),
        (&["A", "B C"], Code::InvalidArgument, "not allowed"),
        (&["A", "NOPE"], Code::NotFound, "unknown symbol \"NOPE\""),
        (
            &["A", "A", "A", "A"],
            Code::InvalidArgument,
            "too many symbols",
        ),
    ];
    for (symbols, code, why) in cases {
        let req = SubscribeRequest {
            symbols: symbols.iter().map(|s| s.to_string()).collect(),
        };
        let err = match client.subscribe(req).await {
            Err(status) => status,
            Ok(response) => end(&mut response.into_inner())
                .await
                .expect_err("must fail"),
        };
        assert_eq!(err.code(), code, "{symbols:?}: {err:?}");
        assert!(
            err.message().contains(why),
            "{symbols:?}: {}",
            err.message()
        );
    }
    assert_eq!(server.service.active_streams(), 0);
}

#[tokio::test]
async fn get_quotes_returns_last_ticks_of_known_symbols() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    publish(&mut client, ticks("A", 3)).await;
    publish(&mut client, ticks("B", 1)).await;
    let quotes = common::quotes(&mut client, &["B", "UNKNOWN", "A"]).await;
    let got: Vec<_> = quotes
        .iter()
        .map(|q| (q.kind(), q.symbol.as_str(), q.seq, q.ltp))
        .collect();
    assert_eq!(
        got,
        vec![(Kind::Snapshot, "B", 1, 1.0), (Kind::Snapshot, "A", 3, 3.0)]
    );

    let too_many = GetQuotesRequest {
        symbols: (0..1001).map(|i| format!("S{i}")).collect(),
    };
    for (req, why) in [
        (GetQuotesRequest { symbols: vec![] }, "must not be empty"),
        (
            GetQuotesRequest {
                symbols: vec!["A".into(), "B/C D".into()],
            },
            "not allowed",
        ),
        (too_many, "1001 given, at most 1000"),
    ] {
        let err = client.get_quotes(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(why), "{}", err.message());
    }
}

#[tokio::test]
async fn publish_counts_bad_ticks_and_goes_on() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let counts = publish(
        &mut client,
        vec![
            PublishRequest::new("OK", 10.0),
            PublishRequest::new("OK", f64::NAN),
            PublishRequest::new("OK", f64::INFINITY),
            PublishRequest::new("OK", 0.0),
            PublishRequest::new("OK", -1.0),
            PublishRequest::new("BAD SYMBOL", 1.0),
            PublishRequest {
                symbol: "OK".into(),
                ltp: 1.0,
                event_time_unix_nanos: -1,
            },
            PublishRequest::new("OK", 11.0),
        ],
    )
    .await;
    assert_eq!(
        counts,
        PublishResponse {
            accepted: 2,
            rejected: 6
        }
    );
    let last = server.hub.last("OK").unwrap();
    assert_eq!((last.seq, last.ltp), (2, 11.0));
    assert!(!server.hub.is_known("BAD SYMBOL"));
}

/// Sends raw bytes as Publish messages, so a test can send what a tonic client won't.
#[derive(Default)]
struct RawCodec;
struct RawEncoder;
struct ResponseDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = PublishResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for ResponseDecoder {
    type Item = PublishResponse;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<PublishResponse>, Status> {
        PublishResponse::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

/// A client that sends and reads raw bytes (`RawCodec`), ready for a call.
async fn raw_grpc(server: &TestServer) -> tonic::client::Grpc<tonic::transport::Channel> {
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    grpc
}

#[tokio::test]
async fn publish_ends_with_invalid_argument_on_undecodable_bytes_after_applying_earlier_ticks() {
    let server = TestServer::start().await;
    let mut grpc = raw_grpc(&server).await;
    let good = |p: f64| Bytes::from(PublishRequest::new("RAW", p).encode_to_vec());
    // A field tag with wire type 7 does not exist: not a protobuf message.
    let junk = Bytes::from_static(&[0x0f, 0xff, 0xff]);
    let messages = vec![good(1.0), good(2.0), junk, good(3.0)];
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/ticker.v1.TickerStreamService/Publish",
    );
    let err = grpc
        .client_streaming(
            tonic::Request::new(tokio_stream::iter(messages)),
            path,
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("2 accepted, 0 rejected before it"),
        "{}",
        err.message()
    );
    let last = server.hub.last("RAW").unwrap();
    assert_eq!(
        (last.seq, last.ltp),
        (2, 2.0),
        "good ticks before the junk were applied, none after"
    );
}

#[tokio::test]
async fn subscribe_without_its_request_message_is_invalid_argument() {
    let server = TestServer::start().await;
    let mut grpc = raw_grpc(&server).await;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/ticker.v1.TickerStreamService/Subscribe",
    );
    // A streaming call sends no message at all before it half-closes.
    let none = tokio_stream::iter(Vec::<Bytes>::new());
    let err = match grpc
        .streaming(tonic::Request::new(none), path, RawCodec)
        .await
    {
        Err(status) => status,
        Ok(response) => {
            let mut rx = response.into_inner();
            loop {
                match rx.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("the stream ended cleanly"),
                    Err(status) => break status,
                }
            }
        }
    };
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("SubscribeRequest"), "{err:?}");
    assert_eq!(server.service.active_streams(), 0);
}

#[tokio::test]
async fn a_reply_over_the_encoding_limit_ends_the_stream_with_out_of_range() {
    // KIND_SUBSCRIBED for "A" is more than 8 bytes of protobuf.
    let server = TestServer::with(|c| c.max_encoding_message_size = 8).await;
    let mut client = server.client().await;
    publish(&mut client, ticks("A", 1)).await;
    let req = SubscribeRequest {
        symbols: vec!["A".into()],
    };
    let mut rx = client.subscribe(req).await.unwrap().into_inner();
    let err = end(&mut rx).await.expect_err("must fail");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(
        err.message().contains("--max-encoding-message-size"),
        "{err:?}"
    );
}
