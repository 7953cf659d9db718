//! The two streaming RPCs (TickerStream, Subscribe) served straight from their sessions:
//! a tower layer in front of tonic's router takes their requests, asks the service
//! (`service`) for a session exactly as tonic's generated code would, and answers with a
//! `SessionBody`, which writes gRPC messages itself. Every other RPC goes on to tonic.
//!
//! Why: each wake-up of a stream went through tonic's `EncodeBody` and four boxed or
//! mapped body layers (router, axum, `Grpc`) before reaching the session. Here a woken
//! stream's body is the session's own (`RouteBody`'s left side, kept unboxed in the server's
//! HTTP/2 stream table), which can skip a quiet session (`Session::is_quiet`) before any
//! work. On the server's own HTTP/2 the body frames its messages straight into the
//! connection's buffer (`ResponseBody::poll_append`); elsewhere a lone tick goes out as
//! the hub's own bytes (`Tick::framed`) without a copy. An idle stream holds no encode
//! buffer (`benches/README.md`, changelog, for what each measured). The server installs the layer inside
//! `observe`'s, so these RPCs are counted like the others.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{BufMut, Bytes, BytesMut};
use futures_core::Stream;
use http::{header::CONTENT_TYPE, HeaderMap, HeaderValue};
use http_body::Frame;
use http_body_util::Either;
use prost::Message;
use tonic::{body::Body, Request, Status, Streaming};
use tower_layer::Layer;
use tower_service::Service;

use super::{codec::RequestDecoder, service::TickerService};
use crate::{
    ops::observe::MeteredBody,
    pb::{ticker_stream_service_server::TickerStreamService, SubscribeRequest, TickerRequest},
    session::{Outbound, Session},
    transport::http2::{Appended, Direct, ResponseBody},
    wire::{put_grpc_message, GRPC_PREFIX},
};

const TICKER_STREAM: &str = "/ticker.v1.TickerStreamService/TickerStream";
const SUBSCRIBE: &str = "/ticker.v1.TickerStreamService/Subscribe";

/// A body chunk (or the messages appended at once) is handed to HTTP/2 once it reaches
/// this (one 16 KiB DATA frame, h2's default largest), or when the session has nothing
/// more ready.
const YIELD_AT: usize = 16 * 1024;

/// Message size limits, as `--max-decoding-message-size` / `--max-encoding-message-size`.
#[derive(Debug, Clone, Copy)]
pub struct MessageLimits {
    pub max_decoding: usize,
    pub max_encoding: usize,
}

/// Serves TickerStream and Subscribe with `service`; see the module docs.
#[derive(Clone)]
pub struct StreamRoutesLayer {
    service: TickerService,
    limits: MessageLimits,
}

impl StreamRoutesLayer {
    pub fn new(service: TickerService, limits: MessageLimits) -> StreamRoutesLayer {
        StreamRoutesLayer { service, limits }
    }
}

impl<S> Layer<S> for StreamRoutesLayer {
    type Service = StreamRoutes<S>;
    fn layer(&self, inner: S) -> StreamRoutes<S> {
        StreamRoutes {
            inner,
            service: self.service.clone(),
            limits: self.limits,
        }
    }
}

#[derive(Clone)]
pub struct StreamRoutes<S> {
    inner: S,
    service: TickerService,
    limits: MessageLimits,
}

type Opening = Pin<Box<dyn Future<Output = http::Response<RouteBody>> + Send>>;

impl<S> Service<http::Request<Body>> for StreamRoutes<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
{
    type Response = http::Response<RouteBody>;
    type Error = Infallible;
    type Future = RouteFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let service = self.service.clone();
        let limits = self.limits;
        let opening: Opening = match request.uri().path() {
            TICKER_STREAM => {
                Box::pin(
                    async move { respond(ticker_stream(&service, request, limits).await, limits) },
                )
            }
            SUBSCRIBE => {
                Box::pin(async move { respond(subscribe(&service, request, limits).await, limits) })
            }
            _ => {
                return RouteFuture::Inner {
                    inner: self.inner.call(request),
                }
            }
        };
        RouteFuture::Ours { opening }
    }
}

pin_project_lite::pin_project! {
    #[project = RouteProj]
    pub enum RouteFuture<F> {
        Inner { #[pin] inner: F },
        Ours { opening: Opening },
    }
}

impl<F> Future for RouteFuture<F>
where
    F: Future<Output = Result<http::Response<Body>, Infallible>>,
{
    type Output = Result<http::Response<RouteBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            RouteProj::Inner { inner } => inner
                .poll(cx)
                .map(|answer| answer.map(|response| response.map(Either::Right))),
            RouteProj::Ours { opening } => opening.as_mut().poll(cx).map(Ok),
        }
    }
}

/// Compressed requests are refused, as tonic does when no compression is configured.
fn check_uncompressed<B>(request: &http::Request<B>) -> Result<(), Status> {
    match request.headers().get("grpc-encoding") {
        Some(e) if e.as_bytes() != b"identity" => Err(Status::unimplemented(format!(
            "request compression {e:?} is not supported; send uncompressed messages"
        ))),
        _ => Ok(()),
    }
}

