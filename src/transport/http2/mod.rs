//! The server's own HTTP/2 (`--http2 tickerd`, the default): one task per connection
//! owns every stream of it and writes them all through one buffer (`conn`), over
//! framing (`frame`) and header blocks (`headers`, HPACK decoding by `loona-hpack`) of
//! its own. Requests go to the same tower service tonic would call (the router with the
//! server's layers), so every RPC, status, and limit is as with `--http2 hyper`; only
//! the writing changes. `server` mounts it on the accepted connections of `incoming`.
//!
//! Why: with hyper and h2, each response stream is a task, and h2 queues, encodes and
//! flushes one frame at a time behind a connection-wide lock: about half of a
//! delivery's instructions (`benches/README.md`). Here a woken stream is polled in its
//! connection's task and its ticks are appended to the connection's buffer.

mod conn;
mod direct;
pub mod frame;
pub mod headers;
mod stream;

use std::{
    convert::Infallible,
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, Weak,
    },
    time::Duration,
};

use futures_util::StreamExt as _;
use http::{Request, Response};
use tokio_util::task::TaskTracker;
use tonic::body::Body;
use tower_service::Service;

use crate::transport::incoming::Incoming;
use conn::Connection;
pub use conn::{Appended, ResponseBody, Serve};
pub use direct::Direct;
use stream::Shared;

/// Tells every connection of one `serve` to drain: a flag each wake-up reads without a
/// lock (a cancellation future polled every time cost a mutex), and a wake of each
/// connection's task.
#[derive(Default)]
struct Drain {
    started: AtomicBool,
    /// Close now, whatever is open (the drain's time is up, or `serve` was dropped).
    forced: AtomicBool,
    connections: Mutex<Vec<Weak<Shared>>>,
}

impl Drain {
    fn join(&self, shared: &Arc<Shared>) {
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        if connections.len().is_power_of_two() {
            connections.retain(|c| c.strong_count() > 0);
        }
        connections.push(Arc::downgrade(shared));
    }

    fn start(&self) {
        self.started.store(true, Ordering::Release);
        let connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        for shared in connections.iter().filter_map(Weak::upgrade) {
            shared.task.wake();
        }
    }

    fn started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    fn force(&self) {
        self.forced.store(true, Ordering::Release);
        self.start();
    }

    fn forced(&self) -> bool {
        self.forced.load(Ordering::Acquire)
    }
}

/// Forces the connections closed when `serve`'s future is dropped.
struct ForceOnDrop(Arc<Drain>);

impl Drop for ForceOnDrop {
    fn drop(&mut self) {
        self.0.force();
    }
}

/// The receive window granted to each stream, and to each connection: what one
/// stream's request body (a Publish) may have in flight.
pub const STREAM_WINDOW: u32 = 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 2 * 1024 * 1024;

/// The connection limits (see the `--http2-*`, `--max-concurrent-streams` and
/// `--max-connection-age` flags).
#[derive(Debug, Clone)]
pub struct Options {
    pub max_concurrent_streams: u32,
    pub max_header_list_size: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Streams a client may reset before their answer, per second.
    pub max_pending_accept_reset_streams: usize,
    /// Streams a connection may have refused for its errors, in all.
    pub max_local_error_reset_streams: usize,
    /// After this age a connection gets GOAWAY; after the grace, it is closed.
    pub max_connection_age: Option<(Duration, Duration)>,
    /// The receive windows granted: per stream and per connection.
    pub stream_window: u32,
    pub connection_window: u32,
    /// Publishes frame ticks straight into the connection's buffer for idle streams
    /// (`direct`; the `--direct-publish` flag).
    pub direct_publish: bool,
}

/// A tower service (tonic's router with the server's layers) as `serve` and
/// `connection` call it: cheap to clone, once per request.
pub fn boxed<S, B>(service: S) -> Serve<B>
where
    S: Service<Request<Body>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: ResponseBody,
{
    Arc::new(move |request| {
        let mut service = service.clone();
        Box::pin(async move {
            let ready = std::future::poll_fn(|cx| service.poll_ready(cx)).await;
            match ready {
                Ok(()) => match service.call(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                },
                Err(never) => match never {},
            }
        })
    })
}

/// Serves one connection over `io` until it ends (the `h2_conn` fuzz target drives
/// it with arbitrary bytes).
pub async fn connection<IO, B: ResponseBody>(io: IO, service: Serve<B>, options: Options)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let never = Arc::new(Drain::default());
    let peer = crate::auth::PeerInfo {
        addr: None,
        client_subject: None,
    };
    Connection::new(io, peer, service, Arc::new(options), never).await
}

/// Serves `incoming` with `service` until `stopping` resolves, then sends every
/// connection GOAWAY and returns once they have closed. Dropping the returned future
/// closes the connections still open.
pub async fn serve<B: ResponseBody>(
    mut incoming: Incoming,
    serve: Serve<B>,
    options: Options,
    stopping: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let options = Arc::new(options);
    let stop = Arc::new(Drain::default());
    // Dropped (the drain timed out, or the server is gone): every connection ends now.
    let _force_on_drop = ForceOnDrop(Arc::clone(&stop));
    let tracker = TaskTracker::new();
    tokio::pin!(stopping);
    loop {
        let io = tokio::select! {
            io = incoming.next() => io,
            () = &mut stopping => break,
        };
        let Some(io) = io else { break };
        let io = match io {
            Ok(io) => io,
            Err(e) => {
                tracing::debug!(error = %e, "connection not accepted");
                continue;
            }
        };
        let peer = io.peer().clone();
        let connection = Connection::new(
            io,
            peer,
            Arc::clone(&serve),
            Arc::clone(&options),
            Arc::clone(&stop),
        );
        tracker.spawn(connection);
    }
    drop(incoming);
    stop.start();
    tracker.close();
    tracker.wait().await;
    Ok(())
}
