//! The server-wide shutdown signal. Sessions check it on every poll, so the check is a
//! lock-free flag; the token beside it wakes streams that are waiting for ticks.
//! The server triggers it; the service and sessions watch it.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use tokio_util::sync::CancellationToken;

#[derive(Clone, Default)]
pub struct Shutdown {
    flag: Arc<AtomicBool>,
    token: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Starts the shutdown: every open stream ends with UNAVAILABLE.
    pub fn trigger(&self) {
        self.flag.store(true, Ordering::Release);
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// The token to await (`cancelled()`) or hand to tasks.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}
