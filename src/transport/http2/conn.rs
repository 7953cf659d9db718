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

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, Request, Response};
use http_body::Body as _;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};
use tonic::body::Body;

use super::{
    frame::{self, Error, Frame, Head},
    headers::{self, Refused},
    stream::{self, Sender, Shared, StreamWake},
    Drain, Options,
};
use crate::auth::PeerInfo;

mod drive;

/// The service's answer to one request.
pub type Call = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;
/// The service: a request in, its answer out.
pub type Serve = Arc<dyn Fn(Request<Body>) -> Call + Send + Sync>;

/// The outbound buffer's bound: past it no stream is polled and the socket is not read.
const HIGH_WATER: usize = 64 * 1024;
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

enum Phase {
    Calling(Call),
    Body(Body),
    Done,
}

struct Stream {
    wake: Arc<StreamWake>,
    waker: Waker,
    /// The request body's sender (none for a request without one): kept until the
    /// stream goes, so that what the service never read is given back then.
    sender: Option<Sender>,
    /// The client may still send (no END_STREAM yet).
    recv_open: bool,
    recv_window: i64,
    send_window: i64,
    phase: Phase,
    /// DATA polled from the body that the windows did not let out yet.
    pending: Option<Bytes>,
    /// Trailers waiting behind `pending`.
    trailers: Option<HeaderMap>,
    /// `grpc-timeout`, until the response head.
    deadline: Option<Pin<Box<Sleep>>>,
    /// On `conn_blocked` or `deferred` already: a stream woken again while it waits is
    /// not listed twice, so the lists stay as long as the stream count.
    parked: bool,
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
pub struct Connection<IO> {
    io: IO,
    serve: Serve,
    peer: PeerInfo,
    options: Arc<Options>,
    shared: Arc<Shared>,
    streams: HashMap<u32, Stream, BuildHasherDefault<IdHasher>>,
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

impl<IO: AsyncRead + AsyncWrite + Unpin> Connection<IO> {
    pub fn new(
        io: IO,
        peer: PeerInfo,
        serve: Serve,
        options: Arc<Options>,
        stop: Arc<Drain>,
    ) -> Connection<IO> {
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
        frame::put_reset(&mut self.w.out, id, code);
        self.remove(id, code);
    }

