//! The agent end to end: the real `pmguard-agent` binary watching apps run by a real PM2 daemon.
//! Each test has its own PM2_HOME, state directory and ports, and short intervals.

mod agent_harness;
mod common;

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use agent_harness::{app, Agent, AGENT};

use common::{free_port, set_mode, wait_until, Pm2Sandbox};
use serde_json::Value;

fn probes_failed_before_first_restart(events: &[Value]) -> usize {
    events
        .iter()
        .take_while(|e| e["kind"] != "restart")
        .filter(|e| e["kind"] == "probe" && e["ok"] == false)
        .count()
}

#[test]
fn restarts_after_exactly_max_retries_failures() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("web", port, &[]);
    let old = pm2.pids("web");
    let agent = Agent::start(&pm2, &app("web", port, "max_retries = 4"));
    wait_until(Duration::from_secs(10), "a passing probe", || {
        agent.of_kind("probe").iter().any(|e| e["ok"] == true)
    });
    set_mode(port, "500").unwrap();
    let restart = agent.wait_for(Duration::from_secs(15), "restart");
    assert!(
        restart["reason"].as_str().unwrap().contains("http 500"),
        "{restart}"
    );
    assert_eq!(probes_failed_before_first_restart(&agent.events()), 4);
    agent.wait_for(Duration::from_secs(10), "restart_done");
    wait_until(Duration::from_secs(10), "a new pid", || {
        let p = pm2.pids("web");
        !p.is_empty() && p != old && p[0] != 0
    });
    // The restarted app answers 200 again (mode is per process), and the agent sees it.
    wait_until(Duration::from_secs(10), "healthy after restart", || {
        agent
            .events()
            .iter()
            .rev()
            .take_while(|e| e["kind"] != "restart_done")
            .any(|e| e["kind"] == "probe" && e["ok"] == true)
    });
    assert_eq!(agent.of_kind("restart").len(), 1);
    let done = agent.of_kind("restart_done").remove(0);
    assert_eq!(done["replaced"], true, "{done}");
    // Verified: the first passing check after the restart says how long recovery took.
    wait_until(Duration::from_secs(10), "a recovery event", || {
        agent
            .of_kind("state_change")
            .iter()
            .any(|e| e["to"] == "healthy" && e["recovered_ms"].as_u64().is_some())
    });
}

#[test]
fn slow_but_in_time_is_never_restarted() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("slow", port, &[]);
    set_mode(port, "slow:250").unwrap();
    let agent = Agent::start(
        &pm2,
        &app("slow", port, "max_retries = 1\ntimeout = \"1s\""),
    );
    wait_until(Duration::from_secs(15), "ten probes", || {
        agent.of_kind("probe").len() >= 10
    });
    let probes = agent.of_kind("probe");
    assert!(probes.iter().all(|p| p["ok"] == true), "{probes:?}");
    assert!(probes
        .iter()
        .all(|p| p["latency_ms"].as_u64().unwrap() >= 250));
    assert!(agent.of_kind("restart").is_empty());
}

