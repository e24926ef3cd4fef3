//! The fault matrix (RELIABILITY.md): faults injected by hand into real PM2 and a real agent.
//! One test per fault; each asserts what a person on call would notice (time to healthy,
//! restarts made, pings sent, processes started as whom).

mod agent_harness;
mod common;

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_harness::{app, Agent, AGENT};
use common::{free_port, wait_until, Pm2Sandbox};
use serde_json::Value;

fn clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Waits (30 s at most) for the app to turn healthy after the restart event `restart_ts`;
/// returns how many ms after the restart decision that was (from the agent's own events).
fn healthy_after(agent: &Agent, restart_ts: u64) -> u64 {
    let after = |e: &Value| e["ts_ms"].as_u64().filter(|t| *t > restart_ts);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(t) = health_changes(agent, "healthy").iter().find_map(after) {
            return t - restart_ts;
        }
        assert!(
            Instant::now() < deadline,
            "not healthy 30 s after the restart decision\n{}\n{:#?}",
            agent.log(),
            agent
                .events()
                .iter()
                .filter(|e| e["kind"] != "probe")
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn health_changes(agent: &Agent, to: &str) -> Vec<Value> {
    agent
        .of_kind("state_change")
        .into_iter()
        .filter(|e| e["to"] == to)
        .collect()
}

/// Fault: every worker of a 4-instance cluster app hangs (SIGSTOP) and PM2's kill_timeout is
/// 20 s. A stopped process cannot run a shutdown handler, so pmguard kills it at once: healthy
/// again within 10 s of the restart decision (PM2's graceful path took 80.8 s), and systemd's
/// watchdog is pinged all along (a 3 s watchdog never goes 3 s without a ping).
#[test]
fn all_cluster_workers_hung_with_a_long_kill_timeout_recover_fast_and_keep_the_watchdog_fed() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("hung4", port, &["-i", "4", "--kill-timeout", "20000"]);
    let pids = pm2.pids("hung4");
    assert_eq!(pids.len(), 4, "{pids:?}");
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let pings: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listener = {
        let (pings, stop) = (pings.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    if &buf[..n] == b"WATCHDOG=1" {
                        pings.lock().unwrap().push(Instant::now());
                    }
                }
            }
        })
    };
    let mut agent = Agent::prepare(
        &pm2,
        "",
        &app(
            "hung4",
            port,
            "max_retries = 2\ntimeout = \"400ms\"\nretry_interval = \"300ms\"\nrestart_cooldown = \"1s\"\nstartup_grace = \"2s\"",
        ),
    );
    agent.spawn(&[
        ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "3000000"),
    ]);
    agent.wait_for_probe_ok();
    wait_until(Duration::from_secs(10), "watchdog pings", || {
        pings.lock().unwrap().len() >= 2
    });
    for pid in &pids {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .ok();
    }
    let hung_at = Instant::now();
    let hung_wall = clock_ms();
    let restart = agent.wait_for(Duration::from_secs(20), "restart");
    let restart_ts = restart["ts_ms"].as_u64().unwrap();
    let recovery_ms = healthy_after(&agent, restart_ts);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    listener.join().unwrap();
    eprintln!(
        "hung 4-worker app (kill_timeout 20 s): restart decided {} ms after SIGSTOP, healthy {recovery_ms} ms after the decision",
        restart_ts.saturating_sub(hung_wall)
    );
    assert!(
        recovery_ms <= 10_000,
        "healthy {recovery_ms} ms after the restart decision (goal: 10 s)\n{}",
        agent.log()
    );
    // Every worker was killed at once (no graceful wait), each replaced.
    let kills: Vec<Value> = agent
        .of_kind("escalation")
        .into_iter()
        .filter(|e| e["message"].as_str().unwrap_or("").contains("is stuck"))
        .collect();
    assert_eq!(kills.len(), 4, "{kills:?}");
    let now_pids = pm2.pids("hung4");
    assert!(
        now_pids.iter().all(|p| !pids.contains(p)),
        "old {pids:?} new {now_pids:?}"
    );
    // The watchdog never starved: no gap of the watchdog's 3 s between pings.
    let p = pings.lock().unwrap();
    let gap = p.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    assert!(
        gap < Duration::from_millis(2_900),
        "a {gap:?} gap in WATCHDOG=1 pings during the recovery"
    );
    assert!(
        p.last().is_some_and(|t| *t > hung_at),
        "no ping after the hang"
    );
    drop(p);
    assert!(agent.stop().success());
}

