//! One request on one connection: write the request, read the reply, within a deadline.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use super::wire::{dechunk, find, Dechunk};
use super::{left, NetError, Reply, Request};

/// The largest reply head read (status line and headers).
const MAX_HEAD: usize = 64 * 1024;

/// Headers `send` writes itself; a caller's copy would break the framing.
const OURS: [&str; 4] = ["host", "content-length", "connection", "transfer-encoding"];

/// The request line and headers, checked: a header cannot inject a line or override framing.
pub fn head(req: &Request<'_>) -> Result<Vec<u8>, NetError> {
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    if !token(req.method) {
        return Err(NetError::Protocol(format!(
            "`{}` is not an HTTP method",
            req.method
        )));
    }
    let mut out = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\n",
        req.method,
        req.url.target,
        req.url.authority()
    );
    for (name, value) in req.headers {
        if !token(name) || OURS.iter().any(|o| o.eq_ignore_ascii_case(name)) {
            return Err(NetError::Protocol(format!(
                "header `{name}` cannot be set by the caller"
            )));
        }
        if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(NetError::Protocol(format!(
                "header `{name}` has a line break"
            )));
        }
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        req.body.len()
    ));
    Ok(out.into_bytes())
}

/// A TCP socket whose every read and write is bounded by what is left before one deadline, so
/// neither a slow-drip reply nor a TLS handshake fed a byte at a time outlives the request.
pub struct Bounded {
    pub sock: TcpStream,
    pub deadline: Instant,
}

impl Bounded {
    fn arm(&self) -> std::io::Result<()> {
        let d = left(self.deadline).map_err(|_| std::io::Error::from(ErrorKind::TimedOut))?;
        self.sock.set_read_timeout(Some(d))?;
        self.sock.set_write_timeout(Some(d))
    }
}

impl Read for Bounded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.sock.read(buf)
    }
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.sock.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.sock.flush()
    }
}

/// Writes `head` and `body` on `stream` (over a `Bounded` socket), reads the reply.
pub fn run<S: Read + Write>(
    mut stream: S,
    head: &[u8],
    body: &[u8],
    max_body: usize,
) -> Result<Reply, NetError> {
    let mut whole = Vec::with_capacity(head.len() + body.len());
    whole.extend_from_slice(head);
    whole.extend_from_slice(body);
    stream.write_all(&whole).map_err(io_error)?;
    stream.flush().map_err(io_error)?;
    let is_head = head.starts_with(b"HEAD ");
    let mut reader = Reader {
        stream,
        buf: Vec::new(),
        eof: false,
    };
    reader.reply(is_head, max_body)
}

fn io_error(e: std::io::Error) -> NetError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => NetError::Timeout,
        ErrorKind::InvalidData => NetError::Tls(e.to_string()),
        _ => NetError::Connect(e.to_string()),
    }
}

struct Reader<S> {
    stream: S,
    buf: Vec<u8>,
    eof: bool,
}

/// A parsed reply head and how its body is framed.
struct Head {
    status: u16,
    headers: Vec<(String, String)>,
    len: usize,
}

impl<S: Read + Write> Reader<S> {
    /// Reads more bytes (false at the end of the stream). A TLS peer that closes without
    /// close_notify ends the stream too: the framing below decides whether that was complete.
    fn more(&mut self) -> Result<bool, NetError> {
        if self.eof {
            return Ok(false);
        }
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk) {
            Ok(0) => {
                self.eof = true;
                Ok(false)
            }
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                self.eof = true;
                Ok(false)
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(true),
            Err(e) => Err(io_error(e)),
        }
    }

    fn reply(&mut self, is_head: bool, max_body: usize) -> Result<Reply, NetError> {
        let head = loop {
            let h = self.head()?;
            // An interim 1xx (100 Continue, 103 Early Hints) precedes the real reply.
            if !(100..200).contains(&h.status) {
                break h;
            }
            self.buf.drain(..h.len);
        };
        self.buf.drain(..head.len);
        // Once the status line is in, the reply stands: a body over the limit, cut short or
        // too slow is kept as far as it came (capped) and marked, for the caller to judge.
        let (body, truncated) = if is_head || head.status == 204 || head.status == 304 {
            (Vec::new(), false)
        } else {
            match self.body(&head.headers, max_body) {
                Ok(b) => (b, false),
                Err(_) => {
                    let mut b = std::mem::take(&mut self.buf);
                    b.truncate(max_body);
                    (b, true)
                }
            }
        };
        Ok(Reply {
            status: head.status,
            headers: head.headers,
            body,
            truncated,
        })
    }

    fn head(&mut self) -> Result<Head, NetError> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                return parse_head(&self.buf[..end]).map(|(status, headers)| Head {
                    status,
                    headers,
                    len: end + 4,
                });
            }
            if self.buf.len() > MAX_HEAD {
                return Err(NetError::Protocol("reply headers over 64 KiB".into()));
            }
            if !self.more()? {
                return Err(NetError::Protocol(
                    "connection closed before a reply".into(),
                ));
            }
        }
    }

    fn body(&mut self, headers: &[(String, String)], max_body: usize) -> Result<Vec<u8>, NetError> {
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.trim())
        };
        if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().ends_with("chunked")) {
            return self.chunked(max_body);
        }
        if let Some(v) = get("content-length") {
            let len: usize = v
                .parse()
                .map_err(|_| NetError::Protocol(format!("Content-Length `{v}`")))?;
            if len > max_body {
                return Err(NetError::TooLarge);
            }
            while self.buf.len() < len {
                if !self.more()? {
                    return Err(NetError::Protocol("connection closed mid-reply".into()));
                }
            }
            self.buf.truncate(len);
            return Ok(std::mem::take(&mut self.buf));
        }
        loop {
            if self.buf.len() > max_body {
                return Err(NetError::TooLarge);
            }
            if !self.more()? {
                return Ok(std::mem::take(&mut self.buf));
            }
        }
    }

    fn chunked(&mut self, max_body: usize) -> Result<Vec<u8>, NetError> {
        loop {
            match dechunk(&self.buf) {
                Dechunk::Done(b) => return Ok(b),
                Dechunk::Bad => return Err(NetError::Protocol("bad chunked encoding".into())),
                Dechunk::Partial(b) if b.len() > max_body => return Err(NetError::TooLarge),
                Dechunk::Partial(_) => {}
            }
            // Framing overhead is small; a stream of empty-looking bytes is cut off here.
            if self.buf.len() > max_body.saturating_mul(2).saturating_add(MAX_HEAD) {
                return Err(NetError::TooLarge);
            }
            if !self.more()? {
                return Err(NetError::Protocol("connection closed mid-reply".into()));
            }
        }
    }
}

/// The status code and headers of a reply head (without its blank line).
fn parse_head(raw: &[u8]) -> Result<(u16, Vec<(String, String)>), NetError> {
    let text = String::from_utf8_lossy(raw);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let status = match code.parse::<u16>() {
        Ok(n) if version.starts_with("HTTP/1.") && (100..600).contains(&n) => n,
        _ => {
            let shown: String = status_line.chars().take(40).collect();
            return Err(NetError::Protocol(format!("status line `{shown}`")));
        }
    };
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok((status, headers))
}
