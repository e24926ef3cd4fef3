//! The decisions: from what one check saw to what the agent does. Pure functions over values.
//!
//! Time is passed in as milliseconds on a monotonic clock (`Mono`), so every window, cooldown and
//! backoff here is tested without sleeping. Invariants, each tested below:
//! - a restart needs `max_retries` consecutive counted failures, and resets the count;
//! - failures do not count during the startup grace (after the agent starts or the app restarts),
//!   which ends early at the first passing check; nor while PM2 is mid-transition, unless that
//!   transition outlasts the grace;
//! - two restarts of one app are at least `restart_cooldown` apart;
//! - `crashloop_restarts` restarts within `crashloop_window` stop the restarts, raise a give-up,
//!   and a single retry follows after a backoff that doubles up to a cap; a healthy window resets it.

use std::collections::VecDeque;
use std::time::Duration;

use crate::config::AppConfig;
use crate::pm2::Status;

use crate::clock::Mono;

/// PM2's own default `kill_timeout`, for a process description without one.
pub const PM2_KILL_TIMEOUT_MS: u64 = 1_600;

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

/// One instance (one pm_id) as seen in one check.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceView {
    pub pm_id: u32,
    pub pid: u32,
    pub status: Status,
    /// PM2's `kill_timeout` for this instance (`None`: PM2's default), which bounds a stop.
    pub kill_timeout_ms: Option<u64>,
    /// Set when the CPU tracker found this pid stuck (see `PidTracker`).
    pub stuck: Option<String>,
}

/// What PM2 said about the app in one check.
#[derive(Debug, Clone, PartialEq)]
pub enum Pm2View {
    /// Proven gone: socket refused or missing and no daemon process (`pm2::liveness`).
    DaemonDown(String),
    /// No answer, but the daemon may be alive (stalled, busy): never a reason to act.
    Unresponsive(String),
    Missing,
    Instances(Vec<InstanceView>),
}

/// The judgement of one check.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Healthy,
    /// PM2 is starting, stopping or waiting to restart the app. `stop_ms` is set while an
    /// instance is `stopping`: the longest `kill_timeout` among them, which PM2 may take.
    Transitional {
        status: String,
        stop_ms: Option<u64>,
    },
    /// PM2 does not know the app: nothing the agent can restart.
    Missing,
    DaemonDown(String),
    /// PM2 did not answer but is not proven gone: nothing can be judged or done through it.
    Pm2Unresponsive(String),
    /// The check failed; `culprits` are the pm_ids found at fault (empty = the whole app).
    Failed {
        reason: String,
        culprits: Vec<u32>,
    },
}

/// Judges one check from PM2's view and the probe's outcome (`None` = no probe configured).
pub fn judge(pm2: &Pm2View, probe_failure: Option<&str>) -> Verdict {
    let instances = match pm2 {
        Pm2View::DaemonDown(e) => return Verdict::DaemonDown(e.clone()),
        Pm2View::Unresponsive(e) => return Verdict::Pm2Unresponsive(e.clone()),
        Pm2View::Missing => return Verdict::Missing,
        Pm2View::Instances(i) => i,
    };
    if let Some(t) = instances.iter().find(|i| i.status.is_transitional()) {
        // While PM2 starts or stops some instances, the shared probe and the others' PM2
        // states say nothing certain. A sibling found stuck by its own CPU or process state is
        // its own fault while others start. Not while one is stopping: a person's `pm2 stop`
        // goes one instance after the other and says so only as each one ends, and the app
        // they stop is often the one that spins; restarting a sibling then would undo the stop.
        let stopping = instances.iter().any(|i| i.status == Status::Stopping);
        let stuck: Vec<&InstanceView> = instances
            .iter()
            .filter(|i| !stopping && !i.status.is_transitional() && i.stuck.is_some())
            .collect();
        if !stuck.is_empty() {
            let mut reasons: Vec<String> = stuck
                .iter()
                .map(|i| {
                    let why = i.stuck.as_deref().unwrap_or_default();
                    format!("pm_id {} pid {} is stuck: {why}", i.pm_id, i.pid)
                })
                .collect();
            reasons.push(format!("pm_id {} is {}", t.pm_id, t.status.as_str()));
            return Verdict::Failed {
                reason: reasons.join("; "),
                culprits: stuck.iter().map(|i| i.pm_id).collect(),
            };
        }
        let stop_ms = instances
            .iter()
            .filter(|i| i.status == Status::Stopping)
            .map(|i| i.kill_timeout_ms.unwrap_or(PM2_KILL_TIMEOUT_MS))
            .max();
        return Verdict::Transitional {
            status: t.status.as_str().to_string(),
            stop_ms,
        };
    }
    let mut reasons = Vec::new();
    let mut culprits = Vec::new();
    for i in instances {
        if i.status != Status::Online {
            reasons.push(format!("pm_id {} is {}", i.pm_id, i.status.as_str()));
            culprits.push(i.pm_id);
        } else if let Some(why) = &i.stuck {
            reasons.push(format!("pm_id {} pid {} is stuck: {why}", i.pm_id, i.pid));
            culprits.push(i.pm_id);
        }
    }
    if let Some(p) = probe_failure {
        reasons.insert(0, format!("probe {p}"));
    }
    if reasons.is_empty() {
        return Verdict::Healthy;
    }
    // When every instance is at fault, or only the (shared) probe failed, restart the whole app.
    if culprits.len() == instances.len() {
        culprits.clear();
    }
    Verdict::Failed {
        reason: reasons.join("; "),
        culprits,
    }
}