/// The request messages of `body`, decoded as tonic's generated code would.
fn decode_requests<M>(body: Body, limits: MessageLimits) -> Streaming<M>
where
    M: Message + Default + Send + 'static,
{
    Streaming::new_request(
        RequestDecoder::<M>::default(),
        body,
        None,
        Some(limits.max_decoding),
    )
}

async fn ticker_stream(
    service: &TickerService,
    request: http::Request<Body>,
    limits: MessageLimits,
) -> Result<tonic::Response<Session>, Status> {
    check_uncompressed(&request)?;
    let direct = request.extensions().get::<Direct>().cloned();
    let request = request.map(|body| decode_requests::<TickerRequest>(body, limits));
    let response = service.ticker_stream(Request::from_http(request)).await?;
    if let Some(Direct(sink)) = direct {
        response.get_ref().set_direct(sink);
    }
    Ok(response)
}

async fn subscribe(
    service: &TickerService,
    request: http::Request<Body>,
    limits: MessageLimits,
) -> Result<tonic::Response<Session>, Status> {
    check_uncompressed(&request)?;
    let direct = request.extensions().get::<Direct>().cloned();
    let (parts, body) = request.into_parts();
    let mut messages = decode_requests::<SubscribeRequest>(body, limits);
    let message = messages.message().await?.ok_or_else(|| {
        Status::invalid_argument("Subscribe takes one SubscribeRequest; the request had none")
    })?;
    let request = Request::from_http(http::Request::from_parts(parts, message));
    let response = service.subscribe(request).await?;
    if let Some(Direct(sink)) = direct {
        response.get_ref().set_direct(sink);
    }
    Ok(response)
}

/// The HTTP response of an opened stream, or the trailers-only reply of a refused one.
fn respond(
    opened: Result<tonic::Response<Session>, Status>,
    limits: MessageLimits,
) -> http::Response<RouteBody> {
    match opened {
        Ok(response) => {
            let (metadata, session, extensions) = response.into_parts();
            let body = SessionBody::new(session, limits.max_encoding);
            let mut http = http::Response::new(Either::Left(body));
            *http.headers_mut() = metadata.into_headers();
            *http.extensions_mut() = extensions;
            http.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            http
        }
        Err(status) => status.into_http().map(Either::Right),
    }
}

/// The response body of any RPC: a session's (left), or tonic's for every other (right).
///
/// Why not tonic's boxed body: the connection keeps the body it polls in its
/// stream table, so a session's body sits there itself; each box on the way (there
/// were two) was a cold line read per woken stream, and the server's CPU per delivery
/// goes mostly to such reads.
pub type RouteBody = Either<SessionBody, Body>;

impl ResponseBody for RouteBody {
    fn warm(&self, depth: u8) -> u64 {
        match self {
            Either::Left(session) => session.warm(depth),
            Either::Right(_) => 0,
        }
    }

    fn poll_append(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut BytesMut,
        room: usize,
    ) -> Poll<Appended> {
        match self {
            Either::Left(session) => session.poll_append(cx, out, room),
            Either::Right(_) => Poll::Ready(Appended::UseFrame),
        }
    }
}

impl ResponseBody for MeteredBody<RouteBody> {
    fn warm(&self, depth: u8) -> u64 {
        self.inner().warm(depth)
    }

    fn poll_append(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut BytesMut,
        room: usize,
    ) -> Poll<Appended> {
        self.inner_mut().poll_append(cx, out, room)
    }
}

/// A session's response body: every message it has ready, gRPC-framed, appended to the
/// connection's buffer (`poll_append`) or in one chunk (`poll_frame`); then the trailers
/// with the status it ended with.
///
/// `repr(C)`, in this order: what every poll reads is on the struct's first line, next to
/// the session's first fields (see `Session`), so a woken stream's poll starts with one
/// line of it, not three.
#[repr(C)]
pub struct SessionBody {
    done: bool,
    max_message: usize,
    /// How the stream ended, once it has; sent as trailers after the data in hand.
    /// Boxed: it is set once per stream, and a `Status` inline was 170 bytes between
    /// the fields every poll reads.
    end: Option<Box<Status>>,
    /// A tick that is the only message so far: sent as the hub's bytes unless another
    /// message joins it.
    lone: Option<Bytes>,
    /// Messages framed since the last chunk (allocated on first use: an idle stream
    /// holds none).
    buf: BytesMut,
    session: Session,
}

impl SessionBody {
    pub fn new(session: Session, max_message: usize) -> SessionBody {
        SessionBody {
            session,
            buf: BytesMut::new(),
            lone: None,
            end: None,
            done: false,
            max_message,
        }
    }

    /// See `ResponseBody::warm`.
    fn warm(&self, depth: u8) -> u64 {
        if self.done {
            return 0;
        }
        self.session.warm(depth)
    }

    fn ready_len(&self) -> usize {
        self.buf.len() + self.lone.as_ref().map_or(0, Bytes::len)
    }

