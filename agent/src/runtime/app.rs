//! One watched app: a check (PM2 state + /proc samples + HTTP probe), its judgement, and the
//! actions that follow (restart with verification and kill escalation, resurrect, give up).
//!
//! Shared by the daemon's watch loop and by `check --once`, so both judge and act alike.
//! The decisions themselves are in `policy`; this module is the edge that touches the world.
//! Invariants: a restart is made only under `restart.lock` after re-reading `restarts.json`, so
//! two pmguard processes never restart one app inside its cooldown; only processes owned by the
//! PM2 user are ever signalled, through a pidfd (never a reused pid).

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock;
use crate::clock::Mono;
use crate::config::{AgentConfig, AppConfig};
use crate::pm2::liveness::{self, DaemonProcess, Liveness};
use crate::pm2::{Client, Pm2Error, ProcessEntry, Snapshot};
use crate::policy::{
    decide, judge, AppState, Decision, Health, InstanceView, Pm2View, Policy, Verdict,
};
use crate::probe::{InFlight, ProbeResult, Prober, Started};
use crate::procfs::PidTracker;
use crate::procfs::StuckRule;
use crate::procfs::{self, ProcWatch};
use crate::report::events::{Event, EventLog, Kind};
use crate::report::state::{
    AppRestarts, AppStatus, InstanceStatus, ProbeRecord, RestartRecord, StateDir,
};
use crate::sys::files::LockError;

/// How long a check waits for PM2's process list.
pub const LIST_TIMEOUT: Duration = Duration::from_secs(3);
const HISTORY: usize = 20;
const DEFAULT_KILL_TIMEOUT_MS: u64 = 1_600;

/// A PM2 process list, or why there is none.
type SnapshotResult = Result<Arc<Snapshot>, Pm2Failure>;

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
    snapshot: Mutex<Option<(Mono, SnapshotResult)>>,
    /// Serializes `pm2 resurrect` among the apps of this process; holds when the agent last
    /// alerted that it cannot resurrect from inside its sandbox.
    resurrect: Mutex<Option<Mono>>,
    /// Running in the systemd sandbox (`PMGUARD_SANDBOXED=1` in the unit): a PM2 daemon started
    /// from here would inherit the sandbox (read-only home, private /tmp) and die with the agent,
    /// so the daemon alerts and the cron backup check, outside the sandbox, resurrects.
    pub sandboxed: bool,
    pub board: Mutex<BTreeMap<String, AppStatus>>,
    /// Per-check metrics for the AWS sink; `None` without an `[aws]` section.
    pub recorder: Option<Arc<crate::aws::Recorder>>,
    /// When the agent last said PM2 was stopped cleanly (once per cooldown).
    resurrect_alerted: Mutex<Option<Mono>>,
    /// Mirrors `restarts.json`'s `pm2_stopped_on_purpose`, so the hot path reads no file.
    stopped_on_purpose: std::sync::atomic::AtomicBool,
    /// The PM2 connection generation current when `pm2 kill` was seen: only an answer on a
    /// newer connection (a new daemon) clears the flag, not a reply already on its way.
    stopped_generation: AtomicU64,
}

/// Apps checked at nearly the same moment share one `getMonitorData`.
pub const SNAPSHOT_MAX_AGE: u64 = 250;

