//! `pauses.json`: the maintenance pauses a person set with `pmguard-agent pause`, and the only
//! channel between that command and the agent.
//!
//! The command writes the file; the daemon notices the change within one main-thread tick and
//! `check --once` reads it at start; both gate every restart on it again under `restart.lock`.
//! Invariants:
//! - written only under `restart.lock` (read, change, write back), atomically, mode 0640, by the
//!   PM2 user (a root caller becomes PM2_HOME's owner first), never through a symlink;
//! - deadlines are wall-clock epoch milliseconds, so a pause outlives an agent restart and a
//!   reboot, and ends by itself: an expired entry is never honoured, whether or not anyone has
//!   removed it from the file yet;
//! - `revision` grows with every write, and the daemon reports in `status.json` the revision it
//!   applied: that is how `pause` knows the running agent took it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::clock;
use crate::report::state::StateDir;
use crate::sys::files;

pub const PAUSES_FILE: &str = "pauses.json";

/// One app's pause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    /// Wall-clock epoch ms when it was set.
    pub since_ms: u64,
    /// Wall-clock epoch ms when it ends by itself.
    pub until_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who set it (the user name of the caller, before any drop of root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

impl Pause {
    pub fn is_active(&self, now_ms: u64) -> bool {
        now_ms < self.until_ms
    }

    /// `paused until 2026-11-30T14:02:00.000Z (deploy v42)`: the words `status` and notes use.
    pub fn describe(&self) -> String {
        let mut s = format!("paused until {}", clock::rfc3339(self.until_ms));
        if let Some(r) = &self.reason {
            s.push_str(&format!(" ({r})"));
        }
        s
    }
}

/// `pauses.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseBook {
    /// Grows with every write (see the module's invariants).
    pub revision: u64,
    pub apps: BTreeMap<String, Pause>,
}

impl PauseBook {
    /// `app`'s pause, if it is in force at `now_ms`.
    pub fn active(&self, app: &str, now_ms: u64) -> Option<&Pause> {
        self.apps.get(app).filter(|p| p.is_active(now_ms))
    }

    /// Removes and returns the pauses whose deadline has passed.
    pub fn take_expired(&mut self, now_ms: u64) -> Vec<(String, Pause)> {
        let gone: Vec<String> = self
            .apps
            .iter()
            .filter(|(_, p)| !p.is_active(now_ms))
            .map(|(n, _)| n.clone())
            .collect();
        gone.into_iter()
            .filter_map(|n| self.apps.remove(&n).map(|p| (n, p)))
            .collect()
    }
}

/// What the reader needs to tell whether `pauses.json` changed: inode, size and mtime (an atomic
/// replace always gives a new inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileStamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl StateDir {
    /// Reads `pauses.json`; a missing file is an empty book. A corrupt file is reported and read
    /// as empty (pauses are a person's convenience; a broken file must never stop watching).
    pub fn read_pauses(&self) -> PauseBook {
        let path = self.path(PAUSES_FILE);
        match files::read_optional(&path) {
            Ok(None) => PauseBook::default(),
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                tracing::warn!(message = "The pause file is corrupt; no app counts as paused.", path = %path.display(), %error);
                PauseBook::default()
            }),
            Err(error) => {
                tracing::warn!(message = "Cannot read the pause file.", path = %path.display(), %error);
                PauseBook::default()
            }
        }
    }

    /// Writes `pauses.json` with the next revision. Call under `restart.lock`.
    pub fn write_pauses(&self, book: &mut PauseBook) -> std::io::Result<()> {
        book.revision += 1;
        let data = serde_json::to_vec_pretty(book).map_err(std::io::Error::other)?;
        files::write_atomic(&self.path(PAUSES_FILE), &data, 0o640, true)
    }

    /// The stamp of `pauses.json` now (`None`: no file).
    pub fn pauses_stamp(&self) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(self.path(PAUSES_FILE)).ok()?;
        Some(FileStamp {
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pause(until_ms: u64) -> Pause {
        Pause {
            since_ms: 0,
            until_ms,
            reason: Some("deploy".into()),
            by: None,
        }
    }

    #[test]
    fn a_pause_is_in_force_until_its_deadline_and_not_after() {
        let mut book = PauseBook::default();
        book.apps.insert("web".into(), pause(1_000));
        assert!(book.active("web", 999).is_some());
        assert!(book.active("web", 1_000).is_none());
        assert!(book.active("api", 0).is_none());
        assert_eq!(book.take_expired(999), Vec::new());
        assert_eq!(book.take_expired(1_000).len(), 1);
        assert!(book.apps.is_empty());
    }

    #[test]
    fn the_book_round_trips_and_each_write_raises_the_revision() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path());
        let mut book = s.read_pauses();
        assert_eq!(book, PauseBook::default());
        book.apps.insert("web".into(), pause(5));
        s.write_pauses(&mut book).unwrap();
        s.write_pauses(&mut book).unwrap();
        assert_eq!(book.revision, 2);
        assert_eq!(s.read_pauses(), book);
        std::fs::write(s.path(PAUSES_FILE), b"{ not json").unwrap();
        assert_eq!(s.read_pauses(), PauseBook::default());
    }

    #[test]
    fn describe_says_until_when_and_why() {
        assert_eq!(
            pause(0).describe(),
            "paused until 1970-01-01T00:00:00.000Z (deploy)"
        );
    }
}
