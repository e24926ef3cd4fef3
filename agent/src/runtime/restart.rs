//! Restarting an app's instances through PM2, and the SIGKILL that a stuck process needs.
//!
//! Invariants: a signal goes only through a pidfd opened on a process proven to be the one PM2
//! started (a child of the PM2 daemon, started when PM2 says, owned by PM2's user), so a reused
//! pid is never signalled; each step promises its worst case to `Progress` first, so a long
//! but legitimate recovery never looks like a wedged agent.

use std::time::Duration;

use crate::clock;
use crate::pm2::liveness::{self, DaemonProcess};
use crate::pm2::{Pm2Error, ProcessEntry};
use crate::procfs::{self, ProcWatch};
use crate::report::events::{Event, Kind};
use crate::sys::pidfd::Pidfd;

use super::shared::{Pm2Failure, Progress, Shared};

/// Why a restart did not complete.
#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    /// PM2 gave no process list.
    #[error("{0}")]
    Pm2(#[from] Pm2Failure),
    #[error("PM2 no longer lists the app")]
    Unlisted,
    #[error("pm_id {0} is no longer listed")]
    InstanceUnlisted(u32),
    #[error("pm_id {pm_id}: {source}")]
    Instance { pm_id: u32, source: Pm2Error },
}

/// One instance restarted.
#[derive(Debug, Clone)]
pub struct Restarted {
    pub pm_id: u32,
    pub old_pid: u32,
    pub new_pid: u32,
    /// The old process was sent SIGKILL (hung at once, or after PM2's restart did not finish).
    pub escalated: bool,
}

/// What a restart is asked to do.
#[derive(Debug)]
pub struct Targets<'a> {
    /// pm_ids to restart; empty = every instance.
    pub culprits: &'a [u32],
    /// pm_ids found stuck: killed at once, then started again.
    pub hung: &'a [u32],
    pub restart_timeout: Duration,
}

/// How long PM2 gets to start a killed instance again by itself (autorestart) before pmguard
/// asks it to.
const AUTORESTART_WAIT: Duration = Duration::from_secs(2);

/// Restarts the targets of `name` through PM2, one pm_id at a time. A stuck instance is killed
/// at once (it cannot run a shutdown handler, so PM2's `kill_timeout` would be waited out for
/// nothing); a running one gets PM2's graceful restart, with the SIGKILL escalation when PM2 does
/// not finish or the old process survives. Each step is announced to `progress` first, so a long
/// but legitimate recovery never looks like a wedged agent.
pub fn restart_instances(
    shared: &Shared,
    name: &str,
    t: &Targets<'_>,
    progress: Option<&Progress>,
) -> Result<Vec<Restarted>, RestartError> {
    let snap = shared.snapshot(0).map_err(RestartError::from)?;
    let targets: Vec<ProcessEntry> = snap
        .by_name(name)
        .into_iter()
        .filter(|e| t.culprits.is_empty() || t.culprits.contains(&e.pm_id))
        .cloned()
        .collect();
    if targets.is_empty() {
        return Err(RestartError::Unlisted);
    }
    let signaller = Signaller::new(shared);
    let mut done = Vec::new();
    for e in targets {
        let deadline = Duration::from_millis(
            e.kill_timeout_ms
                .unwrap_or(crate::policy::PM2_KILL_TIMEOUT_MS),
        ) + t.restart_timeout;
        // This instance's worst case: a restart, the escalation, a second restart.
        if let Some(p) = progress {
            p.promise(deadline * 2 + Duration::from_secs(10));
        }
        let old = (e.pid > 0).then(|| signaller.open(&e)).flatten();
        // Stuck by the last check's judgement, or stopped right now (a SIGSTOPped process may
        // fail its probe before the tracker has seen it halted for a whole window).
        let killed_hung = match old.as_ref() {
            Some((p, state)) if t.hung.contains(&e.pm_id) || matches!(state, 'T' | 't') => {
                Some(kill_hung(shared, name, &e, p))
            }
            _ => None,
        };
        let old = old.map(|(p, _)| p);
        let escalated = match killed_hung {
            Some(Ok(())) => {
                restart_killed(shared, name, &e, snap.generation, deadline)?;
                true
            }
            _ => graceful_restart(shared, name, &e, old.as_ref(), snap.generation, deadline)?,
        };
        let _ = shared
            .client
            .notify_restart(e.pm_id, Duration::from_secs(1));
        let after = shared.snapshot(0).map_err(RestartError::from)?;
        let new_pid = after
            .by_name(name)
            .into_iter()
            .find(|x| x.pm_id == e.pm_id)
            .map_or(0, |x| x.pid);
        done.push(Restarted {
            pm_id: e.pm_id,
            old_pid: e.pid,
            new_pid,
            escalated,
        });
    }
    Ok(done)
}

