//! Events: every probe result, state change and action, as structured records.
//!
//! Each event goes to the log (tracing; probe results at debug level, the rest at info and up)
//! and as one JSON line to `events.jsonl` in the state directory, which is rotated at a size
//! bound keeping one older file. A failing event file is reported (at most once a minute) and
//! never stops the agent. Events never carry the app's environment.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::clock;
use crate::sys::files;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    AgentStart,
    AgentStop,
    Reload,
    ConfigRejected,
    Probe,
    StateChange,
    Restart,
    RestartDone,
    RestartFailed,
    Escalation,
    GiveUp,
    Resurrect,
    Pm2Event,
    Check,
    /// An https probe's certificate expires in fewer than `cert_warn_days` (once a day).
    CertExpiring,
    /// A person paused an app (`pmguard-agent pause`): no action until resumed or expired.
    Pause,
    Resume,
    PauseExpired,
    /// An app is healthy again after pmguard acted on it (a restart or resurrect) or after a
    /// crash loop or PM2 outage (`policy::is_recovery`); once per recovery.
    Recovered,
}

impl Kind {
    fn level(self) -> tracing::Level {
        use tracing::Level;
        match self {
            Kind::Probe | Kind::Check => Level::DEBUG,
            Kind::GiveUp | Kind::RestartFailed | Kind::ConfigRejected => Level::ERROR,
            Kind::Escalation | Kind::Resurrect | Kind::CertExpiring => Level::WARN,
            _ => Level::INFO,
        }
    }
}

/// One event. `fields` carry the details under the project's field names (pm_id, pid, latency_ms, ...).
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub ts: String,
    pub ts_ms: u64,
    pub kind: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    pub message: String,
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

impl Event {
    pub fn new(kind: Kind, app: Option<&str>, message: impl Into<String>) -> Event {
        let ts_ms = clock::wall_ms();
        Event {
            ts: clock::rfc3339(ts_ms),
            ts_ms,
            kind,
            app: app.map(str::to_string),
            message: message.into(),
            fields: Map::new(),
        }
    }

    /// Adds a detail field.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Event {
        self.fields.insert(key.to_string(), value.into());
        self
    }
}

/// Somewhere events are also sent (the AWS sink), set once at start.
///
/// - `forward` is called on the emitting thread, for every event: it must be cheap and must
///   never block on I/O (hand the event over and return).
pub trait Forward: Send + Sync + std::fmt::Debug {
    fn forward(&self, event: &Event);
}

/// The local event sink: the log plus `events.jsonl`, and an optional forward.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    max_bytes: u64,
    inner: Mutex<Inner>,
    forward: OnceLock<Vec<Arc<dyn Forward>>>,
}

#[derive(Debug)]
struct Inner {
    file: Option<File>,
    size: u64,
    last_error_ms: Option<u64>,
}

impl EventLog {
    /// Opens (or creates, mode 0640) `events.jsonl` in `state_dir`.
    pub fn open(state_dir: &Path, max_bytes: u64) -> std::io::Result<EventLog> {
        let path = state_dir.join("events.jsonl");
        let file = files::open_append(&path, 0o640)?;
        let size = file.metadata()?.len();
        Ok(EventLog {
            path,
            max_bytes,
            inner: Mutex::new(Inner {
                file: Some(file),
                size,
                last_error_ms: None,
            }),
            forward: OnceLock::new(),
        })
    }

    /// Sends every later event to each of `fs` as well (the AWS recorder, the notify inbox).
    /// Only the first call has an effect.
    pub fn set_forwards(&self, fs: Vec<Arc<dyn Forward>>) {
        let _ = self.forward.set(fs);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Logs the event and appends it to the event file.
    pub fn emit(&self, event: Event) {
        log(&event);
        for f in self.forward.get().into_iter().flatten() {
            f.forward(&event);
        }
        let mut line = match serde_json::to_vec(&event) {
            Ok(l) => l,
            Err(_) => return,
        };
        line.push(b'\n');
        let mut inner = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Err(error) = self.append(&mut inner, &line) {
            let now = clock::mono_now();
            if inner
                .last_error_ms
                .is_none_or(|t| now.saturating_sub(t) > 60_000)
            {
                inner.last_error_ms = Some(now);
                tracing::warn!(message = "Cannot write the event file.", path = %self.path.display(), %error);
            }
        }
    }

    fn append(&self, inner: &mut Inner, line: &[u8]) -> std::io::Result<()> {
        // First: is our handle still the file at the path? logrotate (`create`) moves it away
        // and lays down a new one; a person may delete it. Follow the path, never the old inode:
        // the size that decides our own rotation must be the size of the file at the path.
        if let Some(f) = &inner.file {
            use std::os::unix::fs::MetadataExt;
            let same = match (files::file_id(&self.path), f.metadata()) {
                (Some(p), Ok(o)) => p == (o.dev(), o.ino()),
                _ => false,
            };
            if !same {
                inner.file = None;
            }
        }
        // Taken out while in use: any error below leaves no handle, and the next line reopens
        // the file at the path.
        let mut file = match inner.file.take() {
            Some(f) => f,
            None => files::open_append(&self.path, 0o640)?,
        };
        // The size from the file itself: a person may have truncated it in place (`: > file`),
        // and rotating on a stale count would rename a small file over the rotated history.
        inner.size = file.metadata()?.len();
        if inner.size + line.len() as u64 > self.max_bytes && inner.size > 0 {
            drop(file);
            let mut rotated = self.path.clone().into_os_string();
            rotated.push(".1");
            std::fs::rename(&self.path, rotated)?;
            file = files::open_append(&self.path, 0o640)?;
            inner.size = file.metadata()?.len();
        }
        // One write per line: with O_APPEND, lines from concurrent writers never interleave.
        file.write_all(line)?;
        inner.size += line.len() as u64;
        inner.file = Some(file);
        Ok(())
    }
}

fn log(e: &Event) {
    // Per-check events are debug: at the default level, skip building their text at all.
    if e.kind.level() == tracing::Level::DEBUG && !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let app = e.app.as_deref().unwrap_or("-");
    let details = e
        .fields
        .iter()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(" ");
    let kind = serde_json::to_value(e.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let msg = &e.message;
    match e.kind.level() {
        tracing::Level::ERROR => tracing::error!(message = %msg, app, kind, %details),
        tracing::Level::WARN => tracing::warn!(message = %msg, app, kind, %details),
        tracing::Level::INFO => tracing::info!(message = %msg, app, kind, %details),
        _ => tracing::debug!(message = %msg, app, kind, %details),
    }
}

/// Reads the last `n` events of the event file (for `status`); unreadable lines are skipped.
pub fn tail(state_dir: &Path, n: usize) -> Vec<Value> {
    let Ok(Some(bytes)) = files::read_optional(&state_dir.join("events.jsonl")) else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let mut out: Vec<Value> = text
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str(l).ok())
        .take(n)
        .collect();
    out.reverse();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopens_a_file_moved_by_logrotate() {
        let d = tempfile::tempdir().unwrap();
        let log = EventLog::open(d.path(), 1 << 20).unwrap();
        log.emit(Event::new(Kind::Restart, Some("web"), "one"));
        std::fs::rename(
            d.path().join("events.jsonl"),
            d.path().join("events.jsonl-20261128"),
        )
        .unwrap();
        log.emit(Event::new(Kind::Restart, Some("web"), "two"));
        let old = std::fs::read_to_string(d.path().join("events.jsonl-20261128")).unwrap();
        let new = std::fs::read_to_string(d.path().join("events.jsonl")).unwrap();
        assert!(old.contains("\"one\"") && !old.contains("\"two\""), "{old}");
        assert!(new.contains("\"two\""), "{new}");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(d.path().join("events.jsonl"))
                .unwrap()
                .mode()
                & 0o777,
            0o640
        );
    }

