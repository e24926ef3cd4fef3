//! Metrics, events and alerts to CloudWatch, CloudWatch Logs and SNS, with nothing lost.
//!
//! Runs only with an `[aws]` section. The monitoring threads stay synchronous: they record into
//! a `Recorder` (a short mutex, no I/O) and the event log forwards to it. One `sink` thread (a
//! plain std thread) takes what was recorded every `flush_interval`, encodes it (`metrics`,
//! `logs`, `alerts`: pure, unit-tested against AWS's documented limits), buffers it (`spool`:
//! bounded, spilled to the state directory) and delivers it in order, exactly once.
//!
//! No AWS SDK: `client` makes the handful of calls (awsquery and JSON 1.1 over `crate::net`),
//! signed by `sigv4`, with credentials from `creds` (environment, shared files, ECS, IMDSv2 via
//! `imds`).

pub mod alerts;
pub mod bisect;
pub mod client;
pub mod creds;
pub mod imds;
pub mod logs;
pub mod metrics;
pub mod names;
pub mod recorder;
pub mod sigv4;
pub mod sink;
pub mod spool;

pub use recorder::Recorder;
pub use sink::{Sink, SinkOptions};

/// Cuts `s` to at most `max` bytes, on a char boundary (a multi-byte char at the cut goes).
pub fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut at = max;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
}

/// Environments for the unit tests of `creds`, `client` and `sink`.
#[cfg(test)]
pub(crate) mod test_env {
    /// An environment holding exactly `vars`.
    pub fn of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + Send + 'static {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    /// One request as a test server saw it: the head (request line and headers, header names
    /// lower-cased) and the body.
    pub struct Seen {
        pub head: String,
        pub body: String,
    }

    impl Seen {
        /// The value of header `name` (lower case), if sent.
        pub fn header(&self, name: &str) -> Option<&str> {
            self.head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k == name).then(|| v.trim())
            })
        }
    }

    /// A reply: status line text (`"400 Bad Request"`), extra headers, body.
    pub type Answer = (&'static str, Vec<(&'static str, String)>, String);

    /// A loopback HTTP/1.1 server for the unit tests that need replies ministack cannot give
    /// (refusals AWS makes and it does not, a skewed `Date`, odd bodies). Reads each request
    /// whole (by Content-Length, as the agent's client sends one request per connection) and
    /// answers `answer(&request)`. Returns the endpoint URL.
    pub fn server(answer: impl Fn(&Seen) -> Answer + Send + 'static) -> String {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ep = format!("http://127.0.0.1:{}", l.local_addr().unwrap().port());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { break };
                s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                    .ok();
                let mut raw = Vec::new();
                let mut buf = [0u8; 65536];
                let seen = loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break None,
                        Ok(n) => raw.extend_from_slice(&buf[..n]),
                    }
                    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head: String = String::from_utf8_lossy(&raw[..end])
                        .lines()
                        .map(|l| match l.split_once(':') {
                            Some((k, v)) => format!("{}:{v}", k.to_ascii_lowercase()),
                            None => l.to_string(),
                        })
                        .collect::<Vec<_>>()
                        .join("\n");
                    let mut seen = Seen {
                        head,
                        body: String::new(),
                    };
                    let len: usize = seen
                        .header("content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    if raw.len() >= end + 4 + len {
                        seen.body = String::from_utf8_lossy(&raw[end + 4..end + 4 + len]).into();
                        break Some(seen);
                    }
                };
                let Some(seen) = seen else { continue };
                let (status, headers, body) = answer(&seen);
                let mut out = format!("HTTP/1.1 {status}\r\n");
                for (k, v) in headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str(&format!(
                    "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                ));
                let _ = s.write_all(out.as_bytes());
            }
        });
        ep
    }

    /// An HTTP `Date` (IMF-fixdate) of epoch ms.
    pub fn http_date(ms: u64) -> String {
        const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
        const MONTHS: [&str; 12] = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let iso = crate::clock::rfc3339(ms);
        let (y, mo, d) = (&iso[0..4], &iso[5..7], &iso[8..10]);
        let month = MONTHS[mo.parse::<usize>().unwrap() - 1];
        let weekday = DAYS[(ms / 86_400_000 % 7) as usize];
        format!("{weekday}, {d} {month} {y} {} GMT", &iso[11..19])
    }

    /// Static test keys for an endpoint on the loopback, and no profile files.
    pub fn static_keys(endpoint: &str) -> impl Fn(&str) -> Option<String> + Send + 'static {
        of(&[
            ("AWS_ENDPOINT_URL", endpoint),
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("AWS_CONFIG_FILE", "/dev/null"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
        ])
    }
}
