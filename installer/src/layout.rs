//! Where one install lives. A box runs one agent per PM2 user (PM2 runs one daemon per user):
//!
//! - `Single`: the layout of every install before several users were supported, kept byte for
//!   byte: `pmguard-agent.service`, `/etc/pmguard/pmguard.toml`, `/etc/cron.d/pmguard`,
//!   `/etc/logrotate.d/pmguard`, `/etc/pmguard/install-manifest.json`. The first install on a
//!   box gets it, and it stays: re-running its install command changes nothing.
//! - `Instance(user)`: every further user, as an instance of the template unit
//!   `pmguard-agent@.service` (`pmguard-agent@alice.service`) with a drop-in for what differs
//!   per user, and its own config, manifest, IAM policies, cron.d and logrotate files.
//!
//! Files every install shares (the agent binary, the template unit) are listed in each
//! manifest that uses them and removed only with the last one. A user name reaches paths, unit
//! names and systemd's `%i`: `instance_name` admits only names that cannot leave a directory.

use std::path::{Path, PathBuf};

use crate::iam;
use crate::manifest::Manifest;
use crate::render::under;
use crate::Error;

pub const AGENT_PATH: &str = "/usr/local/bin/pmguard-agent";
pub const CONFIG_PATH: &str = "/etc/pmguard/pmguard.toml";
pub const UNIT_PATH: &str = "/etc/systemd/system/pmguard-agent.service";
pub const UNIT_NAME: &str = "pmguard-agent.service";
pub const CRON_PATH: &str = "/etc/cron.d/pmguard";
pub const LOGROTATE_PATH: &str = "/etc/logrotate.d/pmguard";
pub const MANIFEST_PATH: &str = "/etc/pmguard/install-manifest.json";
/// The template unit every instance runs (`pmguard-agent@<user>.service`).
pub const TEMPLATE_PATH: &str = "/etc/systemd/system/pmguard-agent@.service";
/// Each instance's own directory: config, manifest, IAM policies.
pub const USERS_DIR: &str = "/etc/pmguard/users";
/// The one IAM policy of installs before the agent/admin split: an upgrade replaces it.
const OLD_IAM_PATH: &str = "/etc/pmguard/iam-policy.json";

/// Which install: the single-user layout, or one user's instance.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Layout {
    Single,
    Instance(String),
}

impl Layout {
    /// The instance for `user`, refused when the name could leave a path or break a file
    /// name cron reads.
    pub fn instance(user: &str) -> Result<Layout, Error> {
        instance_name(user)?;
        Ok(Layout::Instance(user.to_string()))
    }

    fn dir(&self) -> Option<PathBuf> {
        match self {
            Layout::Single => None,
            Layout::Instance(u) => Some(Path::new(USERS_DIR).join(u)),
        }
    }

    fn in_dir(&self, single: &str, name: &str) -> PathBuf {
        self.dir()
            .map_or_else(|| PathBuf::from(single), |d| d.join(name))
    }

    pub fn config_path(&self) -> PathBuf {
        self.in_dir(CONFIG_PATH, "pmguard.toml")
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.in_dir(MANIFEST_PATH, "install-manifest.json")
    }

    pub fn iam_path(&self) -> PathBuf {
        self.in_dir(iam::AGENT_POLICY_PATH, "iam-agent-policy.json")
    }

    pub fn iam_admin_path(&self) -> PathBuf {
        self.in_dir(iam::ADMIN_POLICY_PATH, "iam-admin-policy.json")
    }

    /// The unit systemd runs: `pmguard-agent.service` or `pmguard-agent@<user>.service`.
    pub fn unit_name(&self) -> String {
        match self {
            Layout::Single => UNIT_NAME.to_string(),
            Layout::Instance(u) => format!("pmguard-agent@{u}.service"),
        }
    }

    /// The file that holds this install's own unit settings: the whole unit, or the
    /// instance's drop-in beside the shared template.
    pub fn unit_path(&self) -> PathBuf {
        match self {
            Layout::Single => PathBuf::from(UNIT_PATH),
            Layout::Instance(u) => PathBuf::from(format!(
                "/etc/systemd/system/pmguard-agent@{u}.service.d/pmguard.conf"
            )),
        }
    }

    pub fn cron_path(&self) -> PathBuf {
        match self {
            Layout::Single => PathBuf::from(CRON_PATH),
            Layout::Instance(u) => PathBuf::from(format!("{CRON_PATH}-{u}")),
        }
    }

