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
