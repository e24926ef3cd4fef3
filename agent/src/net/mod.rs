//! The agent's outbound HTTP(S) calls: AWS endpoints and notify webhooks.
//!
//! A small blocking HTTP/1.1 client: one connection per request (`Connection: close`), TLS by
//! rustls with the system roots and verification always on, every step bounded by one deadline
//! (a slow-drip server cannot hold a call past `Limits::total`). It blocks the calling thread,
//! so it is called only from a sink's own thread, never from the watch loop (probes have their
//! own non-blocking state machine in `probe`).
//!
//! Invariants: nothing here logs; an error's text never holds the URL's path or query (a
//! webhook's secret); caller headers cannot inject lines or override the framing headers.

pub mod tls;
pub mod url;
pub mod wire;

mod exchange;

use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

pub use url::Url;

/// One request. `Host`, `Content-Length` and `Connection` are added by `send`.
#[derive(Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    pub url: &'a Url,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// A whole reply (any status: the caller judges it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body did not arrive whole (over `Limits::max_body`, cut short, or past the
    /// deadline): `body` is what came, capped. The status line stands either way.
    pub truncated: bool,
}

impl Reply {
    /// The reply only if its body is whole (for callers that parse the body).
    pub fn whole(self) -> Result<Reply, NetError> {
        if self.truncated {
            return Err(NetError::Protocol(format!(
                "HTTP {}: the reply body was cut short or over the limit",
                self.status
            )));
        }
        Ok(self)
    }

    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Bounds on one request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Per address tried.
    pub connect: Duration,
    /// The whole request: resolve, connect, handshake, write, read.
    pub total: Duration,
    /// The largest reply body kept; a larger one is `TooLarge`.
    pub max_body: usize,
}

/// Why a request got no reply. The text never holds the URL's path or query.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("timed out")]
    Timeout,
    #[error("TLS: {0}")]
    Tls(String),
    #[error("bad HTTP reply: {0}")]
    Protocol(String),
    #[error("the reply is larger than the limit")]
    TooLarge,
}

/// Sends `req` and reads the reply, https verified against the system roots. Every step
/// (resolve, connect, handshake, write, read) is bounded by `Limits::total`.
pub fn send(req: &Request<'_>, limits: &Limits) -> Result<Reply, NetError> {
    if req.url.https {
        let config = tls::verified_config().map_err(NetError::Tls)?;
        send_with(req, limits, &config)
    } else {
        let deadline = Instant::now() + limits.total;
        let head = exchange::head(req)?;
        let sock = connect(req.url, limits.connect, deadline)?;
        exchange::run(
            exchange::Bounded { sock, deadline },
            &head,
            req.body,
            limits.max_body,
        )
    }
}

/// As `send`, with the caller's TLS configuration for https (its own roots, e.g. a private CA).
pub fn send_with(
    req: &Request<'_>,
    limits: &Limits,
    config: &Arc<ClientConfig>,
) -> Result<Reply, NetError> {
    let deadline = Instant::now() + limits.total;
    let head = exchange::head(req)?;
    let sock = connect(req.url, limits.connect, deadline)?;
    let bounded = exchange::Bounded { sock, deadline };
    if !req.url.https {
        return exchange::run(bounded, &head, req.body, limits.max_body);
    }
    let name = ServerName::try_from(req.url.host.clone())
        .map_err(|e| NetError::Tls(format!("`{}` is not a TLS server name: {e}", req.url.host)))?;
    let conn =
        ClientConnection::new(config.clone(), name).map_err(|e| NetError::Tls(e.to_string()))?;
    exchange::run(
        StreamOwned::new(conn, bounded),
        &head,
        req.body,
        limits.max_body,
    )
}

/// Time left before `deadline`, or `Timeout`.
fn left(deadline: Instant) -> Result<Duration, NetError> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or(NetError::Timeout)
}

/// The host's addresses: an address literal at once, a name through getaddrinfo on a thread of
/// its own so that a slow resolver is bounded by the deadline too (a lookup still running then
/// finishes on its own and is dropped).
fn resolve(url: &Url, deadline: Instant) -> Result<Vec<SocketAddr>, NetError> {
    if let Ok(ip) = url.host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, url.port)]);
    }
    let (tx, rx) = mpsc::channel();
    let (host, port) = (url.host.clone(), url.port);
    std::thread::Builder::new()
        .name("resolve".into())
        .spawn(move || {
            let found = (host.as_str(), port)
                .to_socket_addrs()
                .map(|a| a.collect::<Vec<_>>());
            let _ = tx.send(found);
        })
        .map_err(|e| NetError::Resolve(format!("{}: {e}", url.host)))?;
    match rx.recv_timeout(left(deadline)?) {
        Ok(Ok(addrs)) if !addrs.is_empty() => Ok(addrs),
        Ok(Ok(_)) => Err(NetError::Resolve(format!("{}: no address", url.host))),
        Ok(Err(e)) => Err(NetError::Resolve(format!("{}: {e}", url.host))),
        Err(_) => Err(NetError::Resolve(format!("{}: timed out", url.host))),
    }
}

/// Resolves the host and connects to the first address that answers.
fn connect(url: &Url, per_address: Duration, deadline: Instant) -> Result<TcpStream, NetError> {
    let mut last = String::new();
    for addr in resolve(url, deadline)? {
        let budget = per_address.min(left(deadline)?);
        match TcpStream::connect_timeout(&addr, budget) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(NetError::Connect(last))
}
