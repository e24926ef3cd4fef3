//! Health probes: HTTP(S) requests over TCP or a unix socket, and plain TCP connects, each with
//! a hard deadline from connect to last byte. An app may have several; all must pass.
//!
//! Written as a non-blocking poll(2) state machine on std/socket2 sockets, with a small HTTP/1.1
//! reader of its own (`http`) and rustls driven by hand (`tls`), rather than on an async HTTP
//! client: one thread polls every app's probe, a probe costs a few syscalls, and the deadline is
//! exact (BENCHMARKS.md compares this with hyper on a tokio runtime).
//! Invariants: a probe never takes longer than its timeout (+ scheduling noise), never panics on
//! any reply, reads at most `MAX_BODY` bytes of body, never follows a redirect, and never blocks
//! the calling thread in `start`/`advance` (name lookups run on threads of their own).

mod endpoint;
mod flight;
pub mod http;
pub mod tls;

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::event::{poll, PollFd, PollFlags};

use crate::config::target::{ProbeKind, ProbeSpec};
use crate::sys::pidfd::timespec;

use flight::{Flight, Single};
pub use http::MAX_BODY;

/// What one check's probes found.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeResult {
    /// From the start of the first connect to the end of what was read.
    pub latency: Duration,
    /// The first failure; else the first pass with an HTTP status, or the first pass.
    pub outcome: ProbeOutcome,
    /// The probe that decided the outcome, for logs and events (no query, no header values).
    pub target: String,
    /// Whole days until the soonest-expiring certificate of the https probes seen this check
    /// (negative once expired).
    pub cert_days: Option<i64>,
    /// Set when a certificate expires in fewer than its `cert_warn_days`: (probe, days). Once
    /// per day of remaining validity, not every check.
    pub cert_warning: Option<(String, i64)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ProbeOutcome {
    Pass {
        status: u16,
    },
    /// A tcp probe's connect succeeded.
    Connected,
    /// Nothing listens, or the connection was refused or reset.
    Connect(String),
    /// The TLS handshake failed (the certificate did not verify, no common protocol, ...).
    Tls(String),
    /// No complete answer within the deadline.
    Timeout,
    /// Answered with a status that is not healthy.
    Status(u16),
    /// Healthy status, but the body lacked the expected text or pattern.
    Body {
        status: u16,
    },
    /// Not an HTTP response.
    Protocol(String),
}

impl ProbeOutcome {
    pub fn passed(&self) -> bool {
        matches!(self, ProbeOutcome::Pass { .. } | ProbeOutcome::Connected)
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
            ProbeOutcome::Connected => "tcp connect ok".into(),
            ProbeOutcome::Connect(e) => format!("connect failed: {e}"),
            ProbeOutcome::Tls(e) => format!("tls failed: {e}"),
            ProbeOutcome::Timeout => "timed out".into(),
            ProbeOutcome::Status(s) => format!("http {s}"),
            ProbeOutcome::Body { status } => {
                format!("http {status} without the expected body")
            }
            ProbeOutcome::Protocol(e) => format!("bad reply: {e}"),
        }
    }
}

/// Probes one app: its probes one after the other, each with its own deadline, stopping at the
/// first failure. Keeps resolved addresses and TLS settings between checks.
///
/// A check is a small state machine (`start`, then `advance` whenever the socket of the probe
/// under way is ready or its deadline passes), so the daemon runs every app's checks from one
/// thread with one poll(2); `probe` drives the same machine alone for the backup check.
#[derive(Debug)]
pub struct Prober {
    probes: Vec<Single>,
    /// The certificate warning last given, per probe (days), so it is given once a day.
    warned: Vec<Option<i64>>,
}

/// One check in flight: which probe runs, its socket, and what the earlier ones found.
#[derive(Debug)]
pub struct InFlight {
    index: usize,
    flight: Flight,
    request_len: usize,
    carry: Carry,
}

