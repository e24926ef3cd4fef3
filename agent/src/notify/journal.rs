//! The notify spool as an append-only journal: `<state_dir>/spool/notify.jsonl` (0600), one
//! JSON record a line: `add` (a sink accepted an alert) and `done` (the alert left the sink's
//! queue: delivered, refused for good, or pushed out of a full queue).
//!
//! Invariants:
//! - An accepted alert is in the file (written, and fsynced) before its first attempt, and so
//!   is the file's name in the directory: the directory is fsynced whenever the file is
//!   created, replaced or removed. A `done` is written without fsync, since losing one with a
//!   crash only sends that alert again (every alert carries an `id` for that case), never
//!   loses one.
//! - The cost of an alert does not grow with the queue: an append per accept and per `done`,
//!   and a rewrite of the live alerts (atomic, fsynced) only when the `done` records outnumber
//!   them (so each alert is rewritten a bounded number of times), or at a reload or start.
//! - What is written is read back whole: the file is read line by line, however long it is
//!   (memory is bounded by `MAX_LINE` and the queues, never by the file), and no line longer
//!   than `MAX_LINE` is ever written (the worker refuses such an alert, counted).
//! - A file that may not end where the last good record ends (an append or an fsync failed,
//!   or replay found a torn last line) is `stale`: nothing is appended to it until it has been
//!   rewritten from memory, so a later record is never glued to a torn one and lost with it.
//! - Replaying the file gives each sink's queue, oldest first. A torn last line (a crash or a
//!   power loss in the middle of an append) is applied if it is a whole record, else skipped
//!   (counted as lost if it was an `add`); any other unreadable line is skipped, said, and
//!   counted as lost unless it is a `done`. Neither is fatal.
//! - An `add` carries the sink's `target` (a hash of its type and URL), so a sink renamed while
//!   the agent was stopped finds its queue again at start (see `worker`).
//! - An empty spool is no file. The JSON document of earlier versions (`notify.json`) is read
//!   once and folded in. Temp files a crash left in the middle of a rewrite are removed at load.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::payload::Alert;
use crate::report::spool::{SpoolFile, SPOOL_DIR};
use crate::sys::files;

pub const JOURNAL_FILE: &str = "notify.jsonl";
/// The whole-document spool of earlier versions, read once at start.
pub const LEGACY_FILE: &str = "notify.json";

/// The longest line written or read back: far above any alert (at most 4 KiB of log lines
/// and the event's few fields, a few KiB as JSON even when every byte is escaped).
pub const MAX_LINE: usize = 1024 * 1024;

/// Fewer `done` records than this never trigger a rewrite.
const COMPACT_MIN: usize = 256;

/// A sink's spooled alerts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Queue {
    /// The sink's `target` as of its last `add` (`None` in lines of earlier versions).
    pub target: Option<String>,
    /// Oldest first.
    pub alerts: VecDeque<Alert>,
    /// The oldest alerts beyond the queue cap, dropped at replay.
    pub over: u64,
}

/// Each sink's undelivered alerts, by sink name.
pub type Spooled = BTreeMap<String, Queue>;

/// What `load` found.
#[derive(Debug, Default, PartialEq)]
pub struct Loaded {
    pub spooled: Spooled,
    /// Alerts lost to unreadable lines (a torn `add` included): counted, said by `load`.
    pub lost: u64,
}

/// One line of the journal.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Record {
    Add {
        sink: String,
        /// The sink's type and URL, hashed (`worker::target`): never the URL itself.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<String>,
        alert: Box<Alert>,
    },
    Done {
        sink: String,
        id: String,
    },
}

impl Record {
    /// Whether the record's line (newline included) would be longer than `MAX_LINE`.
    pub fn too_long(&self) -> bool {
        let mut n = Count(0);
        serde_json::to_writer(&mut n, self).map_or(true, |()| n.0 + 1 > MAX_LINE)
    }
}

