//! What a sink sends (pure): an `Alert` made from an event when it is accepted (and spooled as
//! is), and the body each sink type sends for it.
//!
//! Invariants: an alert carries only the event's own fields (app, reason, restarts, pm_ids, ...)
//! and the tail of the app's error log when asked for: never PM2's process description or the
//! app's environment; every alert has an `id` unique on this host, so a receiver can drop the
//! rare duplicate (a 2xx lost on the wire before the agent stopped).

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::config::{NotifyEvent, NotifyKind};
use crate::report::events::{Event, Kind};

/// One alert for one sink, as spooled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// `<time in ms>-<sequence>`, unique on this host.
    pub id: String,
    pub event: String,
    pub app: Option<String>,
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    pub reason: String,
    pub message: String,
    /// RFC 3339, UTC.
    pub time: String,
    pub ts_ms: u64,
    /// The event's useful details: restarts, attempt, pm_id(s), pid, recovered_ms, ...
    #[serde(default)]
    pub fields: Map<String, Value>,
    /// Alerts for this app held back by the rate limit since the previous one.
    #[serde(default)]
    pub held_back: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogAttachment>,
}

/// `attach_log_lines`: the lines, or why there are none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogAttachment {
    pub lines: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The event's fields an alert carries (the rest stay in events.jsonl).
const FIELDS: &[&str] = &[
    "restarts",
    "attempt",
    "pm_id",
    "pm_ids",
    "pid",
    "signal",
    "pause_ms",
    "recovered_ms",
    "action",
];

/// Which notify event an event log `kind` is, if any.
pub fn notify_event(kind: Kind) -> Option<NotifyEvent> {
    match kind {
        Kind::GiveUp => Some(NotifyEvent::GiveUp),
        Kind::Escalation => Some(NotifyEvent::Escalation),
        Kind::Restart => Some(NotifyEvent::Restart),
        Kind::Recovered => Some(NotifyEvent::Recovered),
        Kind::Resurrect => Some(NotifyEvent::Resurrect),
        _ => None,
    }
}

/// Where the alert comes from: the host and, with `[aws] instance_id`, the instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    pub host: String,
    pub instance_id: Option<String>,
}

