//! An app's probe keys: the probe written in the `[[apps]]` section itself (the one-URL form)
//! and each `[[apps.probes]]` table. The same reader reads both, so both know the same keys.
//!
//! Invariant: a `ProbeSpec` that exists is usable: exactly one of `health_url` and `tcp`, HTTP
//! keys only on an HTTP probe, TLS keys only on an https one, the regex compiled.

use std::path::PathBuf;
use std::time::Duration;

use toml_edit::{Item, Table, Value};

use super::read::{key_span, ms, secs, Cx, Keys};
use super::target::{
    BodyRegex, Expect, HttpProbe, HttpTarget, Method, ProbeKind, ProbeSpec, TcpTarget, TlsSettings,
};

/// Keys that only an HTTP probe may have.
const HTTP_KEYS: &[&str] = &[
    "health_socket",
    "method",
    "headers",
    "expect_status",
    "expect_body",
    "expect_body_regex",
    "tls_verify",
    "ca_file",
    "cert_warn_days",
    "keep_alive",
];
const TLS_KEYS: &[&str] = &["tls_verify", "ca_file", "cert_warn_days"];
/// Framing headers the probe writes itself.
const OWN_HEADERS: &[&str] = &["content-length", "transfer-encoding"];

impl Cx<'_> {
    /// The app's probes, in order: the section's own, then each `[[apps.probes]]`.
    pub(super) fn app_probes(&mut self, t: &mut Keys<'_>, timeout: Duration) -> Vec<ProbeSpec> {
        let mut probes: Vec<ProbeSpec> = self.probe(t, timeout, false).into_iter().collect();
        for table in self.probe_tables(t) {
            let mut k = Keys::new(table, "[[apps.probes]]");
            let timeout = self.duration(&mut k, "timeout", timeout, ms(10)..=secs(300));
            probes.extend(self.probe(&mut k, timeout, true));
            self.finish(k);
        }
        probes
    }

    fn probe_tables<'t>(&mut self, t: &mut Keys<'t>) -> Vec<&'t Table> {
        match t.item("probes") {
            None => Vec::new(),
            Some(Item::ArrayOfTables(list)) => list.iter().collect(),
            Some(other) => {
                self.problem(
                    other.span().unwrap_or_else(|| key_span(t, "probes")),
                    "`probes` must be a list of tables".into(),
                    Some(
                        "write each probe as its own [[apps.probes]] section under its app".into(),
                    ),
                );
                Vec::new()
            }
        }
    }

    /// One probe's keys; `required`: the table exists only to hold a probe.
    fn probe(&mut self, t: &mut Keys<'_>, timeout: Duration, required: bool) -> Option<ProbeSpec> {
        let url = self.probe_url(t);
        let tcp = self.probe_tcp(t);
        let socket = self.probe_socket(t);
        let method = self.probe_method(t);
        let headers = self.probe_headers(t);
        let expect = Expect {
            status: self.status_match(t),
            body: self.probe_expect_body(t),
            body_regex: self.probe_body_regex(t),
        };
        let tls = self.probe_tls(t);
        let keep_alive = self.boolean(t, "keep_alive");
        let kind = match (url, tcp) {
            (Some(_), Some(_)) => {
                self.problem(
                    key_span(t, "tcp"),
                    "a probe has either `health_url` or `tcp`, not both".into(),
                    Some("put the second in its own [[apps.probes]] section".into()),
                );
                return None;
            }
            (None, Some(tcp)) => {
                self.misplaced(t, HTTP_KEYS, "a tcp probe");
                ProbeKind::Tcp(tcp)
            }
            (Some(url), None) => {
                if !url.tls {
                    self.misplaced(t, TLS_KEYS, "an http:// probe (they are for https://)");
                }
                self.head_without_body(t, method, &expect);
                ProbeKind::Http(Box::new(HttpProbe {
                    keep_alive: self.probe_keep_alive(t, url.tls, method, keep_alive),
                    tls: url.tls.then_some(tls),
                    url,
                    socket,
                    method,
                    headers,
                    expect,
                }))
            }
            (None, None) => {
                if required {
                    self.problem(
                        t.span().unwrap_or(0..0),
                        "a [[apps.probes]] section has neither `health_url` nor `tcp`".into(),
                        Some("add health_url = \"http://127.0.0.1:PORT/health\" or tcp = \"127.0.0.1:PORT\"".into()),
                    );
                } else {
                    self.misplaced(t, HTTP_KEYS, "an app without `health_url`");
                }
                return None;
            }
        };
        Some(ProbeSpec { kind, timeout })
    }

    /// `keep_alive` as given (off by default). An https probe connects for each check; a POST
    /// is never sent twice, so a kept connection the server closes as it arrives would count
    /// as the app's failure: both refused.
    fn probe_keep_alive(
        &mut self,
        t: &Keys<'_>,
        tls: bool,
        method: Method,
        given: Option<bool>,
    ) -> bool {
        if given != Some(true) {
            return false;
        }
        let why = if tls {
            Some("keep_alive applies to http:// probes: an https probe opens a connection for each check")
        } else if method == Method::Post {
            Some("keep_alive applies to GET and HEAD probes: a POST is never sent twice, so a kept connection the app closes as it arrives would count as a failure")
        } else {
            None
        };
        if let Some(why) = why {
            self.problem(
                key_span(t, "keep_alive"),
                why.into(),
                Some("remove keep_alive (each check then opens its own connection)".into()),
            );
            return false;
        }
        true
    }

    /// Reports each of `keys` present in `t`: they do not apply to `what`.
    fn misplaced(&mut self, t: &Keys<'_>, keys: &[&str], what: &str) {
        for key in keys {
            if t.contains_key(key) {
                self.problem(
                    key_span(t, key),
                    format!("`{key}` does not apply to {what}"),
                    Some("remove it, or give the probe the URL it applies to".into()),
                );
            }
        }
    }

    fn head_without_body(&mut self, t: &Keys<'_>, method: Method, expect: &Expect) {
        if method == Method::Head && expect.reads_body() {
            self.problem(
                key_span(t, "method"),
                "a HEAD reply has no body to match expect_body or expect_body_regex".into(),
                Some("use method = \"GET\", or remove the body keys".into()),
            );
        }
    }

    fn probe_url(&mut self, t: &mut Keys<'_>) -> Option<HttpTarget> {
        let (u, span) = self.string(t, "health_url")?;
        match HttpTarget::parse(&u) {
            Ok(target) => Some(target),
            Err(why) => {
                // The message may reach events.jsonl (a reload refused): never the query.
                let shown = u
                    .split_once('?')
                    .map_or(u.clone(), |(b, _)| format!("{b}?<redacted>"));
                self.problem(
                    span,
                    format!("health_url `{shown}`: {why}"),
                    Some(
                        "write the app's HTTP endpoint, e.g. \"http://127.0.0.1:5000/api-health\""
                            .into(),
                    ),
                );
                None
            }
        }
    }

    fn probe_tcp(&mut self, t: &mut Keys<'_>) -> Option<TcpTarget> {
        let (text, span) = self.string(t, "tcp")?;
        TcpTarget::parse(&text)
            .map_err(|why| {
                self.problem(
                    span,
                    format!("tcp `{text}`: {why}"),
                    Some("write host:port, e.g. tcp = \"127.0.0.1:6379\" or \"[::1]:6379\"".into()),
                );
            })
            .ok()
    }

    fn probe_socket(&mut self, t: &mut Keys<'_>) -> Option<PathBuf> {
        let (s, span) = self.string(t, "health_socket")?;
        let p = PathBuf::from(&s);
        if !p.is_absolute() || s.len() > 107 {
            self.problem(
                span,
                format!("health_socket `{s}` is not an absolute path of at most 107 bytes"),
                Some(
                    "write the socket's full path, e.g. health_socket = \"/run/app/gunicorn.sock\""
                        .into(),
                ),
            );
        }
        Some(p)
    }

    fn probe_method(&mut self, t: &mut Keys<'_>) -> Method {
        let Some((m, span)) = self.string(t, "method") else {
            return Method::Get;
        };
        match m.as_str() {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            _ => {
                self.problem(
                    span,
                    format!("method `{m}` is not one a probe sends"),
                    Some("write method = \"GET\" (the default), \"HEAD\" or \"POST\"".into()),
                );
                Method::Get
            }
        }
    }

    /// `headers = { Host = "api.internal", Authorization = "..." }` (or a `[apps.headers]`
    /// table). Problems quote the header's name, never its value.
    fn probe_headers(&mut self, t: &mut Keys<'_>) -> Vec<(String, String)> {
        let pairs: Vec<(String, Option<String>)> = match t.item("headers") {
            None => return Vec::new(),
            Some(Item::Table(tab)) => tab
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_str().map(str::to_string)))
                .collect(),
            Some(Item::Value(Value::InlineTable(tab))) => tab
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_str().map(str::to_string)))
                .collect(),
            Some(other) => {
                self.problem(
                    other.span().unwrap_or(0..0),
                    "`headers` must be a table of names and string values".into(),
                    Some("write headers = { Host = \"api.internal\" }".into()),
                );
                return Vec::new();
            }
        };
        let span = t.get("headers").and_then(Item::span).unwrap_or(0..0);
        let mut out = Vec::new();
        for (name, value) in pairs {
            let token = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            let why = match &value {
                _ if !token => Some("is not a header name"),
                _ if OWN_HEADERS.contains(&name.to_ascii_lowercase().as_str()) => {
                    Some("is set by the probe itself")
                }
                None => Some("must have a string value"),
                Some(v) if v.chars().any(|c| c.is_control() && c != '\t') => {
                    Some("has a value with control characters (no line breaks)")
                }
                Some(_) => None,
            };
            match (why, value) {
                (None, Some(v)) => out.push((name, v)),
                (why, _) => self.problem(
                    span.clone(),
                    format!("header `{name}` {}", why.unwrap_or("is invalid")),
                    Some("write headers = { Name = \"value\" } with printable values".into()),
                ),
            }
        }
        out
    }

    fn probe_expect_body(&mut self, t: &mut Keys<'_>) -> Option<String> {
        self.string(t, "expect_body").map(|(s, span)| {
            if s.is_empty() {
                self.problem(
                    span,
                    "expect_body is empty".into(),
                    Some("remove the key, or give the text a healthy reply contains".into()),
                );
            }
            s
        })
    }

    fn probe_body_regex(&mut self, t: &mut Keys<'_>) -> Option<BodyRegex> {
        let (s, span) = self.string(t, "expect_body_regex")?;
        match regex_lite::Regex::new(&s) {
            Ok(r) => Some(BodyRegex(r)),
            Err(e) => {
                let first = e.to_string();
                let first = first.lines().last().unwrap_or("").trim().to_string();
                self.problem(
                    span,
                    format!("expect_body_regex is not a valid pattern: {first}"),
                    Some("write a regex-lite pattern (Rust regex syntax, no Unicode classes), e.g. \"\\\"status\\\":\\\\s*\\\"ok\\\"\"".into()),
                );
                None
            }
        }
    }

    /// The TLS keys (read on every probe; `probe` refuses them on a non-https one).
    fn probe_tls(&mut self, t: &mut Keys<'_>) -> TlsSettings {
        let verify = self.boolean(t, "tls_verify").unwrap_or(true);
        let ca_file = self.string(t, "ca_file").map(|(s, span)| {
            let p = PathBuf::from(&s);
            if !p.is_absolute() {
                self.problem(
                    span,
                    format!("ca_file `{s}` is not an absolute path"),
                    Some(
                        "write the PEM file's full path, e.g. ca_file = \"/etc/pmguard/ca.pem\""
                            .into(),
                    ),
                );
            }
            p
        });
        let cert_warn_days = self.integer(t, "cert_warn_days", 14, 0..=3650) as u32;
        if !verify && ca_file.is_some() {
            self.problem(
                key_span(t, "ca_file"),
                "ca_file has no effect with tls_verify = false".into(),
                Some("remove one of them (verifying against ca_file is the safer choice)".into()),
            );
        }
        TlsSettings {
            verify,
            ca_file,
            cert_warn_days,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::target::{Method, ProbeKind, ProbeSpec};
    use crate::config::{Config, ConfigError, Problem};

    fn probes(text: &str) -> Vec<ProbeSpec> {
        match Config::parse(Path::new("/p.toml"), text) {
            Ok(c) => c.apps[0].probes.clone(),
            Err(e) => panic!("{e}"),
        }
    }

    fn problems(text: &str) -> Vec<Problem> {
        match Config::parse(Path::new("/p.toml"), text) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn the_one_url_form_and_probe_tables_make_one_list() {
        let p = probes(
            r#"[[apps]]
name = "web"
timeout = "2s"
health_url = "https://127.0.0.1:8443/health?token=x"
method = "HEAD"
headers = { Host = "api.internal", Authorization = "Bearer s3cret" }
cert_warn_days = 30

[[apps.probes]]
tcp = "127.0.0.1:6379"
timeout = "300ms"

[[apps.probes]]
health_url = "http://localhost/health"
health_socket = "/run/app/gunicorn.sock"
expect_body_regex = '"db":\s*"up"'
"#,
        );
        assert_eq!(p.len(), 3);
        let ProbeKind::Http(h) = &p[0].kind else {
            panic!("{p:?}")
        };
        assert_eq!(h.method, Method::Head);
        assert_eq!(h.headers.len(), 2);
        let tls = h.tls.as_ref().unwrap();
        assert!(tls.verify && tls.cert_warn_days == 30);
        assert_eq!(p[0].timeout.as_millis(), 2000);
        assert_eq!(p[1].describe(), "tcp://127.0.0.1:6379");
        assert_eq!(p[1].timeout.as_millis(), 300);
        assert_eq!(
            p[2].describe(),
            "http://localhost/health via /run/app/gunicorn.sock"
        );
        assert_eq!(p[2].network_host(), None);
        // Never a header value or the query in what is shown.
        assert!(!p[0].describe().contains("s3cret"));
        let debug = format!("{p:?}");
        assert!(
            debug.contains("Authorization") && !debug.contains("s3cret"),
            "{debug}"
        );
        assert!(!debug.contains("token=x"), "{debug}");
        assert!(!p[0].describe().contains("token"));
    }

    #[test]
    fn misplaced_and_wrong_probe_keys_are_reported_with_their_line() {
        let p = problems(
            r#"[[apps]]
name = "web"
expect_body = "ok"
[[apps.probes]]
tcp = "127.0.0.1"
[[apps.probes]]
tcp = "127.0.0.1:1"
method = "GET"
[[apps.probes]]
health_url = "http://127.0.0.1/"
tls_verify = false
method = "PUT"
expect_body_regex = "(unclosed"
headers = { "Bad Name" = "x", Auth = "a\nb", Content-Length = "1" }
[[apps.probes]]
timeout = "1s"
[[apps.probes]]
health_url = "http://127.0.0.1/"
method = "HEAD"
expect_body = "x"
"#,
        );
        let lines: Vec<(usize, &str)> = p.iter().map(|p| (p.line, p.message.as_str())).collect();
        let has = |line: usize, text: &str| {
            assert!(
                lines.iter().any(|(l, m)| *l == line && m.contains(text)),
                "{text} at {line}: {lines:#?}"
            )
        };
        has(
            3,
            "`expect_body` does not apply to an app without `health_url`",
        );
        has(5, "no port");
        has(8, "`method` does not apply to a tcp probe");
        has(11, "`tls_verify` does not apply to an http:// probe");
        has(12, "method `PUT`");
        has(13, "expect_body_regex is not a valid pattern");
        has(14, "header `Bad Name` is not a header name");
        has(14, "header `Auth` has a value with control characters");
        has(14, "header `Content-Length` is set by the probe itself");
        has(15, "neither `health_url` nor `tcp`");
        has(19, "HEAD reply has no body");
        // A header's value is never quoted back.
        assert!(!p.iter().any(|p| p.message.contains("a\nb")));
    }

    #[test]
    fn tls_verify_false_is_valid_but_warned_about() {
        let c = Config::parse(
            Path::new("/p.toml"),
            "[[apps]]\nname = \"web\"\nhealth_url = \"https://127.0.0.1:8443/h\"\ntls_verify = false\n",
        )
        .unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("tls_verify = false") && w[0].contains("WITHOUT verifying"));
        let p = problems("[[apps]]\nname = \"w\"\nhealth_url = \"https://h/\"\ntls_verify = false\nca_file = \"/ca.pem\"\n");
        assert!(p[0].message.contains("ca_file has no effect"), "{p:?}");
    }

    #[test]
    fn ipv6_tcp_targets_parse() {
        let p = probes("[[apps]]\nname = \"r\"\ntcp = \"[::1]:6379\"\n");
        assert_eq!(p[0].describe(), "tcp://[::1]:6379");
        assert_eq!(p[0].network_host(), Some("::1"));
    }

    #[test]
    fn keep_alive_is_off_unless_asked_and_only_for_plain_http() {
        let plain = |extra: &str| {
            let p = probes(&format!(
                "[[apps]]\nname = \"w\"\nhealth_url = \"http://127.0.0.1:5000/h\"\n{extra}"
            ));
            match &p[0].kind {
                ProbeKind::Http(h) => h.keep_alive,
                ProbeKind::Tcp(_) => panic!("{p:?}"),
            }
        };
        assert!(!plain(""));
        assert!(plain("keep_alive = true\n"));
        let p = problems(
            "[[apps]]\nname = \"w\"\nhealth_url = \"https://127.0.0.1/h\"\nkeep_alive = true\n[[apps.probes]]\ntcp = \"127.0.0.1:1\"\nkeep_alive = true\n[[apps.probes]]\nhealth_url = \"http://127.0.0.1/\"\nkeep_alive = \"yes\"\n[[apps.probes]]\nhealth_url = \"http://127.0.0.1/\"\nmethod = \"POST\"\nkeep_alive = true\n",
        );
        let lines: Vec<(usize, &str)> = p.iter().map(|p| (p.line, p.message.as_str())).collect();
        for (line, text) in [
            (4, "keep_alive applies to http:// probes"),
            (7, "`keep_alive` does not apply to a tcp probe"),
            (10, "`keep_alive` must be true or false"),
            (14, "keep_alive applies to GET and HEAD probes"),
        ] {
            assert!(
                lines.iter().any(|(l, m)| *l == line && m.contains(text)),
                "{text} on line {line}: {lines:?}"
            );
        }
    }
}
