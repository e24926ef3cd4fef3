//! The install manifest (`/etc/pmguard/install-manifest.json`): what `install` laid down, so
//! `uninstall` removes exactly that and `install` can tell a user's edit from its own file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: String,
    /// Installed files: path -> sha256 of what was written.
    pub files: BTreeMap<PathBuf, String>,
    /// Directories install created (removed by uninstall when empty), deepest last.
    pub created_dirs: Vec<PathBuf>,
    pub unit: Option<String>,
    /// The PM2 user the install is for. Manifests from before it was recorded have none, and a
    /// value that is no plain account name (a number, `""`, `../x`) is read as none: then what
    /// the install laid down says (`layout::installed`), and where nothing does, no other user's
    /// install replaces it (`plan::check_owner`).
    #[serde(
        default,
        deserialize_with = "plain_user",
        skip_serializing_if = "Option::is_none"
    )]
    pub user: Option<String>,
}

/// The manifest's `user`, when it is a string holding a plain account name; anything else
/// names nobody rather than making the whole manifest unreadable (the files it lists must stay
/// known, for uninstall and for telling whose install it is).
fn plain_user<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(d)?;
    Ok(value
        .and_then(|v| v.as_str().map(str::to_string))
        .filter(|u| crate::layout::plain_name(u)))
}

/// The sha256 of a file, read in chunks (an agent binary need not sit in memory whole).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

pub fn sha256(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

impl Manifest {
    pub fn read(path: &Path) -> Result<Option<Manifest>, Error> {
        match pmguard_agent::sys::files::read_capped(path, 1 << 20) {
            Ok(Some(b)) => {
                serde_json::from_slice(&b)
                    .map(Some)
                    .map_err(|source| Error::ManifestUnreadable {
                        path: path.to_path_buf(),
                        source,
                    })
            }
            Ok(None) => Ok(None),
            Err(e) => Err(Error::io(path)(e)),
        }
    }

    /// Refuses a manifest that names anything pmguard never lays down: uninstall deletes what
    /// the manifest lists, as root, so a path with `..` or outside pmguard's own set (a
    /// tampered or hand-written manifest) must never reach it.
    pub fn check_owned(&self, at: &Path, layout: &crate::layout::Layout) -> Result<(), Error> {
        let owned = layout.owned_files();
        for f in self.files.keys() {
            if !owned.contains(f) {
                return Err(Error::ManifestForeignFile {
                    manifest: at.to_path_buf(),
                    file: f.clone(),
                });
            }
        }
        for d in &self.created_dirs {
            let normal = d.is_absolute()
                && d.components().all(|c| {
                    matches!(
                        c,
                        std::path::Component::RootDir | std::path::Component::Normal(_)
                    )
                });
            if !normal || !owned.iter().any(|f| f.starts_with(d) && f != d) {
                return Err(Error::ManifestForeignDir {
                    manifest: at.to_path_buf(),
                    dir: d.clone(),
                });
            }
        }
        Ok(())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_field_that_is_no_account_name_names_nobody_and_the_manifest_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        let with = |user: &str| {
            std::fs::write(
                &path,
                format!("{{\"version\": \"0.1.0\", \"files\": {{\"/etc/cron.d/pmguard\": \"ab\"}}, \"created_dirs\": [], \"unit\": null{user}}}"),
            )
            .unwrap();
            Manifest::read(&path).unwrap().unwrap()
        };
        for bad in [
            ", \"user\": 42",
            ", \"user\": \"\"",
            ", \"user\": \"../x\"",
            ", \"user\": null",
            "",
        ] {
            let m = with(bad);
            assert_eq!(m.user, None, "{bad}");
            assert_eq!(m.files.len(), 1, "{bad}");
        }
        assert_eq!(
            with(", \"user\": \"first.last\"").user.as_deref(),
            Some("first.last")
        );
    }
}
