//! The load generator's cheaper reader (`--reader frames`, the default): one task per
//! connection speaks plaintext HTTP/2 over the server's own framing
//! (`transport::http2::frame`), opens its streams' TickerStreams and records each tick
//! straight from the DATA frames it reads: no task, channel or body per stream.
//! Neighbours: `reader` (the tonic reader, and the per-message bookkeeping both share),
//! `wire` (decoding a response), `mod.rs` (which streams go where).
//!
//! Why: read through tonic and h2, a message costs the tool 1.2–1.5 µs, more than the
//! server spends delivering it, and on a 2-core machine the tool's one reading thread
//! then takes the CPU the server needs and bounds the p99 it reports.

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::oneshot,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use super::{
    reader::{self, CatchUp, Reader, SharedStats, StepStats, SymbolTrack},
    wire::{Seen, SymbolTable},
    Error, ScheduleCell,
};
use crate::{
    clock,
    pb::TickerRequest,
    transport::http2::frame::{self, Frame, Head},
};

const PATH: &str = "/ticker.v1.TickerStreamService/TickerStream";
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The stream window when `--stream-window` is not given, and the connection window:
/// tonic's client defaults, so both readers see the same flow control.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONN_WINDOW: u32 = 5 * 1024 * 1024;
/// Frames larger than the default SETTINGS_MAX_FRAME_SIZE, which this client never
/// raises, are a connection error.
const MAX_FRAME: usize = 16_384;
/// Largest response message (tonic's default decoding limit).
const MAX_MESSAGE: usize = 4 << 20;
/// Largest header block (HEADERS plus CONTINUATIONs) kept while it is continued.
const MAX_BLOCK: usize = 64 * 1024;

/// Opens one connection to `authority` (host:port, plaintext) carrying `readers` (reading
/// streams only: a slow stream needs the tonic reader's per-stream backpressure). Returns
/// once every subscription is acked, with the task that reads until the readers' stop
/// token fires or the server ends every stream.
pub async fn start(
    authority: String,
    stream_window: Option<u32>,
    readers: Vec<Reader>,
) -> Result<JoinHandle<Vec<CatchUp>>, Error> {
    let Some(first) = readers.first() else {
        return Ok(tokio::spawn(async { Vec::new() }));
    };
    let (table, stats, stop, schedule) = (
        first.table.clone(),
        first.stats.clone(),
        first.stop.clone(),
        first.schedule.clone(),
    );
    let window = stream_window
        .unwrap_or(STREAM_WINDOW)
        .clamp(1, i32::MAX as u32);
    let mut sock = TcpStream::connect(&authority)
        .await
        .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
    sock.set_nodelay(true)?;

    let mut out = BytesMut::with_capacity(4096);
    out.extend_from_slice(PREFACE);
    frame::put_settings(
        &mut out,
        &[
            (frame::SETTINGS_ENABLE_PUSH, 0),
            (frame::SETTINGS_INITIAL_WINDOW_SIZE, window),
        ],
    );
    frame::put_window_update(&mut out, 0, CONN_WINDOW - 65_535);
    let mut streams = Vec::with_capacity(readers.len());
    for (k, r) in readers.iter().enumerate() {
        let id = 2 * k as u32 + 1;
        let mut block = Vec::with_capacity(160);
        for (name, value) in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", PATH),
            (":authority", authority.as_str()),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ] {
            crate::transport::http2::headers::literal(
                name.as_bytes(),
                value.as_bytes(),
                &mut block,
            );
        }
        frame::put_headers(&mut out, id, &block, false, MAX_FRAME);
        let mut body = Vec::new();
        let mut tracks = Vec::with_capacity(r.symbols.len());
        for &i in &r.symbols {
            let request = TickerRequest::subscribe(table.names()[i].clone());
            body.push(0);
            body.extend_from_slice(&(request.encoded_len() as u32).to_be_bytes());
            request.encode(&mut body)?;
            tracks.push(SymbolTrack {
                symbol: i,
                ..SymbolTrack::default()
            });
        }
        tracks.sort_by_key(|t| t.symbol);
        // The request stays open (a TickerStream's requests are the client's to end).
        for chunk in body.chunks(MAX_FRAME) {
            frame::put_head(&mut out, chunk.len(), frame::DATA, 0, id);
            out.extend_from_slice(chunk);
        }
        streams.push(Stream {
            id,
            want: tracks.len(),
            tracks,
            acked: 0,
            partial: BytesMut::new(),
            unreturned: 0,
            ended: false,
        });
    }
    sock.write_all(&out).await?;

    let (ready, acked) = oneshot::channel();
    let conn = Conn {
        live: streams.len(),
        subscribing: streams.len(),
        streams,
        hpack: loona_hpack::Decoder::new(),
        block: None,
        out: BytesMut::with_capacity(256),
        conn_unreturned: 0,
        window,
        table,
        schedule,
        ready: Some(ready),
    };
    let task = tokio::spawn(conn.run(sock, stats, stop, authority));
    match acked.await {
        Ok(Ok(())) => Ok(task),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err("the connection ended during subscribe".into()),
    }
}

