//! One probe on a non-blocking socket: connect (trying each address in turn), then for HTTP
//! send the request and read the reply, through rustls for https. `advance` moves it on as far
//! as the socket allows without waiting; the caller polls `fd()` for `events()`.
//!
//! With `keep_alive` (plain http only) the connection of a passed probe whose reply was whole
//! and framed is kept for the next run: a request on a kept connection costs the agent less
//! than half a new connection's CPU (no handshake, no teardown; BENCHMARKS.md). A kept
//! connection is used only while nothing came on it since (a peek), and for at most `KEEP_FOR`
//! after it was opened, so an app that stops accepting new connections is still seen within
//! that time. A run on a kept connection that gets nothing back (the server closed it as the
//! request went) is retried at once on a new connection within the same deadline. After a
//! failed probe no probe of the app keeps its connection (`Prober::finished`): the retries that
//! count towards a restart connect afresh. A connection the next check could not use (too old
//! by then) is closed after its check (`release_unless_used_by`), so a server that serves one
//! connection at a time is held only between close checks.
//!
//! Invariants: never blocks; reads at most `MAX_HEAD + MAX_BODY` plaintext bytes per call
//! sequence; a reply that arrived before the deadline is still read after it.

use std::io::{ErrorKind, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use rustix::event::PollFlags;
use rustls::ClientConnection;
use socket2::{SockAddr, Socket};

use crate::config::target::{Method, ProbeKind, ProbeSpec};
use crate::sync::lock;

use super::endpoint::{connect, connected, show, Endpoint};
use super::http::{self, Asked, MAX_BODY, MAX_HEAD};
use super::tls::{days_left, Tls};
use super::ProbeOutcome;

/// How long a kept connection serves after it was opened; then the next run connects anew.
pub const KEEP_FOR: Duration = Duration::from_secs(30);

/// One configured probe and what it keeps between runs. Its `Debug` leaves out the request
/// bytes, which hold header values and the query string.
pub struct Single {
    pub spec: ProbeSpec,
    endpoint: Endpoint,
    /// The request bytes (empty for a tcp probe).
    request: Vec<u8>,
    tls: Option<Tls>,
    /// Connections may be kept (`keep_alive`, plain http, no `Connection: close` of the user's).
    keeps: bool,
    /// The connection the last passed run left open, and when it was opened.
    kept: Option<(Socket, Instant)>,
}

impl std::fmt::Debug for Single {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Single")
            .field("probe", &self.spec.describe())
            .field("request_len", &self.request.len())
            .field("tls", &self.tls.is_some())
            .field("kept", &self.kept.is_some())
            .finish_non_exhaustive()
    }
}

/// One run of a `Single` in progress. Its `Debug` leaves out the buffer (a reply may echo the
/// request's secrets).
pub struct Flight {
    socket: Socket,
    addrs: Vec<SockAddr>,
    /// The next address to try if this connect fails.
    next_addr: usize,
    connecting: bool,
    sent: usize,
    tls: Option<Box<ClientConnection>>,
    buf: Vec<u8>,
    pub deadline: Instant,
    /// When this run's connection was opened (earlier than the run for a kept one).
    opened: Instant,
    /// The run uses a kept connection: nothing back from it is retried on a new one.
    reused: bool,
}

impl std::fmt::Debug for Flight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flight")
            .field("addrs", &self.addrs.len())
            .field("next_addr", &self.next_addr)
            .field("connecting", &self.connecting)
            .field("sent", &self.sent)
            .field("tls", &self.tls.is_some())
            .field("read", &self.buf.len())
            .field("reused", &self.reused)
            .finish_non_exhaustive()
    }
}

impl Flight {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    pub fn events(&self, request_len: usize) -> PollFlags {
        let wants_write = match &self.tls {
            _ if self.connecting => true,
            Some(c) => c.wants_write(),
            None => self.sent < request_len,
        };
        if wants_write {
            PollFlags::OUT
        } else {
            PollFlags::IN
        }
    }

    /// A complete reply head has been read (the deadline then judges the body so far).
    pub fn has_head(&self) -> bool {
        !self.connecting && http::head_end(&self.buf, 0).is_some()
    }
}

