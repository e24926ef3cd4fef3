//! Never act as root on PM2's behalf: a pmguard process started as root (a person's `sudo
//! pmguard-agent check --once`, a root crontab) becomes PM2_HOME's owner before it does anything.
//!
//! Run as root, `pm2 resurrect` against another user's PM2_HOME starts a root PM2 daemon and
//! the user's apps as root, and every file pmguard writes in the state directory ends up
//! root-owned, after which the real agent (running as the user) fails with EACCES. Dropping the
//! whole process to the owner's uid, gid and groups up front rules out both.
//! Invariants: called before any thread starts; after it returns Ok the process can never
//! regain root (real, effective and saved ids all changed, verified).

use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::unistd::{Gid, Uid};

/// Why pmguard will not act for a PM2_HOME, or could not become its owner.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum PrivilegeError {
    #[error("PM2_HOME {home}: {why}; pmguard will not act for a PM2 whose owner it cannot tell for sure")]
    UntrustedHome { home: String, why: String },
    #[error("uid {uid} has no passwd entry")]
    NoUser { uid: u32 },
    #[error("uid {uid} has no passwd entry (it owns PM2_HOME {home}): pmguard will not act as a user it cannot name")]
    Unnamed { uid: u32, home: String },
    #[error("user name has a NUL byte")]
    NulName,
    #[error("{call}: {source}")]
    Syscall { call: String, source: nix::Error },
    #[error("could not drop root privileges")]
    StillRoot,
}

/// The owner of PM2_HOME, judged without following links: the home itself must be a real
/// directory writable by its owner alone, and every directory above it must be root's or the
/// owner's and writable by nobody else (a sticky directory like /tmp aside). Otherwise anyone
/// who can swap the path (a symlink from the user's home to a root-owned directory, a dump.pm2
/// planted in it) could choose whose PM2 pmguard starts, and as whom.
pub fn home_owner(pm2_home: &Path) -> Result<u32, PrivilegeError> {
    let refuse = |why: String| {
        Err(PrivilegeError::UntrustedHome {
            home: pm2_home.display().to_string(),
            why,
        })
    };
    let m = match std::fs::symlink_metadata(pm2_home) {
        Ok(m) => m,
        Err(e) => return refuse(format!("cannot be read ({e})")),
    };
    if m.file_type().is_symlink() {
        return refuse("is a symlink (set [agent] pm2_home to the real directory)".into());
    }
    if !m.is_dir() {
        return refuse("is not a directory".into());
    }
    let owner = m.uid();
    // A user's private group (umask 002, as Ubuntu gives its users) may write: it is the user.
    let private_gid = lookup(owner).ok().map(|u| u.gid);
    let group_ok = |gid: u32| Some(gid) == private_gid;
    if m.mode() & 0o002 != 0 || (m.mode() & 0o020 != 0 && !group_ok(m.gid())) {
        return refuse(format!(
            "is writable by others (mode {:04o}); `chmod go-w` it",
            m.mode() & 0o7777
        ));
    }
    let mut dir = pm2_home.parent();
    while let Some(d) = dir {
        let Ok(dm) = std::fs::symlink_metadata(d) else {
            return refuse(format!("{} cannot be read", d.display()));
        };
        let sticky = dm.mode() & 0o1000 != 0;
        if dm.file_type().is_symlink() {
            return refuse(format!("{} on the way is a symlink", d.display()));
        }
        let others_write = dm.mode() & 0o002 != 0 && !sticky;
        let group_write = dm.mode() & 0o020 != 0 && dm.gid() != 0 && !group_ok(dm.gid()) && !sticky;
        if (dm.uid() != 0 && dm.uid() != owner) || others_write || group_write {
            return refuse(format!(
                "{} on the way is owned by uid {} with mode {:04o}",
                d.display(),
                dm.uid(),
                dm.mode() & 0o7777
            ));
        }
        dir = d.parent();
    }
    Ok(owner)
}

/// What `become_owner_of` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Became {
    /// Not root, or PM2_HOME is root's own: nothing to change.
    Unchanged,
    /// Now running as this user.
    User { uid: u32, name: String },
}

/// When running as root and `pm2_home` belongs to another user, becomes that user (uid, primary
/// gid, supplementary groups, HOME/USER/LOGNAME). A PM2_HOME that does not exist yet is an
/// error: whose it is cannot be known, so nothing may be started for it.
pub fn become_owner_of(pm2_home: &Path) -> Result<Became, PrivilegeError> {
    if !euid_is_root() {
        return Ok(Became::Unchanged);
    }
    // No PM2_HOME yet (PM2 never ran here): nobody's PM2 to act for; `pm2 resurrect` refuses
    // until one exists (`home_owner` again), and watching needs no privilege to change.
    if std::fs::symlink_metadata(pm2_home).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
    {
        return Ok(Became::Unchanged);
    }
    let uid = home_owner(pm2_home)?;
    if uid == 0 {
        return Ok(Became::Unchanged);
    }
    let user = lookup(uid).map_err(|_| PrivilegeError::Unnamed {
        uid,
        home: pm2_home.display().to_string(),
    })?;
    drop_to(&user, uid)?;
    // Single-threaded here (checked by the caller's contract): the environment is ours to set.
    std::env::set_var("HOME", &user.home);
    std::env::set_var("USER", &user.name);
    std::env::set_var("LOGNAME", &user.name);
    Ok(Became::User {
        uid,
        name: user.name,
    })
}

/// A passwd entry.
pub(crate) struct User {
    pub name: String,
    pub gid: u32,
    pub home: String,
}

