//! The installer's errors: one enum for the crate, each variant carrying what the user needs to
//! act on it (the path, the user, the command and its stderr, the alarm).
//!
//! One enum rather than one per module: the modules call each other (`plan` reads the manifest,
//! runs systemd, checks users), and the one consumer (the `pmguard` binary) only renders the
//! message, so per-module enums would add a ladder of `From` conversions without telling the
//! caller anything more. AWS calls keep their own [`AwsError`](crate::aws::provision::AwsError)
//! (call, detail, fix) and `LegacyAlarmError`: those edges are async SDK calls, apart from this.

use std::path::PathBuf;
use std::process::ExitStatus;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or inspecting a path failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Doing `op` (create, chmod, remove, write, cannot read) to a path failed.
    #[error("{op} {}: {source}", path.display())]
    Apply {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: no parent directory", path.display())]
    NoParent { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },

    // Paths pmguard will not write through.
    #[error("{} is a symlink: pmguard will not write through it; remove it and re-run", path.display())]
    SymlinkFile { path: PathBuf },
    #[error("{} is a symlink: pmguard will not write through it; replace it with a directory and re-run", path.display())]
    SymlinkDir { path: PathBuf },
    #[error("{}: not a normal path; pmguard will not follow it", path.display())]
    NotNormalPath { path: PathBuf },
    #[error("{} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("{} is owned by uid {uid} with mode {mode:04o}: only root may be able to write the directories pmguard installs into; run `chown root:root {} && chmod go-w {}`", path.display(), path.display(), path.display())]
    WritableByOthers { path: PathBuf, uid: u32, mode: u32 },

    // The install manifest.
    #[error("{}: {source} (move it aside and re-run)", path.display())]
    ManifestUnreadable {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{} lists {}, which pmguard never installs: the manifest was edited by hand or tampered with; move it aside and re-run `pmguard install`", manifest.display(), file.display())]
    ManifestForeignFile { manifest: PathBuf, file: PathBuf },
    #[error("{} lists the directory {}, which pmguard never creates: move the manifest aside and re-run `pmguard install`", manifest.display(), dir.display())]
    ManifestForeignDir { manifest: PathBuf, dir: PathBuf },

    // The PM2 user's account.
    #[error("user `{user}` is not in {}: pass --user with the account that runs PM2 (see `pm2 startup`)", passwd.display())]
    UnknownUser { user: String, passwd: PathBuf },
    #[error("{}: bad {field} for {user}", passwd.display())]
    BadId {
        passwd: PathBuf,
        field: &'static str,
        user: String,
    },
    #[error("user `{user}` is root: run PM2 and pmguard as an unprivileged user")]
    RootUser { user: String },

    #[error("another pmguard install or uninstall is running on {} (waited {waited_s} s for it): run this again when it is done", root.display())]
    Locked { root: PathBuf, waited_s: u64 },

    #[error("user `{user}`'s primary group `{group}` is shared with {others}: they could read {user}'s config (notify URLs are secrets), state and events; give {user} a private group: sudo groupadd {user} && sudo usermod -g {user} {user}")]
    SharedGroup {
        user: String,
        group: String,
        others: String,
    },

    #[error("PM2_HOME {} is owned by uid {uid}, not by {user}: the agent would watch and restart another account's PM2 apps; set [agent] pm2_home to {user}'s own PM2 home", path.display())]
    Pm2HomeNotOwned {
        path: PathBuf,
        uid: u32,
        user: String,
    },

    // Several users on one box.
    #[error("user `{user}` cannot name an agent instance (pmguard-agent@{user}.service, /etc/cron.d/pmguard-{user}): a second user's name may hold only letters, digits, `_` and `-`, start with a letter, digit or `_`, and be at most 32 long")]
    BadInstanceUser { user: String },
    #[error("pmguard is not installed for user `{user}` here (installed for: {installed}); pass --user with one of those")]
    NotInstalledFor { user: String, installed: String },
    #[error("pmguard is installed here for several users ({installed}): pass --user to say which one to uninstall")]
    WhichUser { installed: String },
    #[error("{evidence} says the single-user install here is `{other}`'s, and installing for {user} would replace {files}: --force never hands one user's agent to another. Re-run {other}'s own install first (sudo pmguard install --user {other} --config /etc/pmguard/pmguard.toml), which records it, and {user}'s install becomes an agent of its own; or, if {other}'s agent is gone for good, remove those files by hand")]
    OwnedByOther {
        /// The file and what in it names the user, e.g. `/etc/...service (User=alice)`.
        evidence: String,
        other: String,
        user: String,
        files: String,
    },
    #[error("{} records a pmguard install but not whose (no user in it, nor in its unit, cron line or config), and installing for {user} would replace {files}, which may be another user's agent: --force does not decide that. If that install is {user}'s, re-run with --take-over. If it is another user's, re-run that user's install with --take-over first (then {user}'s becomes an agent of its own), or remove it with `sudo pmguard uninstall`", manifest.display())]
    UnknownOwner {
        manifest: PathBuf,
        user: String,
        files: String,
    },
    #[error("{what} {} is already used by {other}'s agent (its {theirs}): two agents can neither share a directory nor nest one in the other (uninstalling the outer one deletes the inner one); {fix}", path.display())]
    SharedPath {
        what: &'static str,
        path: PathBuf,
        theirs: String,
        other: String,
        fix: String,
    },

    // systemd.
    #[error("cannot run systemctl: {0}")]
    SystemctlSpawn(std::io::Error),
    #[error("{command} failed ({status}): {stderr}")]
    SystemctlFailed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },

    // The record of replaced monitors (`--replace-legacy`).
    #[error("{}: {source} (the record of replaced monitors; fix or remove it)", path.display())]
    LegacyRecord {
        path: PathBuf,
        source: serde_json::Error,
    },

    // Values checked before they go anywhere.
    /// Every problem found at once, one per line.
    #[error("{}", problems.join("\n"))]
    Invalid { problems: Vec<String> },
    #[error("parameter name `{name}` must be 1 to 1011 of A-Z a-z 0-9 _ . - /, e.g. /pmguard/web/config")]
    ParameterNameChars { name: String },
    #[error("parameter name `{name}`: a hierarchy starts with /, e.g. /{name}")]
    ParameterNameHierarchy { name: String },
    #[error("parameter name `{name}` may not start with aws or ssm (reserved)")]
    ParameterNameReserved { name: String },
    #[error("the config is {bytes} bytes; a parameter holds at most {max} (Advanced tier)")]
    ParameterTooLarge { bytes: usize, max: usize },
    #[error("account `{account}` must be the 12-digit AWS account id")]
    AccountId { account: String },

    // AWS definitions.
    #[error("the config has no [aws] section: nothing to provision")]
    NoAwsSection,
    #[error("alarm {alarm}: {why}")]
    Alarm { alarm: String, why: String },
    #[error("app `{app}`: fleet alarms quote the app name in a Metrics Insights query; rename the PM2 app without quotes or backslashes")]
    QuotedAppName { app: String },
    #[error("{ours} Metrics Insights alarms for this fleet (3 per app) plus {others} already in the account exceed AWS's {max} per account and Region: watch fewer apps per fleet or ask AWS for a higher quota")]
    InsightsQuota {
        ours: usize,
        others: usize,
        max: usize,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }

    pub(crate) fn apply(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Apply { op, path, source }
    }
}