    fn spill_lone(&mut self) {
        if let Some(lone) = self.lone.take() {
            self.buf.reserve(1024.max(lone.len() * 2));
            self.buf.put_slice(&lone);
        }
    }

    fn push(&mut self, out: Outbound) -> Result<(), Status> {
        match out {
            Outbound::Tick(tick) => {
                self.check_size(tick.framed.len() - GRPC_PREFIX)?;
                if self.buf.is_empty() && self.lone.is_none() {
                    self.lone = Some(tick.framed.clone());
                } else {
                    self.spill_lone();
                    self.buf.put_slice(&tick.framed);
                }
            }
            Outbound::Message(msg) => {
                let len = msg.encoded_len();
                self.check_size(len)?;
                self.spill_lone();
                self.buf.reserve(GRPC_PREFIX + len);
                put_grpc_message(&msg, &mut self.buf);
            }
        }
        Ok(())
    }

    fn check_size(&self, len: usize) -> Result<(), Status> {
        if len > self.max_message || len > u32::MAX as usize {
            return Err(Status::out_of_range(format!(
                "a response message of {len} bytes is over the encoding limit of {} bytes \
                 (--max-encoding-message-size)",
                self.max_message
            )));
        }
        Ok(())
    }

    /// The messages in hand as one chunk. The buffer's bytes are copied out, not split
    /// off: the connection copies a chunk into its own buffer and drops it at once, and
    /// a split would share the buffer through a reference count on a line of its own
    /// (a cache miss and two locked instructions per chunk, in `perf annotate`).
    fn take_chunk(&mut self) -> Option<Bytes> {
        if !self.buf.is_empty() {
            let chunk = Bytes::copy_from_slice(&self.buf);
            self.buf.clear();
            return Some(chunk);
        }
        self.lone.take()
    }
}

impl SessionBody {
    /// `ResponseBody::poll_append`: the session's messages framed straight into the
    /// connection's buffer while they fit `room` (and `YIELD_AT`). What is left over
    /// (a message that did not fit, the end) stays here for `poll_frame`, which sends
    /// it first.
    fn poll_append(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut BytesMut,
        room: usize,
    ) -> Poll<Appended> {
        if self.done || self.end.is_some() || self.ready_len() > 0 {
            return Poll::Ready(Appended::UseFrame);
        }
        if self.session.is_quiet(cx) {
            return Poll::Pending;
        }
        let start = out.len();
        let room = room.min(YIELD_AT);
        loop {
            let written = out.len() - start;
            if written >= room {
                break;
            }
            match Pin::new(&mut self.session).poll_next(cx) {
                Poll::Ready(Some(Ok(msg))) => {
                    let len = match &msg {
                        Outbound::Tick(tick) => tick.framed.len(),
                        Outbound::Message(m) => GRPC_PREFIX + m.encoded_len(),
                    };
                    if let Err(status) = self.check_size(len - GRPC_PREFIX) {
                        self.end = Some(Box::new(status));
                        break;
                    }
                    if written + len > room {
                        // Kept for `poll_frame`, which splits it over the window.
                        let _ = self.push(msg);
                        break;
                    }
                    match msg {
                        Outbound::Tick(tick) => out.put_slice(&tick.framed),
                        Outbound::Message(m) => put_grpc_message(&*m, out),
                    }
                }
                Poll::Ready(Some(Err(status))) => {
                    self.end = Some(Box::new(status));
                    break;
                }
                Poll::Ready(None) => {
                    self.end = Some(Box::new(Status::ok("")));
                    break;
                }
                Poll::Pending => break,
            }
        }
        match out.len() - start {
            0 if self.end.is_none() && self.ready_len() == 0 => Poll::Pending,
            0 => Poll::Ready(Appended::UseFrame),
            n => Poll::Ready(Appended::Wrote(n)),
        }
    }
}

impl http_body::Body for SessionBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if this.end.is_none() && this.session.is_quiet(cx) {
            return Poll::Pending;
        }
        while this.end.is_none() && this.ready_len() < YIELD_AT {
            match Pin::new(&mut this.session).poll_next(cx) {
                Poll::Ready(Some(Ok(out))) => {
                    if let Err(status) = this.push(out) {
                        this.end = Some(Box::new(status));
                    }
                }
                Poll::Ready(Some(Err(status))) => this.end = Some(Box::new(status)),
                Poll::Ready(None) => this.end = Some(Box::new(Status::ok(""))),
                Poll::Pending => break,
            }
        }
        if let Some(chunk) = this.take_chunk() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        match this.end.take() {
            Some(status) => {
                this.done = true;
                Poll::Ready(Some(Ok(Frame::trailers(trailers(&status)))))
            }
            None => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// `grpc-status` and `grpc-message` of `status`; a message that cannot be a header
/// value becomes a plain INTERNAL rather than a broken stream.
fn trailers(status: &Status) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(3);
    if status.add_header(&mut map).is_err() {
        map.clear();
        map.insert("grpc-status", HeaderValue::from_static("13"));
    }
    map
}
