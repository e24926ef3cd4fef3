//! The few AWS calls the sink makes, over `crate::net`: signed (SigV4), retried, with deadlines.
//!
//! Protocols, each served by both AWS and the ministack stand-in: CloudWatch, SNS and STS speak
//! awsquery (a form-encoded POST, XML replies); CloudWatch Logs speaks JSON 1.1
//! (`X-Amz-Target: Logs_20140328.<Operation>`).
//!
//! Contract:
//! - Every request: connect timeout 1 s; each attempt at most 6 s; the whole call (retries
//!   included) within `op_timeout` (below the flush interval) and within any deadline the caller
//!   set (the stop flush's).
//! - Up to 3 attempts, exponential backoff with full jitter (100 ms base, 2 s cap), only for
//!   throttling, 5xx and transport errors. Everything else comes back at once, classified.
//! - AWS's time, not ours, wherever AWS judges it: the offset of AWS's clock is learnt from the
//!   `Date` of its replies (a refused skewed signature is retried once with it) and applied to
//!   every signature and, through the body builders (`query_at`, `logs_at`), to every timestamp
//!   a request carries, rebuilt for each attempt. `aws_time` gives the rest of the sink the same
//!   clock.
//! - Errors and logs never carry a secret: URLs are shown redacted, credentials not at all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::creds::{CredsError, Env, Provider, SharedFiles};
use super::imds::Imds;
use super::sigv4::{self, Scope, Signable};
use crate::clock;
use crate::net::{self, Limits, NetError, Request, Url};

/// The services the agent talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    CloudWatch,
    Logs,
    Sns,
    Sts,
}

impl Service {
    /// The SigV4 signing name, also the endpoint's host prefix.
    pub fn signing_name(self) -> &'static str {
        match self {
            Service::CloudWatch => "monitoring",
            Service::Logs => "logs",
            Service::Sns => "sns",
            Service::Sts => "sts",
        }
    }

    /// The service's own `AWS_ENDPOINT_URL_<ID>` variable.
    fn endpoint_var(self) -> &'static str {
        match self {
            Service::CloudWatch => "AWS_ENDPOINT_URL_CLOUDWATCH",
            Service::Logs => "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS",
            Service::Sns => "AWS_ENDPOINT_URL_SNS",
            Service::Sts => "AWS_ENDPOINT_URL_STS",
        }
    }
}

/// The endpoint of `service`: the service's variable, else `AWS_ENDPOINT_URL`, else
/// `https://<service>.<region>.amazonaws.com` (`.amazonaws.com.cn` in China regions).
pub fn endpoint(
    service: Service,
    region: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Url, String> {
    let set = |v: &str| env(v).filter(|s| !s.trim().is_empty());
    let var = if set(service.endpoint_var()).is_some() {
        service.endpoint_var()
    } else {
        "AWS_ENDPOINT_URL"
    };
    if let Some(u) = set(var) {
        let u = Url::parse(u.trim()).map_err(|e| format!("{var}: {e}"))?;
        if !u.https && !u.is_loopback() {
            return Err(format!("{var} {} is plain http to a host that is not loopback: the request and its session token would cross the network in clear; use https", u.redacted()));
        }
        if u.target.contains('?') {
            return Err(format!(
                "{var} {} has a query string, which AWS endpoints do not take; remove it",
                u.redacted()
            ));
        }
        return Ok(u);
    }
    let suffix = if region.starts_with("cn-") {
        "amazonaws.com.cn"
    } else {
        "amazonaws.com"
    };
    Url::parse(&format!(
        "https://{}.{region}.{suffix}/",
        service.signing_name()
    ))
}

/// The region, first found: the config, AWS_REGION, AWS_DEFAULT_REGION, the profile, IMDS.
pub fn resolve_region(
    configured: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
    files: &SharedFiles,
    imds: Option<&mut Imds>,
) -> Option<String> {
    let nonempty = |s: String| Some(s.trim().to_string()).filter(|s| !s.is_empty());
    configured
        .map(str::to_string)
        .or_else(|| env("AWS_REGION").and_then(nonempty))
        .or_else(|| env("AWS_DEFAULT_REGION").and_then(nonempty))
        .or_else(|| files.region().and_then(nonempty))
        .or_else(|| imds.and_then(|i| i.region()))
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq)]
pub enum CallError {
    /// AWS answered with an error.
    Service {
        status: u16,
        code: String,
        message: String,
    },
    /// No answer: resolve, connect, TLS, timeout, a broken reply.
    Transport(String),
    Credentials(CredsError),
    /// The caller's deadline passed before the call could finish.
    Deadline,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Service {
                status,
                code,
                message,
            } => write!(f, "{code}: {message} (HTTP {status})"),
            CallError::Transport(e) => write!(f, "connection failed: {e}"),
            CallError::Credentials(e) => write!(f, "{e}"),
            CallError::Deadline => write!(f, "timed out"),
        }
    }
}

