//! SNS alerts on crash-loop give-ups and kill escalations, rate-limited per app.
//!
//! At most one message per app per `window` (default 5 minutes); alerts inside the window are
//! counted and the count is told in the next message, so a storm becomes one message with a number
//! and nothing is silently swallowed. Time is passed in.

use serde::{Deserialize, Serialize};

use crate::report::events::{Event, Kind};
pub use crate::report::limit::Limiter;

pub const DEFAULT_WINDOW_MS: u64 = 5 * 60_000;

/// One SNS message to publish.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub ts_ms: u64,
    pub app: String,
    pub subject: String,
    pub message: String,
}

/// The SNS alert for an event, if the limiter lets one go now (one per app per window). `now`
/// is monotonic (`clock::mono_now`): a wall clock stepped back must not hold alerts back.
pub fn alert_for(
    limiter: &mut Limiter,
    e: &Event,
    instance: &str,
    now: crate::clock::Mono,
) -> Option<Alert> {
    let app = e.app.as_deref().unwrap_or("-");
    let suppressed = limiter.admit(app, now)?;
    let what = match e.kind {
        Kind::GiveUp => "crash loop, restarts paused",
        Kind::Escalation => "restart escalated to SIGKILL",
        _ => "event",
    };
    // SNS refuses (and so would drop) a Subject with control or non-ASCII characters.
    let mut subject: String = format!("pmguard: {app} on {instance}: {what}")
        .chars()
        .filter(|c| c.is_ascii() && !c.is_ascii_control())
        .collect();
    super::cut(&mut subject, 99);
    let mut message = format!(
        "{}\n\nApp: {app}\nInstance: {instance}\nTime: {}\nEvent: {}\n",
        e.message,
        e.ts,
        serde_json::to_string(e).unwrap_or_default()
    );
    if suppressed > 0 {
        message.push_str(&format!(
            "\n{suppressed} more alert(s) for this app were held back in the previous {} minutes (rate limit); see the log group for each event.\n",
            limiter.window_ms() / 60_000
        ));
    }
    Some(Alert {
        ts_ms: e.ts_ms,
        app: app.to_string(),
        subject,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_app_instance_and_suppressed_count() {
        let mut l = Limiter::new(300_000, 1);
        let mut e = Event::new(Kind::GiveUp, Some("web"), "Crash loop: 5 restarts.");
        let a = alert_for(&mut l, &e, "i-1", 10_000).unwrap();
        assert_eq!(
            a.subject,
            "pmguard: web on i-1: crash loop, restarts paused"
        );
        assert!(a.message.starts_with("Crash loop: 5 restarts."));
        // The event's wall-clock time stepped back an hour: only monotonic time counts.
        e.ts_ms = e.ts_ms.saturating_sub(3_600_000);
        assert!(alert_for(&mut l, &e, "i-1", 20_000).is_none());
        e.kind = Kind::Escalation;
        let a = alert_for(&mut l, &e, "i-1", 400_000).unwrap();
        assert!(a.message.contains("1 more alert(s)"), "{}", a.message);
        assert!(a.subject.contains("SIGKILL"));
        e.app = Some("x".repeat(200));
        assert!(alert_for(&mut l, &e, "i-1", 900_000).unwrap().subject.len() < 100);
    }

    #[test]
    fn a_non_ascii_app_keeps_its_alert_with_a_subject_sns_accepts() {
        let mut l = Limiter::new(300_000, 1);
        let e = Event::new(Kind::GiveUp, Some("café\u{7}应用"), "Crash loop.");
        let a = alert_for(&mut l, &e, "höst", 1_000).unwrap();
        assert_eq!(
            a.subject,
            "pmguard: caf on hst: crash loop, restarts paused"
        );
        assert!(a.message.contains("App: café\u{7}应用"));
    }
}