/// Adds failures found over process trees (the app's memory, an instance tree's CPU) to a
/// verdict. `pm_ids` empty = the whole app. They never make a process hung: the restart they
/// lead to is PM2's graceful one, so the parent can stop its children. A verdict that is not
/// about running instances (transitional, missing, PM2 down) is left as it is.
pub fn with_tree_failures(verdict: Verdict, found: &[(String, Vec<u32>)]) -> Verdict {
    let Some(((first, _), rest)) = found.split_first() else {
        return verdict;
    };
    let (mut reasons, mut culprits, mut whole) = match verdict {
        Verdict::Healthy => (Vec::new(), Vec::new(), false),
        Verdict::Failed { reason, culprits } => {
            let whole = culprits.is_empty();
            (vec![reason], culprits, whole)
        }
        other => return other,
    };
    reasons.push(first.clone());
    reasons.extend(rest.iter().map(|(r, _)| r.clone()));
    for (_, ids) in found {
        whole |= ids.is_empty();
        for id in ids {
            if !culprits.contains(id) {
                culprits.push(*id);
            }
        }
    }
    if whole {
        culprits.clear();
    }
    Verdict::Failed {
        reason: reasons.join("; "),
        culprits,
    }
}

/// The settings `decide` needs, taken from an app's config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub max_retries: u32,
    pub restart_cooldown: u64,
    pub startup_grace: u64,
    /// How long PM2 may take beyond an instance's `kill_timeout` to stop it.
    pub restart_timeout: u64,
    pub crashloop_restarts: u32,
    pub crashloop_window: u64,
    pub crashloop_backoff: u64,
    pub crashloop_backoff_max: u64,
}

impl From<&AppConfig> for Policy {
    fn from(c: &AppConfig) -> Policy {
        Policy {
            max_retries: c.max_retries,
            restart_cooldown: ms(c.restart_cooldown),
            startup_grace: ms(c.startup_grace),
            restart_timeout: ms(c.restart_timeout),
            crashloop_restarts: c.crashloop_restarts,
            crashloop_window: ms(c.crashloop_window),
            crashloop_backoff: ms(c.crashloop_backoff),
            crashloop_backoff_max: ms(c.crashloop_backoff_max),
        }
    }
}

/// Where an app stands, as shown by `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Starting,
    Healthy,
    Failing,
    CoolingDown,
    CrashLoop,
    Missing,
    Pm2Down,
    /// PM2's daemon is alive but does not answer (stalled): pmguard waits and alerts.
    Pm2Unresponsive,
    /// A person stopped the app (`pm2 stop`, `pm2 kill`): left alone until it runs again.
    StoppedByPerson,
    /// Read from a status file written by a newer agent with a state this one does not know.
    #[serde(other)]
    Unknown,
}

impl Health {
    /// The word `status`, events and `status.json` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Failing => "failing",
            Health::CoolingDown => "cooling_down",
            Health::CrashLoop => "crash_loop",
            Health::Missing => "missing",
            Health::Pm2Down => "pm2_down",
            Health::Pm2Unresponsive => "pm2_unresponsive",
            Health::StoppedByPerson => "stopped_by_person",
            Health::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// The memory of one app across checks. Plain data: persisted parts are in `restarts`/`backoff`.
#[derive(Debug, Clone, PartialEq)]
pub struct AppState {
    pub health: Health,
    /// Consecutive counted failures.
    pub failures: u32,
    /// Failures do not count before this (cleared by the first passing check).
    pub grace_until: Option<Mono>,
    /// Restarts made by pmguard (the daemon or the backup check), oldest first.
    pub restarts: VecDeque<Mono>,
    /// Current crash-loop backoff; `None` when not in a crash loop.
    pub backoff: Option<u64>,
    /// No restart before this (crash-loop pause).
    pub hold_until: Option<Mono>,
    /// In a crash loop, the one retry after the pause has been made.
    pub retried: bool,
    pub healthy_since: Option<Mono>,
    pub transitional_since: Option<Mono>,
}

impl AppState {
    /// A fresh state at agent start: the startup grace applies from `now`.
    pub fn new(now: Mono, policy: &Policy) -> AppState {
        AppState {
            health: Health::Starting,
            failures: 0,
            grace_until: Some(now + policy.startup_grace),
            restarts: VecDeque::new(),
            backoff: None,
            hold_until: None,
            retried: false,
            healthy_since: None,
            transitional_since: None,
        }
    }

