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
//!   removed it from the file yet; nor is one the command could not have written (longer than
//!   `MAX_PAUSE`, or set more than a minute in the future: a hand edit or a skewed clock);
//! - `revision` grows with every write, and the daemon reports in `status.json` the revision it
//!   applied: that is how `pause` knows the running agent took it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock;
use crate::report::state::StateDir;
use crate::sys::files;

pub const PAUSES_FILE: &str = "pauses.json";
/// The same name for the directory watch (`sys::dirwatch`).
pub const PAUSES_FILE_C: &std::ffi::CStr = c"pauses.json";

/// The longest pause: a forgotten pause must end (an app left unwatched forever is what the
/// tools pmguard replaces did silently).
pub const MAX_PAUSE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The longest `reason` (bytes): a line in `status`, not a document.
pub const MAX_REASON: usize = 200;

/// `text` made safe to print on a terminal: control characters (ANSI escapes, newlines) become
/// U+FFFD, and it is cut to `MAX_REASON` bytes on a character boundary. For what a hand-edited
/// `pauses.json` holds; the command refuses such a reason instead.
pub fn clean_text(text: &str) -> String {
    let mut out = String::new();
    for c in text
        .chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
    {
        if out.len() + c.len_utf8() > MAX_REASON {
            break;
        }
        out.push(c);
    }
    out
}

/// How far past now a pause's start may lie (clocks a little apart): beyond, it is not honoured.
const SINCE_AHEAD_MS: u64 = 60_000;

/// Why a recorded pause is no longer honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lapse {
    /// Its deadline passed.
    Deadline,
    /// It lasts longer than `MAX_PAUSE` (the file was edited by hand).
    TooLong,
    /// It starts more than a minute from now (edited by hand, or the clock went back).
    Future,
}

impl Lapse {
    /// The words of the `pause_expired` event and the log.
    pub fn why(self) -> &'static str {
        match self {
            Lapse::Deadline => "its deadline passed",
            Lapse::TooLong => "it lasts longer than the 7-day maximum (pauses.json edited by hand?)",
            Lapse::Future => "it starts more than a minute from now (pauses.json edited by hand, or the clock went back?)",
        }
    }
}

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
    /// Whether it is in force at `now_ms`: before its deadline, no longer than `MAX_PAUSE`, and
    /// not set in the future.
    pub fn is_active(&self, now_ms: u64) -> bool {
        self.lapse(now_ms).is_none()
    }

    /// Why it is not in force at `now_ms` (`None`: it is).
    pub fn lapse(&self, now_ms: u64) -> Option<Lapse> {
        if now_ms >= self.until_ms {
            Some(Lapse::Deadline)
        } else if self.until_ms.saturating_sub(self.since_ms) > MAX_PAUSE.as_millis() as u64 {
            Some(Lapse::TooLong)
        } else if self.since_ms > now_ms.saturating_add(SINCE_AHEAD_MS) {
            Some(Lapse::Future)
        } else {
            None
        }
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

    /// The book with every reason and `by` passed through `clean_text`: whatever the file says,
    /// `status`, events and the log get one short printable line.
    fn cleaned(mut self) -> PauseBook {
        for p in self.apps.values_mut() {
            for t in [&mut p.reason, &mut p.by].into_iter().flatten() {
                *t = clean_text(t);
            }
        }
        self
    }

    /// Removes and returns the pauses no longer in force, each with why.
    pub fn take_expired(&mut self, now_ms: u64) -> Vec<(String, Pause, Lapse)> {
        let gone: Vec<(String, Lapse)> = self
            .apps
            .iter()
            .filter_map(|(n, p)| p.lapse(now_ms).map(|l| (n.clone(), l)))
            .collect();
        gone.into_iter()
            .filter_map(|(n, l)| self.apps.remove(&n).map(|p| (n, p, l)))
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
        self.read_pauses_strict().unwrap_or_else(|error| {
            tracing::warn!(message = "Cannot read the pause file; no app counts as paused.", path = %self.path(PAUSES_FILE).display(), %error);
            PauseBook::default()
        })
    }

    /// Reads `pauses.json`; a missing file is an empty book, an unreadable or corrupt one an
    /// error (for the command, which must not overwrite what it could not read).
    pub fn read_pauses_strict(&self) -> std::io::Result<PauseBook> {
        match files::read_optional(&self.path(PAUSES_FILE))? {
            None => Ok(PauseBook::default()),
            Some(bytes) => serde_json::from_slice::<PauseBook>(&bytes)
                .map(PauseBook::cleaned)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
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
    fn a_pause_longer_than_the_maximum_or_set_in_the_future_is_not_honoured() {
        let week = MAX_PAUSE.as_millis() as u64;
        let now = 10 * week;
        let mut book = PauseBook::default();
        let at = |since_ms, until_ms| Pause {
            since_ms,
            until_ms,
            reason: None,
            by: None,
        };
        book.apps.insert("ok".into(), at(now - 1, now - 1 + week));
        book.apps.insert("centuries".into(), at(now - 1, u64::MAX));
        book.apps
            .insert("ahead".into(), at(now + 61_000, now + 120_000));
        book.apps
            .insert("skew".into(), at(now + 59_000, now + 120_000));
        assert!(book.active("ok", now).is_some());
        assert!(book.active("skew", now).is_some());
        assert!(book.active("centuries", now).is_none());
        assert!(book.active("ahead", now).is_none());
        let gone = book.take_expired(now);
        let why: Vec<_> = gone.iter().map(|(n, _, l)| (n.as_str(), *l)).collect();
        assert_eq!(
            why,
            [("ahead", Lapse::Future), ("centuries", Lapse::TooLong)]
        );
        assert_eq!(book.apps.len(), 2);
    }

    #[test]
    fn a_hand_edited_reason_cannot_reach_the_terminal_raw_or_whole() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path());
        let long = "é".repeat(150);
        let file = serde_json::json!({"revision": 3, "apps": {
            "web": {"since_ms": 0, "until_ms": 1, "reason": "x\u{1b}[2J\nweb  ok", "by": "a\rb"},
            "api": {"since_ms": 0, "until_ms": 1, "reason": long},
        }});
        std::fs::write(s.path(PAUSES_FILE), file.to_string()).unwrap();
        let book = s.read_pauses();
        let web = &book.apps["web"];
        assert_eq!(web.reason.as_deref(), Some("x\u{fffd}[2J\u{fffd}web  ok"));
        assert_eq!(web.by.as_deref(), Some("a\u{fffd}b"));
        assert_eq!(
            book.apps["api"].reason.as_deref(),
            Some(&long[..MAX_REASON])
        );
    }

    #[test]
    fn describe_says_until_when_and_why() {
        assert_eq!(
            pause(0).describe(),
            "paused until 1970-01-01T00:00:00.000Z (deploy)"
        );
    }
}
