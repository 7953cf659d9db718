//! The server's own HTTP/2 connection fed arbitrary client bytes (after the preface),
//! with an echo service behind it, on paused time so timers cannot stall it. A request
//! to `/direct` gets a body that stays idle while a task offers ticks to the stream's
//! sink, as publishes do (`--direct-publish`), so the window lent to them is fuzzed too.
//! Invariants: no panic; the connection ends; what the server writes is whole,
//! well-formed frames, SETTINGS first; its DATA never exceeds the connection window the
//! client granted.
#![no_main]

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt as _, Full};
use libfuzzer_sys::fuzz_target;
use tickerd::{
    hub::{DirectSink as _, Hub, HubConfig},
    transport::http2::{
        self, connection,
        frame::{self, Frame, Head},
        Appended, Direct, Options, ResponseBody,
    },
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::body::Body;

/// Ticks offered to `/direct` streams, one after another.
const OFFERS: usize = 64;

/// The echo's body, or a body that never has anything of its own (`/direct`).
enum Reply {
    Echo(Body),
    Idle,
}

impl http_body::Body for Reply {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        match self.get_mut() {
            Reply::Echo(body) => Pin::new(body).poll_frame(cx),
            Reply::Idle => Poll::Pending,
        }
    }
}

impl ResponseBody for Reply {
    fn poll_append(
        &mut self,
        _: &mut Context<'_>,
        _: &mut bytes::BytesMut,
        _: usize,
    ) -> Poll<Appended> {
        match self {
            Reply::Echo(_) => Poll::Ready(Appended::UseFrame),
            Reply::Idle => Poll::Pending,
        }
    }
}

#[derive(Clone)]
struct Echo;

impl tower_service::Service<Request<Body>> for Echo {
    type Response = Response<Reply>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Reply>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        Box::pin(async move {
            if request.uri().path() == "/status" {
                return Ok(tonic::Status::internal("refused")
                    .into_http()
                    .map(Reply::Echo));
            }
            if request.uri().path() == "/direct" {
                if let Some(Direct(sink)) = request.extensions().get::<Direct>().cloned() {
                    let hub = Hub::new(HubConfig::default());
                    let _ = hub.publish("F", 1.0, 0);
                    if let Some(tick) = hub.last("F") {
                        tokio::spawn(async move {
                            for _ in 0..OFFERS {
                                sink.offer(&tick);
                                tokio::task::yield_now().await;
                            }
                        });
                    }
                }
                return Ok(Response::new(Reply::Idle));
            }
            let body = match request.into_body().collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(_) => Bytes::new(),
            };
            Ok(Response::new(Reply::Echo(Body::new(Full::new(body)))))
        })
    }
}

/// The frames in `bytes`, as far as they are whole.
fn frames(mut bytes: &[u8]) -> (Vec<(Head, Result<Frame, frame::Error>)>, usize) {
    let mut out = Vec::new();
    while bytes.len() >= frame::HEAD {
        let head = Head::parse(bytes[..frame::HEAD].try_into().unwrap());
        if bytes.len() < frame::HEAD + head.len {
            break;
        }
        let payload = Bytes::copy_from_slice(&bytes[frame::HEAD..frame::HEAD + head.len]);
        out.push((head, frame::parse(head, payload)));
        bytes = &bytes[frame::HEAD + head.len..];
    }
    (out, bytes.len())
}

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    let options = Options {
        max_concurrent_streams: 8,
        max_header_list_size: 4096,
        keepalive_interval: Duration::from_secs(5),
        keepalive_timeout: Duration::from_secs(1),
        max_pending_accept_reset_streams: 8,
        max_local_error_reset_streams: 16,
        max_connection_age: None,
        stream_window: 65_535,
        connection_window: 65_535,
        direct_publish: true,
    };
    let written = runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let serving = tokio::spawn(connection(server, http2::boxed(Echo), options));
        let (mut reader, mut writer) = tokio::io::split(&mut client);
        let send = async {
            let _ = writer.write_all(frame::PREFACE).await;
            let _ = writer.write_all(data).await;
            // Held open a while (paused time: no wall-clock cost), so the server answers
            // and `/direct` streams get their ticks before the end of the input ends it.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = writer.shutdown().await;
        };
        let mut written = Vec::new();
        let receive = reader.read_to_end(&mut written);
        let ended = tokio::time::timeout(Duration::from_secs(600), async {
            let (_, _) = tokio::join!(send, receive);
        })
        .await;
        assert!(ended.is_ok(), "the connection never ended");
        serving.await.expect("the connection task panicked");
        written
    });
    let (sent, rest) = frames(&written);
    assert_eq!(rest, 0, "a torn frame at the end of the server's output");
    let mut window: i64 = 65_535;
    // A stream's bound: the largest initial window the client set, plus its updates
    // (from the client's first SETTINGS, if that is its first frame: no stream can have
    // opened on the default window before it).
    let client = frames(data).0;
    let mut initial: Option<i64> = None;
    if !matches!(
        client.first(),
        Some((_, Ok(Frame::Settings { ack: false, .. })))
    ) {
        initial = Some(65_535);
    }
    let mut stream_updates = std::collections::HashMap::<u32, i64>::new();
    for (head, parsed) in &client {
        match parsed {
            Ok(Frame::WindowUpdate {
                stream: 0,
                increment,
            }) => window += i64::from(*increment),
            Ok(Frame::WindowUpdate { stream, increment }) => {
                *stream_updates.entry(*stream).or_default() += i64::from(*increment);
            }
            Ok(Frame::Settings { ack: false, values }) => {
                let set = values
                    .iter()
                    .rev()
                    .find(|&&(id, _)| id == frame::SETTINGS_INITIAL_WINDOW_SIZE)
                    .map_or(65_535, |&(_, value)| i64::from(value));
                initial = Some(initial.map_or(set, |i| i.max(set)));
            }
            Err(_) => break,
            _ if head.kind == frame::CONTINUATION => {}
            _ => {}
        }
    }
    let mut stream_sent = std::collections::HashMap::<u32, i64>::new();
    let mut data_sent = 0i64;
    for (i, (head, parsed)) in sent.iter().enumerate() {
        let parsed = parsed
            .as_ref()
            .unwrap_or_else(|e| panic!("server frame {i} {head:?}: {e:?}"));
        if i == 0 {
            assert!(
                matches!(parsed, Frame::Settings { ack: false, .. }),
                "{parsed:?}"
            );
        }
        if let Frame::Data { stream, flow, .. } = parsed {
            data_sent += *flow as i64;
            let sent = stream_sent.entry(*stream).or_default();
            *sent += *flow as i64;
            let bound =
                initial.unwrap_or(65_535) + stream_updates.get(stream).copied().unwrap_or(0);
            assert!(
                *sent <= bound,
                "stream {stream}: {sent} bytes of DATA in a {bound}-byte window"
            );
        }
    }
    assert!(
        data_sent <= window,
        "{data_sent} bytes of DATA in a {window}-byte window"
    );
});
