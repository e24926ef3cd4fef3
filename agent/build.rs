//! Stamps the git commit the binaries are built from into `PMGUARD_GIT_COMMIT`, read by
//! `pmguard_agent::cli::LONG_VERSION` (both binaries' `--version`).
//!
//! Never fails the build: outside a git checkout (a source tarball) or without `git` the commit
//! is "unknown"; `PMGUARD_GIT_COMMIT` set in the environment wins (a packager's own stamp).

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PMGUARD_GIT_COMMIT");
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let stamped = std::env::var("PMGUARD_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty());
    let commit = stamped
        .clone()
        .or_else(|| git(&dir, &["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=PMGUARD_GIT_COMMIT={commit}");
    if stamped.is_some() {
        return;
    }
    // Rebuild when HEAD moves (a commit, a checkout). Only files that exist are named: cargo
    // reruns a build script on every build while a named file is missing.
    let mut watched = vec![
        "HEAD".to_string(),
        "logs/HEAD".to_string(),
        "packed-refs".to_string(),
    ];
    if let Some(reference) = git(&dir, &["symbolic-ref", "-q", "HEAD"]) {
        watched.push(reference);
    }
    for name in watched {
        if let Some(p) = git(&dir, &["rev-parse", "--git-path", &name]) {
            let path = dir.join(p);
            if path.is_file() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}
