//! STAND-IN for the lead's shared outbound client (`net:` commit on main), with the same API:
//! plain http only, enough for the notify sinks to be built and tested against loopback. It is
//! replaced wholesale by main's `net` when that lands (merge: take theirs).

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// An `http://` or `https://` URL, split into what a request needs.
#[derive(Clone, PartialEq, Eq)]
pub struct Url {
    pub https: bool,
    pub host: String,
    pub port: u16,
    pub target: String,
}

impl std::fmt::Debug for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Url {
    pub fn parse(s: &str) -> Result<Url, String> {
        let s = s.trim();
        let lower = s.to_ascii_lowercase();
        let (https, rest) = if lower.starts_with("https://") {
            (true, &s[8..])
        } else if lower.starts_with("http://") {
            (false, &s[7..])
        } else {
            return Err("the URL must start with https:// (or http:// to a loopback host)".into());
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        if authority.contains('@') {
            return Err("the URL must not carry a user name or password before the host".into());
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(r) => {
                let (h, after) = r.split_once(']').ok_or("an IPv6 address needs its `]`")?;
                (h, after.strip_prefix(':'))
            }
            None => match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            },
        };
        if host.is_empty() {
            return Err("the URL has no host".into());
        }
        let port = match port {
            None => {
                if https {
                    443
                } else {
                    80
                }
            }
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| format!("`{p}` is not a port"))?,
        };
        let tail = tail.split('#').next().unwrap_or("");
        let target = if tail.starts_with('/') {
            tail.to_string()
        } else {
            format!("/{tail}")
        };
        Ok(Url {
            https,
            host: host.to_ascii_lowercase(),
            port,
            target,
        })
    }

    pub fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{host}:{}", self.port)
    }

    pub fn redacted(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        let tail = if self.target == "/" { "/" } else { "/…" };
        format!("{scheme}://{}{tail}", self.authority())
    }
}

pub struct Request<'a> {
    pub method: &'a str,
    pub url: &'a Url,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connect: Duration,
    pub total: Duration,
    pub max_body: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot resolve the host: {0}")]
    Resolve(String),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("timed out")]
    Timeout,
    #[error("TLS: {0}")]
    Tls(String),
    #[error("bad reply: {0}")]
    Protocol(String),
    #[error("the reply is too large")]
    TooLarge,
}

#[allow(clippy::too_many_lines)] // the stand-in goes away when main's net lands
pub fn send(req: &Request<'_>, limits: &Limits) -> Result<Reply, NetError> {
    if req.url.https {
        return Err(NetError::Tls("https needs main's net client".into()));
    }
    let start = Instant::now();
    let addrs: Vec<_> = (req.url.host.as_str(), req.url.port)
        .to_socket_addrs()
        .map_err(|e| NetError::Resolve(e.to_string()))?
        .collect();
    let mut last = NetError::Resolve("no address".into());
    let mut stream = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, limits.connect) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = NetError::Connect(e.to_string()),
        }
    }
    let mut s = stream.ok_or(last)?;
    let left = limits
        .total
        .saturating_sub(start.elapsed())
        .max(Duration::from_millis(1));
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => NetError::Timeout,
        _ => NetError::Protocol(e.to_string()),
    };
    s.set_read_timeout(Some(left)).map_err(io)?;
    s.set_write_timeout(Some(left)).map_err(io)?;
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\n",
        req.method,
        req.url.target,
        req.url.authority()
    );
    for (k, v) in req.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        req.body.len()
    ));
    s.write_all(head.as_bytes()).map_err(io)?;
    s.write_all(req.body).map_err(io)?;
    let mut buf = Vec::new();
    s.take(limits.max_body as u64 + 65_536)
        .read_to_end(&mut buf)
        .map_err(io)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or(NetError::Protocol("no header end".into()))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or(NetError::Protocol("no status".into()))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Reply {
        status,
        headers,
        body: body.as_bytes().to_vec(),
    })
}