    pub fn last_restart(&self) -> Option<Mono> {
        self.restarts.back().copied()
    }

    /// PM2 (re)started the app by itself, or someone else restarted it: start over with a grace.
    pub fn restarted_elsewhere(&mut self, now: Mono, policy: &Policy) {
        self.failures = 0;
        self.grace_until = Some(now + policy.startup_grace);
        self.health = Health::Starting;
        self.healthy_since = None;
    }
}

/// What to do after a check.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Nothing; `why` says what holds the agent back when it is not simply healthy.
    Wait { why: Option<String> },
    /// Restart these pm_ids (empty = every instance of the app).
    Restart { culprits: Vec<u32>, reason: String },
    /// The PM2 daemon is gone: bring it back.
    Resurrect { reason: String },
    /// Too many restarts in the window: stop, alert, retry after `pause_ms`.
    GiveUp {
        restarts: usize,
        pause_ms: u64,
        reason: String,
    },
}

fn wait(why: impl Into<String>) -> Decision {
    Decision::Wait {
        why: Some(why.into()),
    }
}

/// Updates `state` with one check's verdict and says what to do.
pub fn decide(state: &mut AppState, policy: &Policy, verdict: &Verdict, now: Mono) -> Decision {
    if !matches!(verdict, Verdict::Transitional { .. }) {
        state.transitional_since = None;
    }
    match failure_of(state, policy, verdict, now) {
        Ok(failure) => count(state, policy, failure, now),
        Err(decision) => decision,
    }
}

/// `decide` while a person has paused the app (maintenance): the check is judged and counted
/// as usual, so status, events and metrics stay true, but nothing is done and nothing is booked.
/// An action `decide` would take is dropped with its bookkeeping (no restart, backoff or hold
/// recorded) and the failure stays counted, at most `max_retries`: after the pause the next
/// failing check restarts, and a passing one clears the count.
pub fn decide_paused(
    state: &mut AppState,
    policy: &Policy,
    verdict: &Verdict,
    now: Mono,
    paused: &str,
) -> Decision {
    let mut trial = state.clone();
    let (health, reason) = match decide(&mut trial, policy, verdict, now) {
        wait @ Decision::Wait { .. } => {
            *state = trial;
            return wait;
        }
        Decision::Resurrect { reason } => (Health::Pm2Down, reason),
        Decision::Restart { reason, .. } | Decision::GiveUp { reason, .. } => {
            (Health::Failing, reason)
        }
    };
    state.failures = state.failures.saturating_add(1).min(policy.max_retries);
    state.health = health;
    state.healthy_since = None;
    state.transitional_since = trial.transitional_since;
    wait(format!("{paused}: not acting on {reason}"))
}

/// A failed check, as `count` weighs it.
struct Failure {
    reason: String,
    culprits: Vec<u32>,
    daemon_down: bool,
}

