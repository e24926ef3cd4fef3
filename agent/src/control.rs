//! `pmguard-agent pause` and `resume`: maintenance pauses, set by a person, honoured by the
//! daemon and by `check --once`.
//!
//! The channel is the state directory itself, not a socket: the command writes `pauses.json`
//! under `restart.lock` and the agent reads it (see `report::pauses`). Nothing listens, so there
//! is no endpoint for other local users to reach and no peer to authenticate: who may pause is
//! who may write the state directory (the PM2 user, or root, which `main` turns into the PM2 user
//! before calling here), the same people who could stop the agent anyway. A pause is recorded
//! whether or not the agent runs; when it runs, the command waits (briefly) for the agent to say
//! in `status.json` that it applied the pause.
//! Library code: it returns what happened; the binary prints it.

use std::time::{Duration, Instant};

use crate::clock;
use crate::config::Config;
use crate::report::events::{Event, EventLog, Kind};
use crate::report::pauses::{clean_text, Pause, PauseBook, MAX_REASON, PAUSES_FILE};
use crate::report::state::StateDir;
use crate::sys::files::LockError;

pub use crate::report::pauses::MAX_PAUSE;

/// How long `pause`/`resume` wait for `restart.lock` (a restart in flight holds it).
const LOCK_WAIT: Duration = Duration::from_secs(15);

/// Why a pause or resume was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no app named `{name}` in {config}; the apps are: {known}")]
    UnknownApp {
        name: String,
        config: String,
        known: String,
    },
    #[error("--reason: {why}")]
    Reason { why: String },
    #[error("--for {given}: a pause lasts from 1s to 7d")]
    Length { given: String },
    #[error("state directory {path}: {source}")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read {path} ({source}); not overwriting it: fix or remove it, then try again")]
    PauseFile {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "restart.lock in {path} stayed busy for {LOCK_WAIT:?} (a restart in progress?); try again"
    )]
    Busy { path: String },
}

/// What `pause` or `resume` changed, and whether the running agent took it.
#[derive(Debug)]
pub struct Changed {
    /// The apps paused (with their pause) or resumed (with the pause they had, if any).
    pub apps: Vec<(String, Option<Pause>)>,
    /// `pause` only: apps whose longer pause (this one) the new, shorter pause replaced.
    pub shortened: Vec<(String, Pause)>,
    pub revision: u64,
    pub agent: AgentSeen,
}

/// The running agent's answer, read from `status.json`.
#[derive(Debug, PartialEq)]
pub enum AgentSeen {
    /// No fresh heartbeat: `check --once` and the next agent start honour the file.
    NotRunning,
    /// The agent (pid) applied this revision within `after_ms`.
    Applied { pid: u32, after_ms: u64 },
    /// Alive, but it had not reported this revision yet when we stopped waiting.
    NotConfirmed { pid: u32 },
}

/// Who asks for a pause.
#[derive(Debug, Clone)]
pub struct PauseRequest {
    /// Empty: every app in the config.
    pub apps: Vec<String>,
    pub length: Duration,
    pub reason: Option<String>,
    pub by: Option<String>,
}

/// Pauses the apps until now + `length` (replacing any pause they had).
pub fn pause(config: &Config, req: &PauseRequest) -> Result<Changed, ControlError> {
    if req.length < Duration::from_secs(1) || req.length > MAX_PAUSE {
        return Err(ControlError::Length {
            given: crate::config::duration::format(req.length),
        });
    }
    if let Some(r) = &req.reason {
        check_reason(r)?;
    }
    let names = resolve(config, &req.apps)?;
    let now = clock::wall_ms();
    let pause = Pause {
        since_ms: now,
        until_ms: now + req.length.as_millis() as u64,
        reason: req.reason.clone(),
        by: req.by.as_deref().map(clean_text),
    };
    let (state, events) = open(config)?;
    let (revision, shortened) = edit(&state, |book| {
        let mut shortened = Vec::new();
        for n in &names {
            let old = book.apps.insert(n.clone(), pause.clone());
            if let Some(old) = old.filter(|o| o.is_active(now) && o.until_ms > pause.until_ms) {
                shortened.push((n.clone(), old));
            }
        }
        Ok(shortened)
    })?;
    for n in &names {
        let mut e = Event::new(
            Kind::Pause,
            Some(n),
            format!(
                "Maintenance: {}; checks go on, no restart until then.",
                pause.describe()
            ),
        )
        .with("until", clock::rfc3339(pause.until_ms));
        if let Some(r) = &pause.reason {
            e = e.with("reason", r.as_str());
        }
        if let Some(b) = &pause.by {
            e = e.with("by", b.as_str());
        }
        events.emit(e);
    }
    Ok(Changed {
        apps: names
            .into_iter()
            .map(|n| (n, Some(pause.clone())))
            .collect(),
        shortened,
        revision,
        agent: wait_applied(&state, revision, Duration::from_secs(5)),
    })
}

