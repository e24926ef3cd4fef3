//! One watched app: a check (PM2 state + /proc samples + HTTP probe), its judgement, and the
//! actions that follow (restart with verification and kill escalation, resurrect, give up).
//!
//! Shared by the daemon's watch loop and by `check --once`, so both judge and act alike.
//! The decisions themselves are in `policy`; this module is the edge that touches the world.
//! Invariants: a restart is made only under `restart.lock` after re-reading `restarts.json`, so
//! two pmguard processes never restart one app inside its cooldown; only processes owned by the
//! PM2 user are ever signalled, through a pidfd (never a reused pid).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use crate::clock;
use crate::clock::Mono;
use crate::config::{AppConfig, CpuScope};
use crate::pm2::{ProcessEntry, Snapshot};
use crate::policy::{
    decide, decide_paused, judge, with_tree_failures, AppState, Decision, Health, InstanceView,
    Pm2View, Policy, Verdict,
};
use crate::probe::{InFlight, ProbeResult, Prober, Started};
use crate::procfs::tree_rules::{TreeFinding, TreeRule, TreeWatch};
use crate::procfs::PidTracker;
use crate::procfs::ProcWatch;
use crate::procfs::StuckRule;
use crate::report::events::{Event, Kind};
use crate::report::state::{
    AppRestarts, AppStatus, InstanceStatus, ProbeRecord, RestartBook, RestartRecord,
};
use crate::sync::lock;
use crate::sys::files::{Lock, LockError};

use super::restart::{restart_instances, RestartError, Restarted, Targets};
use super::resurrect::resurrect_pm2;
use super::shared::{Progress, Shared};

const HISTORY: usize = 20;

/// PM2's state and the /proc samples of one check, before its probe's result.
#[derive(Debug)]
pub struct Observation {
    at: Mono,
    view: Pm2View,
    snapshot: Option<Arc<Snapshot>>,
    /// Rules broken over the app's process trees (`memory_limit`, `cpu_scope = "tree"`).
    tree_failures: Vec<(String, Vec<u32>)>,
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
    /// The /proc samples `quiet_list` read this check, used again by `sample`: one read of a
    /// pid's stat per check, not two.
    quiet_samples: Vec<(u32, crate::procfs::StatSample)>,
    /// The app's process trees, sampled only when a tree rule is set (`TreeRules::measures_tree`).
    tree: TreeWatch,
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
            prober: probers(&cfg),
            policy,
            state,
            cfg,
            trackers: BTreeMap::new(),
            quiet_samples: Vec::new(),
            tree: TreeWatch::default(),
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
        if cfg.probes != self.cfg.probes {
            self.prober = probers(&cfg);
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
        // With `cpu_scope = "tree"` CPU is judged over each tree (`tree_rule`), not per pid.
        let per_pid = self.cfg.tree.cpu_scope == CpuScope::Process;
        StuckRule {
            cpu_threshold: if per_pid {
                self.cfg.cpu_threshold
            } else {
                f64::INFINITY
            },
            cpu_duration: self.cfg.cpu_duration.as_millis() as u64,
            halt_window: self.cfg.timeout.as_millis() as u64,
            ticks_per_sec: 0,
        }
    }

    fn tree_rule(&self, ticks_per_sec: u64) -> TreeRule {
        let t = &self.cfg.tree;
        TreeRule {
            memory_limit: t.memory_limit,
            memory_duration: t.memory_duration.as_millis() as u64,
            cpu_threshold: (t.cpu_scope == CpuScope::Tree).then_some(self.cfg.cpu_threshold),
            cpu_duration: self.cfg.cpu_duration.as_millis() as u64,
            ticks_per_sec,
        }
    }

    /// Samples the trees of the app's running pids and judges the tree rules; nothing (and no
    /// /proc read beyond the pids themselves) when no tree rule is set.
    fn observe_trees(
        &mut self,
        shared: &Shared,
        entries: &[&ProcessEntry],
        at: Mono,
    ) -> Vec<(String, Vec<u32>)> {
        if !self.cfg.tree.measures_tree() {
            return Vec::new();
        }
        let rule = self.tree_rule(shared.ticks_per_sec);
        if !self.tree.due(at, &rule) {
            return Self::tree_failures(self.tree.last_found());
        }
        let roots: Vec<(u32, u32)> = entries
            .iter()
            .filter(|e| e.pid > 0 && e.status == crate::pm2::Status::Online)
            .map(|e| (e.pm_id, e.pid))
            .collect();
        let trees = crate::procfs::tree::sample_roots(&shared.proc_root, &roots);
        Self::tree_failures(&self.tree.observe(&trees, at, &rule))
    }

