//! The agent asks PM2 for its process list (`getMonitorData`, the daemon's costliest request)
//! only when something may have changed: PM2's bus was silent or disconnected, a pid the list
//! named is gone from /proc, or the list is `RELIST_MS` old and PM2 did not answer a ping (or it
//! is `RELIST_MAX_MS` old). These tests put relays in front of
//! PM2's sockets to count the lists and to silence the bus, and check that a quiet app costs few
//! lists while every change is still seen at once.

mod agent_harness;
mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_harness::{app, Agent};
use common::{free_port, wait_until, Pm2Sandbox};

/// A Unix socket in front of one of PM2's: bytes pass both ways; what the agent sends is kept
/// (to count requests), and what the daemon sends can be dropped (`mute`) or held back for
/// `delay_ms` (a slow daemon).
struct Relay {
    _dir: tempfile::TempDir,
    path: PathBuf,
    sent: Arc<Mutex<Vec<u8>>>,
    mute: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
}

impl Relay {
    fn start(target: &Path) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let sent: Arc<Mutex<Vec<u8>>> = Arc::default();
        let mute = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (target, s, m) = (target.to_path_buf(), Arc::clone(&sent), Arc::clone(&mute));
        let d = Arc::clone(&delay_ms);
        std::thread::spawn(move || {
            for agent in listener.incoming().flatten() {
                let Ok(daemon) = UnixStream::connect(&target) else {
                    continue;
                };
                pump(
                    agent.try_clone().unwrap(),
                    daemon.try_clone().unwrap(),
                    Some(s.clone()),
                    None,
                    None,
                );
                pump(daemon, agent, None, Some(m.clone()), Some(d.clone()));
            }
        });
        Relay {
            _dir: dir,
            path,
            sent,
            mute,
            delay_ms,
        }
    }

    fn count(&self, needle: &str) -> usize {
        let sent = self.sent.lock().unwrap();
        sent.windows(needle.len())
            .filter(|w| *w == needle.as_bytes())
            .count()
    }
}

fn pump(
    mut from: UnixStream,
    mut to: UnixStream,
    keep: Option<Arc<Mutex<Vec<u8>>>>,
    mute: Option<Arc<AtomicBool>>,
    delay_ms: Option<Arc<AtomicU64>>,
) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(k) = &keep {
                k.lock().unwrap().extend_from_slice(&buf[..n]);
            }
            if mute.as_ref().is_some_and(|m| m.load(Ordering::SeqCst)) {
                continue;
            }
            let hold = delay_ms.as_ref().map_or(0, |d| d.load(Ordering::SeqCst));
            if hold > 0 {
                std::thread::sleep(Duration::from_millis(hold));
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
}

const LIST: &str = "\"method\":\"getMonitorData\"";
const PING: &str = "\"method\":\"ping\"";

fn passing_probes_since(agent: &Agent, mark: u64) -> usize {
    agent
        .of_kind("probe")
        .iter()
        .filter(|e| e["ok"] == true && e["ts_ms"].as_u64().is_some_and(|t| t > mark))
        .count()
}

fn clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn start(pm2: &Pm2Sandbox, name: &str, port: u16, pubsub: &Path, rpc: &Relay) -> Agent {
    Agent::start_with(
        pm2,
        "",
        &app(name, port, "max_retries = 3"),
        &[
            ("PM2_DAEMON_RPC_PORT", rpc.path.to_str().unwrap()),
            ("PM2_DAEMON_PUB_PORT", pubsub.to_str().unwrap()),
        ],
    )
}

/// A healthy app checked every 300 ms: PM2 is asked for its list at most every 30 s while it
/// answers a ping every 10 s, not at every check; a process killed behind PM2's back (PM2 starts it again) is seen at the next check.
#[test]
fn a_quiet_healthy_app_costs_few_lists_and_a_killed_process_is_seen_at_once() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("quiet", port, &[]);
    let rpc = Relay::start(&pm2.home().join("rpc.sock"));
    let bus = Relay::start(&pm2.home().join("pub.sock"));
    let agent = start(&pm2, "quiet", port, &bus.path, &rpc);
    agent.wait_for_probe_ok();
    std::thread::sleep(Duration::from_millis(600));
    let (lists, pings, mark) = (rpc.count(LIST), rpc.count(PING), clock_ms());
    std::thread::sleep(Duration::from_secs(15));
    let checks = passing_probes_since(&agent, mark);
    let asked = rpc.count(LIST) - lists;
    let pinged = rpc.count(PING) - pings;
    assert!(checks >= 30, "only {checks} checks in 15 s");
    // Past 10 s a cheap ping stands in for the list (every 10 s), up to 30 s.
    assert!(asked <= 2, "{asked} lists for {checks} quiet checks");
    // One ping 10 s after the list (`RELIST_MS`); pings every 5 s would put 2-3 here.
    assert!((1..=2).contains(&pinged), "{pinged} pings in 15 s");
    kill_and_see_pm2_restart(&pm2, &agent, "quiet");
}

