//! `pmguard-agent check --once`: the backup check cron runs every 5 minutes.
//!
//! If the daemon's heartbeat is fresh it does nothing. Otherwise it checks every app with the
//! daemon's own judgement (`App`), up to `max_retries` times `retry_interval` apart, and restarts
//! what needs it, under the same `restart.lock` and `restarts.json` as the daemon: the two can
//! never restart one app within its cooldown. The startup grace is taken from when PM2 (or
//! pmguard) last started the app, not from when this check began.

use std::io::Write;
use std::sync::Arc;

use crate::clock;
use crate::config::Config;
use crate::pm2::{Client, Pm2Paths};
use crate::policy::{Decision, Health};
use crate::report::events::{Event, EventLog, Kind};
use crate::report::state::StateDir;
use crate::runtime::app::App;
use crate::runtime::shared::Shared;

/// What the backup check concluded.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// The daemon is alive; nothing was checked.
    AgentAlive { age_ms: u64 },
    /// Every app was checked; `acted` lists the apps it had to act on.
    Checked { acted: Vec<String> },
}

/// Why the backup check could not run.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("state directory {path}: {source}")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("event file in {path}: {source}")]
    Events {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pm2(#[from] crate::pm2::Pm2Error),
}

/// What the daemon's status file says.
enum Report {
    /// The daemon is alive and has nothing for the backup check to do.
    Alive(Outcome),
    /// The daemon is alive but reports the PM2 daemon down (it cannot resurrect from inside
    /// systemd's sandbox); the app that saw it.
    Pm2Down(String),
    /// No fresh heartbeat: the daemon is not watching.
    Silent,
}

pub fn run(config: &Config, out: &mut dyn Write) -> Result<Outcome, CheckError> {
    let state = StateDir::new(&config.agent.state_dir);
    let pm2_down = match agent_report(&state, out) {
        Report::Alive(outcome) => return Ok(outcome),
        Report::Pm2Down(app) => Some(app),
        Report::Silent => None,
    };
    let shared = open_shared(config, &state)?;
    // A pause past its deadline ends here too when no agent runs (a `pause_expired` event).
    crate::runtime::maintenance::expire(&shared);
    if let Some(app) = pm2_down {
        return Ok(resurrect_for_agent(config, &shared, app, out));
    }
    shared.emit(Event::new(
        Kind::Check,
        None,
        "Backup check: the agent's heartbeat is missing or stale; checking every app.",
    ));
    Ok(check_every_app(config, &shared, &state, out))
}

fn agent_report(state: &StateDir, out: &mut dyn Write) -> Report {
    let Ok(Some(status)) = state.read_status() else {
        return Report::Silent;
    };
    if !status.is_fresh() {
        return Report::Silent;
    }
    let age_ms = status.age_ms().unwrap_or(0);
    // The daemon may run sandboxed (systemd), where it cannot bring PM2 back itself: that one
    // job is the backup check's even while the daemon lives.
    match status.apps.iter().find(|a| a.health == Health::Pm2Down) {
        None => {
            let _ = writeln!(
                out,
                "pmguard-agent (pid {}) is alive: heartbeat {} ms old. Nothing to do.",
                status.pid, age_ms
            );
            Report::Alive(Outcome::AgentAlive { age_ms })
        }
        Some(a) => Report::Pm2Down(a.name.clone()),
    }
}

fn open_shared(config: &Config, state: &StateDir) -> Result<Shared, CheckError> {
    let path = state.dir.display().to_string();
    state.create().map_err(|source| CheckError::StateDir {
        path: path.clone(),
        source,
    })?;
    let events = Arc::new(
        EventLog::open(&state.dir, config.agent.events_max_bytes)
            .map_err(|source| CheckError::Events { path, source })?,
    );
    let paths = Pm2Paths::resolve(config.agent.pm2_home.as_deref())?;
    Ok(Shared::new(
        config.agent.clone(),
        Arc::new(Client::new(paths)),
        events,
    ))
}

fn resurrect_for_agent(
    config: &Config,
    shared: &Shared,
    app: String,
    out: &mut dyn Write,
) -> Outcome {
    let cooldown = config
        .app(&app)
        .map_or(60_000, |a| a.restart_cooldown.as_millis() as u64);
    let ran = crate::runtime::resurrect::resurrect_pm2(
        shared,
        &app,
        "reported by the running agent",
        cooldown,
    );
    let _ = writeln!(
        out,
        "pmguard-agent is alive but reports the PM2 daemon down: {}",
        if ran {
            "ran `pm2 resurrect`."
        } else {
            "not resurrected: PM2 answers again, was resurrected within the cooldown, or was stopped on purpose (events.jsonl says which)."
        }
    );
    Outcome::Checked {
        acted: if ran { vec![app] } else { Vec::new() },
    }
}

/// Every app checked at once, each on its own thread, then a line per app.
fn check_every_app(
    config: &Config,
    shared: &Shared,
    state: &StateDir,
    out: &mut dyn Write,
) -> Outcome {
    let book = state.read_restarts();
    let results: Vec<(String, bool, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = config
            .apps
            .iter()
            .map(|cfg| {
                let persisted = book.apps.get(&cfg.name).cloned();
                scope.spawn(move || check_app(shared, cfg.clone(), persisted))
            })
            .collect();
        handles
            .into_iter()
            .zip(&config.apps)
            .map(|(h, cfg)| {
                h.join()
                    .unwrap_or_else(|_| (cfg.name.clone(), false, "internal error".into()))
            })
            .collect()
    });
    let mut acted = Vec::new();
    for (name, did, line) in results {
        let _ = writeln!(out, "{name}: {line}");
        if did {
            acted.push(name);
        }
    }
    Outcome::Checked { acted }
}

