//! The state directory, watched with inotify: who opened `status.json` (someone wants it fresh)
//! and who replaced `pauses.json` (a pause or resume), without a stat(2) per round.
//!
//! Contract:
//! - Non-blocking: `take` drains what is queued and returns at once; the watch loop polls `fd`
//!   beside its probes, so the watch costs nothing while nobody touches the directory.
//! - Only names directly in the directory are reported (inotify does not recurse), and only the
//!   two names the agent cares about count; opens of other files wake the poll and are dropped.
//! - A queue overflow counts as both (anything may have happened). The directory moved,
//!   removed or unmounted is "gone": the watch follows the inode, not the path, so the caller
//!   goes back to looking at the path by itself. A directory removed while files in it are
//!   still open (the agent's heartbeat and lock are) sends nothing until they are closed, so
//!   the caller also asks `still_at` now and then.
//! - No file is written and nothing listens: a reader needs no more than read access to the file
//!   to be noticed, which is what lets root or a reader in the group ask for a fresh status
//!   without writing into the PM2 user's directory.

use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};

use crate::sys::files;

/// What the queued events say.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Someone opened the watched status file.
    pub opened: bool,
    /// The watched control file was written, replaced or removed.
    pub changed: bool,
    /// The watch is gone: nothing more will be reported.
    pub gone: bool,
}

#[derive(Debug)]
pub struct DirWatch {
    fd: OwnedFd,
    /// The watched directory, as found when the watch was set.
    id: Option<files::FileId>,
    /// The file whose opens are reported (`status.json`).
    opened: &'static CStr,
    /// The file whose changes are reported (`pauses.json`).
    changed: &'static CStr,
}

impl DirWatch {
    /// Watches `dir` for opens of `opened` and changes to `changed`.
    pub fn new(
        dir: &Path,
        opened: &'static CStr,
        changed: &'static CStr,
    ) -> std::io::Result<DirWatch> {
        let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?;
        inotify::add_watch(
            &fd,
            dir,
            WatchFlags::OPEN
                | WatchFlags::CLOSE_WRITE
                | WatchFlags::MOVED_TO
                | WatchFlags::MOVED_FROM
                | WatchFlags::DELETE
                | WatchFlags::DELETE_SELF
                | WatchFlags::MOVE_SELF
                | WatchFlags::ONLYDIR
                | WatchFlags::DONT_FOLLOW,
        )?;
        Ok(DirWatch {
            fd,
            id: files::file_id(dir),
            opened,
            changed,
        })
    }

    /// Whether `dir` is still the directory being watched (one stat).
    pub fn still_at(&self, dir: &Path) -> bool {
        self.id.is_some() && files::file_id(dir) == self.id
    }

    /// The fd to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Drains the queued events (never blocks).
    pub fn take(&self) -> Seen {
        let mut seen = Seen::default();
        // Room for many events with names; a busy directory is drained over several reads.
        let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
        let mut reader = inotify::Reader::new(&self.fd, &mut buf);
        // Until EAGAIN (drained) or any other error (nothing more can be read now).
        while let Ok(event) = reader.next() {
            let flags = event.events();
            if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
                seen.opened = true;
                seen.changed = true;
                continue;
            }
            if flags.intersects(
                ReadFlags::IGNORED
                    | ReadFlags::DELETE_SELF
                    | ReadFlags::MOVE_SELF
                    | ReadFlags::UNMOUNT,
            ) {
                seen.gone = true;
                continue;
            }
            let Some(name) = event.file_name() else {
                continue;
            };
            if name == self.opened && flags.contains(ReadFlags::OPEN) {
                seen.opened = true;
            } else if name == self.changed && !flags.contains(ReadFlags::OPEN) {
                seen.changed = true;
            }
        }
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_and_replacements_of_the_two_files_are_seen_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let w = DirWatch::new(d.path(), c"status.json", c"pauses.json").unwrap();
        assert_eq!(w.take(), Seen::default());
        std::fs::write(d.path().join("status.json"), b"{}").unwrap();
        // Our own write: a create and close, not someone reading (the open of a write counts
        // too, which is why the agent writes through a temporary name and a rename).
        let _ = w.take();
        std::fs::write(d.path().join("other"), b"x").unwrap();
        std::fs::read(d.path().join("other")).unwrap();
        assert_eq!(w.take(), Seen::default(), "other files are not reported");
        std::fs::read(d.path().join("status.json")).unwrap();
        assert_eq!(
            w.take(),
            Seen {
                opened: true,
                ..Seen::default()
            }
        );
        std::fs::write(d.path().join(".p.tmp"), b"{}").unwrap();
        std::fs::rename(d.path().join(".p.tmp"), d.path().join("pauses.json")).unwrap();
        assert_eq!(
            w.take(),
            Seen {
                changed: true,
                ..Seen::default()
            }
        );
        std::fs::read(d.path().join("pauses.json")).unwrap();
        assert_eq!(
            w.take(),
            Seen::default(),
            "reading pauses.json changes nothing"
        );
        std::fs::remove_file(d.path().join("pauses.json")).unwrap();
        assert!(w.take().changed);
        assert!(w.still_at(d.path()));
        // Removed while a file in it is still open (the agent's heartbeat and lock): the
        // kernel says nothing yet; `still_at` does.
        let held = std::fs::File::create(d.path().join("heartbeat")).unwrap();
        let path = d.path().to_path_buf();
        drop(d);
        assert!(!path.exists());
        std::fs::create_dir(&path).unwrap();
        assert!(!w.still_at(&path), "another directory at the path");
        std::fs::remove_dir(&path).unwrap();
        drop(held);
        assert!(w.take().gone, "the directory removed, its last file closed");
    }

    #[test]
    fn a_moved_directory_is_gone() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        let w = DirWatch::new(&dir, c"status.json", c"pauses.json").unwrap();
        std::fs::rename(&dir, d.path().join("state.old")).unwrap();
        std::fs::create_dir(&dir).unwrap();
        assert!(w.take().gone);
        assert!(!w.still_at(&dir));
    }
}
