//! The extra I/O threads of `--io-threads`: each runs a single-threaded runtime that
//! serves, through its own copy of the server's router, the connections the listening
//! thread's `incoming` passes it. `server` starts them and waits for them on shutdown.
//!
//! Why threads of their own rather than one work-stealing runtime: a tick wakes the
//! streams that want it, and each stream wakes its connection's writer. On one thread
//! the writer runs after every woken stream has queued its frames, so a burst leaves
//! in one socket write per connection; work stealing and tokio's LIFO slot run the
//! writer between streams instead, doubling the writes (`benches/README.md`).

use std::{future::Future, io, thread};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard, WaitForCancellationFutureOwned};

use crate::{
    ops::metrics::Metrics,
    transport::incoming::{HandOff, Incoming, IncomingOptions},
};

/// How one I/O thread ended.
pub type ShardOutcome = Result<(), tonic::transport::Error>;

/// The running extra I/O threads. Dropping it stops them at once, closing their
/// connections; `join` waits for them to finish a graceful stop.
pub struct Shards {
    hand_offs: Vec<mpsc::UnboundedSender<HandOff>>,
    outcomes: Vec<oneshot::Receiver<ShardOutcome>>,
    _force_stop: DropGuard,
}

impl Shards {
    /// Starts `count` threads. Each serves with `serve(incoming, stopping)`: it should
    /// stop accepting when `stopping` resolves (`stop` is cancelled) and return once
    /// its connections are gone.
    pub fn start<S, F>(
        count: usize,
        options: &IncomingOptions,
        metrics: &Metrics,
        stop: &CancellationToken,
        serve: S,
    ) -> io::Result<Shards>
    where
        S: Fn(Incoming, WaitForCancellationFutureOwned) -> F + Clone + Send + 'static,
        F: Future<Output = ShardOutcome>,
    {
        let force = CancellationToken::new();
        let mut hand_offs = Vec::with_capacity(count);
        let mut outcomes = Vec::with_capacity(count);
        for index in 1..=count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (hand_off, handed_off) = mpsc::unbounded_channel();
            let incoming = Incoming::handed_off(handed_off, options.clone(), metrics.clone());
            let (done, outcome) = oneshot::channel();
            let (serve, stopping, force) = (serve.clone(), stop.clone(), force.clone());
            thread::Builder::new()
                .name(format!("tickerd-io-{index}"))
                .spawn(move || {
                    let result = runtime.block_on(async move {
                        tokio::select! {
                            result = serve(incoming, stopping.cancelled_owned()) => result,
                            _ = force.cancelled() => Ok(()),
                        }
                    });
                    // Dropping the runtime here closes whatever connections remain.
                    let _ = done.send(result);
                })?;
            hand_offs.push(hand_off);
            outcomes.push(outcome);
        }
        Ok(Shards {
            hand_offs,
            outcomes,
            _force_stop: force.drop_guard(),
        })
    }

    /// Where the listening thread passes connections on to, one sender per thread.
    pub fn hand_offs(&self) -> Vec<mpsc::UnboundedSender<HandOff>> {
        self.hand_offs.clone()
    }

    /// Waits for every thread to end; the first error wins. A thread that ended
    /// without reporting (it panicked) is an error too.
    pub async fn join(&mut self) -> Result<(), ShardError> {
        let mut first = Ok(());
        for outcome in &mut self.outcomes {
            let result = match outcome.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(ShardError::Transport(e)),
                Err(_) => Err(ShardError::Vanished),
            };
            if first.is_ok() {
                first = result;
            }
        }
        self.outcomes.clear();
        first
    }
}

/// Why an I/O thread stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("an I/O thread stopped serving: {0}")]
    Transport(tonic::transport::Error),
    #[error("an I/O thread ended without reporting (it panicked)")]
    Vanished,
}