/// One TickerStream of the connection.
struct Stream {
    id: u32,
    tracks: Vec<SymbolTrack>,
    /// Subscriptions asked for, and acked so far.
    want: usize,
    acked: usize,
    /// A message split over DATA frames: its bytes so far, 5-byte prefix included.
    partial: BytesMut,
    /// Bytes read and not yet returned to the server in a WINDOW_UPDATE.
    unreturned: u32,
    ended: bool,
}

struct Conn {
    streams: Vec<Stream>,
    /// Streams not ended, and streams not yet fully acked.
    live: usize,
    subscribing: usize,
    hpack: loona_hpack::Decoder<'static>,
    /// A header block being continued: stream, bytes so far, END_STREAM.
    block: Option<(u32, BytesMut, bool)>,
    /// Frames to write after this read (acks, window updates).
    out: BytesMut,
    conn_unreturned: u32,
    window: u32,
    table: Arc<SymbolTable>,
    schedule: ScheduleCell,
    ready: Option<oneshot::Sender<Result<(), String>>>,
}

impl Conn {
    async fn run(
        mut self,
        mut sock: TcpStream,
        stats: SharedStats,
        stop: CancellationToken,
        authority: String,
    ) -> Vec<CatchUp> {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        let ended = loop {
            if buf.capacity() - buf.len() < 16 * 1024 {
                buf.reserve(64 * 1024);
            }
            let read = tokio::select! {
                biased;
                read = sock.read_buf(&mut buf) => read,
                _ = &mut stopped => break Ok(()),
            };
            match read {
                Ok(0) => break Err("the server closed the connection".to_string()),
                Ok(_) => {}
                Err(e) => break Err(format!("read failed: {e}")),
            }
            // Everything in one read arrived at once.
            let now = clock::now_unix_nanos();
            let done = {
                let mut stats = stats.lock().unwrap_or_else(|e| e.into_inner());
                self.frames(&mut buf, now, &mut stats)
            };
            if !self.out.is_empty() {
                if let Err(e) = sock.write_all(&self.out).await {
                    break Err(format!("write failed: {e}"));
                }
                self.out.clear();
            }
            match done {
                Err(e) => break Err(e),
                Ok(()) if self.live == 0 => break Ok(()),
                Ok(()) => {}
            }
        };
        if let Err(e) = ended {
            match self.ready.take() {
                Some(ready) => {
                    let _ = ready.send(Err(format!("{authority}: {e}")));
                }
                None if !stop.is_cancelled() => eprintln!("tickerd-bench: {authority}: {e}"),
                None => {}
            }
        }
        self.streams.into_iter().map(|s| s.tracks).collect()
    }

