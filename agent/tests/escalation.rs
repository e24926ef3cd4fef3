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

/// Lists `apps` (name, pid), one pm_id each, and never answers a restart.
fn fake_daemon(
    listener: UnixListener,
    apps: Vec<(&'static str, u32)>,
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
                            "getMonitorData" => Value::Array(apps.iter().enumerate().map(|(i, (name, pid))| json!({
                                "pid": pid, "name": name, "pm_id": i,
                                "monit": {"memory": 1000, "cpu": 0},
                                "pm2_env": {"status": "online", "restart_time": 0, "unstable_restarts": 0,
                                            "pm_uptime": 1, "exec_mode": "fork_mode", "kill_timeout": 300,
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

#[test]
fn hung_pm2_restart_escalates_to_sigkill_of_the_old_pid() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("pm2");
    std::fs::create_dir(&home).unwrap();
    let listener = UnixListener::bind(home.join("rpc.sock")).unwrap();
    // The "app": a real process that would survive a polite restart.
    let mut victim = Command::new("sleep")
        .arg("300")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
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
        vec![("stuck", victim.id()), ("fine", bystander.0.id())],
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
        if let Some(s) = victim.try_wait().unwrap() {
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
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "killed by SIGKILL");
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
    assert_eq!(escalation["pid"], victim.id());
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
