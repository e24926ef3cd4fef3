//! One `install` or `uninstall` at a time per root: each reads every manifest, plans, and writes
//! them back, so two at once would each write a manifest without the other's entries.
//!
//! The lock is an exclusive `flock` on the root directory itself (`/` on a live box, the
//! staging directory with `--root`): it always exists, so taking it creates no file an
//! uninstall would have to remove, and the kernel drops it when the process exits, however it
//! exits (no stale lock file after a kill).

use std::path::Path;

use crate::Error;

/// Held while it lives.
#[derive(Debug)]
pub struct Lock {
    _dir: std::fs::File,
}

/// Takes the lock if no other pmguard holds it: `None` while another does.
pub fn try_lock(root: &Path) -> Result<Option<Lock>, Error> {
    let dir = std::fs::File::open(root).map_err(Error::io(root))?;
    // std's `File::try_lock` is `flock(LOCK_EX | LOCK_NB)` on Linux.
    match dir.try_lock() {
        Ok(()) => Ok(Some(Lock { _dir: dir })),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(root)(e)),
    }
}

/// Takes the lock, waiting up to `wait` for another pmguard to finish (polled every 100 ms).
pub fn lock(root: &Path, wait: std::time::Duration) -> Result<Lock, Error> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Some(l) = try_lock(root)? {
            return Ok(l);
        }
        if std::time::Instant::now() >= deadline {
            return Err(Error::Locked {
                root: root.to_path_buf(),
                waited_s: wait.as_secs(),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_waits_and_gets_the_lock_once_the_first_is_gone() {
        let root = tempfile::tempdir().unwrap();
        let first = try_lock(root.path()).unwrap().unwrap();
        assert!(try_lock(root.path()).unwrap().is_none());
        let err = lock(root.path(), std::time::Duration::ZERO)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("another pmguard install or uninstall"),
            "{err}"
        );
        drop(first);
        assert!(try_lock(root.path()).unwrap().is_some());
        assert_eq!(
            std::fs::read_dir(root.path()).unwrap().count(),
            0,
            "no lock file"
        );
    }
}