    /// Handles every whole frame in `buf`.
    fn frames(
        &mut self,
        buf: &mut BytesMut,
        now: i64,
        stats: &mut [StepStats],
    ) -> Result<(), String> {
        while buf.len() >= frame::HEAD {
            let mut head = [0u8; frame::HEAD];
            head.copy_from_slice(&buf[..frame::HEAD]);
            let head = Head::parse(&head);
            if head.len > MAX_FRAME {
                return Err(format!("a {}-byte frame, past the 16 KiB limit", head.len));
            }
            if buf.len() < frame::HEAD + head.len {
                break;
            }
            buf.advance(frame::HEAD);
            let payload = buf.split_to(head.len).freeze();
            let frame = frame::parse(head, payload)
                .map_err(|e| format!("bad frame from the server: {}", e.reason))?;
            self.frame(frame, now, stats)?;
        }
        Ok(())
    }

    fn frame(&mut self, frame: Frame, now: i64, stats: &mut [StepStats]) -> Result<(), String> {
        if self.block.is_some() && !matches!(frame, Frame::Continuation { .. }) {
            return Err("a header block was interrupted".into());
        }
        match frame {
            Frame::Data {
                stream, data, flow, ..
            } => {
                let flow = flow as u32;
                self.conn_unreturned += flow;
                if self.conn_unreturned >= CONN_WINDOW / 2 {
                    frame::put_window_update(&mut self.out, 0, self.conn_unreturned);
                    self.conn_unreturned = 0;
                }
                if let Some(k) = self.index(stream) {
                    self.data(k, data, now, stats)?;
                    let s = &mut self.streams[k];
                    s.unreturned += flow;
                    if !s.ended && s.unreturned >= self.window / 2 {
                        frame::put_window_update(&mut self.out, s.id, s.unreturned);
                        s.unreturned = 0;
                    }
                }
            }
            Frame::Headers {
                stream,
                end_stream,
                end_headers,
                block,
            } => {
                if end_headers {
                    self.head(stream, &block, end_stream)?;
                } else {
                    self.block = Some((stream, BytesMut::from(&block[..]), end_stream));
                }
            }
            Frame::Continuation {
                stream,
                end_headers,
                block,
            } => {
                let Some((on, mut sofar, end_stream)) = self.block.take() else {
                    return Err("CONTINUATION without a header block".into());
                };
                if on != stream || sofar.len() + block.len() > MAX_BLOCK {
                    return Err("a header block's CONTINUATION is wrong or too long".into());
                }
                sofar.extend_from_slice(&block);
                if end_headers {
                    self.head(stream, &sofar, end_stream)?;
                } else {
                    self.block = Some((on, sofar, end_stream));
                }
            }
            Frame::Reset { stream, code } => {
                self.end(stream, &format!("stream reset by the server (code {code})"))?
            }
            Frame::Settings { ack: false, .. } => frame::put_settings_ack(&mut self.out),
            Frame::Ping { ack: false, data } => frame::put_ping(&mut self.out, true, data),
            Frame::GoAway { last, code } => {
                let ids: Vec<u32> = self.streams.iter().map(|s| s.id).collect();
                for id in ids.into_iter().filter(|&id| id > last || code != 0) {
                    self.end(id, &format!("GOAWAY from the server (code {code})"))?;
                }
            }
            Frame::PushPromise => return Err("PUSH_PROMISE, though push is off".into()),
            _ => {}
        }
        Ok(())
    }

    fn index(&self, id: u32) -> Option<usize> {
        let k = (id.checked_sub(1)? / 2) as usize;
        (id % 2 == 1 && k < self.streams.len()).then_some(k)
    }

