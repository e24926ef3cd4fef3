//! The daemon's watch loop: every app's checks on one thread, their probes multiplexed on one
//! poll(2); each action (restart, resurrect, give-up) on a thread of its own.
//!
//! One thread instead of one per app: at 100 apps every second the per-thread timer wake-ups,
//! lock hand-offs and context switches were a third of the agent's CPU (BENCHMARKS.md). What
//! can block runs elsewhere: a probe is a non-blocking state machine (`probe::InFlight`) bounded
//! by its deadline, and an app whose check calls for an action is handed, with its state, to a
//! short-lived thread, so a slow restart of one app never delays another's checks. Nothing here
//! waits on an app; the one shared wait is PM2's process list (`Shared::snapshot`, bounded).
//! Invariants: each app is checked on its start-aligned schedule (a check that overran is
//! followed at once); `Progress::due` always says by when the app will report again, so the
//! main thread can withhold the heartbeat when the loop is wedged.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::clock;
use crate::clock::Mono;
use crate::config::AppConfig;
use crate::pm2::BusEvent;
use crate::policy::Decision;
use crate::probe::{InFlight, ProbeResult, Started};
use crate::report::events::{Event, Kind};
use crate::report::state::AppRestarts;
use crate::runtime::app::{App, Observation};
use crate::runtime::pulse::Pulse;
use crate::runtime::shared::{Progress, Shared, LIST_TIMEOUT, SNAPSHOT_MAX_AGE};
use crate::sync::lock;
use crate::sys::pidfd::timespec;
use crate::sys::waker::Waker;

use rustix::event::{poll, PollFd, PollFlags};

/// How late past its next check an idle app may be before the loop counts as wedged: 2 s, plus
/// PM2's list timeout, which the loop may be waiting out for an earlier app of the same round
/// when PM2 is slow.
const IDLE_SLACK_MS: u64 = 2_000 + LIST_TIMEOUT.as_millis() as u64;

/// Checks due within this of the one that woke the loop start with it, on their own start-aligned
/// slots (a check runs at most this early, never late): one wake-up for a batch of apps instead
/// of one each (each wake-up of a thread costs ~70-80 us of CPU here, BENCHMARKS.md).
const COALESCE_MS: Mono = 10;

pub enum ToWatch {
    Add {
        cfg: Box<AppConfig>,
        persisted: Option<AppRestarts>,
        progress: Arc<Progress>,
    },
    Config(Box<AppConfig>),
    Remove(String),
    Bus(BusEvent),
    Stop,
    /// An action thread is done with the app and gives it back.
    Done(Box<App>),
    /// An action thread panicked (in an unwinding build; the release build aborts) or could not
    /// start; the app is watched again from its saved restart history.
    Lost(String),
}

/// Sends to the loop and wakes it from its poll.
#[derive(Clone)]
pub struct WatchTx {
    tx: Sender<ToWatch>,
    waker: Arc<Waker>,
}

impl WatchTx {
    pub fn send(&self, m: ToWatch) {
        if self.tx.send(m).is_ok() {
            self.waker.wake();
        }
    }
}

/// The running loop, as the main thread holds it.
pub struct Watch {
    pub tx: WatchTx,
    pub join: JoinHandle<()>,
}

/// Starts the loop with `apps`; each app's first check is at once.
pub fn spawn(
    shared: Arc<Shared>,
    apps: Vec<(AppConfig, Option<AppRestarts>, Arc<Progress>)>,
    pulse: Arc<Pulse>,
) -> std::io::Result<Watch> {
    let (tx, rx) = mpsc::channel();
    let tx = WatchTx {
        tx,
        waker: Arc::new(Waker::new()?),
    };
    let own = tx.clone();
    let join = std::thread::Builder::new()
        .name("watch".into())
        .stack_size(512 * 1024)
        .spawn(move || {
            let mut w = Loop {
                shared,
                slots: Vec::new(),
                tx: own,
                pulse,
            };
            let now = clock::mono_now();
            for (cfg, persisted, progress) in apps {
                w.add(cfg, persisted, progress, now);
            }
            w.run(rx);
        })?;
    Ok(Watch { tx, join })
}

