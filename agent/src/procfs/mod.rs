//! Per-process CPU and scheduler state from `/proc/<pid>/stat`.
//!
//! A `ProcWatch` keeps the stat file open and re-reads it with `pread`: a few microseconds per
//! sample, and it can never read a reused pid (the kernel answers ESRCH once the process is gone).
//! The proc root is injected so tests can point it elsewhere. CPU math is a pure function.
//! `tree` finds an app's descendants and judges the memory and CPU of the whole tree.

mod stuck;
pub mod tree;
pub mod tree_rules;

pub use stuck::{PidTracker, StuckRule};

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

/// What one read of `/proc/<pid>/stat` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatSample {
    /// R running, S sleeping, D uninterruptible, T stopped, t traced, Z zombie, ...
    pub state: char,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    /// Start time after boot, in clock ticks: identifies the process together with its pid.
    pub start_ticks: u64,
    /// The parent's pid.
    pub ppid: u32,
    /// Resident set size, in pages (field 24).
    pub rss_pages: u64,
}

/// A `/proc/<pid>/stat` line that is not one.
#[derive(Debug, thiserror::Error)]
#[error("unexpected /proc stat line: {0}")]
pub struct StatError(String);

/// Parses a stat line. The command name may hold spaces and parentheses; it ends at the last `)`.
pub fn parse_stat(text: &str) -> Result<StatSample, StatError> {
    let close = text
        .rfind(')')
        .ok_or(StatError("no `)` after the command name".into()))?;
    let fields: Vec<&str> = text[close + 1..].split_ascii_whitespace().collect();
    // fields[0] is field 3 (state); utime is field 14, stime 15, starttime 22.
    let get = |n: usize| -> Result<u64, StatError> {
        fields
            .get(n - 3)
            .ok_or_else(|| StatError(format!("field {n} missing")))?
            .parse::<u64>()
            .map_err(|_| StatError(format!("field {n} is not a number")))
    };
    let state = fields
        .first()
        .and_then(|s| s.chars().next())
        .ok_or(StatError("no state field".into()))?;
    Ok(StatSample {
        state,
        cpu_ticks: get(14)? + get(15)?,
        start_ticks: get(22)?,
        ppid: get(4)? as u32,
        rss_pages: get(24)?,
    })
}

/// The boot time in ms since the epoch (`btime` in `/proc/stat`, whole seconds).
pub fn boot_time_ms(proc_root: &Path) -> io::Result<u64> {
    let text = std::fs::read_to_string(proc_root.join("stat"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| s * 1000)
        .ok_or_else(|| invalid("no btime in /proc/stat"))
}

/// When a process started, in ms since the epoch, from its start ticks (precision: the second
/// of `btime` plus one tick).
pub fn start_epoch_ms(boot_ms: u64, start_ticks: u64, ticks_per_sec: u64) -> u64 {
    boot_ms + start_ticks * 1000 / ticks_per_sec.max(1)
}

/// CPU use between two samples, in % of one core. `elapsed_ms` is wall time between the reads.
pub fn cpu_percent(prev_ticks: u64, now_ticks: u64, elapsed_ms: u64, ticks_per_sec: u64) -> f64 {
    if elapsed_ms == 0 || ticks_per_sec == 0 {
        return 0.0;
    }
    let used = now_ticks.saturating_sub(prev_ticks) as f64 / ticks_per_sec as f64;
    used * 100_000.0 / elapsed_ms as f64
}

/// The kernel's clock ticks per second (USER_HZ).
pub fn ticks_per_sec() -> u64 {
    rustix::param::clock_ticks_per_second().max(1)
}

/// A kept handle on one process's stat file.
#[derive(Debug)]
pub struct ProcWatch {
    pub pid: u32,
    /// Owner of `/proc/<pid>` (the process's effective uid) when it was opened.
    pub uid: u32,
    file: File,
}

impl ProcWatch {
    pub fn open(proc_root: &Path, pid: u32) -> io::Result<ProcWatch> {
        let dir = proc_root.join(pid.to_string());
        let uid = std::fs::metadata(&dir)?.uid();
        let file = File::open(dir.join("stat"))?;
        Ok(ProcWatch { pid, uid, file })
    }

    /// Reads the current sample; fails with ESRCH (or ENOENT) once the process has exited.
    pub fn sample(&self) -> io::Result<StatSample> {
        let mut buf = [0u8; 1024];
        let n = self.file.read_at(&mut buf, 0)?;
        if n == 0 {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        let text = std::str::from_utf8(&buf[..n]).map_err(|_| invalid("stat is not UTF-8"))?;
        parse_stat(text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLEEPING: &str = include_str!("../../tests/fixtures/proc-stat-sleeping.txt");
    const STOPPED_WEIRD: &str =
        include_str!("../../tests/fixtures/proc-stat-stopped-weird-name.txt");

    #[test]
    fn parses_real_stat_lines() {
        let s = parse_stat(SLEEPING).unwrap();
        assert_eq!(
            s,
            StatSample {
                state: 'S',
                cpu_ticks: 0,
                start_ticks: 34867,
                ppid: 2376,
                rss_pages: 356,
            }
        );
        // Command name "we ird) (name": the last `)` ends it.
        let s = parse_stat(STOPPED_WEIRD).unwrap();
        assert_eq!(s.state, 'T');
        assert_eq!(s.start_ticks, 34836);
    }

    #[test]
    fn rejects_truncated_lines() {
        assert!(parse_stat("123 (x) S 1 2").is_err());
        assert!(parse_stat("").is_err());
        assert!(parse_stat(&SLEEPING[..60]).is_err());
    }

    #[test]
    fn cpu_math() {
        assert_eq!(cpu_percent(100, 200, 1000, 100), 100.0);
        assert_eq!(cpu_percent(100, 150, 1000, 100), 50.0);
        assert_eq!(cpu_percent(100, 300, 1000, 100), 200.0);
        assert_eq!(cpu_percent(200, 100, 1000, 100), 0.0);
        assert_eq!(cpu_percent(0, 10, 0, 100), 0.0);
    }

    #[test]
    fn watches_a_live_process_and_sees_it_exit() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let w = ProcWatch::open(Path::new("/proc"), child.id()).unwrap();
        assert_eq!(w.uid, crate::sys::privilege::euid());
        let s = w.sample().unwrap();
        assert!(matches!(s.state, 'S' | 'R' | 'D'), "{s:?}");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(w.sample().is_err(), "a reaped process must not be readable");
    }
}
