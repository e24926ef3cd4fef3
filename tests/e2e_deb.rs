//! From the .deb to a watched app on a real systemd, as a user would on a fresh server: a Debian 12
//! root booted with systemd-nspawn (tests/e2e/nspawn.sh) running the sample app under
//! pm2-ubuntu.service; `dpkg -i` the package from `bash dist/build` (no cargo binary copied in),
//! `pmguard init` against the PM2 daemon of user ubuntu, `pmguard install` with that config; the
//! agent is active and restarts a hung app; `pmguard uninstall` and `dpkg -r` leave the root's
//! files as they were.
//!
//! Needs root, the cached root from `tests/e2e/nspawn.sh prepare` and the artifacts from
//! `bash dist/build` (bash .ci/run does both before the tests).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

#[path = "common/machine.rs"]
mod machine;

use machine::{built_deb, ok, Machine};

impl Machine {
    fn active(&self) -> bool {
        self.exec(&["systemctl", "is-active", "--quiet", "pmguard-agent.service"])
            .status
            .success()
    }

    /// Every path on the root file system, minus what the system itself keeps changing (package
    /// database, logs, caches, runtime state, PM2's own home) and the test's own config.
    fn file_list(&self) -> BTreeSet<String> {
        let out = self.run(&["find", "/", "-xdev"]);
        let volatile = [
            "/proc",
            "/sys",
            "/run",
            "/tmp",
            "/var/tmp",
            "/var/log",
            "/var/cache",
            "/var/lib/dpkg",
            "/var/lib/systemd",
            "/home/ubuntu/.pm2",
            "/root",
        ];
        out.lines()
            .filter(|p| {
                !volatile
                    .iter()
                    .any(|v| p == v || p.starts_with(&format!("{v}/")))
            })
            .map(str::to_owned)
            .collect()
    }
}

