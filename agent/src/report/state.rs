//! What the agent keeps in its state directory, and how the daemon and the backup check share it.
//!
//! - `status.json`: each app's state (0640), rewritten at the next heartbeat when something a
//!   person acts on changed (health, failures, instances, restarts, pauses), when someone opens
//!   it and it is `ASK_MIN_MS` old or more (the daemon watches the directory; `read_status_fresh`
//!   then waits for the new file), and else every `STATUS_QUIET_REFRESH_MS`
//!   (`STATUS_REFRESH_MS` without the watch or with a Prometheus textfile, whose reader cannot
//!   ask). Latency, CPU and memory in it are as old as the last write.
//! - `heartbeat`: the daemon's liveness, one fixed-size line rewritten in place once per check
//!   period (1-5 s; 0640): one `pwrite`, not a new file. `read_status` lays it over `status.json`
//!   when both come from the same daemon, so every reader judges freshness as before.
//! - `restarts.json`: every restart pmguard made, per app, with the crash-loop backoff (0600).
//!   It is read and written only under `restart.lock`, so the daemon and `check --once` can never
//!   both restart one app inside its cooldown. Times are `Mono` of the boot named in the file.
//! - `agent.lock`: held by the running daemon for its whole life (one daemon per state dir).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock;
use crate::clock::Mono;
use crate::policy::{AppState, Health};
use crate::sys::files::{self, Lock, LockError};

pub const STATUS_FILE: &str = "status.json";
/// The same name for the directory watch (`sys::dirwatch`).
pub const STATUS_FILE_C: &std::ffi::CStr = c"status.json";
pub const HEARTBEAT_FILE: &str = "heartbeat";
/// The longest `status.json` goes without a rewrite while nothing significant changes, when
/// readers cannot ask for a fresh one (no directory watch) or a Prometheus textfile is kept.
pub const STATUS_REFRESH_MS: u64 = 5_000;
/// The same while the daemon answers readers' opens (`StatusFile::fresh_on_read`).
pub const STATUS_QUIET_REFRESH_MS: u64 = 60_000;
/// A reader's open of `status.json` is answered with a new file when the last one is at least
/// this old; a younger one is what it reads. A reader that waits for the answer
/// (`read_status_fresh`) sees data at most about this old; one that reads the file it opened
/// sees what was there (up to `STATUS_QUIET_REFRESH_MS` old; its `updated_at` says).
pub const ASK_MIN_MS: u64 = 1_000;
/// How long `read_status_fresh` waits for the daemon's answer before it shows what it read.
pub const ASK_WAIT: Duration = Duration::from_secs(2);
/// See `StatusFile::is_fresh`.
pub const FRESH_SLACK_MS: u64 = 2_000;
pub const RESTARTS_FILE: &str = "restarts.json";
pub const AGENT_LOCK: &str = "agent.lock";
pub const RESTART_LOCK: &str = "restart.lock";

/// The persisted part of one app's restart history.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AppRestarts {
    pub restarts: Vec<Mono>,
    pub backoff_ms: Option<u64>,
    pub hold_until: Option<Mono>,
    pub retried: bool,
}

impl AppRestarts {
    pub fn from_state(s: &AppState) -> AppRestarts {
        AppRestarts {
            restarts: s.restarts.iter().copied().collect(),
            backoff_ms: s.backoff,
            hold_until: s.hold_until,
            retried: s.retried,
        }
    }

    /// Copies the persisted history into a live state (keeps the live probe counters).
    pub fn apply_to(&self, s: &mut AppState) {
        s.restarts = self.restarts.iter().copied().collect::<VecDeque<_>>();
        s.backoff = self.backoff_ms;
        s.hold_until = self.hold_until;
        s.retried = self.retried;
    }

    pub fn last(&self) -> Option<Mono> {
        self.restarts.last().copied()
    }
}

/// `restarts.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RestartBook {
    /// `clock::boot_epoch()` of the boot these `Mono` times belong to.
    pub boot_epoch: u64,
    pub apps: BTreeMap<String, AppRestarts>,
    /// When pmguard last ran `pm2 resurrect`.
    pub resurrected_at: Option<Mono>,
    /// A person stopped PM2 with `pm2 kill` (seen on its bus): no resurrect until a daemon
    /// answers again. Shared with the backup check, which cannot see the bus.
    #[serde(default)]
    pub pm2_stopped_on_purpose: bool,
}