/// The passwd entry of `uid` (`getpwuid_r` through NSS, not `$HOME`: a service started without
/// `HOME` agrees with `pm2 startup`).
pub(crate) fn lookup(uid: u32) -> Result<User, PrivilegeError> {
    match nix::unistd::User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(u)) => Ok(User {
            name: u.name,
            gid: u.gid.as_raw(),
            home: u.dir.to_string_lossy().into_owned(),
        }),
        _ => Err(PrivilegeError::NoUser { uid }),
    }
}

/// Becomes `user` for good: supplementary groups, then the gid, then the uid (dropping the uid
/// first would lose the right to change the rest), and proves root cannot be regained. glibc's
/// setresuid/setresgid apply to every thread of the process, unlike the raw system calls.
fn drop_to(user: &User, uid: u32) -> Result<(), PrivilegeError> {
    let syscall = |call: String| move |source| PrivilegeError::Syscall { call, source };
    let name = CString::new(user.name.clone()).map_err(|_| PrivilegeError::NulName)?;
    let gid = Gid::from_raw(user.gid);
    nix::unistd::initgroups(&name, gid).map_err(syscall(format!("initgroups({})", user.name)))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(syscall(format!("setresgid({})", user.gid)))?;
    let u = Uid::from_raw(uid);
    nix::unistd::setresuid(u, u, u).map_err(syscall(format!("setresuid({uid})")))?;
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok()
        || rustix::process::geteuid().as_raw() != uid
        || rustix::process::getegid().as_raw() != user.gid
    {
        return Err(PrivilegeError::StillRoot);
    }
    Ok(())
}

/// The user the agent runs as, for a check made before (or without) becoming it: `validate`
/// under sudo judges a `url_file` for this user, who reads it at every reload, not for root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentUser {
    pub uid: u32,
    /// The user name, or the uid when it has none.
    pub name: String,
    /// Its groups, primary first (a `root:<group>` 0640 file is read through one of them).
    pub gids: Vec<u32>,
    /// Who that is and how it was found, for messages.
    pub who: String,
}

impl AgentUser {
    /// This process's user: what the running agent is.
    pub fn current() -> AgentUser {
        let uid = euid();
        let gid = rustix::process::getegid().as_raw();
        let mut gids = vec![gid];
        gids.extend(
            nix::unistd::getgroups()
                .unwrap_or_default()
                .into_iter()
                .map(Gid::as_raw)
                .filter(|g| *g != gid),
        );
        let name = lookup(uid).map_or_else(|_| uid.to_string(), |u| u.name);
        AgentUser {
            uid,
            who: format!("{name} (uid {uid}, the user running this command)"),
            name,
            gids,
        }
    }

    /// `uid` with its passwd entry's groups.
    fn of(uid: u32, how: String) -> AgentUser {
        let (name, gids) = match lookup(uid) {
            Ok(u) => {
                let mut gids = vec![u.gid];
                if let Ok(c) = CString::new(u.name.clone()) {
                    let all =
                        nix::unistd::getgrouplist(&c, Gid::from_raw(u.gid)).unwrap_or_default();
                    gids.extend(all.into_iter().map(Gid::as_raw).filter(|g| *g != u.gid));
                }
                (u.name, gids)
            }
            Err(_) => (uid.to_string(), Vec::new()),
        };
        AgentUser {
            uid,
            who: format!("{name} (uid {uid}, {how})"),
            name,
            gids,
        }
    }
}

/// Whom `run` with this PM2_HOME and state directory acts as: not root, this process's user;
/// as root, PM2_HOME's owner (whom `run` becomes), else the state directory's owner (the
/// systemd unit's `User=`, which `StateDirectory=` gives it to; `pause` becomes it too), else
/// root. `pm2_home` is the resolved one, `None` when it cannot be told.
pub fn agent_user(pm2_home: Option<&Path>, state_dir: &Path) -> AgentUser {
    if !euid_is_root() {
        return AgentUser::current();
    }
    if let Some(home) = pm2_home.filter(|h| h.exists()) {
        match home_owner(home) {
            Ok(uid) if uid != 0 => {
                let how = format!(
                    "the owner of PM2_HOME {}, whom `run` runs as",
                    home.display()
                );
                return AgentUser::of(uid, how);
            }
            _ => {}
        }
    }
    match std::fs::symlink_metadata(state_dir) {
        Ok(m) if m.is_dir() && m.uid() != 0 => AgentUser::of(
            m.uid(),
            format!("the owner of the state directory {}", state_dir.display()),
        ),
        _ => AgentUser::of(
            0,
            "root: neither PM2_HOME nor the state directory belongs to another user".into(),
        ),
    }
}

/// Whether this process runs with root's effective uid.
pub fn euid_is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// This process's effective uid.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// This process's real uid.
pub fn uid() -> u32 {
    rustix::process::getuid().as_raw()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_home_the_users_private_group_may_write_is_still_the_users() {
        if !euid_is_root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let home = d.path().join("pm2");
        std::fs::create_dir(&home).unwrap();
        // nobody's private group on Debian is nogroup (65534): umask 002 style.
        std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o775)).unwrap();
        assert_eq!(home_owner(&home), Ok(65534));
        // Another group writing: refused. World-writable: refused.
        std::os::unix::fs::chown(&home, Some(65534), Some(0)).unwrap();
        assert!(home_owner(&home).is_err());
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o757)).unwrap();
        assert!(home_owner(&home).is_err());
        // A symlink: refused.
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&home, &link).unwrap();
        assert!(home_owner(&link)
            .unwrap_err()
            .to_string()
            .contains("symlink"));
    }
}
