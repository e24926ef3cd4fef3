//! The CLI's errors: the installer's and the agent's config errors as they are, plus what the
//! commands themselves check (arguments, files they read or write). `main` prints the message
//! after `error: ` and exits 2.

use std::path::PathBuf;

use pmguard_installer::aws::legacy_alarms::LegacyAlarmError;
use pmguard_installer::aws::provision::AwsError;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Installer(#[from] pmguard_installer::Error),
    #[error(transparent)]
    Aws(#[from] AwsError),
    #[error(transparent)]
    LegacyAlarms(#[from] LegacyAlarmError),
    #[error(transparent)]
    Config(#[from] pmguard_agent::config::ConfigError),
    #[error(transparent)]
    Render(#[from] pmguard_installer::render::RenderError),
    #[error(transparent)]
    Init(#[from] pmguard_installer::init::InitError),
    /// The config could not be loaded, so the command changed nothing.
    #[error("{source}\nNothing was {what}.")]
    NothingDone {
        what: &'static str,
        source: Box<CliError>,
    },

    #[error("--aws needs --config (to know the names to remove)")]
    AwsNeedsConfig,
    #[error("which account runs PM2? pass --user USER (the user of `pm2 startup`)")]
    NoUser,
    #[error("the config has no [aws] section: no AWS permission is needed")]
    NoAwsPermissionNeeded,
    #[error("{} has no [aws] section: nothing to provision", path.display())]
    NoAwsSection { path: PathBuf },
    #[error("SSM parameter {name} does not exist in {region}: store it with `pmguard fleet push-config --config FILE --parameter {name}`")]
    NoParameter { name: String, region: String },
    #[error("{}: instance_id is set, so every box of the fleet would report as `{instance}`\n  help: remove instance_id; each box reports its own EC2 instance id\nNothing was stored.", path.display())]
    FixedInstance { path: PathBuf, instance: String },
    #[error("{} exists: pass --force to replace it, or choose another --output", path.display())]
    OutputExists { path: PathBuf },

    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the agent binary {}: {source} (pass --agent-bin)", path.display())]
    AgentBinary {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `op` is what was being done: "cannot create", "cannot write".
    #[error("{op} {}: {source}", path.display())]
    Write {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot find pmguard's own binary (to find pmguard-agent beside it; pass --agent-bin): {0}"
    )]
    CurrentExe(std::io::Error),
    #[error("cannot write completions: {0}")]
    Completions(std::io::Error),
    #[error("cannot write man pages: {0}")]
    ManPages(std::io::Error),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot encode the checks as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl CliError {
    /// Wraps an error that stopped a command before it changed anything.
    pub fn nothing(what: &'static str) -> impl FnOnce(CliError) -> CliError {
        move |e| CliError::NothingDone {
            what,
            source: Box::new(e),
        }
    }
}
