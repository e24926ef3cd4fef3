//! `attach_log_lines`: the last lines of an app's PM2 error log, read from the end.
//!
//! At most `MAX_BYTES` are read, whatever the file's size (a 2 GB log costs one seek and one
//! 4 KiB read); bytes that are not UTF-8 are replaced, not refused. A missing or unreadable log
//! becomes a note in the alert, never an error that stops it.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::payload::LogAttachment;

/// The most of the log an alert carries.
pub const MAX_BYTES: u64 = 4096;

/// The last `n` lines of `path` (at most `MAX_BYTES` of them), or a note saying why not.
pub fn tail(path: Option<&Path>, n: usize) -> LogAttachment {
    let Some(path) = path else {
        return note("PM2 gave no error log path for this app");
    };
    match read_tail(path, n) {
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

fn read_tail(path: &Path, n: usize) -> std::io::Result<Vec<String>> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
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
        let t = tail(Some(&p), 3);
        assert_eq!(t.lines, ["line 4999", "bad \u{fffd} byte", "last"]);
        let all = tail(Some(&p), 100_000);
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
        let t = tail(Some(Path::new("/nonexistent/web-error.log")), 5);
        assert!(t.lines.is_empty());
        assert!(t.note.unwrap().contains("cannot read the error log"));
        assert!(tail(None, 5).note.is_some());
    }
}
