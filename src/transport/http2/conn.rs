//! One HTTP/2 connection, served by one task with one outbound buffer: each pass reads
//! what the socket has and handles its frames (`frame`, `headers`), polls only the
//! streams whose wakers fired (`stream`), appending their DATA to the buffer, and then
//! writes the buffer once. A tick that wakes twenty streams of a connection thus leaves
//! in one write, as the NATS server and grpc-go's loopy writer do it. `mod` spawns one
//! per accepted connection; the service behind it is tonic's router with the server's
//! layers, so every RPC is served as before.
//!
//! Backpressure: a stream is polled only while its send window, the connection's, and
//! the buffer (`HIGH_WATER`) have room, so a stalled client backs up into its
//! sessions' rings, never into memory here; and while the buffer is over `HIGH_WATER`
//! the socket is not read, so floods of frames that need an answer (PING, SETTINGS)
//! stop at the client's own TCP window.

use std::{
    collections::HashMap,
    future::Future,
    hash::{BuildHasherDefault, Hasher},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, Request, Response};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};
use tonic::body::Body;

use super::{
    direct::StreamSink,
    frame::{self, Error, Frame, Head},
    headers::{self, Refused},
    stream::{self, Sender, Shared, StreamWake},
    Drain, Options,
};
use crate::auth::PeerInfo;

mod direct;
mod drive;
mod frames;

/// The service's answer to one request.
pub type Call<B> = Pin<Box<dyn Future<Output = Response<B>> + Send>>;
/// The service: a request in, its answer out.
pub type Serve<B> = Arc<dyn Fn(Request<Body>) -> Call<B> + Send + Sync>;

/// A response body as the connection keeps it: in its stream table itself, not boxed
/// (see `grpc::routes::RouteBody` for why).
pub trait ResponseBody:
    http_body::Body<Data = Bytes, Error: std::fmt::Display> + Unpin + Send + 'static
{
    /// Reads memory the body's next poll will read and returns anything made of it:
    /// at `depth` 0 the body itself, at 1 what it points to, at 2 what that points to.
    /// The pass calls it for every ready stream, depth by depth, before polling them:
    /// the loads of one depth do not depend on one another, so their cache misses are
    /// in flight together instead of stalling the pass one stream at a time.
    fn warm(&self, depth: u8) -> u64 {
        let _ = depth;
        0
    }

    /// Appends the data the body has ready straight to the connection's buffer, whole
    /// messages of at most `room` bytes in all, instead of handing it over as a frame
    /// to copy. `Appended::UseFrame` sends the connection to `poll_frame` (trailers, an
    /// end, a message that did not fit); bodies that only have frames say so always.
    fn poll_append(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut BytesMut,
        room: usize,
    ) -> Poll<Appended> {
        let _ = (cx, out, room);
        Poll::Ready(Appended::UseFrame)
    }
}

/// What `ResponseBody::poll_append` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// This many bytes of whole messages, at the end of the buffer.
    Wrote(usize),
    /// Nothing now: read the body with `poll_frame`.
    UseFrame,
}

impl ResponseBody for tonic::body::Body {}

/// The outbound buffer's bound: past it no stream is polled and the socket is not read.
pub(super) const HIGH_WATER: usize = 64 * 1024;
/// Empty DATA frames in a row (no END_STREAM) that end the connection.
const MAX_EMPTY_DATA: u32 = 1_000;
/// A header block (HEADERS and its CONTINUATIONs) longer than this many times the
/// header-list limit is a flood.
const HEADER_BLOCK_FACTOR: usize = 2;
/// Passes one poll makes before yielding to other tasks.
const PASSES: usize = 16;
/// What our keepalive PINGs carry.
const PING: [u8; 8] = *b"tickerd!";

/// Stream ids are the client's odd counter. A multiply spreads them at a fraction of
/// SipHash's cost (SipHash was a tenth of the connection's instructions); the table's
/// index comes from the product's high half, which every bit of the id reaches. A
/// client choosing colliding ids gains little: at most `max_concurrent_streams` live.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0.rotate_left(32)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u32(u32::from(b) ^ (self.0 as u32));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

enum Phase<B> {
    Calling(Call<B>),
    Body(B),
    Done,
}

