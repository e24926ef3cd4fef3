//! Test harness shared by the integration tests: a private PM2 daemon per test, the test app, and
//! small helpers (free ports, condition waits, a minimal HTTP GET).
//!
//! Each [`Pm2Sandbox`] has its own `PM2_HOME` in a private temp dir (mode 0700); the daemon starts
//! with the first `pm2` command that needs one and is killed (and waited for) on drop. The sandbox
//! never runs `pm2` against a home without a live daemon on drop, because the CLI spawns one.
//! `PMGUARD_TEST_PM2` may name the pm2 binary (default `pm2`).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use pmguard_agent::pm2::Pm2Paths;

/// The test app, started under PM2 by [`Pm2Sandbox::start_app`].
/// (This harness is shared with the workspace root's tests, whose manifest dir is one level up.)
pub fn app_js() -> String {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let own = here.join("tests/apps/app.js");
    let path = if own.exists() {
        own
    } else {
        here.join("agent/tests/apps/app.js")
    };
    path.display().to_string()
}

pub struct Pm2Sandbox {
    _dir: tempfile::TempDir,
    home: PathBuf,
}

impl Pm2Sandbox {
    pub fn new() -> Pm2Sandbox {
        let dir = tempfile::Builder::new()
            .prefix("pmg")
            .tempdir()
            .expect("create temp dir");
        // tempdir() is 0700 already; make it explicit, the PM2 home holds app environments.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let home = dir.path().join("pm2");
        Pm2Sandbox { _dir: dir, home }
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    pub fn paths(&self) -> Pm2Paths {
        Pm2Paths::from_home(&self.home)
    }

    fn command(&self, args: &[&str]) -> Command {
        let bin = std::env::var("PMGUARD_TEST_PM2").unwrap_or_else(|_| "pm2".into());
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .env("PM2_HOME", &self.home)
            .env_remove("PM2_DAEMON_RPC_PORT")
            .env_remove("PM2_DAEMON_PUB_PORT")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the real `pm2` CLI against this sandbox's home (it starts the daemon if none runs).
    pub fn pm2(&self, args: &[&str]) -> Output {
        self.command(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run pm2 {args:?}: {e}"))
    }

    /// Starts `app.js` as `name` with `PORT=port`; waits until `/health` answers 200 and every
    /// entry of `name` is online. `extra` goes to `pm2 start` (e.g. `["-i", "2"]`).
    pub fn start_app(&self, name: &str, port: u16, extra: &[&str]) {
        self.start_app_env(name, port, extra, &[]);
    }

    /// [`start_app`](Self::start_app) with extra environment variables for the app.
    pub fn start_app_env(&self, name: &str, port: u16, extra: &[&str], env: &[(&str, &str)]) {
        let app = app_js();
        let mut args = vec!["start", app.as_str(), "--name", name];
        args.extend_from_slice(extra);
        let mut cmd = self.command(&args);
        cmd.env("PORT", port.to_string());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run pm2 start");
        if !out.status.success() {
            panic!(
                "pm2 start {name} failed: {}\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let healthy = http_get(port, "/health").is_some();
            if healthy {
                let statuses: Vec<String> = self
                    .entries(name)
                    .iter()
                    .map(|e| e["pm2_env"]["status"].as_str().unwrap_or("").to_owned())
                    .collect();
                if !statuses.is_empty() && statuses.iter().all(|s| s == "online") {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "app {name} did not become healthy on port {port}:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// PM2's daemon log and every app log in this home.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut files = vec![self.home.join("pm2.log")];
        if let Ok(rd) = std::fs::read_dir(self.home.join("logs")) {
            files.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
        }
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("==> {} <==\n", f.display()));
            for l in tail.iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// `pm2 jlist`, parsed.
    pub fn jlist(&self) -> serde_json::Value {
        let out = self.pm2(&["jlist"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let start = text
            .find('[')
            .unwrap_or_else(|| panic!("pm2 jlist printed no list: {text}"));
        serde_json::from_str(text[start..].trim())
            .unwrap_or_else(|e| panic!("pm2 jlist: {e}: {text}"))
    }

    fn entries(&self, name: &str) -> Vec<serde_json::Value> {
        let list = self.jlist();
        let mut v: Vec<serde_json::Value> = list
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"] == name)
            .cloned()
            .collect();
        v.sort_by_key(|e| e["pm_id"].as_u64());
        v
    }

    /// Pids of `name`'s entries, by pm_id (0 for a stopped worker).
    pub fn pids(&self, name: &str) -> Vec<u32> {
        self.entries(name)
            .iter()
            .map(|e| e["pid"].as_u64().unwrap_or(0) as u32)
            .collect()
    }

    /// The daemon's pid, if its pid file names a live process.
    pub fn daemon_pid(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.home.join("pm2.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        process_alive(pid).then_some(pid)
    }

    /// `pm2 kill`, then waits until the daemon process is gone (SIGKILL after 10 s).
    /// The daemon dies without a word (SIGKILL, the OOM killer), and its apps with it (as
    /// systemd's KillMode=control-group, or a reboot, would have it): no `pm2:kill` on the bus.
    pub fn crash_daemon(&self) {
        let Some(pid) = self.daemon_pid() else { return };
        let apps: Vec<u32> = self
            .jlist()
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["pid"].as_u64().map(|p| p as u32))
            .filter(|p| *p > 0)
            .collect();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .ok();
        for p in apps {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .ok();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `pm2 kill`, as a person types it: PM2 and its apps stopped on purpose.
    pub fn kill_daemon(&self) {
        let Some(pid) = self.daemon_pid() else { return };
        let _ = self.pm2(&["kill"]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_alive(pid) {
            if Instant::now() > deadline {
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .ok();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Pm2Sandbox {
    fn drop(&mut self) {
        self.kill_daemon();
    }
}

fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie (state Z) has exited.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` every 50 ms until it returns true; panics naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET path` on 127.0.0.1:port with a 2 s timeout: `(status, body)`, or `None` on any failure.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let t = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), t).ok()?;
    s.set_read_timeout(Some(t)).ok()?;
    s.set_write_timeout(Some(t)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// `GET /mode/<mode>`: switches the app's /health behaviour (one worker in cluster mode).
pub fn set_mode(port: u16, mode: &str) -> Option<(u16, String)> {
    http_get(port, &format!("/mode/{mode}"))
}
