//! End to end on a real systemd: a Debian root booted with systemd-nspawn (tests/e2e/nspawn.sh),
//! node + PM2 + the sample app under pm2-ubuntu.service, then `pmguard install` inside. Asserts
//! the agent is active, told systemd READY, keeps pinging the watchdog, restarts a hung app,
//! that a second install does nothing, and that `pmguard uninstall` stops it and leaves no trace.
//! Needs root and the cached root from `tests/e2e/nspawn.sh prepare` (bash .ci/run does it).

use std::time::{Duration, Instant};

#[path = "common/machine.rs"]
mod machine;

use machine::{ok, sh, Machine};

impl Machine {
    fn show(&self, prop: &str) -> String {
        self.run(&[
            "systemctl",
            "show",
            "-p",
            prop,
            "--value",
            "pmguard-agent.service",
        ])
        .trim()
        .to_string()
    }
}

#[test]
fn install_on_a_real_systemd_restarts_a_hung_app_and_uninstalls_cleanly() {
    let m = Machine::with_pmguard("pmg");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("pmguard.toml");
    std::fs::write(
        &cfg,
        "[agent]\ninterval = \"1s\"\n\n[[apps]]\nname = \"codebox\"\nhealth_url = \"http://127.0.0.1:5000/health\"\ntimeout = \"1s\"\nmax_retries = 3\nretry_interval = \"1s\"\nrestart_cooldown = \"10s\"\nstartup_grace = \"5s\"\n",
    )
    .unwrap();
    ok(&["copy-in", &m.0, cfg.to_str().unwrap(), "/root/pmguard.toml"]);

    let install = |m: &Machine| {
        m.run(&[
            "/root/pmguard",
            "install",
            "--config",
            "/root/pmguard.toml",
            "--user",
            "ubuntu",
        ])
    };
    let out = install(&m);
    assert!(
        out.contains("systemctl restart pmguard-agent.service"),
        "{out}"
    );
    m.wait("the agent active", Duration::from_secs(20), |m| {
        m.show("ActiveState") == "active"
    });
    // Type=notify: active means READY=1 arrived.
    assert_eq!(m.show("Type"), "notify");
    assert_eq!(m.show("WatchdogUSec"), "30s");
    let first = m.show("WatchdogTimestampMonotonic");
    m.wait("a watchdog ping", Duration::from_secs(30), |m| {
        m.show("WatchdogTimestampMonotonic") != first
    });
    assert_eq!(m.show("NRestarts"), "0");

    // Hang the app: the agent restarts it through PM2.
    let recovered = m.hang_app_and_wait_for_recovery(Duration::from_secs(40));
    eprintln!("hung app back in {:?}", recovered);
    let journal = m.run(&["journalctl", "-u", "pmguard-agent", "--no-pager"]);
    assert!(journal.contains("Restarting:"), "{journal}");

    // doctor, on the real systemd: every check passes, the unit ones included.
    let doctor = m.exec(&["/root/pmguard", "doctor", "--json"]);
    let checks: serde_json::Value = serde_json::from_slice(&doctor.stdout)
        .unwrap_or_else(|e| panic!("doctor: {e}: {}", String::from_utf8_lossy(&doctor.stdout)));
    let status = |name: &str| {
        checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == name)
            .map(|c| c["status"].as_str().unwrap().to_string())
    };
    assert_eq!(doctor.status.code(), Some(0), "{checks:#}");
    for name in [
        "unit enabled",
        "unit active",
        "watchdog",
        "agent alive",
        "pm2 daemon",
        "health codebox",
        "cron file name",
        "installed files",
        "unit file",
    ] {
        assert_eq!(status(name).as_deref(), Some("ok"), "{name}: {checks:#}");
    }
    // Just restarted by pmguard: ok, or a warning about recent restarts, never a failure.
    assert_ne!(status("app codebox").as_deref(), Some("fail"), "{checks:#}");
    // `status` as root, reading the PM2 user's state directory: the agent, inside its unit's
    // sandbox, watches that directory, so the reader's open gets it a fresh status.json.
    let shown = m.exec(&[
        "/usr/local/bin/pmguard-agent",
        "status",
        "--json",
        "--config",
        "/root/pmguard.toml",
    ]);
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout)
        .unwrap_or_else(|e| panic!("status: {e}: {}", String::from_utf8_lossy(&shown.stdout)));
    assert_eq!(shown["fresh_on_read"], true, "{shown:#}");
    // PM2 is under pm2-ubuntu.service (`pm2 startup`): install added no unit of its own.
    assert_eq!(
        status("pm2 supervised").as_deref(),
        Some("ok"),
        "{checks:#}"
    );
    assert!(!m
        .exec(&["test", "-e", "/etc/systemd/system/pmguard-pm2.service"])
        .status
        .success());

    // The PM2 daemon SIGKILLed: systemd starts it again and the app answers within 15 s.
    let back = pm2_killed_and_back(&m);
    eprintln!("PM2 daemon SIGKILLed (pm2-ubuntu.service): app healthy again in {back:?}");
    assert!(back <= Duration::from_secs(15), "{back:?}");

    // Again: nothing to do.
    let out = install(&m);
    assert!(out.starts_with("Nothing to do."), "{out}");

    // Uninstall: stopped, disabled, and no file of ours left.
    let out = m.run(&["/root/pmguard", "uninstall"]);
    assert!(
        out.contains("systemctl disable --now pmguard-agent.service"),
        "{out}"
    );
    assert_ne!(m.show("ActiveState"), "active");
    for p in [
        "/etc/systemd/system/pmguard-agent.service",
        "/usr/local/bin/pmguard-agent",
        "/etc/pmguard",
        "/etc/cron.d/pmguard",
        "/etc/logrotate.d/pmguard",
    ] {
        assert!(
            !m.exec(&["test", "-e", p]).status.success(),
            "{p} is left behind"
        );
    }
    // The app itself is untouched and still served by PM2.
    assert!(m
        .exec(&["curl", "-fsS", "http://127.0.0.1:5000/health"])
        .status
        .success());

    // A box where PM2 was started by hand (`pm2 startup` never run): install lays down
    // pmguard-pm2.service, enabled for boot but not started over the live daemon, and says how
    // to hand the daemon over; after the handover a killed daemon is back within 15 s.
    m.run(&["systemctl", "disable", "--now", "pm2-ubuntu"]);
    m.run(&["rm", "-f", "/etc/systemd/system/pm2-ubuntu.service"]);
    m.run(&["systemctl", "daemon-reload"]);
    as_ubuntu(&m, "pm2 resurrect");
    m.wait(
        "the app under a hand-started PM2",
        Duration::from_secs(20),
        app_answers,
    );
    let out = install(&m);
    assert!(
        out.contains("create /etc/systemd/system/pmguard-pm2.service"),
        "{out}"
    );
    assert!(
        out.contains("systemctl enable pmguard-pm2.service"),
        "{out}"
    );
    assert!(
        !out.lines()
            .any(|l| l == "systemctl start pmguard-pm2.service"),
        "{out}"
    );
    assert!(out.contains("PM2 runs outside systemd now"), "{out}");
    let doctor = m.exec(&["/root/pmguard", "doctor", "--json"]);
    let checks: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let supervised = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "pm2 supervised")
        .cloned()
        .unwrap_or_default();
    assert_eq!(supervised["status"], "warn", "{checks:#}");
    // The handover the plan printed.
    as_ubuntu(&m, "pm2 save --force && pm2 kill");
    m.run(&["systemctl", "start", "pmguard-pm2.service"]);
    m.wait(
        "the app under pmguard-pm2.service",
        Duration::from_secs(20),
        app_answers,
    );
    assert_eq!(
        m.run(&["systemctl", "is-enabled", "pmguard-pm2.service"])
            .trim(),
        "enabled",
        "started at boot"
    );
    let back = pm2_killed_and_back(&m);
    eprintln!("PM2 daemon SIGKILLed (pmguard-pm2.service): app healthy again in {back:?}");
    assert!(back <= Duration::from_secs(15), "{back:?}");
    // Uninstall leaves PM2 and the app running, unsupervised, and says so.
    let out = m.run(&["/root/pmguard", "uninstall"]);
    assert!(out.contains("PM2 keeps running"), "{out}");
    assert!(!m
        .exec(&["test", "-e", "/etc/systemd/system/pmguard-pm2.service"])
        .status
        .success());
    assert!(app_answers(&m));
}

fn app_answers(m: &Machine) -> bool {
    m.exec(&[
        "curl",
        "-fsS",
        "--max-time",
        "1",
        "http://127.0.0.1:5000/health",
    ])
    .status
    .success()
}

fn as_ubuntu(m: &Machine, cmd: &str) {
    let o = sh(&["exec-as", &m.0, "ubuntu", "sh", "-c", cmd]);
    assert!(
        o.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// SIGKILLs the PM2 daemon and times until the app answers again under a new daemon.
fn pm2_killed_and_back(m: &Machine) -> Duration {
    let pid = m
        .run(&["cat", "/home/ubuntu/.pm2/pm2.pid"])
        .trim()
        .to_string();
    assert!(!pid.is_empty());
    let started = Instant::now();
    m.run(&["kill", "-KILL", &pid]);
    m.wait(
        "the app back under a new PM2 daemon",
        Duration::from_secs(30),
        |m| {
            let now = m.exec(&["cat", "/home/ubuntu/.pm2/pm2.pid"]).stdout;
            String::from_utf8_lossy(&now).trim() != pid && app_answers(m)
        },
    );
    started.elapsed()
}
