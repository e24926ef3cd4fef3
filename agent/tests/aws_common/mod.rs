//! The AWS stand-in for tests: a private `ministack` on 127.0.0.1, and SDK clients pointed at it.
//!
//! Fails closed: `Ministack::start` panics (the test fails, it is never skipped) when `ministack`
//! is not on PATH (CI installs it with `pip install ministack cbor2`), and every client and agent
//! it configures talks only to the loopback endpoint, with dummy static credentials and IMDS off.
//! `assert_loopback` refuses to go on if the endpoint is anything but a loopback URL.
//! Needs the `common` harness beside it (`mod common;` in the test crate).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const REGION: &str = "us-east-1";

/// A running ministack on 127.0.0.1:<port>; killed on drop.
pub struct Ministack {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    starts: u32,
    /// Extra settings of the stand-in (AUTH=true, MINISTACK_IMDS_V2_REQUIRED=1).
    settings: Vec<(String, String)>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Panics unless `url` is http(s) to 127.0.0.0/8, ::1 or localhost.
pub fn assert_loopback(url: &str) {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or_else(|| panic!("AWS_ENDPOINT_URL {url:?} is not an http URL; refusing to run"));
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = if let Some(h) = host.strip_prefix('[') {
        h.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    let ok = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    assert!(
        ok,
        "AWS_ENDPOINT_URL {url:?} is not a loopback URL; refusing to run tests against it"
    );
}

impl Ministack {
    pub fn start() -> Ministack {
        Ministack::start_with(&[])
    }

    /// With ministack settings, e.g. `("AUTH", "true")`: SigV4 signatures verified against its
    /// root key `test`/`test`.
    pub fn start_with(settings: &[(&str, &str)]) -> Ministack {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join("ministack").is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "`ministack` is not on PATH: the AWS tests need it. Install it with `pip install ministack cbor2` (bash .ci/run does)."
        );
        let mut m = Ministack {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
            starts: 0,
            settings: settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        m.resume();
        m
    }

    pub fn endpoint(&self) -> String {
        let url = format!("http://127.0.0.1:{}", self.port);
        assert_loopback(&url);
        url
    }

    /// The environment an agent or client needs to reach this stand-in and nothing else.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_SESSION_TOKEN", "test".into()),
            ("AWS_REGION", REGION.into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
            ("AWS_CONFIG_FILE", "/dev/null".into()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
            ("AWS_PROFILE", "default".into()),
        ]
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        for i in 1..=self.starts {
            s += &std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
        }
        s
    }

    fn log_path(&self, n: u32) -> PathBuf {
        self.dir.path().join(format!("ministack-{n}.log"))
    }

    /// Starts (again) on the same port, with empty state; waits for /_localstack/health.
    pub fn resume(&mut self) {
        assert!(self.child.is_none());
        self.starts += 1;
        let log = std::fs::File::create(self.log_path(self.starts)).unwrap();
        let child = Command::new("ministack")
            .env("BIND_HOST", "127.0.0.1")
            .env("GATEWAY_PORT", self.port.to_string())
            .env("MINISTACK_HOST", "127.0.0.1")
            .envs(self.settings.iter().map(|(k, v)| (k, v)))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start ministack");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while crate::common::http_get(self.port, "/_localstack/health")
            .is_none_or(|(s, _)| s != 200)
        {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "ministack exited ({st}) before it was ready:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "ministack not ready in 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops it (an AWS outage); `resume` brings it back with empty state.
    pub fn pause(&mut self) {
        if let Some(mut c) = self.child.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(-(c.id() as i32)),
                nix::sys::signal::Signal::SIGKILL,
            )
            .ok();
            let _ = c.wait();
        }
        // Wait until the port refuses connections.
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Freezes it (SIGSTOP): connections are accepted by the kernel and never answered, the
    /// way a blackholed endpoint or a hung load balancer behaves. `unstall` thaws it.
    pub fn stall(&self) {
        if let Some(c) = &self.child {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(-(c.id() as i32)),
                nix::sys::signal::Signal::SIGSTOP,
            )
            .ok();
        }
    }

    pub fn unstall(&self) {
        if let Some(c) = &self.child {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(-(c.id() as i32)),
                nix::sys::signal::Signal::SIGCONT,
            )
            .ok();
        }
    }

    /// An SDK config for this stand-in (static dummy credentials, fixed region, loopback only).
    pub fn sdk_config(&self) -> aws_config::SdkConfig {
        let endpoint = self.endpoint();
        rt().block_on(async move {
            aws_config::defaults(aws_config::BehaviorVersion::latest())
                .endpoint_url(endpoint)
                .region(aws_config::Region::new(REGION))
                .credentials_provider(aws_sdk_cloudwatch::config::Credentials::new(
                    "test", "test", None, None, "static",
                ))
                .load()
                .await
        })
    }
}

impl Ministack {
    /// An IAM user allowed everything, and its access key and secret. Under AUTH=true ministack
    /// verifies the SigV4 signature of such a key's requests (it does not for its root key
    /// `test`, which these set-up calls use).
    pub fn iam_user_keys(&self, user: &str) -> (String, String) {
        let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#;
        let enc = |s: &str| {
            s.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect::<String>()
        };
        self.iam(&format!("Action=CreateUser&UserName={user}"));
        self.iam(&format!(
            "Action=PutUserPolicy&UserName={user}&PolicyName=all&PolicyDocument={}",
            enc(policy)
        ));
        let reply = self.iam(&format!("Action=CreateAccessKey&UserName={user}"));
        let field = |tag: &str| {
            let open = format!("<{tag}>");
            let start = reply
                .find(&open)
                .unwrap_or_else(|| panic!("no {tag} in {reply}"))
                + open.len();
            reply[start..start + reply[start..].find('<').unwrap()].to_string()
        };
        (field("AccessKeyId"), field("SecretAccessKey"))
    }

