//! `attach_log_lines`: the last lines of an app's PM2 error log, read from the end.
//!
//! At most `MAX_BYTES` are read, whatever the file's size (a 2 GB log costs one seek and one
//! 4 KiB read); bytes that are not UTF-8 are replaced, not refused. A missing or unreadable log
//! becomes a note in the alert, never an error that stops it.
//!
//! The path comes from PM2 (an app's owner can set it), so it is opened with
//! O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC and checked on the descriptor before a byte is read: a
//! regular file (a FIFO or a device would block or never end), owned by one of the `owners`
//! (the agent's user, PM2's user): never a symlink to, or a hard link of, a root-owned secret
//! such as /etc/shadow.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::payload::LogAttachment;

/// The most of the log an alert carries.
pub const MAX_BYTES: u64 = 4096;

/// The last `n` lines of `path` (at most `MAX_BYTES` of them), or a note saying why not.
/// The file must be owned by a uid in `owners`.
pub fn tail(path: Option<&Path>, n: usize, owners: &[u32]) -> LogAttachment {
    let Some(path) = path else {
        return note("PM2 gave no error log path for this app");
    };
    match read_tail(path, n, owners) {
        Ok(lines) => LogAttachment { lines, note: None },
        Err(e) => note(&format!(
            "cannot read the error log {}: {e}",
            path.display()
        )),
    }
}

fn note(text: &str) -> LogAttachment {
    LogAttachment {
        lines: Vec::new(),
        note: Some(text.to_string()),
    }
}

fn read_tail(path: &Path, n: usize, owners: &[u32]) -> std::io::Result<Vec<String>> {
    let refused = |why: String| std::io::Error::new(std::io::ErrorKind::PermissionDenied, why);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => refused("it is a symbolic link, which is not followed".into()),
            _ => e,
        })?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(refused("it is not a regular file".into()));
    }
    if !owners.contains(&meta.uid()) {
        return Err(refused(format!(
            "it is owned by uid {}, not by the app's PM2 user or the agent's",
            meta.uid()
        )));
    }
    let len = meta.len();
    let start = len.saturating_sub(MAX_BYTES);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    f.take(MAX_BYTES).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.lines().collect();
    // Started inside the file: the first line is cut; drop it unless it is all there is.
    if start > 0 && lines.len() > 1 {
        lines.remove(0);
    }
    let from = lines.len().saturating_sub(n);
    Ok(lines[from..].iter().map(|l| l.to_string()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> u32 {
        crate::sys::privilege::euid()
    }

    #[test]
    fn the_last_lines_within_the_byte_cap_lossy() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("web-error.log");
        let mut data = Vec::new();
        for i in 0..5000 {
            data.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        data.extend_from_slice(b"bad \xff byte\nlast\n");
        std::fs::write(&p, &data).unwrap();
        let t = tail(Some(&p), 3, &[me()]);
        assert_eq!(t.lines, ["line 4999", "bad \u{fffd} byte", "last"]);
        let all = tail(Some(&p), 100_000, &[me()]);
        let bytes: usize = all.lines.iter().map(|l| l.len() + 1).sum();
        assert!(bytes <= MAX_BYTES as usize, "{bytes}");
        assert!(
            all.lines[0].starts_with("line "),
            "no cut line: {:?}",
            all.lines[0]
        );
    }

    #[test]
    fn a_missing_log_is_a_note() {
        let t = tail(Some(Path::new("/nonexistent/web-error.log")), 5, &[me()]);
        assert!(t.lines.is_empty());
        assert!(t.note.unwrap().contains("cannot read the error log"));
        assert!(tail(None, 5, &[me()]).note.is_some());
    }

    #[test]
    fn a_symlink_a_fifo_a_device_or_another_owners_file_is_a_note_never_read() {
        let d = tempfile::tempdir().unwrap();
        let link = d.path().join("web-error.log");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        let t = tail(Some(&link), 3, &[me(), 0]);
        assert!(t.lines.is_empty(), "{:?}", t.lines);
        assert!(t.note.unwrap().contains("symbolic link"));
        let fifo = d.path().join("fifo-error.log");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // Returns at once (O_NONBLOCK); it would otherwise wait for a writer forever.
        let t = tail(Some(&fifo), 3, &[me()]);
        assert!(t.note.unwrap().contains("not a regular file"));
        let t = tail(Some(Path::new("/dev/zero")), 3, &[me(), 0]);
        assert!(t.note.unwrap().contains("not a regular file"));
        // A hard link (or the path itself) to a file of another owner: /etc/passwd is root's.
        if me() != 0 {
            let t = tail(Some(Path::new("/etc/passwd")), 3, &[me()]);
            assert!(t.note.unwrap().contains("owned by uid 0"));
        } else {
            let t = tail(Some(Path::new("/etc/passwd")), 3, &[65534]);
            assert!(t.lines.is_empty());
            assert!(t.note.unwrap().contains("owned by uid 0"));
        }
    }
}
