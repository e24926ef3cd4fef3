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
use crate::sys::files;

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

/// Reads `pm2.pid` (a regular file, at most 64 bytes) and looks the pid up in `proc_root`: it
/// is this home's daemon only if its command line is PM2's title naming this home
/// (`PM2 vX.Y.Z: God Daemon (<home>)`) and it runs as the home's owner. A stale pid file whose
/// pid now belongs to another process, even another user's PM2, names no daemon.
pub fn daemon_process(paths: &Pm2Paths, proc_root: &Path) -> DaemonProcess {
    use std::os::unix::fs::MetadataExt;
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
    let proc_uid = match std::fs::metadata(&dir) {
        Ok(m) => m.uid(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return DaemonProcess::None,
        Err(e) => return DaemonProcess::Unknown(format!("{}: {e}", dir.display())),
    };
    let cmdline = match files::read_capped(&dir.join("cmdline"), 4096) {
        Ok(Some(b)) => b,
        Ok(None) => return DaemonProcess::None,
        Err(e) => return DaemonProcess::Unknown(format!("{}: {e}", dir.display())),
    };
    let title = String::from_utf8_lossy(cmdline.split(|b| *b == 0).next().unwrap_or(&[]));
    // The title names PM2_HOME as the daemon saw it: the same directory may be spelled
    // differently (a trailing slash, a symlinked path), so compare the directories themselves.
    let named = title
        .trim_end()
        .strip_suffix(')')
        .and_then(|t| t.rsplit_once('('))
        .map(|(_, home)| std::path::PathBuf::from(home));
    let same_dir = |a: &Path, b: &Path| {
        a == b
            || matches!(
                (std::fs::canonicalize(a), std::fs::canonicalize(b)),
                (Ok(x), Ok(y)) if x == y
            )
    };
    let names_home = title.starts_with("PM2") && named.is_some_and(|n| same_dir(&n, &paths.home));
    let home_owner = std::fs::symlink_metadata(&paths.home).map(|m| m.uid()).ok();
    if names_home && home_owner.is_none_or(|o| o == proc_uid) {
        DaemonProcess::Alive(pid)
    } else {
        DaemonProcess::None
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
        // Reused by another home's PM2 daemon: not this home's.
        fake(
            d.path(),
            &proc_root,
            4244,
            Some(b"PM2 v7.0.4: God Daemon (/home/other/.pm2)\x00"),
        );
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
        let title = format!("PM2 v7.0.4: God Daemon ({})\0", d.path().display());
        fake(d.path(), &proc_root, 77, Some(title.as_bytes()));
        assert_eq!(daemon_process(&paths, &proc_root), DaemonProcess::Alive(77));
        assert!(matches!(
            judge(&refused(&paths), &paths, &proc_root),
            Liveness::Unresponsive(_)
        ));
        // The same home spelled with a trailing slash is still this home.
        let title = format!("PM2 v7.0.4: God Daemon ({}/)\0", d.path().display());
        fake(d.path(), &proc_root, 78, Some(title.as_bytes()));
        assert_eq!(daemon_process(&paths, &proc_root), DaemonProcess::Alive(78));
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
