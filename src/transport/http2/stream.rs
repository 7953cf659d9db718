//! One HTTP/2 stream's parts that live outside the connection's task: its waker (which
//! queues the stream on its connection's ready list, so the connection polls only
//! streams with news), and its request body (DATA the connection received, handed to
//! the service, and the window the service's reads give back). `conn` owns the rest.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll, Wake, Waker},
};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::HeaderMap;
use http_body::Frame;

/// What a connection shares with its streams' wakers and request bodies.
#[derive(Default)]
pub struct Shared {
    /// The connection's task.
    pub task: AtomicWaker,
    /// Streams woken since the connection last looked.
    pub ready: Mutex<Vec<u32>>,
    /// Request bytes read by the service, per stream, to give back as window.
    pub released: Mutex<Vec<(u32, usize)>>,
    /// What publishes framed for its streams (`direct`).
    pub direct: Mutex<super::direct::SideBuffer>,
}

impl Shared {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        // A panic while holding either lock leaves a plain Vec: still usable.
        m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn take_ready(&self, into: &mut Vec<u32>) {
        std::mem::swap(&mut *Shared::lock(&self.ready), into);
    }

    pub fn take_released(&self, into: &mut Vec<(u32, usize)>) {
        std::mem::swap(&mut *Shared::lock(&self.released), into);
    }
}

/// A stream's waker: queues its id once until the connection takes it.
pub struct StreamWake {
    id: u32,
    queued: AtomicBool,
    shared: Arc<Shared>,
}

impl StreamWake {
    pub fn new(id: u32, shared: Arc<Shared>) -> Arc<StreamWake> {
        Arc::new(StreamWake {
            id,
            queued: AtomicBool::new(false),
            shared,
        })
    }

    /// Called by the connection as it takes the id: a wake from now on queues it again.
    pub fn taken(&self) {
        self.queued.store(false, Ordering::Release);
    }
}

impl Wake for StreamWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            // Only the first id since the connection last took the list wakes its task:
            // that wake comes after the push, and the connection takes the whole list
            // under this lock, so later ids ride on it (a wake per id cost three
            // locked instructions each, ~20 woken streams per connection per burst).
            let was_empty = {
                let mut ready = Shared::lock(&self.shared.ready);
                ready.push(self.id);
                ready.len() == 1
            };
            if was_empty {
                self.shared.task.wake();
            }
        }
    }
}

pub fn waker(wake: &Arc<StreamWake>) -> Waker {
    Waker::from(Arc::clone(wake))
}

/// A request body's state, between the connection (which pushes) and the service (which
/// reads through `RecvBody`).
#[derive(Default)]
struct Inbox {
    chunks: VecDeque<Bytes>,
    /// The client ended its side (END_STREAM).
    ended: bool,
    /// The stream was reset; the body ends with this error.
    reset: Option<u32>,
    /// Read since last given back.
    unreleased: usize,
    waker: Option<Waker>,
}

/// The connection's end of a request body.
pub struct Sender {
    inbox: Arc<Mutex<Inbox>>,
}

/// Read bytes are given back as window once this many have gathered.
const RELEASE_AT: usize = 16 * 1024;

impl Sender {
    pub fn push(&self, data: Bytes) {
        let mut inbox = Shared::lock(&self.inbox);
        inbox.chunks.push_back(data);
        if let Some(w) = inbox.waker.take() {
            w.wake();
        }
    }

    pub fn end(&self) {
        let mut inbox = Shared::lock(&self.inbox);
        inbox.ended = true;
        if let Some(w) = inbox.waker.take() {
            w.wake();
        }
    }

    /// The stream is gone: the body ends (with error `code` unless the client had
    /// ended it), and nothing it still held is read. Returns the bytes received and not
    /// yet given back, which the connection gives back now.
    pub fn close(self, code: u32) -> usize {
        let mut inbox = Shared::lock(&self.inbox);
        let unread: usize = inbox.chunks.drain(..).map(|c| c.len()).sum();
        let unread = unread + std::mem::take(&mut inbox.unreleased);
        if !inbox.ended {
            inbox.reset = Some(code);
        }
        if let Some(w) = inbox.waker.take() {
            w.wake();
        }
        unread
    }
}

/// A request body for the service.
pub struct RecvBody {
    id: u32,
    inbox: Arc<Mutex<Inbox>>,
    shared: Arc<Shared>,
}

