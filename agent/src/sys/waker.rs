//! An eventfd that wakes a thread out of its poll(2): the watch loop polls it beside the probes'
//! sockets, and any thread that sends the loop a message writes to it.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::event::{eventfd, EventfdFlags};

#[derive(Debug)]
pub struct Waker(OwnedFd);

impl Waker {
    pub fn new() -> std::io::Result<Waker> {
        let fd = eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)?;
        Ok(Waker(fd))
    }

    /// Makes the fd readable. A full counter (EAGAIN) means a wake-up is already pending, which
    /// is all that is needed.
    pub fn wake(&self) {
        let _ = rustix::io::write(&self.0, &1u64.to_ne_bytes());
    }

    /// Clears pending wake-ups (non-blocking).
    pub fn drain(&self) {
        let mut n = [0u8; 8];
        let _ = rustix::io::read(&self.0, &mut n);
    }

    /// The fd to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}
