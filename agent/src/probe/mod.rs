//! The HTTP health probe: one GET with a hard deadline from connect to last byte.
//!
//! Written on std sockets rather than an HTTP crate because a health probe is one request to a
//! local port: no TLS, no pooling, no redirects. That keeps the agent's RSS and CPU per check
//! small, and makes the deadline exact: every connect and read gets only what is left of it.
//! Invariants: a probe never takes longer than its timeout (+ scheduling noise), never panics on
//! any reply, and reads at most `MAX_BODY` bytes of body.

use std::io::{Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};
use socket2::{Domain, Socket, Type};
use std::os::fd::{AsFd, BorrowedFd};

use crate::sync::lock;
use crate::sys::pidfd::timespec;

use crate::config::target::{HttpTarget, StatusMatch};

/// How much of a body is read to look for `expect_body`.
pub const MAX_BODY: usize = 64 * 1024;
const MAX_HEAD: usize = 16 * 1024;
/// Interim 1xx responses accepted before the final one.
const MAX_INTERIM: usize = 8;

/// What one probe found.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeResult {
    /// From the start of connect to the end of what was read.
    pub latency: Duration,
    pub outcome: ProbeOutcome,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ProbeOutcome {
    Pass {
        status: u16,
    },
    /// Nothing listens, or the connection was refused or reset.
    Connect(String),
    /// No complete answer within the deadline.
    Timeout,
    /// Answered with a status that is not healthy.
    Status(u16),
    /// Healthy status, but the body lacked the expected text.
    Body {
        status: u16,
    },
    /// Not an HTTP response.
    Protocol(String),
}

impl ProbeOutcome {
    pub fn passed(&self) -> bool {
        matches!(self, ProbeOutcome::Pass { .. })
    }

    /// The HTTP status, when one was received.
    pub fn status(&self) -> Option<u16> {
        match self {
            ProbeOutcome::Pass { status }
            | ProbeOutcome::Status(status)
            | ProbeOutcome::Body { status } => Some(*status),
            _ => None,
        }
    }

    /// A short reason for events and logs.
    pub fn reason(&self) -> String {
        match self {
            ProbeOutcome::Pass { status } => format!("http {status}"),
            ProbeOutcome::Connect(e) => format!("connect failed: {e}"),
            ProbeOutcome::Timeout => "timed out".into(),
            ProbeOutcome::Status(s) => format!("http {s}"),
            ProbeOutcome::Body { status } => format!("http {status} without the expected body"),
            ProbeOutcome::Protocol(e) => format!("bad reply: {e}"),
        }
    }
}

/// Probes one target; keeps its resolved addresses between probes.
///
/// A probe is a small state machine on a non-blocking socket (`start`, then `advance` whenever
/// its socket is ready or its deadline passes), so the daemon runs every app's probe from one
/// thread with one poll(2); `probe` drives the same machine alone for the backup check.
#[derive(Debug)]
pub struct Prober {
    target: HttpTarget,
    request: Vec<u8>,
    /// The target's addresses when they need no lookup (an IP literal, `localhost`).
    fixed: Option<Vec<SocketAddr>>,
    /// A name's addresses, looked up off the probing thread (see `Lookup`).
    lookup: Arc<Mutex<Lookup>>,
}

/// The addresses of a host name, refreshed by a short-lived thread of its own: a slow resolver
/// delays only that thread, never the watch loop and so never another app's checks.
#[derive(Debug, Default)]
struct Lookup {
    addrs: Vec<SocketAddr>,
    error: Option<String>,
    running: bool,
    /// A connect to these addresses failed: look the name up again (keep using them meanwhile).
    stale: bool,
}

