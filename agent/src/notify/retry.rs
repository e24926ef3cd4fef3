//! What a delivery attempt's result means, and when to try again (pure; time and chance passed in).
//!
//! - 2xx: delivered. 429, 5xx, 408 and every network error (resolve, connect, timeout, TLS,
//!   a broken reply): try again later, with exponential backoff from 1 s, full jitter in the
//!   upper half, capped at the sink's `retry_max_interval`; a `Retry-After` in seconds is
//!   honoured (up to an hour). A 3xx: redirects are never followed (the request would carry
//!   the alert, and a URL's secret path, to wherever the reply points); it is retried with the
//!   same backoff and an error log, as a URL to fix, not an alert to drop. Any other 4xx (400,
//!   403, 404, 410, ...): the endpoint refuses this alert for good; it is dropped and counted,
//!   never retried forever.
//! - Only the status line decides: a 2xx whose body was cut at the size limit is delivered.

use crate::net::{NetError, Reply};

/// What to do with the alert after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Try again; `after_ms` is the endpoint's own `Retry-After`, if it gave one.
    Retry {
        error: String,
        after_ms: Option<u64>,
    },
    /// A 3xx: not followed; retried, and a person must fix the URL.
    Redirected {
        status: u16,
    },
    Refused {
        status: u16,
    },
}

const RETRY_AFTER_MAX_MS: u64 = 3_600_000;

pub fn classify(result: &Result<Reply, NetError>) -> Outcome {
    match result {
        Ok(r) if (200..300).contains(&r.status) => Outcome::Delivered,
        Ok(r) if r.status == 429 || r.status == 408 || r.status >= 500 => Outcome::Retry {
            error: format!("HTTP {}", r.status),
            after_ms: r.header("retry-after").and_then(retry_after_ms),
        },
        Ok(r) if (300..400).contains(&r.status) => Outcome::Redirected { status: r.status },
        Ok(r) => Outcome::Refused { status: r.status },
        Err(e) => Outcome::Retry {
            error: e.to_string(),
            after_ms: None,
        },
    }
}

/// `Retry-After: <seconds>` (the HTTP-date form is not used by webhook endpoints we know).
fn retry_after_ms(v: &str) -> Option<u64> {
    let secs: u64 = v.trim().parse().ok()?;
    Some(secs.saturating_mul(1000).min(RETRY_AFTER_MAX_MS))
}

/// The wait before attempt `failures + 1`: 1 s, 2 s, 4 s, ... capped at `cap_ms`, scaled by
/// `jitter` in [0, 1) into the upper half (so two agents do not retry in step); at least
/// `retry_after_ms` when the endpoint asked for it.
pub fn backoff_ms(failures: u32, cap_ms: u64, jitter: f64, retry_after_ms: Option<u64>) -> u64 {
    let exp = 1_000u64.saturating_mul(1u64 << failures.saturating_sub(1).min(30));
    let base = exp.min(cap_ms);
    let jittered = (base as f64 * (0.5 + 0.5 * jitter.clamp(0.0, 1.0))) as u64;
    jittered.max(retry_after_ms.unwrap_or(0))
}

/// A cheap, non-cryptographic source of jitter (xorshift), seeded from the clock and the pid.
#[derive(Debug)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new() -> Jitter {
        let seed = crate::clock::wall_ms() ^ (u64::from(std::process::id()) << 32) | 1;
        Jitter(seed)
    }

    /// The next value in [0, 1).
    pub fn sample(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Default for Jitter {
    fn default() -> Jitter {
        Jitter::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: u16, headers: &[(&str, &str)]) -> Result<Reply, NetError> {
        Ok(Reply {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: Vec::new(),
            truncated: false,
        })
    }

    #[test]
    fn two_hundreds_deliver_server_errors_and_429_retry_other_4xx_are_refused() {
        assert_eq!(classify(&reply(200, &[])), Outcome::Delivered);
        assert_eq!(classify(&reply(204, &[])), Outcome::Delivered);
        let mut cut = reply(200, &[]);
        if let Ok(r) = &mut cut {
            r.truncated = true;
        }
        assert_eq!(
            classify(&cut),
            Outcome::Delivered,
            "the status line decides"
        );
        assert!(matches!(
            classify(&reply(500, &[])),
            Outcome::Retry { after_ms: None, .. }
        ));
        assert_eq!(
            classify(&reply(429, &[("Retry-After", "30")])),
            Outcome::Retry {
                error: "HTTP 429".into(),
                after_ms: Some(30_000)
            }
        );
        assert!(matches!(
            classify(&reply(503, &[("retry-after", "99999")])),
            Outcome::Retry {
                after_ms: Some(3_600_000),
                ..
            }
        ));
        assert_eq!(classify(&reply(404, &[])), Outcome::Refused { status: 404 });
        let moved = reply(301, &[("Location", "https://elsewhere.example/")]);
        assert_eq!(classify(&moved), Outcome::Redirected { status: 301 });
        assert_eq!(
            classify(&reply(307, &[])),
            Outcome::Redirected { status: 307 }
        );
        assert_eq!(classify(&reply(400, &[])), Outcome::Refused { status: 400 });
        assert!(matches!(
            classify(&Err(NetError::Connect("refused".into()))),
            Outcome::Retry { .. }
        ));
        assert!(matches!(
            classify(&Err(NetError::Timeout)),
            Outcome::Retry { .. }
        ));
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_in_the_upper_half() {
        assert_eq!(backoff_ms(1, 120_000, 0.999_999, None), 999);
        assert_eq!(backoff_ms(1, 120_000, 0.0, None), 500);
        assert_eq!(backoff_ms(4, 120_000, 0.0, None), 4_000);
        assert_eq!(backoff_ms(30, 120_000, 0.0, None), 60_000);
        assert_eq!(backoff_ms(200, 120_000, 0.999_999, None), 119_999);
        assert_eq!(backoff_ms(1, 120_000, 0.0, Some(30_000)), 30_000);
        let mut j = Jitter::new();
        for _ in 0..1000 {
            let x = j.sample();
            assert!((0.0..1.0).contains(&x));
        }
    }
}
