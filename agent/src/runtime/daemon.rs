//! `pmguard-agent run`: the watch loop, the PM2 bus listener, signals, the heartbeat, and
//! systemd's notify protocol.
//!
//! Threads: main (signals from a sigwait thread, heartbeat, watchdog, reload), the watch loop
//! (every app's checks; see `watch`), one short-lived thread per action in progress (a slow
//! restart of one app never delays another), the bus reader, and the PM2 client's reader.
//! Invariants: the heartbeat (the `heartbeat` file, `status.json` only when it changed or
//! every `STATUS_REFRESH_MS`) and `WATCHDOG=1` are refreshed only while every app
//! keeps its promised schedule, so a wedged agent looks dead to systemd and to the backup check;
//! a panic is a bug: the release build aborts (`panic = "abort"`) and systemd starts the agent
//! again (`Restart=on-failure`), an unwinding build starts the watch loop again; SIGTERM stops
//! promptly (`STOPPING=1`);
//! SIGHUP reloads, and an invalid file keeps the old config.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock;
use crate::clock::Mono;
use crate::config::{Config, ConfigError};
use crate::pm2::{Bus, BusEvent, Client, Pm2Paths};
use crate::report::events::{Event, EventLog, Kind};
use crate::report::prometheus::{self, Textfile};
use crate::report::state::{Beat, HeartbeatFile, StateDir, StatusFile, STATUS_REFRESH_MS};
use crate::runtime::shared::Progress;
use crate::runtime::shared::Shared;
use crate::runtime::watch::{ToWatch, Watch, WatchTx};
use crate::sync::lock;
use crate::sys::files::Lock;
use crate::sys::files::LockError;
use crate::sys::notify::Notifier;
use crate::sys::signals::{self, Sig};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("state directory {path}: {source}")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("another pmguard-agent is already running with state directory {path} (it holds agent.lock)")]
    AlreadyRunning { path: String },
    #[error("PM2 home: {0}")]
    Pm2(String),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}

enum ToMain {
    Signal(Sig),
}

/// The watch loop's sender, replaced when the loop is started again (the bus keeps a handle).
type Route = Arc<Mutex<WatchTx>>;

/// Runs until SIGTERM/SIGINT. Returns Ok on a clean stop.
pub fn run(config: Config) -> Result<(), StartError> {
    // Before any thread exists, so every thread inherits the mask.
    let signals = signals::block();
    let (state, _life, events) = open_state(&config)?;
    let paths = Pm2Paths::resolve(config.agent.pm2_home.as_deref())
        .map_err(|e| StartError::Pm2(e.to_string()))?;
    let client = Arc::new(Client::new(paths.clone()));
    let mut shared = Shared::new(config.agent.clone(), client, events.clone());
    shared.sandboxed = std::env::var_os("PMGUARD_SANDBOXED").is_some_and(|v| v == "1");
    let sink = start_sink(&config, &state, &mut shared);
    let shared = Arc::new(shared);
    let notify = start_notify(&config, &state, &shared, &paths.home);
    forward_events(&events, &shared, notify.as_ref());
    let notifier = Notifier::from_env();
    let (main_tx, main_rx) = mpsc::channel::<ToMain>();
    signals::spawn_waiter(signals, move |sig| {
        main_tx.send(ToMain::Signal(sig)).is_ok()
    })
    .map_err(StartError::Thread)?;
    announce_start(&events, &config, &paths);
    let mut progress: BTreeMap<String, Arc<Progress>> = BTreeMap::new();
    let watch = start_watch(&shared, &config, &mut progress).map_err(StartError::Thread)?;
    let route: Route = Arc::new(Mutex::new(watch.tx.clone()));
    let bus = spawn_bus(paths, &route, &shared)?;
    let mut main = Main {
        config,
        shared,
        events,
        notifier,
        progress,
        watch,
        route,
        ready: false,
        wedged_reported: false,
        last_ping: 0,
        last_beat: 0,
        status: StatusWrites::default(),
        textfile: None,
        notify,
    };
    main.textfile = main
        .config
        .agent
        .prometheus_textfile
        .as_deref()
        .map(Textfile::new);
    main.serve(&main_rx);
    main.watch.tx.send(ToWatch::Stop);
    bus.stop();
    // The loop lets a restart in flight finish (up to 3 s) and then ends.
    let deadline = clock::mono_now() + 4_000;
    while !main.watch.join.is_finished() && clock::mono_now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Last: the apps' final events and `agent_stop` go out (or to the spool) within 5 s.
    if let Some(n) = main.notify.take() {
        n.stop();
    }
    if let Some(sink) = sink {
        sink.stop();
    }
    Ok(())
}