/// A pm2 stand-in for `pm2_bin` that records who ran it and starts nothing.
fn recording_pm2(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let out = dir.join("pm2-ran-as");
    let shim = dir.join("pm2-shim");
    std::fs::write(
        &shim,
        format!("#!/bin/sh\necho \"$(id -u) $*\" >> '{}'\n", out.display()),
    )
    .unwrap();
    std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
    (shim, out)
}

/// Runs `check --once` (as this test, root) on one app whose PM2 lives in `home`, with `shim` as
/// its pm2: one failed check is enough to act.
fn check_once_as_root(
    dir: &std::path::Path,
    state: &std::path::Path,
    home: &std::path::Path,
    shim: &std::path::Path,
) -> std::process::Output {
    let config = dir.join("pmguard.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nstate_dir = \"{}\"\npm2_home = \"{}\"\npm2_bin = \"{}\"\n[[apps]]\nname = \"web\"\nmax_retries = 1\nretry_interval = \"100ms\"\nstartup_grace = \"0s\"\n",
            state.display(),
            home.display(),
            shim.display()
        ),
    )
    .unwrap();
    Command::new(AGENT)
        .args(["check", "--once", "--config"])
        .arg(&config)
        .env_remove("PM2_HOME")
        .output()
        .unwrap()
}

/// Fault: the PM2 daemon is stalled (SIGSTOP) for 25 s. It is alive, so it must never be
/// resurrected (that would re-read a stale dump.pm2); the apps are reported, not acted on, and
/// the agent sees them healthy again once the daemon runs.
#[test]
fn a_stalled_pm2_daemon_is_never_resurrected() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("stall", port, &[]);
    let dir = tempfile::tempdir().unwrap();
    let (shim, ran) = recording_pm2(dir.path());
    let agent = Agent::start_with(
        &pm2,
        &format!("pm2_bin = \"{}\"", shim.display()),
        &app(
            "stall",
            port,
            "max_retries = 1\nretry_interval = \"300ms\"\nstartup_grace = \"0s\"",
        ),
        &[],
    );
    agent.wait_for_probe_ok();
    let daemon = pm2.daemon_pid().expect("a PM2 daemon");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .ok();
    // Seen by the next list or ping: within `RELIST_MS` (10 s), the ping's 1 s and the list's 3 s.
    wait_until(Duration::from_secs(25), "pm2_unresponsive", || {
        !health_changes(&agent, "pm2_unresponsive").is_empty()
    });
    std::thread::sleep(Duration::from_secs(25));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon),
        nix::sys::signal::Signal::SIGCONT,
    )
    .ok();
    wait_until(Duration::from_secs(15), "healthy again", || {
        let down = health_changes(&agent, "pm2_unresponsive");
        let up = health_changes(&agent, "healthy");
        up.last()
            .zip(down.first())
            .is_some_and(|(u, d)| u["ts_ms"].as_u64() > d["ts_ms"].as_u64())
    });
    assert!(
        !ran.exists(),
        "pm2 was run against a live daemon: {}",
        std::fs::read_to_string(&ran).unwrap_or_default()
    );
    assert!(
        agent
            .of_kind("resurrect")
            .iter()
            .all(|e| !e["message"].as_str().unwrap_or("").contains("ran `pm2")),
        "{:?}",
        agent.of_kind("resurrect")
    );
    assert!(
        agent.of_kind("restart").is_empty(),
        "restarted through a stalled daemon"
    );
    assert_eq!(
        pm2.daemon_pid(),
        Some(daemon),
        "the same daemon, never replaced"
    );
}

