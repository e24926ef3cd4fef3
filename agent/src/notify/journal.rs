//! The notify spool as an append-only journal: `<state_dir>/spool/notify.jsonl` (0600), one
//! JSON record a line: `add` (a sink accepted an alert) and `done` (the alert left the sink's
//! queue: delivered, refused for good, or pushed out of a full queue).
//!
//! Invariants:
//! - An accepted alert is in the file (written, and fsynced) before its first attempt; a `done`
//!   is written without fsync, since losing one with a crash only sends that alert again (every
//!   alert carries an `id` for that case), never loses one.
//! - The cost of an alert does not grow with the queue: an append per accept and per `done`,
//!   and a rewrite of the live alerts (atomic, fsynced) only when the `done` records outnumber
//!   them (so each alert is rewritten a bounded number of times), or at a reload or start.
//! - Replaying the file gives each sink's queue, oldest first. A torn last line (a crash in
//!   the middle of an append) is ignored; any other unreadable line is skipped and said so.
//! - An empty spool is no file. The JSON document of earlier versions (`notify.json`) is read
//!   once and folded in.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::payload::Alert;
use crate::report::spool::{SpoolFile, SPOOL_DIR};
use crate::sys::files;

pub const JOURNAL_FILE: &str = "notify.jsonl";
/// The whole-document spool of earlier versions, read once at start.
pub const LEGACY_FILE: &str = "notify.json";

/// Each sink's undelivered alerts, oldest first, by sink name.
pub type Spooled = BTreeMap<String, VecDeque<Alert>>;

/// Fewer `done` records than this never trigger a rewrite.
const COMPACT_MIN: usize = 256;

/// One line of the journal.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Record {
    Add { sink: String, alert: Box<Alert> },
    Done { sink: String, id: String },
}

/// The open journal.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    file: Option<File>,
    /// `done` records since the last rewrite.
    done: usize,
}

impl Journal {
    pub fn new(state_dir: &Path) -> Journal {
        Journal {
            dir: state_dir.join(SPOOL_DIR),
            file: None,
            done: 0,
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(JOURNAL_FILE)
    }

    /// Renames an unreadable journal and legacy spool to `<name>.unreadable` (replacing an
    /// older one), so a compaction never deletes them. Returns where the journal went.
    pub fn set_aside(&mut self) -> Option<PathBuf> {
        self.file = None;
        let legacy = self.dir.join(LEGACY_FILE);
        let _ = std::fs::rename(&legacy, self.dir.join(format!("{LEGACY_FILE}.unreadable")));
        let path = self.path();
        let aside = path.with_file_name(format!("{JOURNAL_FILE}.unreadable"));
        let _ = std::fs::remove_dir_all(&aside).or_else(|_| std::fs::remove_file(&aside));
        std::fs::rename(&path, &aside).ok().map(|()| aside)
    }

    /// Replays the journal (and an earlier version's spool) into queues.
    pub fn load(&mut self) -> std::io::Result<Spooled> {
        let legacy = SpoolFile::new(self.dir.parent().unwrap_or(&self.dir), LEGACY_FILE);
        let mut spooled: Spooled = legacy.load()?.unwrap_or_default();
        if let Some(bytes) = files::read_optional(&self.path())? {
            replay(&bytes, &mut spooled, &self.path());
        }
        Ok(spooled)
    }

    /// Appends `records` in one write; fsynced when one of them is an `add`.
    pub fn append(&mut self, records: &[Record]) -> std::io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut data = Vec::new();
        for r in records {
            serde_json::to_writer(&mut data, r).map_err(std::io::Error::other)?;
            data.push(b'\n');
        }
        let file = match &mut self.file {
            Some(f) => f,
            None => {
                files::ensure_dir(&self.dir)?;
                self.file.insert(files::open_append(&self.path(), 0o600)?)
            }
        };
        file.write_all(&data)?;
        let adds = records.iter().any(|r| matches!(r, Record::Add { .. }));
        if adds {
            file.sync_data()?;
        }
        self.done += records.len()
            - records
                .iter()
                .filter(|r| matches!(r, Record::Add { .. }))
                .count();
        Ok(())
    }

    /// Whether enough `done` records piled up to rewrite the `live` alerts.
    pub fn wants_compaction(&self, live: usize) -> bool {
        self.done >= COMPACT_MIN && self.done > live
    }

    /// Rewrites the file as the `add`s of `spooled` (atomically, fsynced), or removes it when
    /// nothing is spooled; the earlier version's spool goes too.
    pub fn compact(&mut self, spooled: &Spooled) -> std::io::Result<()> {
        self.file = None;
        let mut data = Vec::new();
        for (sink, queue) in spooled {
            for alert in queue {
                let r = Record::Add {
                    sink: sink.clone(),
                    alert: Box::new(alert.clone()),
                };
                serde_json::to_writer(&mut data, &r).map_err(std::io::Error::other)?;
                data.push(b'\n');
            }
        }
        if data.is_empty() {
            remove(&self.path())?;
        } else {
            files::ensure_dir(&self.dir)?;
            files::write_atomic(&self.path(), &data, 0o600, true)?;
        }
        remove(&self.dir.join(LEGACY_FILE))?;
        self.done = 0;
        Ok(())
    }
}

fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Applies each line to `spooled`; a `done` removes the sink's alert with that id.
fn replay(bytes: &[u8], spooled: &mut Spooled, path: &Path) {
    let mut lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    // The text after the last newline is a torn append (or nothing).
    let torn = lines.pop().filter(|l| !l.is_empty());
    let mut skipped = 0usize;
    for line in lines.into_iter().filter(|l| !l.is_empty()) {
        match serde_json::from_slice::<Record>(line) {
            Ok(Record::Add { sink, alert }) => spooled.entry(sink).or_default().push_back(*alert),
            Ok(Record::Done { sink, id }) => {
                if let Some(q) = spooled.get_mut(&sink) {
                    if let Some(i) = q.iter().position(|a| a.id == id) {
                        q.remove(i);
                    }
                }
            }
            Err(_) => skipped += 1,
        }
    }
    if skipped > 0 {
        tracing::warn!(message = "Unreadable lines in the notify spool were skipped.", path = %path.display(), skipped);
    }
    if torn.is_some() {
        tracing::warn!(message = "The notify spool ends in a torn line (a crash while writing); it is ignored.", path = %path.display());
    }
    spooled.retain(|_, q| !q.is_empty());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NotifyEvent;
    use crate::notify::payload::Origin;
    use crate::report::events::{Event, Kind};

    fn alert(n: u64) -> Alert {
        let e = Event::new(Kind::Restart, Some("web"), format!("restart {n}"));
        let origin = Origin {
            host: "box".into(),
            instance_id: None,
        };
        Alert::new(format!("id-{n}"), NotifyEvent::Restart, &e, &origin, 0)
    }

    fn add(sink: &str, n: u64) -> Record {
        Record::Add {
            sink: sink.into(),
            alert: Box::new(alert(n)),
        }
    }

    fn done(sink: &str, n: u64) -> Record {
        Record::Done {
            sink: sink.into(),
            id: format!("id-{n}"),
        }
    }

    fn messages(s: &Spooled, sink: &str) -> Vec<String> {
        s.get(sink)
            .map(|q| q.iter().map(|a| a.message.clone()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn replay_gives_the_queues_in_order_a_torn_tail_is_ignored_and_compaction_keeps_them() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::new(d.path());
        j.append(&[add("hook", 1), add("hook", 2), add("chat", 3)])
            .unwrap();
        j.append(&[done("hook", 1), add("hook", 4)]).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(j.path()).unwrap().mode() & 0o777, 0o600);
        // A crash in the middle of an append.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(j.path())
            .unwrap();
        f.write_all(b"{\"op\":\"add\",\"sink\":\"ho").unwrap();
        let s = Journal::new(d.path()).load().unwrap();
        assert_eq!(messages(&s, "hook"), ["restart 2", "restart 4"]);
        assert_eq!(messages(&s, "chat"), ["restart 3"]);
        let mut j = Journal::new(d.path());
        j.compact(&s).unwrap();
        assert_eq!(Journal::new(d.path()).load().unwrap(), s);
        j.append(&[done("hook", 2), done("hook", 4), done("chat", 3)])
            .unwrap();
        let empty = Journal::new(d.path()).load().unwrap();
        assert!(empty.is_empty());
        j.compact(&empty).unwrap();
        assert!(!j.path().exists(), "an empty spool is no file");
    }

    #[test]
    fn an_earlier_versions_spool_is_read_and_folded_in() {
        let d = tempfile::tempdir().unwrap();
        let mut old: Spooled = BTreeMap::new();
        old.entry("hook".into()).or_default().push_back(alert(1));
        SpoolFile::new(d.path(), LEGACY_FILE)
            .store(Some(&old))
            .unwrap();
        let mut j = Journal::new(d.path());
        let s = j.load().unwrap();
        assert_eq!(messages(&s, "hook"), ["restart 1"]);
        j.compact(&s).unwrap();
        assert!(!d.path().join(SPOOL_DIR).join(LEGACY_FILE).exists());
        assert_eq!(Journal::new(d.path()).load().unwrap(), s);
    }

    #[test]
    fn compaction_waits_for_enough_done_records() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::new(d.path());
        let adds: Vec<Record> = (0..300).map(|n| add("hook", n)).collect();
        j.append(&adds).unwrap();
        assert!(!j.wants_compaction(300));
        let dones: Vec<Record> = (0..280).map(|n| done("hook", n)).collect();
        j.append(&dones).unwrap();
        assert!(j.wants_compaction(20));
        assert!(!j.wants_compaction(300));
    }
}