/// The state directory, the lock that makes this the only agent on it, and the event log.
fn open_state(config: &Config) -> Result<(StateDir, Lock, Arc<EventLog>), StartError> {
    let state = StateDir::new(&config.agent.state_dir);
    let sd = |source| StartError::StateDir {
        path: config.agent.state_dir.display().to_string(),
        source,
    };
    state.create().map_err(sd)?;
    let life = match state.lock_agent() {
        Ok(l) => l,
        Err(LockError::Busy) => {
            return Err(StartError::AlreadyRunning {
                path: config.agent.state_dir.display().to_string(),
            })
        }
        Err(LockError::Io(e)) => return Err(sd(e)),
    };
    let events = Arc::new(EventLog::open(&state.dir, config.agent.events_max_bytes).map_err(sd)?);
    Ok((state, life, events))
}

/// The AWS sink, with `[aws]` only: without it no runtime starts and no AWS code runs. A sink
/// that cannot start leaves metrics and events local; watching goes on.
fn start_sink(config: &Config, state: &StateDir, shared: &mut Shared) -> Option<crate::aws::Sink> {
    let aws = config.aws.as_ref()?;
    let recorder = Arc::new(crate::aws::Recorder::new());
    match crate::aws::Sink::start(
        aws.clone(),
        &state.dir,
        recorder.clone(),
        crate::aws::SinkOptions::default(),
    ) {
        Ok(sink) => {
            shared.recorder = Some(recorder);
            Some(sink)
        }
        Err(error) => {
            tracing::error!(message = "Cannot start the AWS sink; metrics and events stay local.", %error);
            None
        }
    }
}

/// The notify thread: started even without a `[[notify]]` sink (it then sleeps on its
/// channel), so a reload that adds one applies at once. It finds an app's error log in the
/// status board, as of the app's last check.
fn start_notify(
    config: &Config,
    state: &StateDir,
    shared: &Arc<Shared>,
    pm2_home: &std::path::Path,
) -> Option<crate::notify::Notify> {
    let board = shared.clone();
    let logs: crate::notify::LogPaths = Arc::new(move |app: &str| {
        lock(&board.board)
            .get(app)
            .and_then(|a| a.instances.iter().find_map(|i| i.err_log.clone()))
    });
    let origin = crate::notify::Origin {
        host: crate::sys::hostname(),
        instance_id: config.aws.as_ref().and_then(|a| a.instance_id.clone()),
    };
    match crate::notify::Notify::start(
        config.notify.clone(),
        &state.dir,
        origin,
        logs,
        notify_options(pm2_home),
    ) {
        Ok(n) => Some(n),
        Err(error) => {
            tracing::error!(message = "Cannot start the notify thread; alerts stay in the event log.", %error);
            None
        }
    }
}

/// The error logs an alert may attach are PM2's user's (PM2_HOME's owner, who writes them);
/// the agent's own user's only when PM2_HOME cannot be seen. So an agent running as root next
/// to a PM2 user never attaches a root-owned file an app's log path names.
fn notify_options(pm2_home: &std::path::Path) -> crate::notify::Options {
    use std::os::unix::fs::MetadataExt;
    let mut opts = crate::notify::Options::default();
    if let Ok(m) = std::fs::metadata(pm2_home) {
        opts.log_owners = vec![m.uid()];
    }
    opts
}

