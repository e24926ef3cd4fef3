//! HTTP/1.1 on the wire, as pure functions over bytes: the request a probe sends and the
//! judgement of the reply read so far. Unit-tested on recorded byte streams.
//!
//! Invariants: a reply is judged from the bytes alone (no I/O here); at most `MAX_HEAD` of head
//! and `MAX_BODY` of body matter; a 3xx is a status like any other (redirects are never
//! followed); header values never leave this module except onto the wire.

use crate::config::target::{Expect, HttpProbe, Method};

use super::ProbeOutcome;
use crate::net::wire::{dechunk, find, Dechunk};

/// How much of a body is read to look for `expect_body`.
pub const MAX_BODY: usize = 64 * 1024;
pub const MAX_HEAD: usize = 16 * 1024;
/// Interim 1xx responses accepted before the final one.
const MAX_INTERIM: usize = 8;

/// What the reply is judged against.
#[derive(Debug, Clone, Copy)]
pub struct Asked<'a> {
    pub expect: &'a Expect,
    /// The request was HEAD: the reply has no body.
    pub head: bool,
}

/// The request bytes: the method, the URL's path, `Host` (from the URL unless a header gives
/// it), the defaults, then the user's headers (which replace defaults of the same name).
/// `Connection: close` unless the probe keeps its connection (HTTP/1.1 keeps it by default).
pub fn request(p: &HttpProbe) -> Vec<u8> {
    let given = |name: &str| p.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    let mut r = format!("{} {} HTTP/1.1\r\n", p.method.as_str(), p.url.path);
    let defaults = [
        ("Host", p.url.host_header()),
        (
            "User-Agent",
            format!("pmguard/{}", env!("CARGO_PKG_VERSION")),
        ),
        ("Accept", "*/*".to_string()),
        ("Connection", "close".to_string()),
    ];
    for (k, v) in defaults {
        if k == "Connection" && p.keep_alive {
            continue;
        }
        if !given(k) {
            r.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    for (k, v) in &p.headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    if p.method == Method::Post {
        r.push_str("Content-Length: 0\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// Whether a `Connection` header's value holds the `close` token.
fn says_close(value: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case("close"))
}

/// Whether the request lets the connection stay open after the reply (no `Connection: close`
/// of the user's).
pub fn request_keeps_open(p: &HttpProbe) -> bool {
    p.keep_alive
        && !p
            .headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("connection") && says_close(v))
}

/// Whether `buf` is exactly one whole reply after which the connection can carry another
/// request: an HTTP/1.1 final head without `Connection: close`, a body framed by one
/// `Content-Length` or by chunked encoding (or none: HEAD, 204, 304) and read to its end, and
/// not one byte more. Anything else (a body that runs to the close, a reply cut short, framing
/// that two headers contradict) closes the connection.
pub fn keeps_open(buf: &[u8], head_request: bool) -> bool {
    let Ok((status, head_len, head)) = final_head(buf, false) else {
        return false;
    };
    if !head.starts_with("HTTP/1.1 ") {
        return false;
    }
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for line in head.lines().skip(1) {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("connection") && says_close(v) {
            return false;
        }
        if k.eq_ignore_ascii_case("content-length") {
            match (length, v.parse::<usize>()) {
                (None, Ok(n)) => length = Some(n),
                _ => return false,
            }
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || !v.eq_ignore_ascii_case("chunked") {
                return false;
            }
            chunked = true;
        }
    }
    let body = &buf[head_len..];
    if head_request || matches!(status, 204 | 304) {
        return body.is_empty();
    }
    match (chunked, length) {
        (true, None) => chunked_end(body) == Some(body.len()),
        (false, Some(n)) => body.len() == n,
        _ => false,
    }
}

/// Where a chunked body (chunks, the last chunk, trailers, the empty line) ends, when all of it
/// is there and every line ends in CRLF.
fn chunked_end(raw: &[u8]) -> Option<usize> {
    let mut at = 0usize;
    loop {
        let eol = at + find(&raw[at..], b"\r\n")?;
        let line = std::str::from_utf8(&raw[at..eol]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        at = eol + 2;
        if size == 0 {
            break;
        }
        at = at.checked_add(size)?;
        if raw.get(at..at.checked_add(2)?)? != b"\r\n" {
            return None;
        }
        at += 2;
    }
    loop {
        let eol = at + find(raw.get(at..)?, b"\r\n")?;
        let empty = eol == at;
        at = eol + 2;
        if empty {
            return Some(at);
        }
    }
}

/// Whether the body (so far) holds the expected text and matches the expected pattern.
fn body_matches(body: &[u8], expect: &Expect) -> bool {
    let text_ok = expect
        .body
        .as_ref()
        .is_none_or(|t| find(body, t.as_bytes()).is_some());
    text_ok
        && expect
            .body_regex
            .as_ref()
            .is_none_or(|r| r.0.is_match(&String::from_utf8_lossy(body)))
}

/// Where the head that starts at `from` ends (just past its empty line), accepting CRLF and
/// bare LF line ends (RFC 9112 section 2.2 lets a recipient take LF alone as a line end).
pub fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut line_start = from;
    for (i, &b) in buf.iter().enumerate().skip(from) {
        if b == b'\n' {
            let line = &buf[line_start..i];
            if line.is_empty() || line == b"\r" {
                return Some(i + 1);
            }
            line_start = i + 1;
        }
    }
    None
}

/// Judges the reply read so far: `None` while more is needed. `eof`: the peer closed (or the
/// deadline passed and what is there must be judged as it is).
pub fn evaluate(buf: &[u8], eof: bool, ask: Asked<'_>) -> Option<ProbeOutcome> {
    let (status, head_len, head) = match final_head(buf, eof) {
        Ok(h) => h,
        Err(verdict) => return verdict,
    };
    if !ask.expect.status.accepts(status) {
        return Some(ProbeOutcome::Status(status));
    }
    if !ask.expect.reads_body() {
        return Some(ProbeOutcome::Pass { status });
    }
    judge_body(&head, &buf[head_len..], status, eof, ask)
}

/// The final (non-1xx) head: its status, where it ends, its text. Err(None) while more is
/// needed; Err(Some(_)) when the reply is judged already.
fn final_head(buf: &[u8], eof: bool) -> Result<(u16, usize, String), Option<ProbeOutcome>> {
    // Interim 1xx heads (100 Continue, 103 Early Hints) come before the final one: skip them.
    // 101 Switching Protocols is final (a health endpoint that upgrades is not healthy HTTP).
    let mut start = 0;
    for _ in 0..=MAX_INTERIM {
        let Some(end) = head_end(buf, start) else {
            if buf.len() - start > MAX_HEAD {
                return Err(Some(ProbeOutcome::Protocol(
                    "response head larger than 16 KiB".into(),
                )));
            }
            if !eof {
                return Err(None);
            }
            return Err(Some(if buf.is_empty() {
                ProbeOutcome::Connect("connection closed without a reply".into())
            } else {
                ProbeOutcome::Protocol("connection closed mid-header".into())
            }));
        };
        let head = String::from_utf8_lossy(&buf[start..end]);
        let first = head.lines().next().unwrap_or("").trim_end_matches('\r');
        let status = parse_status_line(first).map_err(|e| Some(ProbeOutcome::Protocol(e)))?;
        if !(100..200).contains(&status) || status == 101 {
            return Ok((status, end, head.into_owned()));
        }
        start = end;
    }
    Err(Some(ProbeOutcome::Protocol(format!(
        "more than {MAX_INTERIM} interim (1xx) responses"
    ))))
}

/// Judges the body read so far (`raw`: the bytes after the head) against the expected text and
/// pattern.
fn judge_body(
    head: &str,
    raw: &[u8],
    status: u16,
    eof: bool,
    ask: Asked<'_>,
) -> Option<ProbeOutcome> {
    let mut length = None;
    let mut chunked = false;
    for line in head.lines().skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                length = v.parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.to_ascii_lowercase().contains("chunked");
            }
        }
    }
    // 204 and 304 have no body, nor a reply to HEAD, whatever the headers say.
    let bodyless = matches!(status, 204 | 304) || ask.head;
    let (body, complete) = if bodyless {
        (Vec::new(), true)
    } else if chunked {
        match dechunk(raw) {
            Dechunk::Done(b) => (b, true),
            Dechunk::Partial(b) => (b, false),
            Dechunk::Bad => return Some(ProbeOutcome::Protocol("bad chunked encoding".into())),
        }
    } else {
        let n = length.map_or(raw.len(), |n| n.min(raw.len()));
        (raw[..n].to_vec(), length.is_some_and(|n| raw.len() >= n))
    };
    // The expected text seen is a pass, however the body is framed and whether or not the
    // server keeps the connection open after it (a keep-alive body without a length).
    if body_matches(&body, ask.expect) {
        return Some(ProbeOutcome::Pass { status });
    }
    if complete || eof || body.len() >= MAX_BODY {
        return Some(ProbeOutcome::Body { status });
    }
    None
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::target::StatusMatch;

    fn expect(status: &StatusMatch, body: Option<&str>) -> Expect {
        Expect {
            status: status.clone(),
            body: body.map(str::to_string),
            body_regex: None,
        }
    }

    /// Judges with a leaked `Expect` (tests only: keeps the call sites one line).
    fn ask(status: &StatusMatch, body: Option<&str>) -> Asked<'static> {
        Asked {
            expect: Box::leak(Box::new(expect(status, body))),
            head: false,
        }
    }

    #[test]
    fn interim_1xx_heads_are_skipped_and_bare_lf_heads_are_read() {
        let ok = StatusMatch::Success;
        let cases: [(&[u8], Option<&str>, ProbeOutcome); 5] = [
            (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                None,
                ProbeOutcome::Pass { status: 200 },
            ),
            (
                b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 503 Busy\r\n\r\n",
                None,
                ProbeOutcome::Status(503),
            ),
            (
                b"HTTP/1.1 200 OK\nContent-Length: 7\n\nhealthy",
                Some("healthy"),
                ProbeOutcome::Pass { status: 200 },
            ),
            (
                b"HTTP/1.1 200 OK\n\r\n",
                None,
                ProbeOutcome::Pass { status: 200 },
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
                None,
                ProbeOutcome::Status(101),
            ),
        ];
        for (reply, body, want) in cases {
            assert_eq!(
                evaluate(reply, false, ask(&ok, body)),
                Some(want),
                "{:?}",
                String::from_utf8_lossy(reply)
            );
        }
        // Only an interim head so far: wait for the final one.
        assert_eq!(
            evaluate(b"HTTP/1.1 100 Continue\r\n\r\n", false, ask(&ok, None)),
            None
        );
        // 204 has no body: judged at once, never waited for.
        assert_eq!(
            evaluate(
                b"HTTP/1.1 204 No Content\r\n\r\n",
                false,
                ask(&StatusMatch::AnyOf(vec![204]), Some("x"))
            ),
            Some(ProbeOutcome::Body { status: 204 })
        );
    }

    #[test]
    fn dechunk_handles_garbage() {
        assert!(matches!(dechunk(b"zz\r\n"), Dechunk::Bad));
        assert!(matches!(dechunk(b"5\r\nab"), Dechunk::Partial(b) if b == b"ab"));
    }

    /// A recorded reply fed one byte at a time (a head split across reads at every point): no
    /// verdict before the bytes that decide it, the same verdict as the whole reply at once.
    #[test]
    fn a_reply_split_at_every_byte_gives_the_same_verdict() {
        let ok = StatusMatch::Success;
        let replies: [&[u8]; 4] = [
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nhealthy",
            b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n3\r\nhea\r\n4\r\nlthy\r\n0\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\n{\"ok\":\"healthy\"}",
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\nhealthy",
        ];
        for reply in replies {
            let whole = evaluate(reply, true, ask(&ok, Some("healthy")));
            assert_eq!(whole, Some(ProbeOutcome::Pass { status: 200 }));
            let first = (1..=reply.len())
                .find(|&n| evaluate(&reply[..n], false, ask(&ok, Some("healthy"))).is_some())
                .unwrap();
            assert_eq!(
                evaluate(&reply[..first], false, ask(&ok, Some("healthy"))),
                whole
            );
            // The verdict comes with the last byte of the expected text, not before.
            assert!(String::from_utf8_lossy(&reply[..first]).ends_with('y'));
        }
    }

    #[test]
    fn a_redirect_is_a_status_and_never_followed() {
        let r = b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere/\r\nContent-Length: 0\r\n\r\n";
        let ok = StatusMatch::Success;
        assert_eq!(
            evaluate(r, false, ask(&ok, None)),
            Some(ProbeOutcome::Status(302))
        );
        let three = StatusMatch::AnyOf(vec![302]);
        assert_eq!(
            evaluate(r, false, ask(&three, None)),
            Some(ProbeOutcome::Pass { status: 302 })
        );
    }

    #[test]
    fn a_head_reply_has_no_body_whatever_its_length_says() {
        let e = expect(&StatusMatch::Success, None);
        let head = Asked {
            expect: &e,
            head: true,
        };
        assert_eq!(
            evaluate(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n",
                false,
                head
            ),
            Some(ProbeOutcome::Pass { status: 200 })
        );
    }

    #[test]
    fn the_regex_and_the_text_must_both_match() {
        let mut e = expect(&StatusMatch::Success, Some("status"));
        e.body_regex = Some(regex(r#""db":\s*"up""#));
        let a = Asked {
            expect: &e,
            head: false,
        };
        let up = b"HTTP/1.1 200 OK\r\nContent-Length: 27\r\n\r\n{\"status\":1, \"db\":  \"up\"}  ";
        assert_eq!(
            evaluate(up, false, a),
            Some(ProbeOutcome::Pass { status: 200 })
        );
        let down = b"HTTP/1.1 200 OK\r\nContent-Length: 24\r\n\r\n{\"status\":1,\"db\":\"down\"}";
        assert_eq!(
            evaluate(down, false, a),
            Some(ProbeOutcome::Body { status: 200 })
        );
    }

    fn regex(p: &str) -> crate::config::target::BodyRegex {
        crate::config::target::BodyRegex(regex_lite::Regex::new(p).unwrap())
    }

    #[test]
    fn the_request_has_the_method_the_headers_and_one_host() {
        let url = crate::config::target::HttpTarget::parse("https://[::1]:8443/h?t=1").unwrap();
        let mut p = HttpProbe {
            url,
            socket: None,
            method: Method::Post,
            headers: vec![
                ("host".into(), "api.internal".into()),
                ("Authorization".into(), "Bearer s3cret".into()),
            ],
            expect: Expect::default(),
            tls: None,
            keep_alive: false,
        };
        let r = String::from_utf8(request(&p)).unwrap();
        assert!(r.starts_with("POST /h?t=1 HTTP/1.1\r\n"), "{r}");
        assert_eq!(r.matches("ost: ").count(), 1, "{r}");
        assert!(r.contains("host: api.internal\r\n"));
        assert!(r.contains("Authorization: Bearer s3cret\r\n"));
        assert!(r.contains("Content-Length: 0\r\n"));
        assert!(r.ends_with("\r\n\r\n"));
        p.headers.clear();
        p.method = Method::Head;
        let r = String::from_utf8(request(&p)).unwrap();
        assert!(
            r.starts_with("HEAD /h?t=1 HTTP/1.1\r\nHost: [::1]:8443\r\n"),
            "{r}"
        );
        assert!(!r.contains("Content-Length"));
    }

    #[test]
    fn only_a_whole_framed_reply_that_leaves_the_connection_open_is_kept() {
        let yes: [(&[u8], bool); 6] = [
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
            (b"HTTP/1.1 200 OK\r\nconnection: Keep-Alive\r\ncontent-length: 0\r\n\r\n", false),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", false),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;x=1\r\nok\r\n0\r\nX-T: 1\r\n\r\n", false),
            (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", false),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", true),
        ];
        for (reply, head) in yes {
            assert!(
                keeps_open(reply, head),
                "{}",
                String::from_utf8_lossy(reply)
            );
        }
        let no: [(&[u8], bool); 10] = [
            // Said close, or HTTP/1.0.
            (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n\r\nok", false),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
            // Cut short, or one byte more than the reply.
            (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok", false),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokX", false),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n", false),
            // A body that runs to the close; framing two headers contradict.
            (b"HTTP/1.1 200 OK\r\n\r\nok", false),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok", false),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", false),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", false),
            // A head that is not whole yet.
            (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n", false),
        ];
        for (reply, head) in no {
            assert!(
                !keeps_open(reply, head),
                "{}",
                String::from_utf8_lossy(reply)
            );
        }
    }

    #[test]
    fn a_kept_probe_does_not_say_close_and_a_users_close_is_honoured() {
        let url = crate::config::target::HttpTarget::parse("http://127.0.0.1:5000/h").unwrap();
        let mut p = HttpProbe {
            url,
            socket: None,
            method: Method::Get,
            headers: Vec::new(),
            expect: Expect::default(),
            tls: None,
            keep_alive: true,
        };
        let r = String::from_utf8(request(&p)).unwrap();
        assert!(!r.to_ascii_lowercase().contains("connection"), "{r}");
        assert!(request_keeps_open(&p));
        p.headers = vec![("connection".into(), "Close".into())];
        assert!(!request_keeps_open(&p));
        p.keep_alive = false;
        p.headers.clear();
        assert!(String::from_utf8(request(&p))
            .unwrap()
            .contains("Connection: close\r\n"));
        assert!(!request_keeps_open(&p));
    }
}