/// Counts what is written to it (a record's length without building its line).
struct Count(usize);

impl Write for Count {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len();
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The open journal.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    file: Option<File>,
    /// `done` records since the last rewrite.
    done: usize,
    /// The file may lack records or end mid-line: it must be rewritten before any append.
    stale: bool,
}

impl Journal {
    pub fn new(state_dir: &Path) -> Journal {
        Journal {
            dir: state_dir.join(SPOOL_DIR),
            file: None,
            done: 0,
            stale: false,
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(JOURNAL_FILE)
    }

    /// Whether the file must be rewritten (`compact`) before anything is appended to it.
    pub fn is_stale(&self) -> bool {
        self.stale
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
        let moved = std::fs::rename(&path, &aside).ok().map(|()| aside);
        let _ = sync_dir(&self.dir);
        moved
    }

    /// Replays the journal (and an earlier version's spool) into queues of at most `cap`
    /// alerts each (the oldest beyond it counted in `Queue::over`), line by line.
    pub fn load(&mut self, cap: usize) -> std::io::Result<Loaded> {
        self.remove_temp_files();
        let legacy = SpoolFile::new(self.dir.parent().unwrap_or(&self.dir), LEGACY_FILE);
        let older: BTreeMap<String, VecDeque<Alert>> = legacy.load()?.unwrap_or_default();
        let mut loaded = Loaded::default();
        for (name, alerts) in older {
            let q = loaded.spooled.entry(name).or_default();
            q.alerts = alerts;
        }
        if let Some(file) = open_read(&self.path())? {
            let r = replay(BufReader::new(file), cap, &mut loaded.spooled)?;
            let path = self.path();
            if r.unreadable > 0 {
                tracing::warn!(message = "Unreadable lines in the notify spool were skipped; the alerts they held are counted as lost.", path = %path.display(), skipped = r.unreadable, lost = r.lost);
            }
            if r.torn {
                tracing::warn!(message = "The notify spool ends in a torn line (a crash while writing); it is skipped and the spool rewritten.", path = %path.display());
                self.stale = true;
            }
            loaded.lost = r.lost;
        }
        for q in loaded.spooled.values_mut() {
            let over = q.alerts.len().saturating_sub(cap);
            q.alerts.drain(..over);
            q.over += over as u64;
        }
        loaded
            .spooled
            .retain(|_, q| !q.alerts.is_empty() || q.over > 0);
        Ok(loaded)
    }

    /// Appends `records` in one write; fsynced when one of them is an `add`. On an error the
    /// handle is closed and the journal is stale: the write may have left part of a line.
    pub fn append(&mut self, records: &[Record]) -> std::io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        if self.stale {
            return Err(std::io::Error::other(
                "the spool must be rewritten before it is appended to",
            ));
        }
        let result = self.write(records);
        if result.is_err() {
            self.file = None;
            self.stale = true;
        }
        result
    }

    fn write(&mut self, records: &[Record]) -> std::io::Result<()> {
        let mut data = Vec::new();
        for r in records {
            serde_json::to_writer(&mut data, r).map_err(std::io::Error::other)?;
            data.push(b'\n');
        }
        let file = match &mut self.file {
            Some(f) => f,
            None => {
                self.ensure_dir()?;
                let f = files::open_append(&self.path(), 0o600)?;
                // The file may have just been created: its name must be on disk before an
                // `add` in it counts as spooled.
                sync_dir(&self.dir)?;
                self.file.insert(f)
            }
        };
        file.write_all(&data)?;
        let adds = records
            .iter()
            .filter(|r| matches!(r, Record::Add { .. }))
            .count();
        if adds > 0 {
            file.sync_data()?;
        }
        self.done += records.len() - adds;
        Ok(())
    }

    /// Whether enough `done` records piled up to rewrite the `live` alerts.
    pub fn wants_compaction(&self, live: usize) -> bool {
        self.done >= COMPACT_MIN && self.done > live
    }