/// By default a passing check is not an event: `status` shows it, events.jsonl stays for what
/// someone has to read (a failing check, a state change, a restart).
#[test]
fn passing_checks_show_in_status_and_failing_ones_in_events() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("quiet", port, &[]);
    let agent = Agent::start_with(
        &pm2,
        "log_passing_checks = false",
        &app("quiet", port, "max_retries = 100\nstartup_grace = \"0s\""),
        &[],
    );
    let status = || -> Value {
        std::fs::read(agent.state().join("status.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    };
    wait_until(
        Duration::from_secs(15),
        "five checks in status.json",
        || status()["apps"][0]["checks"].as_u64().unwrap_or(0) >= 5,
    );
    let app_status = status()["apps"][0].clone();
    let probes = app_status["probes"].as_array().unwrap();
    assert!(probes.len() >= 4, "{app_status}");
    assert!(probes.iter().all(|p| p["ok"] == true), "{app_status}");
    assert!(agent.of_kind("probe").is_empty(), "{:?}", agent.events());
    let text = Command::new(AGENT)
        .args(["status", "--config"])
        .arg(agent.config())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("checks since the agent started: "), "{text}");
    assert!(text.contains("response times, oldest first"), "{text}");
    set_mode(port, "500").unwrap();
    wait_until(Duration::from_secs(10), "failing probes as events", || {
        agent.of_kind("probe").len() >= 2
    });
    let failed = agent.of_kind("probe");
    assert!(
        failed
            .iter()
            .all(|p| p["ok"] == false && p["status"] == 500),
        "{failed:?}"
    );
    assert!(agent.of_kind("restart").is_empty());
}

#[test]
fn no_restart_during_startup_grace() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("boot", port, &[]);
    set_mode(port, "500").unwrap();
    let started = Instant::now();
    let agent = Agent::start(
        &pm2,
        &app("boot", port, "max_retries = 1\nstartup_grace = \"3s\""),
    );
    agent.wait_for(Duration::from_secs(15), "restart");
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(2900),
        "restarted {after:?} after start, inside the 3 s grace"
    );
    let failed_in_grace = agent
        .of_kind("probe")
        .iter()
        .filter(|p| p["ok"] == false)
        .count();
    assert!(
        failed_in_grace >= 5,
        "the app was failing all along ({failed_in_grace} failed probes)"
    );
}

#[test]
fn cooldown_and_crash_loop_limits_hold() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    // MODE=500 from the environment: every restarted process fails again.
    pm2.start_app_env("loop", port, &[], &[("MODE", "500")]);
    let agent = Agent::start(
        &pm2,
        &app(
            "loop",
            port,
            "max_retries = 1\nrestart_cooldown = \"2s\"\ncrashloop_restarts = 3\ncrashloop_window = \"1m\"\ncrashloop_backoff = \"1m\"",
        ),
    );
    let give_up = agent.wait_for(Duration::from_secs(30), "give_up");
    assert_eq!(give_up["restarts"], 3, "{give_up}");
    let restarts: Vec<u64> = agent
        .of_kind("restart")
        .iter()
        .map(|e| e["ts_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(restarts.len(), 3);
    for pair in restarts.windows(2) {
        assert!(
            pair[1] - pair[0] >= 2_000,
            "restarts {pair:?} closer than the 2 s cooldown"
        );
    }
    // Paused: still failing, but no fourth restart for a while.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(agent.of_kind("restart").len(), 3);
    let status = agent.status_json();
    let v: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["apps"][0]["health"], "crash_loop", "{v}");
}

#[test]
fn hung_cluster_worker_is_restarted_alone() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("cl", port, &["-i", "2"]);
    let entries = pm2.jlist();
    let workers: Vec<(u64, u32)> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["pm_id"].as_u64().unwrap(),
                e["pid"].as_u64().unwrap() as u32,
            )
        })
        .collect();
    assert_eq!(workers.len(), 2);
    let agent = Agent::start(
        &pm2,
        &app("cl", port, "max_retries = 2\ntimeout = \"400ms\""),
    );
    wait_until(Duration::from_secs(10), "a passing probe", || {
        agent.of_kind("probe").iter().any(|e| e["ok"] == true)
    });
    let (hung_id, hung_pid) = workers[1];
    let (ok_id, ok_pid) = workers[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(hung_pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .ok();
    let restart = agent.wait_for(Duration::from_secs(15), "restart");
    assert_eq!(restart["pm_ids"], serde_json::json!([hung_id]), "{restart}");
    agent.wait_for(Duration::from_secs(15), "restart_done");
    wait_until(Duration::from_secs(10), "the hung worker replaced", || {
        pm2.jlist().as_array().unwrap().iter().any(|e| {
            e["pm_id"] == hung_id
                && e["pid"].as_u64() != Some(hung_pid as u64)
                && e["pm2_env"]["status"] == "online"
        })
    });
    let after = pm2.jlist();
    let other = after
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["pm_id"] == ok_id)
        .unwrap();
    assert_eq!(
        other["pid"].as_u64(),
        Some(ok_pid as u64),
        "the healthy worker was left alone"
    );
}

