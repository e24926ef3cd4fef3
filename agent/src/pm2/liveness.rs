//! Whether the PM2 daemon is gone, as opposed to slow.
//!
//! A daemon that does not answer may be stalled (SIGSTOP, swapping, a long GC pause), and
//! `pm2 resurrect` against a live daemon re-reads `dump.pm2`: apps deleted since the last
//! `pm2 save` come back. So the daemon counts as gone only on proof:
//! - its socket is missing or refuses connections (a timeout or a dropped call proves nothing),
//! - and `pm2.pid` names no live PM2 daemon (a pid reused by another process does not count).
//!
//! Anything unclear (an unreadable pid file, a process we cannot inspect) counts as alive: the
//! cost of waiting is an alert, the cost of a wrong resurrect is the user's deleted apps back.

use std::io;
use std::path::Path;

use super::types::{Pm2Error, Pm2Paths};
use crate::files;

/// What is known of the daemon after a failed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// Socket refused or missing, and no daemon process: `pm2 resurrect` is safe.
    Gone(String),
    /// The daemon did not answer but may be alive (stalled, busy, or unknown).
    Unresponsive(String),
}

/// Judges a failed PM2 call. `proc_root` is `/proc` outside tests.
pub fn judge(error: &Pm2Error, paths: &Pm2Paths, proc_root: &Path) -> Liveness {
    let connect_failed = matches!(
        error,
        Pm2Error::DaemonDown { source, .. }
            if matches!(source.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound)
    );
    if !connect_failed {
        return Liveness::Unresponsive(error.to_string());
    }
    match daemon_process(paths, proc_root) {
        DaemonProcess::None => Liveness::Gone(error.to_string()),
        DaemonProcess::Alive(pid) => Liveness::Unresponsive(format!(
            "{error}, but the PM2 daemon (pid {pid}) is still running"
        )),
        DaemonProcess::Unknown(why) => Liveness::Unresponsive(format!(
            "{error}, and whether the PM2 daemon still runs is unknown ({why})"
        )),
    }
}

/// The daemon process named by `pm2.pid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonProcess {
    /// No pid file, or it names no live PM2 daemon.
    None,
    Alive(u32),
    Unknown(String),
}

/// Reads `pm2.pid` (a regular file, at most 64 bytes) and looks the pid up in `proc_root`: a
/// process whose command line or name starts with `PM2` (the daemon's title is
/// `PM2 vX.Y.Z: God Daemon (<home>)`) counts as the daemon.
pub fn daemon_process(paths: &Pm2Paths, proc_root: &Path) -> DaemonProcess {
    let pid_file = paths.home.join("pm2.pid");
    let text = match files::read_capped(&pid_file, 64) {
        Ok(None) => return DaemonProcess::None,
        Ok(Some(b)) => b,
        Err(e) => return DaemonProcess::Unknown(format!("{}: {e}", pid_file.display())),
    };
    let Some(pid) = std::str::from_utf8(&text)
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .filter(|p| *p > 0)
    else {
        // PM2 rewrites the file at start; garbage in it names no process.
        return DaemonProcess::None;
    };
    let dir = proc_root.join(pid.to_string());
    let title = |name: &str| files::read_capped(&dir.join(name), 256).ok().flatten();
    match (title("cmdline"), title("comm")) {
        (None, None) if !dir.exists() => DaemonProcess::None,
        (None, None) => DaemonProcess::Unknown(format!("cannot read {}", dir.display())),
        (cmdline, comm) => {
            let looks = |b: &Option<Vec<u8>>| b.as_deref().is_some_and(|b| b.starts_with(b"PM2"));
            if looks(&cmdline) || looks(&comm) {
                DaemonProcess::Alive(pid)
            } else {
                DaemonProcess::None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(home: &Path, proc_root: &Path, pid: u32, cmdline: Option<&[u8]>) {
        std::fs::write(home.join("pm2.pid"), format!("{pid}\n")).unwrap();
        if let Some(c) = cmdline {
            let d = proc_root.join(pid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("cmdline"), c).unwrap();
        }
    }

    fn refused(paths: &Pm2Paths) -> Pm2Error {
        Pm2Error::DaemonDown {
            path: paths.rpc.clone(),
            source: io::ErrorKind::ConnectionRefused.into(),
        }
    }

    #[test]
    fn a_refused_socket_with_no_daemon_process_is_gone() {
        let d = tempfile::tempdir().unwrap();
        let proc_root = d.path().join("proc");
        std::fs::create_dir(&proc_root).unwrap();
        let paths = Pm2Paths::from_home(d.path());
        assert!(matches!(
            judge(&refused(&paths), &paths, &proc_root),
            Liveness::Gone(_)
        ));
        // A stale pid file whose pid is gone, or reused by something that is not PM2.
        fake(d.path(), &proc_root, 4242, None);
        assert!(matches!(
            judge(&refused(&paths), &paths, &proc_root),
            Liveness::Gone(_)
        ));
        fake(d.path(), &proc_root, 4243, Some(b"sleep\x0030\x00"));
        assert!(matches!(
            judge(&refused(&paths), &paths, &proc_root),
            Liveness::Gone(_)
        ));
    }

    #[test]
    fn a_live_daemon_process_is_never_gone() {
        let d = tempfile::tempdir().unwrap();
        let proc_root = d.path().join("proc");
        let paths = Pm2Paths::from_home(d.path());
        fake(
            d.path(),
            &proc_root,
            77,
            Some(b"PM2 v7.0.4: God Daemon (/home/u/.pm2)\x00"),
        );
        assert_eq!(daemon_process(&paths, &proc_root), DaemonProcess::Alive(77));
        assert!(matches!(
            judge(&refused(&paths), &paths, &proc_root),
            Liveness::Unresponsive(_)
        ));
    }

    #[test]
    fn a_timeout_proves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let paths = Pm2Paths::from_home(d.path());
        let e = Pm2Error::Timeout {
            method: "getMonitorData",
            after: std::time::Duration::from_secs(3),
        };
        assert!(matches!(
            judge(&e, &paths, &d.path().join("proc")),
            Liveness::Unresponsive(_)
        ));
        let e = Pm2Error::Disconnected {
            method: "getMonitorData",
        };
        assert!(matches!(
            judge(&e, &paths, &d.path().join("proc")),
            Liveness::Unresponsive(_)
        ));
    }
}