/// The verdict as a failure to count, or the decision for a verdict that counts nothing
/// (healthy, unknown to PM2, a stalled daemon, a transitional state still within the grace).
fn failure_of(
    state: &mut AppState,
    policy: &Policy,
    verdict: &Verdict,
    now: Mono,
) -> Result<Failure, Decision> {
    let failure = |reason: String, culprits: Vec<u32>, daemon_down: bool| Failure {
        reason,
        culprits,
        daemon_down,
    };
    match verdict {
        Verdict::Healthy => {
            state.failures = 0;
            state.grace_until = None;
            let since = *state.healthy_since.get_or_insert(now);
            if state.backoff.is_some() && now.saturating_sub(since) >= policy.crashloop_window {
                state.backoff = None;
                state.hold_until = None;
                state.retried = false;
            }
            state.health = Health::Healthy;
            Err(Decision::Wait { why: None })
        }
        Verdict::Missing => {
            state.health = Health::Missing;
            state.healthy_since = None;
            Err(wait("PM2 does not know this app"))
        }
        Verdict::Pm2Unresponsive(e) => {
            // A stalled daemon is not a dead one: resurrecting it would re-read a stale dump,
            // and restarting through it is impossible. Count nothing, do nothing, say so.
            state.health = Health::Pm2Unresponsive;
            state.healthy_since = None;
            Err(wait(format!("PM2 daemon not answering: {e}")))
        }
        Verdict::Transitional { status, stop_ms } => {
            let since = *state.transitional_since.get_or_insert(now);
            let held = now.saturating_sub(since);
            // A stop (a person's `pm2 stop`, `restart`, `reload`) legitimately lasts as long as
            // the app's `kill_timeout`, however short the start-up grace is.
            let allowed = stop_ms.map_or(policy.startup_grace, |k| {
                policy
                    .startup_grace
                    .max(k.saturating_add(policy.restart_timeout))
            });
            if held < allowed {
                return Err(wait(format!("PM2 reports `{status}`")));
            }
            let reason = format!("PM2 has reported `{status}` for {held} ms");
            Ok(failure(reason, Vec::new(), false))
        }
        Verdict::DaemonDown(e) => Ok(failure(
            format!("PM2 daemon unreachable: {e}"),
            Vec::new(),
            true,
        )),
        Verdict::Failed { reason, culprits } => {
            Ok(failure(reason.clone(), culprits.clone(), false))
        }
    }
}

/// Counts a failure: nothing during the startup grace, a wait until `max_retries`, then a
/// resurrect (daemon down) or a restart, unless the crash-loop pause or the cooldown holds it.
fn count(state: &mut AppState, policy: &Policy, f: Failure, now: Mono) -> Decision {
    state.healthy_since = None;
    if state.grace_until.is_some_and(|g| now < g) {
        state.health = Health::Starting;
        return wait(format!("startup grace: not counting {}", f.reason));
    }
    state.failures = state.failures.saturating_add(1);
    state.health = if f.daemon_down {
        Health::Pm2Down
    } else {
        Health::Failing
    };
    if state.failures < policy.max_retries {
        return wait(format!(
            "failure {}/{}: {}",
            state.failures, policy.max_retries, f.reason
        ));
    }
    if f.daemon_down {
        // The daemon is shared by every app: resurrect has its own cooldown, kept by the caller.
        return Decision::Resurrect { reason: f.reason };
    }
    if let Some(held) = held_back(state, policy, now) {
        return held;
    }
    if let Some(pause_ms) = crash_loop_pause(state, policy, now) {
        return Decision::GiveUp {
            restarts: state.restarts.len(),
            pause_ms,
            reason: f.reason,
        };
    }
    if state.backoff.is_some() {
        state.retried = true;
    }
    record_restart(state, policy, now);
    Decision::Restart {
        culprits: f.culprits,
        reason: f.reason,
    }
}

/// A restart held back by the crash-loop pause or the cooldown.
fn held_back(state: &mut AppState, policy: &Policy, now: Mono) -> Option<Decision> {
    if let Some(hold) = state.hold_until {
        if now < hold {
            state.health = Health::CrashLoop;
            return Some(wait(format!(
                "crash loop: paused for {} ms more",
                hold - now
            )));
        }
    }
    let since = now.saturating_sub(state.last_restart()?);
    if since < policy.restart_cooldown {
        state.health = Health::CoolingDown;
        return Some(wait(format!("cooldown: {since} ms since the last restart")));
    }
    None
}

/// Whether the restarts within the window make a crash loop; if so, the pause before the next
/// try (doubling each time a try fails, up to `crashloop_backoff_max`), now in force.
fn crash_loop_pause(state: &mut AppState, policy: &Policy, now: Mono) -> Option<u64> {
    while state
        .restarts
        .front()
        .is_some_and(|t| now.saturating_sub(*t) >= policy.crashloop_window)
    {
        state.restarts.pop_front();
    }
    let looping = match state.backoff {
        Some(_) => state.retried,
        None => state.restarts.len() >= policy.crashloop_restarts as usize,
    };
    if !looping {
        return None;
    }
    let pause = match state.backoff {
        Some(b) => b.saturating_mul(2).min(policy.crashloop_backoff_max),
        None => policy.crashloop_backoff,
    };
    state.backoff = Some(pause);
    state.hold_until = Some(now + pause);
    state.retried = false;
    state.health = Health::CrashLoop;
    Some(pause)
}

/// Books a restart made at `now` (by this process or, read from disk, by another).
pub fn record_restart(state: &mut AppState, policy: &Policy, now: Mono) {
    state.failures = 0;
    state.restarts.push_back(now);
    state.grace_until = Some(now + policy.startup_grace);
    state.health = Health::Starting;
    state.healthy_since = None;
}

