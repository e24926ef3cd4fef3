//! End to end on a real systemd: a Debian root booted with systemd-nspawn (tests/e2e/nspawn.sh),
//! node + PM2 + the sample app under pm2-ubuntu.service, then `pmguard install` inside. Asserts
//! the agent is active, told systemd READY, keeps pinging the watchdog, restarts a hung app,
//! that a second install does nothing, and that `pmguard uninstall` stops it and leaves no trace.
//! Needs root and the cached root from `tests/e2e/nspawn.sh prepare` (bash .ci/run does it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const PMGUARD: &str = env!("CARGO_BIN_EXE_pmguard");

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/nspawn.sh")
}

fn sh(args: &[&str]) -> Output {
    Command::new("bash")
        .arg(script())
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = sh(args);
    assert!(
        o.status.success(),
        "nspawn.sh {args:?} failed ({}):\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

struct Machine(String);

impl Machine {
    fn exec(&self, cmd: &[&str]) -> Output {
        let mut args = vec!["exec", self.0.as_str()];
        args.extend_from_slice(cmd);
        sh(&args)
    }
    fn run(&self, cmd: &[&str]) -> String {
        let mut args = vec!["exec", self.0.as_str()];
        args.extend_from_slice(cmd);
        ok(&args)
    }
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
    fn wait(&self, what: &str, limit: Duration, mut f: impl FnMut(&Machine) -> bool) {
        let deadline = Instant::now() + limit;
        while !f(self) {
            if Instant::now() > deadline {
                let journal = self.exec(&[
                    "journalctl",
                    "-u",
                    "pmguard-agent",
                    "--no-pager",
                    "-n",
                    "60",
                ]);
                panic!(
                    "timed out waiting for {what}; agent journal:\n{}",
                    String::from_utf8_lossy(&journal.stdout)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = sh(&["teardown", &self.0]);
    }
}

#[test]
fn install_on_a_real_systemd_restarts_a_hung_app_and_uninstalls_cleanly() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the end-to-end test boots a container: run it as root (CI does)"
    );
    let agent = Path::new(PMGUARD).with_file_name("pmguard-agent");
    assert!(
        agent.exists(),
        "{} is missing: run `cargo test --workspace`",
        agent.display()
    );
    ok(&["prepare"]);
    let m = Machine(format!("pmg{}", std::process::id()));
    ok(&["boot", &m.0]);
    ok(&["setup-app", &m.0]);
    ok(&["copy-in", &m.0, PMGUARD, "/root/pmguard"]);
    ok(&[
        "copy-in",
        &m.0,
        agent.to_str().unwrap(),
        "/root/pmguard-agent",
    ]);
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
    let pid_of = |m: &Machine| {
        m.run(&["sh", "-c", "pgrep -u ubuntu -f 'app.js' | head -1"])
            .trim()
            .to_string()
    };
    let hung = pid_of(&m);
    assert!(!hung.is_empty());
    let started = Instant::now();
    m.run(&["kill", "-STOP", &hung]);
    m.wait(
        "the hung app replaced and healthy",
        Duration::from_secs(40),
        |m| {
            let now = pid_of(m);
            !now.is_empty()
                && now != hung
                && m.exec(&[
                    "curl",
                    "-fsS",
                    "--max-time",
                    "1",
                    "http://127.0.0.1:5000/health",
                ])
                .status
                .success()
        },
    );
    eprintln!("hung app back in {:?}", started.elapsed());
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
}