#[test]
fn spinning_process_is_stuck_by_cpu_alone() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("spin", port, &[]);
    let old = pm2.pids("spin");
    // No health_url: only PM2 state and CPU judge this app.
    // A low threshold: on a loaded 2-core CI machine a spinning process may get well under 100%.
    let cfg = "[[apps]]\nname = \"spin\"\nretry_interval = \"300ms\"\nmax_retries = 2\nstartup_grace = \"0s\"\ncpu_threshold = 30\ncpu_duration = \"1500ms\"\n";
    let agent = Agent::start(&pm2, cfg);
    wait_until(Duration::from_secs(10), "a first check", || {
        !agent.of_kind("check").is_empty()
    });
    wait_until(
        Duration::from_secs(10),
        "the app to take the spin mode",
        || set_mode(port, "spin").is_some(),
    );
    let restart = agent.wait_for(Duration::from_secs(20), "restart");
    let reason = restart["reason"].as_str().unwrap();
    assert!(
        reason.contains("CPU") && reason.contains(">= 30%"),
        "{reason}"
    );
    wait_until(Duration::from_secs(10), "a new pid", || {
        let p = pm2.pids("spin");
        !p.is_empty() && p[0] != 0 && p != old
    });
}

#[test]
fn steady_state_spawns_no_process() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("calm", port, &[]);
    // A `pm2` (and `node`) shim first on PATH records any call the agent makes.
    let shim = tempfile::tempdir().unwrap();
    let record = shim.path().join("calls");
    for name in ["pm2", "node"] {
        let p = shim.path().join(name);
        std::fs::write(
            &p,
            format!(
                "#!/bin/sh\necho \"{name} $*\" >> {}\nexit 1\n",
                record.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}",
        shim.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut agent = Agent::start_with(&pm2, "", &app("calm", port, ""), &[("PATH", &path)]);
    wait_until(Duration::from_secs(15), "twenty checks", || {
        agent.of_kind("probe").len() >= 20
    });
    let pid = agent.child.as_ref().unwrap().id();
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    assert!(
        children.trim().is_empty(),
        "the agent has child processes: {children}"
    );
    assert!(
        !record.exists(),
        "the agent ran: {}",
        std::fs::read_to_string(&record).unwrap_or_default()
    );
    assert!(agent.of_kind("probe").iter().all(|p| p["ok"] == true));
    assert!(agent.stop().success());
}

#[test]
fn backup_check_acts_only_when_the_daemon_is_dead() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("bk", port, &[]);
    let mut agent = Agent::start(&pm2, &app("bk", port, "restart_cooldown = \"1m\""));
    wait_until(Duration::from_secs(10), "a heartbeat", || {
        agent.state().join("status.json").exists()
    });
    let config = agent.config();
    let check = || {
        Command::new(AGENT)
            .args(["check", "--once", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    set_mode(port, "500").unwrap();
    // Alive daemon: the check does nothing at once, whatever the app does.
    let out = check();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("is alive"));
    // The daemon restarts the failing app, then dies.
    agent.wait_for(Duration::from_secs(15), "restart");
    agent.wait_for(Duration::from_secs(15), "restart_done");
    assert!(agent.stop().success());
    let daemon_restarts = agent.of_kind("restart").len();
    wait_until(
        Duration::from_secs(10),
        "the restarted app to take a mode",
        || set_mode(port, "500").is_some(),
    );
    // Stale = older than 3 check periods (with a 1 s floor per period) plus 2 s.
    wait_until(Duration::from_secs(10), "a stale heartbeat", || {
        let out = Command::new(AGENT)
            .args(["status", "--config"])
            .arg(agent.config())
            .output()
            .unwrap();
        out.status.code() == Some(1)
    });
    // Within the daemon's cooldown: the check sees the failure but must not restart again.
    let out = check();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("cooldown"), "{text}");
    assert_eq!(agent.of_kind("restart").len(), daemon_restarts);
    // Past the cooldown (shortened in the config; the history on disk is shared) it restarts.
    let cfg = std::fs::read_to_string(agent.config())
        .unwrap()
        .replace("restart_cooldown = \"1m\"", "restart_cooldown = \"1s\"");
    std::fs::write(agent.config(), cfg).unwrap();
    let old = pm2.pids("bk");
    let out = check();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("bk: restarted"), "{text}");
    wait_until(Duration::from_secs(10), "a new pid", || {
        pm2.pids("bk") != old
    });
}

