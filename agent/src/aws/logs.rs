//! Events to CloudWatch Logs: which events go, how they are framed, and how a queue of them is
//! cut into PutLogEvents batches within AWS's rules.
//!
//! Rules (PutLogEvents): events in chronological order; at most 10,000 events; at most 1,048,576
//! bytes, counted as the UTF-8 message plus 26 bytes per event; a batch may not span more than
//! 24 hours; events older than 14 days (or more than 2 hours ahead) are rejected, so they are
//! dropped here and counted, never sent to be refused.

use serde::{Deserialize, Serialize};

use crate::report::events::{Event, Kind};

pub const MAX_EVENTS: usize = 10_000;
pub const MAX_BATCH_BYTES: usize = 1_048_576;
pub const EVENT_OVERHEAD: usize = 26;
/// A single event's message is cut to this many bytes (AWS: 256 KiB including the overhead).
pub const MAX_EVENT_BYTES: usize = 262_144 - EVENT_OVERHEAD;
pub const MAX_SPAN_MS: u64 = 24 * 3_600_000;
pub const MAX_AGE_MS: u64 = 14 * 86_400_000;
pub const MAX_AHEAD_MS: u64 = 2 * 3_600_000;

/// One log event: wall-clock time and the JSON line (the same line as in `events.jsonl`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    pub ts_ms: u64,
    pub message: String,
}

impl LogRecord {
    pub fn from_event(e: &Event) -> Option<LogRecord> {
        let mut message = serde_json::to_string(e).ok()?;
        super::cut(&mut message, MAX_EVENT_BYTES);
        Some(LogRecord {
            ts_ms: e.ts_ms,
            message,
        })
    }

    pub fn cost(&self) -> usize {
        self.message.len() + EVENT_OVERHEAD
    }
}

/// The events that go to CloudWatch Logs: everything but the per-check probe results.
pub fn is_shipped(kind: Kind) -> bool {
    !matches!(kind, Kind::Probe | Kind::Check)
}

/// The events that raise an SNS alert.
pub fn is_alert(kind: Kind) -> bool {
    matches!(kind, Kind::GiveUp | Kind::Escalation)
}

/// Whether AWS would still accept an event of this time at `now_ms`.
pub fn acceptable(ts_ms: u64, now_ms: u64) -> bool {
    ts_ms + MAX_AGE_MS > now_ms + 60_000 && ts_ms <= now_ms + MAX_AHEAD_MS
}

/// How many records from the front of `queue` make the next batch: within 10,000 events,
/// 1 MiB and a 24 h span (at least one when the queue is not empty).
pub fn next_batch_len<'a>(queue: impl IntoIterator<Item = &'a LogRecord>) -> usize {
    let mut n = 0;
    let mut bytes = 0;
    let (mut lo, mut hi) = (u64::MAX, 0u64);
    for r in queue {
        let (l, h) = (lo.min(r.ts_ms), hi.max(r.ts_ms));
        if n == MAX_EVENTS || (n > 0 && (bytes + r.cost() > MAX_BATCH_BYTES || h - l > MAX_SPAN_MS))
        {
            break;
        }
        n += 1;
        bytes += r.cost();
        lo = l;
        hi = h;
    }
    n
}

/// How many events of a batch of `n` CloudWatch Logs took but rejected, by the reply's
/// `rejectedLogEventsInfo`: those before `tooOldLogEventEndIndex` and `expiredLogEventEndIndex`
/// (exclusive ends), and those from `tooNewLogEventStartIndex` on. Indices past the batch, or not
/// numbers, are clamped or ignored: an odd reply can neither panic nor count more than `n`.
pub fn rejected(info: &serde_json::Value, n: usize) -> usize {
    let index = |key: &str| {
        info.get(key)
            .and_then(serde_json::Value::as_u64)
            .map(|i| usize::try_from(i).unwrap_or(usize::MAX).min(n))
    };
    let old_end = index("tooOldLogEventEndIndex")
        .max(index("expiredLogEventEndIndex"))
        .unwrap_or(0);
    let new_start = index("tooNewLogEventStartIndex").unwrap_or(n).max(old_end);
    old_end + (n - new_start)
}

