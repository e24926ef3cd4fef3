//! Where a probe connects: a host name or address and a port (looked up off the probing
//! thread), or a unix socket path. Sockets are non-blocking and close-on-exec from the start.
//!
//! Invariant: `addresses` never waits for a resolver: a slow DNS answer delays only the
//! short-lived lookup thread of that one target, never the watch loop and so never another app.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use socket2::{SockAddr, Socket, Type};

use crate::sync::lock;

/// A probe's destination.
#[derive(Debug)]
pub enum Endpoint {
    Inet(Inet),
    Unix(PathBuf),
}

/// A host and port, with the addresses found for it.
#[derive(Debug)]
pub struct Inet {
    host: String,
    port: u16,
    /// The addresses when they need no lookup (an IP literal, `localhost`).
    fixed: Option<Vec<SocketAddr>>,
    /// A name's addresses, looked up off the probing thread.
    lookup: Arc<Mutex<Lookup>>,
}

/// The addresses of a host name, refreshed by a short-lived thread of its own.
#[derive(Debug, Default)]
struct Lookup {
    addrs: Vec<SocketAddr>,
    error: Option<String>,
    running: bool,
    /// A connect to these addresses failed: look the name up again (keep using them meanwhile).
    stale: bool,
}

impl Endpoint {
    pub fn inet(host: &str, port: u16) -> Endpoint {
        let fixed = match host.parse::<IpAddr>() {
            Ok(ip) => Some(vec![SocketAddr::new(ip, port)]),
            // RFC 6761: `localhost` is the loopback, without asking a resolver.
            Err(_) if host.eq_ignore_ascii_case("localhost") => Some(vec![
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port),
            ]),
            Err(_) => None,
        };
        let inet = Inet {
            host: host.to_string(),
            port,
            fixed,
            lookup: Arc::default(),
        };
        inet.refresh();
        Endpoint::Inet(inet)
    }

    /// The addresses to try now, in order; never waits for a resolver.
    pub fn addresses(&self) -> Result<Vec<SockAddr>, String> {
        match self {
            Endpoint::Unix(path) => SockAddr::unix(path)
                .map(|a| vec![a])
                .map_err(|e| format!("{}: {e}", path.display())),
            Endpoint::Inet(i) => Ok(i.addresses()?.into_iter().map(SockAddr::from).collect()),
        }
    }

    /// Blocking is fine for the caller (the backup check has a thread per app): look the name
    /// up inline when nothing is known yet, rather than failing this one check.
    pub fn resolve_now(&self) {
        if let Endpoint::Inet(i) = self {
            if i.fixed.is_none() && lock(&i.lookup).addrs.is_empty() {
                let found = resolve(&i.host, i.port);
                let mut l = lock(&i.lookup);
                match found {
                    Ok(a) => l.addrs = a,
                    Err(e) => l.error = Some(e),
                }
            }
        }
    }

    /// A connect failed: look the name up again (in the background), it may point elsewhere.
    pub fn mark_stale(&self) {
        if let Endpoint::Inet(i) = self {
            if i.fixed.is_none() {
                lock(&i.lookup).stale = true;
            }
        }
    }
}

impl Inet {
    fn addresses(&self) -> Result<Vec<SocketAddr>, String> {
        if let Some(a) = &self.fixed {
            return Ok(a.clone());
        }
        let (addrs, error, stale) = {
            let l = lock(&self.lookup);
            (l.addrs.clone(), l.error.clone(), l.stale)
        };
        if addrs.is_empty() || stale || error.is_some() {
            self.refresh();
        }
        if addrs.is_empty() {
            return Err(error.unwrap_or_else(|| format!("looking up {}: no answer yet", self.host)));
        }
        Ok(addrs)
    }

    /// Starts a lookup of the name on a thread of its own, unless one is running or the target
    /// needs none.
    fn refresh(&self) {
        if self.fixed.is_some() {
            return;
        }
        {
            let mut l = lock(&self.lookup);
            if l.running {
                return;
            }
            l.running = true;
        }
        let (slot, host, port) = (self.lookup.clone(), self.host.clone(), self.port);
        let spawned = std::thread::Builder::new()
            .name("resolve".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                let found = resolve(&host, port);
                let mut l = lock(&slot);
                l.running = false;
                match found {
                    Ok(addrs) => {
                        l.addrs = addrs;
                        l.error = None;
                        l.stale = false;
                    }
                    Err(e) => l.error = Some(e),
                }
            });
        if let Err(e) = spawned {
            let mut l = lock(&self.lookup);
            l.running = false;
            l.error = Some(format!("cannot start a lookup: {e}"));
        }
    }
}

/// One lookup through the system resolver (blocking: run it off the watch loop).
fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let found: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    if found.is_empty() {
        return Err(format!("{host} has no address"));
    }
    Ok(found)
}

/// A non-blocking, close-on-exec stream socket with its connect started.
pub fn connect(addr: &SockAddr) -> std::io::Result<Socket> {
    // Non-blocking from the start (socket2 adds SOCK_CLOEXEC): no fcntl round trips per probe.
    let s = Socket::new(
        addr.domain(),
        Type::from(libc::SOCK_STREAM | libc::SOCK_NONBLOCK),
        None,
    )?;
    match s.connect(addr) {
        Ok(()) => Ok(s),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(s),
        // A unix socket whose listen queue is full says EAGAIN: a refused connect.
        Err(e) => Err(e),
    }
}

/// Whether a non-blocking connect has finished: Ok(false) while it is under way. One syscall
/// when it has (a loopback connect is done before `connect(2)` returns); the pending error is
/// asked for only while there is no peer, which is where a refused or failed connect shows.
pub fn connected(s: &Socket) -> std::io::Result<bool> {
    match s.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => match s.take_error()? {
            Some(e) => Err(e),
            None => Ok(false),
        },
        Err(e) => Err(e),
    }
}

/// How an address is shown in a failure: `ip:port`, or the socket's path.
pub fn show(addr: &SockAddr) -> String {
    match (addr.as_socket(), addr.as_pathname()) {
        (Some(a), _) => a.to_string(),
        (None, Some(p)) => Path::display(p).to_string(),
        (None, None) => "?".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A probe socket never blocks the watch loop and never leaks into a `pm2` the agent runs:
    /// both flags come from socket(2) itself, which a socket2 upgrade could change.
    #[test]
    fn a_probe_socket_is_non_blocking_and_closed_on_exec() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = SockAddr::from(listener.local_addr().unwrap());
        let s = connect(&addr).unwrap();
        let status = rustix::fs::fcntl_getfl(&s).unwrap();
        assert!(status.contains(rustix::fs::OFlags::NONBLOCK), "{status:?}");
        let fd = rustix::io::fcntl_getfd(&s).unwrap();
        assert!(fd.contains(rustix::io::FdFlags::CLOEXEC), "{fd:?}");
    }
}
