//! Kill escalation when PM2's restart does not complete.
//!
//! A PM2 restart that hangs cannot be made to happen for real on demand (PM2 SIGKILLs after
//! `kill_timeout` itself), so this test uses a FAKE PM2 daemon: an in-test Unix socket speaking
//! the real wire format (through the crate's own codec) that lists one real process and never
//! answers `restartProcessId`. The process is real: the agent must SIGKILL it through a pidfd.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pmguard_agent::pm2::codec::{encode_frame, Arg, Decoder};
use serde_json::{json, Value};

const AGENT: &str = env!("CARGO_BIN_EXE_pmguard-agent");

fn fake_daemon(listener: UnixListener, pid: u32, calls: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let calls = calls.clone();
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
                            "getMonitorData" => json!([{
                                "pid": pid, "name": "stuck", "pm_id": 0,
                                "monit": {"memory": 1000, "cpu": 0},
                                "pm2_env": {"status": "online", "restart_time": 0, "unstable_restarts": 0,
                                            "pm_uptime": 1, "exec_mode": "fork_mode", "kill_timeout": 300,
                                            "env": {"SECRET": "hunter2"}}
                            }]),
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
    let calls = Arc::new(Mutex::new(Vec::new()));
    fake_daemon(listener, victim.id(), calls.clone());
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
    let mut agent = Command::new(AGENT)
        .args(["run", "--config"])
        .arg(&config)
        .env("PMGUARD_LOG", "debug")
        .stderr(log)
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = victim.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(15) {
            let _ = agent.kill();
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
    let escalation: Value = events
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["kind"] == "escalation")
        .expect("an escalation event");
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
    let _ = agent.kill();
    let _ = agent.wait();
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert!(
        !log.contains("hunter2"),
        "the app environment leaked into the log"
    );
}