/// One probe in flight: its socket, where it is in the exchange, and its deadline.
#[derive(Debug)]
pub struct InFlight {
    socket: Socket,
    addrs: Vec<SocketAddr>,
    stage: Stage,
    /// The next address to try if this connect fails.
    next_addr: usize,
    buf: Vec<u8>,
    start: Instant,
    deadline: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Stage {
    Connecting,
    Writing { sent: usize },
    Reading,
}

/// What `start` gives: a result at once (nothing to connect to), or a probe in flight.
#[derive(Debug)]
pub enum Started {
    Done(ProbeResult),
    Pending(InFlight),
}

impl InFlight {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// The poll(2) events this probe waits for.
    pub fn events(&self) -> PollFlags {
        match self.stage {
            Stage::Connecting | Stage::Writing { .. } => PollFlags::OUT,
            Stage::Reading => PollFlags::IN,
        }
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    fn result(&self, outcome: ProbeOutcome) -> ProbeResult {
        ProbeResult {
            latency: self.start.elapsed(),
            outcome,
        }
    }
}

impl Prober {
    pub fn new(target: HttpTarget) -> Prober {
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: pmguard/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            target.path,
            target.host_header(),
            env!("CARGO_PKG_VERSION")
        )
        .into_bytes();
        let fixed = match target.host.parse::<std::net::IpAddr>() {
            Ok(ip) => Some(vec![SocketAddr::new(ip, target.port)]),
            // RFC 6761: `localhost` is the loopback, without asking a resolver.
            Err(_) if target.host.eq_ignore_ascii_case("localhost") => Some(vec![
                SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), target.port),
                SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), target.port),
            ]),
            Err(_) => None,
        };
        let prober = Prober {
            target,
            request,
            fixed,
            lookup: Arc::default(),
        };
        prober.refresh();
        prober
    }

    /// Starts a lookup of the target's name on a thread of its own, unless one is running or
    /// the target needs none.
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
        let (slot, host, port) = (
            self.lookup.clone(),
            self.target.host.clone(),
            self.target.port,
        );
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

    /// The addresses to try now; never waits for a resolver.
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
            return Err(
                error.unwrap_or_else(|| format!("looking up {}: no answer yet", self.target.host))
            );
        }
        Ok(addrs)
    }

    pub fn target(&self) -> &HttpTarget {
        &self.target
    }

    /// One probe from start to result, blocking this thread (at most `timeout`).
    pub fn probe(
        &mut self,
        timeout: Duration,
        expect_status: &StatusMatch,
        expect_body: Option<&str>,
    ) -> ProbeResult {
        // Blocking is fine here (the backup check has a thread per app): look the name up
        // inline rather than failing this one check while a lookup runs.
        if self.fixed.is_none() && lock(&self.lookup).addrs.is_empty() {
            let found = resolve(&self.target.host, self.target.port);
            let mut l = lock(&self.lookup);
            match found {
                Ok(a) => l.addrs = a,
                Err(e) => l.error = Some(e),
            }
        }
        let mut f = match self.start(timeout) {
            Started::Done(r) => return r,
            Started::Pending(f) => f,
        };
        loop {
            wait_ready(&f);
            if let Some(r) = self.advance(&mut f, expect_status, expect_body) {
                return r;
            }
        }
    }

    /// Begins a probe with a deadline `timeout` from now.
    pub fn start(&mut self, timeout: Duration) -> Started {
        let start = Instant::now();
        let deadline = start + timeout;
        let done = |outcome| {
            Started::Done(ProbeResult {
                latency: start.elapsed(),
                outcome,
            })
        };
        let addrs = match self.addresses() {
            Ok(a) => a,
            Err(e) => return done(ProbeOutcome::Connect(e)),
        };
        let mut last_error = String::from("no address");
        for (i, addr) in addrs.iter().enumerate() {
            match connect(addr) {
                Ok(socket) => {
                    return Started::Pending(InFlight {
                        socket,
                        addrs,
                        stage: Stage::Connecting,
                        next_addr: i + 1,
                        buf: Vec::new(),
                        start,
                        deadline,
                    })
                }
                Err(e) => last_error = format!("{addr}: {e}"),
            }
        }
        self.mark_stale();
        done(ProbeOutcome::Connect(last_error))
    }

    /// Moves the probe on as far as its socket allows without waiting. Returns the result once
    /// there is one: an answer, a failure, or the deadline passed (a reply that is already
    /// there is still read first, so a late wake-up of the caller is not blamed on the app).
    pub fn advance(
        &mut self,
        f: &mut InFlight,
        expect_status: &StatusMatch,
        expect_body: Option<&str>,
    ) -> Option<ProbeResult> {
        let outcome = self.step(f, expect_status, expect_body);
        let outcome = match outcome {
            Some(o) => o,
            // Out of time: a complete head with a body still coming is judged on the body read
            // so far (the expected text is not there); anything less is a timeout.
            None if Instant::now() >= f.deadline => match f.stage {
                Stage::Reading if head_end(&f.buf, 0).is_some() => {
                    match evaluate(&f.buf, true, expect_status, expect_body) {
                        Some(ProbeOutcome::Body { status }) => ProbeOutcome::Body { status },
                        _ => ProbeOutcome::Timeout,
                    }
                }
                _ => ProbeOutcome::Timeout,
            },
            None => return None,
        };
        if matches!(outcome, ProbeOutcome::Connect(_)) {
            // Look the name up again (in the background): it may point elsewhere now.
            self.mark_stale();
        }
        Some(f.result(outcome))
    }

    // One match over the probe's stages; the HTTPS/TCP/unix rework (issue 15) replaces it.
    #[allow(clippy::too_many_lines)]
    fn step(
        &mut self,
        f: &mut InFlight,
        expect_status: &StatusMatch,
        expect_body: Option<&str>,
    ) -> Option<ProbeOutcome> {
        let mut reads = 0u32;
        loop {
            match f.stage {
                Stage::Connecting => match connected(&f.socket) {
                    Ok(true) => f.stage = Stage::Writing { sent: 0 },
                    Ok(false) => return None,
                    Err(e) => {
                        // Try the name's next address, if any, within the same deadline.
                        let Some(addr) = f.addrs.get(f.next_addr).copied() else {
                            let failed = f.next_addr.checked_sub(1).and_then(|i| f.addrs.get(i));
                            return Some(ProbeOutcome::Connect(match failed {
                                Some(addr) => format!("{addr}: {e}"),
                                None => e.to_string(),
                            }));
                        };
                        f.next_addr += 1;
                        match connect(&addr) {
                            Ok(s) => f.socket = s,
                            Err(e) => return Some(ProbeOutcome::Connect(format!("{addr}: {e}"))),
                        }
                    }
                },
                Stage::Writing { sent } => match (&f.socket).write(&self.request[sent..]) {
                    Ok(0) => {
                        return Some(ProbeOutcome::Connect(
                            "connection closed while sending the request".into(),
                        ))
                    }
                    Ok(n) if sent + n >= self.request.len() => f.stage = Stage::Reading,
                    Ok(n) => f.stage = Stage::Writing { sent: sent + n },
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
                    Err(e) => return Some(map_io(e)),
                },
                Stage::Reading => {
                    // A server that never stops sending (an endless stream of 100 Continue, a
                    // huge body) must not keep this loop, and so the watch thread, busy.
                    if f.buf.len() >= MAX_HEAD + MAX_BODY {
                        return Some(
                            evaluate(&f.buf, true, expect_status, expect_body).unwrap_or(
                                ProbeOutcome::Protocol("reply larger than 80 KiB".into()),
                            ),
                        );
                    }
                    // Past the deadline only after reading what was already there (a late look
                    // still reads a reply that came in time).
                    if reads > 0 && Instant::now() >= f.deadline {
                        return None;
                    }
                    reads += 1;
                    let mut chunk = [0u8; 4096];
                    match (&f.socket).read(&mut chunk) {
                        Ok(n) => {
                            f.buf.extend_from_slice(&chunk[..n]);
                            let verdict = evaluate(&f.buf, n == 0, expect_status, expect_body);
                            if verdict.is_some() {
                                return verdict;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
                        Err(e) => return Some(map_io(e)),
                    }
                }
            }
        }
    }

    fn mark_stale(&self) {
        if self.fixed.is_none() {
            lock(&self.lookup).stale = true;
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

/// A non-blocking, close-on-exec TCP socket with its connect started.
fn connect(addr: &SocketAddr) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(*addr), Type::STREAM, None)?;
    s.set_nonblocking(true)?;
    match s.connect(&(*addr).into()) {
        Ok(()) => Ok(s),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(s),
        Err(e) => Err(e),
    }
}

/// Whether a non-blocking connect has finished: Ok(false) while it is under way.
fn connected(s: &Socket) -> std::io::Result<bool> {
    if let Some(e) = s.take_error()? {
        return Err(e);
    }
    match s.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Where the head that starts at `from` ends (just past its empty line), accepting CRLF and
/// bare LF line ends (RFC 9112 section 2.2 lets a recipient take LF alone as a line end).
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut line_start = from;
    for (i, &b) in buf.iter().enumerate().skip(from) {
        if b == b'\n' {
            let line = &buf[line_start..i];
            if line.is_empty() || line == b"\r" {
                return Some(i + 1);
            }
            line_start = i + 1;
        }
    }
    None
}

/// Judges the reply read so far: `None` while more is needed. `eof`: the peer closed (or the
/// deadline passed and what is there must be judged as it is).
// One pass over the HTTP grammar; the HTTPS/TCP/unix rework (issue 15) replaces it.
#[allow(clippy::too_many_lines)]
fn evaluate(
    buf: &[u8],
    eof: bool,
    expect_status: &StatusMatch,
    expect_body: Option<&str>,
) -> Option<ProbeOutcome> {
    // Interim 1xx heads (100 Continue, 103 Early Hints) come before the final one: skip them.
    // 101 Switching Protocols is final (a health endpoint that upgrades is not healthy HTTP).
    let mut start = 0;
    let mut interim = 0;
    let (status, head_len, head) = loop {
        let Some(end) = head_end(buf, start) else {
            if buf.len() - start > MAX_HEAD {
                return Some(ProbeOutcome::Protocol(
                    "response head larger than 16 KiB".into(),
                ));
            }
            if eof {
                return Some(if buf.is_empty() {
                    ProbeOutcome::Connect("connection closed without a reply".into())
                } else {
                    ProbeOutcome::Protocol("connection closed mid-header".into())
                });
            }
            return None;
        };
        let head = String::from_utf8_lossy(&buf[start..end]);
        let first = head.lines().next().unwrap_or("").trim_end_matches('\r');
        let status = match parse_status_line(first) {
            Ok(s) => s,
            Err(e) => return Some(ProbeOutcome::Protocol(e)),
        };
        if (100..200).contains(&status) && status != 101 {
            interim += 1;
            if interim > MAX_INTERIM {
                return Some(ProbeOutcome::Protocol(format!(
                    "more than {MAX_INTERIM} interim (1xx) responses"
                )));
            }
            start = end;
            continue;
        }
        break (status, end, head.into_owned());
    };
    if !expect_status.accepts(status) {
        return Some(ProbeOutcome::Status(status));
    }
    let Some(needle) = expect_body else {
        return Some(ProbeOutcome::Pass { status });
    };
    let mut length = None;
    let mut chunked = false;
    for line in head.lines().skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                length = v.parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.to_ascii_lowercase().contains("chunked");
            }
        }
    }
    let raw = &buf[head_len..];
    // 204 and 304 have no body, whatever the headers say.
    let bodyless = matches!(status, 204 | 304);
    let body = if bodyless {
        Vec::new()
    } else if chunked {
        match dechunk(raw) {
            Dechunk::Done(b) | Dechunk::Partial(b) => b,
            Dechunk::Bad => return Some(ProbeOutcome::Protocol("bad chunked encoding".into())),
        }
    } else {
        raw[..length.map_or(raw.len(), |n| n.min(raw.len()))].to_vec()
    };
    // The expected text seen is a pass, however the body is framed and whether or not the
    // server keeps the connection open after it (a keep-alive body without a length).
    if find(&body, needle.as_bytes()).is_some() {
        return Some(ProbeOutcome::Pass { status });
    }
    let complete = bodyless
        || if chunked {
            matches!(dechunk(raw), Dechunk::Done(_))
        } else if let Some(n) = length {
            raw.len() >= n
        } else {
            false
        };
    if complete || eof || body.len() >= MAX_BODY {
        return Some(ProbeOutcome::Body { status });
    }
    None
}

