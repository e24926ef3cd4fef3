//! The state directory, watched with inotify: who opened `status.json` (someone wants it fresh)
//! and who replaced `pauses.json` (a pause or resume), without a stat(2) per round.
//!
//! Contract:
//! - Non-blocking: `take` drains what is queued and returns at once; the watch loop polls `fd`
//!   beside its probes, so the watch costs nothing while nobody touches the directory.
//! - Only names directly in the directory are reported (inotify does not recurse), and only the
//!   two names the agent cares about count; opens of other files wake the poll and are dropped.
//! - A queue overflow counts as both (anything may have happened); the watch gone (the directory
//!   removed or unmounted) is reported once, and the caller goes back to looking by itself.
//! - No file is written and nothing listens: a reader needs no more than read access to the file
//!   to be noticed, which is what lets root or a reader in the group ask for a fresh status
//!   without writing into the PM2 user's directory.

use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};

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
                | WatchFlags::ONLYDIR
                | WatchFlags::DONT_FOLLOW,
        )?;
        Ok(DirWatch {
            fd,
            opened,
            changed,
        })
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
            if flags.intersects(ReadFlags::IGNORED | ReadFlags::DELETE_SELF | ReadFlags::UNMOUNT) {
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
        let path = d.path().to_path_buf();
        drop(d);
        assert!(!path.exists());
        assert!(w.take().gone, "the directory removed");
    }
}
