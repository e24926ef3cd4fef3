//! `pmguard doctor` on a matrix of broken set-ups: each is found by the right check with the
//! right fix, and a healthy set-up passes (exit 0). Real PM2, a real agent, a staged install;
//! AWS cases against ministack on 127.0.0.1.

#[path = "../agent/tests/aws_common/mod.rs"]
mod aws_common;
#[path = "../agent/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{free_port, set_mode, wait_until, Pm2Sandbox};
use serde_json::Value;

const PMGUARD: &str = env!("CARGO_BIN_EXE_pmguard");

fn agent_bin() -> PathBuf {
    let p = Path::new(PMGUARD).with_file_name("pmguard-agent");
    assert!(
        p.exists(),
        "{} is missing: run the suite with `cargo test --workspace`",
        p.display()
    );
    p
}

struct Setup {
    dir: tempfile::TempDir,
    root: PathBuf,
    config: PathBuf,
    agent: Option<Child>,
    port: u16,
}

impl Setup {
    fn new(pm2: &Pm2Sandbox, aws: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(
            root.join("etc/passwd"),
            "ubuntu:x:1000:1000::/home/ubuntu:/bin/bash\n",
        )
        .unwrap();
        std::fs::write(root.join("etc/group"), "ubuntu:x:1000:\n").unwrap();
        let port = free_port();
        pm2.start_app("codebox", port, &[]);
        let config = dir.path().join("pmguard.toml");
        std::fs::write(
            &config,
            format!(
                "[agent]\ninterval = \"300ms\"\nstate_dir = \"{}\"\npm2_home = \"{}\"\n\n[[apps]]\nname = \"codebox\"\nhealth_url = \"http://127.0.0.1:{port}/health\"\ntimeout = \"500ms\"\nstartup_grace = \"1m\"\nretry_interval = \"300ms\"\nmax_retries = 100\n{aws}",
                dir.path().join("state").display(),
                pm2.home().display()
            ),
        )
        .unwrap();
        let out = Command::new(PMGUARD)
            .args(["install", "--user", "ubuntu", "--config"])
            .arg(&config)
            .arg("--root")
            .arg(&root)
            .arg("--agent-bin")
            .arg(agent_bin())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Setup {
            dir,
            root,
            config,
            agent: None,
            port,
        }
    }

    fn start_agent(&mut self, env: &[(&str, String)]) {
        let mut cmd = Command::new(agent_bin());
        cmd.args(["run", "--config"])
            .arg(&self.config)
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.agent = Some(cmd.spawn().unwrap());
        let status = self.dir.path().join("state/status.json");
        wait_until(Duration::from_secs(10), "a heartbeat", || status.exists());
    }

    fn stop_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn doctor_with(&self, env: &[(&str, String)]) -> (Option<i32>, Vec<Value>) {
        let mut cmd = Command::new(PMGUARD);
        cmd.args(["doctor", "--json", "--user", "ubuntu", "--config"])
            .arg(&self.config)
            .arg("--root")
            .arg(&self.root);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out: Output = cmd.output().unwrap();
        let checks: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "doctor --json: {e}\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code(), checks)
    }

    fn doctor(&self) -> (Option<i32>, Vec<Value>) {
        self.doctor_with(&[])
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.stop_agent();
    }
}

fn find<'a>(checks: &'a [Value], name: &str) -> &'a Value {
    checks
        .iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no check `{name}` in {checks:#?}"))
}

fn assert_fails(checks: &[Value], name: &str, detail: &str, fix: &str) {
    let c = find(checks, name);
    assert_eq!(c["status"], "fail", "{c}");
    assert!(
        c["detail"].as_str().unwrap().contains(detail),
        "{name}: detail {c}"
    );
    assert!(c["fix"].as_str().unwrap().contains(fix), "{name}: fix {c}");
}