/// The event log's forwards: the AWS recorder (with `[aws]`) and the notify inbox.
fn forward_events(events: &EventLog, shared: &Shared, notify: Option<&crate::notify::Notify>) {
    let mut forwards: Vec<Arc<dyn crate::report::events::Forward>> = Vec::new();
    if let Some(r) = &shared.recorder {
        forwards.push(r.clone());
    }
    if let Some(n) = notify {
        forwards.push(n.inbox());
    }
    events.set_forwards(forwards);
}

fn announce_start(events: &EventLog, config: &Config, paths: &Pm2Paths) {
    let apps: Vec<String> = config.apps.iter().map(|a| a.name.clone()).collect();
    events.emit(
        Event::new(Kind::AgentStart, None, "pmguard-agent started.")
            .with("version", env!("CARGO_PKG_VERSION"))
            .with("apps", apps)
            .with("path", paths.home.display().to_string())
            .with("pid", std::process::id()),
    );
}

/// PM2's event bus: a person's `pm2 kill` is noted at once, everything else goes to the watch
/// loop (through `route`, which follows the loop when it is started again).
fn spawn_bus(paths: Pm2Paths, route: &Route, shared: &Arc<Shared>) -> Result<Bus, StartError> {
    let route = route.clone();
    let link = shared.bus.clone();
    let shared = shared.clone();
    Bus::spawn_with_link(paths, link, move |ev: BusEvent| {
        if ev.event == crate::pm2::bus::KILL_TOPIC {
            shared.pm2_stopped_on_purpose();
            return;
        }
        lock(&route).send(ToWatch::Bus(ev));
    })
    .map_err(StartError::Thread)
}

/// The main thread's tick (signals and reloads wake it at once).
const TICK_MS: u64 = 500;

/// The main thread's loop: signals, reloads, the watch loop's health, the heartbeat and
/// systemd's notifications.
struct Main {
    config: Config,
    shared: Arc<Shared>,
    events: Arc<EventLog>,
    notifier: Notifier,
    progress: BTreeMap<String, Arc<Progress>>,
    watch: Watch,
    route: Route,
    ready: bool,
    wedged_reported: bool,
    last_ping: Mono,
    last_beat: Mono,
    status: StatusWrites,
    /// `[agent] prometheus_textfile`, rewritten with `status.json`.
    textfile: Option<Textfile>,
    /// The `[[notify]]` sinks' thread (None only if it could not be started).
    notify: Option<crate::notify::Notify>,
}

/// When `status.json` was last rewritten, and what it said then (see `report::state`).
#[derive(Debug, Default)]
struct StatusWrites {
    /// The in-place heartbeat; `None` until opened, or after it failed (then every beat
    /// rewrites `status.json`, as before the heartbeat file existed).
    beat_file: Option<HeartbeatFile>,
    beat_file_failed: bool,
    last_write: Mono,
    last_print: u64,
    /// A pause or reload changed what `status.json` must say: write it at the next beat.
    force: bool,
}

