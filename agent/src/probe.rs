//! The HTTP health probe: one GET with a hard deadline from connect to last byte.
//!
//! Written on std sockets rather than an HTTP crate because a health probe is one request to a
//! local port: no TLS, no pooling, no redirects. That keeps the agent's RSS and CPU per check
//! small, and makes the deadline exact: every connect and read gets only what is left of it.
//! Invariants: a probe never takes longer than its timeout (+ scheduling noise), never panics on
//! any reply, and reads at most `MAX_BODY` bytes of body.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::config::StatusMatch;

/// How much of a body is read to look for `expect_body`.
pub const MAX_BODY: usize = 64 * 1024;
const MAX_HEAD: usize = 16 * 1024;

/// A parsed `http://host[:port]/path` health URL.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpTarget {
    pub url: String,
    pub host: String,
    pub port: u16,
    /// Path and query, always starting with `/`.
    pub path: String,
}

impl HttpTarget {
    pub fn parse(url: &str) -> Result<HttpTarget, String> {
        let rest = if let Some(r) = url.strip_prefix("http://") {
            r
        } else if url.starts_with("https://") {
            return Err("https is not supported: probe the app's local plain-http port".into());
        } else {
            return Err("must start with http://".into());
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err("credentials in the URL are not supported".into());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let end = v6.find(']').ok_or("unclosed [ in IPv6 address")?;
            let host = &v6[..end];
            let port = match &v6[end + 1..] {
                "" => 80,
                p => parse_port(p.strip_prefix(':').ok_or("junk after ]")?)?,
            };
            (host.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), parse_port(p)?),
                None => (authority.to_string(), 80),
            }
        };
        if host.is_empty() {
            return Err("no host".into());
        }
        if path.bytes().any(|b| b <= b' ' || b == 0x7f) || path.contains('#') {
            return Err("the path has spaces, control characters or a #fragment".into());
        }
        Ok(HttpTarget {
            url: url.to_string(),
            host,
            port,
            path: path.to_string(),
        })
    }

    fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 80 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

