//! What every watched app shares: the PM2 client and its short-lived snapshot cache, the event
//! log, the state directory, the status board, and what the agent knows about the PM2 daemon
//! (stopped on purpose by a person, when it last alerted about a resurrect).
//!
//! Invariant: one `getMonitorData` serves every app checked within `SNAPSHOT_MAX_AGE` of it, and
//! concurrent callers wait for one call rather than each asking PM2. A list older than that is
//! handed out again (`quiet_snapshot`) only while PM2's bus stayed connected and silent since it
//! was taken, for at most `RELIST_MS`, or `RELIST_MAX_MS` while PM2 answers a cheap `ping`: PM2
//! reports every exit, stop, restart and start on the bus, and the list is the daemon's costliest
//! request (it measures every process it runs).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock;
use crate::clock::Mono;
use crate::config::AgentConfig;
use crate::pm2::bus::{Link, Mark};
use crate::pm2::liveness::{self, Liveness};
use crate::pm2::{Client, Pm2Error, Snapshot};
use crate::procfs;
use crate::report::events::{Event, EventLog, Kind};
use crate::report::pauses::{FileStamp, Pause, PauseBook};
use crate::report::state::{AppStatus, StateDir};
use crate::sync::lock;

/// How long a check waits for PM2's process list.
pub const LIST_TIMEOUT: Duration = Duration::from_secs(3);

/// A PM2 process list, or why there is none.
type SnapshotResult = Result<Arc<Snapshot>, Pm2Failure>;

/// The last list: when it was asked for, where the bus was then, and the answer.
struct Listed {
    at: Mono,
    bus: Option<Mark>,
    result: SnapshotResult,
}

/// How long a quiet list is reused with nothing more: a stalled daemon (which sends nothing on
/// the bus) is noticed within this, by the next list or by a `ping` (see `RELIST_MAX_MS`). A
/// ping wakes the daemon's event loop: 0.16-0.45 ms of its CPU each (BENCHMARKS.md, round 4).
/// Pinged between lists, that is ~4 a minute at 10 s (0.001-0.002 s of the daemon's CPU) and
/// was ~10 at 5 s (0.002-0.005 s, up to an eighth of what one app at 1 s cost the box). A
/// stalled daemon is only reported (`pm2_unresponsive`), never acted on; exits, restarts and
/// stops come on the bus and dead pids show in /proc at once, so only that report waits.
pub const RELIST_MS: u64 = 10_000;

/// The longest a list is reused while the bus is quiet. Past `RELIST_MS` the list stands only
/// while PM2 answered a `ping` within `RELIST_MS`: a ping costs the daemon little, the list
/// measures every process it runs (1.2 % of a core at 100 processes asked every second). A lost
/// bus message is noticed by the next list within this.
pub const RELIST_MAX_MS: u64 = 30_000;

/// How long a check waits for PM2's `ping` before it asks for the list (which judges why).
pub const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// Why PM2 gave no process list, judged once (see `pm2::liveness`).
#[derive(Debug, Clone, PartialEq)]
pub struct Pm2Failure {
    /// Proven gone (socket refused or missing, no daemon process): resurrect is safe.
    pub gone: bool,
    pub message: String,
}

impl std::fmt::Display for Pm2Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Pm2Failure {}

/// By when an app promises to report again, and how many checks it made: read by the main
/// thread, which withholds the heartbeat (and systemd's watchdog ping) when a promise is broken.
#[derive(Debug, Default)]
pub struct Progress {
    /// `Mono` by which the app promises to report again; 0 before its first check.
    pub due: AtomicU64,
    pub checks: AtomicU64,
}

impl Progress {
    /// Promises a report within `within` from now (an action announces each long step).
    pub fn promise(&self, within: Duration) {
        self.due.store(
            clock::mono_now() + within.as_millis() as u64,
            Ordering::Relaxed,
        );
    }
}

