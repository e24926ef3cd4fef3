//! Bringing a crashed PM2 daemon back with `pm2 resurrect`, and every reason not to: a daemon
//! that is only slow, one a person stopped (`pm2 kill`, or cleanly: no pm2.pid left), a PM2_HOME
//! this process may not act for, a resurrect already made within the cooldown.
//!
//! Invariant: PM2 is only ever started as PM2_HOME's owner, at most once per cooldown across
//! every app and both pmguard processes (through `restarts.json` under its lock).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::clock;
use crate::pm2::liveness::{self, Liveness};
use crate::report::events::{Event, Kind};
use crate::sync::lock;
use crate::sys::files::Lock;

use super::shared::Shared;

/// Runs `pm2 resurrect` when the PM2 daemon is proven gone, at most once per `cooldown_ms`
/// (shared with every app and with the other pmguard process through `restarts.json`), and
/// only as PM2_HOME's owner. Returns whether it ran.
pub fn resurrect_pm2(shared: &Shared, app: &str, reason: &str, cooldown_ms: u64) -> bool {
    let _one = lock(&shared.resurrect);
    let home = shared.client.paths().home.clone();
    if !may_resurrect(shared, app, reason, cooldown_ms, &home) {
        return false;
    }
    let Some(_guard) = book_resurrect(shared, app, cooldown_ms) else {
        return false;
    };
    let result = run_resurrect(&shared.agent.pm2_bin, &home);
    let e = Event::new(
        Kind::Resurrect,
        Some(app),
        match &result {
            Ok(()) => format!("PM2 daemon was down ({reason}); ran `pm2 resurrect`."),
            Err(e) => format!("PM2 daemon was down ({reason}); `pm2 resurrect` failed: {e}."),
        },
    )
    .with("path", home.display().to_string());
    shared.emit(e);
    true
}

/// Every reason not to resurrect, each said once: resurrect is off, the daemon answers or is
/// only slow, it was stopped cleanly or on purpose, or this process may not act for PM2_HOME.
fn may_resurrect(shared: &Shared, app: &str, reason: &str, cooldown_ms: u64, home: &Path) -> bool {
    if !shared.agent.resurrect {
        shared.emit(Event::new(Kind::Resurrect, Some(app), format!("PM2 daemon is down ({reason}); resurrect is off in the config, so a person must run `pm2 resurrect`.")));
        return false;
    }
    // Another app may have brought it back while we waited; a daemon that is only slow must
    // never be resurrected (that would re-read a stale dump.pm2).
    let Err(e) = shared.client.ping(Duration::from_secs(1)) else {
        return false;
    };
    if let Liveness::Unresponsive(why) =
        liveness::judge(&e, shared.client.paths(), &shared.proc_root)
    {
        shared.emit(
            Event::new(
                Kind::Resurrect,
                Some(app),
                format!("PM2 daemon is not answering, but is not proven gone ({why}); not resurrecting."),
            )
            .with("action", "none"),
        );
        return false;
    }
    // PM2 removes pm2.pid when it stops cleanly (`pm2 kill`, SIGTERM at shutdown or from
    // systemctl); a crashed or SIGKILLed daemon leaves it behind. Only a crash is pmguard's to
    // repair: a stop was someone's decision (and the bus's `pm2:kill` may not get out first).
    if !home.join("pm2.pid").exists() {
        alert_clean_stop(shared, app, cooldown_ms);
        return false;
    }
    if shared.stopped_on_purpose.load(Ordering::Relaxed)
        || shared.state.read_restarts().pm2_stopped_on_purpose
    {
        tracing::info!(message = "PM2 was stopped on purpose; not resurrecting.", app = %app);
        return false;
    }
    if let Err(why) = may_start_pm2_as(home) {
        shared.emit(
            Event::new(
                Kind::Resurrect,
                Some(app),
                format!("PM2 daemon is down ({reason}), but {why}"),
            )
            .with("action", "refused")
            .with("path", home.display().to_string()),
        );
        return false;
    }
    true
}

/// Says (once per cooldown) that PM2 was stopped, not crashed, and is left stopped.
fn alert_clean_stop(shared: &Shared, app: &str, cooldown_ms: u64) {
    let mut last = lock(&shared.resurrect_alerted);
    let now = clock::mono_now();
    if last.is_none_or(|t| now.saturating_sub(t) >= cooldown_ms) {
        *last = Some(now);
        shared.emit(
            Event::new(
                Kind::Resurrect,
                Some(app),
                "PM2 was stopped (cleanly: no pm2.pid), not crashed: pmguard does not start it again. Start it with `pm2 resurrect` or `systemctl start pm2-<user>`.",
            )
            .with("action", "none"),
        );
    }
}

/// Books the resurrect in `restarts.json` under `restart.lock`, unless one was made within the
/// cooldown (by any pmguard process). Returns the held lock.
fn book_resurrect(shared: &Shared, app: &str, cooldown_ms: u64) -> Option<Lock> {
    let guard = shared.state.lock_restarts(Duration::from_secs(5)).ok()?;
    let mut book = shared.state.read_restarts();
    let now = clock::mono_now();
    if book
        .resurrected_at
        .is_some_and(|t| now.saturating_sub(t) < cooldown_ms)
    {
        return None;
    }
    book.resurrected_at = Some(now);
    if let Err(error) = shared.state.write_restarts(&book) {
        tracing::warn!(message = "Cannot save restart history.", app = %app, %error);
    }
    Some(guard)
}

/// Why PM2 may not be started from this process.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("{0}; not resurrecting.")]
    Home(#[from] crate::sys::privilege::PrivilegeError),
    #[error("PM2_HOME {home} belongs to uid {owner} and this process runs as uid {me}; not starting PM2 as another user. Run the check as PM2's user (`sudo -u <user> pmguard-agent check --once`).")]
    NotOwner { home: String, owner: u32, me: u32 },
}

/// PM2 and its apps may only ever be started as PM2_HOME's owner: `pm2 resurrect` run as root
/// against another user's home starts a root daemon and the user's apps as root.
fn may_start_pm2_as(home: &Path) -> Result<(), Refusal> {
    let owner = crate::sys::privilege::home_owner(home)?;
    let me = crate::sys::privilege::euid();
    if owner == me {
        Ok(())
    } else {
        Err(Refusal::NotOwner {
            home: home.display().to_string(),
            owner,
            me,
        })
    }
}

/// Why `pm2 resurrect` did not succeed.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("cannot run `{bin}`: {source}")]
    Spawn { bin: String, source: std::io::Error },
    #[error("exited with {0}")]
    Exit(std::process::ExitStatus),
    #[error("did not finish within 60 s")]
    Timeout,
    #[error(transparent)]
    Wait(std::io::Error),
}

/// Runs `pm2 resurrect` with PM2_HOME set, in its own process group, bounded to 60 s.
fn run_resurrect(pm2_bin: &str, home: &Path) -> Result<(), RunError> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let mut child = Command::new(pm2_bin)
        .arg("resurrect")
        .env("PM2_HOME", home)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|source| RunError::Spawn {
            bin: pm2_bin.to_string(),
            source,
        })?;
    let deadline = clock::mono_now() + 60_000;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(RunError::Exit(status)),
            Ok(None) if clock::mono_now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(RunError::Timeout);
            }
            Err(e) => return Err(RunError::Wait(e)),
        }
    }
}
