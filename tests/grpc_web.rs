//! gRPC-Web on the web listener (tonic-web) with a real HTTP/1.1 client: GetQuotes and
//! Subscribe, errors, the server's own streaming body and its trailers through the
//! translation, and CORS for allowed origins; and the WebSocket stream over TLS.

use crate::common;

use std::sync::Arc;

use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use prost::Message as _;
use tickerd::{
    client::Kind,
    pb::{GetQuotesRequest, GetQuotesResponse, SubscribeRequest, TickerResponse},
};

use common::{publish, ticks, Keys, TestServer};

type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn http() -> Http {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A gRPC-Web call of `method` with one message, as a browser's fetch sends it.
fn call(server: &TestServer, method: &str, message: Vec<u8>) -> http::Request<Full<Bytes>> {
    let mut body = vec![0u8];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    http::Request::post(format!(
        "http://{}/ticker.v1.TickerStreamService/{method}",
        server.web_addr
    ))
    .header("content-type", "application/grpc-web+proto")
    .header("x-grpc-web", "1")
    .body(Full::new(Bytes::from(body)))
    .expect("request")
}

/// gRPC-Web frames: messages (flag 0x00) and the trailer block (flag 0x80).
#[derive(Default)]
struct Frames {
    buf: Vec<u8>,
}

enum Frame {
    Message(Bytes),
    Trailers(String),
}

impl Frames {
    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    fn next(&mut self) -> Option<Frame> {
        if self.buf.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if self.buf.len() < 5 + len {
            return None;
        }
        let flag = self.buf[0];
        let payload: Vec<u8> = self.buf.drain(..5 + len).skip(5).collect();
        Some(if flag & 0x80 != 0 {
            Frame::Trailers(String::from_utf8(payload).expect("trailers are text"))
        } else {
            Frame::Message(Bytes::from(payload))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_quotes_over_grpc_web_with_its_trailers() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    publish(&mut client, ticks("AAPL", 3)).await;
    let request = GetQuotesRequest {
        symbols: vec!["AAPL".into()],
    };
    let response =
        common::within(http().request(call(&server, "GetQuotes", request.encode_to_vec())))
            .await
            .expect("response");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/grpc-web+proto"
    );
    let body = common::within(response.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    let mut frames = Frames::default();
    frames.push(&body);
    let Some(Frame::Message(message)) = frames.next() else {
        panic!("a message first");
    };
    let quotes = GetQuotesResponse::decode(message).expect("GetQuotesResponse");
    assert_eq!(quotes.quotes[0].seq, 3);
    let Some(Frame::Trailers(trailers)) = frames.next() else {
        panic!("trailers last");
    };
    assert!(trailers.contains("grpc-status:0"), "{trailers:?}");

    // An error: the status arrives as gRPC-Web puts it (headers of a trailers-only
    // response, or the trailer block).
    let empty = GetQuotesRequest { symbols: vec![] };
    let response =
        common::within(http().request(call(&server, "GetQuotes", empty.encode_to_vec())))
            .await
            .expect("response");
    let header = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap_or("").to_string());
    let body = common::within(response.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    let mut frames = Frames::default();
    frames.push(&body);
    let status = match (header, frames.next()) {
        (Some(code), _) => code,
        (None, Some(Frame::Trailers(t))) => t,
        _ => panic!("no status"),
    };
    assert!(status.contains('3'), "INVALID_ARGUMENT: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_streams_through_grpc_web_and_ends_with_its_trailers() {
    let mut server = TestServer::start().await;
    let mut client = server.client().await;
    publish(&mut client, ticks("MSFT", 1)).await;
    let request = SubscribeRequest {
        symbols: vec!["MSFT".into()],
    };
    let response =
        common::within(http().request(call(&server, "Subscribe", request.encode_to_vec())))
            .await
            .expect("response");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut frames = Frames::default();
    let mut messages = Vec::new();
    let mut trailers = None;
    let (mut published, mut shut) = (false, false);
    while trailers.is_none() {
        let frame = common::within(body.frame())
            .await
            .expect("the body ended without trailers")
            .expect("body error");
        if let Ok(mut data) = frame.into_data() {
            frames.push(&data.copy_to_bytes(data.remaining()));
        }
        while let Some(frame) = frames.next() {
            match frame {
                Frame::Message(m) => messages.push(TickerResponse::decode(m).expect("message")),
                Frame::Trailers(t) => trailers = Some(t),
            }
        }
        if messages.len() >= 2 && !published {
            // Streaming: ticks published now reach the open response.
            publish(&mut client, ticks("MSFT", 20)).await;
            published = true;
        }
        if messages.len() == 22 && !shut {
            // The server ends the stream: its status must survive as trailers.
            drop(server.shutdown());
            shut = true;
        }
    }
    let kinds: Vec<Kind> = messages.iter().map(|m| m.kind()).collect();
    assert_eq!(&kinds[..2], &[Kind::Subscribed, Kind::Snapshot]);
    let seqs: Vec<u64> = messages[2..].iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (2..=21).collect::<Vec<_>>());
    let trailers = trailers.expect("trailers");
    assert!(trailers.contains("grpc-status:14"), "{trailers:?}");
    assert!(
        trailers.contains("server%20shutting%20down"),
        "{trailers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_lets_allowed_origins_read_the_grpc_status() {
    let server =
        TestServer::with(|c| c.web_allowed_origins = vec!["https://desk.example".into()]).await;
    let preflight = http::Request::builder()
        .method("OPTIONS")
        .uri(format!(
            "http://{}/ticker.v1.TickerStreamService/GetQuotes",
            server.web_addr
        ))
        .header("origin", "https://desk.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,x-grpc-web,authorization",
        )
        .body(Full::new(Bytes::new()))
        .expect("preflight");
    let response = common::within(http().request(preflight))
        .await
        .expect("preflight");
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://desk.example"
    );
    let mut request = call(
        &server,
        "GetQuotes",
        GetQuotesRequest {
            symbols: vec!["NONE".into()],
        }
        .encode_to_vec(),
    );
    request
        .headers_mut()
        .insert("origin", "https://desk.example".parse().expect("origin"));
    let response = common::within(http().request(request))
        .await
        .expect("response");
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .expect("text")
        .to_string();
    assert!(
        exposed.contains("grpc-status") && exposed.contains("grpc-message"),
        "{exposed}"
    );
    // A foreign origin gets no CORS grant.
    let mut foreign = call(&server, "GetQuotes", Vec::new());
    foreign
        .headers_mut()
        .insert("origin", "https://evil.example".parse().expect("origin"));
    let response = common::within(http().request(foreign))
        .await
        .expect("response");
    assert!(response
        .headers()
        .get("access-control-allow-origin")
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_stream_runs_over_tls_with_http1_negotiated() {
    let keys = Keys::new();
    let server = TestServer::with(|c| keys.tls(c, false)).await;
    let mut client = common::tls_client(&server.url(), keys.client_tls(None))
        .await
        .expect("TLS client");
    publish(&mut client, ticks("TLS", 1)).await;

    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(keys.ca.pem().cert.as_bytes()) {
        roots.add(cert.expect("CA cert")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(server.web_addr)
        .await
        .expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let tls = common::within(tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp))
        .await
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut request = common::web::request(server.web_addr, None, None);
    *request.uri_mut() = format!("wss://localhost:{}/v1/stream", server.web_addr.port())
        .parse()
        .expect("uri");
    let (mut socket, _) = common::within(tokio_tungstenite::client_async(request, tls))
        .await
        .expect("upgrade over TLS");
    let subscribe =
        serde_json::to_string(&tickerd::pb::TickerRequest::subscribe("TLS")).expect("JSON");
    futures_util::SinkExt::send(
        &mut socket,
        tokio_tungstenite::tungstenite::Message::text(subscribe),
    )
    .await
    .expect("send");
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        let frame = common::within(futures_util::StreamExt::next(&mut socket))
            .await
            .expect("open")
            .expect("frame");
        if let tokio_tungstenite::tungstenite::Message::Text(text) = frame {
            let msg: TickerResponse = serde_json::from_str(text.as_str()).expect("JSON");
            kinds.push(msg.kind());
        }
    }
    assert_eq!(kinds, [Kind::Subscribed, Kind::Snapshot]);
}
