//! The one lock helper. Every mutex in the agent guards state that stays consistent between
//! statements, so a panic on another thread while holding it must not wedge the watchdog: the
//! data is taken as it is.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking the data even if a thread panicked while holding it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
