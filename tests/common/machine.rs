//! A booted Debian root (tests/e2e/nspawn.sh) as the end-to-end tests drive it: commands inside
//! as root, files copied in, waits with the agent's journal on a timeout, teardown on drop.
//! Shared by e2e_install, e2e_multiuser, e2e_deb and e2e_bootstrap (each adds what only it
//! needs).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/nspawn.sh")
}

/// Runs `nspawn.sh ARGS...`.
pub fn sh(args: &[&str]) -> Output {
    Command::new("bash")
        .arg(script())
        .args(args)
        .output()
        .unwrap()
}

/// Runs `nspawn.sh ARGS...`, which must succeed; its stdout.
pub fn ok(args: &[&str]) -> String {
    let o = sh(args);
    assert!(
        o.status.success(),
        "nspawn.sh {args:?} failed ({}):\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The .deb that `bash dist/build` wrote for this version.
pub fn built_deb() -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap();
    let deb = target.join(format!(
        "dist/pmguard_{}_amd64.deb",
        env!("CARGO_PKG_VERSION")
    ));
    assert!(
        deb.exists(),
        "{} is missing: run `bash dist/build` first (.ci/run does, before the tests)",
        deb.display()
    );
    deb
}

/// A booted container, torn down on drop.
pub struct Machine(pub String);

impl Machine {
    /// As root: the cached root prepared, a fresh container booted (`Machine::boot(tag)`) with
    /// the sample app under `pm2-ubuntu.service`, and this build's `pmguard` and
    /// `pmguard-agent` copied in as /root/pmguard and /root/pmguard-agent.
    pub fn with_pmguard(tag: &str) -> Machine {
        assert_eq!(
            nix::unistd::geteuid().as_raw(),
            0,
            "the end-to-end test boots a container: run it as root (CI does)"
        );
        let pmguard = Path::new(env!("CARGO_BIN_EXE_pmguard"));
        let agent = pmguard.with_file_name("pmguard-agent");
        assert!(
            agent.exists(),
            "{} is missing: run `cargo test --workspace`",
            agent.display()
        );
        ok(&["prepare"]);
        let m = Machine::boot(tag);
        ok(&["setup-app", &m.0]);
        m.copy_in(pmguard, "/root/pmguard");
        m.copy_in(&agent, "/root/pmguard-agent");
        m
    }

    /// Boots a fresh copy of the cached root under a name unique to this test process.
    pub fn boot(tag: &str) -> Machine {
        let m = Machine(format!("{tag}{}", std::process::id()));
        ok(&["boot", &m.0]);
        m
    }

    pub fn exec(&self, cmd: &[&str]) -> Output {
        let mut args = vec!["exec", self.0.as_str()];
        args.extend_from_slice(cmd);
        sh(&args)
    }

    /// Runs a command inside as root, which must succeed; its stdout.
    pub fn run(&self, cmd: &[&str]) -> String {
        let mut args = vec!["exec", self.0.as_str()];
        args.extend_from_slice(cmd);
        ok(&args)
    }

    pub fn copy_in(&self, src: &Path, dest: &str) {
        ok(&["copy-in", &self.0, src.to_str().unwrap(), dest]);
    }

    /// Waits for `f`; on a timeout, fails with the agent's journal.
    pub fn wait(&self, what: &str, limit: Duration, mut f: impl FnMut(&Machine) -> bool) {
        let deadline = Instant::now() + limit;
        while !f(self) {
            if Instant::now() > deadline {
                // Every agent's: pmguard-agent.service and each pmguard-agent@USER.service.
                let journal = self.exec(&[
                    "journalctl",
                    "-u",
                    "pmguard-agent*",
                    "--no-pager",
                    "-n",
                    "60",
                ]);
                panic!(
                    "timed out waiting for {what}; agent journal:\n{}",
                    String::from_utf8_lossy(&journal.stdout)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Machine {
    /// SIGSTOPs the sample app's process and waits up to `limit` for a new process that
    /// answers its health check; the time from the SIGSTOP.
    pub fn hang_app_and_wait_for_recovery(&self, limit: Duration) -> Duration {
        self.hang_apps_and_wait_for_recovery(&[("ubuntu", 5000)], limit)
    }

    /// The same for several users' apps at once (`(user, port)`: the sample app `user`'s PM2
    /// runs on 127.0.0.1:`port`); the time until the last one is back.
    pub fn hang_apps_and_wait_for_recovery(
        &self,
        apps: &[(&str, u16)],
        limit: Duration,
    ) -> Duration {
        let pid_of = |m: &Machine, user: &str| {
            m.run(&[
                "sh",
                "-c",
                &format!("pgrep -u {user} -f 'app.js' | head -1"),
            ])
            .trim()
            .to_string()
        };
        let hung: Vec<String> = apps.iter().map(|(u, _)| pid_of(self, u)).collect();
        assert!(
            hung.iter().all(|p| !p.is_empty()),
            "no app process to hang: {apps:?}"
        );
        let hung_at = Instant::now();
        for pid in &hung {
            self.run(&["kill", "-STOP", pid]);
        }
        for ((user, port), old) in apps.iter().zip(&hung) {
            let url = format!("http://127.0.0.1:{port}/health");
            self.wait(
                &format!("{user}'s hung app replaced and healthy"),
                limit,
                |m| {
                    let now = pid_of(m, user);
                    !now.is_empty()
                        && now != *old
                        && m.exec(&["curl", "-fsS", "--max-time", "1", &url])
                            .status
                            .success()
                },
            );
        }
        hung_at.elapsed()
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = sh(&["teardown", &self.0]);
    }
}