/// Fault: a person runs the backup check as root while the PM2 user's daemon is down. pmguard
/// must never start PM2 (or anything) as root for that user: it becomes PM2_HOME's owner first,
/// so `pm2 resurrect` runs as the owner and every state file it writes is the owner's.
#[test]
fn the_backup_check_run_as_root_acts_only_as_pm2_homes_owner() {
    if nix::unistd::geteuid().as_raw() != 0 {
        eprintln!("skipped: needs root");
        return;
    }
    const NOBODY: u32 = 65534;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = dir.path().join("pm2");
    let state = dir.path().join("state");
    let out = dir.path().join("out");
    for d in [&home, &state, &out] {
        std::fs::create_dir(d).unwrap();
        std::os::unix::fs::chown(d, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let (shim, ran) = recording_pm2(&out);
    // The user's daemon crashed: its pm2.pid names a process that is gone.
    let mut gone = Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    std::fs::write(home.join("pm2.pid"), gone_pid.to_string()).unwrap();
    std::os::unix::fs::chown(home.join("pm2.pid"), Some(NOBODY), Some(NOBODY)).unwrap();
    let output = check_once_as_root(dir.path(), &state, &home, &shim);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let who = std::fs::read_to_string(&ran).unwrap_or_default();
    assert!(
        who.starts_with(&format!("{NOBODY} resurrect")),
        "pm2 ran as: {who:?}\n{text}"
    );
    for entry in std::fs::read_dir(&state).unwrap() {
        let e = entry.unwrap();
        let m = e.metadata().unwrap();
        assert_eq!(
            m.uid(),
            NOBODY,
            "{} is owned by uid {}",
            e.path().display(),
            m.uid()
        );
    }
}

/// Fault: something (a mistake, an attack) put a FIFO where status.json belongs. The backup
/// check must not hang on it: it reads only regular files and carries on.
#[test]
fn a_fifo_named_status_json_never_hangs_the_backup_check() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let fifo = std::ffi::CString::new(
        state
            .join("status.json")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .unwrap();
    assert!(rustix::fs::mknodat(
        rustix::fs::CWD,
        fifo.as_c_str(),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .is_ok());
    let home = dir.path().join("pm2");
    std::fs::create_dir(&home).unwrap();
    let config = dir.path().join("pmguard.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nstate_dir = \"{}\"\npm2_home = \"{}\"\nresurrect = false\n[[apps]]\nname = \"web\"\nmax_retries = 1\nstartup_grace = \"0s\"\n",
            state.display(),
            home.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(AGENT)
        .args(["check", "--once", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("check --once hung on a FIFO named status.json");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    // It went on to check the app (PM2 is down here): exit 0 or 1, never "could not run".
    assert_ne!(status.code(), Some(2), "{out}");
}

/// Race: an app PM2 starts long after the agent did (a `pm2 start` or `pm2 resurrect` by a
/// person) is first seen while it still starts: its first probes are refused. That app gets its
/// startup grace from when PM2 spawned it, as a restart would, and is never restarted for it.
#[test]
fn an_app_first_seen_while_it_starts_gets_its_grace_from_its_spawn() {
    let pm2 = Pm2Sandbox::new();
    pm2.start_app("other", free_port(), &[]);
    let port = free_port();
    let agent = Agent::start_with(
        &pm2,
        "",
        &app(
            "late",
            port,
            "max_retries = 1\ninterval = \"300ms\"\nstartup_grace = \"4s\"",
        ),
        &[],
    );
    // The agent's own grace runs out while PM2 knows no `late`.
    std::thread::sleep(Duration::from_millis(4_500));
    // Spawned now, listening 1.5 s later: the checks meanwhile are refused.
    pm2.start_app_env("late", port, &[], &[("START_DELAY_MS", "1500")]);
    agent.wait_for_probe_ok();
    let refused = agent
        .of_kind("probe")
        .iter()
        .filter(|e| e["ok"] == false)
        .count();
    assert!(
        refused > 0,
        "no check saw the app starting: {:?}",
        agent.of_kind("probe")
    );
    assert!(
        agent.of_kind("restart").is_empty(),
        "{:?}",
        agent.of_kind("restart")
    );
}

/// Fault: a person runs `pm2 kill`. That is PM2 stopped on purpose (it says so on its bus), not
/// a crash: pmguard must not bring it back behind the person's back. When the person runs
/// `pm2 resurrect`, the agent watches the app again, and only one daemon runs.
#[test]
fn a_persons_pm2_kill_is_respected_and_their_resurrect_is_followed() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("manual", port, &[]);
    assert!(pm2.pm2(&["save"]).status.success());
    let dir = tempfile::tempdir().unwrap();
    let (shim, ran) = recording_pm2(dir.path());
    let agent = Agent::start_with(
        &pm2,
        &format!("pm2_bin = \"{}\"", shim.display()),
        &app(
            "manual",
            port,
            // The grace covers node's start after the resurrect below on a loaded CI machine
            // (a restart after the resurrect was seen once in CI with 3 s; cause not proven).
            "max_retries = 1\nretry_interval = \"300ms\"\nstartup_grace = \"8s\"\nrestart_cooldown = \"1s\"",
        ),
        &[],
    );
    agent.wait_for_probe_ok();
    pm2.kill_daemon();
    wait_until(Duration::from_secs(10), "the agent to see PM2 gone", || {
        !health_changes(&agent, "pm2_down").is_empty()
    });
    // Several resurrect windows (cooldown 1 s) pass: pmguard never runs pm2.
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !ran.exists(),
        "pmguard resurrected a PM2 a person stopped: {}",
        std::fs::read_to_string(&ran).unwrap_or_default()
    );
    assert!(
        agent.of_kind("resurrect").iter().any(|e| {
            // Said from the bus's `pm2:kill`, or from the clean stop's missing pm2.pid.
            let m = e["message"].as_str().unwrap_or("");
            m.contains("stopped on purpose") || m.contains("stopped (cleanly")
        }),
        "{:?}",
        agent.of_kind("resurrect")
    );
    // The agent restarts meanwhile (an upgrade): the flag is read back from restarts.json.
    let mut agent = agent;
    assert!(agent.stop().success());
    agent.spawn(&[]);
    // The person brings it back; the agent follows.
    assert!(pm2.pm2(&["resurrect"]).status.success());
    wait_until(
        Duration::from_secs(20),
        "healthy under the new daemon",
        || {
            let down = health_changes(&agent, "pm2_down");
            let up = health_changes(&agent, "healthy");
            up.last()
                .zip(down.first())
                .is_some_and(|(u, d)| u["ts_ms"].as_u64() > d["ts_ms"].as_u64())
        },
    );
    assert!(!ran.exists());
    let restarts = agent.of_kind("restart");
    assert!(
        restarts.is_empty(),
        "{restarts:?}\nprobes: {:?}\nstates: {:?}",
        agent.of_kind("probe"),
        agent.of_kind("state_change")
    );
    // Later the daemon crashes (no `pm2 kill`): that one pmguard repairs.
    pm2.crash_daemon();
    wait_until(Duration::from_secs(15), "pmguard's resurrect", || {
        ran.exists()
    });
    let who = std::fs::read_to_string(&ran).unwrap();
    assert!(who.contains("resurrect"), "{who}");
}

/// A person's `pm2 stop` of a server that stops accepting at SIGINT and drains for 3 s: its
/// probes are refused while PM2's list (reused while the bus is quiet) still says online and
/// the process still lives. With `max_retries = 1` one refused probe decides a restart; the
/// fresh list taken before acting shows `stopping`, so pmguard never restarts what a person is
/// stopping (seen once in CI with `pm2 kill`).
#[test]
fn a_persons_graceful_stop_is_not_restarted_while_the_server_drains() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app_env(
        "drain",
        port,
        &["--kill-timeout", "10000"],
        &[("GRACEFUL_MS", "3000"), ("DRAIN_CLOSES", "1")],
    );
    let agent = Agent::start(
        &pm2,
        &app(
            "drain",
            port,
            // The grace outlasts the drain, so PM2's `stopping` alone decides nothing here.
            "max_retries = 1\nretry_interval = \"200ms\"\nstartup_grace = \"5s\"\nrestart_cooldown = \"1s\"",
        ),
    );
    agent.wait_for_probe_ok();
    // Past the agent's own start-up grace.
    std::thread::sleep(Duration::from_millis(5_500));
    assert!(pm2.pm2(&["stop", "drain"]).status.success());
    std::thread::sleep(Duration::from_secs(2));
    let refused = agent
        .of_kind("probe")
        .iter()
        .filter(|p| p["ok"] == false)
        .count();
    assert!(
        refused > 0,
        "no probe failed during the drain: {:?}",
        agent.events()
    );
    let restarts = agent.of_kind("restart");
    assert!(
        restarts.is_empty(),
        "{restarts:?}\nprobes: {:?}",
        agent.of_kind("probe")
    );
}

/// A person's `pm2 stop` of a server that drains for longer than `startup_grace`: PM2 reports
/// `stopping` the whole time, which is its own work within the app's `kill_timeout`, not a
/// stuck state. Nothing may be restarted, and once stopped the app is left stopped.
#[test]
fn a_stop_longer_than_the_start_up_grace_is_waited_out_not_restarted() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app_env(
        "longstop",
        port,
        &["--kill-timeout", "15000"],
        &[("GRACEFUL_MS", "5000"), ("DRAIN_CLOSES", "1")],
    );
    let agent = Agent::start(
        &pm2,
        &app(
            "longstop",
            port,
            "max_retries = 1\nretry_interval = \"200ms\"\nstartup_grace = \"1s\"\nrestart_cooldown = \"1s\"",
        ),
    );
    agent.wait_for_probe_ok();
    std::thread::sleep(Duration::from_millis(1_500));
    // `pm2 stop` returns once PM2 has stopped the app: 5 s of `stopping`, five start-up graces.
    let began = std::time::Instant::now();
    assert!(pm2.pm2(&["stop", "longstop"]).status.success());
    assert!(
        began.elapsed() >= Duration::from_secs(4),
        "the app did not drain: {:?}",
        began.elapsed()
    );
    std::thread::sleep(Duration::from_secs(3));
    let restarts = agent.of_kind("restart");
    assert!(
        restarts.is_empty(),
        "{restarts:?}\nevents: {:?}",
        agent.events()
    );
    let list = pm2.jlist();
    assert_eq!(list[0]["pm2_env"]["status"], "stopped", "{list}");
}

/// Fault: a person moves the state directory away and makes a new one while the agent runs.
/// The agent's inotify watch follows the old directory, so it must notice, fall back to
/// writing `status.json` every few seconds, and put its heartbeat in the new directory:
/// `status` (and the backup check) must see a live agent there, not a dead one.
#[test]
fn a_state_directory_moved_away_is_followed_by_path() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("moved", port, &[]);
    let agent = Agent::start(&pm2, &app("moved", port, "max_retries = 100"));
    agent.wait_for_probe_ok();
    let status = || agent.status_json();
    wait_until(Duration::from_secs(10), "a first heartbeat", || {
        status().status.success()
    });
    let state = agent.state();
    let old = state.with_file_name("state.old");
    std::fs::rename(&state, &old).unwrap();
    // A moment with no directory at the path at all: the agent's first try to reopen its
    // heartbeat there fails, and must be tried again.
    std::thread::sleep(Duration::from_millis(500));
    std::fs::create_dir(&state).unwrap();
    wait_until(
        Duration::from_secs(15),
        "a live agent seen in the new directory, its heartbeat file there",
        || status().status.success() && state.join("heartbeat").exists(),
    );
    // And it stays so, with nobody asking in between: the fallback rewrites status.json.
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(8) {
        std::thread::sleep(Duration::from_millis(500));
        let beat = std::fs::read_to_string(state.join("heartbeat")).unwrap_or_default();
        assert!(beat.starts_with("pmguard-heartbeat"), "{beat:?}");
    }
    let out = status();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{v}");
    assert_eq!(v["fresh_on_read"], false, "{v}");
    let log = std::fs::read_to_string(old.with_file_name("agent-1.log")).unwrap_or_default();
    assert!(
        log.contains("no longer the one watched"),
        "the agent says why it falls back: {log}"
    );
}

/// Fault: `pm2 update` while the agent runs (the daemon is replaced, every app restarted by PM2,
/// the agent's connection dropped). The agent follows the new daemon and restarts nothing.
#[test]
fn pm2_update_while_watching_needs_no_action() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("upd", port, &[]);
    assert!(pm2.pm2(&["save"]).status.success());
    let agent = Agent::start(
        &pm2,
        &app(
            "upd",
            port,
            "max_retries = 2\nretry_interval = \"300ms\"\nstartup_grace = \"3s\"",
        ),
    );
    agent.wait_for_probe_ok();
    let before = pm2.daemon_pid();
    assert!(pm2.pm2(&["update"]).status.success());
    assert_ne!(pm2.daemon_pid(), before, "a new daemon");
    let mark = clock_ms();
    wait_until(
        Duration::from_secs(20),
        "a passing check under the new daemon",
        || {
            agent
                .of_kind("probe")
                .iter()
                .any(|e| e["ok"] == true && e["ts_ms"].as_u64().is_some_and(|t| t > mark))
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        agent.of_kind("restart").is_empty(),
        "{:?}",
        agent.of_kind("restart")
    );
    assert!(
        agent
            .of_kind("resurrect")
            .iter()
            .all(|e| !e["message"].as_str().unwrap_or("").contains("ran `pm2")),
        "resurrected during pm2 update"
    );
}

/// Fault: the app exits cleanly (exit 0). PM2 starts it again by itself: that is PM2's job, and
/// pmguard must not add a restart of its own.
#[test]
fn a_clean_exit_is_left_to_pm2() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("clean", port, &[]);
    let agent = Agent::start(
        &pm2,
        &app(
            "clean",
            port,
            "max_retries = 3\nretry_interval = \"300ms\"\nstartup_grace = \"3s\"",
        ),
    );
    agent.wait_for_probe_ok();
    let old = pm2.pids("clean");
    let _ = common::set_mode(port, "exit");
    wait_until(Duration::from_secs(15), "PM2's own restart", || {
        let now = pm2.pids("clean");
        !now.is_empty() && now != old
    });
    let mark = clock_ms();
    wait_until(Duration::from_secs(15), "healthy again", || {
        agent
            .of_kind("probe")
            .iter()
            .any(|e| e["ok"] == true && e["ts_ms"].as_u64().is_some_and(|t| t > mark))
    });
    assert!(agent.of_kind("restart").is_empty(), "pmguard restarted too");
    assert!(
        !agent.of_kind("pm2_event").is_empty(),
        "PM2's restart was noticed"
    );
}