impl Main {
    /// Until SIGTERM/SIGINT (or the signal thread is gone).
    fn serve(&mut self, rx: &Receiver<ToMain>) {
        let tick = Duration::from_millis(TICK_MS);
        loop {
            match rx.recv_timeout(tick) {
                Ok(ToMain::Signal(Sig::SIGHUP)) => {
                    self.notifier.send("RELOADING=1");
                    if let Some(new) = reload(
                        &self.config,
                        &self.shared,
                        &self.watch.tx,
                        &mut self.progress,
                        &self.events,
                    ) {
                        self.config = new;
                        self.reload_notify();
                    }
                    self.status.force = true;
                    self.notifier.send("READY=1");
                }
                Ok(ToMain::Signal(sig)) => {
                    self.notifier.send("STOPPING=1");
                    self.events.emit(
                        Event::new(Kind::AgentStop, None, "pmguard-agent stopping.")
                            .with("signal", sig.as_str()),
                    );
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.revive_watch();
            if crate::runtime::maintenance::tick(&self.shared) {
                // Said at once in status.json, where `pause` waits to see it applied.
                self.last_beat = 0;
                self.status.force = true;
            }
            if self.on_schedule() {
                self.report_alive();
            }
        }
    }

    /// Hands the reloaded `[[notify]]` sinks to the notify thread.
    fn reload_notify(&mut self) {
        if let Some(n) = &self.notify {
            n.reconfigure(self.config.notify.clone());
        }
    }

    /// Starts the watch loop again if it died (a panic is a bug, but watching must go on).
    fn revive_watch(&mut self) {
        if !self.watch.join.is_finished() {
            return;
        }
        tracing::error!(message = "The watch loop stopped unexpectedly; starting it again.");
        if let Ok(w) = start_watch(&self.shared, &self.config, &mut self.progress) {
            *lock(&self.route) = w.tx.clone();
            self.watch = w;
        }
    }

    /// Whether every app kept its promise to report; a broken promise withholds the heartbeat
    /// and the watchdog ping, so systemd restarts a wedged agent.
    fn on_schedule(&mut self) -> bool {
        let now = clock::mono_now();
        let wedged: Vec<&String> = self
            .progress
            .iter()
            .filter(|(_, p)| {
                let due = p.due.load(Ordering::Relaxed);
                due != 0 && now > due
            })
            .map(|(n, _)| n)
            .collect();
        if wedged.is_empty() {
            self.wedged_reported = false;
            return true;
        }
        if !self.wedged_reported {
            tracing::error!(message = "An app missed its schedule; withholding the heartbeat.", app = ?wedged);
            self.wedged_reported = true;
        }
        false
    }

    /// Once every app was checked: the heartbeat, READY=1 the first time, the watchdog ping.
    fn report_alive(&mut self) {
        let all_checked = self
            .progress
            .values()
            .all(|p| p.checks.load(Ordering::Relaxed) > 0);
        if !all_checked {
            return;
        }
        let now = clock::mono_now();
        // The heartbeat file is rewritten once per (shortest) check period, 1 s to 5 s: it is
        // fresh for 3 periods, and rewriting it more often was most of the agent's own CPU.
        // Half a tick early rather than a whole tick late: beats land once per period.
        let every = heartbeat_every(&self.config).saturating_sub(TICK_MS / 2);
        if !self.ready || now.saturating_sub(self.last_beat) >= every {
            self.beat(now);
            self.last_beat = now;
        }
        if let Some(r) = &self.shared.recorder {
            r.alive();
        }
        if !self.ready {
            self.ready = true;
            self.notifier.send("READY=1");
            self.notifier
                .send(&format!("STATUS=Watching {} app(s).", self.progress.len()));
        }
        if let Some(every) = self.notifier.watchdog {
            if now.saturating_sub(self.last_ping) >= every.as_millis() as u64 / 2 {
                self.notifier.send("WATCHDOG=1");
                self.last_ping = now;
            }
        }
    }
}

impl Main {
    /// One heartbeat: `status.json` (and the Prometheus textfile) when something significant
    /// changed or `STATUS_REFRESH_MS` passed, then the one-line heartbeat file in place.
    /// Rewriting the whole status every second was the agent's largest own cost.
    fn beat(&mut self, now: Mono) {
        let st = &mut self.status;
        if st.beat_file.is_none() && !st.beat_file_failed {
            match self.shared.state.open_heartbeat() {
                Ok(f) => st.beat_file = Some(f),
                Err(error) => {
                    tracing::warn!(message = "Cannot open the heartbeat file; rewriting status.json at every beat instead.", path = %self.shared.state.dir.display(), %error);
                    st.beat_file_failed = true;
                }
            }
        }
        let notify = self
            .notify
            .as_ref()
            .map(crate::notify::Notify::status)
            .unwrap_or_default();
        let print = fingerprint(&self.shared, &notify);
        let due = now.saturating_sub(st.last_write) >= STATUS_REFRESH_MS;
        if st.beat_file.is_none() || !self.ready || st.force || due || print != st.last_print {
            let written = write_heartbeat(
                &self.shared,
                &self.config,
                self.textfile.as_mut(),
                notify.clone(),
            );
            st.last_write = now;
            st.last_print = print;
            // A status that cannot be written (a full disk) is tried again at every beat, and
            // meanwhile nothing beats: a fresh heartbeat over a stale status.json would make
            // `status` and the backup check trust states that are no longer true.
            st.force = !written;
            if !written {
                return;
            }
        }
        let beat = Beat {
            pid: std::process::id(),
            boot_epoch: clock::boot_epoch(),
            heartbeat: clock::mono_now(),
            interval_ms: heartbeat_every(&self.config),
        };
        if let Some(Err(error)) = st.beat_file.as_ref().map(|f| f.beat(&beat)) {
            tracing::warn!(message = "Cannot write the heartbeat file; rewriting status.json at every beat instead.", path = %self.shared.state.dir.display(), %error);
            st.beat_file = None;
            st.beat_file_failed = true;
            write_heartbeat(&self.shared, &self.config, self.textfile.as_mut(), notify);
        }
    }
}

/// What in the board a person or a script acts on: a change is written at the next beat. The
/// volatile measurements (latency, CPU, memory, probe history, check counts) are left out.
fn fingerprint(shared: &Shared, notify: &crate::notify::Board) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    // A notify sink's counters: an alert queued, delivered, dropped or failing shows at once.
    notify.lost.hash(&mut h);
    for n in &notify.sinks {
        (n.queued, n.delivered, n.dropped, n.held_back, &n.last_error).hash(&mut h);
    }
    for a in lock(&shared.board).values() {
        (
            &a.name,
            a.health.as_str(),
            a.failures,
            a.max_retries,
            &a.note,
        )
            .hash(&mut h);
        for i in &a.instances {
            (i.pm_id, i.pid, &i.status, i.restart_time).hash(&mut h);
        }
        (a.restarts.len(), a.restarts.back().map(|r| r.ts_ms)).hash(&mut h);
    }
    h.finish()
}

fn heartbeat_every(config: &Config) -> u64 {
    let shortest = config
        .apps
        .iter()
        .map(|a| a.interval.min(a.retry_interval).as_millis() as u64)
        .min()
        .unwrap_or(10_000);
    shortest.clamp(1_000, 5_000)
}

/// `status.json`, and with `prometheus_textfile` the same state for node_exporter: both encoded
/// under the board's lock from one snapshot, written after it is released.
fn write_heartbeat(
    shared: &Shared,
    config: &Config,
    textfile: Option<&mut Textfile>,
    notify: crate::notify::Board,
) -> bool {
    // The heartbeat's own cadence, not the longest app interval: one app at `1h` must not make
    // the backup check trust a dead daemon for three hours.
    let interval_ms = heartbeat_every(config);
    let pauses_revision = crate::runtime::maintenance::applied_revision(shared);
    let (data, prom) = {
        let mut board = lock(&shared.board);
        for a in board.values_mut() {
            a.paused = shared.pause_of(&a.name);
        }
        let status = StatusFile {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            boot_epoch: clock::boot_epoch(),
            heartbeat: clock::mono_now(),
            updated_at: clock::rfc3339(clock::wall_ms()),
            interval_ms,
            pauses_revision,
            apps: board.values().collect(),
            notify: notify.sinks,
            notify_lost: notify.lost,
        };
        let prom = textfile.is_some().then(|| prometheus::encode(&status));
        (StateDir::encode_status(&status), prom)
    };
    let written = match data.and_then(|d| shared.state.write_status(&d)) {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(message = "Cannot write status.json; withholding the heartbeat.", path = %shared.state.dir.display(), %error);
            false
        }
    };
    if let (Some(t), Some(text)) = (textfile, prom) {
        t.write(&text);
    }
    written
}