/// Ends the pauses of `apps` (empty: every pause) now.
pub fn resume(config: &Config, apps: &[String], by: Option<&str>) -> Result<Changed, ControlError> {
    let names = dedup(apps);
    let (state, events) = open(config)?;
    let mut ended = Vec::new();
    let (revision, ()) = edit(&state, |book| {
        let now = clock::wall_ms();
        // An app removed from the config may still have a pause recorded: it can be resumed.
        if let Some(a) = names
            .iter()
            .find(|a| config.app(a).is_none() && !book.apps.contains_key(*a))
        {
            return Err(unknown(config, a));
        }
        let chosen: Vec<String> = if names.is_empty() {
            book.apps.keys().cloned().collect()
        } else {
            names.clone()
        };
        for n in chosen {
            let had = book.apps.remove(&n).filter(|p| p.is_active(now));
            ended.push((n, had));
        }
        Ok(())
    })?;
    for (n, had) in &ended {
        let mut e = Event::new(
            Kind::Resume,
            Some(n),
            if had.is_some() {
                "Maintenance over: resumed by a person; failing checks restart again."
            } else {
                "Resume asked for an app that was not paused."
            },
        );
        if let Some(b) = by {
            e = e.with("by", b);
        }
        events.emit(e);
    }
    Ok(Changed {
        apps: ended,
        shortened: Vec::new(),
        revision,
        agent: wait_applied(&state, revision, Duration::from_secs(5)),
    })
}

/// A reason is one short line: `status` prints it in a table and events carry it everywhere.
fn check_reason(reason: &str) -> Result<(), ControlError> {
    let why = if reason.chars().any(char::is_control) {
        "control characters (newlines, escapes) are not allowed".to_string()
    } else if reason.len() > MAX_REASON {
        format!(
            "{} bytes; at most {MAX_REASON} (one short line)",
            reason.len()
        )
    } else {
        return Ok(());
    };
    Err(ControlError::Reason { why })
}

/// The named apps once each (in the order given), each checked against the config; none named
/// = every app.
fn resolve(config: &Config, apps: &[String]) -> Result<Vec<String>, ControlError> {
    if apps.is_empty() {
        return Ok(config.apps.iter().map(|a| a.name.clone()).collect());
    }
    let names = dedup(apps);
    match names.iter().find(|a| config.app(a).is_none()) {
        Some(a) => Err(unknown(config, a)),
        None => Ok(names),
    }
}

/// `apps` without repeats, first occurrence kept.
fn dedup(apps: &[String]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    apps.iter().filter(|a| seen.insert(*a)).cloned().collect()
}

