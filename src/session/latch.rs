//! A one-way signal: once fired, every waiter, present or to come, sees it
//! (console SHUTDOWN for the gateway, console KILL for one session).

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Latch {
    fired: AtomicBool,
    notify: Notify,
}

impl Latch {
    pub fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Completes once the latch was fired (at once if it already was).
    pub async fn fired(&self) {
        loop {
            let notified = self.notify.notified();
            if self.fired.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}
