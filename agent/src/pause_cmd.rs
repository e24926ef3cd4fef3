//! The binary's side of `pause` and `resume` (part of `pmguard-agent`, not of the library):
//! config, dropping root to the PM2 user (or the state directory's owner), the deploy helper, and what is printed.

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

use pmguard_agent::clock;
use pmguard_agent::config::Config;
use pmguard_agent::control::{self, AgentSeen, Changed, Deployed, PauseRequest};

use crate::{act_as_state_owner, config_failure};

/// `println!` that survives a closed stdout (`| head -1`): the pause is already written by
/// then, and a panic (exit 101) would make the deploy helper think it failed.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `pause`: records the pause (as the PM2 user), or with a COMMAND runs the deploy helper.
pub fn pause(config: &Path, request: PauseRequest, command: &[OsString]) -> ExitCode {
    let c = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if !command.is_empty() {
        return deploy(&c, &request, command);
    }
    if let Err(code) = act_as_state_owner(&c) {
        return code;
    }
    match control::pause(&c, &request) {
        Ok(changed) => {
            for (app, p) in &changed.apps {
                if let Some(p) = p {
                    say!("{app}: {}.", p.describe());
                }
            }
            for (app, old) in &changed.shortened {
                say!("{app}: this replaces a longer pause ({}).", old.describe());
            }
            say_applied(&changed, &c);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// `resume`: ends the pauses (as the PM2 user).
pub fn resume(config: &Path, apps: &[String]) -> ExitCode {
    let c = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let by = crate::caller();
    if let Err(code) = act_as_state_owner(&c) {
        return code;
    }
    match control::resume(&c, apps, by.as_deref()) {
        Ok(changed) => {
            if changed.apps.is_empty() {
                say!("No app was paused.");
            }
            for (app, had) in &changed.apps {
                match had {
                    Some(_) => say!("{app}: resumed."),
                    None => say!("{app}: was not paused."),
                }
            }
            say_applied(&changed, &c);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn load(config: &Path) -> Result<Config, ExitCode> {
    Config::load(config).map_err(|e| {
        config_failure(&e);
        ExitCode::from(2)
    })
}

fn say_applied(changed: &Changed, c: &Config) {
    match changed.agent {
        AgentSeen::Applied { pid, after_ms } => say!(
            "The running agent (pid {pid}) applied it in {:.2} s.",
            after_ms as f64 / 1000.0
        ),
        AgentSeen::NotConfirmed { pid } => say!(
            "The agent (pid {pid}) has not confirmed it yet; every restart reads {} again first, so none starts meanwhile.",
            c.agent.state_dir.join("pauses.json").display()
        ),
        AgentSeen::NotRunning => say!(
            "pmguard-agent is not running: recorded in {}; `check --once` and the agent, when it starts, honour it.",
            c.agent.state_dir.join("pauses.json").display()
        ),
    }
}

/// The deploy helper: `exe pause ...` and `exe resume ...` as their own processes around COMMAND.
fn deploy(c: &Config, request: &PauseRequest, command: &[OsString]) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: cannot find this program to call it again: {e}");
            return ExitCode::from(2);
        }
    };
    let names: Vec<String> = if request.apps.is_empty() {
        c.apps.iter().map(|a| a.name.clone()).collect()
    } else {
        request.apps.clone()
    };
    let mut pause_args: Vec<OsString> = vec![
        "pause".into(),
        "--config".into(),
        c.path.clone().into_os_string(),
    ];
    pause_args.extend([
        "--for".into(),
        pmguard_agent::config::duration::format(request.length).into(),
    ]);
    // `--opt=value`: a reason or a name starting with `-` is never taken for an option. Names go
    // through `--app`, since after `--` comes the COMMAND.
    if let Some(r) = &request.reason {
        pause_args.push(format!("--reason={r}").into());
    }
    pause_args.extend(names.iter().map(|n| OsString::from(format!("--app={n}"))));
    let mut resume_args: Vec<OsString> = vec![
        "resume".into(),
        "--config".into(),
        c.path.clone().into_os_string(),
    ];
    resume_args.push("--".into());
    resume_args.extend(names.iter().map(OsString::from));
    let started = clock::mono_now();
    match control::run_paused(&exe, &pause_args, &resume_args, command) {
        Deployed::NotPaused(code) => {
            eprintln!("error: the pause failed; the command did not run.");
            ExitCode::from(code.clamp(1, 255) as u8)
        }
        Deployed::Ran { code, resumed } => {
            if code == 127 {
                eprintln!("error: cannot run {:?}.", command[0]);
            }
            if !resumed {
                eprintln!("warning: the resume failed; the pause ends by itself at its deadline (`pmguard-agent resume` ends it now).");
            }
            tracing::debug!(
                message = "Deploy done.",
                duration_ms = clock::mono_now().saturating_sub(started),
                status = code
            );
            ExitCode::from((code & 0xff) as u8)
        }
    }
}