/// Fault: the agent is SIGKILLed right after it asked PM2 for a restart. The restart was booked
/// before PM2 was asked, so the next agent (or the backup check) does not restart the app again
/// inside the cooldown.
#[test]
fn an_agent_killed_mid_restart_leaves_no_double_restart() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app_env("dbl", port, &[], &[("MODE", "500")]);
    let mut agent = Agent::start(
        &pm2,
        &app(
            "dbl",
            port,
            "max_retries = 1\nretry_interval = \"200ms\"\nstartup_grace = \"0s\"\nrestart_cooldown = \"30s\"",
        ),
    );
    agent.wait_for(Duration::from_secs(15), "restart");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .ok();
    let _ = agent.child.as_mut().map(|c| c.wait());
    let restarts_by_pm2 = |pm2: &Pm2Sandbox| -> u64 {
        pm2.jlist()
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["pm2_env"]["restart_time"].as_u64().unwrap_or(0))
            .sum()
    };
    std::thread::sleep(Duration::from_millis(500));
    let after_first = restarts_by_pm2(&pm2);
    assert!(after_first <= 1, "{after_first}");
    agent.spawn(&[]);
    // The app still fails (MODE=500) for 5 s under the new agent: within the cooldown.
    std::thread::sleep(Duration::from_secs(5));
    let restarts = agent.of_kind("restart");
    assert_eq!(
        restarts.len(),
        1,
        "restarted again inside the cooldown after the agent was killed: {restarts:?}"
    );
    assert!(restarts_by_pm2(&pm2) <= 1);
}