impl Alert {
    pub fn new(id: String, what: NotifyEvent, e: &Event, origin: &Origin, held_back: u64) -> Alert {
        let reason = e
            .fields
            .get("reason")
            .and_then(Value::as_str)
            .map_or_else(|| e.message.clone(), str::to_string);
        let fields = e
            .fields
            .iter()
            .filter(|(k, _)| FIELDS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Alert {
            id,
            event: what.as_str().to_string(),
            app: e.app.clone(),
            host: origin.host.clone(),
            instance_id: origin.instance_id.clone(),
            reason,
            message: e.message.clone(),
            time: e.ts.clone(),
            ts_ms: e.ts_ms,
            fields,
            held_back,
            log: None,
        }
    }
}

/// The request body for a sink of `kind`.
pub fn body(kind: NotifyKind, a: &Alert, window_text: &str) -> Vec<u8> {
    let v = match kind {
        NotifyKind::Webhook => webhook(a),
        NotifyKind::Slack => json!({ "text": slack_text(a, window_text) }),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

fn webhook(a: &Alert) -> Value {
    let mut v = json!({
        "id": a.id,
        "event": a.event,
        "app": a.app,
        "host": a.host,
        "reason": a.reason,
        "message": a.message,
        "time": a.time,
        "held_back": a.held_back,
    });
    if let Some(i) = &a.instance_id {
        v["instance_id"] = json!(i);
    }
    for (k, x) in &a.fields {
        v[k] = x.clone();
    }
    if let Some(log) = &a.log {
        v["log_lines"] = json!(log.lines);
        if let Some(n) = &log.note {
            v["log_note"] = json!(n);
        }
    }
    v
}

/// Slack's mrkdwn: a bold first line, then the reason and details, the log in a code block.
fn slack_text(a: &Alert, window_text: &str) -> String {
    let app = a.app.as_deref().unwrap_or("PM2");
    let what = match a.event.as_str() {
        "give_up" => ":rotating_light: crash loop, restarts paused",
        "escalation" => ":warning: restart escalated to SIGKILL",
        "restart" => ":arrows_counterclockwise: restarted",
        "recovered" => ":white_check_mark: recovered",
        "resurrect" => ":rotating_light: PM2 daemon down",
        other => other,
    };
    let mut t = format!(
        "*{} on {}: {what}*\n{}\n_{} · {}_",
        escape(app),
        escape(&a.host),
        escape(&a.message),
        a.time,
        a.id
    );
    if let Some(r) = a.fields.get("restarts").or_else(|| a.fields.get("attempt")) {
        t.push_str(&format!(" · restarts: {r}"));
    }
    if a.held_back > 0 {
        t.push_str(&format!(
            "\n{} more alert(s) for this app were held back by the rate limit ({window_text}).",
            a.held_back
        ));
    }
    if let Some(log) = &a.log {
        if !log.lines.is_empty() {
            // A ``` inside the log would end the block early.
            let lines = log.lines.join("\n").replace("```", "'''");
            t.push_str(&format!("\n```\n{}\n```", escape(&lines)));
        }
        if let Some(n) = &log.note {
            t.push_str(&format!("\n_{}_", escape(n)));
        }
    }
    t
}

/// Slack's three control characters in text.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restart_event() -> Event {
        let mut e = Event::new(
            Kind::Restart,
            Some("web"),
            "Restarting: probe timed out 3 times.",
        )
        .with("reason", "probe timed out 3 times")
        .with("attempt", 2)
        .with("pm_ids", vec![0, 1])
        .with("url", "http://127.0.0.1:3000/health");
        e.ts_ms = 1_700_000_000_000;
        e.ts = "2023-11-14T22:13:20Z".into();
        e
    }

    fn origin() -> Origin {
        Origin {
            host: "box-1".into(),
            instance_id: Some("i-0abc".into()),
        }
    }

    #[test]
    fn webhook_body_has_event_app_host_reason_time_and_details() {
        let a = Alert::new(
            "1-1".into(),
            NotifyEvent::Restart,
            &restart_event(),
            &origin(),
            0,
        );
        let v: Value = serde_json::from_slice(&body(NotifyKind::Webhook, &a, "5m")).unwrap();
        assert_eq!(v["event"], "restart");
        assert_eq!(v["app"], "web");
        assert_eq!(v["host"], "box-1");
        assert_eq!(v["instance_id"], "i-0abc");
        assert_eq!(v["reason"], "probe timed out 3 times");
        assert_eq!(v["time"], "2023-11-14T22:13:20Z");
        assert_eq!(v["attempt"], 2);
        assert_eq!(v["pm_ids"], json!([0, 1]));
        assert_eq!(v["id"], "1-1");
        assert!(v.get("url").is_none(), "only the listed fields: {v}");
        assert!(v.get("log_lines").is_none());
    }

    #[test]
    fn slack_body_is_one_text_with_the_log_in_a_code_block() {
        let mut a = Alert::new(
            "1-2".into(),
            NotifyEvent::Restart,
            &restart_event(),
            &origin(),
            3,
        );
        a.log = Some(LogAttachment {
            lines: vec!["Error: <boom> & ```".into()],
            note: None,
        });
        let v: Value = serde_json::from_slice(&body(NotifyKind::Slack, &a, "5m")).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 1, "{v}");
        let t = v["text"].as_str().unwrap();
        assert!(
            t.starts_with("*web on box-1: :arrows_counterclockwise: restarted*"),
            "{t}"
        );
        assert!(t.contains("3 more alert(s)"), "{t}");
        assert!(t.contains("```\nError: &lt;boom&gt; &amp; '''\n```"), "{t}");
    }

    #[test]
    fn only_the_five_kinds_notify() {
        assert_eq!(notify_event(Kind::GiveUp), Some(NotifyEvent::GiveUp));
        assert_eq!(notify_event(Kind::Recovered), Some(NotifyEvent::Recovered));
        assert_eq!(notify_event(Kind::Probe), None);
        assert_eq!(notify_event(Kind::RestartDone), None);
    }
}
