//! The PM2 user's account, read from `<root>/etc/passwd` and `<root>/etc/group`, so a staging
//! root describes its own users and nothing is looked up on the host by accident.

use std::path::{Path, PathBuf};

use crate::Error;

#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub user: String,
    pub uid: u32,
    pub group: String,
    pub gid: u32,
    pub home: PathBuf,
}

pub fn lookup(root: &Path, user: &str) -> Result<Account, Error> {
    let passwd_path = root.join("etc/passwd");
    let passwd =
        std::fs::read_to_string(&passwd_path).map_err(Error::apply("cannot read", &passwd_path))?;
    let fields: Vec<&str> = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && f[0] == user)
        .ok_or_else(|| Error::UnknownUser {
            user: user.to_string(),
            passwd: passwd_path.clone(),
        })?;
    let uid: u32 = fields[2].parse().map_err(|_| Error::BadId {
        passwd: passwd_path.clone(),
        field: "uid",
        user: user.to_string(),
    })?;
    let gid: u32 = fields[3].parse().map_err(|_| Error::BadId {
        passwd: passwd_path.clone(),
        field: "gid",
        user: user.to_string(),
    })?;
    if uid == 0 {
        return Err(Error::RootUser {
            user: user.to_string(),
        });
    }
    let group_path = root.join("etc/group");
    let group = std::fs::read_to_string(&group_path)
        .ok()
        .and_then(|g| {
            g.lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[2].parse::<u32>().ok() == Some(gid))
                .map(|f| f[0].to_string())
        })
        .unwrap_or_else(|| user.to_string());
    Ok(Account {
        user: user.to_string(),
        uid,
        group,
        gid,
        home: PathBuf::from(fields[5]),
    })
}

/// The account whose home directory holds `path` (the deepest such home; `/` is nobody's), e.g.
/// the user of a config's `pm2_home = "/home/alice/.pm2"`.
pub fn home_owner(root: &Path, path: &Path) -> Option<String> {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).ok()?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 7 && f[5] != "/" && f[5].starts_with('/'))
        .filter(|f| path.starts_with(f[5]))
        .max_by_key(|f| Path::new(f[5]).components().count())
        .map(|f| f[0].to_string())
}

/// Whether `a`'s primary group is its own: no other account has it as primary group or is a
/// member of it. The config is root:<group> 0640 and the state directory <user>:<group> 0750,
/// so anyone else in the group would read the notify URLs (secrets), the state and the events.
/// `Err` names who else is in it, with the fix. PM2 run as root needs none: gid 0 is shared
/// with system accounts on RHEL and Amazon Linux (sync, shutdown, halt), and root's files are
/// root's to read anyway.
pub fn private_group(root: &Path, a: &Account) -> Result<(), Error> {
    if a.uid == 0 {
        return Ok(());
    }
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap_or_default();
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap_or_default();
    let mut others: Vec<String> = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 7 && f[0] != a.user && f[3].parse::<u32>().ok() == Some(a.gid))
        .map(|f| f[0].to_string())
        .collect();
    let members = group
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && f[2].parse::<u32>().ok() == Some(a.gid))
        .map(|f| f[3].split(',').map(str::to_string).collect::<Vec<_>>())
        .unwrap_or_default();
    for m in members {
        if !m.is_empty() && m != a.user && !others.contains(&m) {
            others.push(m);
        }
    }
    if others.is_empty() {
        return Ok(());
    }
    Err(Error::SharedGroup {
        user: a.user.clone(),
        group: a.group.clone(),
        others: others.join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_with(passwd: &str, group: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/passwd"), passwd).unwrap();
        std::fs::write(root.path().join("etc/group"), group).unwrap();
        root
    }

    #[test]
    fn root_needs_no_private_group() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        std::fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/bash\nsync:x:5:0::/sbin:/bin/sync\nhalt:x:7:0::/sbin:/sbin/halt\n",
        )
        .unwrap();
        std::fs::write(d.path().join("etc/group"), "root:x:0:\n").unwrap();
        let root = Account {
            user: "root".into(),
            uid: 0,
            group: "root".into(),
            gid: 0,
            home: "/root".into(),
        };
        assert!(private_group(d.path(), &root).is_ok());
        let sync = Account {
            user: "sync".into(),
            uid: 5,
            ..root
        };
        assert!(private_group(d.path(), &sync).is_err());
    }

    #[test]
    fn a_primary_group_shared_with_another_account_is_refused_with_the_fix() {
        let root = root_with(
            "root:x:0:0::/root:/bin/sh\nalice:x:1001:1001::/home/alice:/bin/sh\ncarol:x:1003:100::/home/carol:/bin/sh\ndave:x:1004:100::/home/dave:/bin/sh\nerin:x:1005:1005::/home/erin:/bin/sh\nfrank:x:1006:1006::/home/frank:/bin/sh\n",
            "users:x:100:\nalice:x:1001:\nerin:x:1005:frank\nfrank:x:1006:frank\n",
        );
        let check = |u: &str| private_group(root.path(), &lookup(root.path(), u).unwrap());
        let err = check("carol").unwrap_err().to_string();
        assert!(
            err.contains("group `users`") && err.contains("dave"),
            "{err}"
        );
        assert!(err.contains("usermod -g carol carol"), "{err}");
        // A member listed in /etc/group reads it just the same.
        let err = check("erin").unwrap_err().to_string();
        assert!(err.contains("frank"), "{err}");
        assert!(check("alice").is_ok());
        assert!(check("frank").is_ok(), "frank alone in his own group");
    }
}