/// A check under way: what PM2 and /proc showed, and the probe still in flight.
struct Running {
    seen: Observation,
    probe: InFlight,
}

struct Slot {
    name: String,
    cfg: AppConfig,
    /// `None` while an action thread has the app.
    app: Option<Box<App>>,
    progress: Arc<Progress>,
    next: Mono,
    /// When the current (or last) check started: the schedule is aligned to it.
    started: Mono,
    running: Option<Running>,
    /// A new config that arrived mid-check or while the app was away.
    pending_cfg: Option<AppConfig>,
    /// Removed from the config while away: dropped when it comes back.
    removed: bool,
}

struct Loop {
    shared: Arc<Shared>,
    /// In config order. Indexed within a round (`begin_due`, `wait` to `advance`): slots are
    /// added and removed only by messages, between rounds. A name is looked up only for a
    /// message (a linear scan: messages are rare, rounds are not).
    slots: Vec<Slot>,
    tx: WatchTx,
    /// The daemon's pulse: called after every round (the heartbeat rides on the loop's own
    /// wake-ups, at least one a second), and its state-directory watch is polled with the
    /// probes (see `runtime::pulse`). Never blocks the loop.
    pulse: Arc<Pulse>,
}

impl Loop {
    fn add(
        &mut self,
        cfg: AppConfig,
        persisted: Option<AppRestarts>,
        progress: Arc<Progress>,
        now: Mono,
    ) {
        let mut app = App::new(cfg.clone(), now, persisted.as_ref());
        app.progress = Some(progress.clone());
        progress.due.store(now + IDLE_SLACK_MS, Ordering::Relaxed);
        let slot = Slot {
            name: cfg.name.clone(),
            cfg,
            app: Some(Box::new(app)),
            progress,
            next: now,
            started: now,
            running: None,
            pending_cfg: None,
            removed: false,
        };
        match self.find(&slot.name) {
            Some(i) => self.slots[i] = slot,
            None => self.slots.push(slot),
        }
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.slots.iter().position(|s| s.name == name)
    }

    fn run(&mut self, rx: Receiver<ToWatch>) {
        let mut stopping: Option<Mono> = None;
        let mut ready: Vec<bool> = Vec::new();
        let mut polled: Vec<usize> = Vec::new();
        loop {
            while let Ok(m) = rx.try_recv() {
                if let ToWatch::Stop = m {
                    // A restart in flight is not cut off half-way, but not waited for past 3 s.
                    stopping.get_or_insert(clock::mono_now() + 3_000);
                } else {
                    self.on_message(m);
                }
            }
            let now = clock::mono_now();
            match stopping {
                Some(deadline) => {
                    if now >= deadline || self.slots.iter().all(|s| s.app.is_some()) {
                        return;
                    }
                }
                None => self.begin_due(now),
            }
            self.wait(stopping, &mut polled, &mut ready);
            self.advance(&polled, &ready);
            if stopping.is_none() {
                self.pulse.on_round(clock::mono_now());
            }
        }
    }

    /// Starts the check of every app whose time has come and that no action holds.
    fn begin_due(&mut self, now: Mono) {
        let due: Vec<usize> = (0..self.slots.len())
            .filter(|&i| {
                let s = &self.slots[i];
                s.app.is_some() && s.running.is_none() && s.next <= now + COALESCE_MS
            })
            .collect();
        // PM2 and /proc first, for every due app (the first may wait for PM2's list), then the
        // probes, none of which waits: no probe's deadline runs while PM2 is asked, and the
        // replies to a batch gather while the rest of it goes out (fewer wake-ups).
        let seen: Vec<(usize, Observation)> = due
            .into_iter()
            .filter_map(|i| self.observe(i, now).map(|o| (i, o)))
            .collect();
        for (i, observed) in seen {
            self.launch(i, observed);
        }
    }