/// An app saved with `pm2 save`, watched by an agent (with `env`), then the PM2 daemon killed.
fn watched_then_daemon_killed(
    pm2: &Pm2Sandbox,
    name: &str,
    port: u16,
    env: &[(&str, &str)],
) -> Agent {
    pm2.start_app(name, port, &[]);
    assert!(pm2.pm2(&["save"]).status.success());
    let pm2_bin = std::env::var("PMGUARD_TEST_PM2").unwrap_or_else(|_| "pm2".into());
    let agent = Agent::start_with(
        pm2,
        &format!("pm2_bin = \"{pm2_bin}\""),
        &app(name, port, "max_retries = 2"),
        env,
    );
    agent.wait_for_probe_ok();
    pm2.crash_daemon();
    agent
}

/// The app answers again under a new daemon, and the agent's checks pass after the resurrect.
fn back_and_seen_healthy(agent: &Agent, port: u16) {
    wait_until(
        Duration::from_secs(20),
        "the app back under a new daemon",
        || common::http_get(port, "/health").is_some_and(|(s, _)| s == 200),
    );
    wait_until(Duration::from_secs(10), "the agent sees it healthy", || {
        agent
            .events()
            .iter()
            .rev()
            .take_while(|e| e["kind"] != "resurrect")
            .any(|e| e["kind"] == "probe" && e["ok"] == true)
    });
}

#[test]
fn dead_pm2_daemon_is_resurrected() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    let agent = watched_then_daemon_killed(&pm2, "res", port, &[]);
    let ev = agent.wait_for(Duration::from_secs(30), "resurrect");
    assert!(
        ev["message"]
            .as_str()
            .unwrap()
            .contains("ran `pm2 resurrect`"),
        "{ev}"
    );
    back_and_seen_healthy(&agent, port);
}

#[test]
fn sandboxed_agent_alerts_and_the_backup_check_resurrects() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    // As under the installed systemd unit.
    let agent = watched_then_daemon_killed(&pm2, "sbx", port, &[("PMGUARD_SANDBOXED", "1")]);
    let alert = agent.wait_for(Duration::from_secs(15), "resurrect");
    assert_eq!(alert["action"], "alert", "{alert}");
    assert!(
        alert["message"].as_str().unwrap().contains("backup check"),
        "{alert}"
    );
    assert!(
        pm2.daemon_pid().is_none(),
        "the sandboxed agent must not start PM2 itself"
    );
    wait_until(
        Duration::from_secs(10),
        "the heartbeat to say pm2_down",
        || {
            std::fs::read_to_string(agent.state().join("status.json"))
                .is_ok_and(|s| s.contains("pm2_down"))
        },
    );
    let out = Command::new(AGENT)
        .args(["check", "--once", "--config"])
        .arg(agent.config())
        .env("PM2_HOME", pm2.home())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("ran `pm2 resurrect`"), "{text}");
    back_and_seen_healthy(&agent, port);
}