    #[test]
    fn appends_json_lines_and_rotates() {
        let d = tempfile::tempdir().unwrap();
        let log = EventLog::open(d.path(), 65_536).unwrap();
        for i in 0..600 {
            log.emit(Event::new(Kind::Probe, Some("web"), "Probe passed.").with("latency_ms", i));
        }
        let current = std::fs::read_to_string(d.path().join("events.jsonl")).unwrap();
        let rotated = std::fs::read_to_string(d.path().join("events.jsonl.1")).unwrap();
        assert!(current.len() as u64 <= 65_536 && rotated.len() as u64 <= 65_536);
        let total = current.lines().count() + rotated.lines().count();
        let first: Value = serde_json::from_str(current.lines().next().unwrap()).unwrap();
        assert_eq!(first["kind"], "probe");
        assert_eq!(first["app"], "web");
        assert!(total >= 400, "kept {total} lines");
        let last = tail(d.path(), 1);
        assert_eq!(last[0]["latency_ms"], 599);
    }

    #[test]
    fn a_deleted_file_is_recreated_even_at_the_rotation_size() {
        let d = tempfile::tempdir().unwrap();
        let log = EventLog::open(d.path(), 600).unwrap();
        // Fill up to just below the bound, then delete the file under the agent.
        for _ in 0..3 {
            log.emit(Event::new(Kind::Restart, Some("web"), "filler"));
        }
        std::fs::remove_file(d.path().join("events.jsonl")).unwrap();
        for i in 0..5 {
            log.emit(Event::new(Kind::Restart, Some("web"), format!("after-{i}")));
        }
        let all = std::fs::read_to_string(d.path().join("events.jsonl")).unwrap_or_default()
            + &std::fs::read_to_string(d.path().join("events.jsonl.1")).unwrap_or_default();
        for i in 0..5 {
            assert!(all.contains(&format!("after-{i}")), "event {i} lost: {all}");
        }
    }

    #[test]
    fn logrotate_move_and_create_never_loses_the_rotated_file() {
        let d = tempfile::tempdir().unwrap();
        let log = EventLog::open(d.path(), 600).unwrap();
        for _ in 0..3 {
            log.emit(Event::new(Kind::Restart, Some("web"), "before-rotation"));
        }
        // logrotate with `create`: move to .1, lay down an empty file in its place.
        std::fs::rename(
            d.path().join("events.jsonl"),
            d.path().join("events.jsonl.1"),
        )
        .unwrap();
        std::fs::write(d.path().join("events.jsonl"), b"").unwrap();
        log.emit(Event::new(Kind::Restart, Some("web"), "after-rotation"));
        let rotated = std::fs::read_to_string(d.path().join("events.jsonl.1")).unwrap();
        let current = std::fs::read_to_string(d.path().join("events.jsonl")).unwrap();
        assert_eq!(rotated.matches("before-rotation").count(), 3, "{rotated}");
        assert!(current.contains("after-rotation"), "{current}");
    }

    #[test]
    fn a_file_truncated_in_place_never_rotates_over_the_history() {
        let d = tempfile::tempdir().unwrap();
        let log = EventLog::open(d.path(), 600).unwrap();
        for _ in 0..8 {
            log.emit(Event::new(Kind::Restart, Some("web"), "history"));
        }
        let rotated = std::fs::read_to_string(d.path().join("events.jsonl.1")).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(d.path().join("events.jsonl"))
            .unwrap();
        log.emit(Event::new(Kind::Restart, Some("web"), "after-truncate"));
        assert_eq!(
            std::fs::read_to_string(d.path().join("events.jsonl.1")).unwrap(),
            rotated,
            "the rotated history was replaced"
        );
    }
}
