//! `pmguard`: the installer CLI. Renders plans and errors; the work is in `pmguard-installer`.
//! Exit codes: 0 ok (or nothing to do); 1 blocked, drift or checks failed; 2 error.

// Outside tests: a runtime error is returned and rendered, never a panic; long functions are
// several named steps (clippy.toml sets the threshold). This binary prints, so printing is allowed.
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)
)]

/// `print!` that survives a closed stdout (`pmguard install ... | head`): a plan half shown
/// must not turn into a panic (exit 101) while the install itself goes on or has finished.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `println!` that survives a closed stdout, like `out!`.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

mod error;
mod fleet;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use pmguard_agent::cli::{self, Shell};
use pmguard_installer::layout::{self, Layout};
use pmguard_installer::legacy;
use pmguard_installer::plan::{self, Plan};
use pmguard_installer::render::{self, Settings};
use pmguard_installer::systemd::Systemctl;
use pmguard_installer::users;

use crate::error::CliError;

#[derive(Parser)]
#[command(
    name = "pmguard",
    version = cli::LONG_VERSION,
    about = "Install, provision and check pmguard."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct InstallArgs {
    /// The config file, or ssm:NAME to read it from SSM Parameter Store (see `fleet
    /// push-config`); re-running converges the box on the current parameter.
    #[arg(long, short)]
    config: PathBuf,
    /// Staging root (like DESTDIR): every path is written under it and nothing is started.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Print the plan (with diffs) and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// The account that runs PM2 (default: $SUDO_USER).
    #[arg(long)]
    user: Option<String>,
    /// Replace a config file that was edited since pmguard installed it (never another user's
    /// install: see --take-over).
    #[arg(long)]
    force: bool,
    /// Make the install here USER's when nothing tells whose it is (a manifest that names no
    /// user, from an older pmguard, with no unit, cron line or config naming one): without it,
    /// install refuses to replace anything of it.
    #[arg(long)]
    take_over: bool,
    /// The agent binary to install (default: pmguard-agent next to this program). The
    /// package's /usr/bin/pmguard-agent is used in place; any other is copied to
    /// /usr/local/bin.
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Stop another monitor that restarts PM2 apps here (the old pm2-health-monitor.service,
    /// a cron_health_check.sh crontab line, or one like them); uninstall puts it back.
    #[arg(long)]
    replace_legacy: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Write a starter config from the apps USER's PM2 daemon runs.
    ///
    /// One [[apps]] per app, with a health_url proposed from the TCP ports the app listens on
    /// (loopback or wildcard). Asks the daemon over its socket (starts no pm2 process) and never
    /// reads the apps' environment.
    Init {
        /// The account whose PM2 daemon runs the apps (the user of `pm2 startup`).
        #[arg(long)]
        user: String,
        /// Write the config to FILE (mode 0640, refused if FILE exists unless --force);
        /// default: stdout.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        /// The daemon's PM2_HOME (default: ~USER/.pm2).
        #[arg(long, value_name = "DIR")]
        pm2_home: Option<PathBuf>,
        /// Overwrite FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Lay down the agent, its config, systemd unit, cron backup check, logrotate file and IAM
    /// policies; enable and start the agent. Shows the plan first; re-running is safe.
    Install(InstallArgs),
    /// Stop and disable the agent and remove exactly what install laid down (with several
    /// users' agents on the box: --user says whose; the others keep running).
    Uninstall {
        #[arg(long)]
        root: Option<PathBuf>,
        /// Whose agent to remove (needed when pmguard is installed for several users).
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        dry_run: bool,
        /// Also remove what provision-aws created for this instance alone (alarms, dashboard;
        /// the topic and log group only when no other box uses them; nothing shared in fleet
        /// mode); needs --config.
        #[arg(long)]
        aws: bool,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check every part of the install and say how to fix what is wrong
    /// (exit 0: nothing failed; 1: something failed; 2: doctor could not run).
    Doctor {
        /// The config to check (default: every installed agent's own config).
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        root: Option<PathBuf>,
        /// Check only USER's agent (default: every installed agent).
        #[arg(long)]
        user: Option<String>,
        /// Machine-readable list of checks.
        #[arg(long)]
        json: bool,
    },
    /// Create or update the SNS topic, email subscription, log group, alarms and dashboard
    /// the config asks for (once per fleet with `[aws] fleet`); a second run changes nothing.
    ProvisionAws {
        #[arg(long, short)]
        config: PathBuf,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Delete everything the config owns in AWS (the fleet's alarms, dashboard, topic and
        /// log group); lists it, and deletes only with --yes.
        #[arg(long)]
        destroy: bool,
        /// Confirm --destroy.
        #[arg(long, requires = "destroy")]
        yes: bool,
        /// Delete the old monitor's alarms (PM2-CodeBox-Service-Down, -High-Error-Rate,
        /// -Frequent-Restarts); without it they are only listed.
        #[arg(long)]
        remove_legacy_alarms: bool,
    },
    /// Fleet tools: store the config in SSM Parameter Store; render an instance's bootstrap;
    /// print the IAM policies.
    Fleet {
        #[command(subcommand)]
        command: fleet::FleetCommand,
    },
    /// Print the shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions { shell: Shell },
    /// Write the man pages into DIR (used by dist/build).
    #[command(hide = true)]
    GenerateMan { dir: PathBuf },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(command: Command) -> Result<ExitCode, CliError> {
    match command {
        Command::Init {
            user,
            output,
            pm2_home,
            force,
        } => init(&user, output, pm2_home, force),
        Command::Install(args) => install(args),
        Command::Uninstall {
            root,
            user,
            dry_run,
            aws,
            config,
        } => uninstall(root, user.as_deref(), dry_run).and_then(|code| {
            if !aws {
                return Ok(code);
            }
            let config = config.ok_or(CliError::AwsNeedsConfig)?;
            fleet::uninstall_aws(&config, dry_run)
        }),
        Command::ProvisionAws {
            config,
            dry_run,
            destroy,
            yes,
            remove_legacy_alarms,
        } => fleet::provision(&config, dry_run, destroy, yes, remove_legacy_alarms),
        Command::Fleet { command } => fleet::run(command),
        Command::Doctor {
            config,
            root,
            user,
            json,
        } => doctor(config, root, user, json),
        Command::Completions { shell } => {
            cli::write_completions(shell, &mut Cli::command(), &mut std::io::stdout())
                .map(|()| ExitCode::SUCCESS)
                .map_err(CliError::Completions)
        }
        Command::GenerateMan { dir } => cli::write_man_pages(Cli::command(), &dir)
            .map(|_| ExitCode::SUCCESS)
            .map_err(CliError::ManPages),
    }
}

/// How long install/uninstall wait for another one on the same root.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The root's install lock, held from the first read to the last write (another install or
/// uninstall running: say so, then wait for it, up to `LOCK_WAIT`).
fn lock(root: &Path) -> Result<pmguard_installer::lock::Lock, CliError> {
    use pmguard_installer::lock;
    if let Some(l) = lock::try_lock(root)? {
        return Ok(l);
    }
    eprintln!(
        "Another pmguard install or uninstall is running on {}: waiting for it (up to {} s)...",
        root.display(),
        LOCK_WAIT.as_secs()
    );
    Ok(lock::lock(root, LOCK_WAIT)?)
}

/// Only root can give files their owners; a staging install as a user keeps its own.
fn can_chown() -> bool {
    rustix::process::geteuid().is_root()
}

fn install(args: InstallArgs) -> Result<ExitCode, CliError> {
    let (config, config_text) =
        fleet::load_config(&args.config).map_err(CliError::nothing("installed"))?;
    let staged = args.root.is_some();
    let root = args.root.unwrap_or_else(|| PathBuf::from("/"));
    let (dry_run, replace_legacy) = (args.dry_run, args.replace_legacy);
    let _lock = lock(&root)?;
    let user = args
        .user
        .or_else(|| std::env::var("SUDO_USER").ok().filter(|u| u != "root"))
        .ok_or(CliError::NoUser)?;
    let account = users::lookup(&root, &user)?;
    let agent_binary = agent_binary(&root, args.agent_bin)?;
    let pm2 = pmguard_installer::pm2unit::observe(&root, &account, &config);
    let layout = layout::for_install(&layout::installed(&root)?, &user)?;
    let settings = Settings {
        account,
        config_text,
        agent_binary,
        pm2: pm2.clone(),
        layout: layout.clone(),
    };
    let desired = render::render(&config, &settings)?;
    let systemd = Systemctl { staged };
    let paths: Vec<PathBuf> = desired.iter().map(|f| f.path.clone()).collect();
    let mut observed = plan::observe(&root, &paths, &systemd, &layout)?;
    plan::check_owner(&desired, &observed, &user, args.take_over)?;
    refuse_conflicts(&root, &config, &settings, &observed, staged)?;
    // Only the live system's PM2 can be running (a staging root has none).
    observed.pm2_daemon_live = !staged && pm2_daemon_live(&config, &settings.account);
    observed.user = Some(user.clone());
    let mut plan = plan::plan_install(&desired, &observed, args.force, can_chown());
    if let pmguard_installer::pm2unit::Supervision::Unavailable(why) = &pm2 {
        plan.notes.push(format!(
            "PM2 itself is not under systemd and pmguard cannot put it there: {why}"
        ));
    }
    let legacy = legacy::find(&root);
    plan.notes
        .extend(legacy.iter().map(|l| legacy_note(l, replace_legacy)));
    finish(&plan, &root, &systemd, dry_run)?;
    if replace_legacy && !dry_run && plan.blocked.is_empty() && !legacy.is_empty() {
        for done in legacy::replace(&root, &legacy, &systemd)? {
            outln!("Replaced: {done}");
        }
    }
    if let Some(policy) = pmguard_installer::iam::agent_policy(&config) {
        if !dry_run && plan.blocked.is_empty() {
            outln!(
                "\nAttach this IAM policy to the instance role (also in {}; the policy for whoever runs provision-aws is in {}, never for the instance role):\n{}",
                layout.iam_path().display(),
                layout.iam_admin_path().display(),
                pmguard_installer::iam::to_json(&policy)
            );
        }
    }
    Ok(if plan.blocked.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// What install refuses before writing anything: for a second user's instance, a primary group
/// shared with another account (on a box shared by several PM2 users; the single-user install
/// only warns, so a box installed before this check still upgrades); a state directory,
/// textfile or PM2_HOME another install's agent uses.
fn refuse_conflicts(
    root: &Path,
    config: &pmguard_agent::config::Config,
    settings: &Settings,
    observed: &plan::Observed,
    staged: bool,
) -> Result<(), CliError> {
    let account = &settings.account;
    match (users::private_group(root, account), &settings.layout) {
        (Err(e), Layout::Instance(_)) => return Err(e.into()),
        (Err(e), Layout::Single) => eprintln!("warning: {e}"),
        (Ok(()), _) => {}
    }
    plan::check_shared_paths(config, &account.user, observed)?;
    let home = render::pm2_home(config, account);
    plan::check_pm2_home(root, &home, account, observed, !staged)?;
    Ok(())
}

/// The agent binary's bytes to install, `None` when the package's agent runs in place. It
/// defaults to `pmguard-agent` beside this binary.
fn agent_binary(root: &Path, agent_bin: Option<PathBuf>) -> Result<Option<Vec<u8>>, CliError> {
    let agent_bin = match agent_bin {
        Some(p) => p,
        None => std::env::current_exe()
            .map_err(CliError::CurrentExe)?
            .with_file_name("pmguard-agent"),
    };
    if is_packaged_agent(root, &agent_bin) {
        return Ok(None);
    }
    std::fs::read(&agent_bin)
        .map(Some)
        .map_err(|source| CliError::AgentBinary {
            path: agent_bin,
            source,
        })
}

/// A PM2 daemon runs for `account` if its pid file says so, or if anything answers on its
/// socket (a missing pid file must never let `pm2 resurrect` meet a live daemon).
fn pm2_daemon_live(config: &pmguard_agent::config::Config, account: &users::Account) -> bool {
    let pm2_paths = pmguard_agent::pm2::Pm2Paths::from_home(&render::pm2_home(config, account));
    !matches!(
        pmguard_agent::pm2::liveness::daemon_process(&pm2_paths, Path::new("/proc")),
        pmguard_agent::pm2::liveness::DaemonProcess::None
    ) || std::os::unix::net::UnixStream::connect(&pm2_paths.rpc).is_ok()
}

/// What install says about another monitor it found.
fn legacy_note(l: &legacy::Legacy, replace_legacy: bool) -> String {
    if replace_legacy {
        format!("Another monitor will be stopped (--replace-legacy; uninstall puts it back): {l}")
    } else {
        format!("Another monitor restarts PM2 apps here: {l}. Two monitors restarting one app fight each other: re-run with --replace-legacy to stop it (uninstall puts it back).")
    }
}

/// The agent is the package's (`/usr/bin/pmguard-agent` under the root): run it in place, copy
/// nothing, so the package manager alone owns, upgrades and removes it.
fn is_packaged_agent(root: &Path, agent_bin: &Path) -> bool {
    let packaged = render::under(root, Path::new(render::PACKAGED_AGENT_PATH));
    match (agent_bin.canonicalize(), packaged.canonicalize()) {
        (Ok(a), Ok(p)) => a == p,
        _ => false,
    }
}

fn uninstall(
    root: Option<PathBuf>,
    user: Option<&str>,
    dry_run: bool,
) -> Result<ExitCode, CliError> {
    let staged = root.is_some();
    let root = root.unwrap_or_else(|| PathBuf::from("/"));
    let _lock = lock(&root)?;
    let systemd = Systemctl { staged };
    let installed = layout::installed(&root)?;
    let chosen = layout::for_user(&installed, user)?;
    let layout = match chosen.as_slice() {
        [] => Layout::Single,
        [one] => one.layout.clone(),
        _ => {
            return Err(pmguard_installer::Error::WhichUser {
                installed: layout::names(&installed),
            }
            .into())
        }
    };
    // First, while the record in /etc/pmguard is still there: what --replace-legacy stopped
    // (with the last agent only: the monitor it replaced watched every user's apps).
    if installed.len() <= 1 {
        for done in legacy::restore(&root, &systemd, dry_run)? {
            outln!("Put back: {done}");
        }
    }
    let observed = plan::observe(&root, &[], &systemd, &layout)?;
    let plan = plan::plan_uninstall(&observed);
    finish(&plan, &root, &systemd, dry_run)?;
    Ok(ExitCode::SUCCESS)
}

fn finish(plan: &Plan, root: &Path, systemd: &Systemctl, dry_run: bool) -> Result<(), CliError> {
    out!("{}", plan::display(plan));
    if !plan.blocked.is_empty() {
        outln!("Nothing was changed.");
        return Ok(());
    }
    if dry_run || plan.is_empty() {
        return Ok(());
    }
    plan::apply(plan, root, systemd, can_chown())?;
    outln!("Done.");
    Ok(())
}

fn init(
    user: &str,
    output: Option<PathBuf>,
    pm2_home: Option<PathBuf>,
    force: bool,
) -> Result<ExitCode, CliError> {
    use pmguard_installer::init;
    // With --pm2-home the account is only a label: its passwd entry is not needed.
    let default_home = users::lookup(Path::new("/"), user).map(|a| a.home.join(".pm2"));
    let (home, default_home) = match (pm2_home, default_home) {
        (Some(h), d) => (h, d.ok()),
        (None, Ok(h)) => (h.clone(), Some(h)),
        (None, Err(e)) => return Err(e.into()),
    };
    let header = init::Header {
        user: user.to_string(),
        file: output
            .as_ref()
            .map_or_else(|| "FILE".to_string(), |p| p.display().to_string()),
        pm2_home: (default_home.as_ref() != Some(&home)).then(|| home.clone()),
    };
    let text = init::run(user, &home, &header, Path::new("/proc"))?;
    let Some(path) = output else {
        out!("{text}");
        return Ok(ExitCode::SUCCESS);
    };
    if path.exists() && !force {
        return Err(CliError::OutputExists { path });
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| CliError::Write {
            op: "cannot create",
            path: dir.to_path_buf(),
            source,
        })?;
    }
    pmguard_agent::sys::files::write_atomic(&path, text.as_bytes(), 0o640, true).map_err(
        |source| CliError::Write {
            op: "cannot write",
            path: path.clone(),
            source,
        },
    )?;
    let apps = text.matches("\n[[apps]]\n").count();
    let probed = text
        .lines()
        .filter(|l| l.starts_with("health_url = "))
        .count();
    eprintln!(
        "Wrote {}: {apps} app(s), {probed} with a health_url. Check each health_url, then:\n  pmguard-agent validate --config {0}\n  sudo pmguard install --config {0} --user {user}",
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn doctor(
    config_path: Option<PathBuf>,
    root: Option<PathBuf>,
    user: Option<String>,
    json: bool,
) -> Result<ExitCode, CliError> {
    use pmguard_installer::doctor;
    let live = root.is_none();
    let root = root.unwrap_or_else(|| PathBuf::from("/"));
    let installed = layout::installed(&root)?;
    let targets = doctor_targets(&root, config_path, user.as_deref(), &installed)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    let mut checks = Vec::new();
    for (config_path, layout) in &targets {
        let target = doctor::Target {
            root: &root,
            config_path,
            live,
            user: user.clone(),
            layout: layout.clone(),
        };
        let (mut these, config) = doctor::local_checks(&target);
        if let Some(config) = &config {
            these.extend(runtime.block_on(doctor::aws_checks(config)));
        }
        let unit = layout.unit_name();
        checks.extend(these.into_iter().map(|mut c| {
            c.unit = Some(unit.clone());
            c
        }));
    }
    if json {
        outln!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        out!("{}", doctor::table(&checks));
    }
    Ok(if doctor::failed(&checks) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Which configs doctor checks: `--config` alone, judged against the install whose config it
/// is (else `--user`'s, else the single-user layout's); else every installed agent's own (only
/// `--user`'s with it, an error when `--user` has none); on a box with none, the default
/// config. Every path is under the root.
fn doctor_targets(
    root: &Path,
    config: Option<PathBuf>,
    user: Option<&str>,
    installed: &[layout::Installed],
) -> Result<Vec<(PathBuf, Layout)>, CliError> {
    if let Some(c) = config {
        let same = |i: &&layout::Installed| {
            let theirs = render::under(root, &i.layout.config_path()).canonicalize();
            matches!((c.canonicalize(), theirs), (Ok(a), Ok(b)) if a == b)
        };
        let layout = installed
            .iter()
            .find(same)
            .or_else(|| {
                installed
                    .iter()
                    .find(|i| user.is_some() && i.user.as_deref() == user)
            })
            .map_or(Layout::Single, |i| i.layout.clone());
        return Ok(vec![(c, layout)]);
    }
    let chosen = layout::for_user(installed, user)?;
    if chosen.is_empty() {
        return Ok(vec![(
            render::under(root, Path::new(render::CONFIG_PATH)),
            Layout::Single,
        )]);
    }
    Ok(chosen
        .into_iter()
        .map(|i| (render::under(root, &i.layout.config_path()), i.layout))
        .collect())
}
