//! `pmguard`: the installer CLI. Renders plans and errors; the work is in `pmguard-installer`.
//! Exit codes: 0 ok (or nothing to do); 1 blocked, drift or checks failed; 2 error.

mod fleet;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pmguard_installer::plan::{self, Plan};
use pmguard_installer::render::{self, Settings};
use pmguard_installer::systemd::Systemctl;
use pmguard_installer::users;

#[derive(Parser)]
#[command(
    name = "pmguard",
    version,
    about = "Install, provision and check pmguard."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Lay down the agent, its config, systemd unit, cron backup check, logrotate file and IAM
    /// policies; enable and start the agent. Shows the plan first; re-running is safe.
    Install {
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
        /// Replace a config file that was edited since pmguard installed it.
        #[arg(long)]
        force: bool,
        /// The agent binary to install (default: pmguard-agent next to this program).
        #[arg(long)]
        agent_bin: Option<PathBuf>,
    },
    /// Stop and disable the agent and remove exactly what install laid down.
    Uninstall {
        #[arg(long)]
        root: Option<PathBuf>,
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
        #[arg(long, short, default_value = "/etc/pmguard/pmguard.toml")]
        config: PathBuf,
        #[arg(long)]
        root: Option<PathBuf>,
        /// The account that runs PM2 (default: the unit's User=).
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
    },
    /// Fleet tools: store the config in SSM Parameter Store; render an instance's bootstrap;
    /// print the IAM policies.
    Fleet {
        #[command(subcommand)]
        command: fleet::FleetCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Install {
            config,
            root,
            dry_run,
            user,
            force,
            agent_bin,
        } => install(&config, root, dry_run, user, force, agent_bin),
        Command::Uninstall {
            root,
            dry_run,
            aws,
            config,
        } => uninstall(root, dry_run).and_then(|code| {
            if !aws {
                return Ok(code);
            }
            let config = config.ok_or("--aws needs --config (to know the names to remove)")?;
            fleet::uninstall_aws(&config, dry_run)
        }),
        Command::ProvisionAws {
            config,
            dry_run,
            destroy,
            yes,
        } => fleet::provision(&config, dry_run, destroy, yes),
        Command::Fleet { command } => fleet::run(command),
        Command::Doctor {
            config,
            root,
            user,
            json,
        } => doctor(&config, root, user, json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Only root can give files their owners; a staging install as a user keeps its own.
fn can_chown() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn install(
    config_path: &Path,
    root: Option<PathBuf>,
    dry_run: bool,
    user: Option<String>,
    force: bool,
    agent_bin: Option<PathBuf>,
) -> Result<ExitCode, String> {
    let (config, config_text) =
        fleet::load_config(config_path).map_err(|e| format!("{e}\nNothing was installed."))?;
    let staged = root.is_some();
    let root = root.unwrap_or_else(|| PathBuf::from("/"));
    let user = user
        .or_else(|| std::env::var("SUDO_USER").ok().filter(|u| u != "root"))
        .ok_or("which account runs PM2? pass --user USER (the user of `pm2 startup`)")?;
    let account = users::lookup(&root, &user)?;
    let agent_bin = match agent_bin {
        Some(p) => p,
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("pmguard-agent"),
    };
    let agent_binary = std::fs::read(&agent_bin).map_err(|e| {
        format!(
            "cannot read the agent binary {}: {e} (pass --agent-bin)",
            agent_bin.display()
        )
    })?;
    let pm2 = pmguard_installer::pm2unit::observe(&root, &account, &config);
    let settings = Settings {
        account,
        config_text,
        agent_binary,
        pm2: pm2.clone(),
    };
    let desired = render::render(&config, &settings).map_err(|e| e.to_string())?;
    let systemd = Systemctl { staged };
    let paths: Vec<PathBuf> = desired.iter().map(|f| f.path.clone()).collect();
    let mut observed = plan::observe(&root, &paths, &systemd)?;
    // Only the live system's PM2 can be running (a staging root has none).
    // A daemon counts as running if its pid file says so, or if anything answers on its socket
    // (a missing pid file must never let `pm2 resurrect` meet a live daemon).
    let pm2_paths =
        pmguard_agent::pm2::Pm2Paths::from_home(&render::pm2_home(&config, &settings.account));
    observed.pm2_daemon_live = !staged
        && (!matches!(
            pmguard_agent::pm2::liveness::daemon_process(&pm2_paths, Path::new("/proc")),
            pmguard_agent::pm2::liveness::DaemonProcess::None
        ) || std::os::unix::net::UnixStream::connect(&pm2_paths.rpc).is_ok());
    let mut plan = plan::plan_install(&desired, &observed, force, can_chown());
    if let pmguard_installer::pm2unit::Supervision::Unavailable(why) = &pm2 {
        plan.notes.push(format!(
            "PM2 itself is not under systemd and pmguard cannot put it there: {why}"
        ));
    }
    finish(&plan, &root, &systemd, dry_run)?;
    if let Some(policy) = pmguard_installer::iam::agent_policy(&config) {
        if !dry_run && plan.blocked.is_empty() {
            println!(
                "\nAttach this IAM policy to the instance role (also in {}; the policy for whoever runs provision-aws is in {}, never for the instance role):\n{}",
                render::IAM_PATH,
                render::IAM_ADMIN_PATH,
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

fn uninstall(root: Option<PathBuf>, dry_run: bool) -> Result<ExitCode, String> {
    let staged = root.is_some();
    let root = root.unwrap_or_else(|| PathBuf::from("/"));
    let systemd = Systemctl { staged };
    let observed = plan::observe(&root, &[], &systemd)?;
    let plan = plan::plan_uninstall(&observed);
    finish(&plan, &root, &systemd, dry_run)?;
    Ok(ExitCode::SUCCESS)
}

fn finish(plan: &Plan, root: &Path, systemd: &Systemctl, dry_run: bool) -> Result<(), String> {
    print!("{}", plan::display(plan));
    if !plan.blocked.is_empty() {
        println!("Nothing was changed.");
        return Ok(());
    }
    if dry_run || plan.is_empty() {
        return Ok(());
    }
    plan::apply(plan, root, systemd, can_chown())?;
    println!("Done.");
    Ok(())
}

fn doctor(
    config_path: &Path,
    root: Option<PathBuf>,
    user: Option<String>,
    json: bool,
) -> Result<ExitCode, String> {
    use pmguard_installer::doctor;
    let live = root.is_none();
    let root = root.unwrap_or_else(|| PathBuf::from("/"));
    let target = doctor::Target {
        root: &root,
        config_path,
        live,
        user,
    };
    let (mut checks, config) = doctor::local_checks(&target);
    if let Some(config) = &config {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        checks.extend(runtime.block_on(doctor::aws_checks(config)));
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&checks).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", doctor::table(&checks));
    }
    Ok(if doctor::failed(&checks) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
