//! Kill escalation when PM2's restart does not complete.
//!
//! A PM2 restart that hangs cannot be made to happen for real on demand (PM2 SIGKILLs after
//! `kill_timeout` itself), so this test uses a FAKE PM2 daemon: an in-test Unix socket speaking
//! the real wire format (through the crate's own codec) that lists one real process and never
//! answers `restartProcessId`. The process is real: the agent must SIGKILL it through a pidfd.
//! A second, healthy app is listed beside it: its checks must go on while the restart hangs.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pmguard_agent::pm2::codec::{encode_frame, Arg, Decoder};
use serde_json::{json, Value};

const AGENT: &str = env!("CARGO_BIN_EXE_pmguard-agent");

/// Lists `apps` (name, pid, pm_uptime in epoch ms), one pm_id each, and never answers a restart.
fn fake_daemon(
    listener: UnixListener,
    apps: Vec<(&'static str, u32, u64)>,
    calls: Arc<Mutex<Vec<String>>>,
) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let calls = calls.clone();
            let apps = apps.clone();
            std::thread::spawn(move || {
                let mut dec = Decoder::new();
                let mut buf = [0u8; 8192];
                loop {
                    let n = match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    dec.feed(&buf[..n]);
                    while let Ok(Some(frame)) = dec.next_frame() {
                        let req: Value =
                            serde_json::from_slice(frame[0].as_json().unwrap()).unwrap();
                        let id = frame[1].as_str().unwrap().to_string();
                        let method = req["method"].as_str().unwrap().to_string();
                        calls.lock().unwrap().push(method.clone());
                        let result = match method.as_str() {
                            "getMonitorData" => Value::Array(apps.iter().enumerate().map(|(i, (name, pid, up))| json!({
                                "pid": pid, "name": name, "pm_id": i,
                                "monit": {"memory": 1000, "cpu": 0},
                                "pm2_env": {"status": "online", "restart_time": 0, "unstable_restarts": 0,
                                            "pm_uptime": up, "exec_mode": "fork_mode", "kill_timeout": 300,
                                            "env": {"SECRET": "hunter2"}}
                            })).collect()),
                            "restartProcessId" => continue, // hangs: never answers
                            "ping" => json!({"msg": "pong"}),
                            _ => json!({}),
                        };
                        let reply = serde_json::to_vec(&json!({"args": [result]})).unwrap();
                        let frame = encode_frame(&[Arg::Json(&reply), Arg::Str(&id)]);
                        if conn.write_all(&frame).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
}

/// Kills and reaps a child when the test ends, failed or not.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A stand-in for the PM2 daemon's process: titled like PM2's God Daemon (what pmguard checks
/// through `pm2.pid`), parent of one app process (`sleep 300`). Returns it and the app's pid;
/// the stand-in exits 137 when its app is SIGKILLed.
fn daemon_with_app(dir: &std::path::Path, home: &std::path::Path) -> (Reap, u32, u64) {
    let pidfile = dir.join("app.pid");
    let up = now_ms();
    let daemon = Command::new("bash")
        .arg("-c")
        .arg(r#"exec -a "PM2 v0.0.0: God Daemon ($2)" bash -c 'sleep 300 & echo $! > "$0"; wait $!' "$1""#)
        .arg("-")
        .arg(&pidfile)
        .arg(home)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    std::fs::write(home.join("pm2.pid"), daemon.id().to_string()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let pid = loop {
        if let Some(p) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
        {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "the stand-in daemon did not start its app"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    (Reap(daemon), pid, up)
}

#[test]
fn hung_pm2_restart_escalates_to_sigkill_of_the_old_pid() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("pm2");
    std::fs::create_dir(&home).unwrap();
    let listener = UnixListener::bind(home.join("rpc.sock")).unwrap();
    // The "app": a real process, a child of the stand-in daemon, that would survive a polite
    // restart.
    let (mut daemon, victim_pid, up) = daemon_with_app(dir.path(), &home);
    let bystander = Reap(
        Command::new("sleep")
            .arg("300")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let calls = Arc::new(Mutex::new(Vec::new()));
    fake_daemon(
        listener,
        vec![("stuck", victim_pid, up), ("fine", bystander.0.id(), up)],
        calls.clone(),
    );
    // The healthy app's endpoint: 200 to every request.
    let fine = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fine_port = fine.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in fine.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut req = [0u8; 1024];
            let _ = conn.read(&mut req);
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let state = dir.path().join("state");
    let config = dir.path().join("pmguard.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ninterval = \"200ms\"\nstate_dir = \"{}\"\npm2_home = \"{}\"\nlog_passing_checks = true\n[[apps]]\nname = \"stuck\"\nhealth_url = \"http://127.0.0.1:{closed_port}/health\"\nmax_retries = 1\nstartup_grace = \"0s\"\nrestart_timeout = \"1s\"\nretry_interval = \"200ms\"\n[[apps]]\nname = \"fine\"\nhealth_url = \"http://127.0.0.1:{fine_port}/health\"\n",
            state.display(),
            home.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let mut agent = Reap(
        Command::new(AGENT)
            .args(["run", "--config"])
            .arg(&config)
            .env("PMGUARD_LOG", "debug")
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    let status = loop {
        if let Some(s) = daemon.0.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(15) {
            let _ = agent.0.kill();
            panic!(
                "the old pid survived; agent log:\n{}",
                std::fs::read_to_string(dir.path().join("agent.log")).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // bash's `wait` reports a child killed by signal 9 as 128 + 9.
    assert_eq!(status.code(), Some(137), "the app was killed by SIGKILL");
    // It waited for PM2 for kill_timeout (300 ms) + restart_timeout (1 s) before killing.
    assert!(started.elapsed() >= Duration::from_millis(1300));
    let events = std::fs::read_to_string(state.join("events.jsonl")).unwrap();
    let parsed: Vec<Value> = events
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    let escalation = parsed
        .iter()
        .find(|e| e["kind"] == "escalation")
        .expect("an escalation event");
    // While PM2 sat on the restart (1.3 s), the other app was still checked every 200 ms.
    let restart_ts = parsed
        .iter()
        .find(|e| e["kind"] == "restart")
        .expect("a restart event")["ts_ms"]
        .as_u64()
        .unwrap();
    let during = parsed
        .iter()
        .filter(|e| e["kind"] == "probe" && e["app"] == "fine" && e["ok"] == true)
        .filter_map(|e| e["ts_ms"].as_u64())
        .filter(|ts| *ts > restart_ts && *ts < escalation["ts_ms"].as_u64().unwrap())
        .count();
    assert!(
        during >= 4,
        "only {during} checks of the healthy app during the hung restart"
    );
    assert_eq!(escalation["pid"], victim_pid);
    assert_eq!(escalation["signal"], "SIGKILL");
    assert!(
        !events.contains("hunter2"),
        "the app environment leaked into events"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| *c == "restartProcessId")
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "no second restart after the kill: {:?}",
            calls.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(agent);
    drop(bystander);
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert!(
        !log.contains("hunter2"),
        "the app environment leaked into the log"
    );
}

/// Fault: PM2 keeps a dead pid in its list (`waiting restart`), and the kernel gave that pid to
/// an unrelated process of the same user. The escalation must never signal it: it is not a
/// child of the PM2 daemon, and it did not start when PM2 started the instance.
#[test]
fn a_pid_pm2_did_not_start_is_never_signalled() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("pm2");
    std::fs::create_dir(&home).unwrap();
    let listener = UnixListener::bind(home.join("rpc.sock")).unwrap();
    // The real daemon stand-in exists (pm2.pid), but the listed pid is not its child.
    let (_daemon, _its_app, _) = daemon_with_app(dir.path(), &home);
    let mut unrelated = Command::new("sleep")
        .arg("300")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    // pm_uptime: PM2 started "its" process an hour ago.
    fake_daemon(
        listener,
        vec![("stuck", unrelated.id(), now_ms() - 3_600_000)],
        calls.clone(),
    );
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let state = dir.path().join("state");
    let config = dir.path().join("pmguard.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ninterval = \"200ms\"\nstate_dir = \"{}\"\npm2_home = \"{}\"\n[[apps]]\nname = \"stuck\"\nhealth_url = \"http://127.0.0.1:{closed_port}/health\"\nmax_retries = 1\nstartup_grace = \"0s\"\nrestart_timeout = \"1s\"\nretry_interval = \"200ms\"\n",
            state.display(),
            home.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let agent = Reap(
        Command::new(AGENT)
            .args(["run", "--config"])
            .arg(&config)
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // Two restart attempts (each waits kill_timeout 300 ms + restart_timeout 1 s).
    let deadline = Instant::now() + Duration::from_secs(15);
    while calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| *c == "restartProcessId")
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "pmguard never tried to restart: {:?}\n{}",
            calls.lock().unwrap(),
            std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        unrelated.try_wait().unwrap().is_none(),
        "an unrelated process was killed through a pid PM2 listed"
    );
    drop(agent);
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert!(
        log.contains("Not signalling a process pmguard cannot prove PM2 started"),
        "{log}"
    );
    let _ = unrelated.kill();
    let _ = unrelated.wait();
}
