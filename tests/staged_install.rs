//! `pmguard install`/`uninstall`/`doctor` as a user runs them, on a staging root (`--root`) with
//! its own passwd and group: what the CLI prints and refuses. Nothing is started (no systemd in
//! a staging root); the nspawn e2e covers a live box.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

const PMGUARD: &str = env!("CARGO_BIN_EXE_pmguard");

#[path = "common/staged.rs"]
mod staged;

/// A staging root like a box with several PM2 users: ubuntu, alice and bob with private
/// groups; carol and dave sharing the primary group `users`.
struct Staged {
    dir: tempfile::TempDir,
}

impl Staged {
    fn new() -> Staged {
        let dir = tempfile::tempdir().unwrap();
        staged::root(
            dir.path(),
            "root:x:0:0:root:/root:/bin/sh\nubuntu:x:1000:1000::/home/ubuntu:/bin/sh\nalice:x:1001:1001::/home/alice:/bin/sh\nbob:x:1002:1002::/home/bob:/bin/sh\ncarol:x:1003:100::/home/carol:/bin/sh\ndave:x:1004:100::/home/dave:/bin/sh\n",
            "root:x:0:\nusers:x:100:\nubuntu:x:1000:\nalice:x:1001:\nbob:x:1002:\n",
        );
        std::fs::write(dir.path().join("agent"), "#!/bin/sh\necho copied\n").unwrap();
        Staged { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// A config for `user` with its own state directory.
    fn config(&self, user: &str, agent_lines: &str) -> PathBuf {
        let p = self.dir.path().join(format!("{user}.toml"));
        std::fs::write(
            &p,
            format!("[agent]\nstate_dir = \"/var/lib/pmguard-{user}\"\n{agent_lines}\n[[apps]]\nname = \"web\"\nhealth_url = \"http://127.0.0.1:3000/health\"\n"),
        )
        .unwrap();
        p
    }

    fn pmguard(&self, args: &[&str]) -> Command {
        let mut c = Command::new(PMGUARD);
        c.args(args).arg("--root").arg(self.root());
        c
    }

    fn install(&self, user: &str, extra: &[&str]) -> Output {
        self.install_cmd(user, extra).output().unwrap()
    }

    /// `pmguard install` for `user` with the staged agent, not yet run.
    fn install_cmd(&self, user: &str, extra: &[&str]) -> Command {
        let config = self.config(user, "");
        let agent = self.dir.path().join("agent");
        let mut args = vec!["install", "--user", user, "--config"];
        args.push(config.to_str().unwrap());
        args.extend(["--agent-bin", agent.to_str().unwrap()]);
        args.extend(extra);
        self.pmguard(&args)
    }

    /// Whose installs the root holds, as messages list them: "ubuntu, alice".
    fn names(&self) -> String {
        let installed = pmguard_installer::layout::installed(&self.root()).unwrap();
        pmguard_installer::layout::names(&installed)
    }

    /// `pmguard install` for `user`, started with its output piped.
    fn spawn_install(&self, user: &str) -> Child {
        self.install_cmd(user, &[])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_plan_piped_into_a_reader_that_stops_early_is_no_panic() {
    let s = Staged::new();
    let mut child = s.spawn_install("ubuntu");
    // `| head -0`: the reader is gone before the first line.
    drop(child.stdout.take());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(Path::new(&s.root())
        .join("etc/pmguard/install-manifest.json")
        .exists());
}

#[test]
fn a_second_install_waits_for_the_first_and_loses_nothing() {
    let s = Staged::new();
    assert!(s.install("ubuntu", &[]).status.success());
    // Another install or uninstall holds the root's lock (as this test process).
    let held = pmguard_installer::lock::try_lock(&s.root())
        .unwrap()
        .unwrap();
    let mut child = s.spawn_install("alice");
    let mut stderr = child.stderr.take().unwrap();
    let mut first = [0u8; 48];
    stderr.read_exact(&mut first).unwrap();
    assert!(
        String::from_utf8_lossy(&first).starts_with("Another pmguard install or uninstall"),
        "{}",
        String::from_utf8_lossy(&first)
    );
    assert!(
        !s.root().join("etc/pmguard/users/alice").exists(),
        "nothing written while waiting"
    );
    drop(held);
    let status = child.wait().unwrap();
    assert!(status.success());
    assert_eq!(s.names(), "ubuntu, alice");
}

/// A second user's instance needs a private group (the users of one box must not read each
/// other's config); the first, single-user install is only warned, so a box installed before the
/// check still upgrades.
#[test]
fn a_user_sharing_a_primary_group_is_refused_and_doctor_says_so() {
    let s = Staged::new();
    assert!(s.install("ubuntu", &[]).status.success());
    let out = s.install("carol", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("primary group `users` is shared with dave")
            && t.contains("sudo groupadd carol && sudo usermod -g carol carol"),
        "{t}"
    );
    assert!(
        !s.root().join("etc/pmguard/users/carol").exists(),
        "nothing of carol's written: {t}"
    );
    // ubuntu's group later shared with dave: doctor warns on the single-user install.
    std::fs::write(
        s.root().join("etc/group"),
        "root:x:0:\nusers:x:100:\nubuntu:x:1000:dave\n",
    )
    .unwrap();
    let out = s
        .pmguard(&["doctor", "--user", "ubuntu", "--json"])
        .output()
        .unwrap();
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let group = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "private group")
        .cloned()
        .unwrap_or_else(|| panic!("{}", text(&out)));
    assert_eq!(group["status"], "warn", "{group:#}");
    assert!(group.to_string().contains("shared with dave"), "{group:#}");
}

/// The first install on a box of a user whose group is shared: a warning, and it installs.
#[test]
fn a_single_user_install_with_a_shared_group_is_warned_not_refused() {
    let s = Staged::new();
    let out = s.install("carol", &[]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("warning: user `carol`'s primary group `users` is shared with dave"),
        "{t}"
    );
}

#[test]
fn doctor_judges_a_config_by_the_install_it_belongs_to_and_refuses_an_unknown_user() {
    let s = Staged::new();
    assert!(s.install("ubuntu", &[]).status.success());
    assert!(s.install("alice", &[]).status.success());
    let alice = s.root().join("etc/pmguard/users/alice/pmguard.toml");
    let out = s
        .pmguard(&["doctor", "--json", "--config", alice.to_str().unwrap()])
        .output()
        .unwrap();
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let checks = checks.as_array().unwrap();
    assert!(
        checks
            .iter()
            .all(|c| c["unit"] == "pmguard-agent@alice.service"),
        "{checks:#?}"
    );
    let unit = checks
        .iter()
        .find(|c| c["check"] == "unit file")
        .unwrap_or_else(|| panic!("{checks:#?}"));
    assert_eq!(unit["status"], "ok", "{unit:#}");
    // zed has no install here: an error, never the host's /etc/pmguard/pmguard.toml.
    let out = s.pmguard(&["doctor", "--user", "zed"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("not installed for user `zed` here (installed for: ubuntu, alice)"),
        "{}",
        text(&out)
    );
    // On an empty root, the default config is looked for under the root.
    let empty = Staged::new();
    let out = empty.pmguard(&["doctor", "--json"]).output().unwrap();
    let t = text(&out);
    assert!(
        t.contains(&format!(
            "{}/etc/pmguard/pmguard.toml",
            empty.root().display()
        )),
        "{t}"
    );
}

/// The single-user install's manifest with its `user` set to `value` (`None`: no such field, as
/// pmguard wrote it before the user was recorded).
fn set_manifest_user(s: &Staged, value: Option<serde_json::Value>) {
    let path = s.root().join("etc/pmguard/install-manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let fields = m.as_object_mut().unwrap();
    match value {
        Some(v) => fields.insert("user".into(), v),
        None => fields.remove("user"),
    };
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

/// The single-user install's files (path under the root, bytes), to compare before and after.
fn single_files(s: &Staged) -> Vec<(&'static str, Option<Vec<u8>>)> {
    [
        "etc/pmguard/pmguard.toml",
        "etc/systemd/system/pmguard-agent.service",
        "etc/cron.d/pmguard",
        "etc/logrotate.d/pmguard",
    ]
    .into_iter()
    .map(|p| (p, std::fs::read(s.root().join(p)).ok()))
    .collect()
}

/// `pmguard install --user USER --force` succeeds as an instance of its own and leaves the
/// single-user install's files as they were.
fn becomes_an_instance(s: &Staged, user: &str) {
    let before = single_files(s);
    let out = s.install(user, &["--force"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        s.root().join("etc/pmguard/users").join(user).exists(),
        "{t}"
    );
    assert_eq!(
        single_files(s),
        before,
        "{user}'s install changed ubuntu's: {t}"
    );
}

/// A manifest that does not say whose install it is (written before the user was recorded, or
/// with a user field that is no name): the install's own files say, and another user's install,
/// --force or not, becomes an agent of its own and leaves the first one's files as they were.
#[test]
fn force_never_hands_a_single_install_whose_manifest_names_no_user_to_another_user() {
    let s = Staged::new();
    assert!(s.install("ubuntu", &[]).status.success());
    // A user field that is no name: the unit's User= says.
    set_manifest_user(&s, Some(serde_json::json!(42)));
    becomes_an_instance(&s, "bob");
    // No user field, and the unit's User= edited away: its cron line still says.
    set_manifest_user(&s, None);
    let unit = s.root().join("etc/systemd/system/pmguard-agent.service");
    let edited: String = std::fs::read_to_string(&unit)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("User="))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&unit, edited).unwrap();
    becomes_an_instance(&s, "alice");
    assert_eq!(s.names(), "ubuntu, alice, bob");
}

/// When nothing says whose the single-user install is (its manifest names no user; unit, cron
/// line and logrotate file gone, no pm2_home in its config), no other user's install replaces
/// it, --force or not: an error names the manifest and the way out. Its own user completes it
/// (nothing of it changes), and --take-over is the explicit way to make it someone's.
#[test]
fn force_never_hands_a_single_install_nothing_names_the_user_of_to_another_user() {
    let s = Staged::new();
    assert!(s.install("ubuntu", &[]).status.success());
    set_manifest_user(&s, None);
    for p in [
        "etc/systemd/system/pmguard-agent.service",
        "etc/cron.d/pmguard",
        "etc/logrotate.d/pmguard",
    ] {
        std::fs::remove_file(s.root().join(p)).unwrap();
    }
    let before = single_files(&s);
    for extra in [&[][..], &["--force"][..]] {
        let out = s.install("bob", extra);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {t}");
        assert!(
            t.contains(
                "/etc/pmguard/install-manifest.json records a pmguard install but not whose"
            ) && t.contains("would replace /etc/pmguard/pmguard.toml")
                && t.contains("--take-over")
                && t.contains("sudo pmguard uninstall"),
            "{t}"
        );
        assert_eq!(single_files(&s), before, "{extra:?}: {t}");
        assert!(!s.root().join("etc/pmguard/users/bob").exists());
    }
    // ubuntu's own install, re-run: its config is the same bytes, the rest is created again.
    let out = s.install("ubuntu", &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(s.names(), "ubuntu");
    // Said outright, the install is taken over (a user field that is no name names nobody).
    set_manifest_user(&s, Some(serde_json::json!("../x")));
    std::fs::remove_file(s.root().join("etc/systemd/system/pmguard-agent.service")).unwrap();
    std::fs::remove_file(s.root().join("etc/cron.d/pmguard")).unwrap();
    std::fs::remove_file(s.root().join("etc/logrotate.d/pmguard")).unwrap();
    let out = s.install("bob", &["--take-over"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(s.names(), "bob");
    assert!(!s.root().join("etc/pmguard/users/bob").exists());
}

/// A single-user install whose manifest is gone (moved aside, as the error for an unreadable
/// one says) is still its user's: its files say whose, and another user's install, --force or
/// not, changes none of them but says to re-run that user's install first. That re-run records
/// it again, and the other user's install becomes an agent of its own.
#[test]
fn force_never_hands_a_single_install_without_its_manifest_to_another_user() {
    let s = Staged::new();
    assert!(s.install("ubuntu", &[]).status.success());
    let manifest = s.root().join("etc/pmguard/install-manifest.json");
    let aside = s.dir.path().join("install-manifest.json");
    std::fs::rename(&manifest, &aside).unwrap();
    let before = single_files(&s);
    for extra in [&[][..], &["--force"][..], &["--force", "--take-over"][..]] {
        let out = s.install("bob", extra);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {t}");
        assert!(
            t.contains("/etc/systemd/system/pmguard-agent.service (User=ubuntu) says the single-user install here is `ubuntu`'s")
                && t.contains("sudo pmguard install --user ubuntu"),
            "{t}"
        );
        assert_eq!(single_files(&s), before, "{extra:?}: {t}");
        assert!(!manifest.exists(), "{extra:?}: {t}");
    }
    assert!(s.install("ubuntu", &[]).status.success());
    assert!(s.install("bob", &["--force"]).status.success());
    assert_eq!(single_files(&s), before);
    assert_eq!(s.names(), "ubuntu, bob");
}
