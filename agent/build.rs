//! Stamps the git commit the binaries are built from into `PMGUARD_GIT_COMMIT`, read by
//! `pmguard_agent::cli::LONG_VERSION` (both binaries' `--version`).
//!
//! The stamp never fails the build: outside a git checkout (a source tarball) or without `git` the commit
//! is "unknown"; `PMGUARD_GIT_COMMIT` set in the environment wins (a packager's own stamp).
//!
//! With `PMGUARD_HOT_TEXT=1` (set by `dist/build`), in optimised builds for Linux, it also lays
//! out `pmguard-agent`'s code: the functions listed in `hot-text.txt` (what a watching agent runs)
//! go first, together, in an output section `.text.hot`, through a linker script that only adds
//! that section (`INSERT BEFORE .text`). The kernel maps a binary's code in 64 KiB blocks around
//! each page touched, so hot code spread over the whole 3 MB text made most of it resident.
//! Opt-in because not every linker takes such a script: lld (rust-lld, zig's) and GNU ld do; gold
//! and mold do not. The names are v0-mangled (`.cargo/config.toml`): asked for without them, the
//! build fails saying so. A function the list misses is placed as before; `dist/build` checks
//! the section. `bench/hot_text.sh` regenerates the list.

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

/// Writes the linker script for `hot-text.txt` into OUT_DIR and hands it to the binaries' link.
fn hot_text_layout(dir: &Path) {
    println!("cargo:rerun-if-changed=hot-text.txt");
    println!("cargo:rerun-if-env-changed=PMGUARD_HOT_TEXT");
    // Optimised builds only: a debug build has tens of thousands of sections to match against
    // the list (about 25 s per link), and nobody measures its memory.
    if std::env::var("PMGUARD_HOT_TEXT").as_deref() != Ok("1")
        || std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux")
        || std::env::var("PROFILE").as_deref() != Ok("release")
    {
        return;
    }
    // RUSTFLAGS (or a target's rustflags) in the environment or a cargo config replace
    // `.cargo/config.toml`'s: then no Rust name in the list can match.
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    assert!(
        flags.contains("symbol-mangling-version=v0"),
        "PMGUARD_HOT_TEXT=1 needs v0 symbol names, and this build's rustflags ({:?}) replaced \
         .cargo/config.toml's: add `-C symbol-mangling-version=v0` to them, or unset \
         PMGUARD_HOT_TEXT",
        flags.replace('\x1f', " ")
    );
    let Some(out) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
        return;
    };
    let Ok(list) = std::fs::read_to_string(dir.join("hot-text.txt")) else {
        return;
    };
    // A name with a character the script language would read as syntax is skipped: the list
    // is data, never part of the script's structure.
    let plain = |c: char| c.is_ascii_alphanumeric() || "_.*".contains(c);
    let mut script = String::from("SECTIONS {\n  .text.hot : {\n");
    for name in list.lines().map(str::trim) {
        if name.is_empty() || name.starts_with('#') {
            continue;
        }
        if !name.chars().all(plain) {
            println!("cargo:warning=hot-text.txt: skipped a name with an unexpected character: {name:.60}");
            continue;
        }
        // LLVM names a local function `name.llvm.<hash>` and a cold one `.text.unlikely.name`.
        script.push_str(&format!(
            "    *(.text.{name} .text.{name}.llvm.* .text.unlikely.{name} .text.unlikely.{name}.llvm.*)\n"
        ));
    }
    script.push_str("  }\n} INSERT BEFORE .text;\n");
    let path = out.join("hot-text.ld");
    // The compiler driver splits a `-Wl,` argument at commas; -Xlinker passes the path whole.
    if std::fs::write(&path, script).is_ok() {
        println!("cargo:rustc-link-arg-bins=-Xlinker");
        println!("cargo:rustc-link-arg-bins=-T");
        println!("cargo:rustc-link-arg-bins=-Xlinker");
        println!("cargo:rustc-link-arg-bins={}", path.display());
    }
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PMGUARD_GIT_COMMIT");
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    hot_text_layout(&dir);
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
