//! Several PM2 users on one box, end to end on a real systemd (a Debian root booted with
//! systemd-nspawn, tests/e2e/nspawn.sh). `ubuntu` is installed first (the single-user layout,
//! `pmguard-agent.service`); then `alice` and `bob`, each with their own PM2 daemon under
//! `pm2-<user>.service` and an app of the same name, get `pmguard-agent@alice.service` and
//! `pmguard-agent@bob.service`. Asserts: each user's hung app is restarted by that user's agent;
//! doctor passes for every agent (and `--user` narrows it); `uninstall --user alice` removes
//! exactly alice's unit and files while bob's agent keeps running and still recovers a hung app;
//! ubuntu's install is untouched (re-running its command does nothing, its agent still recovers
//! its app); removing the last agent removes the shared files.
//! Needs root and the cached root from `tests/e2e/nspawn.sh prepare` (bash .ci/run does it).

use std::path::Path;
use std::time::{Duration, Instant};

#[path = "common/machine.rs"]
mod machine;

use machine::{sh, Machine};

/// A config for one user's agent: its app on `port`, its own state directory.
fn config(state_dir: &str, app: &str, port: u16) -> String {
    format!(
        "[agent]\ninterval = \"1s\"\n{state_dir}\n[[apps]]\nname = \"{app}\"\nhealth_url = \"http://127.0.0.1:{port}/health\"\ntimeout = \"1s\"\nmax_retries = 3\nretry_interval = \"1s\"\nrestart_cooldown = \"10s\"\nstartup_grace = \"5s\"\n"
    )
}

fn as_user(m: &Machine, user: &str, cmd: &str) {
    let o = sh(&["exec-as", &m.0, user, "sh", "-c", cmd]);
    assert!(
        o.status.success(),
        "{user}: {cmd}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A second PM2 user as `pm2 startup` leaves one: the sample app as `web` on `port`, its PM2
/// daemon under `pm2-<user>.service`.
fn add_pm2_user(m: &Machine, user: &str, uid: u32, port: u16) {
    m.run(&[
        "useradd",
        "-m",
        "-u",
        &uid.to_string(),
        "-s",
        "/bin/sh",
        user,
    ]);
    let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("agent/tests/apps/app.js");
    m.copy_in(&app, &format!("/home/{user}/app/app.js"));
    m.run(&[
        "chown",
        "-R",
        &format!("{user}:{user}"),
        &format!("/home/{user}/app"),
    ]);
    as_user(
        m,
        user,
        &format!("PORT={port} pm2 start $HOME/app/app.js --name web >/dev/null && pm2 save --force >/dev/null && pm2 kill >/dev/null"),
    );
    m.run(&[
        "pm2",
        "startup",
        "systemd",
        "-u",
        user,
        "--hp",
        &format!("/home/{user}"),
    ]);
    m.run(&["systemctl", "enable", "--now", &format!("pm2-{user}")]);
    let url = format!("http://127.0.0.1:{port}/health");
    m.wait(&format!("{user}'s app"), Duration::from_secs(30), |m| {
        m.exec(&["curl", "-fsS", "--max-time", "1", &url])
            .status
            .success()
    });
}

fn install(m: &Machine, user: &str, config: &str) -> String {
    m.run(&[
        "/root/pmguard",
        "install",
        "--config",
        config,
        "--user",
        user,
    ])
}

fn active(m: &Machine, unit: &str) -> bool {
    m.exec(&["systemctl", "is-active", "--quiet", unit])
        .status
        .success()
}

fn exists(m: &Machine, path: &str) -> bool {
    m.exec(&["test", "-e", path]).status.success()
}

/// `pmguard doctor --json ARGS...`: exit code and checks.
fn doctor(m: &Machine, args: &[&str]) -> (Option<i32>, Vec<serde_json::Value>) {
    let mut cmd = vec!["/root/pmguard", "doctor", "--json"];
    cmd.extend_from_slice(args);
    let out = m.exec(&cmd);
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code(), checks.as_array().unwrap().clone())
}

fn status_of<'a>(checks: &'a [serde_json::Value], unit: &str, name: &str) -> Option<&'a str> {
    checks
        .iter()
        .find(|c| c["unit"] == unit && c["check"] == name)
        .and_then(|c| c["status"].as_str())
}

