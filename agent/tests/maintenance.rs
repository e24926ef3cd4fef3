//! Maintenance pauses end to end: `pmguard-agent pause`/`resume` against a running agent and a
//! real PM2, the pause's deadline across an agent restart, the backup check, and the deploy
//! helper. Timings (how soon a pause or resume takes effect) are printed for the record.

mod agent_harness;
mod common;

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use agent_harness::{app, Agent, AGENT};
use common::{free_port, set_mode, wait_until, Pm2Sandbox};
use serde_json::Value;

fn agent_cmd(agent: &Agent, args: &[&str]) -> Output {
    Command::new(AGENT)
        .args(args)
        .arg("--config")
        .arg(agent.config())
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn failed_probes(agent: &Agent) -> usize {
    agent
        .of_kind("probe")
        .iter()
        .filter(|e| e["ok"] == false)
        .count()
}

fn status_json(agent: &Agent) -> Value {
    let out = agent_cmd(agent, &["status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_paused_app_is_checked_but_never_restarted_and_resume_restarts_it() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("web", port, &[]);
    let old = pm2.pids("web");
    let agent = Agent::start(&pm2, &app("web", port, "max_retries = 2"));
    agent.wait_for_probe_ok();
    wait_until(Duration::from_secs(10), "a fresh heartbeat", || {
        agent_cmd(&agent, &["status"]).status.success()
    });
    let asked = Instant::now();
    let out = agent_cmd(
        &agent,
        &["pause", "web", "--for", "5m", "--reason", "deploy v42"],
    );
    let took = asked.elapsed();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("applied it in"), "{}", text(&out));
    eprintln!("pause: the running agent applied it, command returned in {took:?}");
    assert_eq!(agent.of_kind("pause").len(), 1);
    set_mode(port, "hang").unwrap();
    // Far past max_retries: counted and recorded, never acted on.
    wait_until(Duration::from_secs(20), "8 failed probes", || {
        failed_probes(&agent) >= 8
    });
    assert!(agent.of_kind("restart").is_empty(), "{}", agent.log());
    assert_eq!(pm2.pids("web"), old);
    let status = status_json(&agent);
    let web = &status["apps"][0];
    assert_eq!(web["health"], "failing", "{status}");
    assert_eq!(web["paused"]["reason"], "deploy v42", "{status}");
    assert!(
        web["note"].as_str().unwrap().starts_with("paused until"),
        "{status}"
    );
    let table = text(&agent_cmd(&agent, &["status"]));
    assert!(
        table.contains("paused until") && table.contains("(deploy v42)"),
        "{table}"
    );
    // Resume: the next failing check restarts.
    let resumed = Instant::now();
    let out = agent_cmd(&agent, &["resume", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("web: resumed."), "{}", text(&out));
    agent.wait_for(Duration::from_secs(10), "restart");
    eprintln!(
        "resume: first restart {:?} after `resume` was run",
        resumed.elapsed()
    );
    agent.wait_for(Duration::from_secs(10), "restart_done");
    wait_until(Duration::from_secs(10), "a new pid", || {
        let p = pm2.pids("web");
        !p.is_empty() && p != old && p[0] != 0
    });
    assert_eq!(agent.of_kind("resume").len(), 1);
    assert_eq!(status_json(&agent)["apps"][0]["paused"], Value::Null);
}

#[test]
fn a_pause_ends_at_its_deadline_across_an_agent_restart_and_binds_the_backup_check() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("api", port, &[]);
    let old = pm2.pids("api");
    let mut agent = Agent::start(&pm2, &app("api", port, "max_retries = 2"));
    agent.wait_for_probe_ok();
    assert!(agent.stop().success());
    wait_until(Duration::from_secs(10), "a stale heartbeat", || {
        agent_cmd(&agent, &["status"]).status.code() == Some(1)
    });
    // No agent: the pause is recorded all the same, and says so.
    let out = agent_cmd(
        &agent,
        &["pause", "api", "--for", "6s", "--reason", "db migration"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("not running"), "{}", text(&out));
    let until = agent.of_kind("pause")[0]["ts_ms"].as_u64().unwrap() + 6_000;
    set_mode(port, "hang").unwrap();
    // The cron backup check sees the failures but does not restart a paused app.
    let out = agent_cmd(&agent, &["check", "--once"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("api: paused until"), "{}", text(&out));
    assert_eq!(pm2.pids("api"), old);
    // A new agent honours the pause from its first check, and restarts once it ends.
    agent.spawn(&[]);
    let restart = agent.wait_for(Duration::from_secs(20), "restart");
    let expired = agent.wait_for(Duration::from_secs(5), "pause_expired");
    let at = restart["ts_ms"].as_u64().unwrap();
    assert!(
        at >= until,
        "restarted {} ms before the deadline",
        until - at
    );
    eprintln!(
        "expiry across an agent restart: restart {} ms after the deadline; pause_expired {} ms after it",
        at - until,
        expired["ts_ms"].as_u64().unwrap().saturating_sub(until)
    );
    assert!(failed_probes(&agent) >= 3);
    wait_until(Duration::from_secs(10), "a new pid", || {
        let p = pm2.pids("api");
        !p.is_empty() && p != old && p[0] != 0
    });
}

#[test]
fn the_deploy_helper_pauses_around_its_command_and_exits_with_its_code() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("web", port, &[]);
    let old = pm2.pids("web");
    let agent = Agent::start(&pm2, &app("web", port, "max_retries = 1"));
    agent.wait_for_probe_ok();
    let hang = format!("http://127.0.0.1:{port}/mode/hang");
    let script = format!(
        "curl -s {hang} >/dev/null; while [ $(grep -c '\"ok\":false' {}) -lt 4 ]; do sleep 0.1; done; exit 7",
        agent.state().join("events.jsonl").display()
    );
    let out = Command::new(AGENT)
        .args([
            "pause", "web", "--for", "1m", "--reason", "deploy", "--config",
        ])
        .arg(agent.config())
        .args(["--", "sh", "-c", &script])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    // Four failed probes while the command ran (max_retries = 1), and no restart.
    let resume = agent.of_kind("resume");
    assert_eq!(resume.len(), 1, "{}", text(&out));
    let resumed_at = resume[0]["ts_ms"].as_u64().unwrap();
    let restart = agent.wait_for(Duration::from_secs(10), "restart");
    assert!(restart["ts_ms"].as_u64().unwrap() >= resumed_at);
    wait_until(Duration::from_secs(10), "a new pid", || {
        let p = pm2.pids("web");
        !p.is_empty() && p != old && p[0] != 0
    });
    // A command that cannot start: 127, and the app is not left paused.
    let out = Command::new(AGENT)
        .args(["pause", "web", "--for", "1m", "--config"])
        .arg(agent.config())
        .args(["--", "/nonexistent/deploy"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127), "{}", text(&out));
    assert_eq!(agent.of_kind("resume").len(), 2);
}

#[test]
fn pause_as_root_writes_the_state_directory_as_pm2s_user() {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (home, state) = (d.path().join("pm2"), d.path().join("state"));
    for dir in [&home, &state] {
        std::fs::create_dir(dir).unwrap();
        std::os::unix::fs::chown(dir, Some(65534), Some(65534)).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750)).unwrap();
    }
    let config = d.path().join("pmguard.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nstate_dir = \"{}\"\npm2_home = \"{}\"\n[[apps]]\nname = \"web\"\n",
            state.display(),
            home.display()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(AGENT)
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    };
    let out = run(&["pause", "--for", "10m"]);
    assert!(out.status.success(), "{}", text(&out));
    for f in ["pauses.json", "events.jsonl", "restart.lock"] {
        let m = std::fs::metadata(state.join(f)).unwrap();
        assert_eq!(m.uid(), 65534, "{f} is owned by uid {}", m.uid());
    }
    assert_eq!(
        std::fs::metadata(state.join("pauses.json")).unwrap().mode() & 0o777,
        0o640
    );
    let out = run(&["pause", "nosuch", "--for", "10m"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("no app named `nosuch`"),
        "{}",
        text(&out)
    );
    let out = run(&["pause", "--for", "30d"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["resume"]);
    assert!(text(&out).contains("web: resumed."), "{}", text(&out));
}

/// A default install: no `pm2_home` in the config (root's own PM2_HOME says nothing), the state
/// directory the agent's user's. `sudo pmguard-agent pause` must write as that user, so the
/// agent (here `check --once` run as that user) can read the pause.
#[test]
fn pause_as_root_without_pm2_home_writes_as_the_state_directorys_owner() {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (state, root_home) = (d.path().join("state"), d.path().join("root"));
    std::fs::create_dir(&state).unwrap();
    std::fs::create_dir(&root_home).unwrap();
    std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o750)).unwrap();
    let port = free_port();
    let config = d.path().join("pmguard.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nstate_dir = \"{}\"\n[[apps]]\nname = \"web\"\nhealth_url = \"http://127.0.0.1:{port}/health\"\n",
            state.display()
        ),
    )
    .unwrap();
    let cmd = |args: &[&str]| {
        let mut c = Command::new(AGENT);
        c.args(args)
            .arg("--config")
            .arg(&config)
            .env_remove("PM2_HOME")
            .env("HOME", &root_home);
        c
    };
    let out = cmd(&["pause", "web", "--for", "10m", "--reason", "deploy"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    for f in ["pauses.json", "events.jsonl", "restart.lock"] {
        let m = std::fs::metadata(state.join(f)).unwrap();
        assert_eq!(m.uid(), 65534, "{f} is owned by uid {}", m.uid());
    }
    let out = cmd(&["check", "--once"])
        .env("HOME", "/nonexistent")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let said = text(&out);
    assert!(!said.contains("Cannot read the pause file"), "{said}");
    assert!(said.contains("web: paused until"), "{said}");
    // A root-owned state directory with no pm2_home: refused, with the fix named.
    std::os::unix::fs::chown(&state, Some(0), Some(0)).unwrap();
    let out = cmd(&["resume", "web"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("run as the PM2 user or set [agent] pm2_home"),
        "{}",
        text(&out)
    );
}

/// `pause`/`resume` without PM2 or an agent: a state directory and a config are enough.
fn offline_config(d: &std::path::Path, apps: &[&str]) -> std::path::PathBuf {
    let (home, state) = (d.join("pm2"), d.join("state"));
    for dir in [&home, &state] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let config = d.join("pmguard.toml");
    let mut text = format!(
        "[agent]\nstate_dir = \"{}\"\npm2_home = \"{}\"\n",
        state.display(),
        home.display()
    );
    for a in apps {
        text.push_str(&format!("[[apps]]\nname = \"{a}\"\n"));
    }
    std::fs::write(&config, text).unwrap();
    config
}

fn offline(config: &std::path::Path, args: &[&str]) -> Output {
    Command::new(AGENT)
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

#[test]
fn names_count_once_a_shorter_pause_says_what_it_replaced_and_a_removed_app_can_be_resumed() {
    let d = tempfile::tempdir().unwrap();
    let config = offline_config(d.path(), &["web", "api"]);
    let out = offline(&config, &["pause", "web", "api", "web", "--for", "2h"]);
    assert!(out.status.success(), "{}", text(&out));
    let events = std::fs::read_to_string(d.path().join("state/events.jsonl")).unwrap();
    assert_eq!(events.matches("\"kind\":\"pause\"").count(), 2, "{events}");
    let out = offline(&config, &["pause", "web", "--for", "10m"]);
    assert!(
        text(&out).contains("web: this replaces a longer pause (paused until"),
        "{}",
        text(&out)
    );
    // `api` leaves the config; its pause can still be ended.
    let config = offline_config(d.path(), &["web"]);
    let out = offline(&config, &["resume", "api"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("api: resumed."), "{}", text(&out));
    let out = offline(&config, &["resume", "nosuch"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn pause_with_stdout_closed_still_succeeds() {
    let d = tempfile::tempdir().unwrap();
    let config = offline_config(d.path(), &["web"]);
    let mut child = Command::new(AGENT)
        .args(["pause", "web", "--for", "5m", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn a_sigterm_to_the_deploy_helper_alone_stops_its_command_and_resumes() {
    let d = tempfile::tempdir().unwrap();
    let config = offline_config(d.path(), &["web"]);
    let mut helper = Command::new(AGENT)
        .args(["pause", "web", "--for", "10m", "--config"])
        .arg(&config)
        .args(["--", "sleep", "30"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let events = d.path().join("state/events.jsonl");
    wait_until(Duration::from_secs(10), "the pause", || {
        std::fs::read_to_string(&events).is_ok_and(|e| e.contains("\"kind\":\"pause\""))
    });
    // The pause is written before `sleep` starts: give it a moment to be spawned.
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(helper.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = helper.wait().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(status.code(), Some(143));
    let log = std::fs::read_to_string(&events).unwrap();
    assert!(log.contains("\"kind\":\"resume\""), "{log}");
}

#[test]
fn the_deploy_helper_passes_a_reason_and_names_that_start_with_a_dash() {
    let d = tempfile::tempdir().unwrap();
    let config = offline_config(d.path(), &["-web"]);
    let out = Command::new(AGENT)
        .args(["pause", "--app=-web", "--for", "5m", "--reason=-x deploy"])
        .arg("--config")
        .arg(&config)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let log = std::fs::read_to_string(d.path().join("state/events.jsonl")).unwrap();
    assert!(log.contains("\"reason\":\"-x deploy\""), "{log}");
    assert!(log.contains("\"kind\":\"resume\""), "{log}");
}