/// What every app shares: the PM2 client, the event sink, the state directory.
pub struct Shared {
    pub agent: AgentConfig,
    pub client: Arc<Client>,
    pub events: Arc<EventLog>,
    pub state: StateDir,
    pub proc_root: PathBuf,
    pub ticks_per_sec: u64,
    /// The last `getMonitorData`, reused by apps checked within `SNAPSHOT_MAX_AGE` of it.
    snapshot: Mutex<Option<Listed>>,
    /// When PM2 last answered a `ping` (0: not yet), and on which connection generation.
    pong: Mutex<(Mono, u64)>,
    /// PM2's bus as its reader thread sees it (never connected in `check --once`).
    pub bus: Arc<Link>,
    /// Serializes `pm2 resurrect` among the apps of this process; holds when the agent last
    /// alerted that it cannot resurrect from inside its sandbox.
    pub(super) resurrect: Mutex<Option<Mono>>,
    /// Running in the systemd sandbox (`PMGUARD_SANDBOXED=1` in the unit): a PM2 daemon started
    /// from here would inherit the sandbox (read-only home, private /tmp) and die with the agent,
    /// so the daemon alerts and the cron backup check, outside the sandbox, resurrects.
    pub sandboxed: bool,
    pub board: Mutex<BTreeMap<String, AppStatus>>,
    /// Per-check metrics for the AWS sink; `None` without an `[aws]` section.
    pub recorder: Option<Arc<crate::aws::Recorder>>,
    /// When the agent last said PM2 was stopped cleanly (once per cooldown).
    pub(super) resurrect_alerted: Mutex<Option<Mono>>,
    /// Mirrors `restarts.json`'s `pm2_stopped_on_purpose`, so the hot path reads no file.
    pub(super) stopped_on_purpose: std::sync::atomic::AtomicBool,
    /// The PM2 connection generation current when `pm2 kill` was seen: only an answer on a
    /// newer connection (a new daemon) clears the flag, not a reply already on its way.
    stopped_generation: AtomicU64,
    /// `pauses.json` as last read, and its stamp then (see `runtime::maintenance`).
    pub(super) pauses: Mutex<(Option<FileStamp>, PauseBook)>,
}

/// Apps checked at nearly the same moment share one `getMonitorData`.
pub const SNAPSHOT_MAX_AGE: u64 = 250;

impl Shared {
    pub fn new(agent: AgentConfig, client: Arc<Client>, events: Arc<EventLog>) -> Shared {
        let stopped = StateDir::new(&agent.state_dir)
            .read_restarts()
            .pm2_stopped_on_purpose;
        let shared = Shared {
            state: StateDir::new(&agent.state_dir),
            agent,
            client,
            events,
            proc_root: PathBuf::from("/proc"),
            ticks_per_sec: procfs::ticks_per_sec(),
            snapshot: Mutex::new(None),
            pong: Mutex::new((0, 0)),
            bus: Arc::new(Link::default()),
            resurrect: Mutex::new(None),
            sandboxed: false,
            board: Mutex::new(BTreeMap::new()),
            recorder: None,
            // Loaded, not assumed: a flag set by an earlier run (or the daemon, for the backup
            // check) must be cleared by the next answer, or a later crash is never repaired.
            stopped_on_purpose: std::sync::atomic::AtomicBool::new(stopped),
            stopped_generation: AtomicU64::new(0),
            resurrect_alerted: Mutex::new(None),
            pauses: Mutex::new((None, PauseBook::default())),
        };
        // Before the first check: a pause set while no agent ran is honoured from the start.
        super::maintenance::refresh(&shared);
        shared
    }

    /// `app`'s maintenance pause, if one is in force now (as last read from `pauses.json`).
    pub fn pause_of(&self, app: &str) -> Option<Pause> {
        lock(&self.pauses).1.active(app, clock::wall_ms()).cloned()
    }

    /// A person ran `pm2 kill`: remember it (for the backup check too) and say so.
    pub fn pm2_stopped_on_purpose(&self) {
        self.stopped_generation
            .store(self.client.generation(), Ordering::Relaxed);
        self.stopped_on_purpose.store(true, Ordering::Relaxed);
        self.set_stopped_flag(true);
        self.emit(Event::new(
            Kind::Resurrect,
            None,
            "PM2 was stopped on purpose (`pm2 kill`): pmguard will not resurrect it. Start it again with `pm2 resurrect` (or `systemctl start pm2-<user>`).",
        )
        .with("action", "none"));
    }