/// Fault: the state directory's filesystem is full. The agent cannot write its event file or
/// heartbeat, but it never stops watching: a hung app is still restarted.
#[test]
fn a_full_state_dir_never_stops_the_watching() {
    if nix::unistd::geteuid().as_raw() != 0 {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("full", port, &[]);
    let mut agent = Agent::prepare(
        &pm2,
        "",
        &app("full", port, "max_retries = 2\ntimeout = \"500ms\"\nretry_interval = \"300ms\"\nstartup_grace = \"1s\""),
    );
    let state = agent.state();
    std::fs::create_dir_all(&state).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k,mode=0750", "tmpfs"])
        .arg(&state)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(state.clone());
    agent.spawn(&[]);
    wait_until(Duration::from_secs(10), "events written", || {
        !agent.of_kind("probe").is_empty()
    });
    // Fill it up.
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k", "count=1000"])
        .arg(format!("of={}", state.join("ballast").display()))
        .stderr(std::process::Stdio::null())
        .status();
    let old = pm2.pids("full");
    for pid in &old {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .ok();
    }
    wait_until(Duration::from_secs(20), "the hung app replaced", || {
        let now = pm2.pids("full");
        !now.is_empty() && now.iter().all(|p| !old.contains(p))
    });
    assert!(
        agent.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the agent died"
    );
    // Room again: events are written again.
    std::fs::remove_file(state.join("ballast")).unwrap();
    let n = agent.events().len();
    let _ = common::set_mode(port, "500");
    wait_until(Duration::from_secs(15), "events again", || {
        agent.events().len() > n
    });
    assert!(agent.stop().success());
}

/// Fault: every state file is corrupt at start (a crash mid-write on an old version, a disk
/// error). The agent moves the restart history aside, starts, and watches.
#[test]
fn corrupt_state_files_are_set_aside_and_watching_goes_on() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("corrupt", port, &[]);
    let mut agent = Agent::prepare(&pm2, "", &app("corrupt", port, ""));
    let state = agent.state();
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o750)).unwrap();
    std::fs::write(state.join("restarts.json"), b"{\"boot_epoch\": tru").unwrap();
    std::fs::write(state.join("status.json"), b"\x00\x01garbage").unwrap();
    std::fs::write(state.join("events.jsonl"), b"not json at all\n{\"half\":").unwrap();
    agent.spawn(&[]);
    agent.wait_for_probe_ok();
    assert!(state.join("restarts.json.corrupt").exists());
    // The garbage status.json is replaced by the first heartbeat.
    let mut v = Value::Null;
    wait_until(
        Duration::from_secs(10),
        "status from the new heartbeat",
        || {
            let status = agent.status_json();
            v = serde_json::from_slice(&status.stdout).unwrap_or(Value::Null);
            v["apps"][0]["name"] == "corrupt"
        },
    );
    assert!(agent.stop().success());
}