/// Reads the config again. An invalid one is refused (an event says why) and the running one
/// kept; a valid one's apps are added, changed and removed in the running loop.
fn reload(
    old: &Config,
    shared: &Arc<Shared>,
    watch: &WatchTx,
    progress: &mut BTreeMap<String, Arc<Progress>>,
    events: &EventLog,
) -> Option<Config> {
    let new = match Config::load_with_url_files(&old.path) {
        Ok(c) => c,
        Err(e) => {
            let detail = match &e {
                ConfigError::Invalid { problems, .. } => problems.len(),
                ConfigError::Read { .. } => 1,
            };
            events.emit(
                Event::new(
                    Kind::ConfigRejected,
                    None,
                    format!("Reload refused; keeping the running config. {e}"),
                )
                .with("problems", detail)
                .with("path", old.path.display().to_string()),
            );
            return None;
        }
    };
    let unusable = crate::probe::config_problems(&new);
    if !unusable.is_empty() {
        events.emit(
            Event::new(
                Kind::ConfigRejected,
                None,
                format!(
                    "Reload refused; keeping the running config. {}",
                    unusable.join("; ")
                ),
            )
            .with("problems", unusable.len())
            .with("path", old.path.display().to_string()),
        );
        return None;
    }
    if new.aws != old.aws {
        tracing::warn!(message = "Changes to [aws] take effect at the next agent restart.", path = %old.path.display());
    }
    if new.agent != old.agent {
        tracing::warn!(message = "Changes to [agent] take effect at the next agent restart.", path = %old.path.display());
    }
    let (changed, gone) = apply_apps(old, &new, shared, watch, progress);
    events.emit(
        Event::new(Kind::Reload, None, "Config reloaded.")
            .with("changed", changed)
            .with("removed", gone)
            .with("path", old.path.display().to_string()),
    );
    Some(new)
}