#[test]
fn sighup_reloads_and_keeps_the_old_config_when_invalid() {
    let pm2 = Pm2Sandbox::new();
    let (p1, p2) = (free_port(), free_port());
    pm2.start_app("one", p1, &[]);
    pm2.start_app("two", p2, &[]);
    let agent = Agent::start(&pm2, &app("one", p1, ""));
    wait_until(Duration::from_secs(10), "probes of one", || {
        agent.of_kind("probe").iter().any(|e| e["app"] == "one")
    });
    // Broken file: refused, the agent keeps watching.
    std::fs::write(agent.config(), "[agent]\ninterval = 5\n").unwrap();
    agent.signal(libc::SIGHUP);
    let rejected = agent.wait_for(Duration::from_secs(5), "config_rejected");
    assert!(
        rejected["message"]
            .as_str()
            .unwrap()
            .contains("pmguard.toml:2:12"),
        "{rejected}"
    );
    let before = agent.of_kind("probe").len();
    wait_until(Duration::from_secs(5), "probes go on", || {
        agent.of_kind("probe").len() > before + 2
    });
    // A valid file with a second app: it is watched without a restart of the agent.
    let text = Agent::config_text(
        &pm2,
        &agent.state(),
        "",
        &(app("one", p1, "") + &app("two", p2, "")),
    );
    std::fs::write(agent.config(), text).unwrap();
    agent.signal(libc::SIGHUP);
    agent.wait_for(Duration::from_secs(5), "reload");
    wait_until(Duration::from_secs(10), "probes of two", || {
        agent.of_kind("probe").iter().any(|e| e["app"] == "two")
    });
}

#[test]
fn speaks_sd_notify() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("nt", port, &[]);
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut agent = Agent::prepare(&pm2, "", &app("nt", port, ""));
    agent.spawn(&[
        ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "1000000"),
    ]);
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while !(seen.iter().any(|m: &String| m == "READY=1")
        && seen.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2)
    {
        let n = sock.recv(&mut buf).expect("a notification within 10 s");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(agent.stop().success());
    loop {
        let n = sock.recv(&mut buf).expect("STOPPING=1");
        if &buf[..n] == b"STOPPING=1" {
            break;
        }
    }
}