#[test]
fn healthy_passes_and_broken_apps_are_named_with_their_fix() {
    let pm2 = Pm2Sandbox::new();
    let mut s = Setup::new(&pm2, "");
    s.start_agent(&[]);
    let (code, checks) = s.doctor();
    let failed: Vec<&Value> = checks.iter().filter(|c| c["status"] == "fail").collect();
    assert_eq!(code, Some(0), "healthy set-up failed: {failed:#?}");
    for name in [
        "config",
        "agent binary",
        "unit file",
        "cron backup check",
        "logrotate file",
        "cron file name",
        "installed files",
        "agent alive",
        "pm2 daemon",
        "app codebox",
        "health codebox",
        "cpu codebox",
    ] {
        assert_eq!(find(&checks, name)["status"], "ok", "{name}");
    }
    assert_eq!(
        find(&checks, "systemd unit")["status"],
        "warn",
        "staging root: systemd not asked"
    );

    // dump.pm2 (what a reboot or `pm2 resurrect` brings back) against what PM2 runs.
    assert_eq!(
        find(&checks, "pm2 dump")["status"],
        "warn",
        "no dump saved yet"
    );
    assert!(pm2.pm2(&["save", "--force"]).status.success());
    let dump = find(&s.doctor().1, "pm2 dump").clone();
    assert_eq!(dump["status"], "ok", "{dump}");
    pm2.start_app("unsaved", free_port(), &[]);
    let dump = find(&s.doctor().1, "pm2 dump").clone();
    assert_eq!(dump["status"], "warn", "{dump}");
    assert!(
        dump["detail"]
            .as_str()
            .unwrap()
            .contains("would not come back: unsaved"),
        "{dump}"
    );
    assert!(pm2.pm2(&["delete", "unsaved"]).status.success());

    set_mode(s.port, "500").unwrap();
    let (code, checks) = s.doctor();
    assert_eq!(code, Some(1));
    assert_fails(&checks, "health codebox", "http 500", "pm2 logs codebox");
    set_mode(s.port, "ok").unwrap();

    let pid = pm2.pids("codebox")[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .ok();
    let (_, checks) = s.doctor();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGCONT,
    )
    .ok();
    assert_fails(&checks, "cpu codebox", "stopped (state T)", "kill -CONT");
    assert_fails(&checks, "health codebox", "timed out", "pm2 logs codebox");

    s.stop_agent();
    assert!(pm2.pm2(&["stop", "codebox"]).status.success());
    let (_, checks) = s.doctor();
    assert_fails(
        &checks,
        "app codebox",
        "pm_id 0 is stopped",
        "pm2 start codebox",
    );
    wait_until(Duration::from_secs(10), "a stale heartbeat", || {
        find(&s.doctor().1, "agent alive")["status"] == "fail"
    });
    assert_fails(
        &s.doctor().1,
        "agent alive",
        "the agent is dead or wedged",
        "systemctl restart pmguard-agent.service",
    );

    pm2.kill_daemon();
    let (_, checks) = s.doctor();
    assert_fails(&checks, "pm2 daemon", "no PM2 daemon answers", "pm2_home");
}