fn unknown(config: &Config, name: &str) -> ControlError {
    ControlError::UnknownApp {
        name: name.to_string(),
        config: config.path.display().to_string(),
        known: config
            .apps
            .iter()
            .map(|a| a.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

fn open(config: &Config) -> Result<(StateDir, EventLog), ControlError> {
    let state = StateDir::new(&config.agent.state_dir);
    let sd = |source| ControlError::StateDir {
        path: state.dir.display().to_string(),
        source,
    };
    state.create().map_err(sd)?;
    let events = EventLog::open(&state.dir, config.agent.events_max_bytes).map_err(sd)?;
    Ok((state, events))
}

/// Reads, changes and writes `pauses.json` under `restart.lock` (expired entries are left to
/// the agent, which says so in a `pause_expired` event). Returns the revision written: above
/// both the file's and the one the agent last reported, so "applied" is never claimed early.
/// A file that exists but cannot be read or parsed is left alone (an error).
fn edit<T>(
    state: &StateDir,
    change: impl FnOnce(&mut PauseBook) -> Result<T, ControlError>,
) -> Result<(u64, T), ControlError> {
    let path = state.dir.display().to_string();
    let _guard = match state.lock_restarts(LOCK_WAIT) {
        Ok(g) => g,
        Err(LockError::Busy) => return Err(ControlError::Busy { path }),
        Err(LockError::Io(source)) => return Err(ControlError::StateDir { path, source }),
    };
    let mut book = state
        .read_pauses_strict()
        .map_err(|source| ControlError::PauseFile {
            path: state.path(PAUSES_FILE).display().to_string(),
            source,
        })?;
    if let Ok(Some(status)) = state.read_status() {
        book.revision = book.revision.max(status.pauses_revision);
    }
    let out = change(&mut book)?;
    state
        .write_pauses(&mut book)
        .map_err(|source| ControlError::StateDir { path, source })?;
    Ok((book.revision, out))
}

/// Waits up to `within` for a live agent to report `revision` applied in `status.json`.
pub fn wait_applied(state: &StateDir, revision: u64, within: Duration) -> AgentSeen {
    let started = Instant::now();
    loop {
        let status = match state.read_status() {
            Ok(Some(s)) if s.is_fresh() => s,
            _ => return AgentSeen::NotRunning,
        };
        if status.pauses_revision >= revision {
            return AgentSeen::Applied {
                pid: status.pid,
                after_ms: started.elapsed().as_millis() as u64,
            };
        }
        if started.elapsed() >= within {
            return AgentSeen::NotConfirmed { pid: status.pid };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Passes SIGTERM, SIGINT and SIGHUP (blocked in `held`) on to the child, through a pidfd: once
/// the child is reaped a late signal reaches nobody, never a new holder of its pid. The thread
/// lives until the process exits.
fn forward_signals(
    held: nix::sys::signal::SigSet,
    child: Option<&std::io::Result<std::process::Child>>,
) {
    let Some(Ok(c)) = child else { return };
    let Some(pidfd) = crate::sys::pidfd::Pidfd::open(c.id()) else {
        return;
    };
    let spawned = crate::sys::signals::spawn_waiter(held, move |sig| {
        let _ = pidfd.forward(sig);
        true
    });
    if let Err(error) = spawned {
        tracing::warn!(message = "Cannot pass signals on to the command.", %error);
    }
}

/// What the deploy helper did.
#[derive(Debug)]
pub enum Deployed {
    /// The pause step failed with this exit code (COMMAND did not run).
    NotPaused(i32),
    /// COMMAND ran (or could not start: 127); `resumed` is whether the resume step succeeded
    /// (if not, the pause ends at its deadline).
    Ran { code: i32, resumed: bool },
}

/// `pause APP --for D -- COMMAND...`: pauses through `exe pause` (without the command), runs
/// COMMAND, resumes through `exe resume`, and returns COMMAND's exit code (128 + the signal when
/// a signal ended it; 127 when it could not start).
///
/// The pause and resume run as their own processes: under `sudo` each becomes the PM2 user
/// before writing the state directory, while COMMAND keeps the privileges it was started with
/// (a deploy may need root). While COMMAND runs, SIGINT, SIGTERM and SIGHUP are held for this
/// process and passed on to COMMAND (a Ctrl-C reaches both anyway; a `kill` of this process
/// alone, from a CI runner say, must still stop COMMAND), so the deploy stops and still resumes.
pub fn run_paused(
    exe: &std::path::Path,
    pause_args: &[std::ffi::OsString],
    resume_args: &[std::ffi::OsString],
    command: &[std::ffi::OsString],
) -> Deployed {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;
    let code_of =
        |s: std::process::ExitStatus| s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0));
    match Command::new(exe).args(pause_args).status() {
        Ok(s) if s.success() => {}
        Ok(s) => return Deployed::NotPaused(code_of(s)),
        Err(_) => return Deployed::NotPaused(2),
    }
    let child = command
        .split_first()
        .map(|(prog, args)| Command::new(prog).args(args).spawn());
    // After the spawn: COMMAND keeps the default dispositions, only this process holds them.
    let held = crate::sys::signals::block();
    forward_signals(held, child.as_ref());
    let code = match child {
        Some(Ok(mut c)) => c.wait().map_or(127, code_of),
        _ => 127,
    };
    let resumed = Command::new(exe)
        .args(resume_args)
        .status()
        .is_ok_and(|s| s.success());
    Deployed::Ran { code, resumed }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_pause_file_is_not_overwritten_and_the_revision_never_goes_back() {
        let d = tempfile::tempdir().unwrap();
        let state = StateDir::new(d.path());
        let file = state.path(PAUSES_FILE);
        std::fs::write(&file, b"{ not json").unwrap();
        let e = edit(&state, |_| Ok(())).unwrap_err();
        assert!(matches!(e, ControlError::PauseFile { .. }), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"{ not json");
        // The agent reported revision 9 (the file was since replaced by hand): the next is 10.
        std::fs::remove_file(&file).unwrap();
        let status = serde_json::json!({"pid": 1, "version": "0", "boot_epoch": 0, "heartbeat": 0,
            "updated_at": "", "interval_ms": 1000, "pauses_revision": 9, "apps": []});
        std::fs::write(state.path("status.json"), status.to_string()).unwrap();
        assert_eq!(edit(&state, |_| Ok(())).unwrap().0, 10);
    }

    #[test]
    fn repeated_names_count_once() {
        let names: Vec<String> = ["web", "api", "web", "api", "db"].map(String::from).into();
        assert_eq!(dedup(&names), ["web", "api", "db"]);
    }

    #[test]
    fn a_reason_is_one_short_printable_line() {
        assert!(check_reason("deploy v42 (é)").is_ok());
        assert!(check_reason(&"x".repeat(MAX_REASON)).is_ok());
        let long = check_reason(&"x".repeat(MAX_REASON + 1)).unwrap_err();
        assert!(long.to_string().contains("at most 200"), "{long}");
        for bad in ["a\nweb  ok", "\u{1b}[31mred", "tab\there"] {
            let e = check_reason(bad).unwrap_err();
            assert!(e.to_string().contains("control characters"), "{e}");
        }
    }
}
