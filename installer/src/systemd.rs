//! The installer's view of systemd: is it running, is the unit enabled/active, and `systemctl`.

use std::path::Path;
use std::process::Command;

use crate::Error;

#[derive(Debug, Clone, PartialEq)]
pub enum UnitState {
    /// Installing into a staging root: never touch the host's systemd.
    Staged,
    /// No systemd to talk to (the reason says why).
    NoSystemd(String),
    Live {
        enabled: bool,
        active: bool,
    },
}

pub trait Systemd {
    fn state(&self, unit: &str) -> UnitState;
    fn run(&self, args: &[&str]) -> Result<(), Error>;
}

/// The host's systemd through `systemctl`, or nothing when staging or when systemd is not PID 1.
pub struct Systemctl {
    pub staged: bool,
}

impl Systemd for Systemctl {
    fn state(&self, unit: &str) -> UnitState {
        if self.staged {
            return UnitState::Staged;
        }
        if !Path::new("/run/systemd/system").is_dir() {
            let pid1 = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
            return UnitState::NoSystemd(format!("PID 1 is {}", pid1.trim()));
        }
        let ask = |verb: &str| {
            Command::new("systemctl")
                .args([verb, "--quiet", unit])
                .status()
                .is_ok_and(|s| s.success())
        };
        UnitState::Live {
            enabled: ask("is-enabled"),
            active: ask("is-active"),
        }
    }

    fn run(&self, args: &[&str]) -> Result<(), Error> {
        if self.staged {
            return Ok(());
        }
        let out = Command::new("systemctl")
            .args(args)
            .output()
            .map_err(Error::SystemctlSpawn)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(Error::SystemctlFailed {
                command: format!("systemctl {}", args.join(" ")),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }
}