#[test]
fn broken_files_are_found() {
    let pm2 = Pm2Sandbox::new();
    let mut s = Setup::new(&pm2, "");
    s.start_agent(&[]);
    // A unit edited by hand.
    let unit = s.root.join("etc/systemd/system/pmguard-agent.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    std::fs::write(&unit, text.replace("Restart=on-failure", "Restart=no")).unwrap();
    let (code, checks) = s.doctor();
    assert_eq!(code, Some(1));
    assert_fails(&checks, "unit file", "-Restart=no", "pmguard install");
    std::fs::write(&unit, text).unwrap();
    // A cron file cron would ignore: bad name, then bad mode.
    let cron = s.root.join("etc/cron.d/pmguard");
    let bad = s.root.join("etc/cron.d/pmguard.cron");
    std::fs::rename(&cron, &bad).unwrap();
    assert_fails(
        &s.doctor().1,
        "cron file name",
        "cron ignores files whose names",
        "mv /etc/cron.d/pmguard.cron /etc/cron.d/pmguard",
    );
    std::fs::rename(&bad, &cron).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cron, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (_, checks) = s.doctor();
    assert_fails(
        &checks,
        "cron file name",
        "mode 0666",
        "chmod 0644 /etc/cron.d/pmguard",
    );
    assert_fails(
        &checks,
        "installed files",
        "/etc/cron.d/pmguard is world-writable",
        "pmguard install",
    );
    std::fs::set_permissions(&cron, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(s.doctor().0, Some(0));
    // A staged agent swapped for something else: found by its hash, never executed (doctor
    // runs as root; the file under --root may be anyone's).
    let agent = s.root.join("usr/local/bin/pmguard-agent");
    let real = std::fs::read(&agent).unwrap();
    let marker = s.root.join("executed");
    std::fs::write(
        &agent,
        format!(
            "#!/bin/sh\ntouch '{}'\necho pmguard-agent 0.1.0\n",
            marker.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_fails(
        &s.doctor().1,
        "agent binary",
        "is not the file install laid down",
        "pmguard install",
    );
    assert!(!marker.exists(), "doctor executed the staged agent");
    std::fs::write(&agent, real).unwrap();
    assert_eq!(s.doctor().0, Some(0));
    // Wrong PM2_HOME: nothing answers there.
    let cfg = std::fs::read_to_string(&s.config).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::write(
        &s.config,
        cfg.replace(
            &pm2.home().display().to_string(),
            &elsewhere.path().display().to_string(),
        ),
    )
    .unwrap();
    let (_, checks) = s.doctor();
    assert_fails(
        &checks,
        "pm2 daemon",
        &elsewhere.path().join("rpc.sock").display().to_string(),
        "pm2_home",
    );
    // An invalid config: named, with file:line, and nothing else is judged on it.
    std::fs::write(&s.config, "[agent]\ninterval = 5\n").unwrap();
    let (code, checks) = s.doctor();
    assert_eq!(code, Some(1));
    assert_fails(
        &checks,
        "config",
        "pmguard.toml:2:12",
        "pmguard-agent validate",
    );
    assert_eq!(checks.len(), 1);
}

#[test]
fn aws_endpoint_down_and_drifted_alarms_are_found() {
    let ms = aws_common::Ministack::start();
    let pm2 = Pm2Sandbox::new();
    let mut s = Setup::new(&pm2, "\n[aws]\nregion = \"us-east-1\"\nsns_topic = \"pmguard-alerts\"\nalarm_email = \"ops@example.com\"\ninstance_id = \"i-doctor\"\nflush_interval = \"1s\"\n");
    let env: Vec<(&str, String)> = ms.env();
    s.start_agent(&env);
    let out = Command::new(PMGUARD)
        .args(["provision-aws", "--config"])
        .arg(&s.config)
        .envs(env.iter().map(|(k, v)| (*k, v.clone())))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(Duration::from_secs(20), "metrics arriving", || {
        find(&s.doctor_with(&env).1, "metrics")["status"] == "ok"
    });
    let (code, checks) = s.doctor_with(&env);
    let failed: Vec<&Value> = checks.iter().filter(|c| c["status"] == "fail").collect();
    assert_eq!(code, Some(0), "{failed:#?}");
    assert_eq!(find(&checks, "aws resources")["status"], "ok");
    assert_eq!(find(&checks, "alarm email")["status"], "ok");

    // Someone changes an alarm by hand.
    let cw = aws_sdk_cloudwatch::Client::new(&ms.sdk_config());
    aws_common::rt()
        .block_on(
            cw.put_metric_alarm()
                .alarm_name("pmguard-i-doctor-codebox-high-error-rate")
                .metric_name("HealthCheckFailures")
                .namespace("PM2/CodeBox")
                .statistic(aws_sdk_cloudwatch::types::Statistic::Sum)
                .period(300)
                .evaluation_periods(1)
                .threshold(50.0)
                .comparison_operator(
                    aws_sdk_cloudwatch::types::ComparisonOperator::GreaterThanThreshold,
                )
                .send(),
        )
        .unwrap();
    let (code, checks) = s.doctor_with(&env);
    assert_eq!(code, Some(1));
    assert_fails(
        &checks,
        "aws resources",
        "update alarm pmguard-i-doctor-codebox-high-error-rate",
        "pmguard provision-aws",
    );
    assert!(find(&checks, "aws resources")["detail"]
        .as_str()
        .unwrap()
        .contains("threshold: 50 -> 3"));

    // AWS unreachable.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut down = env.clone();
    down.retain(|(k, _)| *k != "AWS_ENDPOINT_URL");
    down.push(("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{closed}")));
    let (code, checks) = s.doctor_with(&down);
    assert_eq!(code, Some(1));
    assert_fails(&checks, "aws access", "", "cannot reach AWS");
}