    /// One poll for the wake-up fd and every probe in flight, until the next event: a probe's
    /// socket, a probe's deadline, an app's next check, or a message. Fills `polled` with the
    /// apps whose probes were polled and `ready` with whether each socket is ready.
    fn wait(&mut self, stopping: Option<Mono>, polled: &mut Vec<usize>, ready: &mut Vec<bool>) {
        polled.clear();
        let now = clock::mono_now();
        let instant = Instant::now();
        // At least one wake-up a second: the pulse (heartbeat, pause look) rides on it.
        let mut wait_ms = stopping.map_or(1_000, |d| d.saturating_sub(now).max(1));
        let mut fds = vec![PollFd::from_borrowed_fd(self.tx.waker.fd(), PollFlags::IN)];
        let dir = match self.pulse.watch_fd(now) {
            Ok(fd) => fd,
            Err(rest) => {
                wait_ms = wait_ms.min(rest.saturating_sub(now).max(1));
                None
            }
        };
        let first = 1 + usize::from(dir.is_some());
        if let Some(fd) = dir {
            fds.push(PollFd::from_borrowed_fd(fd, PollFlags::IN));
        }
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(r) = &s.running {
                fds.push(PollFd::from_borrowed_fd(r.probe.fd(), r.probe.events()));
                polled.push(i);
                let left = r.probe.deadline().saturating_duration_since(instant);
                wait_ms = wait_ms.min(left.as_micros().div_ceil(1000) as u64);
            } else if s.app.is_some() && stopping.is_none() {
                wait_ms = wait_ms.min(s.next.saturating_sub(now));
            }
        }
        // EINTR or an error: every probe is looked at again against its deadline.
        let n = poll(&mut fds, Some(&timespec(Duration::from_millis(wait_ms)))).unwrap_or(0);
        let woke = n > 0 && !fds[0].revents().is_empty();
        let watched = n > 0 && first == 2 && !fds[1].revents().is_empty();
        ready.clear();
        ready.extend(
            fds[first..]
                .iter()
                .map(|f| n > 0 && !f.revents().is_empty()),
        );
        drop(fds);
        if woke {
            self.tx.waker.drain();
        }
        if watched {
            self.pulse.on_watch(clock::mono_now());
        }
    }

    /// Moves every probe whose socket is ready or whose deadline passed; a finished probe
    /// finishes its check.
    fn advance(&mut self, polled: &[usize], ready: &[bool]) {
        let instant = Instant::now();
        for (&i, &ready) in polled.iter().zip(ready) {
            let Some(s) = self.slots.get_mut(i) else {
                continue;
            };
            let (Some(app), Some(r)) = (s.app.as_mut(), s.running.as_mut()) else {
                continue;
            };
            if !ready && instant < r.probe.deadline() {
                continue;
            }
            if let Some(result) = app.advance_probe(&mut r.probe) {
                if let Some(r) = s.running.take() {
                    self.finish(i, r.seen, Some(result));
                }
            }
        }
    }

    fn on_message(&mut self, m: ToWatch) {
        let now = clock::mono_now();
        match m {
            ToWatch::Add {
                cfg,
                persisted,
                progress,
            } => self.add(*cfg, persisted, progress, now),
            ToWatch::Config(cfg) => self.reconfigure(*cfg, now),
            ToWatch::Remove(name) => {
                if let Some(i) = self.find(&name) {
                    if self.slots[i].app.is_some() {
                        self.slots.remove(i);
                    } else {
                        self.slots[i].removed = true;
                    }
                }
            }
            ToWatch::Bus(ev) => self.bus_event(&ev, now),
            ToWatch::Done(app) => {
                // Only into the slot it left (a reload may have replaced the app meanwhile).
                let Some(i) = self
                    .find(app.name())
                    .filter(|&i| self.slots[i].app.is_none())
                else {
                    return;
                };
                if self.slots[i].removed {
                    self.forget(i);
                    return;
                }
                self.slots[i].app = Some(app);
                self.schedule(i);
            }
            ToWatch::Lost(name) => self.lost(&name, now),
            ToWatch::Stop => {}
        }
    }

    /// A changed app: at once when idle, else when its action hands it back.
    fn reconfigure(&mut self, cfg: AppConfig, now: Mono) {
        if let Some(s) = self.find(&cfg.name).map(|i| &mut self.slots[i]) {
            s.cfg = cfg.clone();
            match s.app.as_mut() {
                Some(app) if s.running.is_none() => {
                    app.reconfigure(cfg);
                    s.next = s.next.min(now + app.period().as_millis() as u64);
                }
                _ => s.pending_cfg = Some(cfg),
            }
        }
    }

    fn bus_event(&mut self, ev: &BusEvent, now: Mono) {
        let Some(s) = self.find(&ev.name).map(|i| &mut self.slots[i]) else {
            return;
        };
        // While an action thread has the app, PM2's events are the action's own doing (the
        // restart it asked for) and are already accounted for.
        if s.app.is_none() {
            return;
        }
        on_bus(&self.shared, ev);
        // A person stopped it (`pm2 stop`, `pm2 kill`): not pmguard's to start again.
        if ev.manually && ev.event == "stop" {
            if let Some(app) = s.app.as_mut() {
                app.stopped_by_person();
            }
        }
        // Look now rather than at the next period: PM2 just told us something changed.
        if s.running.is_none() && matches!(ev.event.as_str(), "exit" | "stop" | "delete") {
            s.next = s.next.min(now + 200);
        }
    }

    /// An action thread died without handing its app back: watch the app afresh.
    fn lost(&mut self, name: &str, now: Mono) {
        let Some(i) = self.find(name).filter(|&i| self.slots[i].app.is_none()) else {
            return;
        };
        if self.slots[i].removed {
            self.forget(i);
            return;
        }
        let s = &mut self.slots[i];
        tracing::error!(message = "An action stopped unexpectedly; watching the app again.", app = %name);
        let book = self.shared.state.read_restarts();
        let mut app = App::new(s.cfg.clone(), now, book.apps.get(name));
        app.progress = Some(s.progress.clone());
        s.app = Some(Box::new(app));
        s.pending_cfg = None;
        s.next = now;
        s.progress.due.store(now + IDLE_SLACK_MS, Ordering::Relaxed);
    }

    /// Drops an app removed from the config while an action had it, and the board line its
    /// action wrote back.
    fn forget(&mut self, i: usize) {
        let s = self.slots.remove(i);
        lock(&self.shared.board).remove(&s.name);
    }

    /// The first half of starting a check: its slot, its deadline for the wedge watch, PM2's
    /// state and /proc now. `round`: when the round that begins it started.
    fn observe(&mut self, i: usize, round: Mono) -> Option<Observation> {
        let s = self.slots.get_mut(i)?;
        let app = s.app.as_mut()?;
        // A check begun a little early (`COALESCE_MS`) keeps its slot: the schedule stays aligned.
        // Checks that were due when the round started share the round's slot, however long the
        // ones before them took (the first PM2 list at start-up): apps started together stay
        // together, one wake-up a period for all of them instead of one each.
        let started = round.max(s.next);
        s.started = started;
        // The worst a check plus a restart may take, with slack: past it the agent is wedged.
        // An app's probes run one after another, each with its own timeout.
        let probes: Duration = app.cfg.probes.iter().map(|p| p.timeout).sum();
        let bound = probes.max(app.cfg.timeout)
            + LIST_TIMEOUT
            + app.cfg.restart_timeout * 2
            + Duration::from_secs(15);
        s.progress
            .due
            .store(started + bound.as_millis() as u64, Ordering::Relaxed);
        Some(app.observe(&self.shared, SNAPSHOT_MAX_AGE))
    }

    /// The second half: the probe in flight (or the check judged at once without one). Never
    /// waits, so the probes of a batch start back to back.
    fn launch(&mut self, i: usize, seen: Observation) {
        let Some(s) = self.slots.get_mut(i) else {
            return;
        };
        let Some(app) = s.app.as_mut() else {
            return;
        };
        match app.start_probe() {
            None => self.finish(i, seen, None),
            Some(Started::Done(result)) => self.finish(i, seen, Some(result)),
            Some(Started::Pending(probe)) => s.running = Some(Running { seen, probe }),
        }
    }

    /// Judges a finished check; a decision to act goes to a thread of its own with the app.
    fn finish(&mut self, i: usize, seen: Observation, probe: Option<ProbeResult>) {
        let Some(s) = self.slots.get_mut(i) else {
            return;
        };
        let Some(app) = s.app.as_mut() else {
            return;
        };
        // The app's process exited or was replaced while its probe ran (the observation was taken
        // before the round's probes started, and a slow PM2 may have stood between): a refused
        // probe then is PM2's restart under way, not the app failing. Not counted; looked at
        // again shortly with PM2's new state (which gives the new process its grace).
        if probe.as_ref().is_some_and(|p| !p.outcome.passed())
            && app.observed_processes_changed(&seen)
        {
            let now = clock::mono_now();
            s.next = now + app.period().as_millis().min(200) as u64;
            s.progress
                .due
                .store(s.next + IDLE_SLACK_MS, Ordering::Relaxed);
            return;
        }
        let check = app.conclude(seen, probe);
        let (decision, snapshot) = app.assess(&self.shared, check);
        s.progress.checks.fetch_add(1, Ordering::Relaxed);
        if let Decision::Wait { .. } = decision {
            app.act(&self.shared, decision, snapshot.as_deref());
            self.schedule(i);
            return;
        }
        let Some(mut app) = s.app.take() else {
            return;
        };
        let name = &s.name;
        let (shared, tx, owner) = (self.shared.clone(), self.tx.clone(), name.clone());
        // The app moves to the action thread and comes back in `Done` (or `Lost`).
        let spawned = std::thread::Builder::new()
            .name(format!("act:{name}"))
            .stack_size(256 * 1024)
            .spawn(move || {
                let acted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                    app.act(&shared, decision, snapshot.as_deref());
                    app
                }));
                tx.send(match acted {
                    Ok(app) => ToWatch::Done(app),
                    Err(_) => ToWatch::Lost(owner),
                });
            });
        if let Err(error) = spawned {
            // The app went down with the closure: it is watched again from its saved history,
            // and its next check decides afresh.
            tracing::error!(message = "Cannot start an action thread.", app = %name, %error);
            self.tx.send(ToWatch::Lost(name.clone()));
        }
    }

    /// Sets the next check after one finished (with its action), aligned to when it started.
    fn schedule(&mut self, i: usize) {
        let Some(s) = self.slots.get_mut(i) else {
            return;
        };
        let Some(app) = s.app.as_mut() else {
            return;
        };
        if let Some(cfg) = s.pending_cfg.take() {
            app.reconfigure(cfg);
        }
        let now = clock::mono_now();
        // Start-aligned: a check that overran its period (a hung probe, a restart) is followed
        // at once, so detection stays on the configured schedule instead of drifting.
        s.next = (s.started + app.period().as_millis() as u64).max(now);
        app.release_kept(Duration::from_millis(s.next - now));
        s.progress
            .due
            .store(s.next + IDLE_SLACK_MS, Ordering::Relaxed);
    }
}

fn on_bus(shared: &Shared, ev: &BusEvent) {
    shared.emit(
        Event::new(
            Kind::Pm2Event,
            Some(&ev.name),
            format!("PM2 event: {}.", ev.event),
        )
        .with("action", ev.event.as_str())
        .with("pm_id", ev.pm_id)
        .with("manually", ev.manually),
    );
}