/// Puts a batch in the chronological order AWS requires (stable: equal times keep their order).
pub fn chronological(batch: &mut [LogRecord]) {
    batch.sort_by_key(|r| r.ts_ms);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ts_ms: u64, len: usize) -> LogRecord {
        LogRecord {
            ts_ms,
            message: "x".repeat(len),
        }
    }

    #[test]
    fn at_most_10000_events() {
        let q: Vec<LogRecord> = (0..25_000).map(|i| rec(1_000 + i, 10)).collect();
        assert_eq!(next_batch_len(&q), 10_000);
        assert_eq!(next_batch_len(&q[20_000..]), 5_000);
        assert_eq!(next_batch_len(&[]), 0);
    }

    #[test]
    fn at_most_one_mebibyte_with_26_bytes_per_event() {
        // 1,048,576 / (998 + 26) = 1024 events exactly fit; one more byte does not.
        let q: Vec<LogRecord> = (0..2000).map(|i| rec(i, 998)).collect();
        assert_eq!(next_batch_len(&q), 1024);
        let q: Vec<LogRecord> = (0..2000).map(|i| rec(i, 999)).collect();
        assert_eq!(next_batch_len(&q), 1023);
        // A huge single event still goes (alone) after being cut to the per-event limit.
        let q = vec![rec(1, MAX_EVENT_BYTES), rec(2, MAX_EVENT_BYTES * 4)];
        assert_eq!(next_batch_len(&q), 1);
    }

    #[test]
    fn at_most_24_hours_per_batch_in_either_direction() {
        let h = 3_600_000;
        let q = vec![
            rec(10 * h, 1),
            rec(20 * h, 1),
            rec(34 * h, 1),
            rec(35 * h, 1),
        ];
        assert_eq!(next_batch_len(&q), 3, "10h..34h is exactly 24h");
        let q = vec![rec(30 * h, 1), rec(5 * h, 1)];
        assert_eq!(next_batch_len(&q), 1);
    }

    #[test]
    fn sorts_and_judges_age() {
        let mut b = vec![
            rec(3, 1),
            rec(1, 1),
            LogRecord {
                ts_ms: 1,
                message: "b".into(),
            },
        ];
        chronological(&mut b);
        assert_eq!(b.iter().map(|r| r.ts_ms).collect::<Vec<_>>(), [1, 1, 3]);
        assert_eq!(b[0].message, "x");
        let now = 100 * 86_400_000;
        assert!(acceptable(now - 13 * 86_400_000, now));
        assert!(!acceptable(now - 14 * 86_400_000, now));
        assert!(!acceptable(now + 3 * 3_600_000, now));
    }

    #[test]
    fn rejected_events_are_counted_from_the_reply_indices() {
        let r = |v: serde_json::Value| rejected(&v, 10);
        assert_eq!(r(serde_json::json!({})), 0);
        assert_eq!(r(serde_json::json!({ "tooOldLogEventEndIndex": 3 })), 3);
        assert_eq!(r(serde_json::json!({ "tooNewLogEventStartIndex": 7 })), 3);
        assert_eq!(
            r(
                serde_json::json!({ "expiredLogEventEndIndex": 2, "tooOldLogEventEndIndex": 4, "tooNewLogEventStartIndex": 9 })
            ),
            5
        );
        // Odd replies: overlapping, past the batch, negative, not numbers.
        assert_eq!(
            r(serde_json::json!({ "tooOldLogEventEndIndex": 8, "tooNewLogEventStartIndex": 2 })),
            10
        );
        assert_eq!(r(serde_json::json!({ "tooOldLogEventEndIndex": 99 })), 10);
        assert_eq!(
            r(serde_json::json!({ "tooNewLogEventStartIndex": -1, "tooOldLogEventEndIndex": "x" })),
            0
        );
    }

    #[test]
    fn framing_and_selection() {
        let e = Event::new(Kind::GiveUp, Some("web"), "Crash loop.").with("restarts", 5);
        let r = LogRecord::from_event(&e).unwrap();
        let v: serde_json::Value = serde_json::from_str(&r.message).unwrap();
        assert_eq!(
            (v["kind"].as_str(), v["app"].as_str()),
            (Some("give_up"), Some("web"))
        );
        assert_eq!(r.ts_ms, e.ts_ms);
        let long = Event::new(Kind::Reload, None, "é".repeat(300_000));
        assert!(LogRecord::from_event(&long).unwrap().message.len() <= MAX_EVENT_BYTES);
        assert!(!is_shipped(Kind::Probe) && !is_shipped(Kind::Check));
        assert!(is_shipped(Kind::RestartDone) && is_shipped(Kind::ConfigRejected));
        assert!(is_alert(Kind::GiveUp) && is_alert(Kind::Escalation) && !is_alert(Kind::Restart));
    }
}