    fn iam(&self, params: &str) -> String {
        let body = format!("{params}&Version=2010-05-08");
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "POST / HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/x-www-form-urlencoded\r\nAuthorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=0\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.port,
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "IAM {params}: {out}");
        out
    }
}

impl Drop for Ministack {
    fn drop(&mut self) {
        self.pause();
    }
}

use std::os::unix::process::CommandExt;

/// A current-thread runtime for test-side SDK calls.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A tiny HTTP server on 127.0.0.1 that records every POST body (an SNS HTTP subscriber).
pub struct Receiver {
    pub port: u16,
    pub bodies: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Receiver {
    pub fn start() -> Receiver {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let b = bodies.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { continue };
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                let mut raw = Vec::new();
                let mut buf = [0u8; 8192];
                // Read headers, then Content-Length bytes of body.
                let body = loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break None,
                        Ok(n) => raw.extend_from_slice(&buf[..n]),
                    }
                    let text = String::from_utf8_lossy(&raw).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            break Some(body.to_string());
                        }
                    }
                };
                let _ = c.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                if let Some(body) = body {
                    b.lock().unwrap().push(body);
                }
            }
        });
        Receiver { port, bodies }
    }

    pub fn bodies(&self) -> Vec<serde_json::Value> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .filter_map(|b| serde_json::from_str(b).ok())
            .collect()
    }
}

/// A CloudWatch that refuses what AWS refuses and ministack accepts: a proxy on 127.0.0.1 in
/// front of a ministack that answers every PutMetricData holding `marker` (a datum no local
/// check can catch) with AWS's whole-request refusal (400 InvalidParameterValue) and forwards
/// the rest, byte for byte, to ministack. Records when each PutMetricData arrived.
pub struct RefusingProxy {
    pub port: u16,
    calls: std::sync::Arc<std::sync::Mutex<Vec<Instant>>>,
}

impl RefusingProxy {
    pub fn start(upstream: u16, marker: &'static str) -> RefusingProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let c = calls.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let Some(raw) = read_request(&mut conn) else {
                    continue;
                };
                let text = String::from_utf8_lossy(&raw);
                if text.contains("Action=PutMetricData") {
                    c.lock().unwrap().push(Instant::now());
                }
                if text.contains(marker) {
                    let body = "<ErrorResponse><Error><Type>Sender</Type><Code>InvalidParameterValue</Code><Message>The value for parameter MetricData.member.1.Dimensions.member.1.Value is invalid.</Message></Error></ErrorResponse>";
                    let _ = write!(
                        conn,
                        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    continue;
                }
                let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let _ = up.set_read_timeout(Some(Duration::from_secs(10)));
                if up.write_all(&raw).is_ok() {
                    let mut reply = Vec::new();
                    let _ = up.read_to_end(&mut reply);
                    let _ = conn.write_all(&reply);
                }
            }
        });
        RefusingProxy { port, calls }
    }

    pub fn endpoint(&self) -> String {
        let url = format!("http://127.0.0.1:{}", self.port);
        assert_loopback(&url);
        url
    }

    /// The PutMetricData requests of each flush before `until`: requests less than `gap` apart
    /// are one burst.
    pub fn bursts(&self, gap: Duration, until: Instant) -> Vec<usize> {
        let all = self.calls.lock().unwrap();
        let calls: Vec<Instant> = all.iter().copied().filter(|t| *t < until).collect();
        let mut out: Vec<usize> = Vec::new();
        for (i, t) in calls.iter().enumerate() {
            match i.checked_sub(1).map(|p| t.duration_since(calls[p])) {
                Some(d) if d < gap => *out.last_mut().unwrap() += 1,
                _ => out.push(1),
            }
        }
        out
    }
}

/// One whole HTTP request (head and Content-Length body), as sent.
fn read_request(conn: &mut TcpStream) -> Option<Vec<u8>> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let n = conn.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
        let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if raw.len() >= end + 4 + len {
            return Some(raw);
        }
    }
}