/// Hands the watch loop every app that is new or changed in `new`, and removes the ones gone.
/// Returns the names changed (or added) and removed.
fn apply_apps(
    old: &Config,
    new: &Config,
    shared: &Shared,
    watch: &WatchTx,
    progress: &mut BTreeMap<String, Arc<Progress>>,
) -> (Vec<String>, Vec<String>) {
    let book = shared.state.read_restarts();
    let mut changed = Vec::new();
    for app in &new.apps {
        if progress.contains_key(&app.name) {
            if old.app(&app.name) != Some(app) {
                watch.send(ToWatch::Config(Box::new(app.clone())));
                changed.push(app.name.clone());
            }
        } else {
            let p = Arc::new(Progress::default());
            progress.insert(app.name.clone(), p.clone());
            watch.send(ToWatch::Add {
                cfg: Box::new(app.clone()),
                persisted: book.apps.get(&app.name).cloned(),
                progress: p,
            });
            changed.push(app.name.clone());
        }
    }
    let gone: Vec<String> = progress
        .keys()
        .filter(|n| new.app(n).is_none())
        .cloned()
        .collect();
    for name in &gone {
        progress.remove(name);
        watch.send(ToWatch::Remove(name.clone()));
        lock(&shared.board).remove(name);
    }
    (changed, gone)
}

/// Starts the watch loop with every app of `config`, each with a fresh `Progress`.
fn start_watch(
    shared: &Arc<Shared>,
    config: &Config,
    progress: &mut BTreeMap<String, Arc<Progress>>,
) -> std::io::Result<Watch> {
    let book = shared.state.read_restarts();
    progress.clear();
    let apps = config
        .apps
        .iter()
        .map(|a| {
            let p = Arc::new(Progress::default());
            progress.insert(a.name.clone(), p.clone());
            (a.clone(), book.apps.get(&a.name).cloned(), p)
        })
        .collect();
    crate::runtime::watch::spawn(shared.clone(), apps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(apps: &str) -> Config {
        Config::parse(std::path::Path::new("/x.toml"), apps).unwrap()
    }

    #[test]
    fn the_heartbeat_is_judged_by_its_own_cadence_not_the_longest_interval() {
        // One app checked hourly must not make the backup check trust a dead daemon for 3 h.
        let c = config("[[apps]]\nname = \"a\"\ninterval = \"1h\"\n[[apps]]\nname = \"b\"\ninterval = \"1s\"\nretry_interval = \"1s\"\n");
        assert_eq!(heartbeat_every(&c), 1_000);
        let c = config("[[apps]]\nname = \"a\"\ninterval = \"1h\"\nretry_interval = \"1h\"\n");
        assert_eq!(
            heartbeat_every(&c),
            5_000,
            "capped at 5 s: stale after 15 s"
        );
    }
}
