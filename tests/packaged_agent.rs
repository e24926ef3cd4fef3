//! `pmguard install` with the agent the .deb ships (`/usr/bin/pmguard-agent`): the unit and cron
//! line run it in place, no copy is laid down, and `uninstall` never removes it (the package
//! manager owns it). A source build's copy at /usr/local/bin is replaced by the packaged one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PMGUARD: &str = env!("CARGO_BIN_EXE_pmguard");

#[path = "common/staged.rs"]
mod staged;

fn agent_bin() -> PathBuf {
    Path::new(PMGUARD).with_file_name("pmguard-agent")
}

struct Staged {
    _dir: tempfile::TempDir,
    root: PathBuf,
    config: PathBuf,
}

fn staged() -> Staged {
    let dir = tempfile::tempdir().unwrap();
    let root = staged::root(
        dir.path(),
        "ubuntu:x:1000:1000::/home/ubuntu:/bin/bash\n",
        "ubuntu:x:1000:\n",
    );
    std::fs::copy(agent_bin(), root.join("usr/bin/pmguard-agent")).unwrap();
    let config = dir.path().join("pmguard.toml");
    std::fs::write(
        &config,
        "[[apps]]\nname = \"codebox\"\nhealth_url = \"http://127.0.0.1:5000/health\"\n",
    )
    .unwrap();
    Staged {
        _dir: dir,
        root,
        config,
    }
}

fn pmguard(args: &[&str], s: &Staged, agent: Option<&Path>) -> Output {
    let mut cmd = Command::new(PMGUARD);
    cmd.args(args).arg("--root").arg(&s.root);
    if args[0] == "install" {
        cmd.args(["--user", "ubuntu", "--config"]).arg(&s.config);
    }
    if let Some(a) = agent {
        cmd.arg("--agent-bin").arg(a);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "pmguard {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn read(s: &Staged, path: &str) -> String {
    std::fs::read_to_string(s.root.join(path)).unwrap()
}

#[test]
fn the_packaged_agent_runs_in_place_and_survives_uninstall() {
    let s = staged();
    let packaged = s.root.join("usr/bin/pmguard-agent");
    let before = std::fs::read(&packaged).unwrap();
    pmguard(&["install"], &s, Some(&packaged));

    let unit = read(&s, "etc/systemd/system/pmguard-agent.service");
    assert!(
        unit.contains("ExecStart=/usr/bin/pmguard-agent run --config /etc/pmguard/pmguard.toml"),
        "{unit}"
    );
    assert!(read(&s, "etc/cron.d/pmguard").contains(" /usr/bin/pmguard-agent check --once"));
    assert!(!s.root.join("usr/local/bin/pmguard-agent").exists());
    let manifest = read(&s, "etc/pmguard/install-manifest.json");
    assert!(!manifest.contains("pmguard-agent\""), "{manifest}");

    let again = pmguard(&["install"], &s, Some(&packaged));
    assert!(String::from_utf8_lossy(&again.stdout).contains("Nothing to do."));

    pmguard(&["uninstall"], &s, None);
    assert!(!s
        .root
        .join("etc/systemd/system/pmguard-agent.service")
        .exists());
    assert!(!s.root.join("etc/pmguard").exists());
    assert_eq!(
        std::fs::read(&packaged).unwrap(),
        before,
        "the package's file is untouched"
    );
}

#[test]
fn moving_from_a_source_install_to_the_package_removes_the_old_copy_only() {
    let s = staged();
    pmguard(&["install"], &s, Some(&agent_bin()));
    let copy = s.root.join("usr/local/bin/pmguard-agent");
    assert!(copy.exists(), "a source build copies the agent");
    assert!(read(&s, "etc/systemd/system/pmguard-agent.service")
        .contains("ExecStart=/usr/local/bin/pmguard-agent run"));

    let packaged = s.root.join("usr/bin/pmguard-agent");
    let out = pmguard(&["install"], &s, Some(&packaged));
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(!copy.exists(), "the old copy goes: {plan}");
    assert!(packaged.exists());
    assert!(read(&s, "etc/systemd/system/pmguard-agent.service")
        .contains("ExecStart=/usr/bin/pmguard-agent run"));
}
