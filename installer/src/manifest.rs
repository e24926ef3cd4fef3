//! The install manifest (`/etc/pmguard/install-manifest.json`): what `install` laid down, so
//! `uninstall` removes exactly that and `install` can tell a user's edit from its own file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: String,
    /// Installed files: path -> sha256 of what was written.
    pub files: BTreeMap<PathBuf, String>,
    /// Directories install created (removed by uninstall when empty), deepest last.
    pub created_dirs: Vec<PathBuf>,
    pub unit: Option<String>,
}

pub fn sha256(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

impl Manifest {
    pub fn read(path: &Path) -> Result<Option<Manifest>, String> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| format!("{}: {e} (move it aside and re-run)", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}
