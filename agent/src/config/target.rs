//! What a health check aims at and what it accepts: the parsed health URL and the statuses
//! that count as healthy. Pure values, validated when the config is read; `probe` uses them.

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

    /// The `Host` header's value: brackets around an IPv6 literal, the port unless 80.
    pub fn host_header(&self) -> String {
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

/// Which HTTP statuses count as healthy.
#[derive(Debug, Clone, PartialEq)]
pub enum StatusMatch {
    /// Any 2xx (the default).
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
