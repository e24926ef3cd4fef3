//! The URLs the agent sends to (AWS endpoints, notify webhooks): parsed once, shown redacted.

use std::net::IpAddr;

/// An `http://` or `https://` URL, split into what a request needs.
#[derive(Clone, PartialEq, Eq)]
pub struct Url {
    pub https: bool,
    /// The host name or address literal; an IPv6 literal without its brackets.
    pub host: String,
    pub port: u16,
    /// Path and optional `?query`, never empty (`/` at least); no fragment.
    pub target: String,
}

/// Only the redacted form: a webhook's path or query is often its secret.
impl std::fmt::Debug for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Url {
    /// Parses `scheme://host[:port][/path][?query][#fragment]`. Errors never repeat the path or
    /// query (they may hold a token).
    pub fn parse(s: &str) -> Result<Url, String> {
        let s = s.trim();
        let (https, rest) = if let Some(r) = strip_prefix_ci(s, "https://") {
            (true, r)
        } else if let Some(r) = strip_prefix_ci(s, "http://") {
            (false, r)
        } else {
            return Err("the URL must start with https:// (or http:// to a loopback host)".into());
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        if authority.contains('@') {
            return Err("the URL must not carry a user name or password before the host".into());
        }
        let (host, port) = split_authority(authority, if https { 443 } else { 80 })?;
        let tail = tail.split('#').next().unwrap_or("");
        if tail.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(
                "the URL's path has spaces or control characters: percent-encode them".into(),
            );
        }
        let target = if tail.starts_with('/') {
            tail.to_string()
        } else {
            format!("/{tail}")
        };
        Ok(Url {
            https,
            host,
            port,
            target,
        })
    }

    /// 127.0.0.0/8, ::1 or `localhost`: the only hosts plain http is allowed to.
    pub fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// The `Host` header's value: the port only when it is not the scheme's default.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default = if self.https { 443 } else { 80 };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// Scheme and authority only, e.g. `https://hooks.slack.com/…`: safe for logs.
    pub fn redacted(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        let tail = if self.target == "/" { "/" } else { "/…" };
        format!("{scheme}://{}{tail}", self.authority())
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

fn split_authority(authority: &str, default_port: u16) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let close = rest
            .find(']')
            .ok_or("an IPv6 address in a URL needs its closing `]`")?;
        let host = &rest[..close];
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("`[{host}]` is not an IPv6 address"));
        }
        let after = &rest[close + 1..];
        match after.strip_prefix(':') {
            Some(p) => (host, Some(p)),
            None if after.is_empty() => (host, None),
            None => return Err(format!("unexpected `{after}` after the IPv6 address")),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("the URL has no host".into());
    }
    if !host.contains(':')
        && !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    {
        return Err(format!("`{host}` is not a host name"));
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("`{p}` is not a port (1-65535)")),
        },
    };
    Ok((host.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_parts_a_request_needs() {
        let u = Url::parse("https://Hooks.Slack.com/services/T0/B0/SECRET?x=1#frag").unwrap();
        assert!(u.https);
        assert_eq!(u.host, "hooks.slack.com");
        assert_eq!(u.port, 443);
        assert_eq!(u.target, "/services/T0/B0/SECRET?x=1");
        assert_eq!(u.authority(), "hooks.slack.com");
        let v6 = Url::parse("http://[::1]:8080").unwrap();
        assert_eq!(
            (v6.host.as_str(), v6.port, v6.target.as_str()),
            ("::1", 8080, "/")
        );
        assert_eq!(v6.authority(), "[::1]:8080");
        let q = Url::parse("http://127.0.0.1:9?a=b").unwrap();
        assert_eq!(q.target, "/?a=b");
    }

    #[test]
    fn never_shows_the_path_or_query() {
        let u = Url::parse("https://example.com/hook/SECRET?token=SECRET").unwrap();
        assert_eq!(u.redacted(), "https://example.com/…");
        assert!(!format!("{u:?}").contains("SECRET"));
        let e = Url::parse("https://example.com:99999/SECRET").unwrap_err();
        assert!(!e.contains("SECRET"), "{e}");
        assert_eq!(
            Url::parse("http://localhost:81").unwrap().redacted(),
            "http://localhost:81/"
        );
    }

    #[test]
    fn knows_loopback() {
        for ok in [
            "http://127.0.0.1/",
            "http://127.9.9.9/",
            "http://[::1]/",
            "http://LOCALHOST/",
        ] {
            assert!(Url::parse(ok).unwrap().is_loopback(), "{ok}");
        }
        for no in [
            "http://10.0.0.1/",
            "https://example.com/",
            "http://[::2]/",
            "http://localhost.evil.com/",
        ] {
            assert!(!Url::parse(no).unwrap().is_loopback(), "{no}");
        }
    }

    #[test]
    fn refuses_what_cannot_be_sent_safely() {
        for bad in [
            "ftp://example.com/",
            "example.com/x",
            "https://user:pw@example.com/",
            "https:///x",
            "https://exa mple.com/",
            "https://example.com:0/",
            "https://[::1/",
            "https://[zz]/",
            "https://example.com/a b",
            "https://example.com/a\r\nX: y",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }
}
