//! Values the PM2 client hands out, and the serde shapes they are decoded from.
//!
//! Owns: [`Pm2Paths`] resolution, [`Status`], [`ProcessEntry`], [`Snapshot`], [`BusEvent`], [`Pm2Error`].
//!
//! Invariants:
//! - `pm2_env.env` (and every `pm2_env` key this module does not name) is skipped by serde while
//!   decoding, never held in a `Value`: it carries the app's secrets. Nothing here stores, logs or
//!   prints it.
//! - Numbers from the daemon are decoded leniently (JS may send `2`, `2.0`, `"2"` or `null`):
//!   an odd value degrades to `None`/0 instead of failing the whole list.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;

/// Where a PM2 daemon's sockets live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pm2Paths {
    pub home: PathBuf,
    pub rpc: PathBuf,
    pub pubsub: PathBuf,
}

impl Pm2Paths {
    /// `pm2_home`: explicit config value; else `$PM2_HOME`; else `<home of the running uid>/.pm2`
    /// (from the password database, not `$HOME`, so a service started without `HOME` agrees with
    /// `pm2 startup`). `PM2_DAEMON_RPC_PORT` / `PM2_DAEMON_PUB_PORT` override the socket paths.
    pub fn resolve(pm2_home: Option<&Path>) -> Result<Pm2Paths, Pm2Error> {
        let home = match pm2_home {
            Some(p) => p.to_path_buf(),
            None => match std::env::var_os("PM2_HOME").filter(|v| !v.is_empty()) {
                Some(v) => PathBuf::from(v),
                None => user_home()?.join(".pm2"),
            },
        };
        let mut paths = Pm2Paths::from_home(&home);
        if let Some(rpc) = socket_override("PM2_DAEMON_RPC_PORT")? {
            paths.rpc = rpc;
        }
        if let Some(pubsub) = socket_override("PM2_DAEMON_PUB_PORT")? {
            paths.pubsub = pubsub;
        }
        Ok(paths)
    }

    /// `rpc = home/rpc.sock`, `pubsub = home/pub.sock`; no environment lookups.
    pub fn from_home(home: &Path) -> Pm2Paths {
        Pm2Paths {
            home: home.to_path_buf(),
            rpc: home.join("rpc.sock"),
            pubsub: home.join("pub.sock"),
        }
    }
}

fn socket_override(var: &str) -> Result<Option<PathBuf>, Pm2Error> {
    let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    // PM2 treats a bare number as a TCP port; this client speaks Unix sockets only.
    if v.to_str()
        .is_some_and(|s| s.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(Pm2Error::Home {
            detail: format!(
                "{var}={} is a TCP port; only Unix socket paths are supported",
                v.to_string_lossy()
            ),
        });
    }
    Ok(Some(PathBuf::from(v)))
}

/// Home directory of the running uid, from the passwd database.
fn user_home() -> Result<PathBuf, Pm2Error> {
    let uid = crate::sys::privilege::uid();
    let user = crate::sys::privilege::lookup(uid).map_err(|e| Pm2Error::Home {
        detail: format!("{e}; set pm2_home"),
    })?;
    if user.home.is_empty() {
        return Err(Pm2Error::Home {
            detail: format!("uid {uid} has an empty home directory; set pm2_home"),
        });
    }
    Ok(PathBuf::from(user.home))
}

/// `pm2_env.status`.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Online,
    Launching,
    Stopping,
    Stopped,
    Errored,
    /// `"waiting restart"` (with a space): PM2 is waiting out a restart delay; `pid` is stale.
    WaitingRestart,
    OneLaunchStatus,
    Other(String),
}

impl Status {
    pub fn parse(s: &str) -> Status {
        match s {
            "online" => Status::Online,
            "launching" => Status::Launching,
            "stopping" => Status::Stopping,
            "stopped" => Status::Stopped,
            "errored" => Status::Errored,
            "waiting restart" => Status::WaitingRestart,
            "one-launch-status" => Status::OneLaunchStatus,
            other => Status::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Status::Online => "online",
            Status::Launching => "launching",
            Status::Stopping => "stopping",
            Status::Stopped => "stopped",
            Status::Errored => "errored",
            Status::WaitingRestart => "waiting restart",
            Status::OneLaunchStatus => "one-launch-status",
            Status::Other(s) => s,
        }
    }