pub fn channel(id: u32, shared: Arc<Shared>) -> (Sender, RecvBody) {
    let inbox = Arc::new(Mutex::new(Inbox::default()));
    (
        Sender {
            inbox: Arc::clone(&inbox),
        },
        RecvBody { id, inbox, shared },
    )
}

/// How a reset request body reads to the service.
#[derive(Debug, thiserror::Error)]
#[error("the client reset the stream (HTTP/2 error code {0})")]
pub struct Reset(pub u32);

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = Reset;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Reset>>> {
        let this = self.get_mut();
        let mut inbox = Shared::lock(&this.inbox);
        if let Some(code) = inbox.reset {
            return Poll::Ready(Some(Err(Reset(code))));
        }
        if let Some(chunk) = inbox.chunks.pop_front() {
            inbox.unreleased += chunk.len();
            if inbox.unreleased >= RELEASE_AT || (inbox.chunks.is_empty() && inbox.ended) {
                let n = std::mem::take(&mut inbox.unreleased);
                drop(inbox);
                Shared::lock(&this.shared.released).push((this.id, n));
                this.shared.task.wake();
            }
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if inbox.ended {
            return Poll::Ready(None);
        }
        inbox.waker = Some(cx.waker().clone());
        if inbox.unreleased > 0 {
            // Waiting for more: give back what was read, or a client with a small window
            // could wait for us while we wait for it.
            let n = std::mem::take(&mut inbox.unreleased);
            drop(inbox);
            Shared::lock(&this.shared.released).push((this.id, n));
            this.shared.task.wake();
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        let inbox = Shared::lock(&self.inbox);
        inbox.ended && inbox.chunks.is_empty()
    }
}

/// `grpc-timeout` (gRPC over HTTP/2: an integer of at most 8 digits and a unit).
pub fn grpc_timeout(headers: &HeaderMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    #[tokio::test]
    async fn a_body_reads_what_was_pushed_and_gives_the_window_back() {
        let shared = Arc::new(Shared::default());
        let (tx, mut body) = channel(3, Arc::clone(&shared));
        tx.push(Bytes::from_static(b"abc"));
        tx.end();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "abc");
        assert!(body.frame().await.is_none());
        let mut released = Vec::new();
        shared.take_released(&mut released);
        assert_eq!(released, vec![(3, 3)]);
    }

    #[tokio::test]
    async fn a_reset_body_errs() {
        let shared = Arc::new(Shared::default());
        let (tx, mut body) = channel(1, shared);
        tx.push(Bytes::from_static(b"unread"));
        assert_eq!(tx.close(8), 6);
        assert!(body.frame().await.unwrap().is_err());
    }

    #[test]
    fn a_woken_stream_is_queued_once() {
        let shared = Arc::new(Shared::default());
        let wake = StreamWake::new(5, Arc::clone(&shared));
        let w = waker(&wake);
        w.wake_by_ref();
        w.wake_by_ref();
        let mut ready = Vec::new();
        shared.take_ready(&mut ready);
        assert_eq!(ready, vec![5]);
        wake.taken();
        w.wake_by_ref();
        shared.take_ready(&mut ready);
        assert_eq!(ready, vec![5]);
    }

    #[test]
    fn the_connection_is_woken_once_per_taken_list() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(Default::default()));
        let shared = Arc::new(Shared::default());
        let wakes = |n: usize| assert_eq!(count.0.load(Ordering::SeqCst), n);
        let (a, b) = (
            StreamWake::new(1, Arc::clone(&shared)),
            StreamWake::new(3, Arc::clone(&shared)),
        );
        shared.task.register(&Waker::from(Arc::clone(&count)));
        waker(&a).wake_by_ref();
        // Registered again, but the list not taken yet: the next id rides on that wake.
        shared.task.register(&Waker::from(Arc::clone(&count)));
        waker(&b).wake_by_ref();
        wakes(1);
        let mut ready = Vec::new();
        shared.take_ready(&mut ready);
        assert_eq!(ready, vec![1, 3]);
        a.taken();
        b.taken();
        // A connection registers again on every poll; after a take, the next id wakes.
        shared.task.register(&Waker::from(Arc::clone(&count)));
        waker(&b).wake_by_ref();
        wakes(2);
    }

    #[test]
    fn grpc_timeouts_parse() {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(
            grpc_timeout(&h),
            Some(std::time::Duration::from_millis(250))
        );
        h.insert("grpc-timeout", "123456789S".parse().unwrap());
        assert_eq!(grpc_timeout(&h), None);
        h.insert("grpc-timeout", "m".parse().unwrap());
        assert_eq!(grpc_timeout(&h), None);
    }
}
