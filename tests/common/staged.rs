//! A staging root for `pmguard install --root` as the CLI tests build one: `<dir>/root` with its
//! own `etc/passwd` and `etc/group` (so users are looked up there, never on the host) and an
//! empty `usr/bin` where a packaged agent may go. Shared by staged_install and packaged_agent.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Makes `<dir>/root` with `passwd` and `group` as its account files; returns its path.
pub fn root(dir: &Path, passwd: &str, group: &str) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::write(root.join("etc/passwd"), passwd).unwrap();
    std::fs::write(root.join("etc/group"), group).unwrap();
    root
}