#[test]
fn two_users_two_agents_each_recovers_its_own_app_and_uninstall_of_one_leaves_the_other() {
    let started = Instant::now();
    let m = Machine::with_pmguard("pmgmu");
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("ubuntu.toml", config("", "codebox", 5000)),
        (
            "alice.toml",
            config("state_dir = \"/var/lib/pmguard-alice\"\n", "web", 5001),
        ),
        (
            "bob.toml",
            config("state_dir = \"/var/lib/pmguard-bob\"\n", "web", 5002),
        ),
        // bob's app watched with alice's state directory: refused.
        (
            "clash.toml",
            config("state_dir = \"/var/lib/pmguard-alice\"\n", "web", 5002),
        ),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        m.copy_in(&p, &format!("/root/{name}"));
    }

    // The box as it was: one user, the single-user layout.
    let out = install(&m, "ubuntu", "/root/ubuntu.toml");
    assert!(
        out.contains("systemctl restart pmguard-agent.service"),
        "{out}"
    );
    let single_unit = m.run(&["cat", "/etc/systemd/system/pmguard-agent.service"]);

    add_pm2_user(&m, "alice", 1001, 5001);
    add_pm2_user(&m, "bob", 1002, 5002);
    let out = install(&m, "alice", "/root/alice.toml");
    assert!(
        out.contains("create /etc/systemd/system/pmguard-agent@.service"),
        "{out}"
    );
    assert!(
        out.contains("systemctl restart pmguard-agent@alice.service"),
        "{out}"
    );
    let clash = m.exec(&[
        "/root/pmguard",
        "install",
        "--config",
        "/root/clash.toml",
        "--user",
        "bob",
    ]);
    let err = String::from_utf8_lossy(&clash.stderr);
    assert_eq!(clash.status.code(), Some(2), "{err}");
    assert!(err.contains("already used by alice's agent"), "{err}");
    let out = install(&m, "bob", "/root/bob.toml");
    assert!(
        !out.contains("create /etc/systemd/system/pmguard-agent@.service"),
        "{out}"
    );
    for unit in [
        "pmguard-agent.service",
        "pmguard-agent@alice.service",
        "pmguard-agent@bob.service",
    ] {
        m.wait(&format!("{unit} active"), Duration::from_secs(20), |m| {
            active(m, unit)
        });
    }
    assert_eq!(
        m.run(&[
            "systemctl",
            "show",
            "-p",
            "User",
            "--value",
            "pmguard-agent@bob.service"
        ])
        .trim(),
        "bob"
    );

    // Each user's hung app, at once: each agent restarts its own.
    let back = m.hang_apps_and_wait_for_recovery(
        &[("alice", 5001), ("bob", 5002)],
        Duration::from_secs(40),
    );
    eprintln!("alice's and bob's hung apps both back in {back:?}");
    for user in ["alice", "bob"] {
        let journal = m.run(&[
            "journalctl",
            "-u",
            &format!("pmguard-agent@{user}"),
            "--no-pager",
        ]);
        assert!(journal.contains("Restarting:"), "{user}: {journal}");
    }
    let ubuntu_journal = m.run(&["journalctl", "-u", "pmguard-agent", "--no-pager"]);
    assert!(!ubuntu_journal.contains("Restarting:"), "{ubuntu_journal}");

    // doctor: every agent, every check passes; --user narrows it to one.
    let (code, checks) = doctor(&m, &[]);
    assert_eq!(code, Some(0), "{checks:#?}");
    for unit in [
        "pmguard-agent.service",
        "pmguard-agent@alice.service",
        "pmguard-agent@bob.service",
    ] {
        for name in [
            "unit file",
            "unit active",
            "watchdog",
            "agent alive",
            "cron file name",
            "installed files",
            "pm2 daemon",
            "pm2 supervised",
        ] {
            assert_eq!(
                status_of(&checks, unit, name),
                Some("ok"),
                "{unit} {name}: {checks:#?}"
            );
        }
    }
    assert_eq!(
        status_of(&checks, "pmguard-agent@alice.service", "unit drop-in"),
        Some("ok")
    );
    assert_eq!(
        status_of(&checks, "pmguard-agent@bob.service", "health web"),
        Some("ok")
    );
    let (code, checks) = doctor(&m, &["--user", "bob"]);
    assert_eq!(code, Some(0), "{checks:#?}");
    assert!(
        checks
            .iter()
            .all(|c| c["unit"] == "pmguard-agent@bob.service"),
        "{checks:#?}"
    );

    // Uninstall with several agents needs --user; with it, exactly alice's agent goes.
    let which = m.exec(&["/root/pmguard", "uninstall"]);
    assert_eq!(which.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&which.stderr).contains("pass --user"));
    let out = m.run(&["/root/pmguard", "uninstall", "--user", "alice"]);
    assert!(
        out.contains("systemctl disable --now pmguard-agent@alice.service"),
        "{out}"
    );
    assert!(!active(&m, "pmguard-agent@alice.service"));
    for p in [
        "/etc/systemd/system/pmguard-agent@alice.service.d",
        "/etc/systemd/system/multi-user.target.wants/pmguard-agent@alice.service",
        "/etc/pmguard/users/alice",
        "/etc/cron.d/pmguard-alice",
        "/etc/logrotate.d/pmguard-alice",
        "/var/lib/pmguard-alice",
    ] {
        assert!(!exists(&m, p), "{p} is left behind");
    }
    for p in [
        "/etc/systemd/system/pmguard-agent@.service",
        "/usr/local/bin/pmguard-agent",
        "/etc/cron.d/pmguard-bob",
    ] {
        assert!(exists(&m, p), "{p} went with alice");
    }
    assert!(active(&m, "pmguard-agent@bob.service"));
    assert!(
        active(&m, "pm2-alice.service"),
        "alice's PM2 and app keep running"
    );
    let back = m.hang_apps_and_wait_for_recovery(&[("bob", 5002)], Duration::from_secs(40));
    eprintln!("after alice's uninstall, bob's hung app back in {back:?}");

    // The first user's install: untouched by the others, and its own command changes nothing.
    assert_eq!(
        m.run(&["cat", "/etc/systemd/system/pmguard-agent.service"]),
        single_unit
    );
    let out = install(&m, "ubuntu", "/root/ubuntu.toml");
    assert!(out.starts_with("Nothing to do."), "{out}");
    let out = install(&m, "bob", "/root/bob.toml");
    assert!(out.starts_with("Nothing to do."), "{out}");
    let back = m.hang_app_and_wait_for_recovery(Duration::from_secs(40));
    eprintln!("ubuntu's hung app (single-user layout) back in {back:?}");

    // The last two go: nothing of pmguard's is left.
    m.run(&["/root/pmguard", "uninstall", "--user", "ubuntu"]);
    assert!(active(&m, "pmguard-agent@bob.service"));
    assert!(exists(&m, "/usr/local/bin/pmguard-agent"));
    m.run(&["/root/pmguard", "uninstall", "--user", "bob"]);
    for p in [
        "/etc/systemd/system/pmguard-agent@.service",
        "/etc/systemd/system/pmguard-agent.service",
        "/usr/local/bin/pmguard-agent",
        "/etc/pmguard",
        "/etc/cron.d/pmguard-bob",
        "/var/lib/pmguard-bob",
    ] {
        assert!(!exists(&m, p), "{p} is left behind");
    }
    eprintln!("multi-user e2e: {:?}", started.elapsed());
}
