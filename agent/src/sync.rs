//! The one lock helper, and the one wake-up signal built on it. Every mutex in the agent guards
//! state that stays consistent between statements, so a panic on another thread while holding it
//! must not wedge the watchdog: the data is taken as it is.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking the data even if a thread panicked while holding it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A wake-up one thread waits for and others give: a flag under a mutex and a condvar. A
/// `notify` while nobody waits is kept for the next `wait`, so none is lost.
#[derive(Debug, Default)]
pub struct Signal {
    set: Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Signal {
    pub fn notify(&self) {
        *lock(&self.set) = true;
        self.cv.notify_one();
    }

    /// Waits up to `timeout` for a notify; true if one came (and takes it).
    pub fn wait(&self, timeout: std::time::Duration) -> bool {
        let g = lock(&self.set);
        let (mut g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |set| !*set)
            .unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *g)
    }
}
