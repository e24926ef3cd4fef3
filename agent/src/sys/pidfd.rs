//! Process file descriptors: a signal sent through one reaches the process it was opened on,
//! never a later holder of the same pid.

use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};

/// An open pidfd.
#[derive(Debug)]
pub struct Pidfd {
    fd: OwnedFd,
}

impl Pidfd {
    /// `None` when the process is gone (or the kernel has no pidfds: Linux < 5.3).
    pub fn open(pid: u32) -> Option<Pidfd> {
        let pid = Pid::from_raw(i32::try_from(pid).ok()?)?;
        pidfd_open(pid, PidfdFlags::empty())
            .ok()
            .map(|fd| Pidfd { fd })
    }

    /// Whether the process still runs: a pidfd polls readable once it has exited.
    pub fn alive(&self) -> bool {
        matches!(self.poll_exit(Duration::ZERO), Ok(0))
    }

    pub fn kill(&self) -> std::io::Result<()> {
        pidfd_send_signal(&self.fd, Signal::KILL).map_err(std::io::Error::from)
    }

    /// Sends SIGTERM, SIGINT or SIGHUP (what a person or a CI runner sends to stop something);
    /// any other signal is not sent (`InvalidInput`).
    pub fn forward(&self, sig: nix::sys::signal::Signal) -> std::io::Result<()> {
        use nix::sys::signal::Signal as N;
        let s = match sig {
            N::SIGTERM => Signal::TERM,
            N::SIGINT => Signal::INT,
            N::SIGHUP => Signal::HUP,
            _ => return Err(std::io::ErrorKind::InvalidInput.into()),
        };
        pidfd_send_signal(&self.fd, s).map_err(std::io::Error::from)
    }

    /// Waits up to `max` for the process to exit.
    pub fn wait_exit(&self, max: Duration) {
        // An error (EINTR) only ends the wait early; callers look at `alive` again.
        let _ = self.poll_exit(max);
    }

    fn poll_exit(&self, max: Duration) -> rustix::io::Result<usize> {
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        poll(&mut fds, Some(&timespec(max)))
    }
}

/// `d` as a poll(2) timeout.
pub fn timespec(d: Duration) -> Timespec {
    Timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: i64::from(d.subsec_nanos()),
    }
}