    pub fn logrotate_path(&self) -> PathBuf {
        match self {
            Layout::Single => PathBuf::from(LOGROTATE_PATH),
            Layout::Instance(u) => PathBuf::from(format!("{LOGROTATE_PATH}-{u}")),
        }
    }

    /// The journal tag of the cron backup check.
    pub fn cron_tag(&self) -> String {
        match self {
            Layout::Single => "pmguard-check".to_string(),
            Layout::Instance(u) => format!("pmguard-check-{u}"),
        }
    }

    /// PM2 itself under systemd, where `pm2 startup` was never run.
    pub fn pm2_unit_name(&self) -> String {
        match self {
            Layout::Single => crate::pm2unit::PM2_UNIT_NAME.to_string(),
            Layout::Instance(u) => format!("pmguard-pm2-{u}.service"),
        }
    }

    pub fn pm2_unit_path(&self) -> PathBuf {
        Path::new("/etc/systemd/system").join(self.pm2_unit_name())
    }

    /// Every file this install may lay down: the only paths its manifest may name.
    pub fn owned_files(&self) -> Vec<PathBuf> {
        let mut v = vec![
            PathBuf::from(AGENT_PATH),
            self.config_path(),
            self.unit_path(),
            self.cron_path(),
            self.logrotate_path(),
            self.iam_path(),
            self.iam_admin_path(),
            self.pm2_unit_path(),
        ];
        match self {
            Layout::Single => v.push(PathBuf::from(OLD_IAM_PATH)),
            Layout::Instance(_) => v.push(PathBuf::from(TEMPLATE_PATH)),
        }
        v
    }

    /// Files other installs may list too: removed only when no other manifest does.
    pub fn is_shared(path: &Path) -> bool {
        path == Path::new(AGENT_PATH) || path == Path::new(TEMPLATE_PATH)
    }

    /// Directories that exist only for this install's files: recorded in its manifest even when
    /// found already made (an install cut short before its manifest made them), and removed
    /// when empty.
    pub fn own_dirs(&self) -> Vec<PathBuf> {
        match self {
            Layout::Single => Vec::new(),
            Layout::Instance(_) => {
                let mut v = vec![PathBuf::from(USERS_DIR)];
                v.extend(self.dir());
                v.extend(self.unit_path().parent().map(Path::to_path_buf));
                v
            }
        }
    }
}

/// A user name fit for `pmguard-agent@<user>.service`, `%i` in a path, `/etc/cron.d/pmguard-<user>`
/// and `/etc/pmguard/users/<user>`: letters, digits, `_` and `-`, starting with a letter, digit
/// or `_`, at most 32. No `.` (cron ignores a cron.d file whose name has one, and `..` would
/// leave the directory), no `/`, no `%`, no `\` (systemd's escapes).
pub fn instance_name(user: &str) -> Result<(), Error> {
    let ok = !user.is_empty()
        && user.len() <= 32
        && user
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::BadInstanceUser {
            user: user.escape_debug().to_string(),
        })
    }
}

/// One install found on the box.
#[derive(Debug, Clone, PartialEq)]
pub struct Installed {
    pub layout: Layout,
    pub manifest: Manifest,
    /// The PM2 user: the manifest's, else read from what the single-user install laid down
    /// (`single_owner`); the instance's name otherwise.
    pub user: Option<String>,
}

/// Every install under `root`: the single-user layout's manifest and each instance's.
pub fn installed(root: &Path) -> Result<Vec<Installed>, Error> {
    let mut out = Vec::new();
    if let Some(m) = Manifest::read(&under(root, Path::new(MANIFEST_PATH)))? {
        out.push(Installed {
            layout: Layout::Single,
            user: m.user.clone().or_else(|| single_user(root)),
            manifest: m,
        });
    }
    let dir = under(root, Path::new(USERS_DIR));
    let mut names: Vec<String> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    for name in names {
        let Ok(layout) = Layout::instance(&name) else {
            continue;
        };
        if let Some(m) = Manifest::read(&under(root, &layout.manifest_path()))? {
            out.push(Installed {
                layout,
                manifest: m,
                user: Some(name),
            });
        }
    }
    Ok(out)
}