/// The state directory of one agent.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: &Path) -> StateDir {
        StateDir {
            dir: dir.to_path_buf(),
        }
    }

    pub fn create(&self) -> std::io::Result<()> {
        files::ensure_dir(&self.dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Takes the daemon's life-long lock, or reports that another daemon holds it.
    pub fn lock_agent(&self) -> Result<Lock, LockError> {
        Lock::try_take(&self.path(AGENT_LOCK))
    }

    pub fn lock_restarts(&self, wait: Duration) -> Result<Lock, LockError> {
        Lock::take(&self.path(RESTART_LOCK), wait)
    }

    /// Reads `restarts.json`. A file from another boot yields an empty book; a corrupt one is
    /// moved aside to `restarts.json.corrupt` (and said so), never silently overwritten.
    pub fn read_restarts(&self) -> RestartBook {
        let path = self.path(RESTARTS_FILE);
        let fresh = RestartBook {
            boot_epoch: clock::boot_epoch(),
            ..RestartBook::default()
        };
        match files::read_optional(&path) {
            Ok(None) => fresh,
            Ok(Some(bytes)) => match serde_json::from_slice::<RestartBook>(&bytes) {
                Ok(book) if clock::same_boot(book.boot_epoch) => book,
                Ok(_) => fresh,
                Err(error) => {
                    let aside = self.path("restarts.json.corrupt");
                    let _ = std::fs::rename(&path, &aside);
                    tracing::warn!(message = "Restart history is corrupt; moved aside.", path = %aside.display(), %error);
                    fresh
                }
            },
            Err(error) => {
                tracing::warn!(message = "Cannot read restart history.", path = %path.display(), %error);
                fresh
            }
        }
    }

    pub fn write_restarts(&self, book: &RestartBook) -> std::io::Result<()> {
        let data = serde_json::to_vec_pretty(book).map_err(std::io::Error::other)?;
        files::write_atomic(&self.path(RESTARTS_FILE), &data, 0o600, true)
    }

    /// `status.json`'s bytes. Compact: it is rewritten every check period (`status --json`
    /// pretty-prints).
    pub fn encode_status<A: Serialize>(status: &StatusFile<A>) -> std::io::Result<Vec<u8>> {
        serde_json::to_vec(status).map_err(std::io::Error::other)
    }

    /// Replaces `status.json` with `data` from `encode_status`.
    pub fn write_status(&self, data: &[u8]) -> std::io::Result<()> {
        files::write_atomic(&self.path(STATUS_FILE), data, 0o640, false)
    }

    /// `status.json` with the newest heartbeat of the daemon that wrote it.
    pub fn read_status(&self) -> Result<Option<StatusFile>, StatusReadError> {
        let Some((mut status, _)) = self.read_status_file()? else {
            return Ok(None);
        };
        if let Some(beat) = self.read_beat() {
            beat.lay_over(&mut status);
        }
        Ok(Some(status))
    }

    /// `read_status` for a person: the open of `status.json` asks a live daemon that watches
    /// its directory for a new one (see the module's doc), and this waits up to `wait` for it
    /// when what it read is `ASK_MIN_MS` old or more. The backup check does not use it: it
    /// judges the heartbeat only, and must not wait on a wedged daemon.
    pub fn read_status_fresh(&self, wait: Duration) -> Result<Option<StatusFile>, StatusReadError> {
        let Some((mut status, id)) = self.read_status_file()? else {
            return Ok(None);
        };
        // The file's own age: its `heartbeat` before the heartbeat file is laid over it.
        let written_age = status.age_ms();
        if let Some(b) = self.read_beat() {
            b.lay_over(&mut status);
        }
        // With a margin: the daemon may judge the age a little before this reader does, and a
        // file it found young enough is not followed by a new one.
        let asked = status.fresh_on_read
            && written_age.is_some_and(|a| a >= ASK_MIN_MS + 200)
            && beating(&status);
        if !asked {
            return Ok(Some(status));
        }
        let path = self.path(STATUS_FILE);
        let until = std::time::Instant::now() + wait;
        while std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
            if files::file_id(&path) == Some(id) {
                continue;
            }
            // The new file (or, should it be gone again, what was read).
            return Ok(self.read_status()?.or(Some(status)));
        }
        Ok(Some(status))
    }

    /// `status.json` as written, and which file it was.
    fn read_status_file(&self) -> Result<Option<(StatusFile, files::FileId)>, StatusReadError> {
        let path = self.path(STATUS_FILE);
        let shown = || path.display().to_string();
        match files::read_capped_id(&path, files::MAX_STATE_FILE) {
            Ok(None) => Ok(None),
            Ok(Some((b, id))) => {
                let status: StatusFile =
                    serde_json::from_slice(&b).map_err(|source| StatusReadError::Json {
                        path: shown(),
                        source,
                    })?;
                Ok(Some((status, id)))
            }
            Err(source) => Err(StatusReadError::Io {
                path: shown(),
                source,
            }),
        }
    }
}