/// Fault: an app whose SIGINT handler drains for 20 s spins at 100 % CPU (its event loop never
/// gets to the handler), `kill_timeout` 20 s. The restart comes from the failing probe before the
/// CPU window (60 s) is over; a process spinning at the threshold right then is killed at once
/// instead of waiting out PM2's graceful stop.
#[test]
fn a_spinning_app_with_a_shutdown_handler_is_killed_at_once() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app_env(
        "spin20",
        port,
        &["--kill-timeout", "20000"],
        &[("GRACEFUL_MS", "20000")],
    );
    let agent = Agent::start(
        &pm2,
        &app(
            "spin20",
            port,
            // The suite shares 2 cores with other tests (and CI with builds): a spinning process
            // was seen getting 34-40 % of a core at load 15, so the threshold it must reach is a
            // fifth of a core; the idle app stays at 0-3 %.
            "max_retries = 2\ntimeout = \"500ms\"\nretry_interval = \"300ms\"\nstartup_grace = \"2s\"\ncpu_threshold = 20",
        ),
    );
    agent.wait_for_probe_ok();
    let old = pm2.pids("spin20");
    let _ = common::set_mode(port, "spin");
    let restart = agent.wait_for(Duration::from_secs(20), "restart");
    let restart_ts = restart["ts_ms"].as_u64().unwrap();
    let ms = healthy_after(&agent, restart_ts);
    eprintln!("spinning app with a 20 s drain: healthy {ms} ms after the restart decision");
    assert!(
        ms <= 10_000,
        "{ms} ms: PM2's graceful stop was waited out\n{}\n{:?}",
        agent.log(),
        agent.of_kind("escalation")
    );
    assert_ne!(pm2.pids("spin20"), old);
    // Not `pm2 kill` at the end: it would wait out the 20 s drain of the new process.
    drop(agent);
    pm2.crash_daemon();
}