    fn tree_failures(found: &[TreeFinding]) -> Vec<(String, Vec<u32>)> {
        found
            .iter()
            .map(|f| (f.reason.clone(), f.pm_ids.clone()))
            .collect()
    }

    /// The memory of the instance at `pid`: its tree's RSS when trees are measured, PM2's
    /// `monit.memory` (the process alone) otherwise.
    fn memory_of(&self, e: &ProcessEntry) -> u64 {
        self.tree.totals(e.pid).map_or(e.memory, |t| t.rss_bytes)
    }

    /// The CPU of the instance at `pid`: its tree's with `cpu_scope = "tree"`, else its own.
    fn cpu_of(&self, pid: u32) -> Option<f64> {
        if self.cfg.tree.cpu_scope == CpuScope::Tree {
            return self.tree.totals(pid).and_then(|t| t.cpu_pct);
        }
        self.trackers.get(&pid).and_then(|(_, t)| t.cpu_pct)
    }

    /// Looks at PM2, /proc and the health endpoint once, blocking until the probe is done.
    pub fn check(&mut self, shared: &Shared, max_age: u64) -> Check {
        let seen = self.observe(shared, max_age);
        let probe = self.prober.as_mut().map(Prober::probe);
        self.conclude(seen, probe)
    }

    /// The first half of a check: PM2's state of the app and the /proc samples of its pids.
    pub fn observe(&mut self, shared: &Shared, max_age: u64) -> Observation {
        self.quiet_samples.clear();
        let snap = match self.quiet_list(shared) {
            Some(s) => Ok(s),
            None => shared.snapshot(max_age),
        };
        let at = clock::mono_now();
        let mut rule = self.stuck_rule();
        rule.ticks_per_sec = shared.ticks_per_sec;
        let mut tree_failures = Vec::new();
        let (view, snapshot) = match &snap {
            Err(f) if f.gone => (Pm2View::DaemonDown(f.message.clone()), None),
            Err(f) => (Pm2View::Unresponsive(f.message.clone()), None),
            Ok(s) => {
                let entries = s.by_name(&self.cfg.name);
                if entries.is_empty() {
                    (Pm2View::Missing, Some(s.clone()))
                } else {
                    tree_failures = self.observe_trees(shared, &entries, at);
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
        Observation {
            at,
            view,
            snapshot,
            tree_failures,
        }
    }

    /// The last process list, when it may stand in for asking PM2 again for this app: PM2's bus
    /// stayed connected and silent since it was taken and it is young (`Shared::quiet_snapshot`),
    /// the app was healthy at its last check and not stopped by a person, every instance in it is
    /// online with a pid, and each pid is still the very process this app's tracker opened: its
    /// kept /proc fd still reads (an exited process gives ESRCH, so a reused pid is never taken
    /// for it) with the same start time. Anything else, and the caller asks PM2.
    fn quiet_list(&mut self, shared: &Shared) -> Option<Arc<Snapshot>> {
        if self.state.health != Health::Healthy || self.manual_stop {
            return None;
        }
        let snap = shared.quiet_snapshot()?;
        let entries = snap.by_name(&self.cfg.name);
        let (trackers, samples) = (&self.trackers, &mut self.quiet_samples);
        let same = !entries.is_empty()
            && entries.iter().all(|e| {
                e.pid > 0
                    && e.status == crate::pm2::Status::Online
                    && trackers.get(&e.pid).is_some_and(|(w, t)| {
                        w.sample().is_ok_and(|s| {
                            samples.push((e.pid, s));
                            same_live_process(&s, t)
                        })
                    })
            });
        drop(entries);
        if !same {
            samples.clear();
        }
        same.then_some(snap)
    }

    /// Whether a process this observation saw has exited or been replaced since (its kept
    /// /proc handle no longer reads the very process the tracker opened): PM2's state in it is
    /// no longer the app's, so a failed probe beside it says nothing about the app as it is.
    pub fn observed_processes_changed(&self, seen: &Observation) -> bool {
        let Pm2View::Instances(list) = &seen.view else {
            return false;
        };
        list.iter().filter(|i| i.pid > 0).any(|i| {
            self.trackers
                .get(&i.pid)
                .is_some_and(|(w, t)| !w.sample().is_ok_and(|s| same_live_process(&s, t)))
        })
    }

    /// The next check is `next_in` away: kept probe connections too old by then are closed.
    pub fn release_kept(&mut self, next_in: Duration) {
        if let Some(p) = self.prober.as_mut() {
            p.release_kept(next_in);
        }
    }

    /// Starts this app's probes without waiting (`None`: the app has no probe).
    pub fn start_probe(&mut self) -> Option<Started> {
        self.prober.as_mut().map(Prober::start)
    }

    /// Moves a probe from `start_probe` on; its result once there is one.
    pub fn advance_probe(&mut self, f: &mut InFlight) -> Option<ProbeResult> {
        let p = self.prober.as_mut()?;
        p.advance(f)
    }

    /// The second half of a check: the verdict on what was seen and the probe's result.
    pub fn conclude(&self, seen: Observation, probe: Option<ProbeResult>) -> Check {
        let failure = probe
            .as_ref()
            .filter(|p| !p.outcome.passed())
            .map(|p| p.outcome.reason());
        let verdict =
            with_tree_failures(judge(&seen.view, failure.as_deref()), &seen.tree_failures);
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
                let seen = self
                    .quiet_samples
                    .iter()
                    .find(|(pid, _)| *pid == e.pid)
                    .map(|(_, s)| Ok(*s));
                match seen.unwrap_or_else(|| w.sample()) {
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
            kill_timeout_ms: e.kill_timeout_ms,
            stuck,
        }
    }

    /// Notices restarts PM2 made by itself (autorestart after a crash, `pm2 restart` by a person)
    /// and gives the app a fresh grace. Returns the pm_ids whose counter moved.
    pub fn notice_pm2_restarts(&mut self, shared: &Shared, snap: &Snapshot, now: Mono) -> Vec<u32> {
        let mut moved = Vec::new();
        let mut restarts = 0;
        // The longest grace a first-seen instance still has left (see below), in ms.
        let mut young = 0;
        for e in snap.by_name(&self.cfg.name) {
            if e.pid == 0 {
                // Between processes (stopped, launching): nothing to compare yet.
                continue;
            }
            let now_seen = (e.restart_time, e.pid);
            let prev = self.restart_counts.insert(e.pm_id, now_seen);
            if prev.is_none() {
                // First seen (a `pm2 start` or `pm2 resurrect` after the agent started): an
                // instance PM2 spawned less than `startup_grace` ago is still starting, and has
                // the rest of its grace, as after a restart.
                let age = e
                    .pm_uptime_ms
                    .map(|spawned| clock::wall_ms().saturating_sub(spawned));
                if let Some(age) = age.filter(|a| *a < self.policy.startup_grace) {
                    young = young.max(self.policy.startup_grace - age);
                }
            }
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
        if young > 0 {
            let end = now + young;
            self.state.grace_until = Some(self.state.grace_until.map_or(end, |g| g.max(end)));
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
        self.hung = self.hung_now(&check.view);
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
            Verdict::Failed { .. } | Verdict::Transitional { .. } | Verdict::Missing
        );
        let decision = if self.manual_stop && about_the_app {
            // Counted as nothing: a person's stop is not a failure to repair.
            self.state.failures = 0;
            self.state.health = Health::StoppedByPerson;
            Decision::Wait {
                why: Some("stopped by a person (`pm2 stop` / `pm2 kill`): not restarting until it runs again".into()),
            }
        } else if let Some(pause) = shared.pause_of(&self.cfg.name) {
            // Maintenance: judged and counted, never acted on (see `policy::decide_paused`).
            decide_paused(
                &mut self.state,
                &self.policy,
                &check.verdict,
                now,
                &pause.describe(),
            )
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
            self.announce_health(shared, before, now);
        }
        (decision, check.snapshot)
    }

    /// The pm_ids stuck by the tracker's window, or spinning at the threshold right now: a
    /// process whose event loop is busy cannot run its SIGINT handler either, so PM2's graceful
    /// stop would wait out the whole kill_timeout.
    fn hung_now(&self, view: &Pm2View) -> Vec<u32> {
        let Pm2View::Instances(list) = view else {
            return Vec::new();
        };
        list.iter()
            .filter(|i| {
                i.stuck.is_some()
                    || self
                        .trackers
                        .get(&i.pid)
                        .and_then(|(_, t)| t.cpu_pct)
                        .is_some_and(|c| c >= self.cfg.cpu_threshold)
            })
            .map(|i| i.pm_id)
            .collect()
    }

    /// A `state_change` event; a change to healthy after a restart says how long recovery took.
    fn announce_health(&mut self, shared: &Shared, before: Health, now: Mono) {
        let mut e = Event::new(
            Kind::StateChange,
            Some(&self.cfg.name),
            format!("App is now {}.", self.state.health.as_str()),
        )
        .with("from", before.as_str())
        .with("to", self.state.health.as_str());
        if let Some(n) = &self.note {
            e = e.with("reason", n.as_str());
        }
        let after_restart = self.awaiting_recovery.is_some();
        let mut recovered_ms = None;
        if self.state.health == Health::Healthy {
            if let Some(at) = self.awaiting_recovery.take() {
                // The restart is verified: a passing check after it.
                recovered_ms = Some(now.saturating_sub(at));
                e = e.with("recovered_ms", now.saturating_sub(at));
            }
        }
        shared.emit(e);
        if crate::policy::is_recovery(before, self.state.health, after_restart) {
            self.announce_recovery(shared, before, recovered_ms);
        }
    }

    /// The `recovered` event (see `policy::is_recovery`): what the app recovered from.
    fn announce_recovery(&self, shared: &Shared, before: Health, recovered_ms: Option<u64>) {
        let reason = match (recovered_ms, self.restarts_shown.back()) {
            (Some(_), Some(r)) => format!("restarted by pmguard ({})", r.reason),
            _ => format!("was {}", before.as_str()),
        };
        let mut e = Event::new(
            Kind::Recovered,
            Some(&self.cfg.name),
            format!("App recovered: healthy again; {reason}."),
        )
        .with("reason", reason)
        .with("from", before.as_str());
        if let Some(ms) = recovered_ms {
            e = e.with("recovered_ms", ms);
        }
        shared.emit(e);
    }

    /// Carries out a decision from `assess` (a restart may take seconds) and updates the board.
    pub fn act(
        &mut self,
        shared: &Shared,
        decision: Decision,
        snap: Option<&Snapshot>,
    ) -> Decision {
        let decision = match decision {
            Decision::Restart { culprits, reason } => self.restart(shared, culprits, reason, snap),
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
                cert_days: p.cert_days,
            });
            if let Some((target, days)) = &p.cert_warning {
                let e = Event::new(
                    Kind::CertExpiring,
                    Some(&self.cfg.name),
                    "Certificate expires soon.",
                );
                shared.emit(e.with("url", target.clone()).with("days", *days));
            }
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
                .with("url", p.target.clone())
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
                .map(|i| self.cpu_of(i.pid).map(|c| c.round()))
                .collect();
            e = e.with("cpu_pct", cpu);
            if let Some(rss) = self.tree.rss_bytes() {
                e = e.with("memory_bytes", rss);
            }
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
                *memory.get_or_insert(0.0) += self.memory_of(e) as f64;
                if let Some(pct) = self.cpu_of(e.pid) {
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
                cert_days: check
                    .probe
                    .as_ref()
                    .and_then(|p| p.cert_days.map(|d| d as f64)),
                cpu_pct: cpu,
                memory_bytes: memory,
            },
        );
    }

    /// Updates this app's line in the shared board (`status.json`) in place: the board keeps
    /// the probe history, so a check adds one record instead of copying twenty, and the
    /// instances' lines are rewritten field by field (a check at 100 apps a second allocated
    /// their status strings and log paths anew every time).
    pub fn publish(&mut self, shared: &Shared, snap: Option<&Snapshot>) {
        let entries = snap.map(|s| s.by_name(&self.cfg.name)).unwrap_or_default();
        let mut board = lock(&shared.board);
        if !board.contains_key(&self.cfg.name) {
            board.insert(
                self.cfg.name.clone(),
                AppStatus {
                    name: self.cfg.name.clone(),
                    health: Health::Starting,
                    failures: 0,
                    max_retries: 0,
                    checks: 0,
                    note: None,
                    last_check_ms: None,
                    instances: Vec::new(),
                    probes: VecDeque::new(),
                    restarts: VecDeque::new(),
                    paused: None,
                },
            );
        }
        let Some(entry) = board.get_mut(&self.cfg.name) else {
            return;
        };
        self.fill_instances(&mut entry.instances, &entries);
        entry.health = self.state.health;
        entry.failures = self.state.failures;
        entry.max_retries = self.cfg.max_retries;
        entry.checks = self.checks;
        if entry.note != self.note {
            entry.note = self.note.clone();
        }
        entry.last_check_ms = Some(clock::wall_ms());
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

    /// The board's instance lines for `entries`, rewritten in place field by field.
    fn fill_instances(&self, lines: &mut Vec<InstanceStatus>, entries: &[&ProcessEntry]) {
        lines.truncate(entries.len());
        for (n, e) in entries.iter().enumerate() {
            let (cpu_pct, memory) = (self.cpu_of(e.pid), self.memory_of(e));
            let Some(line) = lines.get_mut(n) else {
                lines.push(InstanceStatus {
                    pm_id: e.pm_id,
                    pid: e.pid,
                    status: e.status.as_str().to_string(),
                    cpu_pct,
                    memory,
                    restart_time: e.restart_time,
                    err_log: e.err_log.clone(),
                });
                continue;
            };
            line.pm_id = e.pm_id;
            line.pid = e.pid;
            if line.status != e.status.as_str() {
                line.status = e.status.as_str().to_string();
            }
            line.cpu_pct = cpu_pct;
            line.memory = memory;
            line.restart_time = e.restart_time;
            // By bytes: a `PathBuf` compares by components, so `/l/./0.log` would equal
            // `/l/0.log` and the old spelling would stay.
            if line.err_log.as_ref().map(|p| p.as_os_str())
                != e.err_log.as_ref().map(|p| p.as_os_str())
            {
                line.err_log = e.err_log.clone();
            }
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
    fn restart(
        &mut self,
        shared: &Shared,
        culprits: Vec<u32>,
        reason: String,
        seen: Option<&Snapshot>,
    ) -> Decision {
        let name = self.cfg.name.clone();
        if let Some(why) = changed_since_check(shared, &name, seen) {
            // Undo the count `decide` made: nothing was restarted.
            self.state.restarts.pop_back();
            tracing::info!(message = "Not restarting: the check's evidence no longer stands.", app = %name, why = %why);
            return Decision::Wait { why: Some(why) };
        }
        let (guard, mut book) = match self.book_restart(shared) {
            Ok(booked) => booked,
            Err(wait) => return wait,
        };
        let started = clock::mono_now();
        self.announce_restart(shared, &reason, &culprits);
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
        report_outcome(shared, &name, &outcome, elapsed);
        self.settle(&reason, &outcome);
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

    /// Books the restart `decide` just counted in `restarts.json`, under `restart.lock`, before
    /// PM2 is asked: an agent killed mid-restart must not leave a successor (or the backup check)
    /// free to restart the app again inside the cooldown. Returns the held lock and the book, or
    /// the decision to wait (the lock is busy, or another pmguard process restarted the app
    /// within the cooldown).
    fn book_restart(&mut self, shared: &Shared) -> Result<(Lock, RestartBook), Decision> {
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
                return Err(Decision::Wait { why: Some(why) });
            }
        };
        // Paused since the check (`pause` writes under this lock): nothing was restarted.
        if let Some(pause) = shared.state.read_pauses().active(&name, clock::wall_ms()) {
            self.state.restarts.pop_back();
            return Err(Decision::Wait {
                why: Some(format!("{}: not restarting", pause.describe())),
            });
        }
        let mut book = shared.state.read_restarts();
        let ours = self
            .state
            .restarts
            .pop_back()
            .unwrap_or_else(clock::mono_now);
        if let Some(theirs) = book.apps.get(&name) {
            if theirs.last().is_some_and(|t| {
                ours.saturating_sub(t) < self.policy.restart_cooldown
                    && self.state.last_restart() != Some(t)
            }) {
                theirs.apply_to(&mut self.state);
                self.state.grace_until = theirs.last().map(|t| t + self.policy.startup_grace);
                return Err(Decision::Wait {
                    why: Some(
                        "another pmguard process restarted this app within the cooldown".into(),
                    ),
                });
            }
        }
        self.state.restarts.push_back(ours);
        book.apps
            .insert(name.clone(), AppRestarts::from_state(&self.state));
        if let Err(error) = shared.state.write_restarts(&book) {
            tracing::warn!(message = "Cannot save restart history.", app = %name, %error);
        }
        Ok((guard, book))
    }

    fn announce_restart(&self, shared: &Shared, reason: &str, culprits: &[u32]) {
        let name = &self.cfg.name;
        let mut e = Event::new(Kind::Restart, Some(name), format!("Restarting: {reason}."))
            .with("reason", reason)
            .with("attempt", self.state.restarts.len());
        if !culprits.is_empty() {
            e = e.with("pm_ids", culprits.to_vec());
        }
        shared.emit(e);
        if let Some(r) = &shared.recorder {
            r.restarts(name, 1);
        }
    }

    /// After PM2 is done: a fresh grace (from now, not from when it was asked), fresh CPU
    /// trackers (the pids are new), and the restart in the history `status` shows.
    fn settle(&mut self, reason: &str, outcome: &Result<Vec<Restarted>, RestartError>) {
        self.state.grace_until = Some(clock::mono_now() + self.policy.startup_grace);
        self.trackers.clear();
        self.tree = TreeWatch::default();
        self.restarts_shown.push_back(RestartRecord {
            ts_ms: clock::wall_ms(),
            reason: reason.to_string(),
            pm_ids: outcome
                .as_ref()
                .map(|d| d.iter().map(|x| x.pm_id).collect())
                .unwrap_or_default(),
        });
        if self.restarts_shown.len() > HISTORY {
            self.restarts_shown.pop_front();
        }
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

/// `restart_done` (with whether PM2 shows new processes) or `restart_failed`.
fn report_outcome(
    shared: &Shared,
    name: &str,
    outcome: &Result<Vec<Restarted>, RestartError>,
    elapsed: u64,
) {
    let e = match outcome {
        Ok(done) => {
            let replaced = done
                .iter()
                .all(|d| d.new_pid != 0 && d.new_pid != d.old_pid);
            Event::new(
                Kind::RestartDone,
                Some(name),
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
        }
        Err(why) => Event::new(
            Kind::RestartFailed,
            Some(name),
            format!("Restart failed: {why}."),
        ),
    };
    shared.emit(e.with("duration_ms", elapsed));
}

/// The app's prober, when it has probes.
fn probers(cfg: &AppConfig) -> Option<Prober> {
    (!cfg.probes.is_empty()).then(|| Prober::new(cfg.probes.clone()))
}

fn verdict_line(v: &Verdict) -> String {
    match v {
        Verdict::Healthy => "Check passed.".into(),
        Verdict::Transitional { status, .. } => format!("PM2 reports `{status}`."),
        Verdict::Missing => "PM2 does not know this app.".into(),
        Verdict::DaemonDown(e) => format!("PM2 daemon unreachable: {e}."),
        Verdict::Pm2Unresponsive(e) => format!("PM2 daemon not answering: {e}."),
        Verdict::Failed { reason, .. } => format!("Check failed: {reason}."),
    }
}

/// Why the check's view of the app no longer stands, if it does not: PM2 (asked afresh) lists
/// the app's instances with other pids or statuses than the list the check judged, or does not
/// answer. A person's `pm2 stop`, `restart`, `reload` or `kill` shows so (`stopping`, a new pid,
/// a daemon gone) while the probe already failed: a draining server refuses new connections
/// before its process exits and before PM2 says anything on the bus. `None`: act.
fn changed_since_check(shared: &Shared, name: &str, seen: Option<&Snapshot>) -> Option<String> {
    let seen = seen?;
    let view = |s: &Snapshot| {
        let mut v: Vec<(u32, u32, crate::pm2::Status)> = s
            .by_name(name)
            .into_iter()
            .map(|e| (e.pm_id, e.pid, e.status.clone()))
            .collect();
        v.sort_by_key(|e| e.0);
        v
    };
    match shared.snapshot(0) {
        Err(e) => Some(format!(
            "PM2 did not answer just before the restart ({e}); the next check looks again"
        )),
        Ok(now) if view(&now) != view(seen) => Some(
            "PM2's view of the app changed since the check (a stop, restart or reload under way); the next check looks again"
                .into(),
        ),
        Ok(_) => None,
    }
}

/// Whether `s`, read through a kept /proc handle, is still the live process `t` was opened on
/// (not a reused pid: that handle would give ESRCH; not exited and waiting to be reaped).
fn same_live_process(s: &crate::procfs::StatSample, t: &PidTracker) -> bool {
    s.start_ticks == t.start_ticks && !matches!(s.state, 'Z' | 'X')
}
