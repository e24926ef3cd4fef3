//! The .deb that `bash dist/build` makes, installed with `dpkg -i` into a Debian 11 (bullseye,
//! glibc 2.31) root: both binaries run there, the agent validates a config, completions and man
//! pages are where bash and man look, `pmguard install` runs the packaged agent in place, and
//! `pmguard uninstall` + `dpkg -r` leave the root's file list as it was.
//!
//! Needs root (chroot, a private mount namespace for /proc) and the artifacts: run `bash dist/build`
//! first (CI's .ci/run does). The bullseye root is built once and cached by
//! `tests/e2e/bullseye.sh prepare`; each test works on its own copy.

#[path = "common/machine.rs"]
mod machine;

use machine::built_deb;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Instant;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn check(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A private copy of the cached bullseye root, removed on drop.
struct Root {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Root {
    fn copy() -> Root {
        let out = Command::new("bash")
            .arg(repo().join("tests/e2e/bullseye.sh"))
            .arg("prepare")
            .output()
            .unwrap();
        let cached = PathBuf::from(check("tests/e2e/bullseye.sh prepare", out).trim());
        // Not /tmp: may be a small tmpfs; the copy is ~200 MB.
        let dir = tempfile::Builder::new()
            .prefix("pmguard-bullseye.")
            .tempdir_in("/var/tmp")
            .unwrap();
        let path = dir.path().join("root");
        check(
            "cp -a",
            Command::new("cp")
                .args(["-a", "--reflink=auto"])
                .arg(&cached)
                .arg(&path)
                .output()
                .unwrap(),
        );
        Root { _dir: dir, path }
    }

    /// Runs `args` chrooted in the root, with its own /proc mounted in a private mount namespace
    /// (gone when the command ends: nothing to unmount).
    fn run(&self, args: &[&str]) -> Output {
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount -t proc proc "$1/proc" && r=$1 && shift && exec chroot "$r" "$@""#)
            .arg("sh")
            .arg(&self.path)
            .args(args)
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        check(&args.join(" "), self.run(args))
    }

    /// Every path in the root, minus the package database and logs dpkg itself keeps.
    fn file_list(&self) -> BTreeSet<String> {
        let out = check(
            "find",
            Command::new("find")
                .arg(".")
                .current_dir(&self.path)
                .output()
                .unwrap(),
        );
        out.lines()
            .filter(|p| {
                ![
                    "./var/lib/dpkg",
                    "./var/log",
                    "./var/cache",
                    "./tmp",
                    "./proc",
                ]
                .iter()
                .any(|skip| p.starts_with(skip))
            })
            .map(str::to_owned)
            .collect()
    }
}

#[test]
fn the_deb_installs_and_runs_on_debian_11_and_removes_cleanly() {
    let started = Instant::now();
    let deb = built_deb();
    let root = Root::copy();
    let ldd = root.ok(&["ldd", "--version"]);
    assert!(ldd.contains("2.31"), "not a glibc 2.31 root: {ldd}");
    let before = root.file_list();

    std::fs::copy(&deb, root.path.join("tmp/pmguard.deb")).unwrap();
    let t = Instant::now();
    root.ok(&["dpkg", "-i", "/tmp/pmguard.deb"]);
    let dpkg_secs = t.elapsed().as_secs_f64();

    let version = format!("{} (commit ", env!("CARGO_PKG_VERSION"));
    let v = root.ok(&["pmguard", "--version"]);
    assert!(v.starts_with(&format!("pmguard {version}")), "{v}");
    let v = root.ok(&["pmguard-agent", "--version"]);
    assert!(v.starts_with(&format!("pmguard-agent {version}")), "{v}");

    std::fs::write(
        root.path.join("tmp/sample.toml"),
        "[[apps]]\nname = \"codebox\"\nhealth_url = \"http://127.0.0.1:5000/api-health\"\n",
    )
    .unwrap();
    let valid = root.ok(&["pmguard-agent", "validate", "--config", "/tmp/sample.toml"]);
    assert!(valid.contains("valid, 1 app(s)"), "{valid}");
    std::fs::write(root.path.join("tmp/bad.toml"), "[[apps]]\nnmae = \"x\"\n").unwrap();
    let bad = root.run(&["pmguard-agent", "validate", "--config", "/tmp/bad.toml"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/tmp/bad.toml:2:1"));

    let completions = root.ok(&["pmguard", "completions", "bash"]);
    assert!(
        completions.contains("complete -F _pmguard"),
        "{completions}"
    );
    for f in [
        "usr/share/bash-completion/completions/pmguard",
        "usr/share/bash-completion/completions/pmguard-agent",
        "usr/share/zsh/vendor-completions/_pmguard",
        "usr/share/fish/vendor_completions.d/pmguard-agent.fish",
        "usr/share/man/man1/pmguard.1.gz",
        "usr/share/man/man1/pmguard-init.1.gz",
        "usr/share/man/man1/pmguard-agent.1.gz",
        "usr/share/doc/pmguard/copyright",
    ] {
        assert!(root.path.join(f).is_file(), "{f} is not in the package");
    }
    // Installing the package starts nothing and lays down no unit.
    assert!(!root
        .path
        .join("etc/systemd/system/pmguard-agent.service")
        .exists());

    // `pmguard install` from the package: the packaged agent runs in place (systemd does not run
    // in a chroot, so only files are laid down).
    root.ok(&[
        "pmguard",
        "install",
        "--config",
        "/tmp/sample.toml",
        "--user",
        "nobody",
    ]);
    let unit = std::fs::read_to_string(root.path.join("etc/systemd/system/pmguard-agent.service"))
        .unwrap();
    assert!(
        unit.contains("ExecStart=/usr/bin/pmguard-agent run"),
        "{unit}"
    );
    assert!(!root.path.join("usr/local/bin/pmguard-agent").exists());
    root.ok(&["pmguard", "uninstall"]);
    assert!(
        root.path.join("usr/bin/pmguard-agent").exists(),
        "uninstall removed a package file"
    );
    root.ok(&["dpkg", "-r", "pmguard"]);

    let after = root.file_list();
    let added: Vec<_> = after.difference(&before).collect();
    let removed: Vec<_> = before.difference(&after).collect();
    assert!(
        added.is_empty() && removed.is_empty(),
        "left behind: {added:?}; removed: {removed:?}"
    );
    eprintln!(
        "bullseye: dpkg -i took {dpkg_secs:.2} s; whole test {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