impl Single {
    pub fn new(spec: ProbeSpec) -> Single {
        let (endpoint, request, tls, keeps) = match &spec.kind {
            ProbeKind::Tcp(t) => (Endpoint::inet(&t.host, t.port), Vec::new(), None, false),
            ProbeKind::Http(h) => (
                match &h.socket {
                    Some(path) => Endpoint::Unix(path.clone()),
                    None => Endpoint::inet(&h.url.host, h.url.port),
                },
                http::request(h),
                h.tls.as_ref().map(|s| Tls::new(s, &h.url.host)),
                // Never a POST: one the server may have read is not sent again on a new
                // connection, so a kept one it closed as the request came would be a failure.
                h.tls.is_none() && h.method != Method::Post && http::request_keeps_open(h),
            ),
        };
        Single {
            spec,
            endpoint,
            request,
            tls,
            keeps,
            kept: None,
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn request_len(&self) -> usize {
        self.request.len()
    }

    /// Days until the certificate seen by the last run expires (https only).
    pub fn cert_days(&self, now_unix: i64) -> Option<i64> {
        let seen = (*lock(&self.tls.as_ref()?.seen))?;
        Some(days_left(seen, now_unix))
    }

    /// A verified https probe whose certificate is past its `notAfter` fails, even when the
    /// handshake resumed a session (which shows no certificate to verify).
    pub fn expiry_checked(&self, outcome: ProbeOutcome, days: Option<i64>) -> ProbeOutcome {
        let verifies = match &self.spec.kind {
            ProbeKind::Http(h) => h.tls.as_ref().is_some_and(|t| t.verify),
            ProbeKind::Tcp(_) => false,
        };
        match days {
            Some(d) if d < 0 && verifies && outcome.passed() => {
                ProbeOutcome::Tls(format!("certificate expired {} day(s) ago", -d))
            }
            _ => outcome,
        }
    }

    /// Begins a run: on the kept connection if there is a usable one, else connects to the
    /// first address that takes a connect.
    pub fn start(&mut self, start: Instant) -> Result<Flight, ProbeOutcome> {
        // `seen` is kept from earlier runs: a resumed TLS session shows no certificate, and it is
        // the same one.
        let deadline = start + self.spec.timeout;
        if let Some((socket, opened)) = self.kept.take() {
            if start.saturating_duration_since(opened) < KEEP_FOR && idle_and_open(&socket) {
                return Ok(Flight {
                    socket,
                    addrs: Vec::new(),
                    next_addr: 0,
                    connecting: false,
                    sent: 0,
                    tls: None,
                    buf: Vec::new(),
                    deadline,
                    opened,
                    reused: true,
                });
            }
        }
        let (socket, addrs, next_addr) = self.open()?;
        Ok(Flight {
            socket,
            next_addr,
            addrs,
            connecting: true,
            sent: 0,
            tls: None,
            buf: Vec::new(),
            deadline,
            opened: Instant::now(),
            reused: false,
        })
    }

    /// A new connection: the socket, the addresses, the index of the next one to try.
    fn open(&self) -> Result<(Socket, Vec<SockAddr>, usize), ProbeOutcome> {
        let addrs = self.endpoint.addresses().map_err(ProbeOutcome::Connect)?;
        let mut last_error = String::from("no address");
        for (i, addr) in addrs.iter().enumerate() {
            match connect(addr) {
                Ok(socket) => return Ok((socket, addrs, i + 1)),
                Err(e) => last_error = format!("{}: {e}", show(addr)),
            }
        }
        self.endpoint.mark_stale();
        Err(ProbeOutcome::Connect(last_error))
    }

    /// Closes the kept connection (a failed check: its retries connect anew).
    pub fn forget_kept(&mut self) {
        self.kept = None;
    }

    /// Closes the kept connection if the next run, at `next`, could not use it anyway: it
    /// would be `KEEP_FOR` old by then. A server that serves one connection at a time is not
    /// held until a distant next check.
    pub fn release_unless_used_by(&mut self, next: Instant) {
        if self
            .kept
            .as_ref()
            .is_some_and(|(_, opened)| next.saturating_duration_since(*opened) >= KEEP_FOR)
        {
            self.kept = None;
        }
    }

    /// After a run's outcome: keeps its connection for the next run when the probe passed and
    /// the reply was whole and framed with the connection left open.
    pub fn settle(&mut self, f: &Flight, outcome: &ProbeOutcome) {
        let whole = |ask: Asked<'_>| http::keeps_open(&f.buf, ask.head);
        if self.keeps && outcome.passed() && !f.connecting && self.asked().is_some_and(whole) {
            // A second descriptor for the connection: the run's own closes with the run.
            if let Ok(s) = f.socket.try_clone() {
                self.kept = Some((s, f.opened));
            }
        }
    }

    /// The outcome of a run whose deadline passed: a complete head with a body still coming is
    /// judged on the body read so far (the expected text is not there); anything less is a
    /// timeout.
    pub fn late(&self, f: &Flight) -> ProbeOutcome {
        match self.asked() {
            Some(ask) if f.has_head() => match http::evaluate(&f.buf, true, ask) {
                Some(ProbeOutcome::Body { status }) => ProbeOutcome::Body { status },
                _ => ProbeOutcome::Timeout,
            },
            _ => ProbeOutcome::Timeout,
        }
    }

    fn asked(&self) -> Option<Asked<'_>> {
        match &self.spec.kind {
            ProbeKind::Http(h) => Some(Asked {
                expect: &h.expect,
                head: h.method == Method::Head,
            }),
            ProbeKind::Tcp(_) => None,
        }
    }

    /// Moves the run on without waiting; `None` while it needs the socket to be ready again.
    pub fn step(&mut self, f: &mut Flight) -> Option<ProbeOutcome> {
        if f.connecting {
            match self.connect_step(f) {
                Ok(true) => {}
                Ok(false) => return None,
                Err(outcome) => return Some(outcome),
            }
        }
        let Some(ask) = self.asked() else {
            return Some(ProbeOutcome::Connected);
        };
        let outcome = match f.tls.as_mut() {
            None => exchange_plain(f, &self.request, ask)?,
            Some(_) => exchange_tls(f, ask)?,
        };
        if f.reused && f.buf.is_empty() && matches!(outcome, ProbeOutcome::Connect(_)) {
            // The server closed the kept connection as the request went (its idle timeout):
            // the app did not answer "no", so ask again on a new connection (a kept probe is
            // never a POST, see `new`).
            match self.open() {
                Ok((socket, addrs, next_addr)) => {
                    f.socket = socket;
                    f.addrs = addrs;
                    f.next_addr = next_addr;
                    f.connecting = true;
                    f.sent = 0;
                    f.opened = Instant::now();
                    f.reused = false;
                    return self.step(f);
                }
                Err(outcome) => return Some(outcome),
            }
        }
        Some(outcome)
    }

    /// Ok(true) once connected (and, for https, the TLS client set up with the request queued).
    fn connect_step(&mut self, f: &mut Flight) -> Result<bool, ProbeOutcome> {
        loop {
            match connected(&f.socket) {
                Ok(true) => break,
                Ok(false) => return Ok(false),
                Err(e) => {
                    // Try the name's next address, if any, within the same deadline.
                    let failed = f.next_addr.checked_sub(1).and_then(|i| f.addrs.get(i));
                    let failed =
                        failed.map_or_else(|| e.to_string(), |a| format!("{}: {e}", show(a)));
                    let Some(addr) = f.addrs.get(f.next_addr) else {
                        return Err(ProbeOutcome::Connect(failed));
                    };
                    f.next_addr += 1;
                    f.socket = connect(addr)
                        .map_err(|e| ProbeOutcome::Connect(format!("{}: {e}", show(addr))))?;
                }
            }
        }
        f.connecting = false;
        if let Some(t) = &self.tls {
            let config = t.config.clone().map_err(ProbeOutcome::Tls)?;
            let name = t.name.clone().map_err(ProbeOutcome::Tls)?;
            let mut conn = ClientConnection::new(config, name)
                .map_err(|e| ProbeOutcome::Tls(e.to_string()))?;
            // Buffered by rustls until the handshake is done.
            conn.writer()
                .write_all(&self.request)
                .map_err(|e| ProbeOutcome::Tls(e.to_string()))?;
            f.tls = Some(Box::new(conn));
        }
        Ok(true)
    }
}

/// Whether a kept connection can carry the next request: nothing arrived on it since the last
/// reply (neither the server's close nor stray bytes) and no error is pending.
fn idle_and_open(s: &Socket) -> bool {
    let mut byte = [MaybeUninit::<u8>::uninit(); 1];
    matches!(s.peek(&mut byte), Err(e) if e.kind() == ErrorKind::WouldBlock)
}

/// A server that never stops sending (an endless stream of 100 Continue, a huge body) must not
/// keep the loop, and so the watch thread, busy: judge what there is.
fn over_limit(f: &Flight, ask: Asked<'_>) -> Option<ProbeOutcome> {
    (f.buf.len() >= MAX_HEAD + MAX_BODY).then(|| {
        http::evaluate(&f.buf, true, ask)
            .unwrap_or(ProbeOutcome::Protocol("reply larger than 80 KiB".into()))
    })
}

fn exchange_plain(f: &mut Flight, request: &[u8], ask: Asked<'_>) -> Option<ProbeOutcome> {
    let mut reads = 0u32;
    loop {
        if f.sent < request.len() {
            match (&f.socket).write(&request[f.sent..]) {
                Ok(0) => {
                    return Some(ProbeOutcome::Connect(
                        "connection closed while sending the request".into(),
                    ))
                }
                Ok(n) => {
                    f.sent += n;
                    if f.sent == request.len() {
                        // The reply cannot be there yet (the app has not even been woken): a
                        // read now would only say EAGAIN. The poll says when it is.
                        return None;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                Err(e) => return Some(map_io(e)),
            }
            continue;
        }
        if let Some(o) = over_limit(f, ask) {
            return Some(o);
        }
        // Past the deadline only after reading what was already there.
        if reads > 0 && Instant::now() >= f.deadline {
            return None;
        }
        reads += 1;
        let mut chunk = [0u8; 4096];
        match (&f.socket).read(&mut chunk) {
            Ok(n) => {
                f.buf.extend_from_slice(&chunk[..n]);
                if let Some(v) = http::evaluate(&f.buf, n == 0, ask) {
                    return Some(v);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
            Err(e) => return Some(map_io(e)),
        }
    }
}

fn exchange_tls(f: &mut Flight, ask: Asked<'_>) -> Option<ProbeOutcome> {
    let mut reads = 0u32;
    loop {
        let conn = f.tls.as_mut()?;
        while conn.wants_write() {
            match conn.write_tls(&mut &f.socket) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                Err(e) => return Some(map_io(e)),
            }
        }
        if let Some(o) = over_limit(f, ask) {
            return Some(o);
        }
        if reads > 0 && Instant::now() >= f.deadline {
            return None;
        }
        reads += 1;
        let conn = f.tls.as_mut()?;
        let eof = match conn.read_tls(&mut &f.socket) {
            Ok(0) => true,
            Ok(_) => {
                if let Err(e) = conn.process_new_packets() {
                    // Tell the server why (an alert), as far as the socket takes it now.
                    let _ = conn.write_tls(&mut &f.socket);
                    return Some(ProbeOutcome::Tls(e.to_string()));
                }
                false
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
            Err(e) => return Some(map_io(e)),
        };
        if eof && conn.is_handshaking() {
            return Some(ProbeOutcome::Tls(
                "connection closed during the handshake".into(),
            ));
        }
        let closed = match drain_plaintext(conn, &mut f.buf) {
            Ok(closed) => closed || eof,
            Err(e) => return Some(map_io(e)),
        };
        if let Some(v) = http::evaluate(&f.buf, closed, ask) {
            return Some(v);
        }
    }
}

/// Moves the decrypted bytes into `buf`; Ok(true) when the server closed the stream (with a
/// close_notify, or without one: many servers just close, which ends the reply all the same).
fn drain_plaintext(conn: &mut ClientConnection, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut chunk = [0u8; 4096];
    loop {
        match conn.reader().read(&mut chunk) {
            Ok(0) => return Ok(true),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(true),
            Err(e) => return Err(e),
        }
        if buf.len() >= MAX_HEAD + MAX_BODY {
            return Ok(false);
        }
    }
}

pub fn map_io(e: std::io::Error) -> ProbeOutcome {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => ProbeOutcome::Timeout,
        _ => ProbeOutcome::Connect(e.to_string()),
    }
}