/// Fault: the PM2 user makes PM2_HOME a symlink to a root-owned world-writable directory with
/// their own dump.pm2 in it, hoping root's backup check resurrects it as root. pmguard refuses
/// a PM2_HOME whose owner it cannot tell for sure, and starts nothing.
#[test]
fn a_symlinked_pm2_home_is_refused_as_root() {
    if nix::unistd::geteuid().as_raw() != 0 {
        eprintln!("skipped: needs root");
        return;
    }
    const NOBODY: u32 = 65534;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let trap = dir.path().join("trap");
    std::fs::create_dir(&trap).unwrap();
    std::fs::set_permissions(&trap, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let user = dir.path().join("user");
    std::fs::create_dir(&user).unwrap();
    std::os::unix::fs::chown(&user, Some(NOBODY), Some(NOBODY)).unwrap();
    let home = user.join(".pm2");
    std::os::unix::fs::symlink(&trap, &home).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(NOBODY), Some(NOBODY)).unwrap();
    let (shim, ran) = recording_pm2(&trap);
    let out = check_once_as_root(dir.path(), &state, &home, &shim);
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("is a symlink"), "{text}");
    assert!(
        !ran.exists(),
        "pm2 ran: {}",
        std::fs::read_to_string(&ran).unwrap_or_default()
    );
    assert_eq!(
        std::fs::read_dir(&state).unwrap().count(),
        0,
        "wrote into the state dir"
    );
}

