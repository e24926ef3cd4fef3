//! A running `pmguard-agent run` for the integration tests: its own config and state directory,
//! its log per run, its events, and signals. Shared by `agent.rs` and `aws.rs` (needs `mod common;`
//! beside it). The agent never inherits an `AWS_*` variable: only what a test passes explicitly.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{wait_until, Pm2Sandbox};

pub const AGENT: &str = env!("CARGO_BIN_EXE_pmguard-agent");

pub struct Agent {
    pub child: Option<Child>,
    dir: tempfile::TempDir,
    runs: u32,
}

impl Agent {
    /// The config: `[agent]` with short intervals plus `agent_extra`, then `rest` ([[apps]], [aws]).
    /// Every check is logged (`log_passing_checks`, unless `agent_extra` sets it): the tests read
    /// the checks from events.jsonl.
    pub fn config_text(pm2: &Pm2Sandbox, state: &Path, agent_extra: &str, rest: &str) -> String {
        let log_all = if agent_extra.contains("log_passing_checks") {
            ""
        } else {
            "log_passing_checks = true\n"
        };
        format!(
            "[agent]\ninterval = \"300ms\"\nstate_dir = \"{}\"\npm2_home = \"{}\"\n{log_all}{agent_extra}\n{rest}",
            state.display(),
            pm2.home().display()
        )
    }

    /// Writes the config; nothing runs yet.
    pub fn prepare(pm2: &Pm2Sandbox, agent_extra: &str, rest: &str) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let text = Agent::config_text(pm2, &dir.path().join("state"), agent_extra, rest);
        std::fs::write(dir.path().join("pmguard.toml"), text).unwrap();
        Agent {
            child: None,
            dir,
            runs: 0,
        }
    }

    /// A config with an `[aws]` section (`aws`) and apps; nothing runs yet.
    pub fn new(pm2: &Pm2Sandbox, aws: &str, apps: &str) -> Agent {
        Agent::prepare(pm2, "", &format!("{aws}\n{apps}"))
    }

    pub fn start(pm2: &Pm2Sandbox, apps: &str) -> Agent {
        Agent::start_with(pm2, "", apps, &[])
    }

    pub fn start_with(
        pm2: &Pm2Sandbox,
        agent_extra: &str,
        rest: &str,
        env: &[(&str, &str)],
    ) -> Agent {
        let mut a = Agent::prepare(pm2, agent_extra, rest);
        a.spawn(env);
        a
    }

    pub fn spawn(&mut self, env: &[(&str, &str)]) {
        let owned: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.to_string())).collect();
        self.spawn_env(&owned);
    }

    /// Starts (again) with `env` added to a scrubbed environment.
    pub fn spawn_env(&mut self, env: &[(&str, String)]) {
        self.runs += 1;
        let log = std::fs::File::create(self.dir.path().join(format!("agent-{}.log", self.runs)))
            .unwrap();
        let mut cmd = Command::new(AGENT);
        cmd.args(["run", "--config"])
            .arg(self.config())
            .env("PMGUARD_LOG", "debug")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // Never a real AWS address: only what the test hands over (the local stand-in).
        for (k, _) in std::env::vars() {
            if k.starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("pmguard.toml")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `pmguard-agent status --json` for this agent's config, as a person would run it.
    pub fn status_json(&self) -> std::process::Output {
        Command::new(AGENT)
            .args(["status", "--json", "--config"])
            .arg(self.config())
            .output()
            .unwrap()
    }

    pub fn log(&self) -> String {
        (1..=self.runs)
            .map(|i| {
                std::fs::read_to_string(self.dir.path().join(format!("agent-{i}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n--- next run ---\n")
    }

    pub fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(self.state().join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn of_kind(&self, kind: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["kind"] == kind)
            .collect()
    }

    /// The first event of `kind`, waiting up to `timeout` (the agent's log in the failure).
    pub fn wait_for(&self, timeout: Duration, kind: &str) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.of_kind(kind).into_iter().next() {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no `{kind}` event within {timeout:?}; agent log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_for_probe_ok(&self) {
        wait_until(Duration::from_secs(10), "a passing probe", || {
            self.of_kind("probe").iter().any(|e| e["ok"] == true)
        });
    }

    pub fn signal(&self, sig: i32) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::try_from(sig).ok(),
        )
        .ok();
    }

    /// SIGTERM, then the exit status (within 5 s).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.stop_within(Duration::from_secs(5))
    }

    pub fn stop_within(&mut self, within: Duration) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not stop within {within:?} of SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The names of the agent's threads.
    pub fn threads(&self) -> Vec<String> {
        std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .unwrap()
            .filter_map(|t| t.ok())
            .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
            .map(|s| s.trim().to_string())
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An [[apps]] section with short test timings; keys in `extra` replace the defaults.
pub fn app(name: &str, port: u16, extra: &str) -> String {
    let mut text =
        format!("[[apps]]\nname = \"{name}\"\nhealth_url = \"http://127.0.0.1:{port}/health\"\n");
    for (key, value) in [
        ("timeout", "\"500ms\""),
        ("retry_interval", "\"300ms\""),
        ("startup_grace", "\"0s\""),
        ("restart_cooldown", "\"1s\""),
    ] {
        if !extra.lines().any(|l| l.starts_with(&format!("{key} "))) {
            text.push_str(&format!("{key} = {value}\n"));
        }
    }
    text + extra + "\n"
}