/// SIGKILL to the process of `e` through its pidfd, said as an `escalation` event with `why`.
fn sigkill(
    shared: &Shared,
    name: &str,
    e: &ProcessEntry,
    p: &Pidfd,
    why: String,
) -> std::io::Result<()> {
    let killed = p.kill();
    shared.emit(
        Event::new(Kind::Escalation, Some(name), why)
            .with("pm_id", e.pm_id)
            .with("pid", e.pid)
            .with("signal", "SIGKILL")
            .with("ok", killed.is_ok()),
    );
    if killed.is_ok() {
        p.wait_exit(Duration::from_secs(2));
    }
    killed
}

/// SIGKILL to a stuck instance's process, then waits (briefly) for it to be gone.
fn kill_hung(shared: &Shared, name: &str, e: &ProcessEntry, p: &Pidfd) -> std::io::Result<()> {
    let why = format!(
        "pm_id {} pid {} is stuck and cannot shut down gracefully; sent SIGKILL before restarting it.",
        e.pm_id, e.pid
    );
    sigkill(shared, name, e, p, why)
}

/// After a stuck instance was killed: PM2 usually starts it again by itself (autorestart);
/// otherwise (autorestart off, stopped, errored, or slower than `AUTORESTART_WAIT`) pmguard
/// asks it to.
fn restart_killed(
    shared: &Shared,
    name: &str,
    e: &ProcessEntry,
    generation: u64,
    deadline: Duration,
) -> Result<(), RestartError> {
    // Up and new: PM2 (or anyone) started it again.
    let replaced = |generation: &mut u64| -> Result<bool, RestartError> {
        let s = shared.snapshot(0).map_err(RestartError::from)?;
        *generation = s.generation;
        match s.by_name(name).into_iter().find(|x| x.pm_id == e.pm_id) {
            None => Err(RestartError::InstanceUnlisted(e.pm_id)),
            Some(x) => Ok(x.status == crate::pm2::Status::Online && x.pid != e.pid && x.pid > 0),
        }
    };
    let until = clock::mono_now() + AUTORESTART_WAIT.as_millis() as u64;
    let mut generation = generation;
    // PM2 handles the exit on its own schedule (a `stopped` may come before its autorestart):
    // asking while it does gets "process already exists". Give it the wait, then ask.
    loop {
        if replaced(&mut generation).unwrap_or(false) {
            return Ok(());
        }
        if clock::mono_now() >= until {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let asked = shared
        .client
        .restart(e.pm_id, generation, deadline)
        .or_else(|err| match err {
            // The pm_ids were read on an older connection: read them again, once.
            Pm2Error::Reconnected { .. } => {
                let s = shared.snapshot(0).map_err(RestartError::from)?;
                shared
                    .client
                    .restart(e.pm_id, s.generation, deadline)
                    .map_err(|source| RestartError::Instance {
                        pm_id: e.pm_id,
                        source,
                    })
            }
            source => Err(RestartError::Instance {
                pm_id: e.pm_id,
                source,
            }),
        });
    match asked {
        Ok(()) => Ok(()),
        // PM2 may have started it meanwhile after all: that is what was wanted.
        Err(why) => match replaced(&mut generation) {
            Ok(true) => Ok(()),
            _ => Err(why),
        },
    }
}

/// PM2's own restart (SIGINT, `kill_timeout`, SIGKILL), with pmguard's SIGKILL escalation when
/// it does not finish in `deadline` or the old process survives. Returns whether it escalated.
fn graceful_restart(
    shared: &Shared,
    name: &str,
    e: &ProcessEntry,
    old: Option<&Pidfd>,
    generation: u64,
    deadline: Duration,
) -> Result<bool, RestartError> {
    let first = shared.client.restart(e.pm_id, generation, deadline);
    let survivor = old.is_some_and(|p| p.alive());
    if first.is_ok() && !survivor {
        return Ok(false);
    }
    let mut escalated = false;
    if let Some(p) = old.filter(|p| p.alive()) {
        escalated = true;
        let why = format!(
            "PM2 did not restart pm_id {} in time ({}); sent SIGKILL to pid {}.",
            e.pm_id,
            first
                .as_ref()
                .err()
                .map_or("the old process survived".to_string(), |e| e.to_string()),
            e.pid
        );
        let _ = sigkill(shared, name, e, p, why);
    }
    // Start it again on a fresh view (the daemon may have reconnected or renumbered).
    let again = shared.snapshot(0).map_err(RestartError::from)?;
    let still = again
        .by_name(name)
        .into_iter()
        .find(|x| x.pm_id == e.pm_id)
        .cloned();
    let needs = still
        .as_ref()
        .is_none_or(|x| x.pid == e.pid || x.status != crate::pm2::Status::Online);
    if needs {
        if let Err(err) = shared.client.restart(e.pm_id, again.generation, deadline) {
            if !escalated || matches!(err, Pm2Error::DaemonDown { .. }) {
                return Err(RestartError::Instance {
                    pm_id: e.pm_id,
                    source: err,
                });
            }
        }
    }
    Ok(escalated)
}

/// Opens pidfds only on processes proven to be the ones PM2 started.
struct Signaller<'a> {
    shared: &'a Shared,
    /// The uid owning PM2's socket: the only uid whose processes may be signalled.
    owner: Option<u32>,
    /// The PM2 daemon's pid: every app process PM2 starts (fork or cluster) is its child.
    daemon: Option<u32>,
    boot_ms: Option<u64>,
}

/// How far a process's start may lie from PM2's `pm_uptime` (btime has whole-second precision).
const START_SLACK_BEFORE_MS: u64 = 1_500;
const START_SLACK_AFTER_MS: u64 = 5_000;

impl<'a> Signaller<'a> {
    fn new(shared: &'a Shared) -> Signaller<'a> {
        use std::os::unix::fs::MetadataExt;
        let paths = shared.client.paths();
        Signaller {
            shared,
            owner: std::fs::metadata(&paths.rpc).ok().map(|m| m.uid()),
            daemon: match liveness::daemon_process(paths, &shared.proc_root) {
                DaemonProcess::Alive(pid) => Some(pid),
                _ => None,
            },
            boot_ms: procfs::boot_time_ms(&shared.proc_root).ok(),
        }
    }

    /// A pidfd on `e.pid` if that process is the one PM2 started for `e`: owned by PM2's user,
    /// a child of the PM2 daemon, started when PM2 says it started it. Fails closed: anything
    /// unknown means no pidfd, so no signal (a pid PM2 keeps in `waiting restart` may have been
    /// reused by an unrelated process). Also returns the process's scheduler state.
    fn open(&self, e: &ProcessEntry) -> Option<(Pidfd, char)> {
        let refuse = |why: String| {
            tracing::warn!(message = "Not signalling a process pmguard cannot prove PM2 started.", app = %e.name, pm_id = e.pm_id, pid = e.pid, reason = %why);
            None
        };
        let (Some(owner), Some(daemon)) = (self.owner, self.daemon) else {
            return refuse("PM2's user or daemon pid is unknown".into());
        };
        let fd = Pidfd::open(e.pid)?;
        let w = ProcWatch::open(&self.shared.proc_root, e.pid).ok()?;
        let Ok(s) = w.sample() else {
            return None;
        };
        if s.ppid != daemon {
            return refuse(format!(
                "its parent is pid {}, not the PM2 daemon (pid {daemon})",
                s.ppid
            ));
        }
        let started_when_pm2_says = match (e.pm_uptime_ms, self.boot_ms) {
            (Some(up), Some(boot)) => {
                let started =
                    procfs::start_epoch_ms(boot, s.start_ticks, self.shared.ticks_per_sec);
                if started + START_SLACK_BEFORE_MS < up || started > up + START_SLACK_AFTER_MS {
                    return refuse(format!(
                        "it started at {started} ms, PM2 started this instance at {up} ms"
                    ));
                }
                true
            }
            _ => false,
        };
        // Another uid is PM2's own doing only when proven otherwise: a root PM2 runs apps with
        // `--uid`. Without a start time to check, PM2's user is required.
        if w.uid != owner && !(owner == 0 && started_when_pm2_says) {
            return refuse(format!("owned by uid {}, PM2 runs as uid {owner}", w.uid));
        }
        // Read after the pidfd was opened: while the pidfd's process lives, /proc/<pid> is it.
        if !fd.alive() {
            return None;
        }
        Some((fd, s.state))
    }
}
