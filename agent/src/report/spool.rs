//! A spool file: what a sink has accepted and not yet delivered, as one JSON document under
//! `<state_dir>/spool/`: the AWS sink's `pending.json` (the notify sinks keep a journal instead,
//! `notify::journal`, and read an earlier version's `notify.json` through this once).
//!
//! Invariants: the file is mode 0600 (it may hold alert text) and replaced atomically and
//! fsynced, so a crash leaves the old or the new content, never a mix; an empty spool is no
//! file; a corrupt file is moved aside (and said so), never resent and never fatal.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::sys::files;

pub const SPOOL_DIR: &str = "spool";

/// One spool file.
#[derive(Debug, Clone)]
pub struct SpoolFile {
    dir: PathBuf,
    name: &'static str,
}

impl SpoolFile {
    pub fn new(state_dir: &Path, name: &'static str) -> SpoolFile {
        SpoolFile {
            dir: state_dir.join(SPOOL_DIR),
            name,
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(self.name)
    }

    /// Reads the spool; a corrupt file is moved aside to `<name>.corrupt`. Read whole: what
    /// `store` wrote is bounded by its writer's own capacity (the AWS buffer's can pass the
    /// 16 MiB `files::MAX_STATE_FILE`), and a spool cut at a cap would be called corrupt and
    /// moved aside with everything in it.
    pub fn load<T: DeserializeOwned>(&self) -> std::io::Result<Option<T>> {
        let path = self.path();
        let Some(bytes) = files::read_capped(&path, u64::MAX)? else {
            return Ok(None);
        };
        match serde_json::from_slice::<T>(&bytes) {
            Ok(b) => Ok(Some(b)),
            Err(error) => {
                let aside = self.dir.join(format!("{}.corrupt", self.name));
                let _ = std::fs::rename(&path, &aside);
                tracing::warn!(message = "A spool file is corrupt; moved aside.", path = %aside.display(), %error);
                Ok(None)
            }
        }
    }

    /// Writes `content` (0600, atomically, fsynced), or removes the file when it is `None`.
    pub fn store<T: Serialize>(&self, content: Option<&T>) -> std::io::Result<()> {
        let Some(content) = content else {
            return match std::fs::remove_file(self.path()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        };
        files::ensure_dir(&self.dir)?;
        let data = serde_json::to_vec(content).map_err(std::io::Error::other)?;
        files::write_atomic(&self.path(), &data, 0o600, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spool_larger_than_the_state_file_cap_is_read_back_whole_not_called_corrupt() {
        let d = tempfile::tempdir().unwrap();
        let f = SpoolFile::new(d.path(), "pending.json");
        let items: Vec<String> = (0..5000)
            .map(|i| format!("{i} {}", "x".repeat(4000)))
            .collect();
        f.store(Some(&items)).unwrap();
        assert!(std::fs::metadata(f.path()).unwrap().len() > files::MAX_STATE_FILE);
        assert_eq!(f.load::<Vec<String>>().unwrap(), Some(items));
        assert!(!d
            .path()
            .join(SPOOL_DIR)
            .join("pending.json.corrupt")
            .exists());
    }
}