#[test]
fn deb_then_init_then_install_watches_the_app_and_removes_cleanly() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "the end-to-end test boots a container: run it as root (CI does)"
    );
    let deb = built_deb();
    ok(&["prepare"]);
    let m = Machine(format!("pmgdeb{}", std::process::id()));
    ok(&["boot", &m.0]);
    ok(&["setup-app", &m.0]);
    let before = m.file_list();
    ok(&["copy-in", &m.0, deb.to_str().unwrap(), "/root/pmguard.deb"]);

    let started = Instant::now();
    m.run(&["dpkg", "-i", "/root/pmguard.deb"]);
    assert!(!m.active(), "installing the package must start nothing");

    // A starter config from the apps PM2 runs for ubuntu (no pm2 process is started for it).
    let pm2_procs = |m: &Machine| m.run(&["sh", "-c", "pgrep -c -f 'PM2 v' || true"]);
    let daemons = pm2_procs(&m);
    m.run(&[
        "pmguard",
        "init",
        "--user",
        "ubuntu",
        "--output",
        "/root/pmguard.toml",
    ]);
    assert_eq!(pm2_procs(&m), daemons, "init started a PM2 daemon");
    let config = m.run(&["cat", "/root/pmguard.toml"]);
    assert!(config.contains("name = \"codebox\""), "{config}");
    assert!(
        config.contains("\nhealth_url = \"http://127.0.0.1:5000/\""),
        "{config}"
    );
    // What its header asks a person to do: point the URL at the app's health path. Short
    // periods keep the test quick.
    m.run(&[
        "sed",
        "-i",
        "-e",
        r#"s|^health_url = "http://127.0.0.1:5000/"$|health_url = "http://127.0.0.1:5000/health"\ntimeout = "1s"\nretry_interval = "1s"\nstartup_grace = "5s"\nrestart_cooldown = "10s"|"#,
        "-e",
        r#"s|^interval = "10s"$|interval = "1s"|"#,
        "/root/pmguard.toml",
    ]);
    m.run(&[
        "pmguard-agent",
        "validate",
        "--config",
        "/root/pmguard.toml",
    ]);

    let out = m.run(&[
        "pmguard",
        "install",
        "--config",
        "/root/pmguard.toml",
        "--user",
        "ubuntu",
    ]);
    assert!(
        out.contains("systemctl restart pmguard-agent.service"),
        "{out}"
    );
    m.wait("the agent active", Duration::from_secs(30), Machine::active);
    let to_active = started.elapsed();
    let unit = m.run(&["systemctl", "cat", "pmguard-agent.service"]);
    assert!(
        unit.contains("ExecStart=/usr/bin/pmguard-agent run"),
        "{unit}"
    );
    assert!(!m
        .exec(&["test", "-e", "/usr/local/bin/pmguard-agent"])
        .status
        .success());

    // Hang the app: the packaged agent restarts it through PM2.
    let recovered = m.hang_app_and_wait_for_recovery(Duration::from_secs(60));

    let doctor = m.exec(&["pmguard", "doctor", "--config", "/etc/pmguard/pmguard.toml"]);
    let table = String::from_utf8_lossy(&doctor.stdout);
    assert!(table.contains("/usr/bin/pmguard-agent (sha256 "), "{table}");

    m.run(&["pmguard", "uninstall"]);
    assert!(!m.active());
    assert!(m
        .exec(&["test", "-x", "/usr/bin/pmguard-agent"])
        .status
        .success());
    m.run(&["dpkg", "-r", "pmguard"]);
    let after = m.file_list();
    // Everything is gone, the agent's state directory (StateDirectory=) included.
    let added: Vec<_> = after.difference(&before).collect();
    let removed: Vec<_> = before.difference(&after).collect();
    assert!(
        added.is_empty() && removed.is_empty(),
        "left behind: {added:?}; removed: {removed:?}"
    );
    // The app itself is untouched and still served by PM2.
    assert!(m
        .exec(&["curl", "-fsS", "http://127.0.0.1:5000/health"])
        .status
        .success());

    // Removing the package without `pmguard uninstall` first: its prerm uninstalls, so no unit
    // or cron line is left to run a binary that is gone.
    m.run(&["dpkg", "-i", "/root/pmguard.deb"]);
    m.run(&[
        "pmguard",
        "install",
        "--config",
        "/root/pmguard.toml",
        "--user",
        "ubuntu",
    ]);
    m.wait(
        "the agent active again",
        Duration::from_secs(30),
        Machine::active,
    );
    m.run(&["dpkg", "-r", "pmguard"]);
    assert!(!m.active());
    for p in [
        "/etc/systemd/system/pmguard-agent.service",
        "/etc/cron.d/pmguard",
        "/etc/pmguard/install-manifest.json",
    ] {
        assert!(
            !m.exec(&["test", "-e", p]).status.success(),
            "{p} left after dpkg -r"
        );
    }
    eprintln!(
        "e2e from .deb: dpkg -i to an active agent {:.1} s; hung app back in {:.1} s",
        to_active.as_secs_f64(),
        recovered.as_secs_f64()
    );
}

/// The old set-up on the same box: `pm2-health-monitor.service` looping over
/// `monitor_health.sh`, and ubuntu's crontab running `cron_health_check.sh`.
const MONITOR_SH: &str = "#!/bin/bash\n# The old health monitor: curl the app, restart it through PM2 when it fails.\nwhile true; do\n  if ! curl -sf --max-time 5 http://127.0.0.1:5000/health >/dev/null; then\n    pm2 restart codebox\n  fi\n  sleep 30\ndone\n";
const MONITOR_UNIT: &str = "[Unit]\nDescription=PM2 Health Monitor\nAfter=network.target\n\n[Service]\nType=simple\nUser=ubuntu\nExecStart=/home/ubuntu/automatenb/monitor_health.sh\nRestart=always\n\n[Install]\nWantedBy=multi-user.target\n";
const CRON_LINE: &str = "*/3 * * * * /home/ubuntu/automatenb/cron_health_check.sh >> /home/ubuntu/automatenb/cron.log 2>&1";