fn parse_port(p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("`{p}` is not a port")),
    }
}

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
#[derive(Debug)]
pub struct Prober {
    target: HttpTarget,
    request: Vec<u8>,
    addrs: Vec<SocketAddr>,
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
        Prober {
            target,
            request,
            addrs: Vec::new(),
        }
    }

    pub fn target(&self) -> &HttpTarget {
        &self.target
    }

    pub fn probe(
        &mut self,
        timeout: Duration,
        expect_status: &StatusMatch,
        expect_body: Option<&str>,
    ) -> ProbeResult {
        let start = Instant::now();
        let deadline = start + timeout;
        let outcome = self.run(deadline, expect_status, expect_body);
        ProbeResult {
            latency: start.elapsed(),
            outcome,
        }
    }

    fn resolve(&mut self) -> Result<(), String> {
        if let Ok(ip) = self.target.host.parse::<std::net::IpAddr>() {
            self.addrs = vec![SocketAddr::new(ip, self.target.port)];
            return Ok(());
        }
        // Name lookups go through the system resolver once, then are cached until a connect fails.
        let found: Vec<SocketAddr> = (self.target.host.as_str(), self.target.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", self.target.host))?
            .collect();
        if found.is_empty() {
            return Err(format!("{} has no address", self.target.host));
        }
        self.addrs = found;
        Ok(())
    }

    fn connect(&mut self, deadline: Instant) -> Result<TcpStream, ProbeOutcome> {
        if self.addrs.is_empty() {
            self.resolve().map_err(ProbeOutcome::Connect)?;
        }
        let mut last = String::from("no address");
        for addr in self.addrs.clone() {
            let left = remaining(deadline).ok_or(ProbeOutcome::Timeout)?;
            match TcpStream::connect_timeout(&addr, left) {
                Ok(s) => return Ok(s),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    return Err(ProbeOutcome::Timeout)
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        self.addrs.clear();
        Err(ProbeOutcome::Connect(last))
    }

    fn run(
        &mut self,
        deadline: Instant,
        expect_status: &StatusMatch,
        expect_body: Option<&str>,
    ) -> ProbeOutcome {
        let mut stream = match self.connect(deadline) {
            Ok(s) => s,
            Err(o) => return o,
        };
        let _ = stream.set_nodelay(true);
        if let Err(o) = io(&stream, deadline, |s| s.write_all(&self.request)) {
            return o;
        }
        let mut buf = Vec::with_capacity(1024);
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > MAX_HEAD {
                return ProbeOutcome::Protocol("response head larger than 16 KiB".into());
            }
            match read_some(&mut stream, &mut buf, deadline) {
                Ok(0) if buf.is_empty() => {
                    return ProbeOutcome::Connect("connection closed without a reply".into())
                }
                Ok(0) => return ProbeOutcome::Protocol("connection closed mid-header".into()),
                Ok(_) => {}
                Err(o) => return o,
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = match parse_status_line(lines.next().unwrap_or("")) {
            Ok(s) => s,
            Err(e) => return ProbeOutcome::Protocol(e),
        };
        if !expect_status.accepts(status) {
            return ProbeOutcome::Status(status);
        }
        let Some(needle) = expect_body else {
            return ProbeOutcome::Pass { status };
        };
        let mut length = None;
        let mut chunked = false;
        for line in lines {
            if let Some((k, v)) = line.split_once(':') {
                let (k, v) = (k.trim(), v.trim());
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.parse::<usize>().ok();
                } else if k.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = v.to_ascii_lowercase().contains("chunked");
                }
            }
        }
        let mut raw = buf.split_off(head_end);
        // Read until the body is complete (by length, chunk terminator or EOF), or capped.
        loop {
            let complete = if chunked {
                matches!(dechunk(&raw), Dechunk::Done(_))
            } else if let Some(n) = length {
                raw.len() >= n
            } else {
                false
            };
            if complete || raw.len() >= MAX_BODY {
                break;
            }
            match read_some(&mut stream, &mut raw, deadline) {
                Ok(0) => break,
                Ok(_) => {}
                Err(o) => return o,
            }
        }
        let body = if chunked {
            match dechunk(&raw) {
                Dechunk::Done(b) | Dechunk::Partial(b) => b,
                Dechunk::Bad => return ProbeOutcome::Protocol("bad chunked encoding".into()),
            }
        } else {
            raw
        };
        if find(&body, needle.as_bytes()).is_some() {
            ProbeOutcome::Pass { status }
        } else {
            ProbeOutcome::Body { status }
        }
    }
}

fn remaining(deadline: Instant) -> Option<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    (left > Duration::ZERO).then_some(left)
}

fn io<T>(
    stream: &TcpStream,
    deadline: Instant,
    f: impl FnOnce(&mut &TcpStream) -> std::io::Result<T>,
) -> Result<T, ProbeOutcome> {
    let left = remaining(deadline).ok_or(ProbeOutcome::Timeout)?;
    let _ = stream.set_write_timeout(Some(left));
    let mut s = stream;
    f(&mut s).map_err(map_io)
}

fn read_some(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<usize, ProbeOutcome> {
    wait_readable(stream, deadline)?;
    // Readable now; the read timeout is only a backstop.
    let left = remaining(deadline).ok_or(ProbeOutcome::Timeout)?;
    stream.set_read_timeout(Some(left)).map_err(map_io)?;
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(map_io(e)),
        }
    }
}

/// Waits for data with poll(2), whose timeout is a high-resolution timer: a socket read timeout
/// (SO_RCVTIMEO) is rounded to scheduler ticks and overshot the deadline by up to ~20 ms, which
/// delayed every check after a hung probe by as much (measured in bench/compare.sh).
fn wait_readable(stream: &TcpStream, deadline: Instant) -> Result<(), ProbeOutcome> {
    use std::os::fd::AsRawFd;
    loop {
        let left = remaining(deadline).ok_or(ProbeOutcome::Timeout)?;
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        let mut p = libc::pollfd {
            fd: stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n > 0 {
            return Ok(());
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(map_io(e));
        }
        // n == 0: the deadline passed (the loop re-checks what is left).
    }
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

    #[test]
    fn dechunk_handles_garbage() {
        assert!(matches!(dechunk(b"zz\r\n"), Dechunk::Bad));
        assert!(matches!(dechunk(b"5\r\nab"), Dechunk::Partial(b) if b == b"ab"));
    }
}
