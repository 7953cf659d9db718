//! The connection's pass (see `conn`): read and handle frames, poll the ready streams
//! into the buffer, write it; and the timers (keepalive, age, the close's bound).

use super::*;

impl<IO: AsyncRead + AsyncWrite + Unpin, B: ResponseBody> Connection<IO, B> {
    /// Polls stream `id` as far as its windows and the buffer allow.
    fn drive(&mut self, id: u32) -> Parked {
        self.direct_close(id);
        let Some(s) = self.streams.get_mut(&id) else {
            return Parked::Finished;
        };
        s.wake.taken();
        let w = &mut self.w;
        let mut cx = Context::from_waker(&s.waker);
        if let Phase::Calling(call) = &mut s.phase {
            let response = match call.as_mut().poll(&mut cx) {
                Poll::Ready(response) => response,
                Poll::Pending => {
                    let late = s
                        .deadline
                        .as_mut()
                        .is_some_and(|d| d.as_mut().poll(&mut cx).is_ready());
                    if !late {
                        return Parked::Nothing;
                    }
                    // Trailers-only: the status rides in the one HEADERS frame.
                    let late =
                        tonic::Status::deadline_exceeded("deadline exceeded").into_http::<()>();
                    headers::response(late.status(), late.headers(), &mut w.scratch);
                    w.headers(id, true);
                    s.phase = Phase::Done;
                    return Parked::Finished;
                }
            };
            s.deadline = None;
            let (parts, body) = response.into_parts();
            headers::response(parts.status, &parts.headers, &mut w.scratch);
            if body.is_end_stream() {
                // Trailers-only: the status rides in the one HEADERS frame.
                w.headers(id, true);
                s.phase = Phase::Done;
                return Parked::Finished;
            }
            w.headers(id, false);
            s.phase = Phase::Body(body);
        }
        let Phase::Body(body) = &mut s.phase else {
            return Parked::Finished;
        };
        loop {
            if let Some(data) = s.pending.take() {
                s.pending = w.data(id, &mut s.send_window, data, false);
                if s.pending.is_some() {
                    return if w.conn_window <= 0 {
                        Parked::ConnWindow
                    } else {
                        Parked::Nothing
                    };
                }
                if let Some(trailers) = s.trailers.take() {
                    headers::fields(&trailers, &mut w.scratch);
                    w.headers(id, true);
                    s.phase = Phase::Done;
                    return Parked::Finished;
                }
            }
            if w.out.len() >= HIGH_WATER {
                return Parked::Buffer;
            }
            if w.conn_window <= 0 {
                return Parked::ConnWindow;
            }
            if s.send_window <= 0 {
                return Parked::Nothing;
            }
            // Data straight into the buffer behind a DATA head filled in after; whatever
            // else the body has comes as a frame.
            let room = s.send_window.min(w.conn_window).min(w.max_frame as i64) as usize;
            let head = w.out.len();
            w.out.put_bytes(0, frame::HEAD);
            match body.poll_append(&mut cx, &mut w.out, room) {
                Poll::Ready(Appended::Wrote(n)) if n > 0 => {
                    debug_assert!(n <= room && w.out.len() == head + frame::HEAD + n);
                    frame::set_head(&mut w.out[head..], n, frame::DATA, 0, id);
                    s.send_window -= n as i64;
                    w.conn_window -= n as i64;
                    continue;
                }
                Poll::Pending => {
                    w.out.truncate(head);
                    // Idle with nothing held: next in its order is whatever ticks next.
                    Self::direct_open(&self.shared, s);
                    return Parked::Nothing;
                }
                Poll::Ready(_) => w.out.truncate(head),
            }
            match Pin::new(&mut *body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(f))) => match f.into_data() {
                    Ok(data) => s.pending = Some(data),
                    Err(f) => {
                        let trailers = f.into_trailers().unwrap_or_default();
                        if s.pending.is_some() {
                            s.trailers = Some(Box::new(trailers));
                        } else {
                            headers::fields(&trailers, &mut w.scratch);
                            w.headers(id, true);
                            s.phase = Phase::Done;
                            return Parked::Finished;
                        }
                    }
                },
                Poll::Ready(None) => {
                    w.data(id, &mut s.send_window, Bytes::new(), true);
                    s.phase = Phase::Done;
                    return Parked::Finished;
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(stream = id, error = %e, "response body failed");
                    frame::put_reset(&mut w.out, id, frame::INTERNAL_ERROR);
                    s.phase = Phase::Done;
                    s.recv_open = false;
                    return Parked::Finished;
                }
                Poll::Pending => return Parked::Nothing,
            }
        }
    }

    /// Polls every runnable stream.
    fn run_streams(&mut self) {
        self.shared.take_ready(&mut self.taken);
        self.runnable.append(&mut self.taken);
        if self.w.out.len() < HIGH_WATER {
            let mut deferred = std::mem::take(&mut self.deferred);
            self.unpark(&mut deferred);
        }
        if self.runnable.is_empty() {
            return;
        }
        let mut runnable = std::mem::take(&mut self.runnable);
        if runnable.len() > 1 {
            self.warm(&runnable);
        }
        for id in runnable.drain(..) {
            let parked = self.drive(id);
            match parked {
                Parked::Nothing => {}
                Parked::ConnWindow | Parked::Buffer => {
                    let Some(s) = self.streams.get_mut(&id) else {
                        continue;
                    };
                    if !s.parked {
                        s.parked = true;
                        match parked {
                            Parked::ConnWindow => self.conn_blocked.push(id),
                            _ => self.deferred.push(id),
                        }
                    }
                }
                Parked::Finished => self.finished(id),
            }
        }
        // Keep the allocation; ids pushed while driving are in `self.runnable`.
        runnable.append(&mut self.runnable);
        self.runnable = runnable;
    }

    /// Touches what polling `ids` will read first: each stream's entry and its body's
    /// hot lines. The loads do not depend on one another, so the core has their cache
    /// misses in flight together; polled in turn, each stream would stall on its own.
    fn warm(&self, ids: &[u32]) {
        let mut sum = 0u64;
        for depth in 0..3 {
            for id in ids {
                if let Some(s) = self.streams.get(id) {
                    if let Phase::Body(body) = &s.phase {
                        sum = sum.wrapping_add(body.warm(depth));
                    }
                }
            }
        }
        std::hint::black_box(sum);
    }

    /// Makes the streams of a wait list runnable again.
    pub(super) fn unpark(&mut self, list: &mut Vec<u32>) {
        for id in list.iter() {
            if let Some(s) = self.streams.get_mut(id) {
                s.parked = false;
            }
        }
        self.runnable.append(list);
    }

    /// Our side of stream `id` is done: it goes once the client's is too; a client
    /// still sending is told to stop (RST_STREAM NO_ERROR, RFC 9113 8.1).
    fn finished(&mut self, id: u32) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        if !matches!(s.phase, Phase::Done) {
            return;
        }
        if s.recv_open {
            frame::put_reset(&mut self.w.out, id, frame::NO_ERROR);
        }
        self.remove(id, frame::CANCEL);
    }

    /// Handles the complete frames in the read buffer.
    fn read_frames(&mut self) -> Result<bool, Error> {
        if !self.preface {
            if self.rbuf.len() < frame::PREFACE.len() {
                if !frame::PREFACE.starts_with(&self.rbuf) {
                    return Err(frame::error(frame::PROTOCOL_ERROR, "not HTTP/2"));
                }
                return Ok(false);
            }
            if &self.rbuf[..frame::PREFACE.len()] != frame::PREFACE {
                return Err(frame::error(frame::PROTOCOL_ERROR, "not HTTP/2"));
            }
            self.rbuf.advance(frame::PREFACE.len());
            self.preface = true;
        }
        let mut any = false;
        while self.closing.is_none() && self.w.out.len() < HIGH_WATER {
            let Some(bytes) = self.rbuf.get(..frame::HEAD) else {
                break;
            };
            let head = Head::parse(bytes.try_into().unwrap_or(&[0; frame::HEAD]));
            if head.len > frame::DEFAULT_MAX_FRAME as usize {
                return Err(frame::error(frame::FRAME_SIZE_ERROR, "frame too large"));
            }
            if self.rbuf.len() < frame::HEAD + head.len {
                self.rbuf.reserve(frame::HEAD + head.len);
                break;
            }
            self.rbuf.advance(frame::HEAD);
            let payload = self.rbuf.split_to(head.len).freeze();
            if self.continuing.is_some() && head.kind != frame::CONTINUATION {
                return Err(frame::error(frame::PROTOCOL_ERROR, "expected CONTINUATION"));
            }
            let f = frame::parse(head, payload)?;
            self.on_frame(f)?;
            any = true;
        }
        Ok(any)
    }

    /// Reads what the socket has; `Ready(false)` at its end.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<bool>> {
        let mut buf = ReadBuf::new(&mut self.scratch);
        match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                let filled = buf.filled();
                if filled.is_empty() {
                    return Poll::Ready(Ok(false));
                }
                self.rbuf.extend_from_slice(filled);
                Poll::Ready(Ok(true))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Writes the buffer; `Ready` once it is empty.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.w.out.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, &self.w.out) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => self.w.out.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_timers(&mut self, cx: &mut Context<'_>) {
        if !self.draining && self.stop.started() {
            self.drain();
        }
        if let Some(grace) = self.grace.as_mut() {
            if grace.as_mut().poll(cx).is_ready() {
                self.close(false);
                return;
            }
        }
        if self.keepalive.as_mut().poll(cx).is_ready() {
            let quiet_until = self.last_read + self.options.keepalive_interval;
            if !self.ping_out && quiet_until > Instant::now() {
                // Frames came in since: the connection is alive; look again later.
                self.keepalive.as_mut().reset(quiet_until);
                let _ = self.keepalive.as_mut().poll(cx);
            } else if self.ping_out {
                tracing::debug!(peer = ?self.peer.addr, "keepalive PING unanswered; closing");
                frame::put_goaway(&mut self.w.out, self.last_stream, frame::NO_ERROR, "");
                self.close(false);
            } else {
                frame::put_ping(&mut self.w.out, false, PING);
                self.ping_out = true;
                let next = Instant::now() + self.options.keepalive_timeout;
                self.keepalive.as_mut().reset(next);
                let _ = self.keepalive.as_mut().poll(cx);
            }
        }
        if let Some(age) = self.age.as_mut() {
            if age.as_mut().poll(cx).is_ready() {
                self.drain();
                let grace = self
                    .options
                    .max_connection_age
                    .map_or(Duration::ZERO, |a| a.1);
                let mut grace = Box::pin(tokio::time::sleep(grace));
                let _ = grace.as_mut().poll(cx);
                // Past the grace, the streams still open are cut.
                self.age = None;
                self.grace = Some(grace);
            }
        }
    }

    /// The close (see `Closing`); `Ready` when the connection is done.
    fn poll_closing(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(closing) = self.closing.as_mut() else {
            return Poll::Ready(());
        };
        let expired = closing.bound.as_mut().poll(cx).is_ready();
        if !self.w.out.is_empty() {
            // Still writing (poll_write is registered for the socket's room).
            return if expired && !closing.graceful {
                Poll::Ready(())
            } else {
                Poll::Pending
            };
        }
        if !closing.shut {
            match Pin::new(&mut self.io).poll_shutdown(cx) {
                Poll::Pending if !expired => return Poll::Pending,
                Poll::Pending => return Poll::Ready(()),
                Poll::Ready(_) => closing.shut = true,
            }
        }
        if !closing.graceful {
            // An error close does not read on: the client may be flooding.
            return Poll::Ready(());
        }
        loop {
            match self.poll_read(cx) {
                Poll::Ready(Ok(true)) => self.rbuf.clear(),
                Poll::Ready(Ok(false)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending if expired => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// One connection's life. Timers are looked at once per wake-up; then passes run
    /// while they find work: bytes read, or streams made runnable by the last pass.
    fn poll_conn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.shared.task.register(cx.waker());
        if self.stop.forced() {
            self.streams.clear();
            return Poll::Ready(());
        }
        if self.closing.is_none() {
            self.poll_timers(cx);
        }
        for _ in 0..PASSES {
            self.direct_reclaim();
            let mut again = false;
            if self.closing.is_none() && self.w.out.len() < HIGH_WATER {
                if let Err(e) = self.read_frames() {
                    self.fail(e);
                }
                if self.closing.is_none() && self.w.out.len() < HIGH_WATER {
                    match self.poll_read(cx) {
                        Poll::Ready(Ok(true)) => {
                            self.last_read = Instant::now();
                            again = true;
                        }
                        Poll::Ready(Ok(false)) => {
                            tracing::debug!(peer = ?self.peer.addr, "connection closed by the client");
                            self.streams.clear();
                            return Poll::Ready(());
                        }
                        Poll::Ready(Err(e)) => {
                            tracing::debug!(peer = ?self.peer.addr, error = %e, "connection read failed");
                            self.streams.clear();
                            return Poll::Ready(());
                        }
                        Poll::Pending => {}
                    }
                }
            }
            if self.closing.is_none() {
                self.shared.take_released(&mut self.released);
                let mut released = std::mem::take(&mut self.released);
                for (id, n) in released.drain(..) {
                    self.release(id, n);
                }
                self.released = released;
                self.run_streams();
                if self.draining && self.streams.is_empty() {
                    self.close(true);
                }
                again |= !self.runnable.is_empty();
            }
            let full = self.w.out.len() >= HIGH_WATER;
            match self.poll_write(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    tracing::debug!(peer = ?self.peer.addr, error = %e, "connection write failed");
                    self.streams.clear();
                    return Poll::Ready(());
                }
                Poll::Pending => {}
            }
            if self.closing.is_some() {
                return self.poll_closing(cx);
            }
            // Room again: the streams and frames held back by a full buffer go on.
            again |= full && self.w.out.len() < HIGH_WATER;
            if !again {
                self.direct_lend();
                return Poll::Pending;
            }
        }
        // Still busy: let other tasks run, and come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin, B: ResponseBody> Future for Connection<IO, B> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.get_mut().poll_conn(cx)
    }
}
