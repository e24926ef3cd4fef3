//! SNS alerts on crash-loop give-ups and kill escalations, rate-limited per app.
//!
//! At most one message per app per `window` (default 5 minutes); alerts inside the window are
//! counted and the count is told in the next message, so a storm becomes one message with a number
//! and nothing is silently swallowed. Time is passed in.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::report::events::{Event, Kind};

pub const DEFAULT_WINDOW_MS: u64 = 5 * 60_000;

/// One SNS message to publish.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub ts_ms: u64,
    pub app: String,
    pub subject: String,
    pub message: String,
}

/// Per-app rate limit of alerts.
#[derive(Debug, Clone)]
pub struct Limiter {
    window_ms: u64,
    apps: BTreeMap<String, (u64, u64)>,
}

impl Limiter {
    pub fn new(window_ms: u64) -> Limiter {
        Limiter {
            window_ms,
            apps: BTreeMap::new(),
        }
    }

    /// `Some(suppressed before this one)` when an alert for `app` may go now; `None` when it
    /// falls inside the window (it is counted for the next message).
    pub fn admit(&mut self, app: &str, now_ms: u64) -> Option<u64> {
        match self.apps.get_mut(app) {
            Some((last, suppressed)) if now_ms.saturating_sub(*last) < self.window_ms => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                *last = now_ms;
                Some(std::mem::take(suppressed))
            }
            None => {
                self.apps.insert(app.to_string(), (now_ms, 0));
                Some(0)
            }
        }
    }

    /// The alert for an event, if the limiter lets one go now.
    pub fn alert_for(&mut self, e: &Event, instance: &str) -> Option<Alert> {
        let app = e.app.as_deref().unwrap_or("-");
        let suppressed = self.admit(app, e.ts_ms)?;
        let what = match e.kind {
            Kind::GiveUp => "crash loop, restarts paused",
            Kind::Escalation => "restart escalated to SIGKILL",
            _ => "event",
        };
        let mut subject = format!("pmguard: {app} on {instance}: {what}");
        if subject.len() > 99 {
            let mut cut = 99;
            while !subject.is_char_boundary(cut) {
                cut -= 1;
            }
            subject.truncate(cut);
        }
        let mut message = format!(
            "{}\n\nApp: {app}\nInstance: {instance}\nTime: {}\nEvent: {}\n",
            e.message,
            e.ts,
            serde_json::to_string(e).unwrap_or_default()
        );
        if suppressed > 0 {
            message.push_str(&format!(
                "\n{suppressed} more alert(s) for this app were held back in the previous {} minutes (rate limit); see the log group for each event.\n",
                self.window_ms / 60_000
            ));
        }
        Some(Alert {
            ts_ms: e.ts_ms,
            app: app.to_string(),
            subject,
            message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_per_app_per_window_and_counts_the_rest() {
        let mut l = Limiter::new(300_000);
        assert_eq!(l.admit("web", 1_000), Some(0));
        assert_eq!(
            l.admit("api", 2_000),
            Some(0),
            "apps are limited separately"
        );
        assert_eq!(l.admit("web", 60_000), None);
        assert_eq!(l.admit("web", 299_999), None);
        assert_eq!(l.admit("web", 301_000), Some(2));
        assert_eq!(l.admit("web", 601_000), Some(0));
    }

    #[test]
    fn message_names_app_instance_and_suppressed_count() {
        let mut l = Limiter::new(300_000);
        let mut e = Event::new(Kind::GiveUp, Some("web"), "Crash loop: 5 restarts.");
        e.ts_ms = 10_000;
        let a = l.alert_for(&e, "i-1").unwrap();
        assert_eq!(
            a.subject,
            "pmguard: web on i-1: crash loop, restarts paused"
        );
        assert!(a.message.starts_with("Crash loop: 5 restarts."));
        e.ts_ms = 20_000;
        assert!(l.alert_for(&e, "i-1").is_none());
        e.ts_ms = 400_000;
        e.kind = Kind::Escalation;
        let a = l.alert_for(&e, "i-1").unwrap();
        assert!(a.message.contains("1 more alert(s)"), "{}", a.message);
        assert!(a.subject.contains("SIGKILL"));
        e.app = Some("x".repeat(200));
        e.ts_ms = 900_000;
        assert!(l.alert_for(&e, "i-1").unwrap().subject.len() < 100);
    }
}