impl StateDir {
    /// Opens (creating, 0640) the heartbeat file for in-place rewrites. Never through a
    /// symlink, never blocking on a FIFO; anything but a regular file is refused.
    pub fn open_heartbeat(&self) -> std::io::Result<HeartbeatFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(self.path(HEARTBEAT_FILE))?;
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} is not a regular file; remove it",
                    self.path(HEARTBEAT_FILE).display()
                ),
            ));
        }
        Ok(HeartbeatFile { file })
    }

    /// The last beat, if the file holds one. A read that raced a rewrite is read again.
    pub fn read_beat(&self) -> Option<Beat> {
        (0..3).find_map(|_| {
            let bytes =
                files::read_capped(&self.path(HEARTBEAT_FILE), 2 * BEAT_LEN as u64).ok()??;
            Beat::parse(&bytes)
        })
    }
}

/// Whether the daemon that wrote `status` is beating now: its heartbeat no older than one
/// period plus slack (a live one beats every period; `is_fresh` allows three, for the backup
/// check's sake) and its pid still there. A reader does not wait on a dead or frozen daemon.
fn beating(status: &StatusFile) -> bool {
    let recent = status
        .age_ms()
        .is_some_and(|age| age <= status.interval_ms.max(1_000) + 1_500);
    let alive = rustix::process::Pid::from_raw(status.pid as i32).is_some_and(|pid| {
        // EPERM: alive, another user's (a reader who is not the PM2 user).
        !matches!(
            rustix::process::test_kill_process(pid),
            Err(e) if e == rustix::io::Errno::SRCH
        )
    });
    recent && alive
}

/// One heartbeat: which daemon, on which boot, when, and how often it beats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    pub pid: u32,
    pub boot_epoch: u64,
    pub heartbeat: Mono,
    pub interval_ms: u64,
}

/// Every beat is exactly this long, so a rewrite in place never leaves a stale tail.
const BEAT_LEN: usize = 80;

impl Beat {
    fn encode(&self) -> [u8; BEAT_LEN] {
        let text = format!(
            "pmguard-heartbeat 1 pid={} boot={} mono={} interval={}",
            self.pid, self.boot_epoch, self.heartbeat, self.interval_ms
        );
        let mut out = [b' '; BEAT_LEN];
        let n = text.len().min(BEAT_LEN - 1);
        out[..n].copy_from_slice(&text.as_bytes()[..n]);
        out[BEAT_LEN - 1] = b'\n';
        out
    }

    fn parse(bytes: &[u8]) -> Option<Beat> {
        if bytes.len() != BEAT_LEN || bytes[BEAT_LEN - 1] != b'\n' {
            return None;
        }
        let text = std::str::from_utf8(bytes).ok()?;
        let mut words = text.split_ascii_whitespace();
        if (words.next(), words.next()) != (Some("pmguard-heartbeat"), Some("1")) {
            return None;
        }
        let mut field =
            |key: &str| -> Option<u64> { words.next()?.strip_prefix(key)?.parse().ok() };
        Some(Beat {
            pid: u32::try_from(field("pid=")?).ok()?,
            boot_epoch: field("boot=")?,
            heartbeat: field("mono=")?,
            interval_ms: field("interval=")?,
        })
    }

