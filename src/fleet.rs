//! The AWS side of the CLI: `provision-aws` (converge, or `--destroy` with `--yes`),
//! `uninstall --aws`, and `pmguard fleet push-config|render|iam`; reading a config from
//! `ssm:NAME`. Prints plans; the work is in `pmguard_installer::aws` and `::bootstrap`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};
use pmguard_agent::config::Config;
use pmguard_installer::aws::{provision, ssm};
use pmguard_installer::bootstrap::{Bootstrap, ConfigSource, Format};

use crate::error::CliError;

#[derive(Subcommand)]
pub enum FleetCommand {
    /// Validate a config and store it in SSM Parameter Store, where `pmguard install --config
    /// ssm:NAME` reads it (admin credentials; a second run with the same file changes nothing).
    PushConfig {
        #[arg(long, short)]
        config: PathBuf,
        /// Parameter name, e.g. /pmguard/<fleet>/config (the instance role may read
        /// /pmguard/<fleet>/*).
        #[arg(long)]
        parameter: String,
        /// Say what would change and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the bootstrap of a new instance: download the package, check its hash, install it,
    /// run `pmguard install`. Safe to run twice on a box.
    Render {
        /// A config file (embedded in the output) or ssm:NAME (read by the box at every run).
        #[arg(long, short)]
        config: String,
        /// Where the box downloads the package (.deb or .tar.gz).
        #[arg(long)]
        package_url: String,
        /// The package's SHA-256 (`sha256sum PACKAGE`).
        #[arg(long)]
        sha256: String,
        /// The account that runs PM2 on the box.
        #[arg(long)]
        user: String,
        #[arg(long, value_enum, default_value = "cloud-init")]
        format: RenderFormat,
    },
    /// Print an IAM policy for the config, with the account in every ARN when given.
    Iam {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, value_enum)]
        role: Role,
        /// The 12-digit AWS account id (default: any account, `*`).
        #[arg(long)]
        account: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Role {
    /// The instance role: exactly what a box calls (iam-agent-policy.json).
    Agent,
    /// Whoever runs provision-aws and push-config (iam-admin-policy.json).
    Admin,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RenderFormat {
    /// EC2 user-data (#cloud-config).
    CloudInit,
    /// An SSM Command document (schemaVersion 2.2) for Run Command or State Manager.
    SsmDocument,
    /// A plain POSIX shell script.
    Shell,
}

pub fn run(command: FleetCommand) -> Result<ExitCode, CliError> {
    match command {
        FleetCommand::PushConfig {
            config,
            parameter,
            dry_run,
        } => push_config(&config, &parameter, dry_run),
        FleetCommand::Iam {
            config,
            role,
            account,
        } => {
            use pmguard_installer::iam;
            let config = Config::load(&config)?;
            let policy = match role {
                Role::Agent => iam::agent_policy(&config),
                Role::Admin => iam::admin_policy(&config),
            }
            .ok_or(CliError::NoAwsPermissionNeeded)?;
            let policy = match account {
                Some(a) => iam::with_account(policy, &a)?,
                None => policy,
            };
            out!("{}", iam::to_json(&policy));
            Ok(ExitCode::SUCCESS)
        }
        FleetCommand::Render {
            config,
            package_url,
            sha256,
            user,
            format,
        } => {
            let source = match config.strip_prefix(ssm::SCHEME) {
                Some(name) => ConfigSource::Parameter(name.to_string()),
                None => {
                    let text =
                        std::fs::read_to_string(&config).map_err(|source| CliError::Read {
                            path: config.clone().into(),
                            source,
                        })?;
                    if let Ok(c) = Config::parse(Path::new(&config), &text) {
                        refuse_fixed_instance(&c, Path::new(&config))?;
                    }
                    ConfigSource::Inline(text)
                }
            };
            let b = Bootstrap::new(&package_url, &sha256, &user, source)?;
            out!(
                "{}",
                b.render(match format {
                    RenderFormat::CloudInit => Format::CloudInit,
                    RenderFormat::SsmDocument => Format::SsmDocument,
                    RenderFormat::Shell => Format::Shell,
                })
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)
}

/// The config and its exact text, from a file or from `ssm:NAME` (Parameter Store, in the
/// region of the SDK chain: AWS_REGION, the profile, IMDS).
pub fn load_config(arg: &Path) -> Result<(Config, String), CliError> {
    let shown = arg.display().to_string();
    let Some(name) = shown.strip_prefix(ssm::SCHEME) else {
        let config = Config::load(arg)?;
        let text = std::fs::read_to_string(arg).map_err(|source| CliError::Read {
            path: arg.to_path_buf(),
            source,
        })?;
        return Ok((config, text));
    };
    ssm::check_name(name)?;
    let text = runtime()?.block_on(async {
        let clients = provision::clients_for(None).await;
        ssm::get(&clients, name)
            .await?
            .ok_or_else(|| CliError::NoParameter {
                name: name.to_string(),
                region: clients.region.clone(),
            })
    })?;
    let config = Config::parse(arg, &text)?;
    Ok((config, text))
}

/// A config meant for every box of a fleet must not fix `instance_id`: every box would report as
/// one, a single contributor to the fleet's alarms and one log stream.
fn refuse_fixed_instance(config: &Config, path: &Path) -> Result<(), CliError> {
    match config.aws.as_ref() {
        Some(aws) if aws.fleet.is_some() && aws.instance_id.is_some() => {
            Err(CliError::FixedInstance {
                path: path.to_path_buf(),
                instance: aws.instance_id.clone().unwrap_or_default(),
            })
        }
        _ => Ok(()),
    }
}

fn push_config(path: &Path, parameter: &str, dry_run: bool) -> Result<ExitCode, CliError> {
    let config = Config::load(path).map_err(|e| CliError::nothing("stored")(e.into()))?;
    let text = std::fs::read_to_string(path).map_err(|source| CliError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    ssm::check_name(parameter)?;
    ssm::tier(&text)?;
    refuse_fixed_instance(&config, path)?;
    if let Some(fleet) = config.aws.as_ref().and_then(|a| a.fleet.as_deref()) {
        let prefix = pmguard_installer::iam::parameter_prefix(fleet);
        if !parameter.starts_with(&prefix) {
            outln!("note: the instance role (iam-agent-policy.json) may read only {prefix}*; grant ssm:GetParameter on {parameter} too, or use {prefix}config");
        }
    }
    runtime()?.block_on(async {
        let clients = provision::clients(&config).await;
        let old = ssm::get(&clients, parameter).await?;
        if old.as_deref() == Some(text.as_str()) {
            outln!(
                "SSM parameter {parameter} ({}): Nothing to do.",
                clients.region
            );
            return Ok(ExitCode::SUCCESS);
        }
        let what = if old.is_some() { "update" } else { "create" };
        outln!(
            "{what} SSM parameter {parameter} ({}) with {}",
            clients.region,
            path.display()
        );
        if dry_run {
            return Ok(ExitCode::SUCCESS);
        }
        ssm::push(&clients, parameter, &text).await?;
        outln!(
            "Done. Boxes converge on it at their next `pmguard install --config ssm:{parameter}`."
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// The instance name provision-aws uses in single-box mode (fleet mode names none).
async fn instance(config: &Config) -> String {
    let aws = config.aws.as_ref();
    match aws.and_then(|a| a.instance_id.clone()) {
        Some(i) => i,
        None if aws.is_some_and(|a| a.fleet.is_some()) => "(fleet)".to_string(),
        None => pmguard_agent::aws::sink::this_instance(),
    }
}

fn load_aws_config(config_path: &Path) -> Result<Config, CliError> {
    let (config, _) = load_config(config_path)?;
    if config.aws.is_none() {
        return Err(CliError::NoAwsSection {
            path: config_path.to_path_buf(),
        });
    }
    Ok(config)
}

fn scope(config: &Config, instance: &str, region: &str) -> String {
    match config.aws.as_ref().and_then(|a| a.fleet.as_deref()) {
        Some(f) => format!("AWS ({region}, fleet {f}):"),
        None => format!("AWS ({region}, instance {instance}):"),
    }
}

/// `provision-aws`: converge; with `destroy`, list what the config owns and delete it when
/// `yes` (exit 1 without it).
pub fn provision(
    config_path: &Path,
    dry_run: bool,
    destroy: bool,
    yes: bool,
    remove_legacy_alarms: bool,
) -> Result<ExitCode, CliError> {
    use pmguard_installer::aws::legacy_alarms;
    let config = load_aws_config(config_path)?;
    runtime()?.block_on(async {
        let clients = provision::clients(&config).await;
        let instance = instance(&config).await;
        let observed = provision::observe(&clients, &config, &instance)
            .await?;
        let steps = if destroy {
            provision::plan_destroy(&config, &instance, &observed)
        } else {
            provision::plan(&config, &instance, &clients.region, &observed)?
        };
        outln!("{}", scope(&config, &instance, &clients.region));
        out!("{}", provision::display(&steps, &observed, &config));
        if destroy {
            for n in provision::destroy_notes(&config, &observed) {
                outln!("{n}");
            }
        }
        // The old monitor's alarms (the seed's names): listed, deleted only when asked.
        // Looked up for a single box (the seed's own set-up), or in a fleet when asked to remove
        // them: a fleet's re-run stays at its few reads.
        let fleet_mode = config.aws.as_ref().is_some_and(|a| a.fleet.is_some());
        let old_alarms = if destroy || (fleet_mode && !remove_legacy_alarms) {
            Vec::new()
        } else {
            legacy_alarms::find(&clients.cw)
                .await?
        };
        for name in &old_alarms {
            if remove_legacy_alarms {
                outln!("delete old alarm {name}");
            } else {
                outln!("note: old monitor's alarm {name} is still there (it watches what the old scripts sent); delete it with --remove-legacy-alarms");
            }
        }
        if !dry_run && remove_legacy_alarms && !old_alarms.is_empty() {
            legacy_alarms::remove(&clients.cw, &old_alarms)
                .await?;
            outln!("Deleted {} old alarm(s).", old_alarms.len());
        }
        if dry_run || steps.is_empty() {
            return Ok(ExitCode::SUCCESS);
        }
        if destroy && !yes {
            outln!(
                "Nothing was deleted: run again with --yes to delete these {} resource(s).",
                steps.len()
            );
            return Ok(ExitCode::from(1));
        }
        let calls = provision::apply(&clients, &steps)
            .await?;
        outln!("Done: {calls} change(s) applied.");
        Ok(ExitCode::SUCCESS)
    })
}

/// `uninstall --aws`: what belongs to this box alone (nothing shared, nothing in fleet mode).
pub fn uninstall_aws(config_path: &Path, dry_run: bool) -> Result<ExitCode, CliError> {
    let config = load_aws_config(config_path)?;
    runtime()?.block_on(async {
        let clients = provision::clients(&config).await;
        let instance = match config.aws.as_ref().and_then(|a| a.instance_id.clone()) {
            Some(i) => i,
            None => pmguard_agent::aws::sink::this_instance(),
        };
        let fleet = config.aws.as_ref().is_some_and(|a| a.fleet.is_some());
        let (observed, sharing) = if fleet {
            Default::default()
        } else {
            let observed = provision::observe(&clients, &config, &instance).await?;
            let sharing =
                provision::observe_sharing(&clients, &config, &instance, &observed).await?;
            (observed, sharing)
        };
        let (steps, notes) = provision::plan_removal(&config, &instance, &observed, &sharing);
        outln!("AWS ({}, instance {instance}):", clients.region);
        out!("{}", provision::display(&steps, &observed, &config));
        for n in &notes {
            outln!("{n}");
        }
        if dry_run || steps.is_empty() {
            return Ok(ExitCode::SUCCESS);
        }
        let calls = provision::apply(&clients, &steps).await?;
        outln!("Done: {calls} change(s) applied.");
        Ok(ExitCode::SUCCESS)
    })
}