/// One stream, laid out by hand with what a woken stream's pass reads first: the
/// server's CPU per delivery goes mostly to reading cold lines, one stream after another.
#[repr(C)]
struct Stream<B> {
    wake: Arc<StreamWake>,
    waker: Waker,
    send_window: i64,
    /// Where publishes frame its ticks while it is idle (`direct`; with the option).
    sink: Option<Arc<StreamSink>>,
    /// DATA polled from the body that the windows did not let out yet.
    pending: Option<Bytes>,
    /// On `conn_blocked` or `deferred` already: a stream woken again while it waits is
    /// not listed twice, so the lists stay as long as the stream count.
    parked: bool,
    /// The client may still send (no END_STREAM yet).
    recv_open: bool,
    phase: Phase<B>,
    /// Trailers waiting behind `pending`.
    trailers: Option<Box<HeaderMap>>,
    /// The request body's sender (none for a request without one): kept until the
    /// stream goes, so that what the service never read is given back then.
    sender: Option<Sender>,
    recv_window: i64,
    /// Read by the service but not yet given back to the client (`release`).
    recv_unreleased: usize,
    /// `grpc-timeout`, until the response head.
    deadline: Option<Pin<Box<Sleep>>>,
}

/// A header block still waiting for its CONTINUATION frames.
struct Continuing {
    id: u32,
    block: BytesMut,
    end_stream: bool,
    frames: usize,
}

/// A connection on its way out: the buffer is written and the socket shut for writing.
/// A graceful close (the drain done) then reads and drops until the client closes too,
/// so that closing with its bytes unread does not reset the connection and lose what was
/// sent; it keeps writing past `bound`, ended only by the server's drain timeout (the
/// forced close). An error close gives up at `bound` and reads nothing more.
struct Closing {
    bound: Pin<Box<Sleep>>,
    graceful: bool,
    shut: bool,
}

/// What a stream's pass leaves it waiting for.
enum Parked {
    /// Its waker, or its window (a stream WINDOW_UPDATE drives it).
    Nothing,
    ConnWindow,
    Buffer,
    Finished,
}

/// The outbound side: the buffer and the windows and frame size it obeys.
struct Writer {
    out: BytesMut,
    conn_window: i64,
    max_frame: usize,
    scratch: Vec<u8>,
}

impl Writer {
    /// Writes as much of `data` as the windows allow; returns the rest.
    fn data(&mut self, id: u32, window: &mut i64, mut data: Bytes, end: bool) -> Option<Bytes> {
        if data.is_empty() && end {
            frame::put_head(&mut self.out, 0, frame::DATA, frame::END_STREAM, id);
            return None;
        }
        while !data.is_empty() {
            let room = (*window).min(self.conn_window).min(self.max_frame as i64);
            if room <= 0 {
                return Some(data);
            }
            let n = data.len().min(room as usize);
            let flags = if end && n == data.len() {
                frame::END_STREAM
            } else {
                0
            };
            frame::put_head(&mut self.out, n, frame::DATA, flags, id);
            self.out.extend_from_slice(&data[..n]);
            data.advance(n);
            *window -= n as i64;
            self.conn_window -= n as i64;
        }
        None
    }

    fn headers(&mut self, id: u32, end_stream: bool) {
        frame::put_headers(&mut self.out, id, &self.scratch, end_stream, self.max_frame);
        self.scratch.clear();
    }
}

/// One connection; a future that ends when the connection does.
pub struct Connection<IO, B> {
    io: IO,
    serve: Serve<B>,
    peer: PeerInfo,
    options: Arc<Options>,
    shared: Arc<Shared>,
    streams: HashMap<u32, Stream<B>, BuildHasherDefault<IdHasher>>,
    decoder: headers::Decoder,
    w: Writer,
    rbuf: BytesMut,
    scratch: Box<[u8]>,
    preface: bool,
    /// The highest stream id the client opened.
    last_stream: u32,
    /// A header block still waiting for CONTINUATION.
    continuing: Option<Continuing>,
    peer_initial_window: i64,
    /// Connection window we granted and the client has not used, and what the service
    /// has read and not been given back yet.
    recv_window: i64,
    recv_unreleased: usize,
    runnable: Vec<u32>,
    conn_blocked: Vec<u32>,
    deferred: Vec<u32>,
    taken: Vec<u32>,
    released: Vec<(u32, usize)>,
    empty_data: u32,
    /// Streams the client reset before their answer, in the current second.
    early_resets: usize,
    early_since: Instant,
    local_resets: usize,
    keepalive: Pin<Box<Sleep>>,
    ping_out: bool,
    /// When the socket last had bytes: the keepalive PINGs only a quiet connection.
    last_read: Instant,
    age: Option<Pin<Box<Sleep>>>,
    grace: Option<Pin<Box<Sleep>>>,
    stop: Arc<Drain>,
    /// GOAWAY sent: no new streams; the connection ends when its streams have.
    draining: bool,
    /// Ending: nothing more is read or polled; the buffer is written, then the socket
    /// is shut, by the deadline.
    closing: Option<Closing>,
}

