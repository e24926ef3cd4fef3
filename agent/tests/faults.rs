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
        // SAFETY: plain syscall on a test app process.
        unsafe { libc::kill(*pid as i32, libc::SIGSTOP) };
    }
    let hung_at = Instant::now();
    let hung_wall = clock_ms();
    let restart = agent.wait_for(Duration::from_secs(20), "restart");
    let restart_ts = restart["ts_ms"].as_u64().unwrap();
    let after_restart = |e: &Value| e["ts_ms"].as_u64().is_some_and(|t| t > restart_ts);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !health_changes(&agent, "healthy").iter().any(after_restart) {
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
    let healthy = health_changes(&agent, "healthy")
        .into_iter()
        .find(after_restart)
        .unwrap();
    let recovery_ms = healthy["ts_ms"].as_u64().unwrap() - restart_ts;
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

/// Fault: the PM2 daemon is stalled (SIGSTOP) for 8 s. It is alive, so it must never be
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
    // SAFETY: plain syscall on the test's own PM2 daemon.
    unsafe { libc::kill(daemon, libc::SIGSTOP) };
    wait_until(Duration::from_secs(15), "pm2_unresponsive", || {
        !health_changes(&agent, "pm2_unresponsive").is_empty()
    });
    std::thread::sleep(Duration::from_secs(8));
    // SAFETY: as above.
    unsafe { libc::kill(daemon, libc::SIGCONT) };
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
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
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
    let config = dir.path().join("pmguard.toml");
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
    let output = Command::new(AGENT)
        .args(["check", "--once", "--config"])
        .arg(&config)
        .env_remove("PM2_HOME")
        .output()
        .unwrap();
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
    // SAFETY: a valid C string path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
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