    /// Rewrites the file as the `add`s of `spooled` (atomically, fsynced, the directory too),
    /// or removes it when nothing is spooled; the earlier version's spool goes too.
    pub fn compact(&mut self, spooled: &Spooled) -> std::io::Result<()> {
        self.file = None;
        let mut data = Vec::new();
        for (sink, queue) in spooled {
            for alert in &queue.alerts {
                let r = Record::Add {
                    sink: sink.clone(),
                    target: queue.target.clone(),
                    alert: Box::new(alert.clone()),
                };
                serde_json::to_writer(&mut data, &r).map_err(std::io::Error::other)?;
                data.push(b'\n');
            }
        }
        let mut removed = false;
        if data.is_empty() {
            removed |= remove(&self.path())?;
        } else {
            self.ensure_dir()?;
            files::write_atomic(&self.path(), &data, 0o600, true)?;
        }
        removed |= remove(&self.dir.join(LEGACY_FILE))?;
        if removed {
            // Else a power loss could bring back a spool whose alerts were all delivered.
            sync_dir(&self.dir)?;
        }
        self.done = 0;
        self.stale = false;
        Ok(())
    }

    /// Swaps the append handle for one whose writes fail, as after a disk error.
    #[cfg(test)]
    pub(super) fn fail_writes(&mut self) {
        self.file = File::open(self.path()).ok();
    }

    /// Creates the spool directory if missing, and makes its name durable when it does.
    fn ensure_dir(&self) -> std::io::Result<()> {
        let existed = self.dir.is_dir();
        files::ensure_dir(&self.dir)?;
        if !existed {
            if let Some(parent) = self.dir.parent() {
                sync_dir(parent)?;
            }
        }
        Ok(())
    }

    /// A rewrite's temp file (`.notify.jsonl.<pid>.<n>.tmp`) that a crash left before its
    /// rename: it holds alerts the journal has anyway, and each crash would add one.
    fn remove_temp_files(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let prefix = format!(".{JOURNAL_FILE}.");
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Removes `path`; whether there was one.
fn remove(path: &Path) -> std::io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Makes the entries of `dir` (a file created, renamed or removed) durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Opens the journal to read it: never through a symlink, never waiting on a FIFO, only a
/// regular file; `None` when there is none.
fn open_read(path: &Path) -> std::io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not a regular file; remove it", path.display()),
        ));
    }
    Ok(Some(f))
}

/// What a replay met besides good lines.
#[derive(Debug, Default)]
struct Replay {
    /// Unreadable lines skipped (a torn last line not included).
    unreadable: usize,
    /// Of those and the torn line, the ones that were not a `done`: alerts lost.
    lost: u64,
    torn: bool,
}

/// Applies each line to `spooled`; a `done` removes the sink's alert with that id. A queue is
/// kept under twice `cap` while replaying (a full queue's `add` comes just before the `done`
/// that pushes its oldest out), so memory is bounded whatever the file holds.
fn replay(mut r: impl BufRead, cap: usize, spooled: &mut Spooled) -> std::io::Result<Replay> {
    let mut out = Replay::default();
    let mut line = Vec::new();
    let bound = cap.saturating_mul(2).max(1);
    loop {
        line.clear();
        let n = (&mut r)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        // The end of the file came before the end of the line (or the line is too long).
        let torn = line.last() != Some(&b'\n');
        if torn && line.len() > MAX_LINE {
            // Longer than anything written: skipped without holding it.
            let ended = skip_line(&mut r)?;
            out.torn |= !ended;
            out.unreadable += usize::from(ended);
            out.lost += u64::from(!is_done(&line));
            continue;
        }
        if !torn {
            line.pop();
        }
        // Blocks a power loss left unwritten read as zeros: no record was acknowledged there
        // (an `add` returns only after its fsync).
        let unwritten = line.iter().all(|b| *b == 0);
        if !unwritten && !apply(&line, spooled, bound) {
            out.unreadable += usize::from(!torn);
            out.lost += u64::from(!is_done(&line));
        }
        if torn {
            out.torn = true;
            break;
        }
    }
    Ok(out)
}

