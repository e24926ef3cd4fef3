//! EC2's instance metadata service, IMDSv2 only: a session token from `PUT /latest/api/token`
//! (6-hour TTL, fetched again before it lapses), then GETs carrying it. Gives the instance id,
//! the region and the instance profile's credentials.
//!
//! Off when `AWS_EC2_METADATA_DISABLED=true`; the endpoint is `AWS_EC2_METADATA_SERVICE_ENDPOINT`
//! or `http://169.254.169.254`. Short timeouts: off EC2 nothing answers there.

use std::time::{Duration, Instant};

use super::creds::{parse_credentials_doc, Credentials};
use crate::clock;
use crate::net::{self, Limits, Request, Url};

const TOKEN_TTL_S: u64 = 21_600;

pub struct Imds {
    base: String,
    token: Option<(String, u64)>,
    /// The end of the caller's time (a credentials fetch inside a call), if it set one.
    until: Option<Instant>,
}

impl Imds {
    /// The client the environment asks for, or `None` when IMDS is disabled.
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Option<Imds> {
        if env("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return None;
        }
        let base = env("AWS_EC2_METADATA_SERVICE_ENDPOINT")
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| "http://169.254.169.254".into());
        Some(Imds {
            base: base.trim().trim_end_matches('/').to_string(),
            token: None,
            until: None,
        })
    }

    /// 2 s a request, less when the caller's time ends sooner.
    fn limits(&self) -> Result<Limits, String> {
        let mut total = Duration::from_secs(2);
        if let Some(until) = self.until {
            total = total.min(until.saturating_duration_since(Instant::now()));
        }
        if total < Duration::from_millis(50) {
            return Err("IMDS: timed out".into());
        }
        Ok(Limits {
            connect: Duration::from_secs(1).min(total),
            total,
            max_body: 64 * 1024,
        })
    }

    fn url(&self, path: &str) -> Result<Url, String> {
        Url::parse(&format!("{}{path}", self.base))
            .map_err(|e| format!("AWS_EC2_METADATA_SERVICE_ENDPOINT: {e}"))
    }

    fn token(&mut self) -> Result<String, String> {
        let now = clock::wall_ms();
        if let Some((t, until)) = &self.token {
            if now < *until {
                return Ok(t.clone());
            }
        }
        let url = self.url("/latest/api/token")?;
        let ttl = TOKEN_TTL_S.to_string();
        let reply = net::send(
            &Request {
                method: "PUT",
                url: &url,
                headers: &[("X-aws-ec2-metadata-token-ttl-seconds", &ttl)],
                body: b"",
            },
            &self.limits()?,
        )
        .and_then(net::Reply::whole)
        .map_err(|e| format!("IMDSv2 token: {e}"))?;
        if reply.status != 200 {
            return Err(format!("IMDSv2 token: HTTP {}", reply.status));
        }
        let t = String::from_utf8_lossy(&reply.body).trim().to_string();
        // It goes into a header: only printable ASCII is cached and sent.
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("IMDSv2 token: not printable ASCII".into());
        }
        // Fetched again a minute before it lapses.
        self.token = Some((t.clone(), now + (TOKEN_TTL_S - 60) * 1000));
        Ok(t)
    }

    /// GET `path` with the session token (a token the service no longer knows is fetched once
    /// more).
    pub fn get(&mut self, path: &str) -> Result<String, String> {
        for attempt in 0..2 {
            let token = self.token()?;
            let url = self.url(path)?;
            let reply = net::send(
                &Request {
                    method: "GET",
                    url: &url,
                    headers: &[("X-aws-ec2-metadata-token", &token)],
                    body: b"",
                },
                &self.limits()?,
            )
            .and_then(net::Reply::whole);
            let reply = match reply {
                Ok(r) => r,
                Err(e) => {
                    // A new token next time: the service may have restarted.
                    self.token = None;
                    return Err(format!("IMDS {path}: {e}"));
                }
            };
            match reply.status {
                200 => return Ok(String::from_utf8_lossy(&reply.body).trim().to_string()),
                401 if attempt == 0 => self.token = None,
                s => return Err(format!("IMDS {path}: HTTP {s}")),
            }
        }
        Err(format!("IMDS {path}: token refused"))
    }

    pub fn instance_id(&mut self) -> Option<String> {
        self.get("/latest/meta-data/instance-id")
            .ok()
            .filter(|s| !s.is_empty())
    }

    pub fn region(&mut self) -> Option<String> {
        self.get("/latest/meta-data/placement/region")
            .ok()
            .filter(|s| !s.is_empty())
    }

    /// The instance profile's role credentials, within `budget`.
    pub fn role_credentials(&mut self, budget: Duration) -> Result<Credentials, String> {
        self.until = Some(Instant::now() + budget);
        let r = self.fetch_role_credentials();
        self.until = None;
        r
    }

    /// The role is listed at every refresh (an instance profile can be replaced while the
    /// instance runs), so a 404 for a role name that was just listed is final.
    fn fetch_role_credentials(&mut self) -> Result<Credentials, String> {
        let list = self.get("/latest/meta-data/iam/security-credentials/")?;
        let role = list
            .lines()
            .next()
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .ok_or("the instance has no instance profile (IAM role)")?
            .to_string();
        let doc = self.get(&format!(
            "/latest/meta-data/iam/security-credentials/{role}"
        ))?;
        parse_credentials_doc(doc.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A loopback IMDS stand-in whose answers change with `phase`: phase 0 hands out a token
    /// with a NUL and lists roleA; phase 1 a good token; phase 2 the instance profile is roleB.
    fn imds(phase: Arc<AtomicUsize>) -> Imds {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ep = format!("http://127.0.0.1:{}", l.local_addr().unwrap().port());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { break };
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let p = phase.load(Ordering::SeqCst);
                let body: Option<&str> = if req.starts_with("PUT ") {
                    Some(if p == 0 { "tok\u{0}bad" } else { "GOOD" })
                } else if req.contains("security-credentials/ ") {
                    Some(if p < 2 { "roleA" } else { "roleB" })
                } else if req.contains("/roleB ") || (p < 2 && req.contains("/roleA ")) {
                    Some(
                        r#"{"Code":"Success","AccessKeyId":"ASIA","SecretAccessKey":"s","Token":"t"}"#,
                    )
                } else {
                    None
                };
                let _ = match body {
                    Some(b) => write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{b}",
                        b.len()
                    ),
                    None => write!(s, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
                };
            }
        });
        let env = move |k: &str| (k == "AWS_EC2_METADATA_SERVICE_ENDPOINT").then(|| ep.clone());
        Imds::from_env(&env).unwrap()
    }

    #[test]
    fn a_bad_token_is_not_cached_and_a_replaced_role_is_found() {
        let phase = Arc::new(AtomicUsize::new(0));
        let mut i = imds(phase.clone());
        let budget = Duration::from_secs(2);
        let e = i.role_credentials(budget).unwrap_err();
        assert!(e.contains("not printable ASCII"), "{e}");
        phase.store(1, Ordering::SeqCst);
        assert!(
            i.role_credentials(budget).is_ok(),
            "the bad token was cached"
        );
        phase.store(2, Ordering::SeqCst);
        assert!(i.role_credentials(budget).is_ok(), "the old role was kept");
    }
}
