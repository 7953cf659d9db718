//! Whether a session's request stream may have something new. `session` polls its
//! requests only when this rang, not on every message it yields: each poll walks tonic,
//! hyper and h2 (taking h2's connection lock), and a batch of ticks means one poll per
//! tick, which cost about a tenth of the server's CPU at 500k deliveries/s.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    task::{Context, Wake, Waker},
};

/// A waker to poll the request stream with: waking it rings the bell and wakes the
/// session's task.
pub(super) struct Doorbell {
    inner: Arc<Inner>,
    waker: Waker,
    /// The task registered in `inner.task`, kept here so that the common case (same
    /// task as last time) costs a comparison instead of the lock.
    registered: Option<Waker>,
}

struct Inner {
    rung: AtomicBool,
    /// Kept across wakes (not taken, as `AtomicWaker` does), so one registration
    /// serves every ring; rings are rare (client requests), polls are per message.
    task: Mutex<Option<Waker>>,
}

impl Wake for Inner {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.rung.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

impl Doorbell {
    /// Rung to begin with: the requests have never been polled.
    pub(super) fn new() -> Doorbell {
        let inner = Arc::new(Inner {
            rung: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        let waker = Waker::from(inner.clone());
        Doorbell {
            inner,
            waker,
            registered: None,
        }
    }

    /// Records `cx`'s task as the one to wake. If the bell rang since the last answer,
    /// silences it and returns the waker to poll the requests with.
    pub(super) fn answer(&mut self, cx: &Context<'_>) -> Option<Waker> {
        // Register before reading the bell, so a ring in between is not lost: the
        // ringer takes the lock after setting the bell.
        if !self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            let task = cx.waker().clone();
            *self.inner.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.clone());
            self.registered = Some(task);
        }
        self.inner
            .rung
            .swap(false, Ordering::AcqRel)
            .then(|| self.waker.clone())
    }

    /// Rings it from inside: the requests were left unread (the control queue was
    /// full) and must be polled again next time.
    pub(super) fn ring(&self) {
        self.inner.rung.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn answers_once_per_ring_and_wakes_the_task() {
        let task = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(task.clone());
        let cx = Context::from_waker(&waker);
        let mut bell = Doorbell::new();
        let polled_with = bell.answer(&cx).expect("rung at first");
        assert!(bell.answer(&cx).is_none(), "nothing new");
        polled_with.wake_by_ref();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task is woken");
        assert!(bell.answer(&cx).is_some(), "rung by the request stream");
        assert!(bell.answer(&cx).is_none());
        polled_with.wake_by_ref();
        assert_eq!(task.0.load(Ordering::SeqCst), 2, "woken on every ring");
        assert!(bell.answer(&cx).is_some());
        bell.ring();
        assert!(bell.answer(&cx).is_some(), "rung from inside");
    }
}
