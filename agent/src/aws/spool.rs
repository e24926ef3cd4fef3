//! The sink's bounded buffer and its spill to `<state_dir>/spool/pending.json`.
//!
//! Invariants: items leave the buffer only once AWS has accepted them (or refused them for good,
//! which is counted), so an outage delays delivery but never reorders or loses it; on overflow the
//! OLDEST items are dropped and counted, and the count is reported (a warning, the
//! `DroppedDatapoints` metric); the spool file (0600, replaced atomically) holds exactly the
//! buffer as of the last flush or the shutdown, and is removed once the buffer is empty, so an
//! agent restart resumes where the last one stopped.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::alerts::Alert;
use super::logs::LogRecord;
use super::metrics::Datum;
use crate::report::spool::SpoolFile;

pub use crate::report::spool::SPOOL_DIR;
pub const SPOOL_FILE: &str = "pending.json";

/// How much the buffer may hold before it drops the oldest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub datums: usize,
    pub events: usize,
    pub alerts: usize,
}

impl Default for Capacity {
    fn default() -> Capacity {
        // 50,000 datums: ~5 days of one app at a 60 s flush, ~2.7 h of 50 apps; ~8 MB spooled.
        Capacity {
            datums: 50_000,
            events: 20_000,
            alerts: 100,
        }
    }
}

/// Everything not yet delivered, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Buffer {
    pub metrics: VecDeque<Datum>,
    pub logs: VecDeque<LogRecord>,
    pub alerts: VecDeque<Alert>,
    /// Dropped items not yet reported as the `DroppedDatapoints` metric.
    pub dropped: u64,
    /// Dropped items since the agent started (for the warning and the final report).
    #[serde(skip)]
    pub dropped_total: u64,
}

fn push_bounded<T>(q: &mut VecDeque<T>, items: impl IntoIterator<Item = T>, cap: usize) -> u64 {
    q.extend(items);
    let over = q.len().saturating_sub(cap);
    q.drain(..over);
    over as u64
}

impl Buffer {
    pub fn is_empty(&self) -> bool {
        self.metrics.is_empty() && self.logs.is_empty() && self.alerts.is_empty()
    }

    pub fn len(&self) -> usize {
        self.metrics.len() + self.logs.len() + self.alerts.len()
    }

    /// Appends new items, dropping (and counting) the oldest beyond `cap`. Returns how many
    /// were dropped now.
    pub fn push(
        &mut self,
        cap: &Capacity,
        metrics: Vec<Datum>,
        logs: Vec<LogRecord>,
        alerts: Vec<Alert>,
    ) -> u64 {
        let n = push_bounded(&mut self.metrics, metrics, cap.datums)
            + push_bounded(&mut self.logs, logs, cap.events)
            + push_bounded(&mut self.alerts, alerts, cap.alerts);
        self.count_dropped(n);
        n
    }

    pub fn count_dropped(&mut self, n: u64) {
        self.dropped += n;
        self.dropped_total += n;
    }

    /// Adds the buffer of a previous run in front of this one (it is older).
    pub fn prepend(&mut self, older: Buffer, cap: &Capacity) {
        let mut merged = older;
        merged.dropped_total = self.dropped_total;
        let now = std::mem::take(self);
        let dropped = now.dropped;
        *self = merged;
        let n = self.push(cap, now.metrics.into(), now.logs.into(), now.alerts.into());
        self.dropped += dropped;
        let _ = n;
    }
}

/// Where the buffer is spilled.
#[derive(Debug, Clone)]
pub struct Spool {
    file: SpoolFile,
}

impl Spool {
    pub fn new(state_dir: &Path) -> Spool {
        Spool {
            file: SpoolFile::new(state_dir, SPOOL_FILE),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.file.path()
    }

    /// Reads the spilled buffer; a corrupt file is moved aside (and said so), never resent.
    pub fn load(&self) -> std::io::Result<Option<Buffer>> {
        self.file.load()
    }

    /// Writes the buffer (0600, atomically, fsynced), or removes the file when it is empty.
    pub fn store(&self, b: &Buffer) -> std::io::Result<()> {
        let empty = b.is_empty() && b.dropped == 0;
        self.file.store((!empty).then_some(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::metrics::{Stats, Unit};
    use std::os::unix::fs::MetadataExt;

    fn datum(i: u64) -> Datum {
        Datum {
            name: "ServiceStatus".into(),
            dims: vec![("App".into(), "web".into())],
            ts_ms: i,
            stats: Stats::one(i as f64),
            unit: Unit::None,
        }
    }

    fn log(i: u64) -> LogRecord {
        LogRecord {
            ts_ms: i,
            message: format!("{{\"n\":{i}}}"),
        }
    }

    #[test]
    fn overflow_drops_the_oldest_and_counts() {
        let cap = Capacity {
            datums: 3,
            events: 2,
            alerts: 1,
        };
        let mut b = Buffer::default();
        assert_eq!(
            b.push(
                &cap,
                (0..5).map(datum).collect(),
                (0..3).map(log).collect(),
                vec![]
            ),
            3
        );
        assert_eq!(
            b.metrics.iter().map(|d| d.ts_ms).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        assert_eq!(b.logs.iter().map(|d| d.ts_ms).collect::<Vec<_>>(), [1, 2]);
        assert_eq!((b.dropped, b.dropped_total), (3, 3));
    }

    #[test]
    fn spool_round_trip_keeps_order_and_mode() {
        let d = tempfile::tempdir().unwrap();
        let s = Spool::new(d.path());
        assert_eq!(s.load().unwrap(), None);
        let mut b = Buffer::default();
        b.push(
            &Capacity::default(),
            (0..100).map(datum).collect(),
            (0..50).map(log).collect(),
            vec![Alert {
                ts_ms: 1,
                app: "web".into(),
                subject: "s".into(),
                message: "m".into(),
            }],
        );
        b.dropped = 4;
        s.store(&b).unwrap();
        assert_eq!(std::fs::metadata(s.path()).unwrap().mode() & 0o777, 0o600);
        let back = s.load().unwrap().unwrap();
        assert_eq!(back.metrics, b.metrics);
        assert_eq!(back.logs, b.logs);
        assert_eq!(back.alerts, b.alerts);
        assert_eq!(back.dropped, 4);
        // Older spooled items go first, then the new ones.
        let mut live = Buffer::default();
        live.push(
            &Capacity::default(),
            vec![datum(1000)],
            vec![log(1000)],
            vec![],
        );
        live.prepend(back, &Capacity::default());
        assert_eq!(live.metrics.len(), 101);
        assert_eq!(live.metrics.back().unwrap().ts_ms, 1000);
        assert_eq!(live.metrics.front().unwrap().ts_ms, 0);
        // Empty: the file goes away.
        s.store(&Buffer::default()).unwrap();
        assert!(!s.path().exists());
        std::fs::write(s.path(), b"{broken").unwrap();
        assert_eq!(s.load().unwrap(), None);
        assert!(d.path().join("spool/pending.json.corrupt").exists());
    }
}