/// Applies one line; `false` when it is not a record.
fn apply(line: &[u8], spooled: &mut Spooled, bound: usize) -> bool {
    match serde_json::from_slice::<Record>(line) {
        Ok(Record::Add {
            sink,
            target,
            alert,
        }) => {
            let q = spooled.entry(sink).or_default();
            if target.is_some() {
                q.target = target;
            }
            q.alerts.push_back(*alert);
            if q.alerts.len() > bound {
                q.alerts.pop_front();
                q.over += 1;
            }
        }
        Ok(Record::Done { sink, id }) => {
            if let Some(q) = spooled.get_mut(&sink) {
                if let Some(i) = q.alerts.iter().position(|a| a.id == id) {
                    q.alerts.remove(i);
                }
            }
        }
        Err(_) => return false,
    }
    true
}

/// A `done` record's line, by its start (the tag is written first): losing one only sends an
/// alert again.
fn is_done(line: &[u8]) -> bool {
    line.starts_with(br#"{"op":"done""#)
}

/// Consumes the rest of an over-long line; `false` when the file ended first.
fn skip_line(r: &mut impl BufRead) -> std::io::Result<bool> {
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(false);
        }
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            r.consume(i + 1);
            return Ok(true);
        }
        let n = buf.len();
        r.consume(n);
    }
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
            target: Some(format!("{sink}-target")),
            alert: Box::new(alert(n)),
        }
    }

    fn done(sink: &str, n: u64) -> Record {
        Record::Done {
            sink: sink.into(),
            id: format!("id-{n}"),
        }
    }

    fn load(dir: &Path) -> Loaded {
        Journal::new(dir).load(1000).unwrap()
    }

    fn messages(s: &Spooled, sink: &str) -> Vec<String> {
        s.get(sink)
            .map(|q| q.alerts.iter().map(|a| a.message.clone()).collect())
            .unwrap_or_default()
    }

    fn append_raw(path: &Path, bytes: &[u8]) {
        let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(bytes).unwrap();
    }

    #[test]
    fn replay_gives_the_queues_in_order_a_torn_tail_is_skipped_and_compaction_keeps_them() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::new(d.path());
        j.append(&[add("hook", 1), add("hook", 2), add("chat", 3)])
            .unwrap();
        j.append(&[done("hook", 1), add("hook", 4)]).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(j.path()).unwrap().mode() & 0o777, 0o600);
        // A crash in the middle of an append.
        append_raw(&j.path(), b"{\"op\":\"add\",\"sink\":\"ho");
        let mut next = Journal::new(d.path());
        let l = next.load(1000).unwrap();
        assert_eq!(messages(&l.spooled, "hook"), ["restart 2", "restart 4"]);
        assert_eq!(messages(&l.spooled, "chat"), ["restart 3"]);
        assert_eq!(l.spooled["hook"].target.as_deref(), Some("hook-target"));
        assert_eq!(l.lost, 1, "the torn add is counted");
        assert!(
            next.is_stale(),
            "a torn file is rewritten before any append"
        );
        assert!(next.append(&[add("hook", 5)]).is_err());
        next.compact(&l.spooled).unwrap();
        assert!(!next.is_stale());
        let again = load(d.path());
        assert_eq!((again.spooled.clone(), again.lost), (l.spooled.clone(), 0));
        next.append(&[done("hook", 2), done("hook", 4), done("chat", 3)])
            .unwrap();
        let empty = load(d.path());
        assert!(empty.spooled.is_empty());
        next.compact(&empty.spooled).unwrap();
        assert!(!next.path().exists(), "an empty spool is no file");
    }

    #[test]
    fn a_power_loss_tail_of_zeros_or_a_record_without_its_newline_is_neither_fatal_nor_lost() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::new(d.path());
        j.append(&[add("hook", 1)]).unwrap();
        // The last record whole but for its newline: applied.
        let line = serde_json::to_vec(&add("hook", 2)).unwrap();
        append_raw(&j.path(), &line);
        let mut next = Journal::new(d.path());
        let l = next.load(1000).unwrap();
        assert_eq!(messages(&l.spooled, "hook"), ["restart 1", "restart 2"]);
        assert_eq!(l.lost, 0);
        assert!(next.is_stale());
        next.compact(&l.spooled).unwrap();
        // Blocks the file's size covered but a power loss never wrote: zeros, no newline.
        append_raw(&next.path(), &[0u8; 4096]);
        let mut after = Journal::new(d.path());
        let l = after.load(1000).unwrap();
        assert_eq!(messages(&l.spooled, "hook"), ["restart 1", "restart 2"]);
        assert_eq!(l.lost, 0, "nothing acknowledged was there");
        assert!(after.is_stale());
        // Zeros then a newline (a later block written first) are skipped the same way.
        let mut zeros = vec![0u8; 100];
        zeros.push(b'\n');
        append_raw(&after.path(), b"\n");
        append_raw(&after.path(), &zeros);
        let l = Journal::new(d.path()).load(1000).unwrap();
        assert_eq!(l.lost, 0);
    }

    #[test]
    fn an_earlier_versions_spool_is_read_and_folded_in() {
        let d = tempfile::tempdir().unwrap();
        let mut old: BTreeMap<String, VecDeque<Alert>> = BTreeMap::new();
        old.entry("hook".into()).or_default().push_back(alert(1));
        SpoolFile::new(d.path(), LEGACY_FILE)
            .store(Some(&old))
            .unwrap();
        let mut j = Journal::new(d.path());
        let s = j.load(1000).unwrap().spooled;
        assert_eq!(messages(&s, "hook"), ["restart 1"]);
        j.compact(&s).unwrap();
        assert!(!d.path().join(SPOOL_DIR).join(LEGACY_FILE).exists());
        assert_eq!(load(d.path()).spooled, s);
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

    /// The journal was read through the 16 MiB state-file cap: the alerts written after it
    /// (and the `done`s) were lost, and delivered ones sent again.
    #[test]
    fn a_journal_larger_than_sixteen_mib_is_read_to_its_last_line() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::new(d.path());
        let big = |n: u64| {
            let mut a = alert(n);
            a.message = format!("restart {n} {}", "x".repeat(4000));
            Record::Add {
                sink: "hook".into(),
                target: None,
                alert: Box::new(a),
            }
        };
        let n = 4500u64;
        j.append(&(0..n).map(big).collect::<Vec<_>>()).unwrap();
        j.append(&(0..n - 2).map(|i| done("hook", i)).collect::<Vec<_>>())
            .unwrap();
        let size = std::fs::metadata(j.path()).unwrap().len();
        assert!(size > files::MAX_STATE_FILE + 1_000_000, "{size}");
        let l = Journal::new(d.path()).load(10_000).unwrap();
        let ids: Vec<&str> = l.spooled["hook"]
            .alerts
            .iter()
            .map(|a| a.id.as_str())
            .collect();
        assert_eq!(ids, ["id-4498", "id-4499"]);
        assert_eq!(l.lost, 0);
    }

    #[test]
    fn a_line_longer_than_any_written_is_skipped_and_counted_not_held_in_memory() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::new(d.path());
        j.append(&[add("hook", 1)]).unwrap();
        let mut junk = vec![b'x'; 3 * MAX_LINE];
        junk.push(b'\n');
        append_raw(&j.path(), &junk);
        append_raw(&j.path(), b"not json\n");
        append_raw(&j.path(), b"{\"op\":\"done\",\"sink\":\"hook\",\"id\":\n");
        Journal::new(d.path()).append(&[add("hook", 2)]).unwrap();
        let mut next = Journal::new(d.path());
        let l = next.load(1000).unwrap();
        assert_eq!(messages(&l.spooled, "hook"), ["restart 1", "restart 2"]);
        assert_eq!(l.lost, 2, "the long line and the junk, not the broken done");
        assert!(!next.is_stale(), "the file ends at a line's end");
        // A record that long is refused before it is written.
        let mut a = alert(9);
        a.message = "y".repeat(MAX_LINE);
        let long = Record::Add {
            sink: "hook".into(),
            target: None,
            alert: Box::new(a),
        };
        assert!(long.too_long());
        assert!(!add("hook", 9).too_long());
    }

    #[test]
    fn replay_keeps_at_most_the_cap_and_counts_the_oldest_beyond_it() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::new(d.path());
        j.append(&(0..10).map(|n| add("hook", n)).collect::<Vec<_>>())
            .unwrap();
        let l = Journal::new(d.path()).load(3).unwrap();
        assert_eq!(
            messages(&l.spooled, "hook"),
            ["restart 7", "restart 8", "restart 9"]
        );
        assert_eq!(l.spooled["hook"].over, 7);
    }

    #[test]
    fn a_rewrite_that_a_crash_left_as_a_temp_file_is_removed_at_load() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::new(d.path());
        j.append(&[add("hook", 1)]).unwrap();
        let dir = d.path().join(SPOOL_DIR);
        let tmp = dir.join(format!(".{JOURNAL_FILE}.4242.7.tmp"));
        std::fs::write(&tmp, b"alert text").unwrap();
        let other = dir.join(".pending.json.4242.7.tmp");
        std::fs::write(&other, b"the AWS sink's").unwrap();
        let l = Journal::new(d.path()).load(1000).unwrap();
        assert_eq!(messages(&l.spooled, "hook"), ["restart 1"]);
        assert!(!tmp.exists());
        assert!(other.exists(), "only the journal's own temp files");
    }

    #[test]
    fn a_failed_append_closes_the_handle_and_nothing_is_appended_until_a_rewrite() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::new(d.path());
        j.append(&[add("hook", 1)]).unwrap();
        j.fail_writes();
        assert!(j.append(&[add("hook", 2)]).is_err());
        assert!(j.is_stale() && j.file.is_none());
        assert!(j.append(&[add("hook", 3)]).is_err(), "not appended to");
        let mut s = Spooled::new();
        let q = s.entry("hook".into()).or_default();
        q.alerts.extend([alert(1), alert(2), alert(3)]);
        j.compact(&s).unwrap();
        j.append(&[add("hook", 4)]).unwrap();
        assert_eq!(
            messages(&load(d.path()).spooled, "hook"),
            ["restart 1", "restart 2", "restart 3", "restart 4"]
        );
    }

    /// Set by the trace test for its child run of `journal_steps_for_the_trace`.
    const TRACE_DIR: &str = "PMGUARD_JOURNAL_TRACE_DIR";

    fn marker(dir: &Path, step: &str) {
        let _ = std::fs::symlink_metadata(dir.join(format!("marker-{step}")));
    }

    /// The steps the trace test watches; does nothing unless that test runs it.
    #[test]
    fn journal_steps_for_the_trace() {
        let Some(dir) = std::env::var_os(TRACE_DIR) else {
            return;
        };
        let dir = Path::new(&dir);
        let mut j = Journal::new(dir);
        marker(dir, "create");
        j.append(&[add("hook", 1)]).unwrap();
        marker(dir, "rewrite");
        let mut s = Spooled::new();
        s.entry("hook".into())
            .or_default()
            .alerts
            .push_back(alert(1));
        j.compact(&s).unwrap();
        marker(dir, "append");
        j.append(&[add("hook", 2)]).unwrap();
        marker(dir, "remove");
        j.compact(&Spooled::new()).unwrap();
        marker(dir, "create-again");
        j.append(&[add("hook", 3)]).unwrap();
        marker(dir, "end");
    }

    /// Run under strace: each time the journal's name is created, replaced or removed (or the
    /// spool directory made), the directory holding it is fsynced before the step returns;
    /// else a power loss can take back a spooled alert's file.
    #[test]
    fn the_directory_is_fsynced_whenever_the_journal_is_created_replaced_or_removed() {
        use std::process::Command;
        if Command::new("strace").arg("-V").output().is_err() {
            eprintln!("skipped: strace is not installed");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let trace = d.path().join("trace");
        let state = d.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let calls = "trace=openat,open,fsync,fdatasync,rename,renameat,renameat2,unlink,unlinkat,mkdir,mkdirat,newfstatat,statx,lstat";
        let run = Command::new("strace")
            .args(["-f", "-qq", "-e", calls, "-o"])
            .arg(&trace)
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "notify::journal::tests::journal_steps_for_the_trace",
                "--test-threads=1",
            ])
            .env(TRACE_DIR, &state)
            .output()
            .unwrap();
        assert!(run.status.success(), "{run:?}");
        let text = std::fs::read_to_string(&trace).unwrap();
        let spool = state.join(SPOOL_DIR);
        let journal = spool.join(JOURNAL_FILE);
        // Per step: the directories whose entries changed, not yet fsynced.
        let mut fds: BTreeMap<String, String> = BTreeMap::new();
        let mut pending: Vec<(PathBuf, &str)> = Vec::new();
        let mut step = String::new();
        let mut seen = Vec::new();
        // The step's calls, shown on a failure.
        let mut calls_in_step: Vec<&str> = Vec::new();
        for line in text.lines() {
            if line.contains(&*state.to_string_lossy()) || line.contains("fsync(") {
                calls_in_step.push(line);
            }
            // "<pid> call(args) = result"
            let call = line.split_once(' ').map_or(line, |(_, c)| c).trim_start();
            let result = call.rsplit_once(" = ").map(|(_, r)| r.trim());
            let paths: Vec<&str> = call.split('"').skip(1).step_by(2).collect();
            let last = paths.last().map(Path::new);
            if let Some(m) = paths.iter().find_map(|p| p.rsplit_once("/marker-")) {
                assert!(
                    pending.is_empty(),
                    "step {step}: no fsync after {pending:?}:\n{}",
                    calls_in_step.join("\n")
                );
                calls_in_step.clear();
                step = m.1.to_string();
                seen.push(step.clone());
                continue;
            }
            if call.starts_with("open") {
                if let Some(fd) = result.filter(|r| !r.starts_with('-')) {
                    fds.insert(fd.to_string(), paths.first().unwrap_or(&"").to_string());
                }
                if last == Some(&*journal) && call.contains("O_CREAT") {
                    pending.push((spool.clone(), "create"));
                }
            } else if call.starts_with("rename") && last == Some(&*journal) {
                pending.push((spool.clone(), "rename"));
            } else if call.starts_with("unlink") && last == Some(&*journal) {
                pending.push((spool.clone(), "unlink"));
            } else if call.starts_with("mkdir") && last == Some(&*spool) {
                pending.push((state.clone(), "mkdir"));
            } else if let Some(fd) = call.strip_prefix("fsync(") {
                let fd = fd.split(')').next().unwrap_or("");
                if let Some(path) = fds.get(fd) {
                    pending.retain(|(dir, _)| dir != Path::new(path));
                }
            }
        }
        assert_eq!(
            seen,
            [
                "create",
                "rewrite",
                "append",
                "remove",
                "create-again",
                "end"
            ],
            "the steps' markers are not in the trace:\n{}",
            calls_in_step.join("\n")
        );
    }
}