    fn set_stopped_flag(&self, on: bool) {
        if let Ok(_guard) = self.state.lock_restarts(Duration::from_secs(2)) {
            let mut book = self.state.read_restarts();
            if book.pm2_stopped_on_purpose != on {
                book.pm2_stopped_on_purpose = on;
                if let Err(error) = self.state.write_restarts(&book) {
                    tracing::warn!(message = "Cannot save restart history.", %error);
                }
            }
        }
    }

    /// PM2's process list, at most `max_age` ms old. Concurrent callers wait for one call.
    pub fn snapshot(&self, max_age: u64) -> SnapshotResult {
        let mut cached = lock(&self.snapshot);
        let now = clock::mono_now();
        if let Some(l) = cached.as_ref() {
            if now.saturating_sub(l.at) <= max_age {
                return l.result.clone();
            }
        }
        // Read before asking: an event that arrives while the list is on its way makes it doubtful.
        let bus = self.bus.mark();
        let fresh = self
            .client
            .list(LIST_TIMEOUT)
            .map(Arc::new)
            .map_err(|e| self.judge_failure(&e));
        *cached = Some(Listed {
            at: clock::mono_now(),
            bus,
            result: fresh.clone(),
        });
        drop(cached);
        // A daemon answers again after a `pm2 kill` (on a newer connection than the one the kill
        // was seen on): resurrect is allowed again when it dies.
        if let Ok(s) = &fresh {
            if self.stopped_on_purpose.load(Ordering::Relaxed)
                && s.generation > self.stopped_generation.load(Ordering::Relaxed)
                && self.stopped_on_purpose.swap(false, Ordering::Relaxed)
            {
                self.set_stopped_flag(false);
            }
        }
        fresh
    }

    /// The last list, if nothing since casts doubt on it: it was an answer, PM2's bus was
    /// connected when it was asked for and has stayed connected and silent since, the PM2
    /// connection is the one it came on, and it is younger than `RELIST_MS`, or younger than
    /// `RELIST_MAX_MS` and PM2 answered a ping (on that connection) within `RELIST_MS`.
    /// `None`: ask PM2 again.
    pub fn quiet_snapshot(&self) -> Option<Arc<Snapshot>> {
        let now = clock::mono_now();
        let (snap, age) = {
            let cached = lock(&self.snapshot);
            let l = cached.as_ref()?;
            let snap = l.result.as_ref().ok()?;
            let quiet = l.bus.is_some_and(|m| self.bus.quiet_since(m));
            if !quiet || snap.generation != self.client.generation() {
                return None;
            }
            (snap.clone(), now.saturating_sub(l.at))
        };
        if age < RELIST_MS {
            return Some(snap);
        }
        if age >= RELIST_MAX_MS {
            return None;
        }
        let (pong_at, pong_gen) = *lock(&self.pong);
        if pong_gen == snap.generation && now.saturating_sub(pong_at) < RELIST_MS {
            return Some(snap);
        }
        // Outside any lock: a stalled daemon costs this check the ping's timeout, then the
        // caller's list judges it.
        self.client.ping(PING_TIMEOUT).ok()?;
        if self.client.generation() != snap.generation {
            return None;
        }
        *lock(&self.pong) = (clock::mono_now(), snap.generation);
        Some(snap)
    }

    pub fn emit(&self, e: Event) {
        self.events.emit(e);
    }

    /// Whether a failed PM2 call means the daemon is gone or only slow.
    pub fn judge_failure(&self, e: &Pm2Error) -> Pm2Failure {
        match liveness::judge(e, self.client.paths(), &self.proc_root) {
            Liveness::Gone(message) => Pm2Failure {
                gone: true,
                message,
            },
            Liveness::Unresponsive(message) => Pm2Failure {
                gone: false,
                message,
            },
        }
    }
}
