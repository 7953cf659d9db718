//! The connection's answers to the client's frames (see `conn`): settings, pings,
//! windows, request DATA and its flow control, header blocks and the streams they open,
//! resets and GOAWAY, each under the connection's limits.

use super::*;

impl<IO: AsyncRead + AsyncWrite + Unpin, B: ResponseBody> Connection<IO, B> {
    pub(super) fn on_frame(&mut self, f: Frame) -> Result<(), Error> {
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
                    if self.options.direct_publish {
                        let ids: Vec<u32> = self.streams.keys().copied().collect();
                        for id in ids {
                            self.direct_close(id);
                        }
                    }
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
        // Its window back from its sink, if open; a publish then rings the session,
        // and the stream's next poll opens the sink again.
        self.direct_close(id);
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
    pub(super) fn release(&mut self, id: u32, n: usize) {
        if n == 0 {
            return;
        }
        if id != 0 {
            // In quarter-window steps, as the connection's: a stream that sends a steady
            // trickle (a publisher's Publish call, a frame per 1 ms round) would otherwise
            // get a WINDOW_UPDATE per frame: a write for the server and a wake-up for the
            // client each time, which on a shared machine preempted the server mid-round.
            // Less than a quarter window of what the service read is held back, so a client
            // the service keeps up with always has three quarters of its window.
            let window = self.options.stream_window;
            if let Some(s) = self.streams.get_mut(&id) {
                if s.recv_open {
                    if let Some(n) = quarter_step(&mut s.recv_unreleased, n, window) {
                        s.recv_window += n as i64;
                        frame::put_window_update(&mut self.w.out, id, n as u32);
                    }
                }
            }
        }
        let window = self.options.connection_window;
        if let Some(n) = quarter_step(&mut self.recv_unreleased, n, window) {
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
        let sink = self
            .options
            .direct_publish
            .then(|| StreamSink::new(id, Arc::clone(&self.shared)));
        if let Some(sink) = &sink {
            request
                .extensions_mut()
                .insert(super::super::Direct(Arc::clone(sink)));
        }
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
                recv_unreleased: 0,
                send_window: self.peer_initial_window,
                sink,
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

/// Adds `n` to what was read but not yet given back; once that reaches a quarter of
/// `window`, takes all of it, for one WINDOW_UPDATE.
fn quarter_step(unreleased: &mut usize, n: usize, window: u32) -> Option<usize> {
    *unreleased += n;
    (*unreleased >= (window as usize / 4).max(1)).then(|| std::mem::take(unreleased))
}
