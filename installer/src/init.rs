//! `pmguard init`: a starter config from the apps a PM2 daemon runs.
//!
//! Edges: the PM2 daemon's process list (the native client, never a `pm2` process) and /proc
//! (`<pid>/fd` socket links, `<pid>/stat` for child processes, `net/tcp` and `net/tcp6`), all read
//! under a proc root passed in. Middle (pure): [`parse_listeners`], [`propose`], [`render`].
//!
//! Invariants:
//! - The apps' environment is never read: only names, pids, exec mode and instance count come
//!   from PM2 (the client never decodes `pm2_env.env`), and nothing is read from `/proc/<pid>/environ`.
//! - A `health_url` is proposed only for a TCP port in LISTEN state bound to a loopback or
//!   wildcard address: an app bound to one interface's address is not probed through another.
//! - PM2's cluster mode keeps each cluster app's listening socket in the PM2 daemon itself, not in
//!   the workers; the daemon's ports are given to the cluster app only when there is exactly one.
//! - What [`render`] returns always passes the agent's own validation (checked before writing).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use pmguard_agent::config::Config;
use pmguard_agent::pm2::{Client, ExecMode, Pm2Error, Pm2Paths, ProcessEntry, Status};

/// Why `init` could not write a config.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "no PM2 daemon answers for user `{user}` on {}: {source}\n  help: start the apps as {user} (`sudo -u {user} pm2 start app.js`, or `pm2 resurrect` after a reboot); if that user's PM2_HOME is not {}, pass --pm2-home DIR",
        rpc.display(),
        home.display()
    )]
    NoDaemon {
        user: String,
        rpc: PathBuf,
        home: PathBuf,
        source: Pm2Error,
    },
    #[error("the PM2 daemon of user `{user}` ({}) runs no app\n  help: start the apps under PM2 first (`sudo -u {user} pm2 start app.js --name NAME`), then run init again", home.display())]
    NoApps { user: String, home: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Proc {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the config init wrote does not validate (a pmguard bug; please report it):\n{0}")]
    Invalid(String),
}

/// A TCP socket in LISTEN state, from `/proc/net/tcp` or `/proc/net/tcp6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    pub inode: u64,
}

/// Parses the LISTEN lines (state `0A`) of a `/proc/net/tcp` (`v6 = false`) or `tcp6` table.
/// Lines that do not parse are skipped: the kernel's format is fixed, a stray line is not fatal.
pub fn parse_listeners(table: &str, v6: bool) -> Vec<Listener> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                return None;
            }
            let (ip_hex, port_hex) = f[1].split_once(':')?;
            let ip = if v6 {
                parse_ipv6(ip_hex)?
            } else {
                parse_ipv4(ip_hex)?
            };
            let port = u16::from_str_radix(port_hex, 16).ok()?;
            let inode = f[9].parse().ok()?;
            Some(Listener {
                addr: SocketAddr::new(ip, port),
                inode,
            })
        })
        .collect()
}

/// The kernel prints the address as the in-memory u32 in host byte order.
fn parse_ipv4(hex: &str) -> Option<IpAddr> {
    if hex.len() != 8 {
        return None;
    }
    let word = u32::from_str_radix(hex, 16).ok()?;
    Some(IpAddr::V4(Ipv4Addr::from(word.to_ne_bytes())))
}

/// Four u32 words, each in host byte order. IPv4-mapped addresses come back as IPv4.
fn parse_ipv6(hex: &str) -> Option<IpAddr> {
    if hex.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for i in 0..4 {
        let word = u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok()?;
        bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(bytes);
    Some(match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    })
}

/// The host a probe of a socket bound to `ip` should use, or `None` when the socket is bound to
/// one non-loopback interface (pmguard probes the local machine only).
pub fn probe_host(ip: IpAddr) -> Option<String> {
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() => Some(v4.to_string()),
        IpAddr::V4(v4) if v4.is_unspecified() => Some("127.0.0.1".into()),
        IpAddr::V6(v6) if v6.is_loopback() || v6.is_unspecified() => Some("[::1]".into()),
        _ => None,
    }
}