const THROTTLING: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
];

const EXPIRED: &[&str] = &["ExpiredToken", "ExpiredTokenException", "RequestExpired"];

impl CallError {
    /// The service's error code, if AWS answered.
    pub fn code(&self) -> Option<&str> {
        match self {
            CallError::Service { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Worth another attempt now: throttling, a 5xx, or no answer at all.
    pub fn retryable(&self) -> bool {
        match self {
            CallError::Service { status, code, .. } => {
                *status >= 500 || *status == 429 || THROTTLING.contains(&code.as_str())
            }
            CallError::Transport(_) => true,
            CallError::Credentials(_) | CallError::Deadline => false,
        }
    }

    /// AWS refused the signature's time (the clock here is off by more than 5 minutes).
    pub fn is_skew(&self) -> bool {
        match self {
            CallError::Service { code, message, .. } => {
                code == "RequestTimeTooSkewed"
                    || message.contains("Signature expired")
                    || message.contains("Signature not yet current")
            }
            _ => false,
        }
    }

    /// An error AWS will repeat for the same request (malformed or invalid): retrying the batch
    /// would block the queue forever, so the sink drops and counts it. Throttling, expired or
    /// missing credentials, access denied, 5xx and transport errors are not: the data is kept.
    pub fn is_refused(&self) -> bool {
        const REFUSED: &[&str] = &[
            "InvalidParameterValue",
            "InvalidParameterValueException",
            "InvalidParameterCombination",
            "InvalidParameterCombinationException",
            "InvalidParameter",
            "InvalidParameterException",
            "MissingParameter",
            "MissingRequiredParameterException",
            "ValidationError",
            "ValidationException",
            "SerializationException",
            "MalformedQueryString",
        ];
        match self {
            CallError::Service { status, code, .. } => {
                *status < 500 && REFUSED.contains(&code.as_str())
            }
            _ => false,
        }
    }
}

/// The error in an AWS reply: awsquery's XML `<Code>`/`<Message>` or JSON's `__type`/`message`.
pub fn parse_error(status: u16, body: &[u8], header_type: Option<&str>) -> CallError {
    let text = String::from_utf8_lossy(body);
    let (mut code, mut message) = (None, None);
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        code = s("__type").or_else(|| s("code"));
        message = s("message").or_else(|| s("Message"));
    } else if text.trim_start().starts_with('<') {
        code = xml_text(&text, "Code");
        message = xml_text(&text, "Message");
    }
    let code = code
        .or_else(|| header_type.map(str::to_string))
        .unwrap_or_else(|| format!("HTTP{status}"));
    // `com.amazonaws.logs#ThrottlingException` or `ThrottlingException:http://...`.
    let code = code
        .rsplit('#')
        .next()
        .unwrap_or("")
        .split(':')
        .next()
        .unwrap_or("")
        .to_string();
    let mut message = message.unwrap_or_default();
    super::cut(&mut message, 300);
    CallError::Service {
        status,
        code,
        message,
    }
}

/// The text of the first `<tag>` element of an XML reply, entities decoded.
pub fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&format!("</{tag}>"))?;
    let raw = xml[start..end].trim();
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let Some(semi) = tail.find(';') else {
            out.push_str(tail);
            return Some(out);
        };
        let decoded = match &tail[1..semi] {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            e => e
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| e.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &tail[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    Some(out)
}

/// Epoch ms of an HTTP `Date` (IMF-fixdate, `Mon, 30 Nov 2026 12:40:00 GMT`).
pub fn parse_http_date(s: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mut f = s.split_whitespace().skip(1);
    let day: i64 = f.next()?.parse().ok()?;
    let month = f.next()?;
    let month = MONTHS.iter().position(|m| *m == month)? as i64 + 1;
    let year: i64 = f.next()?.parse().ok()?;
    let mut hms = f.next()?.split(':').map(|p| p.parse::<i64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    // Bounded before any arithmetic: a reply's odd `Date` (year 99999999999) must not overflow.
    let fields_ok = (1970..=9999).contains(&year)
        && (1..=31).contains(&day)
        && (0..=23).contains(&h)
        && (0..=59).contains(&m)
        && (0..=60).contains(&sec);
    if f.next()? != "GMT" || !fields_ok {
        return None;
    }
    let days = clock::days_from_civil(year, month, day);
    u64::try_from((days * 86_400 + h * 3_600 + m * 60 + sec) * 1_000).ok()
}

/// An awsquery body: `Action=...&Version=...&k=v...`, form-encoded.
pub fn query_body(action: &str, version: &str, params: &[(String, String)]) -> String {
    let mut s = format!("Action={action}&Version={version}");
    for (k, v) in params {
        s.push('&');
        s.push_str(&sigv4::uri_encode(k, false));
        s.push('=');
        s.push_str(&sigv4::uri_encode(v, false));
    }
    s
}

/// Backoff before attempt `attempt + 1` (0-based): full jitter over 100 ms * 2^attempt, 2 s cap.
pub fn backoff(attempt: u32, random: u32) -> Duration {
    let cap = (100u64 << attempt.min(5)).min(2_000);
    Duration::from_millis(u64::from(random) % (cap + 1))
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // A failed read only makes the jitter predictable.
    let _ = aws_lc_rs::rand::fill(&mut b);
    u32::from_le_bytes(b)
}

/// One sink's connection to AWS.
pub struct Aws {
    pub region: String,
    /// Whether the region was found (config, environment, profile or IMDS); else us-east-1.
    pub region_found: bool,
    endpoints: [Result<Url, String>; 4],
    creds: Provider,
    op_timeout: Duration,
    /// The stop deadline (`clock::mono_now` ms, 0 = none), shared with whoever stops the sink:
    /// every call and every attempt reads it, so a stop shortens the call in flight.
    stop_at: Arc<AtomicU64>,
    /// AWS's time minus ours (ms), learnt from the `Date` of its replies.
    skew_ms: i64,
    /// AWS's time minus ours (ms) by the `Date` of the last reply that refused a skewed
    /// signature.
    refused_skew_ms: Option<i64>,
}

/// Offsets below this are not learnt from a successful reply: `Date` has whole seconds and the
/// reply takes time to arrive, so a clock in sync reads as up to about 2 s off.
pub const SKEW_TOLERANCE_MS: i64 = 5_000;
/// The furthest an accepted reply's `Date` moves the clock offset in one step (AWS's window for a
/// signed request's time, which a real AWS enforces).
const MAX_LEARNT_SKEW_MS: i64 = 15 * 60_000;

const MAX_ATTEMPTS: u32 = 3;
pub const NO_REGION: &str = "no AWS region: set `region` in [aws], AWS_REGION, or the profile's region (on EC2 the instance metadata gives it)";
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(6);
const MAX_REPLY: usize = 1024 * 1024;

impl Aws {
    /// The client for this environment. `op_timeout` bounds a call with its retries.
    pub fn new(
        configured_region: Option<&str>,
        env: Env,
        mut imds: Option<Imds>,
        op_timeout: Duration,
    ) -> Aws {
        let files = SharedFiles::load(&*env);
        let found = resolve_region(configured_region, &*env, &files, imds.as_mut());
        let region = found.clone().unwrap_or_else(|| "us-east-1".into());
        let endpoints = [
            Service::CloudWatch,
            Service::Logs,
            Service::Sns,
            Service::Sts,
        ]
        .map(|s| {
            // As with the SDK, no region is an error on every call, not a guess.
            match found {
                Some(_) => endpoint(s, &region, &*env),
                None => Err(NO_REGION.to_string()),
            }
        });
        Aws {
            region,
            region_found: found.is_some(),
            endpoints,
            creds: Provider::new(env, imds),
            op_timeout,
            stop_at: Arc::new(AtomicU64::new(0)),
            skew_ms: 0,
            refused_skew_ms: None,
        }
    }

    /// Every call, and every attempt of a call in flight, ends by the deadline in `stop_at`
    /// (`clock::mono_now` ms; 0 = none), which the stopping thread sets.
    pub fn share_deadline(&mut self, stop_at: Arc<AtomicU64>) {
        self.stop_at = stop_at;
    }

    /// AWS's time minus ours (ms), as far as its replies told (0 until one did).
    pub fn skew_ms(&self) -> i64 {
        self.skew_ms
    }

    /// Our time `ms` (epoch ms of this machine's clock) on AWS's clock.
    pub fn aws_time(&self, ms: u64) -> u64 {
        ms.saturating_add_signed(self.skew_ms)
    }

    /// After AWS said the signing time is off: the offset to its `Date`, applied to every later
    /// signature and timestamp; whether to retry at once.
    fn correct_skew(&mut self, e: &CallError) -> bool {
        let Some(skew) = self.refused_skew_ms.take() else {
            return false;
        };
        if !e.is_skew() || (skew - self.skew_ms).abs() < 1_000 {
            return false;
        }
        tracing::warn!(message = "The clock differs from AWS's; signing and timestamping with AWS's time.", skew_ms = skew, error = %e);
        self.skew_ms = skew;
        true
    }

    /// A successful reply's `Date`: an offset beyond the tolerance is AWS's time from now on
    /// (AWS accepts signatures up to 5 minutes off, but a datum stamped minutes off lands in
    /// the wrong period of every alarm); a clock put right again is followed back.
    fn observe_date(&mut self, skew: Option<i64>) {
        let Some(skew) = skew else { return };
        if (skew - self.skew_ms).abs() < SKEW_TOLERANCE_MS {
            return;
        }
        // AWS refuses a signature more than 15 minutes off its clock (then `correct_skew` learns
        // from the refusal). An endpoint that accepted one further off checks no signatures (a
        // proxy, a stand-in) and its Date says nothing about AWS's time: not followed.
        if skew.abs() > MAX_LEARNT_SKEW_MS && (skew - self.skew_ms).abs() > MAX_LEARNT_SKEW_MS {
            return;
        }
        let skew = if skew.abs() < SKEW_TOLERANCE_MS {
            0
        } else {
            skew
        };
        tracing::warn!(
            message = "The clock differs from AWS's; timestamping with AWS's time.",
            skew_ms = skew
        );
        self.skew_ms = skew;
    }

    /// `until`, or earlier when a stop deadline is set.
    fn bounded(&self, until: Instant) -> Instant {
        match self.stop_at.load(Ordering::SeqCst) {
            0 => until,
            at => {
                let left = at.saturating_sub(clock::mono_now());
                until.min(Instant::now() + Duration::from_millis(left))
            }
        }
    }

    /// Where `service`'s requests go, redacted (for the start-up log).
    pub fn endpoint_shown(&self, service: Service) -> String {
        match &self.endpoints[service as usize] {
            Ok(u) => u.redacted(),
            Err(e) => e.clone(),
        }
    }

    /// An awsquery call; the XML reply on success.
    pub fn query(
        &mut self,
        service: Service,
        action: &str,
        version: &str,
        params: &[(String, String)],
    ) -> Result<String, CallError> {
        let body = query_body(action, version, params).into_bytes();
        self.query_at(service, &|_| body.clone())
    }

    /// An awsquery call whose body carries times AWS judges: `body(skew_ms)` builds it
    /// (`query_body`) with AWS's offset as known at each attempt.
    pub fn query_at(
        &mut self,
        service: Service,
        body: &dyn Fn(i64) -> Vec<u8>,
    ) -> Result<String, CallError> {
        let headers = [(
            "Content-Type",
            "application/x-www-form-urlencoded; charset=utf-8",
        )];
        let reply = self.call(service, &headers, body)?;
        Ok(String::from_utf8_lossy(&reply).into_owned())
    }

    /// A CloudWatch Logs JSON 1.1 call; the JSON reply on success.
    pub fn logs(
        &mut self,
        operation: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, CallError> {
        self.logs_at(operation, &|_| body.clone())
    }

    /// A CloudWatch Logs call whose body carries times AWS judges (see `query_at`). A success
    /// whose reply is not JSON is still a success (`Null`): AWS took the request, and sending
    /// it again would deliver it twice.
    pub fn logs_at(
        &mut self,
        operation: &str,
        body: &dyn Fn(i64) -> serde_json::Value,
    ) -> Result<serde_json::Value, CallError> {
        let target = format!("Logs_20140328.{operation}");
        let headers = [
            ("Content-Type", "application/x-amz-json-1.1"),
            ("X-Amz-Target", target.as_str()),
        ];
        let reply = self.call(Service::Logs, &headers, &|skew| {
            body(skew).to_string().into_bytes()
        })?;
        if reply.iter().all(u8::is_ascii_whitespace) {
            return Ok(serde_json::Value::Null);
        }
        Ok(serde_json::from_slice(&reply).unwrap_or_else(|error| {
            tracing::warn!(message = "CloudWatch Logs accepted a request with a reply that is not JSON.", action = operation, %error);
            serde_json::Value::Null
        }))
    }

    /// Sends with retries until success, a final error, or the deadline. A refused skewed
    /// signature is retried at once, once per call (a reply whose `Date` keeps moving must not
    /// buy unlimited attempts).
    fn call(
        &mut self,
        service: Service,
        headers: &[(&str, &str)],
        body: &dyn Fn(i64) -> Vec<u8>,
    ) -> Result<Vec<u8>, CallError> {
        let url = self.endpoints[service as usize]
            .clone()
            .map_err(CallError::Transport)?;
        let until = Instant::now() + self.op_timeout;
        let mut attempt = 0;
        let mut skew_retried = false;
        loop {
            let left = self
                .bounded(until)
                .saturating_duration_since(Instant::now());
            if left < Duration::from_millis(50) {
                return Err(CallError::Deadline);
            }
            let body = body(self.skew_ms);
            let r = self.attempt(service, &url, headers, &body, left.min(ATTEMPT_TIMEOUT));
            let Err(e) = r else { return r };
            if self.correct_skew(&e) && !skew_retried {
                skew_retried = true;
                continue;
            }
            if e.code().is_some_and(|c| EXPIRED.contains(&c)) {
                self.creds.invalidate();
            }
            attempt += 1;
            if !e.retryable() || attempt >= MAX_ATTEMPTS {
                return Err(e);
            }
            let pause = backoff(attempt - 1, random_u32());
            if Instant::now() + pause >= self.bounded(until) {
                return Err(e);
            }
            std::thread::sleep(pause);
        }
    }

    fn attempt(
        &mut self,
        service: Service,
        url: &Url,
        headers: &[(&str, &str)],
        body: &[u8],
        total: Duration,
    ) -> Result<Vec<u8>, CallError> {
        // Fetching credentials gets what is left of the attempt.
        let creds = self
            .creds
            .get_within(total, self.skew_ms)
            .map_err(CallError::Credentials)?;
        let total = self
            .bounded(Instant::now() + total)
            .saturating_duration_since(Instant::now());
        if total < Duration::from_millis(50) {
            return Err(CallError::Deadline);
        }
        // `endpoint` refuses a query string: the target is the path.
        let host = url.authority();
        let amz_date = sigv4::amz_date(clock::wall_ms().saturating_add_signed(self.skew_ms));
        let scope = Scope {
            region: &self.region,
            service: service.signing_name(),
            amz_date: &amz_date,
        };
        let signed = sigv4::sign(
            &Signable {
                method: "POST",
                host: &host,
                path: &url.target,
                query: &[],
                headers,
                body,
            },
            &creds,
            &scope,
        );
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        all.extend(signed.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let limits = Limits {
            connect: Duration::from_secs(1),
            total,
            max_body: MAX_REPLY,
        };
        let reply = net::send(
            &Request {
                method: "POST",
                url,
                headers: &all,
                body,
            },
            &limits,
        )
        .and_then(net::Reply::whole)
        .map_err(transport)?;
        let skew = reply
            .header("date")
            .and_then(parse_http_date)
            .map(|server| server as i64 - clock::wall_ms() as i64);
        if (200..300).contains(&reply.status) {
            self.observe_date(skew);
            return Ok(reply.body);
        }
        let e = parse_error(reply.status, &reply.body, reply.header("x-amzn-errortype"));
        if e.is_skew() {
            self.refused_skew_ms = skew;
        }
        Err(e)
    }
}

fn transport(e: NetError) -> CallError {
    CallError::Transport(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::aws::test_env::of as env_of;

    #[test]
    fn endpoints_follow_the_region_and_the_overrides() {
        let none = env_of(&[]);
        let cw = endpoint(Service::CloudWatch, "eu-west-1", &none).unwrap();
        assert_eq!(
            (cw.https, cw.host.as_str(), cw.port),
            (true, "monitoring.eu-west-1.amazonaws.com", 443)
        );
        let logs = endpoint(Service::Logs, "cn-north-1", &none).unwrap();
        assert_eq!(logs.host, "logs.cn-north-1.amazonaws.com.cn");
        let env = env_of(&[
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:4566"),
            ("AWS_ENDPOINT_URL_SNS", "http://127.0.0.1:9999"),
        ]);
        assert_eq!(
            endpoint(Service::Sts, "us-east-1", &env).unwrap().port,
            4566
        );
        assert_eq!(
            endpoint(Service::Sns, "us-east-1", &env).unwrap().port,
            9999
        );
        assert!(endpoint(
            Service::Sts,
            "us-east-1",
            &env_of(&[("AWS_ENDPOINT_URL", "ftp://x")])
        )
        .is_err());
        let refused = |url: &str| {
            endpoint(
                Service::Sts,
                "us-east-1",
                &env_of(&[("AWS_ENDPOINT_URL", url)]),
            )
            .unwrap_err()
        };
        assert!(refused("http://10.9.8.7:4566").contains("plain http"));
        assert!(refused("http://127.0.0.1:4566/?tenant=a%20b").contains("query string"));
        let e = endpoint(
            Service::Sns,
            "us-east-1",
            &env_of(&[("AWS_ENDPOINT_URL_SNS", "http://sns.internal:80")]),
        )
        .unwrap_err();
        assert!(
            e.starts_with("AWS_ENDPOINT_URL_SNS http://sns.internal"),
            "{e}"
        );
        assert!(endpoint(
            Service::Sns,
            "us-east-1",
            &env_of(&[("AWS_ENDPOINT_URL", "https://10.9.8.7")])
        )
        .is_ok());
    }

    #[test]
    fn the_configured_region_wins_then_the_environment_then_the_profile() {
        let files = SharedFiles::load(&env_of(&[
            ("AWS_CONFIG_FILE", "/dev/null"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
        ]));
        let env = env_of(&[
            ("AWS_REGION", "eu-west-1"),
            ("AWS_DEFAULT_REGION", "us-west-2"),
        ]);
        assert_eq!(
            resolve_region(Some("ap-south-1"), &env, &files, None).as_deref(),
            Some("ap-south-1")
        );
        assert_eq!(
            resolve_region(None, &env, &files, None).as_deref(),
            Some("eu-west-1")
        );
        assert_eq!(
            resolve_region(
                None,
                &env_of(&[("AWS_DEFAULT_REGION", "us-west-2")]),
                &files,
                None
            )
            .as_deref(),
            Some("us-west-2")
        );
        assert_eq!(resolve_region(None, &env_of(&[]), &files, None), None);
    }

    #[test]
    fn xml_errors_are_classified_by_their_code() {
        // Verbatim from ministack's SNS (Publish to a missing topic).
        let body = br#"<ErrorResponse xmlns="http://sns.amazonaws.com/doc/2010-03-31/"><Error><Type>Sender</Type><Code>NotFound</Code><Message>Topic does not exist: arn:aws:sns:us-east-1:000000000000:nope</Message></Error><RequestId>757602a7-ff84-4d6f-8f5e-9135f5215ffa</RequestId></ErrorResponse>"#;
        let e = parse_error(404, body, None);
        assert_eq!(e.code(), Some("NotFound"));
        assert!(!e.is_refused() && !e.retryable());
        let bad = b"<ErrorResponse><Error><Code>InvalidParameterValue</Code><Message>a &lt; b &amp; c</Message></Error></ErrorResponse>";
        let e = parse_error(400, bad, None);
        assert!(e.is_refused() && !e.retryable());
        assert_eq!(e.to_string(), "InvalidParameterValue: a < b & c (HTTP 400)");
        let throttled = b"<ErrorResponse><Error><Code>Throttling</Code><Message>Rate exceeded</Message></Error></ErrorResponse>";
        let e = parse_error(400, throttled, None);
        assert!(e.retryable() && !e.is_refused());
    }

    #[test]
    fn json_errors_are_classified_by_their_type() {
        // Verbatim from ministack's CloudWatch Logs (CreateLogStream in a missing group).
        let e = parse_error(400, br#"{"__type": "ResourceNotFoundException", "message": "The specified log group does not exist: /g"}"#, None);
        assert_eq!(e.code(), Some("ResourceNotFoundException"));
        assert!(!e.is_refused() && !e.retryable());
        let e = parse_error(
            400,
            br#"{"__type":"com.amazonaws.logs#InvalidParameterException","message":"bad"}"#,
            None,
        );
        assert_eq!(e.code(), Some("InvalidParameterException"));
        assert!(e.is_refused());
        let e = parse_error(400, br#"{"__type":"ThrottlingException"}"#, None);
        assert!(e.retryable());
        let e = parse_error(503, b"Service Unavailable", None);
        assert_eq!(e.code(), Some("HTTP503"));
        assert!(e.retryable() && !e.is_refused());
        let e = parse_error(
            403,
            b"",
            Some("UnrecognizedClientException:http://internal.amazon.com/"),
        );
        assert_eq!(e.code(), Some("UnrecognizedClientException"));
        assert!(!e.retryable() && !e.is_refused());
        assert!(CallError::Transport("refused".into()).retryable());
    }

    #[test]
    fn a_long_error_message_is_cut_on_a_char_boundary() {
        // A 2-byte char across byte 300 once panicked the sink thread.
        let msg = format!("{}é tail", "a".repeat(299));
        let body = format!(r#"{{"__type":"InvalidParameterException","message":"{msg}"}}"#);
        match parse_error(400, body.as_bytes(), None) {
            CallError::Service { message, .. } => assert_eq!(message, "a".repeat(299)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn http_dates_parse() {
        assert_eq!(
            parse_http_date("Mon, 30 Nov 2026 12:40:00 GMT"),
            clock::parse_rfc3339("2026-11-30T12:40:00Z")
        );
        assert_eq!(parse_http_date("Mon, 30 Nov 2026 12:40:00 PST"), None);
        assert_eq!(parse_http_date("yesterday"), None);
    }

    #[test]
    fn an_odd_reply_date_is_ignored_not_a_panic() {
        // Each once overflowed (a panic in a debug build, a nonsense offset in a release one).
        for odd in [
            "Mon, 30 Nov 99999999999999 12:40:00 GMT",
            "Mon, 30 Nov -99999999999999 12:40:00 GMT",
            "Mon, 30 Nov 2026 -5:40:00 GMT",
            "Mon, 30 Nov 1969 23:59:59 GMT",
        ] {
            assert_eq!(parse_http_date(odd), None, "{odd}");
        }
    }

    /// A fake AWS whose clock is an hour ahead of ours (ministack does not check signing
    /// times): it refuses a signature more than 5 minutes off its time, as AWS does, with its
    /// `Date`; counts the requests.
    fn skewed_aws() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ep = format!("http://127.0.0.1:{}", l.local_addr().unwrap().port());
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { break };
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = [0u8; 65536];
                let n = s.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                let theirs = clock::wall_ms() + 3_600_000;
                let signed = req
                    .split("x-amz-date: ")
                    .nth(1)
                    .map(|v| v[..16].to_string())
                    .unwrap_or_default();
                let ok = signed == sigv4::amz_date(theirs).to_ascii_lowercase()[..16];
                let secs = theirs / 1000;
                let days = (secs / 86_400) as i64;
                let (y, m, d) = civil(days);
                let date = format!(
                    "Mon, {d:02} {} {y} {:02}:{:02}:{:02} GMT",
                    [
                        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
                        "Nov", "Dec"
                    ][m - 1],
                    secs / 3600 % 24,
                    secs / 60 % 60,
                    secs % 60
                );
                let (status, body) = if ok {
                    ("200 OK", "<PutMetricDataResponse/>".to_string())
                } else {
                    ("403 Forbidden", "<ErrorResponse><Error><Code>SignatureDoesNotMatch</Code><Message>Signature expired: 20261130T120000Z is now earlier than 20261130T122500Z (20261130T124000Z - 15 min.)</Message></Error></ErrorResponse>".to_string())
                };
                let _ = write!(s, "HTTP/1.1 {status}\r\nDate: {date}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            }
        });
        (ep, hits)
    }

    /// Year, month, day of a day count since 1970-01-01 (inverse of `days_from_civil`).
    fn civil(days: i64) -> (i64, usize, i64) {
        let mut d = 0;
        while clock::days_from_civil(2026, 1, 1) + d < days {
            d += 1;
        }
        let (mut y, mut m) = (2026, 1);
        loop {
            let next = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            if clock::days_from_civil(next.0, next.1, 1) > days {
                break;
            }
            (y, m) = next;
        }
        (y, m as usize, days - clock::days_from_civil(y, m, 1) + 1)
    }

    #[test]
    fn a_skewed_clock_is_corrected_from_the_reply_date_and_the_call_retried_once() {
        let (ep, hits) = skewed_aws();
        let env = crate::aws::test_env::static_keys(&ep);
        let mut aws = Aws::new(
            Some("us-east-1"),
            Box::new(env),
            None,
            Duration::from_secs(5),
        );
        let r = aws.query(Service::CloudWatch, "PutMetricData", "2010-08-01", &[]);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert!(aws
            .query(Service::CloudWatch, "PutMetricData", "2010-08-01", &[])
            .is_ok());
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            3,
            "the offset is kept"
        );
    }

    #[test]
    fn a_refusal_whose_date_keeps_moving_gets_one_retry_not_a_loop() {
        // An endpoint that refuses every signature as skewed, each time with a `Date` an hour
        // away on the other side: the skew never settles.
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        let ep = crate::aws::test_env::server(move |_| {
            let n = h.fetch_add(1, std::sync::atomic::Ordering::SeqCst) as u64;
            let now = clock::wall_ms();
            let theirs = if n.is_multiple_of(2) {
                now + 3_600_000
            } else {
                now - 3_600_000
            };
            (
                "403 Forbidden",
                vec![("Date", crate::aws::test_env::http_date(theirs))],
                "<ErrorResponse><Error><Code>RequestTimeTooSkewed</Code><Message>The difference between the request time and the current time is too large.</Message></Error></ErrorResponse>".into(),
            )
        });
        let env = crate::aws::test_env::static_keys(&ep);
        let mut aws = Aws::new(
            Some("us-east-1"),
            Box::new(env),
            None,
            Duration::from_secs(5),
        );
        let r = aws.query(Service::CloudWatch, "PutMetricData", "2010-08-01", &[]);
        assert!(r.as_ref().is_err_and(CallError::is_skew), "{r:?}");
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "requests for one call"
        );
    }

    #[test]
    fn the_offset_is_learnt_from_any_reply_beyond_the_tolerance_and_followed_back() {
        let offset = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(180_000));
        let o = offset.clone();
        let ep = crate::aws::test_env::server(move |_| {
            let theirs =
                clock::wall_ms().saturating_add_signed(o.load(std::sync::atomic::Ordering::SeqCst));
            (
                "200 OK",
                vec![("Date", crate::aws::test_env::http_date(theirs))],
                "<PutMetricDataResponse/>".into(),
            )
        });
        let env = crate::aws::test_env::static_keys(&ep);
        let mut aws = Aws::new(
            Some("us-east-1"),
            Box::new(env),
            None,
            Duration::from_secs(5),
        );
        let call = |aws: &mut Aws| {
            aws.query(Service::CloudWatch, "PutMetricData", "2010-08-01", &[])
                .unwrap();
            aws.skew_ms()
        };
        // 3 minutes: within what AWS accepts in a signature, yet a datum stamped on our clock
        // would land in the wrong minute of every alarm.
        assert!((call(&mut aws) - 180_000).abs() < 2_000);
        offset.store(1_500, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(call(&mut aws), 0, "a clock put right is followed back");
        offset.store(-2_500, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            call(&mut aws),
            0,
            "whole-second dates and latency are not skew"
        );
        // An endpoint that took a request signed days off its Date checks no signatures: its
        // clock is not AWS's, and the timestamps are not moved by it.
        offset.store(2 * 86_400_000, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(call(&mut aws), 0, "a Date days off on an accepted reply");
        offset.store(-40 * 365 * 86_400_000, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(call(&mut aws), 0, "a Date decades off on an accepted reply");
    }

    #[test]
    fn query_bodies_are_form_encoded() {
        let b = query_body(
            "Publish",
            "2010-03-31",
            &[
                ("Subject".into(), "web: gave up".into()),
                ("Message".into(), "a&b=c/ü".into()),
            ],
        );
        assert_eq!(b, "Action=Publish&Version=2010-03-31&Subject=web%3A%20gave%20up&Message=a%26b%3Dc%2F%C3%BC");
    }

    #[test]
    fn backoff_is_full_jitter_under_a_growing_cap() {
        assert_eq!(backoff(0, 0), Duration::ZERO);
        assert_eq!(backoff(0, 100), Duration::from_millis(100));
        assert!(backoff(0, u32::MAX) <= Duration::from_millis(100));
        assert!(backoff(1, u32::MAX) <= Duration::from_millis(200));
        assert!(backoff(9, 1_999) == Duration::from_millis(1_999));
        assert!(backoff(9, u32::MAX) <= Duration::from_secs(2));
    }
}
