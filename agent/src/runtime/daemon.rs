//! `pmguard-agent run`: the watch loop, the PM2 bus listener, signals, the heartbeat, and
//! systemd's notify protocol.
//!
//! Threads: main (signals from a sigwait thread, reloads, pause expiry, `status.json` when the
//! pulse asks), the watch loop (every app's checks, see `watch`; it beats the pulse after its
//! rounds, see `pulse`), one short-lived thread per action in progress (a slow
//! restart of one app never delays another), the bus reader, and the PM2 client's reader.
//! Invariants: the heartbeat (the `heartbeat` file; `status.json` when it changed, when a
//! reader asks, and on a slow refresh, see `pulse`) and `WATCHDOG=1` are refreshed only while every app
//! keeps its promised schedule, so a wedged agent looks dead to systemd and to the backup check;
//! a panic is a bug: the release build aborts (`panic = "abort"`) and systemd starts the agent
//! again (`Restart=on-failure`), an unwinding build starts the watch loop again; SIGTERM stops
//! promptly (`STOPPING=1`);
//! SIGHUP reloads, and an invalid file keeps the old config.

use std::collections::BTreeMap;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock;
use crate::config::{Config, ConfigError};
use crate::pm2::{Bus, BusEvent, Client, Pm2Paths};
use crate::report::events::{Event, EventLog, Kind};
use crate::report::state::StateDir;
use crate::runtime::pulse::{Pulse, ToMain};
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
    let (main_tx, main_rx) = mpsc::channel::<ToMain>();
    let board = notify.as_ref().map(crate::notify::Notify::board_reader);
    let pulse = Arc::new(Pulse::new(
        shared.clone(),
        &config,
        Notifier::from_env(),
        main_tx.clone(),
        board,
    ));
    signals::spawn_waiter(signals, move |sig| {
        main_tx.send(ToMain::Signal(sig)).is_ok()
    })
    .map_err(StartError::Thread)?;
    announce_start(&events, &config, &paths);
    let watch = start_watch(&shared, &config, &pulse).map_err(StartError::Thread)?;
    let route: Route = Arc::new(Mutex::new(watch.tx.clone()));
    let bus = spawn_bus(paths, &route, &shared)?;
    let mut main = Main {
        config,
        shared,
        events,
        pulse,
        watch,
        route,
        notify,
    };
    main.serve(&main_rx);
    main.watch.tx.send(ToWatch::Stop);
    bus.stop();
    // The loop lets a restart in flight finish (up to 3 s) and then ends.
    let deadline = clock::mono_now() + 4_000;
    while !main.watch.join.is_finished() && clock::mono_now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    main.pulse.final_status();
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

/// The main thread's loop: signals, reloads, pause expiry, reviving the watch loop, and the
/// beats the pulse asks for (see `pulse`).
struct Main {
    config: Config,
    shared: Arc<Shared>,
    events: Arc<EventLog>,
    pulse: Arc<Pulse>,
    watch: Watch,
    route: Route,
    /// The `[[notify]]` sinks' thread (None only if it could not be started).
    notify: Option<crate::notify::Notify>,
}

impl Main {
    /// Until SIGTERM/SIGINT (or the signal thread is gone).
    fn serve(&mut self, rx: &Receiver<ToMain>) {
        loop {
            let mut force = false;
            // A pause's end is a deadline of its own (a few ms late, so it has passed); one
            // already past that could not be removed yet (a restart holds the lock, a full
            // disk) is tried again a second later, not in a spin.
            let tick = Duration::from_millis(self.pulse.main_tick()).min(
                crate::runtime::maintenance::until_next_deadline(&self.shared).map_or(
                    Duration::MAX,
                    |d| match d.is_zero() {
                        true => Duration::from_secs(1),
                        false => d + Duration::from_millis(20),
                    },
                ),
            );
            match rx.recv_timeout(tick) {
                Ok(ToMain::Signal(Sig::SIGHUP)) => {
                    self.pulse.notifier().send("RELOADING=1");
                    let reloaded = {
                        let mut inner = self.pulse.inner();
                        reload(
                            &self.config,
                            &self.shared,
                            &self.watch.tx,
                            &mut inner.progress,
                            &self.events,
                        )
                    };
                    if let Some(new) = reloaded {
                        self.config = new;
                        self.pulse.reconfigure(&self.config);
                        self.reload_notify();
                    }
                    force = true;
                    self.pulse.notifier().send("READY=1");
                }
                Ok(ToMain::Signal(sig)) => {
                    self.pulse.notifier().send("STOPPING=1");
                    self.events.emit(
                        Event::new(Kind::AgentStop, None, "pmguard-agent stopping.")
                            .with("signal", sig.as_str()),
                    );
                    return;
                }
                Ok(ToMain::Status) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.revive_watch();
            // Said at once in status.json, where `pause` waits to see it applied.
            if crate::runtime::maintenance::tick(&self.shared) {
                force = true;
            }
            self.pulse.main_beat(clock::mono_now(), force);
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
        if let Ok(w) = start_watch(&self.shared, &self.config, &self.pulse) {
            *lock(&self.route) = w.tx.clone();
            self.watch = w;
        }
    }
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

/// Starts the watch loop with every app of `config`, each with a fresh `Progress`, beating the
/// pulse after its rounds.
fn start_watch(
    shared: &Arc<Shared>,
    config: &Config,
    pulse: &Arc<Pulse>,
) -> std::io::Result<Watch> {
    let book = shared.state.read_restarts();
    let mut inner = pulse.inner();
    inner.progress.clear();
    let apps = config
        .apps
        .iter()
        .map(|a| {
            let p = Arc::new(Progress::default());
            inner.progress.insert(a.name.clone(), p.clone());
            (a.clone(), book.apps.get(&a.name).cloned(), p)
        })
        .collect();
    drop(inner);
    crate::runtime::watch::spawn(shared.clone(), apps, pulse.clone())
}