/// What `start` gives: a result at once (nothing to connect to), or a check in flight.
#[derive(Debug)]
pub enum Started {
    Done(ProbeResult),
    Pending(InFlight),
}

impl InFlight {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.flight.fd()
    }

    /// The poll(2) events the probe under way waits for.
    pub fn events(&self) -> PollFlags {
        self.flight.events(self.request_len)
    }

    /// The deadline of the probe under way.
    pub fn deadline(&self) -> Instant {
        self.flight.deadline
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
/// What the finished probes of a check found.
#[derive(Debug, Clone)]
struct Carry {
    start: Instant,
    first_pass: Option<(ProbeOutcome, String)>,
    cert_days: Option<i64>,
    cert_warning: Option<(String, i64)>,
}

impl Carry {
    fn new(start: Instant) -> Carry {
        Carry {
            start,
            first_pass: None,
            cert_days: None,
            cert_warning: None,
        }
    }

    fn result(self, outcome: ProbeOutcome, target: String) -> ProbeResult {
        ProbeResult {
            latency: self.start.elapsed(),
            outcome,
            target,
            cert_days: self.cert_days,
            cert_warning: self.cert_warning,
        }
    }
}

impl Prober {
    pub fn new(specs: Vec<ProbeSpec>) -> Prober {
        Prober {
            warned: vec![None; specs.len()],
            probes: specs.into_iter().map(Single::new).collect(),
        }
    }

    /// After a check, with the next one `next_in` away: kept connections that would be too old
    /// to use by then are closed now.
    pub fn release_kept(&mut self, next_in: Duration) {
        let next = Instant::now() + next_in;
        for p in &mut self.probes {
            p.release_unless_used_by(next);
        }
    }

    /// The probes, in the order they run.
    pub fn specs(&self) -> impl Iterator<Item = &ProbeSpec> {
        self.probes.iter().map(|p| &p.spec)
    }

    /// One check from start to result, blocking this thread (at most the sum of the timeouts).
    pub fn probe(&mut self) -> ProbeResult {
        // Blocking is fine here (the backup check has a thread per app): look names up inline
        // rather than failing this one check while a lookup runs.
        for p in &self.probes {
            p.endpoint().resolve_now();
        }
        let mut f = match self.start() {
            Started::Done(r) => return r,
            Started::Pending(f) => f,
        };
        loop {
            wait_ready(&f);
            if let Some(r) = self.advance(&mut f) {
                return r;
            }
        }
    }

    /// Begins a check: the first probe, with its deadline from now.
    pub fn start(&mut self) -> Started {
        self.run_from(0, Carry::new(Instant::now()))
    }

    /// Starts probe `index` (or concludes the check when there is none left).
    fn run_from(&mut self, index: usize, carry: Carry) -> Started {
        let Some(single) = self.probes.get_mut(index) else {
            let (outcome, target) = carry
                .first_pass
                .clone()
                .unwrap_or((ProbeOutcome::Connected, String::new()));
            return Started::Done(carry.result(outcome, target));
        };
        let mut flight = match single.start(Instant::now()) {
            Ok(flight) => flight,
            Err(outcome) => return self.finished(index, outcome, carry),
        };
        // As far as the socket allows at once (a loopback connect is done by now, a kept
        // connection takes the request): the caller's first poll then waits for the reply,
        // without a round for a socket that was writable all along.
        match single.step(&mut flight) {
            None => Started::Pending(InFlight {
                index,
                request_len: single.request_len(),
                flight,
                carry,
            }),
            Some(outcome) => {
                single.settle(&flight, &outcome);
                self.finished(index, outcome, carry)
            }
        }
    }

    /// Records probe `index`'s outcome: the check's result after a failure or the last probe,
    /// else the next probe started.
    fn finished(&mut self, index: usize, outcome: ProbeOutcome, mut carry: Carry) -> Started {
        let Some(single) = self.probes.get(index) else {
            return self.run_from(index, carry);
        };
        let target = single.spec.describe();
        let days = single.cert_days(now_unix());
        let outcome = single.expiry_checked(outcome, days);
        if let Some(days) = days {
            carry.cert_days = Some(carry.cert_days.map_or(days, |d| d.min(days)));
            if self.warn_once(index, days) {
                carry.cert_warning = Some((target.clone(), days));
            }
        }
        if !outcome.passed() {
            // The retries that lead to a restart connect anew, for every probe of the app.
            for p in &mut self.probes {
                p.forget_kept();
            }
            return Started::Done(carry.result(outcome, target));
        }
        // The check's pass is the first probe's that has an HTTP status (for events and
        // status), else the first probe's.
        let has_status = |p: &Option<(ProbeOutcome, String)>| {
            p.as_ref().is_some_and(|(o, _)| o.status().is_some())
        };
        if carry.first_pass.is_none()
            || (!has_status(&carry.first_pass) && outcome.status().is_some())
        {
            carry.first_pass = Some((outcome, target));
        }
        self.run_from(index + 1, carry)
    }

    /// Whether a certificate expiring in `days` warrants a warning now: below the probe's
    /// `cert_warn_days`, and not already given for this many days.
    fn warn_once(&mut self, index: usize, days: i64) -> bool {
        let limit = self.probes.get(index).and_then(|p| match &p.spec.kind {
            ProbeKind::Http(h) => h.tls.as_ref().map(|t| i64::from(t.cert_warn_days)),
            ProbeKind::Tcp(_) => None,
        });
        let Some(slot) = self.warned.get_mut(index) else {
            return false;
        };
        if limit.is_none_or(|l| days >= l) {
            *slot = None;
            return false;
        }
        let fresh = *slot != Some(days);
        *slot = Some(days);
        fresh
    }

    /// Moves the check on as far as its sockets allow without waiting. Returns the result once
    /// there is one: every probe passed, one failed, or one's deadline passed (a reply that is
    /// already there is still read first, so a late wake-up of the caller is not blamed on the
    /// app).
    pub fn advance(&mut self, f: &mut InFlight) -> Option<ProbeResult> {
        let single = self.probes.get_mut(f.index)?;
        let outcome = match single.step(&mut f.flight) {
            Some(o) => o,
            None if Instant::now() >= f.flight.deadline => single.late(&f.flight),
            None => return None,
        };
        single.settle(&f.flight, &outcome);
        if matches!(outcome, ProbeOutcome::Connect(_) | ProbeOutcome::Timeout) {
            // Look the name up again (in the background): it may point elsewhere now (a moved
            // address often drops SYNs: a timeout, not a refusal).
            single.endpoint().mark_stale();
        }
        let carry = f.carry.clone();
        match self.finished(f.index, outcome, carry) {
            Started::Done(r) => Some(r),
            Started::Pending(next) => {
                *f = next;
                None
            }
        }
    }
}

/// Waits with poll(2) until the probe's socket is ready or its deadline passes. poll's timeout
/// is a high-resolution timer: a socket timeout (SO_RCVTIMEO) is rounded to scheduler ticks and
/// overshot the deadline by up to ~20 ms (measured in bench/compare.sh).
fn wait_ready(f: &InFlight) {
    let left = f.deadline().saturating_duration_since(Instant::now());
    // Rounded up to whole ms, as poll(2) would: never a busy loop just before the deadline.
    let left = Duration::from_millis(left.as_micros().div_ceil(1000) as u64);
    let mut fds = [PollFd::from_borrowed_fd(f.fd(), f.events())];
    // EINTR or an error just means `advance` looks again (it re-checks the deadline).
    let _ = poll(&mut fds, Some(&timespec(left)));
}

/// What would make an app's probes fail whatever the app does, found when the config is
/// loaded (and on reload) instead of being counted as the app's failures (which would restart a
/// healthy app): an https host that is not a TLS server name, a `ca_file` that cannot be read or
/// holds no certificate. Reads the `ca_file`s, so run it as the user the agent runs as.
pub fn config_problems(config: &crate::config::Config) -> Vec<String> {
    let mut out = Vec::new();
    for app in &config.apps {
        for p in &app.probes {
            let ProbeKind::Http(h) = &p.kind else {
                continue;
            };
            let Some(settings) = &h.tls else {
                continue;
            };
            let host = &h.url.host;
            if let Err(e) = rustls::pki_types::ServerName::try_from(host.clone()) {
                out.push(format!(
                    "app `{}`: `{host}` is not a name a certificate can be checked against ({e}); help: use the host name the certificate was issued for",
                    app.name
                ));
            }
            if let (true, Some(ca)) = (settings.verify, &settings.ca_file) {
                if let Err(e) = tls::roots_from(ca) {
                    out.push(format!(
                        "app `{}`: {e}; help: point ca_file at a readable PEM file of the CA certificates to trust",
                        app.name
                    ));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::target::{Expect, HttpProbe, HttpTarget, Method, StatusMatch};
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::Arc;
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

    fn spec(url: HttpTarget, timeout_ms: u64, body: Option<&str>) -> ProbeSpec {
        ProbeSpec {
            kind: ProbeKind::Http(Box::new(HttpProbe {
                url,
                socket: None,
                method: Method::Get,
                headers: Vec::new(),
                expect: Expect {
                    status: StatusMatch::Success,
                    body: body.map(str::to_string),
                    body_regex: None,
                },
                tls: None,
                keep_alive: false,
            })),
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    fn prober(t: HttpTarget, timeout_ms: u64) -> Prober {
        Prober::new(vec![spec(t, timeout_ms, None)])
    }

    fn probe(t: HttpTarget, timeout_ms: u64, body: Option<&str>) -> ProbeResult {
        Prober::new(vec![spec(t, timeout_ms, body)]).probe()
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
        let t = HttpTarget::parse("https://x/").unwrap();
        assert!(t.tls && t.port == 443 && t.host_header() == "x");
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
        let mut probers: Vec<Prober> = [fast, failing, hung]
            .into_iter()
            .map(|t| prober(t, 600))
            .collect();
        let began = Instant::now();
        let mut results: Vec<Option<ProbeOutcome>> = vec![None, None, None];
        // A reply that is there by the time the request went may end a check at its start.
        let mut flights: Vec<Option<InFlight>> = Vec::new();
        for (i, p) in probers.iter_mut().enumerate() {
            match p.start() {
                Started::Pending(f) => flights.push(Some(f)),
                Started::Done(r) => {
                    results[i] = Some(r.outcome);
                    flights.push(None);
                }
            }
        }
        assert!(flights[1].is_some() && flights[2].is_some());
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
                        if let Some(r) = probers[i].advance(f) {
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
        let mut p = prober(t, 300);
        let Started::Pending(mut f) = p.start() else {
            panic!("no connect in flight");
        };
        // Connected on loopback at once: the request went out with the start, and the probe
        // waits for the reply, which is 200 ms away.
        assert_eq!(f.events(), PollFlags::IN);
        // The caller comes back after the deadline; the reply came before it.
        std::thread::sleep(Duration::from_millis(600));
        let r = p.advance(&mut f).unwrap();
        assert_eq!(r.outcome, ProbeOutcome::Pass { status: 200 });
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
        let mut p = prober(t, 1000);
        // `start` never waits for a resolver: at worst this check says the answer is pending.
        let began = Instant::now();
        let first = p.start();
        assert!(
            began.elapsed() < Duration::from_millis(50),
            "{:?}",
            began.elapsed()
        );
        drop(first);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = p.probe();
            if r.outcome.passed() {
                break;
            }
            assert!(Instant::now() < deadline, "never passed: {r:?}");
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// How a keep-alive test server answers each request on a connection.
    #[derive(Clone, Copy)]
    enum Serve {
        /// 200 with a `Content-Length` body, connection left open.
        Framed,
        /// Answers the first request on a connection, then closes it once idle for 50 ms.
        CloseWhenIdle,
        /// Answers the first request on a connection; reads the second and closes unanswered.
        DropSecondRequest,
        /// 503 with a framed body, connection left open.
        Unavailable,
    }

    /// A server on 127.0.0.1 that keeps connections open: counts connections and requests and
    /// records each request's head.
    fn serve_kept(
        how: Serve,
    ) -> (
        HttpTarget,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<std::sync::Mutex<Vec<String>>>,
    ) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, h) = (conns.clone(), heads.clone());
        thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                c.fetch_add(1, Ordering::SeqCst);
                let h = h.clone();
                thread::spawn(move || {
                    let mut n = 0;
                    loop {
                        let mut req = Vec::new();
                        let mut byte = [0u8; 1];
                        while !req.ends_with(b"\r\n\r\n") {
                            match s.read(&mut byte) {
                                Ok(1) => req.push(byte[0]),
                                _ => return,
                            }
                        }
                        n += 1;
                        h.lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&req).into_owned());
                        let reply: &[u8] = match how {
                            Serve::Unavailable => {
                                b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy"
                            }
                            Serve::DropSecondRequest if n == 2 => return,
                            _ => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                        };
                        if s.write_all(reply).is_err() {
                            return;
                        }
                        if matches!(how, Serve::CloseWhenIdle) {
                            thread::sleep(Duration::from_millis(50));
                            return;
                        }
                    }
                });
            }
        });
        let t = HttpTarget::parse(&format!("http://127.0.0.1:{port}/h")).unwrap();
        (t, conns, heads)
    }

    fn kept_prober(t: HttpTarget) -> Prober {
        let mut s = spec(t, 1_000, None);
        if let ProbeKind::Http(h) = &mut s.kind {
            h.keep_alive = true;
        }
        Prober::new(vec![s])
    }

    fn count(n: &Arc<std::sync::atomic::AtomicUsize>) -> usize {
        n.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[test]
    fn keep_alive_asks_again_on_the_same_connection_and_without_it_never_does() {
        let (t, conns, heads) = serve_kept(Serve::Framed);
        let mut p = kept_prober(t.clone());
        for _ in 0..5 {
            assert_eq!(p.probe().outcome, ProbeOutcome::Pass { status: 200 });
        }
        assert_eq!(count(&conns), 1, "five checks, one connection");
        let heads = heads.lock().unwrap().clone();
        assert_eq!(heads.len(), 5);
        assert!(
            heads
                .iter()
                .all(|h| !h.to_ascii_lowercase().contains("connection:")),
            "{heads:?}"
        );
        // The default: a connection per check, each saying so.
        let (t, conns, heads) = serve_kept(Serve::Framed);
        let mut p = prober(t, 1_000);
        for _ in 0..3 {
            assert_eq!(p.probe().outcome, ProbeOutcome::Pass { status: 200 });
        }
        thread::sleep(Duration::from_millis(50));
        assert_eq!(count(&conns), 3);
        assert!(heads
            .lock()
            .unwrap()
            .iter()
            .all(|h| h.contains("Connection: close\r\n")));
    }

    #[test]
    fn a_kept_connection_the_server_closed_is_replaced_without_a_failure() {
        // Closed while idle: seen before the request goes.
        let (t, conns, _) = serve_kept(Serve::CloseWhenIdle);
        let mut p = kept_prober(t);
        for _ in 0..3 {
            assert_eq!(p.probe().outcome, ProbeOutcome::Pass { status: 200 });
            thread::sleep(Duration::from_millis(150));
        }
        assert_eq!(count(&conns), 3);
        // Closed as the request arrived (read, never answered): asked again on a new
        // connection within the same check, not counted as the app's failure.
        let (t, conns, heads) = serve_kept(Serve::DropSecondRequest);
        let mut p = kept_prober(t);
        for _ in 0..3 {
            assert_eq!(p.probe().outcome, ProbeOutcome::Pass { status: 200 });
        }
        // Checks 2 and 3 each lost their request on the kept connection and asked again.
        assert_eq!(count(&conns), 3);
        assert_eq!(heads.lock().unwrap().len(), 5);
    }

    #[test]
    fn after_a_failure_or_past_keep_for_the_next_check_connects_anew() {
        let (t, conns, _) = serve_kept(Serve::Unavailable);
        let mut p = kept_prober(t);
        for _ in 0..3 {
            assert_eq!(p.probe().outcome, ProbeOutcome::Status(503));
        }
        assert_eq!(count(&conns), 3, "a failed check keeps nothing");
        // A POST is never kept, whatever its settings say.
        let (t, conns, _) = serve_kept(Serve::Framed);
        let mut post = spec(t, 1_000, None);
        if let ProbeKind::Http(h) = &mut post.kind {
            h.keep_alive = true;
            h.method = Method::Post;
        }
        let mut p = Prober::new(vec![post]);
        for _ in 0..2 {
            assert!(p.probe().outcome.passed());
        }
        assert_eq!(count(&conns), 2);
        let (t, conns, _) = serve_kept(Serve::Framed);
        let mut p = kept_prober(t);
        assert!(p.probe().outcome.passed());
        assert!(p.probe().outcome.passed());
        assert_eq!(count(&conns), 1);
        // A run that starts `KEEP_FOR` after the connection opened takes a new one.
        let f = p.probes[0]
            .start(Instant::now() + flight::KEEP_FOR)
            .unwrap_or_else(|o| panic!("{o:?}"));
        assert!(format!("{f:?}").contains("reused: false"), "{f:?}");
        drop(f);
        thread::sleep(Duration::from_millis(50));
        assert_eq!(count(&conns), 2);
    }

    #[test]
    fn a_reply_that_runs_to_the_close_is_not_kept() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = conns.clone();
        thread::spawn(move || {
            for s in listener.incoming().take(3) {
                let mut s = s.unwrap();
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut req = [0u8; 1024];
                let _ = s.read(&mut req);
                // No length, no chunks: the body ends when the connection does.
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\nok");
            }
        });
        let t = HttpTarget::parse(&format!("http://127.0.0.1:{port}/h")).unwrap();
        let mut p = kept_prober(t);
        for _ in 0..3 {
            assert!(p.probe().outcome.passed());
        }
        assert_eq!(count(&conns), 3);
    }

    #[test]
    fn a_failed_check_closes_every_probes_kept_connection() {
        let (first, conns, _) = serve_kept(Serve::Framed);
        let (second, _, _) = serve_kept(Serve::Unavailable);
        let mut kept = spec(first, 1_000, None);
        if let ProbeKind::Http(h) = &mut kept.kind {
            h.keep_alive = true;
        }
        let mut p = Prober::new(vec![kept, spec(second, 1_000, None)]);
        for _ in 0..3 {
            assert_eq!(p.probe().outcome, ProbeOutcome::Status(503));
        }
        assert_eq!(
            count(&conns),
            3,
            "the first probe passed each time on a new connection"
        );
    }

    #[test]
    fn a_kept_connection_is_closed_when_the_next_check_is_too_far_to_use_it() {
        let (t, conns, _) = serve_kept(Serve::Framed);
        let mut p = kept_prober(t);
        assert!(p.probe().outcome.passed());
        p.release_kept(Duration::from_secs(1));
        assert!(p.probe().outcome.passed());
        assert_eq!(count(&conns), 1, "a check 1 s away uses it");
        p.release_kept(flight::KEEP_FOR);
        assert!(format!("{p:?}").contains("kept: false"), "{p:?}");
        assert!(p.probe().outcome.passed());
        assert_eq!(count(&conns), 2);
    }
}