#[test]
fn replace_legacy_stops_the_old_monitor_and_uninstall_puts_it_back() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "boots a container: run it as root (CI does)"
    );
    let deb = built_deb();
    ok(&["prepare"]);
    let m = Machine(format!("pmgleg{}", std::process::id()));
    ok(&["boot", &m.0]);
    ok(&["setup-app", &m.0]);
    ok(&["copy-in", &m.0, deb.to_str().unwrap(), "/root/pmguard.deb"]);
    m.run(&["dpkg", "-i", "/root/pmguard.deb"]);

    let dir = tempfile::tempdir().unwrap();
    let put = |name: &str, text: &str, dest: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        ok(&["copy-in", &m.0, p.to_str().unwrap(), dest]);
    };
    m.run(&["mkdir", "-p", "/home/ubuntu/automatenb"]);
    put(
        "monitor_health.sh",
        MONITOR_SH,
        "/home/ubuntu/automatenb/monitor_health.sh",
    );
    put(
        "cron_health_check.sh",
        MONITOR_SH
            .replace("while true; do", "for i in 1; do")
            .as_str(),
        "/home/ubuntu/automatenb/cron_health_check.sh",
    );
    put(
        "pm2-health-monitor.service",
        MONITOR_UNIT,
        "/etc/systemd/system/pm2-health-monitor.service",
    );
    put("crontab", &format!("{CRON_LINE}\n"), "/root/old-crontab");
    m.run(&[
        "chmod",
        "0755",
        "/home/ubuntu/automatenb/monitor_health.sh",
        "/home/ubuntu/automatenb/cron_health_check.sh",
    ]);
    m.run(&["chown", "-R", "ubuntu:ubuntu", "/home/ubuntu/automatenb"]);
    m.run(&["crontab", "-u", "ubuntu", "/root/old-crontab"]);
    m.run(&["systemctl", "daemon-reload"]);
    m.run(&["systemctl", "enable", "--now", "pm2-health-monitor.service"]);
    let old_active = |m: &Machine| {
        m.exec(&[
            "systemctl",
            "is-active",
            "--quiet",
            "pm2-health-monitor.service",
        ])
        .status
        .success()
    };
    assert!(old_active(&m));

    put(
        "pmguard.toml",
        "[agent]\ninterval = \"1s\"\n\n[[apps]]\nname = \"codebox\"\nhealth_url = \"http://127.0.0.1:5000/health\"\n",
        "/root/pmguard.toml",
    );
    let install = |extra: &[&str]| {
        let mut args = vec![
            "pmguard",
            "install",
            "--config",
            "/root/pmguard.toml",
            "--user",
            "ubuntu",
        ];
        args.extend_from_slice(extra);
        m.run(&args)
    };
    // Without the flag: shown in the plan, left running.
    let out = install(&[]);
    assert!(
        out.contains("Another monitor restarts PM2 apps here: systemd unit pm2-health-monitor.service (runs monitor_health.sh)"),
        "{out}"
    );
    assert!(
        out.contains("cron.log 2>&1` in /var/spool/cron/crontabs/ubuntu"),
        "{out}"
    );
    assert!(old_active(&m));
    let doctor = m.run(&[
        "sh",
        "-c",
        "pmguard doctor --config /etc/pmguard/pmguard.toml --json || true",
    ]);
    assert!(doctor.contains("\"other monitor\""), "{doctor}");

    // With it: stopped, disabled, the crontab line commented out; doctor is quiet about it.
    let out = install(&["--replace-legacy"]);
    assert!(
        out.contains("Replaced: systemctl disable --now pm2-health-monitor.service"),
        "{out}"
    );
    assert!(!old_active(&m));
    let crontab = m.run(&["crontab", "-u", "ubuntu", "-l"]);
    assert!(
        crontab.contains(&format!(
            "# disabled by pmguard install --replace-legacy: {CRON_LINE}"
        )),
        "{crontab}"
    );
    let doctor = m.run(&[
        "sh",
        "-c",
        "pmguard doctor --config /etc/pmguard/pmguard.toml --json || true",
    ]);
    assert!(!doctor.contains("\"other monitor\""), "{doctor}");
    assert!(install(&["--replace-legacy"]).contains("Nothing to do."));

    // Uninstall puts the old monitor back as it was.
    let out = m.run(&["pmguard", "uninstall"]);
    assert!(
        out.contains("Put back: systemctl enable pm2-health-monitor.service"),
        "{out}"
    );
    assert!(old_active(&m));
    assert!(m
        .exec(&[
            "systemctl",
            "is-enabled",
            "--quiet",
            "pm2-health-monitor.service"
        ])
        .status
        .success());
    assert_eq!(
        m.run(&["crontab", "-u", "ubuntu", "-l"]),
        format!("{CRON_LINE}\n")
    );
    assert!(!m.exec(&["test", "-e", "/etc/pmguard"]).status.success());
}