fn check_app(
    shared: &Shared,
    cfg: crate::config::AppConfig,
    persisted: Option<crate::report::state::AppRestarts>,
) -> (String, bool, String) {
    let name = cfg.name.clone();
    let now = clock::mono_now();
    let mut app = App::new(cfg, now, persisted.as_ref());
    // Grace from the app's real start, not from now.
    app.state.grace_until = persisted
        .as_ref()
        .and_then(|p| p.last())
        .map(|t| t + app.policy.startup_grace)
        .filter(|g| *g > now);
    if let Ok(snap) = shared.snapshot(0) {
        let wall = clock::wall_ms();
        let newest = snap
            .by_name(&name)
            .iter()
            .filter_map(|e| e.pm_uptime_ms)
            .max();
        if let Some(started) = newest {
            let age = wall.saturating_sub(started);
            if age < app.policy.startup_grace {
                let g = now + (app.policy.startup_grace - age);
                app.state.grace_until = Some(app.state.grace_until.map_or(g, |x| x.max(g)));
            }
        }
    }
    let rounds = app.cfg.max_retries + 1;
    for round in 0..rounds {
        let check = app.check(shared, 0);
        let decision = app.handle(shared, check);
        match decision {
            Decision::Restart { reason, .. } => {
                return (name, true, format!("restarted ({reason})"))
            }
            Decision::Resurrect { reason } => {
                return (
                    name,
                    true,
                    format!("PM2 daemon was down ({reason}); resurrect attempted"),
                )
            }
            Decision::GiveUp { restarts, .. } => {
                return (
                    name,
                    true,
                    format!("crash loop: {restarts} restarts in the window; not restarting"),
                )
            }
            Decision::Wait { why } => {
                if app.state.health == Health::Healthy {
                    return (name, false, "healthy".into());
                }
                let counting = app.state.failures > 0;
                if !counting || round + 1 == rounds {
                    return (name, false, why.unwrap_or_else(|| "waiting".into()));
                }
                std::thread::sleep(app.cfg.retry_interval);
            }
        }
    }
    (name, false, "no decision".into())
}
