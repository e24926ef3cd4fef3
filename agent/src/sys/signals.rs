//! The signals the agent handles (SIGTERM, SIGINT: stop; SIGHUP: reload), taken by one thread
//! with sigwait(2) instead of a handler, so nothing runs in signal context.

use nix::sys::signal::{SigSet, Signal};

pub use nix::sys::signal::Signal as Sig;

/// Blocks the handled signals in the calling thread; threads spawned after inherit the mask, so
/// only the waiting thread ever sees them. Call before spawning any thread.
pub fn block() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    // Cannot fail for a valid set and SIG_BLOCK; were it to, the signals keep their default
    // action (stop the process), which systemd then restarts: not silently lost.
    let _ = set.thread_block();
    set
}

/// A thread that waits for the signals in `set` and hands each to `on`, until `on` says stop.
pub fn spawn_waiter(
    set: SigSet,
    on: impl Fn(Signal) -> bool + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 * 1024)
        .spawn(move || loop {
            if let Ok(sig) = set.wait() {
                if !on(sig) {
                    return;
                }
            }
        })
        .map(|_| ())
}