/// Waits with poll(2) until the probe's socket is ready or its deadline passes. poll's timeout
/// is a high-resolution timer: a socket timeout (SO_RCVTIMEO) is rounded to scheduler ticks and
/// overshot the deadline by up to ~20 ms (measured in bench/compare.sh).
fn wait_ready(f: &InFlight) {
    let left = f.deadline.saturating_duration_since(Instant::now());
    // Rounded up to whole ms, as poll(2) would: never a busy loop just before the deadline.
    let left = Duration::from_millis(left.as_micros().div_ceil(1000) as u64);
    let mut fds = [PollFd::from_borrowed_fd(f.fd(), f.events())];
    // EINTR or an error just means `advance` looks again (it re-checks the deadline).
    let _ = poll(&mut fds, Some(&timespec(left)));
}

fn map_io(e: std::io::Error) -> ProbeOutcome {
    use std::io::ErrorKind::*;
    match e.kind() {
        WouldBlock | TimedOut => ProbeOutcome::Timeout,
        _ => ProbeOutcome::Connect(e.to_string()),
    }
}

fn parse_status_line(line: &str) -> Result<u16, String> {
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(format!(
            "not an HTTP/1 status line: {:?}",
            truncate(line, 40)
        ));
    }
    match parts.next().and_then(|c| c.parse::<u16>().ok()) {
        Some(code) if (100..=999).contains(&code) => Ok(code),
        _ => Err(format!("bad status line: {:?}", truncate(line, 40))),
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

enum Dechunk {
    Done(Vec<u8>),
    Partial(Vec<u8>),
    Bad,
}

/// Decodes a chunked body seen so far.
fn dechunk(mut raw: &[u8]) -> Dechunk {
    let mut out = Vec::new();
    loop {
        let Some(eol) = find(raw, b"\r\n") else {
            return Dechunk::Partial(out);
        };
        let size_text = String::from_utf8_lossy(&raw[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            return Dechunk::Bad;
        };
        raw = &raw[eol + 2..];
        if size == 0 {
            return Dechunk::Done(out);
        }
        if raw.len() < size {
            out.extend_from_slice(raw);
            return Dechunk::Partial(out);
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size..];
        if raw.len() < 2 {
            return Dechunk::Partial(out);
        }
        raw = &raw[2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    /// Serves one connection with `reply` after `delay`, on 127.0.0.1.
    fn serve_once(
        reply: &'static [u8],
        delay: Duration,
    ) -> (HttpTarget, thread::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let handle = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = vec![0u8; 2048];
            let n = s.read(&mut req).unwrap();
            req.truncate(n);
            thread::sleep(delay);
            let _ = s.write_all(reply);
            req
        });
        let t = HttpTarget::parse(&format!("http://127.0.0.1:{port}/api-health?x=1")).unwrap();
        (t, handle)
    }

    fn probe(t: HttpTarget, timeout_ms: u64, body: Option<&str>) -> ProbeResult {
        Prober::new(t).probe(
            Duration::from_millis(timeout_ms),
            &StatusMatch::Success,
            body,
        )
    }

    #[test]
    fn parses_urls() {
        let t = HttpTarget::parse("http://localhost:5000/api-health").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("localhost", 5000, "/api-health")
        );
        let t = HttpTarget::parse("http://[::1]:8080").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("::1", 8080, "/")
        );
        assert_eq!(t.host_header(), "[::1]:8080");
        assert!(HttpTarget::parse("https://x/")
            .unwrap_err()
            .contains("https"));
        assert!(HttpTarget::parse("ftp://x/").is_err());
        assert!(HttpTarget::parse("http://x:0/").is_err());
        assert!(HttpTarget::parse("http://x:99999/").is_err());
        assert!(HttpTarget::parse("http://u:p@x/").is_err());
        assert!(HttpTarget::parse("http:///x").is_err());
        assert!(HttpTarget::parse("http://x/a b").is_err());
        // Hosts: no spaces, control characters or junk; an IPv6 literal must be one.
        for bad in [
            "http://ex ample/",
            "http://a\tb/",
            "http://a%0a/",
            "http://[zz]/",
            "http://a\u{7f}b/",
        ] {
            assert!(HttpTarget::parse(bad).is_err(), "{bad:?} accepted");
        }
        // A query string (often a token) is never shown.
        let t = HttpTarget::parse("http://127.0.0.1:5000/health?token=s3cret").unwrap();
        assert_eq!(t.redacted(), "http://127.0.0.1:5000/health?<redacted>");
        assert!(!t.redacted().contains("s3cret"));
    }

    #[test]
    fn passes_on_2xx_and_sends_a_proper_request() {
        let (t, h) = serve_once(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            Duration::ZERO,
        );
        let r = probe(t, 2000, None);
        assert_eq!(r.outcome, ProbeOutcome::Pass { status: 200 });
        let req = String::from_utf8(h.join().unwrap()).unwrap();
        assert!(
            req.starts_with("GET /api-health?x=1 HTTP/1.1\r\nHost: 127.0.0.1:"),
            "{req}"
        );
        assert!(req.ends_with("\r\n\r\n"));
    }

    #[test]
    fn fails_on_500_and_on_missing_body_text() {
        let (t, _h) = serve_once(
            b"HTTP/1.1 500 Internal Server Error\r\n\r\n",
            Duration::ZERO,
        );
        assert_eq!(probe(t, 2000, None).outcome, ProbeOutcome::Status(500));
        let (t, _h) = serve_once(
            b"HTTP/1.1 200 OK\r\nContent-Length: 18\r\n\r\n{\"status\":\"dead\"}\n",
            Duration::ZERO,
        );
        assert_eq!(
            probe(t, 2000, Some("healthy")).outcome,
            ProbeOutcome::Body { status: 200 }
        );
    }

    #[test]
    fn finds_body_text_across_chunks() {
        let (t, _h) = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\n{\"statu\r\n14\r\ns\":\"API is healthy\"}\r\n0\r\n\r\n",
            Duration::ZERO,
        );
        assert_eq!(
            probe(t, 2000, Some("API is healthy")).outcome,
            ProbeOutcome::Pass { status: 200 }
        );
    }

    #[test]
    fn slow_but_in_time_passes_and_too_slow_times_out_on_time() {
        let (t, _h) = serve_once(
            b"HTTP/1.0 204 No Content\r\n\r\n",
            Duration::from_millis(150),
        );
        let r = probe(t, 1000, None);
        assert_eq!(r.outcome, ProbeOutcome::Pass { status: 204 });
        assert!(r.latency >= Duration::from_millis(150));

        let (t, _h) = serve_once(b"HTTP/1.1 200 OK\r\n\r\n", Duration::from_millis(1500));
        let r = probe(t, 300, None);
        assert_eq!(r.outcome, ProbeOutcome::Timeout);
        assert!(r.latency < Duration::from_millis(1000), "{:?}", r.latency);
    }

    #[test]
    fn refused_and_garbage_are_failures_not_panics() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let t = HttpTarget::parse(&format!("http://127.0.0.1:{port}/")).unwrap();
        assert!(matches!(
            probe(t, 500, None).outcome,
            ProbeOutcome::Connect(_)
        ));
        let (t, _h) = serve_once(b"SSH-2.0-OpenSSH\r\n\r\n", Duration::ZERO);
        assert!(matches!(
            probe(t, 500, None).outcome,
            ProbeOutcome::Protocol(_)
        ));
        let (t, _h) = serve_once(b"", Duration::ZERO);
        assert!(matches!(
            probe(t, 500, None).outcome,
            ProbeOutcome::Connect(_)
        ));
    }

    /// The daemon's way: several probes in flight at once, driven by one poll(2) loop.
    #[test]
    fn probes_in_flight_together_finish_independently() {
        let (fast, _a) = serve_once(b"HTTP/1.1 200 OK\r\n\r\n", Duration::ZERO);
        let (failing, _b) = serve_once(b"HTTP/1.1 500 Oops\r\n\r\n", Duration::from_millis(400));
        let (hung, _c) = serve_once(b"HTTP/1.1 200 OK\r\n\r\n", Duration::from_secs(3));
        let mut probers: Vec<Prober> = [fast, failing, hung].into_iter().map(Prober::new).collect();
        let began = Instant::now();
        let mut flights: Vec<Option<InFlight>> = probers
            .iter_mut()
            .map(|p| match p.start(Duration::from_millis(600)) {
                Started::Pending(f) => Some(f),
                Started::Done(r) => panic!("no connect in flight: {r:?}"),
            })
            .collect();
        let mut results: Vec<Option<ProbeOutcome>> = vec![None, None, None];
        while results.iter().any(Option::is_none) {
            let live: Vec<usize> = (0..3).filter(|i| flights[*i].is_some()).collect();
            let mut ready = [false; 3];
            {
                let mut fds: Vec<PollFd<'_>> = live
                    .iter()
                    .filter_map(|&i| flights[i].as_ref())
                    .map(|f| PollFd::from_borrowed_fd(f.fd(), f.events()))
                    .collect();
                let _ = poll(&mut fds, Some(&timespec(Duration::from_millis(50))));
                for (k, &i) in live.iter().enumerate() {
                    ready[i] = !fds[k].revents().is_empty();
                }
            }
            for i in 0..3 {
                if let Some(f) = flights[i].as_mut() {
                    if ready[i] || Instant::now() >= f.deadline() {
                        if let Some(r) = probers[i].advance(f, &StatusMatch::Success, None) {
                            results[i] = Some(r.outcome);
                            flights[i] = None;
                        }
                    }
                }
            }
        }
        assert_eq!(results[0], Some(ProbeOutcome::Pass { status: 200 }));
        assert_eq!(results[1], Some(ProbeOutcome::Status(500)));
        assert_eq!(results[2], Some(ProbeOutcome::Timeout));
        // Side by side, not one after the other (that would be at least 400 + 600 ms).
        assert!(
            began.elapsed() < Duration::from_millis(950),
            "{:?}",
            began.elapsed()
        );
    }

    /// A caller that looks late (its loop was busy) still reads the reply that did arrive in
    /// time, rather than blaming the app with a timeout.
    #[test]
    fn a_late_look_reads_a_reply_that_is_already_there() {
        let (t, _h) = serve_once(b"HTTP/1.1 200 OK\r\n\r\n", Duration::from_millis(200));
        let mut p = Prober::new(t);
        let Started::Pending(mut f) = p.start(Duration::from_millis(300)) else {
            panic!("no connect in flight");
        };
        wait_ready(&f);
        // Connected: the request goes out; the reply is 200 ms away.
        assert!(p.advance(&mut f, &StatusMatch::Success, None).is_none());
        // The caller comes back after the deadline; the reply came before it.
        std::thread::sleep(Duration::from_millis(600));
        let r = p.advance(&mut f, &StatusMatch::Success, None).unwrap();
        assert_eq!(r.outcome, ProbeOutcome::Pass { status: 200 });
    }

    #[test]
    fn interim_1xx_heads_are_skipped_and_bare_lf_heads_are_read() {
        let ok = StatusMatch::Success;
        let cases: [(&[u8], Option<&str>, ProbeOutcome); 5] = [
            (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                None,
                ProbeOutcome::Pass { status: 200 },
            ),
            (
                b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 503 Busy\r\n\r\n",
                None,
                ProbeOutcome::Status(503),
            ),
            (
                b"HTTP/1.1 200 OK\nContent-Length: 7\n\nhealthy",
                Some("healthy"),
                ProbeOutcome::Pass { status: 200 },
            ),
            (
                b"HTTP/1.1 200 OK\n\r\n",
                None,
                ProbeOutcome::Pass { status: 200 },
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
                None,
                ProbeOutcome::Status(101),
            ),
        ];
        for (reply, body, want) in cases {
            assert_eq!(
                evaluate(reply, false, &ok, body),
                Some(want),
                "{:?}",
                String::from_utf8_lossy(reply)
            );
        }
        // Only an interim head so far: wait for the final one.
        assert_eq!(
            evaluate(b"HTTP/1.1 100 Continue\r\n\r\n", false, &ok, None),
            None
        );
        // 204 has no body: judged at once, never waited for.
        assert_eq!(
            evaluate(
                b"HTTP/1.1 204 No Content\r\n\r\n",
                false,
                &StatusMatch::AnyOf(vec![204]),
                Some("x")
            ),
            Some(ProbeOutcome::Body { status: 204 })
        );
    }

    #[test]
    fn an_endless_stream_of_interim_responses_ends_on_time() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_ok()
            {
            }
        });
        let t = HttpTarget::parse(&format!("http://127.0.0.1:{port}/h")).unwrap();
        let began = Instant::now();
        let r = probe(t, 1_000, None);
        assert!(!r.outcome.passed());
        assert!(
            began.elapsed() < Duration::from_millis(1_500),
            "{:?}",
            began.elapsed()
        );
    }

    /// Serves one connection: `reply`, then keeps the connection open for `hold`.
    fn serve_held(reply: &'static [u8], hold: Duration) -> (HttpTarget, thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let handle = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = vec![0u8; 2048];
            let _ = s.read(&mut req);
            let _ = s.write_all(reply);
            thread::sleep(hold);
        });
        (
            HttpTarget::parse(&format!("http://127.0.0.1:{port}/h")).unwrap(),
            handle,
        )
    }

    #[test]
    fn a_keep_alive_body_without_a_length_passes_as_soon_as_the_text_is_there() {
        let (t, _h) = serve_held(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\n{\"status\":\"healthy\"}",
            Duration::from_secs(3),
        );
        let r = probe(t, 2_000, Some("healthy"));
        assert_eq!(r.outcome, ProbeOutcome::Pass { status: 200 });
        assert!(r.latency < Duration::from_millis(500), "{:?}", r.latency);
        // Without the text: a body failure at the deadline, not a timeout.
        let (t, _h) = serve_held(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\n{\"status\":\"dead\"}",
            Duration::from_secs(3),
        );
        let r = probe(t, 500, Some("healthy"));
        assert_eq!(r.outcome, ProbeOutcome::Body { status: 200 });
    }

    #[test]
    fn a_name_is_looked_up_off_the_probing_thread() {
        // `ip6-localhost` is in Debian's /etc/hosts: a lookup that never leaves the machine.
        let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        if !hosts.split_whitespace().any(|w| w == "ip6-localhost") {
            eprintln!("skipped: /etc/hosts has no ip6-localhost");
            return;
        }
        let listener = TcpListener::bind("[::1]:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        thread::spawn(move || {
            for s in listener.incoming().take(3) {
                let mut s = s.unwrap();
                let mut req = [0u8; 1024];
                let _ = s.read(&mut req);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
            }
        });
        let t = HttpTarget::parse(&format!("http://ip6-localhost:{port}/h")).unwrap();
        let mut p = Prober::new(t);
        // `start` never waits for a resolver: at worst this check says the answer is pending.
        let began = Instant::now();
        let first = p.start(Duration::from_secs(1));
        assert!(
            began.elapsed() < Duration::from_millis(50),
            "{:?}",
            began.elapsed()
        );
        drop(first);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = p.probe(Duration::from_secs(1), &StatusMatch::Success, None);
            if r.outcome.passed() {
                break;
            }
            assert!(Instant::now() < deadline, "never passed: {r:?}");
            thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn dechunk_handles_garbage() {
        assert!(matches!(dechunk(b"zz\r\n"), Dechunk::Bad));
        assert!(matches!(dechunk(b"5\r\nab"), Dechunk::Partial(b) if b == b"ab"));
    }
}