    /// A stream's DATA: whole gRPC messages are read in place, a split one is kept.
    fn data(
        &mut self,
        k: usize,
        data: Bytes,
        now: i64,
        stats: &mut [StepStats],
    ) -> Result<(), String> {
        if self.streams[k].ended {
            return Ok(());
        }
        let mut data = &data[..];
        while !self.streams[k].partial.is_empty() && !data.is_empty() {
            let partial = &mut self.streams[k].partial;
            let need = match prefixed_len(partial)? {
                Some(len) => 5 + len,
                None => 5,
            };
            let take = (need - partial.len()).min(data.len());
            partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if prefixed_len(partial)?.is_some_and(|len| partial.len() == 5 + len) {
                let whole = std::mem::take(partial);
                self.message(k, &whole[5..], now, stats)?;
                // Keep the allocation for the next split message.
                let mut whole = whole;
                whole.clear();
                self.streams[k].partial = whole;
            }
        }
        while let Some(len) = prefixed_len(data)? {
            if data.len() < 5 + len {
                break;
            }
            self.message(k, &data[5..5 + len], now, stats)?;
            data = &data[5 + len..];
        }
        self.streams[k].partial.extend_from_slice(data);
        Ok(())
    }

    fn message(
        &mut self,
        k: usize,
        mut bytes: &[u8],
        now: i64,
        stats: &mut [StepStats],
    ) -> Result<(), String> {
        let msg = Seen::decode(&mut bytes, &self.table)
            .map_err(|e| format!("a response is not a TickerResponse: {e}"))?;
        let s = &mut self.streams[k];
        if s.acked < s.want {
            if reader::subscribing(&mut s.tracks, &msg)? {
                s.acked += 1;
                if s.acked == s.want {
                    self.subscribed();
                }
            }
        } else {
            reader::record(&mut s.tracks, &msg, now, &self.schedule, stats);
        }
        Ok(())
    }

    fn subscribed(&mut self) {
        self.subscribing -= 1;
        if self.subscribing == 0 {
            if let Some(ready) = self.ready.take() {
                let _ = ready.send(Ok(()));
            }
        }
    }

    /// A response head or trailers.
    fn head(&mut self, stream: u32, block: &[u8], end_stream: bool) -> Result<(), String> {
        let (mut status, mut grpc_status, mut message) = (None, None, String::new());
        self.hpack
            .decode_with_cb(block, |name, value| match &name[..] {
                b":status" => status = Some(value.into_owned()),
                b"grpc-status" => grpc_status = Some(value.into_owned()),
                b"grpc-message" => message = String::from_utf8_lossy(&value).into_owned(),
                _ => {}
            })
            .map_err(|e| format!("a header block does not decode: {e:?}"))?;
        if status.as_ref().is_some_and(|s| s != b"200") {
            let status = String::from_utf8_lossy(status.as_deref().unwrap_or_default());
            return self.end(stream, &format!("HTTP status {status}"));
        }
        if end_stream {
            let code =
                grpc_status.map_or("none".into(), |c| String::from_utf8_lossy(&c).into_owned());
            return self.end(
                stream,
                &format!("stream ended: grpc-status {code} {message}"),
            );
        }
        Ok(())
    }

    /// A stream is over; before its acks that fails the whole connection's start.
    fn end(&mut self, stream: u32, why: &str) -> Result<(), String> {
        let Some(k) = self.index(stream) else {
            return Ok(());
        };
        let s = &mut self.streams[k];
        if s.ended {
            return Ok(());
        }
        s.ended = true;
        self.live -= 1;
        if s.acked < s.want {
            return Err(why.to_string());
        }
        Ok(())
    }
}