#[test]
fn bad_configs_are_rejected_with_file_line_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(b"[agent]\ninterval = \"10\"\n\n[[apps]]\nname = \"codebox\"\nmax_retries = 0\ncolor = \"red\"\n").unwrap();
    let out = Command::new(AGENT)
        .args(["validate", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let p = path.display();
    assert!(
        err.contains(&format!("{p}:2:12: interval: `10` has no unit")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{p}:6:15: max_retries must be 1..=100, not 0")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{p}:7:1: unknown key `color` in [[apps]]")),
        "{err}"
    );
    assert!(err.contains("help: "), "{err}");
    // `run` refuses it too, before touching anything.
    let out = Command::new(AGENT)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(AGENT)
        .args(["validate", "--config"])
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// The heartbeat is one line rewritten in place each check period; `status.json` when an app's
/// state changes, when someone opens it (at most once a second) or every 60 s. `status` (and
/// so the backup check and doctor) must still see a fresh daemon at every moment, what it shows
/// must be at most about a second old, and a state change must still show at once.
#[test]
fn status_stays_fresh_between_rewrites_of_status_json() {
    use std::os::unix::fs::MetadataExt;
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("hb", port, &[]);
    let mut agent = Agent::start(
        &pm2,
        &app("hb", port, "max_retries = 100\nstartup_grace = \"0s\""),
    );
    agent.wait_for_probe_ok();
    let status_file = agent.state().join("status.json");
    let status = || agent.status_json();
    let file = || std::fs::metadata(&status_file).unwrap().ino();
    wait_until(Duration::from_secs(10), "a first heartbeat", || {
        status().status.success()
    });
    let wall = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    // How old the last check `status` shows is: the data's age, not the heartbeat's.
    let shown_age =
        |v: &Value| wall().saturating_sub(v["apps"][0]["last_check_ms"].as_u64().unwrap());
    let mut writes = std::collections::BTreeSet::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(8) {
        let out = status();
        assert_eq!(
            out.status.code(),
            Some(0),
            "stale: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["fresh_on_read"], true, "{v}");
        let age = pmguard_agent::clock::mono_now().saturating_sub(v["heartbeat"].as_u64().unwrap());
        assert!(age < 2_500, "heartbeat {age} ms old");
        // A check a second plus a second at most since the last rewrite, plus slack.
        let shown = shown_age(&v);
        assert!(shown < 2_600, "status shows a check {shown} ms old");
        writes.insert(file());
        std::thread::sleep(Duration::from_millis(250));
    }
    // Each rewrite is a new file: a reader 4 times a second is answered at most once a second.
    assert!(
        (2..=10).contains(&writes.len()),
        "status.json rewritten {} times in 8 s of readers",
        writes.len()
    );
    // Nobody reads: nothing is rewritten (it was every 5 s before readers could ask).
    let unread = file();
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(file(), unread, "status.json rewritten with nobody reading");
    // The next reader is answered with a new one.
    let out = status();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let shown = shown_age(&v);
    assert!(
        shown < 2_600,
        "after a quiet spell, status shows a check {shown} ms old"
    );
    assert_ne!(
        file(),
        unread,
        "the reader's open asked for a new status.json"
    );
    // A failing check is a state change: it shows within a beat, not after 5 s.
    set_mode(port, "500").unwrap();
    wait_until(Duration::from_secs(3), "the failure in status.json", || {
        let v: Value = serde_json::from_slice(&std::fs::read(&status_file).unwrap_or_default())
            .unwrap_or(Value::Null);
        v["apps"][0]["failures"].as_u64().unwrap_or(0) >= 1
    });
    // A clean stop leaves the final states and counts, for whoever looks afterwards.
    std::thread::sleep(Duration::from_secs(3));
    let stopped_at = wall();
    assert!(agent.stop().success());
    let v: Value = serde_json::from_slice(&std::fs::read(&status_file).unwrap()).unwrap();
    assert_eq!(v["fresh_on_read"], false, "{v}");
    let last = v["apps"][0]["last_check_ms"].as_u64().unwrap();
    assert!(
        last + 1_500 >= stopped_at,
        "the last check in status.json is {} ms before the stop",
        stopped_at.saturating_sub(last)
    );
}

/// `status` lists the instances PM2 runs now, each with its own pid: a cluster scaled down by a
/// person shows one line fewer, scaled up again one line per worker, with the new workers' pids
/// (the board's lines are updated in place, check after check).
#[test]
fn status_follows_a_cluster_scaled_down_and_up() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("sc", port, &["-i", "2"]);
    let agent = Agent::start(&pm2, &app("sc", port, "max_retries = 100"));
    agent.wait_for_probe_ok();
    let shown = || -> Vec<(u64, u64, String)> {
        let out = agent.status_json();
        let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) else {
            return Vec::new();
        };
        let mut lines: Vec<(u64, u64, String)> = v["apps"][0]["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| {
                (
                    i["pm_id"].as_u64().unwrap_or(u64::MAX),
                    i["pid"].as_u64().unwrap_or(0),
                    i["status"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        lines.sort();
        lines
    };
    let running = || -> Vec<(u64, u64, String)> {
        let mut lines: Vec<(u64, u64, String)> = pm2
            .jlist()
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"] == "sc")
            .map(|e| {
                (
                    e["pm_id"].as_u64().unwrap(),
                    e["pid"].as_u64().unwrap_or(0),
                    e["pm2_env"]["status"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        lines.sort();
        lines
    };
    for (workers, step) in [(2, None), (1, Some("1")), (3, Some("3"))] {
        if let Some(n) = step {
            let out = pm2.pm2(&["scale", "sc", n]);
            assert!(out.status.success(), "pm2 scale sc {n}: {out:?}");
        }
        let mut last = (Vec::new(), Vec::new());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (want, got) = (running(), shown());
            if want.len() == workers
                && want
                    .iter()
                    .all(|(_, pid, status)| *pid > 0 && status == "online")
                && got == want
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{workers} workers: status shows {:?}, PM2 runs {:?}",
                last.1,
                last.0
            );
            last = (want, got);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert!(
        agent.of_kind("restart").is_empty(),
        "a person's scaling was not repaired"
    );
}
