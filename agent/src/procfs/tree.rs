//! An app's process tree: each PM2 process and all its descendants (gunicorn, celery or uvicorn
//! workers, anything it forked that PM2 does not list), with each member's CPU ticks and RSS.
//!
//! Descendants are found through `/proc/<pid>/task/<tid>/children` (CONFIG_PROC_CHILDREN): a
//! few reads per member instead of a scan of every process on the machine. Every thread's file
//! is read, because a child forked by a thread other than the main one is listed under that
//! thread only. Where the kernel lacks those files, one scan of `/proc/*/stat` per check gives
//! each process's parent instead. A pid is a member only if its own stat names the parent it
//! was found under, so a pid reused between the two reads is never counted; a process whose
//! parent exited is reparented (to init or a subreaper) and leaves the tree.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::parse_stat;
use super::tree_rules::RootSample;

/// At most this many processes per tree: a fork bomb is judged on its first 4096 members
/// instead of costing the agent its CPU budget.
pub const MAX_MEMBERS: usize = 4096;

/// One process of a tree, as one read of its stat found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub pid: u32,
    /// Start time after boot, in clock ticks (with `pid`, the process's identity).
    pub start_ticks: u64,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    pub rss_bytes: u64,
}

/// How children are found: the kernel's per-thread lists, or a parent map from a full scan.
#[derive(Debug)]
pub enum Children {
    Files,
    /// Parent pid -> children, from one scan of `/proc/*/stat`.
    Scanned(BTreeMap<u32, Vec<u32>>),
}

impl Children {
    /// The per-thread children files when this kernel has them, else one scan of /proc.
    pub fn find(proc_root: &Path) -> Children {
        if proc_root.join("thread-self/children").exists() {
            Children::Files
        } else {
            Children::Scanned(scan_parents(proc_root))
        }
    }

    fn of(&self, proc_root: &Path, pid: u32) -> Vec<u32> {
        match self {
            Children::Files => children_files(proc_root, pid),
            Children::Scanned(map) => map.get(&pid).cloned().unwrap_or_default(),
        }
    }
}

/// The members of the tree rooted at `root`, the root first; empty when the root is gone.
pub fn walk(proc_root: &Path, children: &Children, root: u32, page_size: u64) -> Vec<Member> {
    let mut members = Vec::new();
    let Some(first) = member(proc_root, root, None, page_size) else {
        return members;
    };
    members.push(first);
    let mut seen = BTreeSet::from([root]);
    let mut next = 0;
    while next < members.len() && members.len() < MAX_MEMBERS {
        let parent = members[next].pid;
        next += 1;
        for child in children.of(proc_root, parent) {
            if members.len() >= MAX_MEMBERS || !seen.insert(child) {
                continue;
            }
            if let Some(m) = member(proc_root, child, Some(parent), page_size) {
                members.push(m);
            }
        }
    }
    members
}

/// The tree of each `(pm_id, pid)` root, children found once for all of them.
pub fn sample_roots(proc_root: &Path, roots: &[(u32, u32)]) -> Vec<RootSample> {
    let children = Children::find(proc_root);
    let page = page_size();
    roots
        .iter()
        .map(|&(pm_id, pid)| RootSample {
            pm_id,
            pid,
            members: walk(proc_root, &children, pid, page),
        })
        .collect()
}

/// One read of `/proc/<pid>/stat`; `None` if the process is gone, or is no longer `parent`'s
/// child (exited and its pid reused between the two reads).
fn member(proc_root: &Path, pid: u32, parent: Option<u32>, page_size: u64) -> Option<Member> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    let s = parse_stat(&text).ok()?;
    if parent.is_some_and(|p| p != s.ppid) || s.state == 'Z' && parent.is_some() {
        return None;
    }
    Some(Member {
        pid,
        start_ticks: s.start_ticks,
        cpu_ticks: s.cpu_ticks,
        rss_bytes: s.rss_pages.saturating_mul(page_size),
    })
}

/// The children of every thread of `pid`, from the kernel's per-thread lists.
fn children_files(proc_root: &Path, pid: u32) -> Vec<u32> {
    let tasks = proc_root.join(pid.to_string()).join("task");
    let Ok(dir) = std::fs::read_dir(&tasks) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in dir.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(parse_pids(&text));
        }
    }
    out
}

/// Parent pid -> children, from every `/proc/<pid>/stat` (only where the children files are
/// missing: this costs one read per process on the machine).
pub fn scan_parents(proc_root: &Path) -> BTreeMap<u32, Vec<u32>> {
    let mut map: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(proc_root) else {
        return map;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Ok(s) = parse_stat(&text) {
            map.entry(s.ppid).or_default().push(pid);
        }
    }
    map
}

/// The pids of a children file: `"812 813 "`.
pub fn parse_pids(text: &str) -> impl Iterator<Item = u32> + '_ {
    text.split_ascii_whitespace().filter_map(|p| p.parse().ok())
}

/// The kernel's page size in bytes (statm and stat count RSS in pages).
pub fn page_size() -> u64 {
    rustix::param::page_size() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn parses_a_children_file() {
        assert_eq!(parse_pids("812 813 ").collect::<Vec<_>>(), [812, 813]);
        assert_eq!(parse_pids("").count(), 0);
    }

    /// A shell whose grandchild (`sleep` under a subshell) PM2 would not see: both ways of
    /// finding children see the whole tree.
    #[test]
    fn finds_grandchildren_both_ways() {
        let mut sh = Command::new("sh")
            .args(["-c", "(sleep 30; true) & sleep 30; true"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let root = sh.id();
        let proc_root = Path::new("/proc");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut files = Vec::new();
        // Until all four run (a child caught between fork and exec has no pages yet).
        let settled = |m: &[Member]| m.len() >= 4 && m.iter().all(|m| m.rss_bytes > 0);
        while !settled(&files) && std::time::Instant::now() < deadline {
            files = walk(proc_root, &Children::find(proc_root), root, page_size());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let scanned = walk(
            proc_root,
            &Children::Scanned(scan_parents(proc_root)),
            root,
            page_size(),
        );
        sh.kill().unwrap();
        sh.wait().unwrap();
        // sh -> (subshell -> sleep), sleep
        assert_eq!(files.len(), 4, "{files:?}");
        assert_eq!(files[0].pid, root);
        let pids = |m: &[Member]| m.iter().map(|m| m.pid).collect::<BTreeSet<_>>();
        assert_eq!(pids(&files), pids(&scanned));
        assert!(files.iter().all(|m| m.rss_bytes > 0), "{files:?}");
        assert!(walk(proc_root, &Children::Files, root, page_size()).is_empty());
    }
}
