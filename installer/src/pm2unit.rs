//! PM2 itself under systemd: a killed PM2 daemon must come back in seconds, and the apps at boot
//! without waiting for cron. `pm2 startup` does that with `pm2-<user>.service`; where it was
//! never run, `install` lays down `pmguard-pm2.service`, the same shape, running the PM2 found
//! on the box. Which of the two applies is observed here (the rendering stays pure).

use std::path::{Path, PathBuf};

use pmguard_agent::config::Config;

use crate::render::under;
use crate::users::Account;

pub const PM2_UNIT_NAME: &str = "pmguard-pm2.service";
pub const PM2_UNIT_PATH: &str = "/etc/systemd/system/pmguard-pm2.service";

/// Who keeps the PM2 daemon running.
#[derive(Debug, Clone, PartialEq)]
pub enum Supervision {
    /// `pm2 startup` made this unit: pmguard adds nothing.
    Startup { unit: String },
    /// pmguard lays down `pmguard-pm2.service` running this `pm2`.
    Ours { pm2_bin: PathBuf, path_env: String },
    /// No usable `pm2` executable: nothing is laid down, and the plan says why.
    Unavailable(String),
}

impl Supervision {
    /// The unit the agent starts after.
    pub fn unit(&self, user: &str) -> String {
        match self {
            Supervision::Startup { unit } => unit.clone(),
            Supervision::Ours { .. } => PM2_UNIT_NAME.to_string(),
            Supervision::Unavailable(_) => format!("pm2-{user}.service"),
        }
    }
}

const SEARCH: &[&str] = &[
    "/usr/local/bin",
    "/usr/bin",
    "/bin",
    "/usr/local/sbin",
    "/usr/sbin",
];
const BASE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Looks under `root` for `pm2 startup`'s unit, else for the `pm2` to run (the config's
/// `pm2_bin`, found on the usual PATH when it is a bare name).
pub fn observe(root: &Path, account: &Account, config: &Config) -> Supervision {
    let startup = format!("pm2-{}.service", account.user);
    for dir in [
        "/etc/systemd/system",
        "/lib/systemd/system",
        "/usr/lib/systemd/system",
    ] {
        if under(root, &Path::new(dir).join(&startup)).is_file() {
            return Supervision::Startup { unit: startup };
        }
    }
    let wanted = Path::new(&config.agent.pm2_bin);
    let found = if wanted.is_absolute() {
        under(root, wanted).is_file().then(|| wanted.to_path_buf())
    } else {
        SEARCH
            .iter()
            .map(|d| Path::new(d).join(wanted))
            .find(|p| under(root, p).is_file())
    };
    let Some(pm2_bin) = found else {
        return Supervision::Unavailable(format!(
            "no `{}` executable in {} under {}: install PM2 (`npm install -g pm2`) or run `pm2 startup`, then re-run `pmguard install`",
            config.agent.pm2_bin,
            SEARCH.join(", "),
            root.display()
        ));
    };
    let text = pm2_bin.to_string_lossy();
    if !text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'.' | b'+' | b'@'))
    {
        return Supervision::Unavailable(format!(
            "the pm2 path `{}` is not plain enough for a unit file; run `pm2 startup` instead",
            text.escape_debug()
        ));
    }
    let dir = pm2_bin
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let path_env = if BASE_PATH.split(':').any(|p| p == dir) {
        BASE_PATH.to_string()
    } else {
        // nvm and friends: node lives beside pm2.
        format!("{dir}:{BASE_PATH}")
    };
    Supervision::Ours { pm2_bin, path_env }
}