    /// Launching, stopping or waiting restart: PM2 is in the middle of something.
    pub fn is_transitional(&self) -> bool {
        matches!(
            self,
            Status::Launching | Status::Stopping | Status::WaitingRestart
        )
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecMode {
    Fork,
    Cluster,
}

/// One entry of `getMonitorData` (one per worker: a cluster app has several with the same name).
#[derive(Debug, Clone)]
pub struct ProcessEntry {
    pub name: String,
    pub pm_id: u32,
    /// 0 = none. Stale while `status` is `WaitingRestart`.
    pub pid: u32,
    pub status: Status,
    pub restart_time: u64,
    pub unstable_restarts: u64,
    /// Epoch ms of the last spawn.
    pub pm_uptime_ms: Option<u64>,
    pub exec_mode: ExecMode,
    pub instances: Option<u32>,
    pub kill_timeout_ms: Option<u64>,
    /// PM2's own sample: % of one core since the daemon's previous sample.
    pub cpu: f64,
    /// RSS bytes.
    pub memory: u64,
    /// PM2's `pm_err_log_path`: the app's stderr log (for `attach_log_lines`).
    pub err_log: Option<PathBuf>,
}

/// The daemon's process list, tagged with the connection generation it was read on.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub generation: u64,
    /// Private, so that the index below always describes it (`processes()` reads it).
    processes: Vec<ProcessEntry>,
    /// Indices into `processes`, sorted by name then daemon order: every watched app looks
    /// itself up in every list it is checked against (100 apps against a 100-entry list was
    /// 10,000 name comparisons a round, BENCHMARKS.md round 8).
    by_name: Vec<u32>,
}

impl Snapshot {
    pub fn new(generation: u64, processes: Vec<ProcessEntry>) -> Self {
        let mut by_name: Vec<u32> = (0..processes.len() as u32).collect();
        by_name.sort_by(|&a, &b| processes[a as usize].name.cmp(&processes[b as usize].name));
        Snapshot {
            generation,
            processes,
            by_name,
        }
    }

    /// Every entry, in daemon order.
    pub fn processes(&self) -> &[ProcessEntry] {
        &self.processes
    }

    /// All entries with this name (one per cluster worker), in daemon order.
    pub fn by_name<'a>(&'a self, name: &str) -> Vec<&'a ProcessEntry> {
        let entry = |i: &u32| &self.processes[*i as usize];
        let from = self
            .by_name
            .partition_point(|i| entry(i).name.as_str() < name);
        self.by_name[from..]
            .iter()
            .map(entry)
            .take_while(|p| p.name == name)
            .collect()
    }
}

