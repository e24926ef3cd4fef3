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