impl<IO: AsyncRead + AsyncWrite + Unpin, B: ResponseBody> Connection<IO, B> {
    pub fn new(
        io: IO,
        peer: PeerInfo,
        serve: Serve<B>,
        options: Arc<Options>,
        stop: Arc<Drain>,
    ) -> Connection<IO, B> {
        let shared = Arc::new(Shared::default());
        stop.join(&shared);
        let mut w = Writer {
            out: BytesMut::with_capacity(4096),
            conn_window: 65_535,
            max_frame: frame::DEFAULT_MAX_FRAME as usize,
            scratch: Vec::new(),
        };
        frame::put_settings(
            &mut w.out,
            &[
                (
                    frame::SETTINGS_MAX_CONCURRENT_STREAMS,
                    options.max_concurrent_streams,
                ),
                (frame::SETTINGS_INITIAL_WINDOW_SIZE, options.stream_window),
                (
                    frame::SETTINGS_MAX_HEADER_LIST_SIZE,
                    options.max_header_list_size,
                ),
            ],
        );
        let grant = options.connection_window.saturating_sub(65_535);
        if grant > 0 {
            frame::put_window_update(&mut w.out, 0, grant);
        }
        let age = options
            .max_connection_age
            .map(|(age, _)| Box::pin(tokio::time::sleep(age)));
        Connection {
            io,
            serve,
            peer,
            shared,
            streams: HashMap::default(),
            decoder: headers::Decoder::new(options.max_header_list_size as usize),
            w,
            rbuf: BytesMut::with_capacity(16 * 1024),
            scratch: vec![0; 16 * 1024].into_boxed_slice(),
            preface: false,
            last_stream: 0,
            continuing: None,
            peer_initial_window: 65_535,
            recv_window: i64::from(options.connection_window.max(65_535)),
            recv_unreleased: 0,
            runnable: Vec::new(),
            conn_blocked: Vec::new(),
            deferred: Vec::new(),
            taken: Vec::new(),
            released: Vec::new(),
            empty_data: 0,
            early_resets: 0,
            early_since: Instant::now(),
            local_resets: 0,
            keepalive: Box::pin(tokio::time::sleep(options.keepalive_interval)),
            ping_out: false,
            last_read: Instant::now(),
            age,
            grace: None,
            stop,
            draining: false,
            closing: None,
            options,
        }
    }

    /// Ends the connection with GOAWAY `e`.
    fn fail(&mut self, e: Error) {
        if self.closing.is_some() {
            return;
        }
        tracing::debug!(peer = ?self.peer.addr, code = e.code, reason = e.reason, "HTTP/2 connection error");
        frame::put_goaway(&mut self.w.out, self.last_stream, e.code, e.reason);
        self.close(false);
    }

    /// Ends the connection: see `Closing`.
    fn close(&mut self, graceful: bool) {
        self.streams.clear();
        let bound = self.options.keepalive_timeout.max(Duration::from_secs(1));
        self.closing = Some(Closing {
            bound: Box::pin(tokio::time::sleep(bound)),
            graceful,
            shut: false,
        });
    }

    /// Stops taking streams (GOAWAY NO_ERROR); ends once the open ones have.
    fn drain(&mut self) {
        if !self.draining && self.closing.is_none() {
            self.draining = true;
            frame::put_goaway(&mut self.w.out, self.last_stream, frame::NO_ERROR, "");
        }
    }

    fn reset(&mut self, id: u32, code: u32) {
        self.direct_close(id);
        frame::put_reset(&mut self.w.out, id, code);
        self.remove(id, code);
    }

    /// Forgets stream `id`: its request body ends (with `code` if the client had not
    /// ended it), and the bytes the service never read go back to the connection's
    /// window, so an unread body cannot shrink it for good.
    fn remove(&mut self, id: u32, code: u32) -> Option<Stream<B>> {
        let mut stream = self.streams.remove(&id)?;
        if let Some(sender) = stream.sender.take() {
            let unread = sender.close(code);
            self.release(0, unread);
        }
        Some(stream)
    }

    /// A stream error the client caused: too many of them is an attack.
    fn refuse(&mut self, id: u32, code: u32) {
        self.reset(id, code);
        self.local_resets += 1;
        if self.local_resets > self.options.max_local_error_reset_streams {
            self.fail(frame::error(
                frame::ENHANCE_YOUR_CALM,
                "too many streams in error",
            ));
        }
    }
}
