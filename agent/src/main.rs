//! The `pmguard-agent` binary: command line, logging set-up, exit codes, error rendering.
//! Exit codes: 0 ok; 1 checks failed (invalid config for `validate`, action taken by `check`,
//! stale heartbeat for `status`); 2 error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use pmguard_agent::cli::{self, Shell};
use pmguard_agent::config::{Config, ConfigError};
use pmguard_agent::control::PauseRequest;
use pmguard_agent::report::state::StateDir;
use pmguard_agent::runtime::check::Outcome;
use pmguard_agent::sys::privilege::{agent_user, AgentUser};

mod pause_cmd;

#[derive(Parser)]
#[command(
    name = "pmguard-agent",
    version = cli::LONG_VERSION,
    about = "Keeps PM2-managed services alive."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Watch the configured apps until stopped (SIGTERM); SIGHUP reloads the config.
    Run {
        #[arg(long, short, default_value = "/etc/pmguard/pmguard.toml")]
        config: PathBuf,
    },
    /// Check a config file and report every problem (exit 0 valid, 1 invalid).
    Validate {
        #[arg(long, short, default_value = "/etc/pmguard/pmguard.toml")]
        config: PathBuf,
    },
    /// The backup check for cron: if the agent is not alive, check every app once and act.
    Check {
        /// Run one check and exit (the only mode).
        #[arg(long, required = true)]
        once: bool,
        #[arg(long, short, default_value = "/etc/pmguard/pmguard.toml")]
        config: PathBuf,
    },
    /// Show each app's state, recent probes and restarts, as the running agent last saw them.
    Status {
        #[arg(long, short, default_value = "/etc/pmguard/pmguard.toml")]
        config: PathBuf,
        /// Machine-readable output (the same as `--format json`).
        #[arg(long)]
        json: bool,
        /// Output format; `prometheus` prints what `prometheus_textfile` holds.
        #[arg(long, value_enum, default_value = "text")]
        format: StatusFormat,
    },
    /// Pause actions for apps (maintenance): checks and records go on, but no restart,
    /// escalation or resurrect until the pause ends (`--for`) or `resume`. Works whether or not
    /// the agent runs (`check --once` honours it too).
    Pause {
        #[arg(long, short, default_value = "/etc/pmguard/pmguard.toml")]
        config: PathBuf,
        /// Apps to pause (default: every app in the config).
        apps: Vec<String>,
        /// An app to pause, for a name that starts with `-` (after `--` comes COMMAND).
        #[arg(long = "app", value_name = "NAME")]
        app: Vec<String>,
        /// How long (e.g. 30m, 1h30m; at most 7d): the pause ends by itself then.
        #[arg(long = "for", value_name = "DURATION", value_parser = parse_length)]
        length: std::time::Duration,
        /// Why (shown by `status` and in the events).
        #[arg(long)]
        reason: Option<String>,
        /// Deploy helper: run COMMAND while paused, resume when it exits, exit with its code.
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<std::ffi::OsString>,
    },
    /// End maintenance pauses now (default: every pause).
    Resume {
        #[arg(long, short, default_value = "/etc/pmguard/pmguard.toml")]
        config: PathBuf,
        apps: Vec<String>,
    },
    /// Print the shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions { shell: Shell },
    /// Write the man pages into DIR (used by dist/build).
    #[command(hide = true)]
    GenerateMan { dir: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Completions { shell } => {
            match cli::write_completions(shell, &mut Cli::command(), &mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: cannot write completions: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::GenerateMan { dir } => match cli::write_man_pages(Cli::command(), &dir) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: cannot write man pages: {e}");
                ExitCode::from(2)
            }
        },
        Command::Validate { config } => match load_for_the_agents_user(&config) {
            Ok(c) => {
                if let Err(code) = probes_usable(&c, ExitCode::from(1)) {
                    return code;
                }
                for w in c.warnings() {
                    println!("WARNING: {w}");
                }
                println!("{}: valid, {} app(s).", config.display(), c.apps.len());
                ExitCode::SUCCESS
            }
            Err(e) => config_failure(&e),
        },
        Command::Run { config } => {
            // The url_files are read as the user the agent runs as, as every reload reads them.
            let mut c = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    config_failure(&e);
                    return ExitCode::from(2);
                }
            };
            if let Err(code) = act_as_pm2_owner(&c) {
                return code;
            }
            if let Err(e) = c.read_url_files(&AgentUser::current()) {
                config_failure(&e);
                return ExitCode::from(2);
            }
            warn_unusable_probes(&c);
            match pmguard_agent::runtime::daemon::run(c) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Check { config, .. } => {
            let c = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    config_failure(&e);
                    return ExitCode::from(2);
                }
            };
            if let Err(code) = act_as_pm2_owner(&c) {
                return code;
            }
            warn_unusable_probes(&c);
            match pmguard_agent::runtime::check::run(&c, &mut std::io::stdout()) {
                Ok(Outcome::AgentAlive { .. }) => ExitCode::SUCCESS,
                Ok(Outcome::Checked { acted }) if acted.is_empty() => ExitCode::SUCCESS,
                Ok(Outcome::Checked { .. }) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Pause {
            config,
            mut apps,
            app,
            length,
            reason,
            command,
        } => {
            apps.extend(app);
            let request = PauseRequest {
                apps,
                length,
                reason,
                by: caller(),
            };
            pause_cmd::pause(&config, request, &command)
        }
        Command::Resume { config, apps } => pause_cmd::resume(&config, &apps),
        Command::Status {
            config,
            json,
            format,
        } => {
            let c = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    config_failure(&e);
                    return ExitCode::from(2);
                }
            };
            let state = StateDir::new(&c.agent.state_dir);
            let out = &mut std::io::stdout();
            let printed = match format {
                StatusFormat::Prometheus => {
                    pmguard_agent::report::status::print_prometheus(&state, out)
                }
                f => pmguard_agent::report::status::print(
                    &state,
                    json || f == StatusFormat::Json,
                    out,
                ),
            };
            match printed {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum StatusFormat {
    Text,
    Json,
    Prometheus,
}

fn parse_length(text: &str) -> Result<std::time::Duration, String> {
    pmguard_agent::config::duration::parse(text)
}

/// Who runs the command, for the events: the person behind `sudo`, else the user.
fn caller() -> Option<String> {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .ok()
}

/// Started as root: become PM2_HOME's owner before anything is started or written.
pub(crate) fn act_as_pm2_owner(c: &Config) -> Result<(), ExitCode> {
    use pmguard_agent::sys::privilege::{become_owner_of, Became};
    let home = match pmguard_agent::pm2::Pm2Paths::resolve(c.agent.pm2_home.as_deref()) {
        Ok(p) => p.home,
        Err(e) => {
            eprintln!("error: {e}");
            return Err(ExitCode::from(2));
        }
    };
    match become_owner_of(&home) {
        Ok(Became::Unchanged) => Ok(()),
        Ok(Became::User { uid, name }) => {
            tracing::info!(message = "Started as root; running as PM2's user.", user = %name, uid, path = %home.display());
            Ok(())
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(ExitCode::from(2))
        }
    }
}

/// `validate`'s config: each `url_file` judged for the user `run` would act as (PM2_HOME's
/// owner, when run through sudo), not for whoever runs `validate`.
fn load_for_the_agents_user(path: &std::path::Path) -> Result<Config, ConfigError> {
    let mut c = Config::load(path)?;
    let home = pmguard_agent::pm2::Pm2Paths::resolve(c.agent.pm2_home.as_deref()).ok();
    let user = agent_user(home.as_ref().map(|p| p.home.as_path()), &c.agent.state_dir);
    c.read_url_files(&user)?;
    Ok(c)
}

/// `validate` refuses a config whose probes could never pass (an unreadable `ca_file`, an https
/// host that is not a TLS name): better said now than counted as the app's failures.
fn probes_usable(c: &Config, code: ExitCode) -> Result<(), ExitCode> {
    let problems = pmguard_agent::probe::config_problems(c);
    if problems.is_empty() {
        return Ok(());
    }
    for p in &problems {
        eprintln!("error: {}: {p}", c.path.display());
    }
    Err(code)
}

/// For `pause`/`resume`: like `act_as_pm2_owner`, and if still root after it, become the owner
/// of the state directory (the agent's user on a default install, where root's own PM2_HOME
/// says nothing about whose agent it is). Files written as root there would lock the agent out
/// of its own pauses, events and restart lock, so with no `pm2_home` in the config a state
/// directory that is missing or root's is refused rather than written as root.
pub(crate) fn act_as_state_owner(c: &Config) -> Result<(), ExitCode> {
    use pmguard_agent::sys::privilege::{become_owner_of, euid_is_root, Became};
    use std::os::unix::fs::MetadataExt;
    act_as_pm2_owner(c)?;
    if !euid_is_root() {
        return Ok(());
    }
    let dir = &c.agent.state_dir;
    let owner = std::fs::symlink_metadata(dir).ok().map(|m| m.uid());
    if owner.is_some_and(|uid| uid != 0) {
        return match become_owner_of(dir) {
            Ok(Became::User { uid, name }) => {
                tracing::info!(message = "Started as root; running as the state directory's owner.", user = %name, uid, path = %dir.display());
                Ok(())
            }
            Ok(Became::Unchanged) => Ok(()),
            Err(e) => {
                eprintln!("error: state directory {}: {e}", dir.display());
                Err(ExitCode::from(2))
            }
        };
    }
    if c.agent.pm2_home.is_none() {
        eprintln!(
            "error: running as root, and the state directory {} is {}: pmguard will not write it as root, which would lock the agent (running as the PM2 user) out of it; run as the PM2 user or set [agent] pm2_home in {}",
            dir.display(),
            if owner.is_some() { "root's" } else { "missing" },
            c.path.display()
        );
        return Err(ExitCode::from(2));
    }
    Ok(())
}

/// At `run` and `check` a probe that cannot pass (a `ca_file` removed after `validate`) is said
/// loudly but does not stop watching: refusing to start would leave every other app unwatched
/// (and the cron backup check with it), which is worse than one app's failing probe, held by
/// the crash-loop limits.
fn warn_unusable_probes(c: &Config) {
    for p in pmguard_agent::probe::config_problems(c) {
        tracing::error!(message = "A probe cannot pass until the config or the file is fixed.", path = %c.path.display(), error = %p);
    }
}

pub(crate) fn config_failure(e: &ConfigError) -> ExitCode {
    eprintln!("error: {e}");
    match e {
        ConfigError::Invalid { .. } => ExitCode::from(1),
        ConfigError::Read { .. } => ExitCode::from(2),
    }
}

/// Logs go to stderr; under systemd (JOURNAL_STREAM set) without timestamps, which the journal adds.
fn init_logging() {
    use tracing::Level;
    let level = match std::env::var("PMGUARD_LOG").as_deref() {
        Ok("error") => Level::ERROR,
        Ok("warn") => Level::WARN,
        Ok("debug") => Level::DEBUG,
        Ok("trace") => Level::TRACE,
        _ => Level::INFO,
    };
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        .with_ansi(false);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().init();
    } else {
        builder.init();
    }
}