/// Whether a change from `before` to `now` is a recovery, the `recovered` event people get
/// after being told something went wrong: healthy again after pmguard restarted the app
/// (`after_restart`), or after a crash loop or a PM2 outage. Not the first passing check after
/// the agent starts, and not a blip of failures below `max_retries` (nobody was told of it).
pub fn is_recovery(before: Health, now: Health, after_restart: bool) -> bool {
    now == Health::Healthy
        && before != Health::Healthy
        && (after_restart
            || matches!(
                before,
                Health::CrashLoop | Health::Pm2Down | Health::Pm2Unresponsive
            ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            max_retries: 3,
            restart_cooldown: 60_000,
            startup_grace: 30_000,
            restart_timeout: 10_000,
            crashloop_restarts: 3,
            crashloop_window: 900_000,
            crashloop_backoff: 300_000,
            crashloop_backoff_max: 1_200_000,
        }
    }

    fn fail() -> Verdict {
        Verdict::Failed {
            reason: "probe timed out".into(),
            culprits: vec![],
        }
    }

    fn after_grace() -> (AppState, Policy, Mono) {
        let p = policy();
        let mut s = AppState::new(0, &p);
        assert_eq!(
            decide(&mut s, &p, &Verdict::Healthy, 1_000),
            Decision::Wait { why: None }
        );
        (s, p, 1_000)
    }

    fn is_restart(d: &Decision) -> bool {
        matches!(d, Decision::Restart { .. })
    }

    #[test]
    fn restarts_after_exactly_max_retries_and_resets_the_count() {
        let (mut s, p, t) = after_grace();
        assert!(!is_restart(&decide(&mut s, &p, &fail(), t + 10_000)));
        assert!(!is_restart(&decide(&mut s, &p, &fail(), t + 20_000)));
        assert!(is_restart(&decide(&mut s, &p, &fail(), t + 30_000)));
        assert_eq!(s.failures, 0);
        assert_eq!(s.health, Health::Starting);
    }

    #[test]
    fn a_paused_app_is_counted_but_never_restarted_and_books_nothing() {
        let (mut s, p, t) = after_grace();
        for i in 1..=10 {
            let d = decide_paused(&mut s, &p, &fail(), t + i * 10_000, "paused until X");
            // Counting waits as usual; from max_retries on, the restart is withheld.
            let paused = |w: &str| w.starts_with("paused until X: not acting on");
            assert!(
                matches!(&d, Decision::Wait { why: Some(w) } if paused(w) == (i >= 3)),
                "{d:?}"
            );
        }
        assert_eq!(s.failures, p.max_retries, "counted, at most max_retries");
        assert_eq!(s.health, Health::Failing);
        assert!(s.restarts.is_empty() && s.backoff.is_none() && s.hold_until.is_none());
    }

    #[test]
    fn after_a_pause_the_next_failing_check_restarts_and_a_pass_clears_it() {
        let (mut s, p, t) = after_grace();
        for i in 1..=5 {
            decide_paused(&mut s, &p, &fail(), t + i, "paused");
        }
        let mut passed = s.clone();
        assert!(is_restart(&decide(&mut s, &p, &fail(), t + 10)));
        decide(&mut passed, &p, &Verdict::Healthy, t + 10);
        assert!(!is_restart(&decide(&mut passed, &p, &fail(), t + 11)));
    }

    #[test]
    fn a_paused_app_in_a_crash_loop_gives_up_nothing_and_keeps_its_backoff() {
        let (mut s, p, t) = after_grace();
        s.backoff = Some(p.crashloop_backoff);
        s.retried = true;
        let before = s.clone();
        for i in 1..=5 {
            decide_paused(&mut s, &p, &fail(), t + i, "paused");
        }
        assert_eq!(
            (s.backoff, s.hold_until, s.retried),
            (before.backoff, before.hold_until, before.retried)
        );
    }

    #[test]
    fn a_pass_in_between_resets_the_count() {
        let (mut s, p, t) = after_grace();
        decide(&mut s, &p, &fail(), t + 1);
        decide(&mut s, &p, &fail(), t + 2);
        decide(&mut s, &p, &Verdict::Healthy, t + 3);
        decide(&mut s, &p, &fail(), t + 4);
        assert!(!is_restart(&decide(&mut s, &p, &fail(), t + 5)));
    }

    #[test]
    fn no_counting_during_startup_grace_but_a_pass_ends_it() {
        let p = policy();
        let mut s = AppState::new(0, &p);
        for t in [1_000, 2_000, 3_000, 4_000, 29_999] {
            let d = decide(&mut s, &p, &fail(), t);
            assert!(
                matches!(&d, Decision::Wait { why: Some(w) } if w.starts_with("startup grace")),
                "{d:?}"
            );
        }
        assert_eq!(s.failures, 0);
        // Grace over: three counted failures restart.
        decide(&mut s, &p, &fail(), 30_000);
        decide(&mut s, &p, &fail(), 31_000);
        assert!(is_restart(&decide(&mut s, &p, &fail(), 32_000)));
        // After the restart a new grace applies, ended early by the first pass.
        assert!(!is_restart(&decide(&mut s, &p, &fail(), 33_000)));
        assert_eq!(s.failures, 0);
        decide(&mut s, &p, &Verdict::Healthy, 35_000);
        assert_eq!(s.grace_until, None);
        decide(&mut s, &p, &fail(), 36_000);
        assert_eq!(s.failures, 1);
    }

    #[test]
    fn cooldown_holds_a_second_restart() {
        let (mut s, p, t) = after_grace();
        let mut clock = t;
        let mut tick = |s: &mut AppState, v: &Verdict| {
            clock += 10_000;
            (clock, decide(s, &p, v, clock))
        };
        for _ in 0..2 {
            tick(&mut s, &fail());
        }
        let (first, d) = tick(&mut s, &fail());
        assert!(is_restart(&d));
        // Fails on, right through grace and cooldown: the next restart is 60 s after the first.
        let mut second = None;
        for _ in 0..20 {
            let (at, d) = tick(&mut s, &fail());
            if is_restart(&d) {
                second = Some(at);
                break;
            }
        }
        let second = second.expect("a second restart");
        assert!(second - first >= p.restart_cooldown, "{first} {second}");
        assert!(second - first <= p.restart_cooldown + 10_000);
    }

    #[test]
    fn transitional_states_wait_until_they_outlast_the_grace() {
        let (mut s, p, t) = after_grace();
        let v = Verdict::Transitional {
            status: "waiting restart".into(),
            stop_ms: None,
        };
        for dt in [0, 10_000, 29_999] {
            let d = decide(&mut s, &p, &v, t + dt);
            assert!(matches!(d, Decision::Wait { .. }));
        }
        assert_eq!(s.failures, 0);
        decide(&mut s, &p, &v, t + 30_000);
        assert_eq!(s.failures, 1);
    }

    #[test]
    fn a_stop_may_last_its_kill_timeout_even_past_a_short_grace() {
        let p = Policy {
            startup_grace: 1_000,
            restart_timeout: 10_000,
            max_retries: 1,
            ..policy()
        };
        let mut s = AppState::new(0, &p);
        let t = 5_000;
        let view = Pm2View::Instances(vec![
            InstanceView {
                kill_timeout_ms: Some(30_000),
                ..inst(0, Status::Stopping, None)
            },
            inst(1, Status::Online, None),
        ]);
        let v = judge(&view, Some("connect refused"));
        assert_eq!(
            v,
            Verdict::Transitional {
                status: "stopping".into(),
                stop_ms: Some(30_000)
            }
        );
        for dt in [0, 1_000, 20_000, 39_999] {
            let d = decide(&mut s, &p, &v, t + dt);
            assert!(matches!(d, Decision::Wait { .. }), "{dt}: {d:?}");
        }
        assert_eq!(s.failures, 0);
        // A stop held past kill_timeout + restart_timeout is PM2 stuck: it counts.
        assert!(is_restart(&decide(&mut s, &p, &v, t + 40_000)));
        // Without a kill_timeout in PM2's list, its default (1.6 s) bounds the stop.
        let mut s = AppState::new(0, &p);
        let view = Pm2View::Instances(vec![inst(0, Status::Stopping, None)]);
        let v = judge(&view, None);
        assert!(matches!(decide(&mut s, &p, &v, t), Decision::Wait { .. }));
        assert!(matches!(
            decide(&mut s, &p, &v, t + 11_599),
            Decision::Wait { .. }
        ));
        assert!(is_restart(&decide(&mut s, &p, &v, t + 11_600)));
        // A sibling stuck on its own is at fault while another starts (the shared probe's
        // failure is not) ...
        let view = Pm2View::Instances(vec![
            inst(0, Status::Launching, None),
            inst(1, Status::Online, Some("cpu 100 % for 60 s")),
        ]);
        assert_eq!(
            judge(&view, Some("timed out")),
            Verdict::Failed {
                reason: "pm_id 1 pid 101 is stuck: cpu 100 % for 60 s; pm_id 0 is launching".into(),
                culprits: vec![1]
            }
        );
        // ... but not while one stops: a person's `pm2 stop` of a spinning cluster goes one
        // instance at a time, and a restart of the sibling would undo it.
        let view = Pm2View::Instances(vec![
            InstanceView {
                kill_timeout_ms: Some(600_000),
                ..inst(0, Status::Stopping, None)
            },
            inst(1, Status::Online, Some("cpu 100 % for 60 s")),
        ]);
        assert!(matches!(
            judge(&view, Some("timed out")),
            Verdict::Transitional {
                stop_ms: Some(600_000),
                ..
            }
        ));
        // Starting states keep the start-up grace.
        let mut s = AppState::new(0, &p);
        let view = Pm2View::Instances(vec![inst(0, Status::Launching, None)]);
        let v = judge(&view, None);
        decide(&mut s, &p, &v, t);
        assert!(is_restart(&decide(&mut s, &p, &v, t + 1_000)));
    }

    #[test]
    fn crash_loop_gives_up_then_retries_with_growing_backoff() {
        let p = Policy {
            restart_cooldown: 0,
            startup_grace: 0,
            max_retries: 1,
            ..policy()
        };
        let mut s = AppState::new(0, &p);
        let mut t = 1_000;
        for _ in 0..3 {
            assert!(is_restart(&decide(&mut s, &p, &fail(), t)));
            t += 1_000;
        }
        let d = decide(&mut s, &p, &fail(), t);
        assert!(
            matches!(
                d,
                Decision::GiveUp {
                    restarts: 3,
                    pause_ms: 300_000,
                    ..
                }
            ),
            "{d:?}"
        );
        assert_eq!(s.health, Health::CrashLoop);
        // Paused: no restart, however many failures.
        for dt in [1_000, 100_000, 299_999] {
            assert!(!is_restart(&decide(&mut s, &p, &fail(), t + dt)));
        }
        // One retry after the pause, then a longer pause.
        assert!(is_restart(&decide(&mut s, &p, &fail(), t + 300_000)));
        let d = decide(&mut s, &p, &fail(), t + 301_000);
        assert!(
            matches!(
                d,
                Decision::GiveUp {
                    pause_ms: 600_000,
                    ..
                }
            ),
            "{d:?}"
        );
        let t2 = t + 301_000 + 600_000;
        assert!(is_restart(&decide(&mut s, &p, &fail(), t2)));
        let d = decide(&mut s, &p, &fail(), t2 + 1);
        assert!(
            matches!(
                d,
                Decision::GiveUp {
                    pause_ms: 1_200_000,
                    ..
                }
            ),
            "{d:?}"
        );
        let t3 = t2 + 1 + 1_200_000;
        assert!(is_restart(&decide(&mut s, &p, &fail(), t3)));
        let d = decide(&mut s, &p, &fail(), t3 + 1);
        assert!(
            matches!(
                d,
                Decision::GiveUp {
                    pause_ms: 1_200_000,
                    ..
                }
            ),
            "capped: {d:?}"
        );
        // Healthy for a whole window after a retry: out of the crash loop.
        let t4 = t3 + 1 + 1_200_000;
        assert!(is_restart(&decide(&mut s, &p, &fail(), t4)));
        decide(&mut s, &p, &Verdict::Healthy, t4 + 1);
        decide(&mut s, &p, &Verdict::Healthy, t4 + 1 + p.crashloop_window);
        assert_eq!(s.backoff, None);
    }

    #[test]
    fn spaced_out_restarts_never_give_up() {
        // monit's flaw: its limit counts cycles. Ours counts wall-clock time in a window.
        let p = Policy {
            restart_cooldown: 0,
            startup_grace: 0,
            max_retries: 1,
            ..policy()
        };
        let mut s = AppState::new(0, &p);
        for i in 1..=20u64 {
            let d = decide(&mut s, &p, &fail(), i * (p.crashloop_window / 2));
            assert!(is_restart(&d), "restart {i}: {d:?}");
        }
    }

    #[test]
    fn daemon_down_asks_for_resurrect_and_missing_waits() {
        let (mut s, p, t) = after_grace();
        let v = Verdict::DaemonDown("no socket".into());
        decide(&mut s, &p, &v, t + 1);
        decide(&mut s, &p, &v, t + 2);
        assert!(matches!(
            decide(&mut s, &p, &v, t + 3),
            Decision::Resurrect { .. }
        ));
        assert_eq!(s.health, Health::Pm2Down);
        let d = decide(&mut s, &p, &Verdict::Missing, t + 4);
        assert!(matches!(d, Decision::Wait { why: Some(_) }));
        assert_eq!(s.health, Health::Missing);
    }

    #[test]
    fn an_unresponsive_daemon_is_never_resurrected_and_counts_no_failure() {
        let (mut s, p, t) = after_grace();
        let v = Verdict::Pm2Unresponsive("getMonitorData timed out".into());
        for i in 1..=10 {
            let d = decide(&mut s, &p, &v, t + i);
            assert!(matches!(d, Decision::Wait { why: Some(_) }), "{d:?}");
        }
        assert_eq!(s.health, Health::Pm2Unresponsive);
        assert_eq!(s.failures, 0);
    }

    fn inst(pm_id: u32, status: Status, stuck: Option<&str>) -> InstanceView {
        InstanceView {
            pm_id,
            pid: 100 + pm_id,
            status,
            kill_timeout_ms: None,
            stuck: stuck.map(String::from),
        }
    }

    #[test]
    fn judge_blames_the_stuck_worker_only() {
        let view = Pm2View::Instances(vec![
            inst(0, Status::Online, None),
            inst(1, Status::Online, Some("stopped (state T) for 2000 ms")),
        ]);
        // The shared port still answers through worker 0.
        match judge(&view, None) {
            Verdict::Failed { culprits, reason } => {
                assert_eq!(culprits, vec![1]);
                assert!(reason.contains("pm_id 1 pid 101 is stuck"), "{reason}");
            }
            v => panic!("{v:?}"),
        }
        // Probe failing and nobody identified: the whole app.
        let view = Pm2View::Instances(vec![inst(0, Status::Online, None)]);
        assert_eq!(
            judge(&view, Some("timed out")),
            Verdict::Failed {
                reason: "probe timed out".into(),
                culprits: vec![]
            }
        );
        assert_eq!(judge(&view, None), Verdict::Healthy);
        let view = Pm2View::Instances(vec![inst(0, Status::Stopped, None)]);
        assert!(
            matches!(judge(&view, None), Verdict::Failed { culprits, .. } if culprits.is_empty())
        );
        let view = Pm2View::Instances(vec![inst(0, Status::Launching, None)]);
        assert!(matches!(
            judge(&view, None),
            Verdict::Transitional { stop_ms: None, .. }
        ));
    }

    #[test]
    fn memory_over_the_limit_fails_a_healthy_check_for_the_whole_app() {
        let memory = ("memory 812 MB > 800 MB for 60.0 s".to_string(), vec![]);
        assert_eq!(
            with_tree_failures(Verdict::Healthy, std::slice::from_ref(&memory)),
            Verdict::Failed {
                reason: memory.0.clone(),
                culprits: vec![]
            }
        );
        let probe = Verdict::Failed {
            reason: "probe timed out".into(),
            culprits: vec![2],
        };
        assert_eq!(
            with_tree_failures(probe, std::slice::from_ref(&memory)),
            Verdict::Failed {
                reason: format!("probe timed out; {}", memory.0),
                culprits: vec![]
            }
        );
        assert_eq!(with_tree_failures(Verdict::Healthy, &[]), Verdict::Healthy);
    }

    #[test]
    fn a_busy_instance_tree_is_its_own_culprit() {
        let busy = ("pm_id 1 pid 9: tree CPU 180% >= 90%".to_string(), vec![1]);
        let stuck = Verdict::Failed {
            reason: "pm_id 0 pid 8 is stuck".into(),
            culprits: vec![0],
        };
        assert_eq!(
            with_tree_failures(stuck, std::slice::from_ref(&busy)),
            Verdict::Failed {
                reason: format!("pm_id 0 pid 8 is stuck; {}", busy.0),
                culprits: vec![0, 1]
            }
        );
    }

    #[test]
    fn tree_failures_do_not_override_what_pm2_says() {
        let memory = ("memory over".to_string(), vec![]);
        let launching = Verdict::Transitional {
            status: "launching".into(),
            stop_ms: None,
        };
        assert_eq!(
            with_tree_failures(launching.clone(), std::slice::from_ref(&memory)),
            launching
        );
        assert_eq!(
            with_tree_failures(Verdict::Missing, &[memory]),
            Verdict::Missing
        );
    }

    #[test]
    fn recovered_is_healthy_again_after_a_restart_a_crash_loop_or_a_pm2_outage() {
        use Health::*;
        assert!(is_recovery(Starting, Healthy, true));
        assert!(is_recovery(Failing, Healthy, true));
        assert!(is_recovery(CrashLoop, Healthy, false));
        assert!(is_recovery(Pm2Down, Healthy, false));
        assert!(
            !is_recovery(Starting, Healthy, false),
            "the first check after start"
        );
        assert!(
            !is_recovery(Failing, Healthy, false),
            "a blip below max_retries"
        );
        assert!(!is_recovery(Healthy, Healthy, true));
        assert!(!is_recovery(Failing, CoolingDown, true));
    }
}
