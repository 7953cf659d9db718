//! The connection's side of publishes that frame ticks into its side buffer
//! (`http2::direct`): opening a stream's sink when its body goes idle, closing it
//! before the stream is polled, written to or reset, and the side buffer moved into
//! the connection's at the start of each pass.

use std::sync::atomic::Ordering;

use super::*;
use crate::transport::http2::direct;

impl<IO: AsyncRead + AsyncWrite + Unpin, B: ResponseBody> Connection<IO, B> {
    /// The start of a pass: what publishes framed goes ahead of anything the pass adds,
    /// and the connection window lent to them comes back, so none is framed during the
    /// pass (an offer then finds no window and rings the session's bell instead).
    pub(super) fn direct_reclaim(&mut self) {
        if !self.options.direct_publish {
            return;
        }
        let mut side = direct::lock(&self.shared.direct);
        if self.w.out.is_empty() {
            // The usual case (the last write took everything): trade buffers instead of
            // copying a round's bytes; publishes fill the one this pass just emptied.
            std::mem::swap(&mut self.w.out, &mut side.out);
        } else if !side.out.is_empty() {
            self.w.out.extend_from_slice(&side.out);
            side.out.clear();
        }
        self.w.conn_window += std::mem::take(&mut side.conn_budget);
    }

    /// The end of a pass, before the task sleeps: publishes may spend the connection
    /// window the pass left, up to the buffer's room.
    pub(super) fn direct_lend(&mut self) {
        if !self.options.direct_publish || self.closing.is_some() {
            return;
        }
        let room = HIGH_WATER.saturating_sub(self.w.out.len()) as i64;
        let lend = self.w.conn_window.min(room);
        if lend > 0 {
            direct::lock(&self.shared.direct).conn_budget += lend;
            self.w.conn_window -= lend;
        }
    }

    /// Stream `s`'s body just went idle: publishes may frame its ticks, within its
    /// send window, until the stream is next polled.
    pub(super) fn direct_open(shared: &Shared, s: &mut Stream<B>) {
        let Some(sink) = &s.sink else {
            return;
        };
        let _side = direct::lock(&shared.direct);
        sink.budget.store(s.send_window, Ordering::Relaxed);
        sink.open.store(true, Ordering::Relaxed);
    }

    /// Stream `id` is about to be polled, given window, or reset: publishes stop
    /// framing for it, and its send window comes back with what they left of it.
    pub(super) fn direct_close(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let Some(sink) = &s.sink else {
            return;
        };
        // Only this task sets it: a relaxed look is exact here.
        if !sink.open.load(Ordering::Relaxed) {
            return;
        }
        let _side = direct::lock(&self.shared.direct);
        sink.open.store(false, Ordering::Relaxed);
        s.send_window = sink.budget.load(Ordering::Relaxed);
    }
}