/// One PM2 app as init found it.
#[derive(Debug, Clone, PartialEq)]
pub struct FoundApp {
    pub name: String,
    pub exec_mode: ExecMode,
    /// Entries (workers) PM2 lists for the name.
    pub instances: usize,
    /// Entries not `online` when init ran.
    pub not_online: usize,
    /// Listening addresses that a local probe can reach, lowest port first.
    pub ports: Vec<SocketAddr>,
    /// Listening addresses bound to one interface's address (not proposed).
    pub other_ports: Vec<SocketAddr>,
    /// Set when the ports could not be told apart from other cluster apps' ports (see the module
    /// invariants): the candidates, for a comment.
    pub ambiguous: Vec<SocketAddr>,
}

/// Where each pid's listening sockets are.
pub trait SocketSource {
    /// Listening TCP sockets held by `pid` or any of its descendants.
    fn listening(&self, pid: u32) -> Result<Vec<SocketAddr>, InitError>;
}

/// Groups PM2's entries by app name (in daemon order) and attaches the ports each app listens on.
/// `daemon_pid` is PM2's own pid (from `pm2.pid`), which holds cluster apps' listening sockets.
pub fn propose(
    entries: &[ProcessEntry],
    daemon_pid: Option<u32>,
    sockets: &dyn SocketSource,
) -> Result<Vec<FoundApp>, InitError> {
    let mut order: Vec<&str> = Vec::new();
    let mut by_name: BTreeMap<&str, Vec<&ProcessEntry>> = BTreeMap::new();
    for e in entries {
        if !by_name.contains_key(e.name.as_str()) {
            order.push(&e.name);
        }
        by_name.entry(&e.name).or_default().push(e);
    }
    let cluster_apps = order
        .iter()
        .filter(|n| by_name[*n].iter().any(|e| e.exec_mode == ExecMode::Cluster))
        .count();
    let daemon_ports = match daemon_pid {
        Some(pid) if cluster_apps > 0 => {
            own_sockets_only(sockets.listening(pid)?, pid, entries, sockets)?
        }
        _ => Vec::new(),
    };
    let mut apps = Vec::new();
    for name in order {
        let list = &by_name[name];
        let cluster = list.iter().any(|e| e.exec_mode == ExecMode::Cluster);
        let mut addrs = BTreeSet::new();
        for e in list
            .iter()
            .filter(|e| e.pid != 0 && e.status == Status::Online)
        {
            addrs.extend(sockets.listening(e.pid)?);
        }
        let mut ambiguous = Vec::new();
        if cluster {
            if cluster_apps == 1 {
                addrs.extend(daemon_ports.iter().copied());
            } else {
                ambiguous = daemon_ports.clone();
            }
        }
        let (ports, other_ports) = split_reachable(addrs);
        apps.push(FoundApp {
            name: name.to_string(),
            exec_mode: if cluster {
                ExecMode::Cluster
            } else {
                ExecMode::Fork
            },
            instances: list.len(),
            not_online: list.iter().filter(|e| e.status != Status::Online).count(),
            ports,
            other_ports,
            ambiguous,
        });
    }
    Ok(apps)
}

/// The daemon's own listening sockets, without any its children also hold (a fork app is a child
/// of the daemon and is already counted as itself).
fn own_sockets_only(
    daemon: Vec<SocketAddr>,
    daemon_pid: u32,
    entries: &[ProcessEntry],
    sockets: &dyn SocketSource,
) -> Result<Vec<SocketAddr>, InitError> {
    let mut apps_hold = BTreeSet::new();
    for e in entries.iter().filter(|e| e.pid != 0 && e.pid != daemon_pid) {
        if e.exec_mode == ExecMode::Fork {
            apps_hold.extend(sockets.listening(e.pid)?);
        }
    }
    Ok(daemon
        .into_iter()
        .filter(|a| !apps_hold.contains(a))
        .collect())
}