/// One `process:event` from the bus.
#[derive(Debug, Clone)]
pub struct BusEvent {
    /// `exit`, `online`, `restart`, `stop`, `delete`, ...
    pub event: String,
    pub name: String,
    pub pm_id: u32,
    pub manually: bool,
    /// Epoch ms, as stamped by the daemon (0 if absent).
    pub at_ms: u64,
    pub status: Option<Status>,
    pub restart_time: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum Pm2Error {
    #[error("PM2 daemon is down (no answer on {path}): {source}")]
    DaemonDown {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("PM2 call {method} timed out after {after:?}")]
    Timeout {
        method: &'static str,
        after: Duration,
    },
    #[error("PM2 call {method} failed: {message}")]
    Remote {
        method: &'static str,
        message: String,
    },
    #[error("PM2 protocol error: {detail}")]
    Protocol { detail: String },
    #[error("PM2 connection was re-established before {method}: pm_ids must be resolved again")]
    Reconnected { method: &'static str },
    #[error("PM2 connection dropped during {method}")]
    Disconnected { method: &'static str },
    #[error("cannot resolve PM2_HOME: {detail}")]
    Home { detail: String },
}

// ---------------------------------------------------------------------------------------------
// Wire shapes. Only named fields are decoded; serde skips the rest (including `env`) unbuffered.

/// An axon-rpc reply: `{"args":[result, ...]}` or `{"error": ...}`.
#[derive(Deserialize)]
pub(crate) struct Reply<T> {
    #[serde(default = "none")]
    pub args: Option<FirstArg<T>>,
    #[serde(default)]
    pub error: Option<ErrorText>,
}

fn none<T>() -> Option<T> {
    None
}

/// The first element of a JSON array, the rest skipped; `None` when the array is empty.
pub(crate) struct FirstArg<T>(pub Option<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for FirstArg<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = FirstArg<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of reply arguments")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let first = seq.next_element::<T>()?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(FirstArg(first))
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

/// The `error` of a reply: a string, or an object with `message`; anything else is summarised by
/// its JSON type only, so no unexpected payload ends up in a log line.
pub(crate) struct ErrorText(pub String);

impl<'de> Deserialize<'de> for ErrorText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Shape {
            Text(String),
            Obj { message: String },
            Other(IgnoredAny),
        }
        Ok(ErrorText(match Shape::deserialize(d)? {
            Shape::Text(s) | Shape::Obj { message: s } => s,
            Shape::Other(_) => "non-string error".to_owned(),
        }))
    }
}

/// Any JSON value as a non-negative integer if it reasonably is one.
#[derive(Default, Clone, Copy)]
pub(crate) struct Lenient(pub Option<u64>);

impl<'de> Deserialize<'de> for Lenient {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Lenient;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Lenient, E> {
                Ok(Lenient(Some(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Lenient, E> {
                Ok(Lenient(u64::try_from(v).ok()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Lenient, E> {
                Ok(Lenient((0.0..1.8e19).contains(&v).then_some(v as u64)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Lenient, E> {
                Ok(Lenient(
                    v.trim()
                        .parse::<f64>()
                        .ok()
                        .and_then(|f| V.visit_f64::<E>(f).ok()?.0),
                ))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Lenient, E> {
                Ok(Lenient(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Lenient, E> {
                Ok(Lenient(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<Lenient, E> {
                Ok(Lenient(None))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Lenient, D::Error> {
                d.deserialize_any(V)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Lenient, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Lenient(None))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Lenient, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Lenient(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// A float (PM2's cpu %), leniently.
#[derive(Default, Clone, Copy)]
pub(crate) struct LenientF64(pub f64);

impl<'de> Deserialize<'de> for LenientF64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Shape {
            Num(f64),
            Text(String),
            Other(IgnoredAny),
        }
        Ok(LenientF64(match Shape::deserialize(d)? {
            Shape::Num(f) if f.is_finite() => f,
            Shape::Text(s) => s
                .trim()
                .parse()
                .ok()
                .filter(|f: &f64| f.is_finite())
                .unwrap_or(0.0),
            _ => 0.0,
        }))
    }
}

#[derive(Deserialize)]
pub(crate) struct RawEntry {
    name: String,
    pm_id: Lenient,
    #[serde(default)]
    pid: Lenient,
    #[serde(default)]
    monit: Option<RawMonit>,
    pm2_env: RawEnv,
}

#[derive(Deserialize)]
struct RawMonit {
    #[serde(default)]
    memory: Lenient,
    #[serde(default)]
    cpu: LenientF64,
}

/// The few `pm2_env` keys pmguard needs. `env` and the app's variables PM2 merges into
/// `pm2_env` are unknown fields here, skipped without being buffered.
#[derive(Deserialize)]
struct RawEnv {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    restart_time: Lenient,
    #[serde(default)]
    unstable_restarts: Lenient,
    #[serde(default)]
    pm_uptime: Lenient,
    #[serde(default)]
    exec_mode: Option<String>,
    #[serde(default)]
    instances: Lenient,
    #[serde(default)]
    kill_timeout: Lenient,
    #[serde(default)]
    pm_err_log_path: Option<String>,
}

impl RawEntry {
    /// `None` when the entry has no usable pm_id.
    pub(crate) fn into_entry(self) -> Option<ProcessEntry> {
        let pm_id = u32::try_from(self.pm_id.0?).ok()?;
        let (cpu, memory) = self
            .monit
            .map(|m| (m.cpu.0, m.memory.0.unwrap_or(0)))
            .unwrap_or((0.0, 0));
        let env = self.pm2_env;
        Some(ProcessEntry {
            name: self.name,
            pm_id,
            pid: self.pid.0.and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
            status: Status::parse(env.status.as_deref().unwrap_or("unknown")),
            restart_time: env.restart_time.0.unwrap_or(0),
            unstable_restarts: env.unstable_restarts.0.unwrap_or(0),
            pm_uptime_ms: env.pm_uptime.0.filter(|&t| t > 0),
            exec_mode: match env.exec_mode.as_deref() {
                Some("cluster_mode") | Some("cluster") => ExecMode::Cluster,
                _ => ExecMode::Fork,
            },
            instances: env.instances.0.and_then(|i| u32::try_from(i).ok()),
            kill_timeout_ms: env.kill_timeout.0,
            cpu,
            memory,
            err_log: env
                .pm_err_log_path
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
        })
    }
}

/// `process:event` payload: `{event, manually, process: <pm2_env>, at}`.
#[derive(Deserialize)]
pub(crate) struct RawBusEvent {
    event: String,
    #[serde(default)]
    manually: Option<bool>,
    #[serde(default)]
    at: Lenient,
    process: RawBusProcess,
}

#[derive(Deserialize)]
struct RawBusProcess {
    name: String,
    pm_id: Lenient,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    restart_time: Lenient,
}

impl RawBusEvent {
    pub(crate) fn into_event(self) -> Option<BusEvent> {
        Some(BusEvent {
            event: self.event,
            name: self.process.name,
            pm_id: u32::try_from(self.process.pm_id.0?).ok()?,
            manually: self.manually.unwrap_or(false),
            at_ms: self.at.0.unwrap_or(0),
            status: self.process.status.as_deref().map(Status::parse),
            restart_time: self.process.restart_time.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips() {
        for s in [
            "online",
            "launching",
            "stopping",
            "stopped",
            "errored",
            "waiting restart",
            "one-launch-status",
            "weird",
        ] {
            assert_eq!(Status::parse(s).as_str(), s);
        }
        assert_eq!(Status::parse("waiting restart"), Status::WaitingRestart);
        assert!(Status::WaitingRestart.is_transitional());
        assert!(!Status::Online.is_transitional());
    }

    #[test]
    fn entry_decodes_leniently_and_skips_env() {
        let json = br#"{"pid":"12","name":"web","pm_id":3,"monit":{"memory":1024.0,"cpu":"1.5"},
            "pm2_env":{"status":"waiting restart","restart_time":2,"unstable_restarts":null,
            "pm_uptime":1700000000000,"exec_mode":"cluster_mode","instances":-1,"kill_timeout":"5000",
            "pm_err_log_path":"/home/u/.pm2/logs/web-error-3.log","SECRET":"hunter2","env":{"SECRET":"hunter2","nested":[1,{"a":2}]}}}"#;
        let raw: RawEntry = serde_json::from_slice(json).unwrap();
        let e = raw.into_entry().unwrap();
        assert_eq!(e.pid, 12);
        assert_eq!(e.pm_id, 3);
        assert_eq!(e.memory, 1024);
        assert_eq!(e.cpu, 1.5);
        assert_eq!(e.status, Status::WaitingRestart);
        assert_eq!(e.exec_mode, ExecMode::Cluster);
        assert_eq!(e.instances, None);
        assert_eq!(e.kill_timeout_ms, Some(5000));
        assert_eq!(e.pm_uptime_ms, Some(1_700_000_000_000));
        assert_eq!(
            e.err_log.as_deref(),
            Some(Path::new("/home/u/.pm2/logs/web-error-3.log"))
        );
        assert!(!format!("{e:?}").contains("hunter2"));
    }

    #[test]
    fn reply_error_shapes() {
        let r: Reply<IgnoredAny> =
            serde_json::from_slice(br#"{"error":"no such id","stack":"x"}"#).unwrap();
        assert_eq!(r.error.unwrap().0, "no such id");
        let r: Reply<IgnoredAny> = serde_json::from_slice(br#"{"error":{"message":"m"}}"#).unwrap();
        assert_eq!(r.error.unwrap().0, "m");
        let r: Reply<String> = serde_json::from_slice(br#"{"args":["7.0.4", 1]}"#).unwrap();
        assert_eq!(r.args.unwrap().0.as_deref(), Some("7.0.4"));
    }

    #[test]
    fn by_name_finds_every_worker_in_daemon_order_and_nothing_else() {
        let entry = |name: &str, pm_id: u32| {
            let json = format!(
                r#"{{"pid":{},"name":"{name}","pm_id":{pm_id},"pm2_env":{{"status":"online"}}}}"#,
                100 + pm_id
            );
            serde_json::from_str::<RawEntry>(&json)
                .unwrap()
                .into_entry()
                .unwrap()
        };
        let snap = Snapshot::new(
            1,
            vec![
                entry("web", 4),
                entry("api", 0),
                entry("web", 1),
                entry("web-2", 2),
                entry("we", 3),
                entry("web", 0),
            ],
        );
        let ids = |name: &str| {
            snap.by_name(name)
                .iter()
                .map(|e| e.pm_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids("web"), [4, 1, 0]);
        assert_eq!(ids("api"), [0]);
        assert_eq!(ids("we"), [3]);
        assert_eq!(ids("web-2"), [2]);
        assert!(ids("w").is_empty() && ids("zzz").is_empty() && ids("").is_empty());
        assert!(Snapshot::new(0, Vec::new()).by_name("web").is_empty());
    }

    #[test]
    fn from_home_has_no_env_lookups() {
        let p = Pm2Paths::from_home(Path::new("/x/.pm2"));
        assert_eq!(p.rpc, Path::new("/x/.pm2/rpc.sock"));
        assert_eq!(p.pubsub, Path::new("/x/.pm2/pub.sock"));
    }
}