    /// A newer beat of the daemon that wrote `status` refreshes its heartbeat.
    fn lay_over(&self, status: &mut StatusFile) {
        // Two readings of one boot's epoch differ by jitter (see `clock::same_boot`); a pid
        // reused after a reboot is told apart by the boot.
        let same_boot = self.boot_epoch.abs_diff(status.boot_epoch) < 30_000;
        if self.pid == status.pid && same_boot && self.heartbeat > status.heartbeat {
            status.heartbeat = self.heartbeat;
            status.interval_ms = self.interval_ms;
        }
    }
}

/// The open heartbeat file: each beat is one `pwrite` at offset 0.
#[derive(Debug)]
pub struct HeartbeatFile {
    file: std::fs::File,
}

impl HeartbeatFile {
    pub fn beat(&self, beat: &Beat) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(&beat.encode(), 0)
    }
}

/// Why `status.json` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusReadError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
}

/// One probe in the response-time history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeRecord {
    pub ts_ms: u64,
    pub ok: bool,
    pub latency_ms: u64,
    pub result: String,
    /// Days until the soonest-expiring certificate of the app's https probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_days: Option<i64>,
}

/// One restart as shown by `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestartRecord {
    pub ts_ms: u64,
    pub reason: String,
    pub pm_ids: Vec<u32>,
}

/// One PM2 instance as last seen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub pm_id: u32,
    pub pid: u32,
    pub status: String,
    pub cpu_pct: Option<f64>,
    pub memory: u64,
    pub restart_time: u64,
    /// PM2's error log of this instance (`pm_err_log_path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub err_log: Option<PathBuf>,
}

/// One app in `status.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppStatus {
    pub name: String,
    pub health: Health,
    pub failures: u32,
    pub max_retries: u32,
    /// Checks made since the agent (or this app's watcher) started.
    #[serde(default)]
    pub checks: u64,
    pub note: Option<String>,
    pub last_check_ms: Option<u64>,
    pub instances: Vec<InstanceStatus>,
    pub probes: VecDeque<ProbeRecord>,
    pub restarts: VecDeque<RestartRecord>,
    /// A maintenance pause in force (`pmguard-agent pause`): checked, never acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<crate::report::pauses::Pause>,
}

/// `status.json`: the heartbeat and the board. Written as `StatusFile<&AppStatus>`, borrowing
/// the live board instead of copying it once per heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusFile<A = AppStatus> {
    pub pid: u32,
    pub version: String,
    /// `clock::boot_epoch()` of the daemon that wrote it.
    pub boot_epoch: u64,
    /// `Mono` of the last heartbeat (compare with `clock::mono_now()` on the same boot).
    pub heartbeat: Mono,
    pub updated_at: String,
    /// How often the daemon rewrites the heartbeat (1-5 s): older than 3 of these is stale.
    pub interval_ms: u64,
    /// The revision of `pauses.json` this daemon applied (`pause` waits for it).
    #[serde(default)]
    pub pauses_revision: u64,
    /// The daemon watches its directory: opening this file asks it for a new one (see
    /// `StateDir::read_status_fresh`).
    #[serde(default)]
    pub fresh_on_read: bool,
    pub apps: Vec<A>,
    /// The `[[notify]]` sinks' counters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<SinkStatus>,
    /// Alerts lost before a sink kept them: events a full notify inbox turned away, and the
    /// queued alerts of a sink a reload removed. Counted once for the agent, not per sink.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub notify_lost: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One `[[notify]]` sink in `status` (and `status.json`, the Prometheus textfile).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SinkStatus {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Scheme and host only (`Url::redacted`).
    pub url: String,
    /// Accepted and not yet delivered (spooled).
    pub queued: usize,
    /// Since the agent started.
    pub delivered: u64,
    /// Refused by the endpoint (a 4xx), or pushed out of a full queue, since the agent started.
    pub dropped: u64,
    /// Held back by the rate limit since the agent started.
    pub held_back: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_at: Option<String>,
}

impl StatusFile {
    /// How old the heartbeat is, or `None` if it is from another boot.
    pub fn age_ms(&self) -> Option<u64> {
        clock::same_boot(self.boot_epoch).then(|| clock::mono_now().saturating_sub(self.heartbeat))
    }