/// Whose install it is, and what says so (for messages).
#[derive(Debug, Clone, PartialEq)]
pub struct Owner {
    pub user: String,
    /// The file that names the user: the manifest, else a file the install laid down.
    pub path: PathBuf,
    /// What in that file names them, e.g. `User=alice`.
    pub how: String,
}

/// The single-user install's PM2 user, read from what it laid down (`single_owner`).
pub fn single_user(root: &Path) -> Option<String> {
    single_owner(root).map(|o| o.user)
}

/// Who the single-user install runs as, for a manifest that does not say (written before the
/// user was recorded, or with no usable name) or is gone: the first of its unit's `User=`, its
/// PM2 unit's `User=`, its cron line's user, its logrotate `su`, and the account whose home
/// holds its config's `pm2_home`. Files are read without following a symlink; a value that is
/// no plain account name (`plain_name`) names nobody.
pub fn single_owner(root: &Path) -> Option<Owner> {
    let read = |path: &str| {
        let bytes = pmguard_agent::sys::files::read_capped(&under(root, Path::new(path)), 1 << 20);
        bytes
            .ok()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    let owner = |path: &str, how: &str, user: Option<String>| {
        user.filter(|u| plain_name(u)).map(|user| Owner {
            how: how.replace("{}", &user),
            user,
            path: PathBuf::from(path),
        })
    };
    let unit_user = |text: String| {
        text.lines()
            .find_map(|l| l.strip_prefix("User="))
            .map(str::to_string)
    };
    let pm2_unit = crate::pm2unit::PM2_UNIT_PATH;
    owner(UNIT_PATH, "User={}", read(UNIT_PATH).and_then(unit_user))
        .or_else(|| owner(pm2_unit, "User={}", read(pm2_unit).and_then(unit_user)))
        .or_else(|| {
            let user = read(CRON_PATH).and_then(|t| cron_user(&t));
            owner(CRON_PATH, "its job runs as {}", user)
        })
        .or_else(|| {
            let user = read(LOGROTATE_PATH).and_then(|t| {
                t.lines()
                    .find_map(|l| l.trim().strip_prefix("su "))
                    .and_then(|rest| rest.split_whitespace().next().map(str::to_string))
            });
            owner(LOGROTATE_PATH, "su {}", user)
        })
        .or_else(|| {
            let text = read(CONFIG_PATH)?;
            let config =
                pmguard_agent::config::Config::parse(Path::new(CONFIG_PATH), &text).ok()?;
            let home = config.agent.pm2_home?;
            let how = format!("pm2_home = \"{}\", in {{}}'s home", home.display());
            owner(CONFIG_PATH, &how, crate::users::home_owner(root, &home))
        })
}

/// The user field of a cron.d file's first job (`m h dom mon dow user command`, or
/// `@daily user command`).
fn cron_user(text: &str) -> Option<String> {
    let job: Vec<&str> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| {
            f.first()
                .is_some_and(|w| !w.starts_with('#') && !w.contains('='))
        })?;
    let at = if job[0].starts_with('@') { 1 } else { 5 };
    job.get(at).map(|u| (*u).to_string())
}

/// A name systemd, cron and logrotate take as one account, as it is: letters, digits, `_`, `-`
/// and `.`, at most 32, not starting with `-`. Anything else read where a user should be (a
/// tampered manifest, an edited unit) names nobody.
pub fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// The layout `install --user USER` uses: the install `user` already has, else the
/// single-user layout on a box with no install yet (or with one whose user is unknown: an old
/// install cut short before its unit was written, which this one completes; `plan::check_owner`
/// refuses it where that would change anything the unknown user's install laid down), else a
/// new instance.
pub fn for_install(installed: &[Installed], user: &str) -> Result<Layout, Error> {
    if let Some(i) = installed.iter().find(|i| i.user.as_deref() == Some(user)) {
        return Ok(i.layout.clone());
    }
    let unknown_single = installed
        .iter()
        .any(|i| i.layout == Layout::Single && i.user.is_none());
    if installed.is_empty() || unknown_single {
        return Ok(Layout::Single);
    }
    Layout::instance(user)
}

/// The install `uninstall`/`doctor` act on: `user`'s, or the only one.
pub fn for_user(installed: &[Installed], user: Option<&str>) -> Result<Vec<Installed>, Error> {
    match user {
        Some(u) => match installed.iter().find(|i| i.user.as_deref() == Some(u)) {
            Some(i) => Ok(vec![i.clone()]),
            None => Err(Error::NotInstalledFor {
                user: u.to_string(),
                installed: names(installed),
            }),
        },
        None => Ok(installed.to_vec()),
    }
}