    /// Forgets stream `id`: its request body ends (with `code` if the client had not
    /// ended it), and the bytes the service never read go back to the connection's
    /// window, so an unread body cannot shrink it for good.
    fn remove(&mut self, id: u32, code: u32) -> Option<Stream> {
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

    fn on_frame(&mut self, f: Frame) -> Result<(), Error> {
        match f {
            Frame::Data {
                stream,
                end,
                data,
                flow,
            } => self.on_data(stream, end, data, flow),
            Frame::Headers {
                stream,
                end_stream,
                end_headers,
                block,
            } => {
                if stream.is_multiple_of(2) {
                    return Err(frame::error(frame::PROTOCOL_ERROR, "even stream id"));
                }
                if end_headers {
                    return self.on_header_block(stream, &block, end_stream);
                }
                self.continuing = Some(Continuing {
                    id: stream,
                    block: BytesMut::from(&block[..]),
                    end_stream,
                    frames: 1,
                });
                self.check_block_size()
            }
            Frame::Continuation {
                stream,
                end_headers,
                block,
            } => {
                let Some(c) = self.continuing.as_mut() else {
                    return Err(frame::error(
                        frame::PROTOCOL_ERROR,
                        "CONTINUATION unexpected",
                    ));
                };
                if c.id != stream {
                    return Err(frame::error(
                        frame::PROTOCOL_ERROR,
                        "CONTINUATION elsewhere",
                    ));
                }
                c.block.extend_from_slice(&block);
                c.frames += 1;
                self.check_block_size()?;
                if end_headers {
                    if let Some(c) = self.continuing.take() {
                        return self.on_header_block(c.id, &c.block, c.end_stream);
                    }
                }
                Ok(())
            }
            Frame::Priority | Frame::Unknown => Ok(()),
            Frame::Reset { stream, code } => {
                if stream > self.last_stream {
                    return Err(frame::error(frame::PROTOCOL_ERROR, "RST_STREAM on idle"));
                }
                if let Some(s) = self.remove(stream, code) {
                    if matches!(s.phase, Phase::Calling(_)) {
                        if self.early_since.elapsed() > Duration::from_secs(1) {
                            self.early_since = Instant::now();
                            self.early_resets = 0;
                        }
                        self.early_resets += 1;
                    }
                }
                if self.early_resets > self.options.max_pending_accept_reset_streams {
                    return Err(frame::error(
                        frame::ENHANCE_YOUR_CALM,
                        "too many streams reset before their answer",
                    ));
                }
                Ok(())
            }
            Frame::Settings { ack, values } => {
                if !ack {
                    self.apply_settings(&values)?;
                    frame::put_settings_ack(&mut self.w.out);
                }
                Ok(())
            }
            Frame::Ping { ack, data } => {
                if !ack {
                    frame::put_ping(&mut self.w.out, true, data);
                } else if data == PING && self.ping_out {
                    self.ping_out = false;
                    let next = Instant::now() + self.options.keepalive_interval;
                    self.keepalive.as_mut().reset(next);
                }
                Ok(())
            }
            Frame::GoAway { code, .. } => {
                if code != frame::NO_ERROR {
                    self.close(false);
                } else {
                    self.drain();
                }
                Ok(())
            }
            Frame::WindowUpdate { stream, increment } => self.on_window_update(stream, increment),
            Frame::PushPromise => Err(frame::error(frame::PROTOCOL_ERROR, "PUSH_PROMISE")),
        }
    }

    fn check_block_size(&self) -> Result<(), Error> {
        let limit = HEADER_BLOCK_FACTOR * self.options.max_header_list_size as usize;
        match &self.continuing {
            // Each frame counts its header too, so empty CONTINUATIONs flood no further.
            Some(c) if c.block.len() + c.frames * frame::HEAD > limit.max(16 * 1024) => Err(
                frame::error(frame::ENHANCE_YOUR_CALM, "header block too long"),
            ),
            _ => Ok(()),
        }
    }

    fn apply_settings(&mut self, values: &[(u16, u32)]) -> Result<(), Error> {
        for &(id, value) in values {
            match id {
                frame::SETTINGS_ENABLE_PUSH if value > 1 => {
                    return Err(frame::error(frame::PROTOCOL_ERROR, "ENABLE_PUSH"));
                }
                frame::SETTINGS_INITIAL_WINDOW_SIZE => {
                    let value = i64::from(value);
                    if value > frame::MAX_WINDOW {
                        return Err(frame::error(
                            frame::FLOW_CONTROL_ERROR,
                            "INITIAL_WINDOW_SIZE",
                        ));
                    }
                    let delta = value - self.peer_initial_window;
                    self.peer_initial_window = value;
                    for (id, s) in self.streams.iter_mut() {
                        let was = s.send_window;
                        s.send_window += delta;
                        if s.send_window > frame::MAX_WINDOW {
                            return Err(frame::error(frame::FLOW_CONTROL_ERROR, "window"));
                        }
                        if was <= 0 && s.send_window > 0 {
                            self.runnable.push(*id);
                        }
                    }
                }
                frame::SETTINGS_MAX_FRAME_SIZE => {
                    if !(frame::DEFAULT_MAX_FRAME..1 << 24).contains(&value) {
                        return Err(frame::error(frame::PROTOCOL_ERROR, "MAX_FRAME_SIZE"));
                    }
                    self.w.max_frame = value as usize;
                }
                // HEADER_TABLE_SIZE: the server never indexes what it sends, so any
                // table size suits it. The others do not concern a server.
                _ => {}
            }
        }
        Ok(())
    }

    fn on_window_update(&mut self, id: u32, increment: u32) -> Result<(), Error> {
        let increment = i64::from(increment);
        if id == 0 {
            if increment == 0 {
                return Err(frame::error(frame::PROTOCOL_ERROR, "zero WINDOW_UPDATE"));
            }
            let was = self.w.conn_window;
            self.w.conn_window += increment;
            if self.w.conn_window > frame::MAX_WINDOW {
                return Err(frame::error(frame::FLOW_CONTROL_ERROR, "window overflow"));
            }
            if was <= 0 && self.w.conn_window > 0 {
                let mut blocked = std::mem::take(&mut self.conn_blocked);
                self.unpark(&mut blocked);
            }
            return Ok(());
        }
        if id > self.last_stream {
            return Err(frame::error(frame::PROTOCOL_ERROR, "WINDOW_UPDATE on idle"));
        }
        let Some(s) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        if increment == 0 {
            self.refuse(id, frame::PROTOCOL_ERROR);
            return Ok(());
        }
        let was = s.send_window;
        s.send_window += increment;
        if s.send_window > frame::MAX_WINDOW {
            self.refuse(id, frame::FLOW_CONTROL_ERROR);
        } else if was <= 0 && s.send_window > 0 {
            self.runnable.push(id);
        }
        Ok(())
    }

    fn on_data(&mut self, id: u32, end: bool, data: Bytes, flow: usize) -> Result<(), Error> {
        if id > self.last_stream {
            return Err(frame::error(frame::PROTOCOL_ERROR, "DATA on idle stream"));
        }
        self.recv_window -= flow as i64;
        if self.recv_window < 0 {
            return Err(frame::error(frame::FLOW_CONTROL_ERROR, "connection window"));
        }
        if data.is_empty() && !end {
            self.empty_data += 1;
            if self.empty_data > MAX_EMPTY_DATA {
                return Err(frame::error(frame::ENHANCE_YOUR_CALM, "empty DATA flood"));
            }
        } else {
            self.empty_data = 0;
        }
        // Padding, and anything for a stream that is gone, is given back at once.
        let kept = match self.streams.get_mut(&id) {
            Some(s) if s.recv_open => {
                s.recv_window -= flow as i64;
                if s.recv_window < 0 {
                    self.release(0, flow);
                    self.refuse(id, frame::FLOW_CONTROL_ERROR);
                    return Ok(());
                }
                if let Some(sender) = &s.sender {
                    if !data.is_empty() {
                        sender.push(data.clone());
                    }
                    if end {
                        sender.end();
                    }
                }
                if end {
                    s.recv_open = false;
                    if matches!(s.phase, Phase::Done) {
                        self.remove(id, frame::NO_ERROR);
                    }
                }
                data.len()
            }
            Some(_) => {
                self.release(0, flow);
                self.refuse(id, frame::STREAM_CLOSED);
                return Ok(());
            }
            None => 0,
        };
        self.release(0, flow - kept);
        Ok(())
    }

    /// Gives back `n` bytes of window: the connection's always, the stream's if open.
    fn release(&mut self, id: u32, n: usize) {
        if n == 0 {
            return;
        }
        if id != 0 {
            if let Some(s) = self.streams.get_mut(&id) {
                if s.recv_open {
                    s.recv_window += n as i64;
                    frame::put_window_update(&mut self.w.out, id, n as u32);
                }
            }
        }
        self.recv_unreleased += n;
        if self.recv_unreleased >= (self.options.connection_window as usize / 4).max(1) {
            let n = std::mem::take(&mut self.recv_unreleased);
            self.recv_window += n as i64;
            frame::put_window_update(&mut self.w.out, 0, n as u32);
        }
    }

    fn on_header_block(&mut self, id: u32, block: &[u8], end_stream: bool) -> Result<(), Error> {
        if id <= self.last_stream {
            // Trailers of a request, or HEADERS on a stream that is gone.
            let decoded = self.decoder.trailers(block);
            if let Err(Refused::Connection(e)) = decoded {
                return Err(e);
            }
            match self.streams.get_mut(&id) {
                Some(s) if s.recv_open && end_stream => {
                    s.recv_open = false;
                    if let Some(sender) = &s.sender {
                        sender.end();
                    }
                    if matches!(s.phase, Phase::Done) {
                        self.remove(id, frame::NO_ERROR);
                    }
                }
                Some(_) => self.refuse(id, frame::PROTOCOL_ERROR),
                None => frame::put_reset(&mut self.w.out, id, frame::STREAM_CLOSED),
            }
            return Ok(());
        }
        self.last_stream = id;
        let head = match self.decoder.request(block) {
            Ok(head) => head,
            Err(Refused::Connection(e)) => return Err(e),
            Err(Refused::Stream(code, why)) => {
                tracing::debug!(peer = ?self.peer.addr, stream = id, why, "request refused");
                frame::put_reset(&mut self.w.out, id, code);
                self.local_resets += 1;
                if self.local_resets > self.options.max_local_error_reset_streams {
                    return Err(frame::error(
                        frame::ENHANCE_YOUR_CALM,
                        "too many streams in error",
                    ));
                }
                return Ok(());
            }
        };
        if self.draining || self.streams.len() >= self.options.max_concurrent_streams as usize {
            frame::put_reset(&mut self.w.out, id, frame::REFUSED_STREAM);
            return Ok(());
        }
        self.open(id, head, end_stream);
        Ok(())
    }

    fn open(&mut self, id: u32, head: headers::Head, end_stream: bool) {
        let wake = StreamWake::new(id, Arc::clone(&self.shared));
        let waker = stream::waker(&wake);
        let (sender, body) = if end_stream {
            (None, Body::empty())
        } else {
            let (sender, body) = stream::channel(id, Arc::clone(&self.shared));
            (Some(sender), Body::new(body))
        };
        let (parts, ()) = head.into_parts();
        let mut request = Request::from_parts(parts, body);
        request.extensions_mut().insert(self.peer.clone());
        let deadline =
            stream::grpc_timeout(request.headers()).map(|d| Box::pin(tokio::time::sleep(d)));
        let call = (self.serve)(request);
        self.streams.insert(
            id,
            Stream {
                wake,
                waker,
                recv_open: sender.is_some(),
                sender,
                recv_window: i64::from(self.options.stream_window),
                send_window: self.peer_initial_window,
                phase: Phase::Calling(call),
                pending: None,
                trailers: None,
                deadline,
                parked: false,
            },
        );
        self.runnable.push(id);
    }
}