fn split_reachable(addrs: BTreeSet<SocketAddr>) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
    let mut all: Vec<SocketAddr> = addrs.into_iter().collect();
    all.sort_by_key(|a| (a.port(), a.is_ipv6(), a.ip()));
    let (mut ports, mut other) = (Vec::new(), Vec::new());
    for a in all {
        if probe_host(a.ip()).is_some() {
            if !ports.iter().any(|p: &SocketAddr| p.port() == a.port()) {
                ports.push(a);
            }
        } else {
            other.push(a);
        }
    }
    (ports, other)
}

/// What the header of the written file says.
#[derive(Debug, Clone)]
pub struct Header {
    pub user: String,
    /// Where the file goes, for the commands the header suggests (`FILE` when printed to stdout).
    pub file: String,
    /// Written as `pm2_home` only when it is not the user's default `~/.pm2`.
    pub pm2_home: Option<PathBuf>,
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn addr_list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The commented config for `apps`.
pub fn render(header: &Header, apps: &[FoundApp]) -> String {
    let mut t = String::new();
    render_header(&mut t, header);
    for app in apps {
        render_app(&mut t, app);
    }
    t
}

/// Comment lines hold them: a line break would end the comment and start TOML.
fn one_line(v: &str) -> String {
    v.replace(|c: char| c.is_control(), "?")
}

/// What the file is and what to do next, then the `[agent]` table.
fn render_header(t: &mut String, header: &Header) {
    let user = &one_line(&header.user);
    let _ = writeln!(
        t,
        "# pmguard config written by `pmguard init --user {user}` from the apps PM2 runs."
    );
    t.push_str("# Check every health_url below (the path is a guess; a wrong one makes pmguard restart a\n# healthy app), then:\n");
    let file = &one_line(&header.file);
    let _ = writeln!(t, "#   pmguard-agent validate --config {file}");
    let _ = writeln!(t, "#   sudo pmguard install --config {file} --user {user}");
    t.push_str("# Every key and its default: the README's \"Configuration reference\".\n\n");
    t.push_str("[agent]\n# Check period of a healthy app.\ninterval = \"10s\"\n");
    if let Some(home) = &header.pm2_home {
        let _ = writeln!(t, "pm2_home = {}", quote(&home.display().to_string()));
    }
}

/// One `[[apps]]` table: what PM2 said about the app, and its health URL (or why there is none).
fn render_app(t: &mut String, app: &FoundApp) {
    t.push_str("\n[[apps]]\n");
    let mode = match app.exec_mode {
        ExecMode::Fork => "fork mode",
        ExecMode::Cluster => "cluster mode",
    };
    let n = app.instances;
    let _ = write!(
        t,
        "# PM2: {mode}, {n} instance{}",
        if n == 1 { "" } else { "s" }
    );
    if app.not_online > 0 {
        let _ = write!(t, " ({} not online when init ran)", app.not_online);
    }
    t.push_str(".\n");
    let _ = writeln!(t, "name = {}", quote(&app.name));
    render_health_url(t, app);
    if !app.other_ports.is_empty() {
        let _ = writeln!(
            t,
            "# Also listens on {} (one interface's address): not probed from this machine's loopback.",
            addr_list(&app.other_ports)
        );
    }
}

/// The app's health URL on its first probe-able port, or a commented one with why.
fn render_health_url(t: &mut String, app: &FoundApp) {
    let Some(first) = app.ports.first() else {
        if !app.ambiguous.is_empty() {
            let _ = writeln!(
                t,
                "# PM2 holds cluster apps' listening sockets in its daemon, so init cannot tell which of\n# these is this app's: {}. Pick one and uncomment:",
                addr_list(&app.ambiguous)
            );
        } else {
            t.push_str("# No listening TCP port found on a loopback or wildcard address when init ran: without a\n# health_url the app is judged by its PM2 state and CPU alone. If it serves HTTP, uncomment:\n");
        }
        t.push_str("# health_url = \"http://127.0.0.1:PORT/health\"\n");
        return;
    };
    let host = probe_host(first.ip()).unwrap_or_else(|| "127.0.0.1".into());
    let _ = writeln!(
        t,
        "# Listens on {}. Point the path at the app's health endpoint (any 2xx passes;\n# expect_status and expect_body narrow it).",
        addr_list(&app.ports)
    );
    let url = format!("http://{host}:{}/", first.port());
    let _ = writeln!(t, "health_url = {}", quote(&url));
}

/// Reads listening sockets from a proc root (normally `/proc`).
pub struct ProcSockets {
    root: PathBuf,
    listeners: Vec<Listener>,
    /// ppid -> children, read once.
    children: BTreeMap<u32, Vec<u32>>,
}

impl ProcSockets {
    /// Reads `net/tcp`, `net/tcp6` (either may be missing: no IPv6) and every process's parent.
    pub fn read(root: &Path) -> Result<ProcSockets, InitError> {
        let mut listeners = Vec::new();
        for (file, v6) in [("net/tcp", false), ("net/tcp6", true)] {
            let path = root.join(file);
            match std::fs::read_to_string(&path) {
                Ok(text) => listeners.extend(parse_listeners(&text, v6)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(InitError::Proc { path, source }),
            }
        }
        let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        let dir = std::fs::read_dir(root).map_err(|source| InitError::Proc {
            path: root.to_path_buf(),
            source,
        })?;
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            // A process may exit while we look: skip it.
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            if let Some(ppid) = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok())
            {
                children.entry(ppid).or_default().push(pid);
            }
        }
        Ok(ProcSockets {
            root: root.to_path_buf(),
            listeners,
            children,
        })
    }