/// Fault: a root PM2 runs an app as another user (`pm2 start --uid nobody`), `kill_timeout`
/// 20 s, and the app hangs (SIGSTOP). The process is not PM2's user's, but it is the daemon's
/// child and started when PM2 says: pmguard may kill it at once.
#[test]
fn a_hung_app_pm2_runs_as_another_user_is_killed_at_once() {
    if nix::unistd::geteuid().as_raw() != 0 {
        eprintln!("skipped: needs a root PM2");
        return;
    }
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app(
        "asuser",
        port,
        &["--uid", "nobody", "--kill-timeout", "20000"],
    );
    let pids = pm2.pids("asuser");
    assert_eq!(pids.len(), 1);
    let uid = std::fs::metadata(format!("/proc/{}", pids[0]))
        .unwrap()
        .uid();
    assert_eq!(uid, 65534, "the app runs as nobody");
    let agent = Agent::start(
        &pm2,
        &app(
            "asuser",
            port,
            "max_retries = 2\ntimeout = \"400ms\"\nstartup_grace = \"2s\"",
        ),
    );
    agent.wait_for_probe_ok();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0] as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .ok();
    let restart = agent.wait_for(Duration::from_secs(20), "restart");
    let restart_ts = restart["ts_ms"].as_u64().unwrap();
    let ms = healthy_after(&agent, restart_ts);
    eprintln!("hung app run as nobody by a root PM2: healthy {ms} ms after the decision");
    assert!(ms <= 10_000, "{ms} ms\n{}", agent.log());
}

/// A tmpfs mounted on a directory for one test, lazily unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fault: the disk under the state directory fills up. `status.json` can no longer be
/// rewritten, so the heartbeat must go stale (`status` exits 1 and the backup check takes over)
/// instead of a fresh one-line beat laid over app states that are no longer true; systemd's
/// watchdog still hears from the agent (a kill would stop the watching that matters most on a
/// full disk); with space back, the agent is fresh again. (A real full filesystem: a 1 MiB
/// tmpfs, filled by hand.)
#[test]
fn a_full_state_disk_withholds_the_heartbeat_until_status_json_can_be_written() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("full", port, &[]);
    let mut agent = Agent::prepare(&pm2, "", &app("full", port, "max_retries = 100"));
    let state = agent.state();
    std::fs::create_dir_all(&state).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs"])
        .arg(&state)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a tmpfs (the suite runs as root)");
    let _tmpfs = Tmpfs(state.clone());
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // WATCHDOG_USEC = 2 s: a ping at least every 0.5 s while on schedule.
    agent.spawn(&[
        ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "2000000"),
    ]);
    let status = || {
        Command::new(AGENT)
            .args(["status", "--config"])
            .arg(agent.config())
            .output()
            .unwrap()
            .status
            .code()
    };
    wait_until(Duration::from_secs(10), "a fresh heartbeat", || {
        status() == Some(0)
    });
    // Fill the disk: the next status.json rewrite (at most 5 s away) fails.
    let filler = state.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let block = vec![0u8; 64 * 1024];
    while std::io::Write::write_all(&mut f, &block).is_ok() {}
    drop(f);
    wait_until(
        Duration::from_secs(15),
        "a stale heartbeat on a full disk",
        || status() == Some(1),
    );
    // What systemd hears now, the disk still full: pings, about one every 0.5 s.
    let mut buf = [0u8; 512];
    while sock.set_nonblocking(true).is_ok() && sock.recv(&mut buf).is_ok() {}
    sock.set_nonblocking(false).unwrap();
    let began = Instant::now();
    let mut pings = 0;
    while began.elapsed() < Duration::from_secs(3) {
        let n = sock.recv(&mut buf).expect("a notification on a full disk");
        pings += usize::from(&buf[..n] == b"WATCHDOG=1");
    }
    assert!(pings >= 3, "{pings} watchdog pings in 3 s on a full disk");
    std::fs::remove_file(&filler).unwrap();
    wait_until(
        Duration::from_secs(10),
        "fresh again with space back",
        || status() == Some(0),
    );
    assert!(agent.stop().success());
}