    /// Fresh = beaten by a live daemon within 3 check periods, plus 2 s of slack for a box
    /// so loaded that the watch loop beats late (a false "dead" would make the backup
    /// check act beside a live daemon).
    pub fn is_fresh(&self) -> bool {
        self.age_ms()
            .is_some_and(|age| age <= 3 * self.interval_ms.max(1_000) + FRESH_SLACK_MS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_book_round_trips_and_survives_corruption() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path());
        let mut book = s.read_restarts();
        assert!(book.apps.is_empty());
        book.apps.insert(
            "web".into(),
            AppRestarts {
                restarts: vec![5, 9],
                backoff_ms: Some(300_000),
                hold_until: Some(99),
                retried: true,
            },
        );
        s.write_restarts(&book).unwrap();
        assert_eq!(s.read_restarts(), book);
        std::fs::write(s.path(RESTARTS_FILE), b"{ not json").unwrap();
        assert!(s.read_restarts().apps.is_empty());
        assert_eq!(
            std::fs::read(s.path("restarts.json.corrupt")).unwrap(),
            b"{ not json"
        );
        // Another boot's times mean nothing here.
        let mut other = book.clone();
        other.boot_epoch -= 3_600_000;
        s.write_restarts(&other).unwrap();
        assert!(s.read_restarts().apps.is_empty());
    }

    #[test]
    fn a_beat_refreshes_only_its_own_daemons_status() {
        let d = tempfile::tempdir().unwrap();
        let state = StateDir::new(d.path());
        let text = r#"{"pid":7,"version":"0.1.0","boot_epoch":100,"heartbeat":2000,"updated_at":"x","interval_ms":1000,"apps":[]}"#;
        state.write_status(text.as_bytes()).unwrap();
        let hb = state.open_heartbeat().unwrap();
        let beat = |pid, boot, mono| Beat {
            pid,
            boot_epoch: boot,
            heartbeat: mono,
            interval_ms: 2000,
        };
        hb.beat(&beat(7, 100, 9_000)).unwrap();
        let s = state.read_status().unwrap().unwrap();
        assert_eq!((s.heartbeat, s.interval_ms), (9_000, 2000));
        // Rewritten in place: a shorter number leaves no stale digits behind.
        hb.beat(&beat(7, 100, 3_000)).unwrap();
        assert_eq!(state.read_beat(), Some(beat(7, 100, 3_000)));
        // Another daemon's (or another boot's) beat says nothing about this status.
        hb.beat(&beat(7, 100 + 20, 4_000)).unwrap();
        let s = state.read_status().unwrap().unwrap();
        assert_eq!(s.heartbeat, 4_000, "jitter in the boot epoch");
        for other in [beat(8, 100, 99_000), beat(7, 100 + 3_600_000, 99_000)] {
            hb.beat(&other).unwrap();
            assert_eq!(state.read_status().unwrap().unwrap().heartbeat, 2000);
        }
        std::fs::write(state.path(HEARTBEAT_FILE), b"garbage").unwrap();
        assert_eq!(state.read_beat(), None);
        assert_eq!(state.read_status().unwrap().unwrap().heartbeat, 2000);
    }

    #[test]
    fn a_status_file_from_another_version_is_still_read() {
        // Before its first check an older agent wrote "" as the health; a newer one may write a
        // word this one does not know. Either reads as `unknown`, and the rest of the file is
        // kept: `status` and `check --once` must not take a live agent for a dead one.
        let d = tempfile::tempdir().unwrap();
        let state = StateDir::new(d.path());
        for word in ["", "on_a_break", "healthy", "pm2_down"] {
            let text = format!(
                r#"{{"pid":7,"version":"0.0.9","boot_epoch":1,"heartbeat":2,"updated_at":"x","interval_ms":1000,"apps":[{{"name":"a","health":"{word}","failures":0,"max_retries":3,"note":null,"last_check_ms":null,"instances":[],"probes":[],"restarts":[]}}]}}"#
            );
            state.write_status(text.as_bytes()).unwrap();
            let read = state.read_status().unwrap().unwrap();
            let want = match word {
                "healthy" => Health::Healthy,
                "pm2_down" => Health::Pm2Down,
                _ => Health::Unknown,
            };
            assert_eq!(read.apps[0].health, want, "{word:?}");
            assert_eq!(read.pid, 7);
        }
    }
}