    fn socket_inodes(&self, pid: u32) -> Result<BTreeSet<u64>, InitError> {
        let dir = self.root.join(pid.to_string()).join("fd");
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            // Gone since PM2 listed it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
            Err(source) => return Err(InitError::Proc { path: dir, source }),
        };
        Ok(rd
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .filter_map(|target| {
                let t = target
                    .to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?;
                t.parse().ok()
            })
            .collect())
    }
}

impl SocketSource for ProcSockets {
    fn listening(&self, pid: u32) -> Result<Vec<SocketAddr>, InitError> {
        let mut pids = vec![pid];
        let mut i = 0;
        while i < pids.len() {
            if let Some(kids) = self.children.get(&pids[i]) {
                pids.extend(kids.iter().copied().filter(|k| *k != pid));
            }
            i += 1;
            if pids.len() > 4096 {
                break;
            }
        }
        let mut inodes = BTreeSet::new();
        for p in pids {
            inodes.extend(self.socket_inodes(p)?);
        }
        Ok(self
            .listeners
            .iter()
            .filter(|l| inodes.contains(&l.inode))
            .map(|l| l.addr)
            .collect())
    }
}

/// Asks the daemon at `pm2_home` for its apps, reads /proc under `proc_root`, and returns the
/// config text (already validated against the agent's own rules).
pub fn run(
    user: &str,
    pm2_home: &Path,
    header: &Header,
    proc_root: &Path,
) -> Result<String, InitError> {
    let paths = Pm2Paths::from_home(pm2_home);
    let client = Client::new(paths.clone());
    let snapshot = client
        .list(Duration::from_secs(5))
        .map_err(|source| InitError::NoDaemon {
            user: user.to_string(),
            rpc: paths.rpc.clone(),
            home: pm2_home.to_path_buf(),
            source,
        })?;
    if snapshot.processes().is_empty() {
        return Err(InitError::NoApps {
            user: user.to_string(),
            home: pm2_home.to_path_buf(),
        });
    }
    let daemon_pid = std::fs::read_to_string(pm2_home.join("pm2.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let sockets = ProcSockets::read(proc_root)?;
    let apps = propose(snapshot.processes(), daemon_pid, &sockets)?;
    let text = render(header, &apps);
    Config::parse(Path::new("pmguard.toml"), &text)
        .map_err(|e| InitError::Invalid(e.to_string()))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines of /proc/net/tcp and /proc/net/tcp6 captured on the build machine (x86_64) while node
    // listened on 127.0.0.1:47011 (with one connection to it, both ends), 0.0.0.0:8080, [::]:3000,
    // [::1]:5001 and [::ffff:127.0.0.1]:5000.
    const TCP: &str = concat!(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode                                                     \n",
        "   4: 0100007F:B7A3 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 131600 1 00000000d1f24d58 100 0 0 10 0                    \n",
        "  22: 0100007F:B316 0100007F:B7A3 01 00000000:00000000 00:00000000 00000000     0        0 131601 2 00000000498e0772 20 0 0 10 -1                    \n",
        "  50: 0100007F:B7A3 0100007F:B316 01 00000000:00000000 00:00000000 00000000     0        0 131602 1 000000006b10c065 20 0 0 10 -1                    \n",
        "   2: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 131573 1 000000006cd49f3c 100 0 0 10 0                    \n",
    );
    const TCP6: &str = concat!(
        "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n",
        "   0: 00000000000000000000000000000000:0BB8 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 131570 1 000000005d48e22a 100 0 0 10 0\n",
        "   1: 00000000000000000000000001000000:1389 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 131571 1 00000000c61a3652 100 0 0 10 0\n",
        "   2: 0000000000000000FFFF00000100007F:1388 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 131572 1 00000000214f6426 100 0 0 10 0\n",
    );

    #[test]
    fn a_line_break_in_a_header_value_never_reaches_the_toml() {
        let h = Header {
            user: "ubuntu".into(),
            file: "x.toml\n[agent]\nstate_dir = \"/etc\"".into(),
            pm2_home: None,
        };
        let text = render(&h, &[]);
        assert!(
            text.lines()
                .all(|l| l.is_empty() || l.starts_with('#') || !l.contains("/etc")),
            "{text}"
        );
        assert_eq!(
            text.lines().filter(|l| *l == "[agent]").count(),
            1,
            "{text}"
        );
    }

    #[test]
    fn only_listening_sockets_are_read_with_their_address_port_and_inode() {
        let l = parse_listeners(TCP, false);
        assert_eq!(
            l,
            vec![
                Listener {
                    addr: "127.0.0.1:47011".parse().unwrap(),
                    inode: 131600
                },
                Listener {
                    addr: "0.0.0.0:8080".parse().unwrap(),
                    inode: 131573
                },
            ]
        );
    }

    #[test]
    fn ipv6_wildcard_loopback_and_mapped_ipv4_are_read() {
        let l: Vec<String> = parse_listeners(TCP6, true)
            .iter()
            .map(|l| l.addr.to_string())
            .collect();
        assert_eq!(l, ["[::]:3000", "[::1]:5001", "127.0.0.1:5000"]);
    }

    #[test]
    fn probes_go_to_loopback_for_wildcards_and_never_to_one_interface() {
        let host = |s: &str| probe_host(s.parse().unwrap());
        assert_eq!(host("0.0.0.0").as_deref(), Some("127.0.0.1"));
        assert_eq!(host("127.0.0.2").as_deref(), Some("127.0.0.2"));
        assert_eq!(host("::").as_deref(), Some("[::1]"));
        assert_eq!(host("::1").as_deref(), Some("[::1]"));
        assert_eq!(host("10.0.0.5"), None);
    }

    struct Fake(BTreeMap<u32, Vec<SocketAddr>>);
    impl SocketSource for Fake {
        fn listening(&self, pid: u32) -> Result<Vec<SocketAddr>, InitError> {
            Ok(self.0.get(&pid).cloned().unwrap_or_default())
        }
    }

    fn entry(name: &str, pm_id: u32, pid: u32, mode: ExecMode) -> ProcessEntry {
        ProcessEntry {
            name: name.into(),
            pm_id,
            pid,
            status: if pid == 0 {
                Status::parse("stopped")
            } else {
                Status::parse("online")
            },
            restart_time: 0,
            unstable_restarts: 0,
            pm_uptime_ms: None,
            exec_mode: mode,
            instances: None,
            kill_timeout_ms: None,
            cpu: 0.0,
            memory: 0,
            err_log: None,
        }
    }

    fn sockets(list: &[(u32, &[&str])]) -> Fake {
        Fake(
            list.iter()
                .map(|(pid, a)| (*pid, a.iter().map(|s| s.parse().unwrap()).collect()))
                .collect(),
        )
    }

    #[test]
    fn a_single_cluster_app_gets_the_daemons_ports_and_fork_apps_their_own() {
        let entries = [
            entry("api", 0, 101, ExecMode::Fork),
            entry("web", 1, 201, ExecMode::Cluster),
            entry("web", 2, 202, ExecMode::Cluster),
            entry("jobs", 3, 0, ExecMode::Fork),
        ];
        let s = sockets(&[(101, &["127.0.0.1:5000"]), (1, &["0.0.0.0:8080"])]);
        let apps = propose(&entries, Some(1), &s).unwrap();
        assert_eq!(apps.len(), 3);
        assert_eq!(apps[0].ports, ["127.0.0.1:5000".parse().unwrap()]);
        assert_eq!(
            (apps[1].instances, apps[1].exec_mode),
            (2, ExecMode::Cluster)
        );
        assert_eq!(apps[1].ports, ["0.0.0.0:8080".parse().unwrap()]);
        assert!(apps[2].ports.is_empty());
        assert_eq!(apps[2].not_online, 1);
    }

    #[test]
    fn two_cluster_apps_share_the_daemons_ports_as_candidates_only() {
        let entries = [
            entry("a", 0, 11, ExecMode::Cluster),
            entry("b", 1, 12, ExecMode::Cluster),
        ];
        let s = sockets(&[(1, &["127.0.0.1:7000", "127.0.0.1:7001"])]);
        let apps = propose(&entries, Some(1), &s).unwrap();
        assert!(apps
            .iter()
            .all(|a| a.ports.is_empty() && a.ambiguous.len() == 2));
        let text = render(
            &Header {
                user: "ubuntu".into(),
                file: "FILE".into(),
                pm2_home: None,
            },
            &apps,
        );
        assert!(text.contains("127.0.0.1:7000, 127.0.0.1:7001"), "{text}");
        Config::parse(Path::new("x.toml"), &text).unwrap();
    }

    #[test]
    fn an_app_on_one_interface_only_gets_no_health_url_and_says_why() {
        let entries = [entry("lan", 0, 5, ExecMode::Fork)];
        let apps = propose(&entries, None, &sockets(&[(5, &["10.0.0.5:80"])])).unwrap();
        let text = render(
            &Header {
                user: "u".into(),
                file: "FILE".into(),
                pm2_home: None,
            },
            &apps,
        );
        assert!(text.contains("# health_url = "), "{text}");
        assert!(
            text.contains("10.0.0.5:80 (one interface's address)"),
            "{text}"
        );
    }

    #[test]
    fn names_are_quoted_as_toml_and_the_result_validates() {
        let entries = [entry("we\"ird\\name", 0, 5, ExecMode::Fork)];
        let apps = propose(&entries, None, &sockets(&[(5, &["[::]:3000"])])).unwrap();
        let header = Header {
            user: "u".into(),
            file: "FILE".into(),
            pm2_home: Some("/srv/pm2 home".into()),
        };
        let text = render(&header, &apps);
        let c = Config::parse(Path::new("x.toml"), &text).unwrap();
        assert_eq!(c.apps[0].name, "we\"ird\\name");
        assert_eq!(c.apps[0].probes[0].describe(), "http://[::1]:3000/");
        assert!(
            text.contains("health_url = \"http://[::1]:3000/\""),
            "{text}"
        );
    }
}