/// The length a gRPC message prefix announces, once its 5 bytes are there.
fn prefixed_len(b: &[u8]) -> Result<Option<usize>, String> {
    if b.len() < 5 {
        return Ok(None);
    }
    if b[0] != 0 {
        return Err("a compressed message, though none was asked for".into());
    }
    let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(format!("a {len}-byte message, past the 4 MiB limit"));
    }
    Ok(Some(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{ticker_response::Kind, TickerResponse};
    use std::sync::OnceLock;

    fn conn(table: Arc<SymbolTable>) -> Conn {
        let tracks = vec![SymbolTrack {
            symbol: 3,
            ..SymbolTrack::default()
        }];
        let schedule: ScheduleCell = Arc::new(OnceLock::new());
        Conn {
            streams: vec![Stream {
                id: 1,
                tracks,
                want: 1,
                acked: 0,
                partial: BytesMut::new(),
                unreturned: 0,
                ended: false,
            }],
            live: 1,
            subscribing: 1,
            hpack: loona_hpack::Decoder::new(),
            block: None,
            out: BytesMut::new(),
            conn_unreturned: 0,
            window: 64,
            table,
            schedule,
            ready: None,
        }
    }

    fn message(kind: Kind, seq: u64) -> Vec<u8> {
        let body = TickerResponse {
            symbol: "B003".into(),
            seq,
            kind: kind as i32,
            ..TickerResponse::default()
        }
        .encode_to_vec();
        let mut m = vec![0];
        m.extend_from_slice(&(body.len() as u32).to_be_bytes());
        m.extend_from_slice(&body);
        m
    }

    fn data_frame(payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        frame::put_head(&mut out, payload.len(), frame::DATA, 0, 1);
        out.extend_from_slice(payload);
        out.to_vec()
    }

    #[test]
    fn messages_split_anywhere_over_frames_and_reads_are_each_counted_once() {
        let table = Arc::new(SymbolTable::numbered(5));
        let mut wire = message(Kind::Subscribed, 0);
        for seq in 1..=3 {
            wire.extend(message(Kind::Tick, seq));
        }
        for cut in 0..=wire.len() {
            for read_cut in [1, 7, 9, 20] {
                let mut c = conn(table.clone());
                let (ready, mut acked) = oneshot::channel();
                c.ready = Some(ready);
                let mut bytes = data_frame(&wire[..cut]);
                bytes.extend(data_frame(&wire[cut..]));
                let mut stats = vec![StepStats::new()];
                let mut buf = BytesMut::new();
                // The frames arrive in reads of `read_cut` bytes.
                for piece in bytes.chunks(read_cut) {
                    buf.extend_from_slice(piece);
                    c.frames(&mut buf, 0, &mut stats).unwrap();
                }
                assert!(buf.is_empty());
                assert_eq!(acked.try_recv(), Ok(Ok(())), "cut {cut}");
                let track = &c.streams[0].tracks[0];
                assert_eq!((track.received, track.last_seq), (3, 3), "cut {cut}");
                assert!(c.streams[0].partial.is_empty());
                // The 64-byte window is returned once half of it was read.
                assert!(!c.out.is_empty());
            }
        }
    }

    #[test]
    fn a_rejection_before_the_ack_or_a_compressed_message_is_an_error() {
        let table = Arc::new(SymbolTable::numbered(5));
        let mut c = conn(table.clone());
        let mut buf = BytesMut::from(&data_frame(&message(Kind::Rejected, 0))[..]);
        let err = c.frames(&mut buf, 0, &mut []).unwrap_err();
        assert!(err.contains("rejected"), "{err}");

        let mut c = conn(table);
        let mut m = message(Kind::Tick, 1);
        m[0] = 1;
        let mut buf = BytesMut::from(&data_frame(&m)[..]);
        let err = c.frames(&mut buf, 0, &mut []).unwrap_err();
        assert!(err.contains("compressed"), "{err}");
    }

    #[test]
    fn a_stream_ended_before_its_acks_fails_the_start_with_its_status() {
        let mut c = conn(Arc::new(SymbolTable::numbered(5)));
        let mut block = Vec::new();
        crate::transport::http2::headers::literal(b":status", b"200", &mut block);
        crate::transport::http2::headers::literal(b"grpc-status", b"16", &mut block);
        crate::transport::http2::headers::literal(b"grpc-message", b"no token", &mut block);
        let mut out = BytesMut::new();
        frame::put_headers(&mut out, 1, &block, true, MAX_FRAME);
        let err = c.frames(&mut out, 0, &mut []).unwrap_err();
        assert!(err.contains("grpc-status 16 no token"), "{err}");
        assert_eq!(c.live, 0);
    }
}
