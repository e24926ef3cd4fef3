//! Safe file primitives for the state directory: atomic replace, no-follow opens, flock locks.
//!
//! Every file is opened with O_NOFOLLOW|O_CLOEXEC so a symlink planted in the state directory can
//! never redirect a write, and created with an explicit mode. Replacement is write-to-temp in the
//! same directory, optional fsync, rename: a reader sees the old or the new file, never half.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Creates `dir` (mode 0750) if missing; refuses a world-writable directory or one that is a symlink.
pub fn ensure_dir(dir: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is a symlink; give the real directory", dir.display()),
        )),
        Ok(m) if !m.is_dir() => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a directory", dir.display()),
        )),
        Ok(m) if m.permissions().mode() & 0o002 != 0 => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is world-writable; run `chmod o-w {}`",
                dir.display(),
                dir.display()
            ),
        )),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir),
        Err(e) => Err(e),
    }
}

/// Opens (creating with `mode`) a file for appending, never through a symlink.
/// Only a regular file is opened: a FIFO planted under the name is refused at once (O_NONBLOCK:
/// never waited on for a reader).
pub fn open_append(path: &Path, mode: u32) -> io::Result<File> {
    let not_regular = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a regular file; remove it", path.display()),
        )
    };
    // Said plainly before the open (a FIFO with no reader would fail it with ENXIO).
    if std::fs::symlink_metadata(path).is_ok_and(|m| !m.is_file() && !m.file_type().is_symlink()) {
        return Err(not_regular());
    }
    let f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(not_regular());
    }
    Ok(f)
}

/// The most `read_optional` reads of a state file: far above any file pmguard writes.
pub const MAX_STATE_FILE: u64 = 16 * 1024 * 1024;

/// Reads a whole state file, never through a symlink; `None` when it does not exist. Only a
/// regular file is read (a FIFO or device planted under the name is refused, never waited on),
/// and at most `MAX_STATE_FILE` bytes of it.
pub fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    read_capped(path, MAX_STATE_FILE)
}

/// Reads at most `max` bytes of a regular file, never through a symlink and never blocking on
/// its open (O_NONBLOCK: a FIFO would otherwise wait for a writer); `None` when it does not exist.
pub fn read_capped(path: &Path, max: u64) -> io::Result<Option<Vec<u8>>> {
    Ok(read_capped_id(path, max)?.map(|(bytes, _)| bytes))
}

/// Which file a path names: (device, inode). A file replaced by a rename has a new one.
pub type FileId = (u64, u64);

/// The file `path` names now, without opening it (an open is what the agent's state-directory
/// watch reports as a reader); `None` when it does not exist.
pub fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// `read_capped`, with the identity of the file that was read.
pub fn read_capped_id(path: &Path, max: u64) -> io::Result<Option<(Vec<u8>, FileId)>> {
    use std::os::unix::fs::MetadataExt;
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a regular file; remove it", path.display()),
        ));
    }
    let mut buf = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(f, max), &mut buf)?;
    Ok(Some((buf, (meta.dev(), meta.ino()))))
}

/// Replaces `path` with `data` atomically (fsynced), with `mode` and, when given, the owner set
/// on the new file before it takes the name.
pub fn write_atomic_owned(
    path: &Path,
    data: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    write_atomic_with(path, data, mode, true, owner)
}

/// Replaces `path` with `data` atomically, with `mode`; fsyncs file and directory when `durable`.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32, durable: bool) -> io::Result<()> {
    write_atomic_with(path, data, mode, durable, None)
}

fn write_atomic_with(
    path: &Path,
    data: &[u8],
    mode: u32,
    durable: bool,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let mut attempt = 0u32;
    let (tmp, mut file) = loop {
        let tmp: PathBuf = dir.join(format!(
            ".{name}.{}.{}.tmp",
            std::process::id(),
            unique() + attempt as u64
        ));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 16 => attempt += 1,
            Err(e) => return Err(e),
        }
    };
    let result = (|| {
        file.write_all(data)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
        }
        // The umask may have narrowed the mode at create; set it exactly.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        if durable {
            file.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if durable {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed) ^ (crate::clock::mono_now() << 16)
}

/// An exclusive flock on a lock file in the state directory; released on drop.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

/// Why a lock was not taken.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds it.
    Busy,
    Io(io::Error),
}

fn open_lock(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

impl Lock {
    /// Takes the lock now or reports `Busy`.
    pub fn try_take(path: &Path) -> Result<Lock, LockError> {
        let file = open_lock(path).map_err(LockError::Io)?;
        match file.try_lock() {
            Ok(()) => Ok(Lock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(LockError::Busy),
            Err(std::fs::TryLockError::Error(e)) => Err(LockError::Io(e)),
        }
    }

    /// Waits for the lock up to `wait`.
    pub fn take(path: &Path, wait: Duration) -> Result<Lock, LockError> {
        let deadline = Instant::now() + wait;
        loop {
            match Lock::try_take(path) {
                Err(LockError::Busy) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn atomic_write_sets_mode_and_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("status.json");
        write_atomic(&p, b"one", 0o640, true).unwrap();
        write_atomic(&p, b"two", 0o640, false).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o640);
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            1,
            "no temp files left"
        );
    }

    #[test]
    fn refuses_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("victim");
        std::fs::write(&target, b"precious").unwrap();
        let link = d.path().join("events.jsonl");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(open_append(&link, 0o640).is_err());
        assert!(Lock::try_take(&link).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        let dirlink = d.path().join("state");
        std::os::unix::fs::symlink(d.path(), &dirlink).unwrap();
        assert!(ensure_dir(&dirlink).is_err());
    }

    #[test]
    fn a_fifo_or_a_huge_file_is_never_waited_on_or_read_whole() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("status.json");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let err = read_optional(&fifo).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let err = open_append(&fifo, 0o640).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let big = d.path().join("big");
        std::fs::write(&big, vec![b'x'; 1000]).unwrap();
        assert_eq!(read_capped(&big, 10).unwrap().unwrap().len(), 10);
        assert_eq!(read_optional(&d.path().join("none")).unwrap(), None);
    }

    #[test]
    fn lock_is_exclusive_across_opens() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("restart.lock");
        let held = Lock::try_take(&p).unwrap();
        assert!(matches!(Lock::try_take(&p), Err(LockError::Busy)));
        assert!(matches!(
            Lock::take(&p, Duration::from_millis(60)),
            Err(LockError::Busy)
        ));
        drop(held);
        Lock::try_take(&p).unwrap();
    }
}