impl Shared {
    pub fn new(agent: AgentConfig, client: Arc<Client>, events: Arc<EventLog>) -> Shared {
        let stopped = StateDir::new(&agent.state_dir)
            .read_restarts()
            .pm2_stopped_on_purpose;
        Shared {
            state: StateDir::new(&agent.state_dir),
            agent,
            client,
            events,
            proc_root: PathBuf::from("/proc"),
            ticks_per_sec: procfs::ticks_per_sec(),
            snapshot: Mutex::new(None),
            resurrect: Mutex::new(None),
            sandboxed: false,
            board: Mutex::new(BTreeMap::new()),
            recorder: None,
            // Loaded, not assumed: a flag set by an earlier run (or the daemon, for the backup
            // check) must be cleared by the next answer, or a later crash is never repaired.
            stopped_on_purpose: std::sync::atomic::AtomicBool::new(stopped),
            stopped_generation: AtomicU64::new(0),
            resurrect_alerted: Mutex::new(None),
        }
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
        if let Some((at, snap)) = cached.as_ref() {
            if now.saturating_sub(*at) <= max_age {
                return snap.clone();
            }
        }
        let fresh = self
            .client
            .list(LIST_TIMEOUT)
            .map(Arc::new)
            .map_err(|e| self.judge_failure(&e));
        *cached = Some((clock::mono_now(), fresh.clone()));
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

/// Locks `m`, taking the data even if a thread panicked while holding it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// PM2's state and the /proc samples of one check, before its probe's result.
#[derive(Debug)]
pub struct Observation {
    at: Mono,
    view: Pm2View,
    snapshot: Option<Arc<Snapshot>>,
}

/// What one check saw, before judgement.
#[derive(Debug)]
pub struct Check {
    pub at: Mono,
    pub view: Pm2View,
    pub probe: Option<ProbeResult>,
    pub verdict: Verdict,
    snapshot: Option<Arc<Snapshot>>,
}

/// The watcher of one app.
#[derive(Debug)]
pub struct App {
    pub cfg: AppConfig,
    pub policy: Policy,
    pub state: AppState,
    prober: Option<Prober>,
    trackers: BTreeMap<u32, (ProcWatch, PidTracker)>,
    /// Last seen PM2 restart counter and pid per pm_id, to notice restarts made behind our
    /// back: autorestart moves the counter; `pm2 update` or a resurrected daemon starts every
    /// app afresh (a new pid) with the counter where it was.
    restart_counts: BTreeMap<u32, (u64, u32)>,
    /// The last probe, until `publish` moves it into the board's history.
    new_probe: Option<ProbeRecord>,
    /// Checks made since this watcher started (shown by `status`).
    checks: u64,
    restarts_shown: VecDeque<RestartRecord>,
    note: Option<String>,
    /// When pmguard last restarted this app, until a check passes again.
    awaiting_recovery: Option<Mono>,
    /// pm_ids the last check found stuck (stopped, uninterruptible or spinning): a restart kills
    /// them at once instead of waiting out a graceful shutdown they cannot perform.
    hung: Vec<u32>,
    /// The watch loop's view of this app's schedule; an action extends it step by step.
    pub progress: Option<Arc<Progress>>,
    /// A person stopped the app (PM2's bus: `stop`, manually): no restart until it runs again.
    manual_stop: bool,
}

impl App {
    pub fn new(cfg: AppConfig, now: Mono, persisted: Option<&AppRestarts>) -> App {
        let policy = Policy::from(&cfg);
        let mut state = AppState::new(now, &policy);
        if let Some(p) = persisted {
            p.apply_to(&mut state);
            // A restart made shortly before this process started still deserves its grace.
            if let Some(last) = p.last() {
                let grace_end = last + policy.startup_grace;
                state.grace_until = Some(
                    state
                        .grace_until
                        .map_or(grace_end, |g| g.min(grace_end.max(now))),
                );
            }
        }
        App {
            prober: cfg.health_url.clone().map(Prober::new),
            policy,
            state,
            cfg,
            trackers: BTreeMap::new(),
            restart_counts: BTreeMap::new(),
            new_probe: None,
            checks: 0,
            restarts_shown: VecDeque::new(),
            note: None,
            awaiting_recovery: None,
            hung: Vec::new(),
            progress: None,
            manual_stop: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// PM2 says a person stopped this app (`pm2 stop`, or the stops of `pm2 kill`).
    pub fn stopped_by_person(&mut self) {
        self.manual_stop = true;
    }

    /// Takes a new config for this app, keeping its history.
    pub fn reconfigure(&mut self, cfg: AppConfig) {
        if cfg.health_url != self.cfg.health_url {
            self.prober = cfg.health_url.clone().map(Prober::new);
        }
        self.policy = Policy::from(&cfg);
        self.cfg = cfg;
    }

    /// The period until the next check: `interval` when healthy, `retry_interval` otherwise.
    pub fn period(&self) -> Duration {
        match self.state.health {
            Health::Healthy => self.cfg.interval,
            _ => self
                .cfg
                .retry_interval
                .min(self.cfg.interval.max(self.cfg.retry_interval)),
        }
    }

    fn stuck_rule(&self) -> StuckRule {
        StuckRule {
            cpu_threshold: self.cfg.cpu_threshold,
            cpu_duration: self.cfg.cpu_duration.as_millis() as u64,
            halt_window: self.cfg.timeout.as_millis() as u64,
            ticks_per_sec: 0,
        }
    }

    /// Looks at PM2, /proc and the health endpoint once, blocking until the probe is done.
    pub fn check(&mut self, shared: &Shared, max_age: u64) -> Check {
        let seen = self.observe(shared, max_age);
        let probe = self.prober.as_mut().map(|p| {
            p.probe(
                self.cfg.timeout,
                &self.cfg.expect_status,
                self.cfg.expect_body.as_deref(),
            )
        });
        self.conclude(seen, probe)
    }

    /// The first half of a check: PM2's state of the app and the /proc samples of its pids.
    pub fn observe(&mut self, shared: &Shared, max_age: u64) -> Observation {
        let snap = shared.snapshot(max_age);
        let at = clock::mono_now();
        let mut rule = self.stuck_rule();
        rule.ticks_per_sec = shared.ticks_per_sec;
        let (view, snapshot) = match &snap {
            Err(f) if f.gone => (Pm2View::DaemonDown(f.message.clone()), None),
            Err(f) => (Pm2View::Unresponsive(f.message.clone()), None),
            Ok(s) => {
                let entries = s.by_name(&self.cfg.name);
                if entries.is_empty() {
                    (Pm2View::Missing, Some(s.clone()))
                } else {
                    let views = entries
                        .iter()
                        .map(|e| self.sample(shared, e, at, &rule))
                        .collect();
                    let alive: Vec<u32> = entries.iter().map(|e| e.pid).collect();
                    self.trackers.retain(|pid, _| alive.contains(pid));
                    (Pm2View::Instances(views), Some(s.clone()))
                }
            }
        };
        Observation { at, view, snapshot }
    }

    /// Starts this app's HTTP probe without waiting (`None`: the app has no `health_url`).
    pub fn start_probe(&mut self) -> Option<Started> {
        let timeout = self.cfg.timeout;
        self.prober.as_mut().map(|p| p.start(timeout))
    }

    /// Moves a probe from `start_probe` on; its result once there is one.
    pub fn advance_probe(&mut self, f: &mut InFlight) -> Option<ProbeResult> {
        let p = self.prober.as_mut()?;
        p.advance(f, &self.cfg.expect_status, self.cfg.expect_body.as_deref())
    }

    /// The second half of a check: the verdict on what was seen and the probe's result.
    pub fn conclude(&self, seen: Observation, probe: Option<ProbeResult>) -> Check {
        let failure = probe
            .as_ref()
            .filter(|p| !p.outcome.passed())
            .map(|p| p.outcome.reason());
        let verdict = judge(&seen.view, failure.as_deref());
        Check {
            at: seen.at,
            view: seen.view,
            probe,
            verdict,
            snapshot: seen.snapshot,
        }
    }

    fn sample(
        &mut self,
        shared: &Shared,
        e: &ProcessEntry,
        now: Mono,
        rule: &StuckRule,
    ) -> InstanceView {
        let mut stuck = None;
        if e.pid > 0 && e.status == crate::pm2::Status::Online {
            if let std::collections::btree_map::Entry::Vacant(slot) = self.trackers.entry(e.pid) {
                if let Ok(w) = ProcWatch::open(&shared.proc_root, e.pid) {
                    if let Ok(s) = w.sample() {
                        slot.insert((w, PidTracker::new(e.pid, s.start_ticks)));
                    }
                }
            }
            if let Some((w, t)) = self.trackers.get_mut(&e.pid) {
                match w.sample() {
                    Ok(s) if s.start_ticks == t.start_ticks => {
                        stuck = t.observe(s.state, s.cpu_ticks, now, rule);
                    }
                    _ => {
                        self.trackers.remove(&e.pid);
                    }
                }
            }
        }
        InstanceView {
            pm_id: e.pm_id,
            pid: e.pid,
            status: e.status.clone(),
            stuck,
        }
    }

    /// Notices restarts PM2 made by itself (autorestart after a crash, `pm2 restart` by a person)
    /// and gives the app a fresh grace. Returns the pm_ids whose counter moved.
    pub fn notice_pm2_restarts(&mut self, shared: &Shared, snap: &Snapshot, now: Mono) -> Vec<u32> {
        let mut moved = Vec::new();
        let mut restarts = 0;
        for e in snap.by_name(&self.cfg.name) {
            if e.pid == 0 {
                // Between processes (stopped, launching): nothing to compare yet.
                continue;
            }
            let now_seen = (e.restart_time, e.pid);
            let prev = self.restart_counts.insert(e.pm_id, now_seen);
            if let Some((count, _)) = prev.filter(|p| *p != now_seen) {
                moved.push(e.pm_id);
                // A counter that went down was reset (pm2 reset, daemon restart), or stayed
                // while the process was started afresh (pm2 update): count one.
                restarts += e.restart_time.saturating_sub(count).max(1);
            }
        }
        if let Some(r) = &shared.recorder {
            r.restarts(&self.cfg.name, restarts);
        }
        if !moved.is_empty() {
            self.state.restarted_elsewhere(now, &self.policy);
            shared.emit(
                Event::new(
                    Kind::Pm2Event,
                    Some(&self.cfg.name),
                    "PM2 restarted the app by itself; counting from zero with a fresh grace.",
                )
                .with("pm_ids", moved.clone()),
            );
        }
        moved
    }

    /// Judges a check, records it, acts on the decision. Returns the decision taken.
    pub fn handle(&mut self, shared: &Shared, check: Check) -> Decision {
        let (decision, snapshot) = self.assess(shared, check);
        self.act(shared, decision, snapshot.as_deref())
    }

    /// Judges a check and records it; says what to do without doing it. Never blocks for long:
    /// the daemon runs it for every app on one thread and hands an action to its own thread.
    pub fn assess(&mut self, shared: &Shared, check: Check) -> (Decision, Option<Arc<Snapshot>>) {
        let now = check.at;
        if let Some(s) = &check.snapshot {
            self.notice_pm2_restarts(shared, s, now);
        }
        // Stuck by the tracker's window, or spinning at the threshold right now: a process whose
        // event loop is busy cannot run its SIGINT handler either, so PM2's graceful stop would
        // wait out the whole kill_timeout.
        self.hung = match &check.view {
            Pm2View::Instances(list) => list
                .iter()
                .filter(|i| {
                    i.stuck.is_some()
                        || self
                            .trackers
                            .get(&i.pid)
                            .and_then(|(_, t)| t.cpu_pct)
                            .is_some_and(|c| c >= self.cfg.cpu_threshold)
                })
                .map(|i| i.pm_id)
                .collect(),
            _ => Vec::new(),
        };
        let before = self.state.health;
        if self.manual_stop {
            let running = matches!(&check.view, Pm2View::Instances(l)
                if l.iter().all(|i| i.status == crate::pm2::Status::Online));
            if running {
                self.manual_stop = false;
            }
        }
        // Only the app's own state is the person's doing; a daemon that died meanwhile is not.
        let about_the_app = matches!(
            check.verdict,
            Verdict::Failed { .. } | Verdict::Transitional(_) | Verdict::Missing
        );
        let decision = if self.manual_stop && about_the_app {
            // Counted as nothing: a person's stop is not a failure to repair.
            self.state.failures = 0;
            self.state.health = Health::StoppedByPerson;
            Decision::Wait {
                why: Some("stopped by a person (`pm2 stop` / `pm2 kill`): not restarting until it runs again".into()),
            }
        } else {
            decide(&mut self.state, &self.policy, &check.verdict, now)
        };
        self.record_probe(shared, &check);
        self.record_metrics(shared, &check);
        if let Decision::Wait { why } = &decision {
            self.note = why.clone();
        } else {
            self.note = None;
        }
        if self.state.health != before {
            let mut e = Event::new(
                Kind::StateChange,
                Some(&self.cfg.name),
                format!("App is now {}.", health_word(self.state.health)),
            )
            .with("from", health_word(before))
            .with("to", health_word(self.state.health));
            if let Some(n) = &self.note {
                e = e.with("reason", n.as_str());
            }
            if self.state.health == Health::Healthy {
                if let Some(at) = self.awaiting_recovery.take() {
                    // The restart is verified: a passing check after it.
                    e = e.with("recovered_ms", now.saturating_sub(at));
                }
            }
            shared.emit(e);
        }
        (decision, check.snapshot)
    }

    /// Carries out a decision from `assess` (a restart may take seconds) and updates the board.
    pub fn act(
        &mut self,
        shared: &Shared,
        decision: Decision,
        snap: Option<&Snapshot>,
    ) -> Decision {
        let decision = match decision {
            Decision::Restart { culprits, reason } => self.restart(shared, culprits, reason),
            Decision::Resurrect { reason } => {
                self.resurrect(shared, &reason);
                Decision::Resurrect { reason }
            }
            Decision::GiveUp {
                restarts,
                pause_ms,
                reason,
            } => {
                shared.emit(
                    Event::new(Kind::GiveUp, Some(&self.cfg.name), format!(
                        "Crash loop: {restarts} restarts within {}; not restarting for {}. A person should look at this app.",
                        crate::config::duration::format(self.cfg.crashloop_window),
                        crate::config::duration::format(Duration::from_millis(pause_ms)),
                    ))
                    .with("restarts", restarts)
                    .with("pause_ms", pause_ms)
                    .with("reason", reason.as_str()),
                );
                self.persist(shared);
                Decision::GiveUp {
                    restarts,
                    pause_ms,
                    reason,
                }
            }
            d => d,
        };
        self.publish(shared, snap);
        decision
    }

    /// Keeps the probe for `status` and writes the check to `events.jsonl` when it did not pass
    /// (every check with `log_passing_checks`): at 100 apps a line per passing check would be
    /// 8.6 million lines a day, pushing the restarts out of the rotated file.
    fn record_probe(&mut self, shared: &Shared, check: &Check) {
        self.checks += 1;
        if let Some(p) = &check.probe {
            self.new_probe = Some(ProbeRecord {
                ts_ms: clock::wall_ms(),
                ok: p.outcome.passed(),
                latency_ms: p.latency.as_millis() as u64,
                result: p.outcome.reason(),
            });
        }
        if matches!(check.verdict, Verdict::Healthy) && !shared.agent.log_passing_checks {
            return;
        }
        let mut e = match &check.probe {
            None => Event::new(
                Kind::Check,
                Some(&self.cfg.name),
                verdict_line(&check.verdict),
            ),
            Some(p) => {
                let mut e = Event::new(
                    Kind::Probe,
                    Some(&self.cfg.name),
                    verdict_line(&check.verdict),
                )
                .with(
                    "url",
                    self.cfg
                        .health_url
                        .as_ref()
                        .map_or(String::new(), |u| u.redacted()),
                )
                .with("ok", p.outcome.passed())
                .with("latency_ms", p.latency.as_millis() as u64)
                .with("result", p.outcome.reason());
                if let Some(s) = p.outcome.status() {
                    e = e.with("status", s);
                }
                e
            }
        };
        if let Pm2View::Instances(list) = &check.view {
            e = e.with("pids", list.iter().map(|i| i.pid).collect::<Vec<_>>());
            let cpu: Vec<Option<f64>> = list
                .iter()
                .map(|i| {
                    self.trackers
                        .get(&i.pid)
                        .and_then(|(_, t)| t.cpu_pct)
                        .map(|c| c.round())
                })
                .collect();
            e = e.with("cpu_pct", cpu);
        }
        e = e.with("failures", self.state.failures);
        shared.emit(e);
    }

    /// Feeds this check into the AWS sink's aggregate (nothing without `[aws]`).
    fn record_metrics(&self, shared: &Shared, check: &Check) {
        let Some(r) = &shared.recorder else {
            return;
        };
        let (mut cpu, mut memory) = (None, None);
        if let Some(s) = &check.snapshot {
            for e in s.by_name(&self.cfg.name) {
                *memory.get_or_insert(0.0) += e.memory as f64;
                if let Some(pct) = self.trackers.get(&e.pid).and_then(|(_, t)| t.cpu_pct) {
                    *cpu.get_or_insert(0.0) += pct;
                }
            }
        }
        r.check(
            &self.cfg.name,
            &crate::aws::metrics::CheckSample {
                healthy: matches!(check.verdict, Verdict::Healthy),
                response_ms: check
                    .probe
                    .as_ref()
                    .map(|p| p.latency.as_secs_f64() * 1000.0),
                cpu_pct: cpu,
                memory_bytes: memory,
            },
        );
    }

    /// Updates this app's line in the shared board (`status.json`) in place: the board keeps
    /// the probe history, so a check adds one record instead of copying twenty.
    pub fn publish(&mut self, shared: &Shared, snap: Option<&Snapshot>) {
        let instances = snap
            .map(|s| {
                s.by_name(&self.cfg.name)
                    .into_iter()
                    .map(|e| InstanceStatus {
                        pm_id: e.pm_id,
                        pid: e.pid,
                        status: e.status.as_str().to_string(),
                        cpu_pct: self.trackers.get(&e.pid).and_then(|(_, t)| t.cpu_pct),
                        memory: e.memory,
                        restart_time: e.restart_time,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut board = lock(&shared.board);
        let entry = board
            .entry(self.cfg.name.clone())
            .or_insert_with(|| AppStatus {
                name: self.cfg.name.clone(),
                health: String::new(),
                failures: 0,
                max_retries: 0,
                checks: 0,
                note: None,
                last_check_ms: None,
                instances: Vec::new(),
                probes: VecDeque::new(),
                restarts: VecDeque::new(),
            });
        let health = health_word(self.state.health);
        if entry.health != health {
            entry.health = health.to_string();
        }
        entry.failures = self.state.failures;
        entry.max_retries = self.cfg.max_retries;
        entry.checks = self.checks;
        if entry.note != self.note {
            entry.note = self.note.clone();
        }
        entry.last_check_ms = Some(clock::wall_ms());
        entry.instances = instances;
        if let Some(p) = self.new_probe.take() {
            entry.probes.push_back(p);
            if entry.probes.len() > HISTORY {
                entry.probes.pop_front();
            }
        }
        if entry.restarts != self.restarts_shown {
            entry.restarts = self.restarts_shown.clone();
        }
    }

    fn persist(&self, shared: &Shared) {
        match shared.state.lock_restarts(Duration::from_secs(5)) {
            Ok(_guard) => {
                let mut book = shared.state.read_restarts();
                book.apps
                    .insert(self.cfg.name.clone(), AppRestarts::from_state(&self.state));
                if let Err(error) = shared.state.write_restarts(&book) {
                    tracing::warn!(message = "Cannot save restart history.", app = %self.cfg.name, %error);
                }
            }
            Err(e) => {
                tracing::warn!(message = "Cannot lock restart history.", app = %self.cfg.name, error = ?e)
            }
        }
    }

    /// Restarts the culprits (or every instance), verifies, escalates; returns what was done.
    fn restart(&mut self, shared: &Shared, culprits: Vec<u32>, reason: String) -> Decision {
        let name = self.cfg.name.clone();
        let guard = match shared.state.lock_restarts(self.cfg.restart_timeout) {
            Ok(g) => g,
            Err(e) => {
                let why = match e {
                    LockError::Busy => "another pmguard process holds restart.lock".to_string(),
                    LockError::Io(e) => e.to_string(),
                };
                // Undo the booking: nothing was restarted.
                self.state.restarts.pop_back();
                shared.emit(Event::new(
                    Kind::RestartFailed,
                    Some(&name),
                    format!("Restart skipped: {why}."),
                ));
                return Decision::Wait { why: Some(why) };
            }
        };
        let mut book = shared.state.read_restarts();
        let ours = self
            .state
            .restarts
            .pop_back()
            .unwrap_or_else(clock::mono_now);
        if let Some(theirs) = book.apps.get(&name) {
            // Someone else (the backup check, or a previous agent) restarted within the cooldown.
            if theirs.last().is_some_and(|t| {
                ours.saturating_sub(t) < self.policy.restart_cooldown
                    && self.state.last_restart() != Some(t)
            }) {
                theirs.apply_to(&mut self.state);
                self.state.grace_until = theirs.last().map(|t| t + self.policy.startup_grace);
                drop(guard);
                return Decision::Wait {
                    why: Some(
                        "another pmguard process restarted this app within the cooldown".into(),
                    ),
                };
            }
        }
        self.state.restarts.push_back(ours);
        // Booked before PM2 is asked: an agent killed mid-restart must not leave a successor
        // (or the backup check) free to restart the app again inside the cooldown.
        book.apps
            .insert(name.clone(), AppRestarts::from_state(&self.state));
        if let Err(error) = shared.state.write_restarts(&book) {
            tracing::warn!(message = "Cannot save restart history.", app = %name, %error);
        }
        let started = clock::mono_now();
        let mut e = Event::new(Kind::Restart, Some(&name), format!("Restarting: {reason}."))
            .with("reason", reason.as_str())
            .with("attempt", self.state.restarts.len());
        if !culprits.is_empty() {
            e = e.with("pm_ids", culprits.clone());
        }
        shared.emit(e);
        if let Some(r) = &shared.recorder {
            r.restarts(&name, 1);
        }
        let outcome = restart_instances(
            shared,
            &name,
            &Targets {
                culprits: &culprits,
                hung: &self.hung,
                restart_timeout: self.cfg.restart_timeout,
            },
            self.progress.as_deref(),
        );
        let elapsed = clock::mono_now().saturating_sub(started);
        self.awaiting_recovery = Some(started);
        match &outcome {
            Ok(done) => {
                let replaced = done
                    .iter()
                    .all(|d| d.new_pid != 0 && d.new_pid != d.old_pid);
                shared.emit(
                    Event::new(
                        Kind::RestartDone,
                        Some(&name),
                        if replaced {
                            "Restart done: new process(es) up; waiting for a passing check."
                        } else {
                            "Restart done, but PM2 shows no new process yet; waiting for a passing check."
                        },
                    )
                    .with("replaced", replaced)
                    .with("pm_ids", done.iter().map(|d| d.pm_id).collect::<Vec<_>>())
                    .with(
                        "old_pids",
                        done.iter().map(|d| d.old_pid).collect::<Vec<_>>(),
                    )
                    .with("pids", done.iter().map(|d| d.new_pid).collect::<Vec<_>>())
                    .with("escalated", done.iter().any(|d| d.escalated))
                    .with("duration_ms", elapsed),
                );
            }
            Err(why) => {
                shared.emit(
                    Event::new(
                        Kind::RestartFailed,
                        Some(&name),
                        format!("Restart failed: {why}."),
                    )
                    .with("duration_ms", elapsed),
                );
            }
        }
        // The grace starts when PM2 is done, not when we asked.
        self.state.grace_until = Some(clock::mono_now() + self.policy.startup_grace);
        self.trackers.clear();
        self.restarts_shown.push_back(RestartRecord {
            ts_ms: clock::wall_ms(),
            reason: reason.clone(),
            pm_ids: outcome
                .as_ref()
                .map(|d| d.iter().map(|x| x.pm_id).collect())
                .unwrap_or_default(),
        });
        if self.restarts_shown.len() > HISTORY {
            self.restarts_shown.pop_front();
        }
        book.apps
            .insert(name.clone(), AppRestarts::from_state(&self.state));
        if let Err(error) = shared.state.write_restarts(&book) {
            tracing::warn!(message = "Cannot save restart history.", app = %name, %error);
        }
        drop(guard);
        // Counters moved by our own restart are not "PM2 restarting by itself".
        if let Ok(s) = shared.snapshot(0) {
            for e in s.by_name(&name).into_iter().filter(|e| e.pid > 0) {
                self.restart_counts.insert(e.pm_id, (e.restart_time, e.pid));
            }
        }
        Decision::Restart { culprits, reason }
    }

    /// Brings a dead PM2 daemon back with `pm2 resurrect`, at most once per cooldown (shared
    /// with the other apps and with the backup check through `restarts.json`).
    fn resurrect(&mut self, shared: &Shared, reason: &str) {
        if shared.sandboxed {
            let mut last = lock(&shared.resurrect);
            let now = clock::mono_now();
            if last.is_none_or(|t| now.saturating_sub(t) >= self.policy.restart_cooldown) {
                *last = Some(now);
                shared.emit(
                    Event::new(Kind::Resurrect, Some(&self.cfg.name), format!(
                        "PM2 daemon is down ({reason}). The agent runs in systemd's sandbox, which a PM2 it started would inherit, so the backup check (cron, every 5 minutes) resurrects it. Now: `sudo systemctl restart pm2-<user>` or `pm2 resurrect` as the PM2 user."
                    ))
                    .with("action", "alert"),
                );
            }
            return;
        }
        if resurrect_pm2(shared, &self.cfg.name, reason, self.policy.restart_cooldown) {
            self.state
                .restarted_elsewhere(clock::mono_now(), &self.policy);
        }
    }
}

/// Runs `pm2 resurrect` when the PM2 daemon is proven gone, at most once per `cooldown_ms`
/// (shared with every app and with the other pmguard process through `restarts.json`), and
/// only as PM2_HOME's owner. Returns whether it ran.
pub fn resurrect_pm2(shared: &Shared, app: &str, reason: &str, cooldown_ms: u64) -> bool {
    let _one = lock(&shared.resurrect);
    if !shared.agent.resurrect {
        shared.emit(Event::new(Kind::Resurrect, Some(app), format!("PM2 daemon is down ({reason}); resurrect is off in the config, so a person must run `pm2 resurrect`.")));
        return false;
    }
    // Another app may have brought it back while we waited; a daemon that is only slow must
    // never be resurrected (that would re-read a stale dump.pm2).
    if let Err(e) = shared.client.ping(Duration::from_secs(1)) {
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
    } else {
        return false;
    }
    let home = shared.client.paths().home.clone();
    // PM2 removes pm2.pid when it stops cleanly (`pm2 kill`, SIGTERM at shutdown or from
    // systemctl); a crashed or SIGKILLed daemon leaves it behind. Only a crash is pmguard's to
    // repair: a stop was someone's decision (and the bus's `pm2:kill` may not get out first).
    let cleanly_stopped = !home.join("pm2.pid").exists();
    if cleanly_stopped {
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
        return false;
    }
    if shared.stopped_on_purpose.load(Ordering::Relaxed)
        || shared.state.read_restarts().pm2_stopped_on_purpose
    {
        tracing::info!(message = "PM2 was stopped on purpose; not resurrecting.", app = %app);
        return false;
    }
    if let Err(why) = may_start_pm2_as(&home) {
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
    let Ok(_guard) = shared.state.lock_restarts(Duration::from_secs(5)) else {
        return false;
    };
    let mut book = shared.state.read_restarts();
    let now = clock::mono_now();
    if book
        .resurrected_at
        .is_some_and(|t| now.saturating_sub(t) < cooldown_ms)
    {
        return false;
    }
    book.resurrected_at = Some(now);
    if let Err(error) = shared.state.write_restarts(&book) {
        tracing::warn!(message = "Cannot save restart history.", app = %app, %error);
    }
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

/// PM2 and its apps may only ever be started as PM2_HOME's owner: `pm2 resurrect` run as root
/// against another user's home starts a root daemon and the user's apps as root.
fn may_start_pm2_as(home: &std::path::Path) -> Result<(), String> {
    let owner =
        crate::sys::privilege::home_owner(home).map_err(|e| format!("{e}; not resurrecting."))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if owner == me {
        Ok(())
    } else {
        Err(format!(
            "PM2_HOME {} belongs to uid {owner} and this process runs as uid {me}; not starting PM2 as another user. Run the check as PM2's user (`sudo -u <user> pmguard-agent check --once`).",
            home.display()
        ))
    }
}

fn health_word(h: Health) -> &'static str {
    match h {
        Health::Starting => "starting",
        Health::Healthy => "healthy",
        Health::Failing => "failing",
        Health::CoolingDown => "cooling_down",
        Health::CrashLoop => "crash_loop",
        Health::Missing => "missing",
        Health::Pm2Down => "pm2_down",
        Health::Pm2Unresponsive => "pm2_unresponsive",
        Health::StoppedByPerson => "stopped_by_person",
    }
}

fn verdict_line(v: &Verdict) -> String {
    match v {
        Verdict::Healthy => "Check passed.".into(),
        Verdict::Transitional(s) => format!("PM2 reports `{s}`."),
        Verdict::Missing => "PM2 does not know this app.".into(),
        Verdict::DaemonDown(e) => format!("PM2 daemon unreachable: {e}."),
        Verdict::Pm2Unresponsive(e) => format!("PM2 daemon not answering: {e}."),
        Verdict::Failed { reason, .. } => format!("Check failed: {reason}."),
    }
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
) -> Result<Vec<Restarted>, String> {
    let snap = shared.snapshot(0).map_err(|f| f.message)?;
    let targets: Vec<ProcessEntry> = snap
        .by_name(name)
        .into_iter()
        .filter(|e| t.culprits.is_empty() || t.culprits.contains(&e.pm_id))
        .cloned()
        .collect();
    if targets.is_empty() {
        return Err("PM2 no longer lists the app".into());
    }
    let signaller = Signaller::new(shared);
    let mut done = Vec::new();
    for e in targets {
        let deadline = Duration::from_millis(e.kill_timeout_ms.unwrap_or(DEFAULT_KILL_TIMEOUT_MS))
            + t.restart_timeout;
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
        let after = shared.snapshot(0).map_err(|f| f.message)?;
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
) -> Result<(), String> {
    // Up and new: PM2 (or anyone) started it again.
    let replaced = |generation: &mut u64| -> Result<bool, String> {
        let s = shared.snapshot(0).map_err(|f| f.message)?;
        *generation = s.generation;
        match s.by_name(name).into_iter().find(|x| x.pm_id == e.pm_id) {
            None => Err(format!("pm_id {} is no longer listed", e.pm_id)),
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
                let s = shared.snapshot(0).map_err(|f| f.message)?;
                shared
                    .client
                    .restart(e.pm_id, s.generation, deadline)
                    .map_err(|e2| format!("pm_id {}: {e2}", e.pm_id))
            }
            other => Err(format!("pm_id {}: {other}", e.pm_id)),
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
) -> Result<bool, String> {
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
    let again = shared.snapshot(0).map_err(|f| f.message)?;
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
                return Err(format!("pm_id {}: {}", e.pm_id, err));
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

/// A pidfd: signals reach the process it was opened on, never a later holder of the pid.
#[derive(Debug)]
struct Pidfd {
    fd: std::os::fd::OwnedFd,
}

impl Pidfd {
    fn open(pid: u32) -> Option<Pidfd> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscall; the returned fd is owned below.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: fd is a fresh descriptor we own.
        Some(Pidfd {
            fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) },
        })
    }

    fn alive(&self) -> bool {
        use std::os::fd::AsRawFd;
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd. A pidfd polls readable once the process has exited.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n == 0
    }

    fn kill(&self) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: valid pidfd, null siginfo, no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn wait_exit(&self, max: Duration) {
        use std::os::fd::AsRawFd;
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, max.as_millis() as libc::c_int) };
    }
}

/// Runs `pm2 resurrect` with PM2_HOME set, in its own process group, bounded to 60 s.
fn run_resurrect(pm2_bin: &str, home: &std::path::Path) -> Result<(), String> {
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
        .map_err(|e| format!("cannot run `{pm2_bin}`: {e}"))?;
    let deadline = clock::mono_now() + 60_000;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("exited with {status}")),
            Ok(None) if clock::mono_now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("did not finish within 60 s".into());
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}
