//! systemd's notify protocol (`READY=1`, `WATCHDOG=1`, `STOPPING=1`, `RELOADING=1`, `STATUS=`).
//!
//! A datagram to `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace). Without the
//! variable every call is a no-op, so the agent runs the same under systemd and in a terminal.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    /// Half of `WATCHDOG_USEC` when systemd armed a watchdog for this pid.
    pub watchdog: Option<Duration>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|p| {
            let p = p.to_string_lossy().into_owned();
            let addr = match p.strip_prefix('@') {
                Some(name) => SocketAddr::from_abstract_name(name.as_bytes()).ok()?,
                None => SocketAddr::from_pathname(&p).ok()?,
            };
            // Non-blocking: the watch loop pings the watchdog, and a PID 1 too busy to read its
            // queue (a long daemon-reload) must not stall every probe. A ping it cannot take
            // now is dropped; the next one follows within the period.
            let sock = UnixDatagram::unbound().ok()?;
            sock.set_nonblocking(true).ok()?;
            Some((sock, addr))
        });
        let pid_matches = std::env::var("WATCHDOG_PID")
            .ok()
            .is_none_or(|p| p.parse::<u32>().ok() == Some(std::process::id()));
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|us| *us > 0 && pid_matches)
            .map(|us| Duration::from_micros(us / 2));
        Notifier { socket, watchdog }
    }

    pub fn send(&self, state: &str) {
        if let Some((sock, addr)) = &self.socket {
            match sock.send_to_addr(state.as_bytes(), addr) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    tracing::debug!(message = "systemd's notify socket is full; dropped.", state);
                }
                Err(error) => tracing::warn!(message = "Cannot notify systemd.", %error),
            }
        }
    }
}
