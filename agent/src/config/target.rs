//! What a health check aims at and what it accepts: the parsed health URL, the TCP address, the
//! request's shape and the answers that count as healthy. Pure values, validated when the config
//! is read; `probe` uses them.
//!
//! Invariants: header values and a URL's query string (both often carry a token) never appear
//! in `describe`/`redacted`, so never in logs, events or status.

use std::path::PathBuf;
use std::time::Duration;

/// A parsed `http[s]://host[:port]/path` health URL.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpTarget {
    pub url: String,
    /// `https://`: the probe speaks TLS.
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, always starting with `/`.
    pub path: String,
}

impl HttpTarget {
    pub fn parse(url: &str) -> Result<HttpTarget, String> {
        let (rest, tls) = if let Some(r) = url.strip_prefix("http://") {
            (r, false)
        } else if let Some(r) = url.strip_prefix("https://") {
            (r, true)
        } else {
            return Err("must start with http:// or https://".into());
        };
        let default_port = if tls { 443 } else { 80 };
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
                "" => default_port,
                p => parse_port(p.strip_prefix(':').ok_or("junk after ]")?)?,
            };
            (host.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), parse_port(p)?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return Err("no host".into());
        }
        if authority.starts_with('[') {
            host.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("`[{host}]` is not an IPv6 address"))?;
        } else if !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(
                "the host may hold only letters, digits, `.`, `-` and `_` (no spaces or control characters)"
                    .into(),
            );
        }
        if path.bytes().any(|b| b <= b' ' || b == 0x7f) || path.contains('#') {
            return Err("the path has spaces, control characters or a #fragment".into());
        }
        Ok(HttpTarget {
            url: url.to_string(),
            tls,
            host,
            port,
            path: path.to_string(),
        })
    }

    /// The URL for logs, events and status: a query string often carries a token, so its
    /// value is never shown.
    pub fn redacted(&self) -> String {
        match self.url.split_once('?') {
            Some((base, _)) => format!("{base}?<redacted>"),
            None => self.url.clone(),
        }
    }

    /// The `Host` header's value: brackets around an IPv6 literal, the port unless the scheme's.
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == if self.tls { 443 } else { 80 } {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// A `host:port` to connect to (`tcp = "127.0.0.1:6379"`, `"[::1]:6379"`, `"redis.local:6379"`).
#[derive(Debug, Clone, PartialEq)]
pub struct TcpTarget {
    pub host: String,
    pub port: u16,
}

impl TcpTarget {
    pub fn parse(text: &str) -> Result<TcpTarget, String> {
        let t =
            HttpTarget::parse(&format!("http://{text}")).map_err(|e| e.replace("http://", ""))?;
        if t.path != "/" || text.ends_with('/') {
            return Err("write only host:port, no path".into());
        }
        let has_port = match text.strip_prefix('[') {
            Some(v6) => v6.contains("]:"),
            None => text.contains(':'),
        };
        if !has_port {
            return Err("no port: write host:port, e.g. \"127.0.0.1:6379\"".into());
        }
        Ok(TcpTarget {
            host: t.host,
            port: t.port,
        })
    }
}

/// The request method of an HTTP probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    #[default]
    Get,
    /// The reply has no body, whatever its headers say.
    Head,
    /// Sent with an empty body (`Content-Length: 0`).
    Post,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
        }
    }
}

/// How an https probe checks the server's certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsSettings {
    /// Verify the chain and the name (default true). false accepts any certificate.
    pub verify: bool,
    /// PEM roots to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// A warning event fires while the certificate expires in fewer days than this.
    pub cert_warn_days: u32,
}

/// A body pattern (`expect_body_regex`), compiled when the config is read.
#[derive(Debug, Clone)]
pub struct BodyRegex(pub regex_lite::Regex);

impl PartialEq for BodyRegex {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

/// What a healthy HTTP answer looks like.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Expect {
    pub status: StatusMatch,
    /// A substring of the body.
    pub body: Option<String>,
    /// A pattern the body matches.
    pub body_regex: Option<BodyRegex>,
}

impl Expect {
    /// Whether the reply's body matters at all.
    pub fn reads_body(&self) -> bool {
        self.body.is_some() || self.body_regex.is_some()
    }
}

/// One HTTP(S) probe: where, how to ask, what counts as healthy. Its `Debug` shows the headers'
/// names only.
#[derive(Clone, PartialEq)]
pub struct HttpProbe {
    pub url: HttpTarget,
    /// Connect to this unix socket instead of the URL's host and port (the URL still gives
    /// the path, the Host header and, for https, the server name).
    pub socket: Option<PathBuf>,
    pub method: Method,
    /// Extra request headers, in order; they replace the defaults of the same name. The values
    /// are never logged.
    pub headers: Vec<(String, String)>,
    pub expect: Expect,
    /// Set for https URLs.
    pub tls: Option<TlsSettings>,
    /// Keep the connection of a passed probe open for the next one (plain http only; see
    /// `probe::flight`).
    pub keep_alive: bool,
}

impl std::fmt::Debug for HttpProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("HttpProbe")
            .field("url", &self.url.redacted())
            .field("socket", &self.socket)
            .field("method", &self.method)
            .field("headers", &names)
            .field("expect", &self.expect)
            .field("tls", &self.tls)
            .field("keep_alive", &self.keep_alive)
            .finish()
    }
}

/// What one probe checks.
#[derive(Debug, Clone, PartialEq)]
pub enum ProbeKind {
    Http(Box<HttpProbe>),
    /// A TCP connect that succeeds within the timeout passes.
    Tcp(TcpTarget),
}

/// One probe of an app: all of an app's probes must pass for a check to pass.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeSpec {
    pub kind: ProbeKind,
    /// Deadline from connect to the last byte.
    pub timeout: Duration,
}

impl ProbeSpec {
    /// The probe for logs, events and status: no query string, no header values.
    pub fn describe(&self) -> String {
        match &self.kind {
            ProbeKind::Http(h) => match &h.socket {
                Some(s) => format!("{} via {}", h.url.redacted(), s.display()),
                None => h.url.redacted(),
            },
            ProbeKind::Tcp(t) if t.host.contains(':') => format!("tcp://[{}]:{}", t.host, t.port),
            ProbeKind::Tcp(t) => format!("tcp://{}:{}", t.host, t.port),
        }
    }

    /// The host the probe connects to over the network (`None` for a unix socket).
    pub fn network_host(&self) -> Option<&str> {
        match &self.kind {
            ProbeKind::Http(h) if h.socket.is_some() => None,
            ProbeKind::Http(h) => Some(&h.url.host),
            ProbeKind::Tcp(t) => Some(&t.host),
        }
    }
}

fn parse_port(p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("`{p}` is not a port")),
    }
}

/// Which HTTP statuses count as healthy.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum StatusMatch {
    /// Any 2xx (the default).
    #[default]
    Success,
    /// Exactly one of these.
    AnyOf(Vec<u16>),
}

impl StatusMatch {
    pub fn accepts(&self, status: u16) -> bool {
        match self {
            StatusMatch::Success => (200..300).contains(&status),
            StatusMatch::AnyOf(list) => list.contains(&status),
        }
    }
}