/// "alice, bob" for messages.
pub fn names(installed: &[Installed]) -> String {
    let v: Vec<String> = installed
        .iter()
        .map(|i| i.user.clone().unwrap_or_else(|| "?".into()))
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_name_that_could_leave_a_path_is_refused() {
        for bad in [
            "",
            "..",
            ".",
            ".x",
            "a.b",
            "a/b",
            "-rf",
            "a%i",
            "a\\x2d",
            "a b",
            "a:b",
            "a@b",
            "abcdefghijklmnopqrstuvwxyz0123456",
        ] {
            assert!(Layout::instance(bad).is_err(), "{bad:?}");
        }
        for good in ["alice", "bob", "svc_web", "web-2", "_deploy", "u1000"] {
            assert!(Layout::instance(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn the_single_installs_user_is_read_from_its_unit_then_pm2_unit_cron_logrotate_and_config() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for d in [
            "etc/systemd/system",
            "etc/cron.d",
            "etc/logrotate.d",
            "etc/pmguard",
        ] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        std::fs::write(
            r.join("etc/passwd"),
            "root:x:0:0::/:/bin/sh\nalice:x:1001:1001::/home/alice:/bin/sh\n",
        )
        .unwrap();
        let write =
            |path: &str, text: &str| std::fs::write(under(r, Path::new(path)), text).unwrap();
        let user = || single_owner(r).map(|o| (o.user, o.how));
        assert_eq!(user(), None);
        write(
            CONFIG_PATH,
            "[agent]\npm2_home = \"/home/alice/.pm2\"\n[[apps]]\nname = \"web\"\nhealth_url = \"http://127.0.0.1:3000/\"\n",
        );
        let (who, how) = user().unwrap();
        assert_eq!(who, "alice");
        assert!(how.contains("/home/alice/.pm2"), "{how}");
        write(
            LOGROTATE_PATH,
            "/var/lib/pmguard/events.jsonl {\n    su bob bob\n}\n",
        );
        assert_eq!(user().unwrap().0, "bob");
        write(
            CRON_PATH,
            "# c\nSHELL=/bin/sh\n*/5 * * * * carol systemd-cat x\n",
        );
        assert_eq!(user().unwrap().0, "carol");
        write(crate::pm2unit::PM2_UNIT_PATH, "[Service]\nUser=dave\n");
        assert_eq!(user().unwrap().0, "dave");
        write(UNIT_PATH, "[Service]\nUser=erin\n");
        assert_eq!(user(), Some(("erin".into(), "User=erin".into())));
        // A value that is no account name names nobody: the next file says.
        write(UNIT_PATH, "[Service]\nUser=../x\n");
        assert_eq!(user().unwrap().0, "dave");
        // Nor is a unit read through a symlink.
        std::fs::remove_file(under(r, Path::new(UNIT_PATH))).unwrap();
        let elsewhere = r.join("elsewhere.service");
        std::fs::write(&elsewhere, "User=mallory\n").unwrap();
        std::os::unix::fs::symlink(&elsewhere, under(r, Path::new(UNIT_PATH))).unwrap();
        assert_eq!(user().unwrap().0, "dave");
    }

    #[test]
    fn an_instance_keeps_its_files_apart_and_shares_only_the_binary_and_template() {
        let a = Layout::instance("alice").unwrap();
        let b = Layout::instance("bob").unwrap();
        let shared: Vec<PathBuf> = a
            .owned_files()
            .into_iter()
            .filter(|p| b.owned_files().contains(p))
            .collect();
        assert_eq!(
            shared,
            vec![PathBuf::from(AGENT_PATH), PathBuf::from(TEMPLATE_PATH)]
        );
        assert!(shared.iter().all(|p| Layout::is_shared(p)));
        assert_eq!(a.unit_name(), "pmguard-agent@alice.service");
        assert_eq!(a.cron_path(), Path::new("/etc/cron.d/pmguard-alice"));
        assert_eq!(
            a.unit_path(),
            Path::new("/etc/systemd/system/pmguard-agent@alice.service.d/pmguard.conf")
        );
        assert_eq!(
            a.config_path(),
            Path::new("/etc/pmguard/users/alice/pmguard.toml")
        );
    }
}