/// The same with PM2's bus silenced (connected, but its messages dropped, as when they are lost):
/// the kept /proc handle of the killed pid fails, so the agent asks PM2 at once anyway.
#[test]
fn with_the_bus_silent_a_killed_process_is_seen_from_proc() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("mute", port, &[]);
    let rpc = Relay::start(&pm2.home().join("rpc.sock"));
    let bus = Relay::start(&pm2.home().join("pub.sock"));
    let agent = start(&pm2, "mute", port, &bus.path, &rpc);
    agent.wait_for_probe_ok();
    bus.mute.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(600));
    kill_and_see_pm2_restart(&pm2, &agent, "mute");
}

/// Without a bus (its socket missing) nothing says the list is still true: every check asks.
#[test]
fn without_the_bus_every_check_asks_pm2() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("nobus", port, &[]);
    let rpc = Relay::start(&pm2.home().join("rpc.sock"));
    let nowhere = tempfile::tempdir().unwrap();
    let agent = start(&pm2, "nobus", port, &nowhere.path().join("pub.sock"), &rpc);
    agent.wait_for_probe_ok();
    let (lists, mark) = (rpc.count(LIST), clock_ms());
    std::thread::sleep(Duration::from_secs(2));
    let checks = passing_probes_since(&agent, mark);
    let asked = rpc.count(LIST) - lists;
    assert!(checks >= 4, "only {checks} checks in 2 s");
    assert!(asked + 1 >= checks, "{asked} lists for {checks} checks");
}

/// SIGKILLs the app's process; PM2 starts a new one. The agent must say so (a `pm2_event` about
/// PM2 restarting the app by itself) well within the 30 s (`RELIST_MAX_MS`) a quiet list could live.
fn kill_and_see_pm2_restart(pm2: &Pm2Sandbox, agent: &Agent, name: &str) {
    let old = pm2.pids(name);
    let before = agent.of_kind("pm2_event").len();
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the agent noticing PM2's restart",
        || {
            agent.of_kind("pm2_event")[before..].iter().any(|e| {
                e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("restarted the app by itself"))
            })
        },
    );
    let took = killed.elapsed();
    assert!(
        took < Duration::from_millis(2_500),
        "noticed only after {took:?}"
    );
    assert!(agent.of_kind("restart").is_empty(), "pmguard restarted too");
}

/// PM2 slow to answer (every reply 700 ms late, and without a bus every check asks it): the
/// probe starts after PM2 was read, so its 500 ms timeout and the latency it reports are the
/// app's own, not PM2's wait.
#[test]
fn a_slow_pm2_does_not_eat_the_probes_time() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("slowpm2", port, &[]);
    let rpc = Relay::start(&pm2.home().join("rpc.sock"));
    let nowhere = tempfile::tempdir().unwrap();
    let agent = start(
        &pm2,
        "slowpm2",
        port,
        &nowhere.path().join("pub.sock"),
        &rpc,
    );
    agent.wait_for_probe_ok();
    rpc.delay_ms.store(700, Ordering::SeqCst);
    let mark = clock_ms();
    std::thread::sleep(Duration::from_secs(5));
    let probes: Vec<_> = agent
        .of_kind("probe")
        .into_iter()
        .filter(|e| e["ts_ms"].as_u64().is_some_and(|t| t > mark + 1_000))
        .collect();
    assert!(probes.len() >= 2, "{probes:?}");
    for p in &probes {
        assert_eq!(p["ok"], true, "{p}");
        assert!(p["latency_ms"].as_u64().is_some_and(|l| l < 400), "{p}");
    }
}

/// `a` is healthy (its quiet list needs no PM2 call), `b` fails (every round asks PM2, which is
/// slow): `a`'s PM2 state is read a second before its probe starts. `a` is SIGKILLed in that
/// second and PM2 starts it again at once (listening 3 s later). The refused probe belongs to
/// PM2's restart under way, not to a failing app: not counted, and `a` never restarted by pmguard.
#[test]
fn a_process_replaced_while_its_probe_ran_is_not_counted_as_a_failure() {
    let pm2 = Pm2Sandbox::new();
    let (pa, pb) = (free_port(), free_port());
    pm2.start_app_env("a", pa, &[], &[("START_DELAY_MS", "3000")]);
    pm2.start_app_env("b", pb, &[], &[("MODE", "500")]);
    let rpc = Relay::start(&pm2.home().join("rpc.sock"));
    let bus = Relay::start(&pm2.home().join("pub.sock"));
    let apps = app("a", pa, "max_retries = 1\nstartup_grace = \"5s\"")
        + &app("b", pb, "max_retries = 100");
    let agent = Agent::start_with(
        &pm2,
        "",
        &apps,
        &[
            ("PM2_DAEMON_RPC_PORT", rpc.path.to_str().unwrap()),
            ("PM2_DAEMON_PUB_PORT", bus.path.to_str().unwrap()),
        ],
    );
    agent.wait_for_probe_ok();
    // Past the agent's startup grace; then every PM2 answer comes 1 s late.
    std::thread::sleep(Duration::from_secs(6));
    rpc.delay_ms.store(1_000, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(2_500));
    let old = pm2.pids("a");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(8));
    let restarts: Vec<_> = agent
        .of_kind("restart")
        .into_iter()
        .filter(|e| e["app"] == "a")
        .collect();
    assert!(
        restarts.is_empty(),
        "pmguard restarted `a` while PM2 was starting it: {restarts:?}"
    );
}
