//! `[[notify]]` end to end: a real PM2 running a test app that is made to hang, the agent
//! restarting it, and a local webhook receiver on 127.0.0.1 (agent/tests/apps/webhook_receiver.py,
//! a small Python server standing in for Slack or a webhook endpoint: the only fake, since the
//! real services cannot be reached from a test) that records every request and can answer 500
//! or be down. Delivery counts are printed for the record.

mod agent_harness;
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use agent_harness::{app, Agent, AGENT};
use common::{free_port, http_get, set_mode, wait_until, Pm2Sandbox};
use serde_json::Value;

/// The local webhook receiver.
struct Receiver {
    port: u16,
    record: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Receiver {
    /// A receiver that is down (nothing listens on its port) until `start`.
    fn down() -> Receiver {
        let dir = tempfile::tempdir().unwrap();
        Receiver {
            port: free_port(),
            record: dir.path().join("requests.jsonl"),
            child: None,
            _dir: dir,
        }
    }

    fn up() -> Receiver {
        let mut r = Receiver::down();
        r.start(200);
        r
    }

    fn start(&mut self, status: u16) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apps/webhook_receiver.py");
        let child = Command::new("python3")
            .arg(script)
            .arg(self.port.to_string())
            .arg(&self.record)
            .arg(status.to_string())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_until(Duration::from_secs(10), "the receiver listening", || {
            http_get(self.port, &format!("/_status/{status}")).is_some()
        });
    }

    fn set_status(&self, status: u16) {
        assert!(http_get(self.port, &format!("/_status/{status}")).is_some());
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Every request received: `{path, status, body}`.
    fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The bodies answered with a 2xx on `path`, in arrival order.
    fn delivered(&self, path: &str) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| r["path"] == path && r["status"].as_u64().is_some_and(|s| s < 300))
            .map(|r| r["body"].clone())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn agent_cmd(agent: &Agent, args: &[&str]) -> Output {
    Command::new(AGENT)
        .args(args)
        .arg("--config")
        .arg(agent.config())
        .output()
        .unwrap()
}

fn status_json(agent: &Agent) -> Value {
    serde_json::from_slice(&agent_cmd(agent, &["status", "--json"]).stdout).unwrap_or(Value::Null)
}

fn sink<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["notify"]
        .as_array()
        .and_then(|l| l.iter().find(|s| s["name"] == name))
        .unwrap_or(&Value::Null)
}

/// Makes the app hang and waits for the agent's restart and the recovery after it.
fn hang_and_recover(agent: &Agent, port: u16, cycle: usize) {
    set_mode(port, "hang").unwrap();
    wait_until(Duration::from_secs(30), "a restart and a recovery", || {
        agent.of_kind("restart").len() >= cycle && agent.of_kind("recovered").len() >= cycle
    });
}

/// The agent's own record of what should have been sent: each event of `kinds` in
/// events.jsonl at or after `since_ms`, as (event, time). A test app that is slow to listen
/// after a restart may be restarted twice; the alerts must follow the events whatever happened.
fn expected(agent: &Agent, kinds: &[&str], since_ms: u64) -> Vec<(String, String)> {
    agent
        .events()
        .iter()
        .filter(|e| kinds.contains(&e["kind"].as_str().unwrap_or("")))
        .filter(|e| e["ts_ms"].as_u64().unwrap_or(0) >= since_ms)
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_string(),
                e["ts"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// What a webhook received, as (event, time).
fn sent(bodies: &[Value]) -> Vec<(String, String)> {
    bodies
        .iter()
        .map(|b| {
            (
                b["event"].as_str().unwrap_or("?").to_string(),
                b["time"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

const RESTART_RECOVERED: &[&str] = &["restart", "recovered"];

fn kinds(bodies: &[Value]) -> Vec<String> {
    bodies
        .iter()
        .map(|b| b["event"].as_str().unwrap_or("?").to_string())
        .collect()
}

const SECRET: &str = "T0SECRET/B0SECRET/XXSECRETXX";
const MARKER: &str = "ENV-MARKER-7f3a9c";

#[test]
fn a_hung_app_sends_restart_then_recovered_once_each_with_its_log_and_no_secret() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app_env("web", port, &[], &[("DB_PASSWORD", MARKER)]);
    let rx = Receiver::up();
    let hook = format!("/hook/{SECRET}");
    let slack = format!("/services/{SECRET}");
    let notify = format!(
        "[[notify]]\ntype = \"webhook\"\nname = \"ops-hook\"\nurl = \"{}\"\nevents = [\"restart\", \"recovered\"]\nattach_log_lines = 5\n\n[[notify]]\ntype = \"slack\"\nurl = \"{}\"\n",
        rx.url(&hook),
        rx.url(&slack)
    );
    let agent = Agent::start(
        &pm2,
        &format!("{}\n{notify}", app("web", port, "max_retries = 2")),
    );
    agent.wait_for_probe_ok();
    wait_until(
        Duration::from_secs(10),
        "the sinks in status before any alert",
        || {
            let st = status_json(&agent);
            sink(&st, "ops-hook")["delivered"] == 0 && sink(&st, "slack-2")["queued"] == 0
        },
    );
    let t0 = Instant::now();
    hang_and_recover(&agent, port, 1);
    wait_until(Duration::from_secs(15), "every alert at both sinks", || {
        let want = expected(&agent, RESTART_RECOVERED, 0).len();
        rx.delivered(&hook).len() >= want && rx.delivered(&slack).len() >= want
    });
    eprintln!(
        "restart + recovered delivered {:?} after the hang began",
        t0.elapsed()
    );
    // A little longer: nothing more arrives (no duplicate, no second recovery).
    std::thread::sleep(Duration::from_secs(2));
    let hooks = rx.delivered(&hook);
    let want = expected(&agent, RESTART_RECOVERED, 0);
    assert_eq!(sent(&hooks), want, "each event once, in order");
    assert_eq!(kinds(&hooks).first().map(String::as_str), Some("restart"));
    assert_eq!(kinds(&hooks).last().map(String::as_str), Some("recovered"));
    assert_eq!(
        agent.of_kind("recovered").len(),
        1,
        "one recovery, one recovered"
    );
    let host = rustix_hostname();
    for b in &hooks {
        assert_eq!(b["app"], "web");
        assert_eq!(b["host"], host.as_str());
        assert!(b["time"].as_str().unwrap().ends_with('Z'), "{b}");
        assert!(!b["reason"].as_str().unwrap().is_empty(), "{b}");
    }
    let restart = agent.of_kind("restart")[0].clone();
    assert_eq!(hooks[0]["reason"], restart["reason"]);
    assert_eq!(hooks[0]["time"], restart["ts"]);
    assert!(hooks[hooks.len() - 1]["reason"]
        .as_str()
        .unwrap()
        .starts_with("restarted by pmguard"));
    // attach_log_lines: the app's own stderr, never its environment.
    let lines: Vec<&str> = hooks[0]["log_lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert!(
        lines.iter().any(|l| l.contains("mode hang requested")),
        "{lines:?}"
    );
    // Slack: one `text`, with the app and what happened.
    let slacks = rx.delivered(&slack);
    assert_eq!(slacks.len(), want.len(), "{slacks:#?}");
    assert_eq!(slacks[0].as_object().unwrap().len(), 1, "{}", slacks[0]);
    assert!(
        slacks[0]["text"].as_str().unwrap().contains("web on"),
        "{}",
        slacks[0]
    );
    assert!(
        slacks[slacks.len() - 1]["text"]
            .as_str()
            .unwrap()
            .contains("recovered"),
        "{}",
        slacks[1]
    );
    // No environment value in anything sent; no secret in anything the agent wrote or shows.
    let all = std::fs::read_to_string(&rx.record).unwrap();
    assert!(
        !all.contains(MARKER),
        "the app's environment was sent: {all}"
    );
    let status = status_json(&agent);
    assert_eq!(
        sink(&status, "ops-hook")["delivered"],
        want.len(),
        "{status}"
    );
    assert_eq!(
        sink(&status, "slack-2")["delivered"],
        want.len(),
        "{status}"
    );
    assert_eq!(sink(&status, "ops-hook")["queued"], 0, "{status}");
    let table = String::from_utf8_lossy(&agent_cmd(&agent, &["status"]).stdout).to_string();
    assert!(
        table.contains("notify ops-hook (webhook, http://127.0.0.1:"),
        "{table}"
    );
    let events = std::fs::read_to_string(agent.state().join("events.jsonl")).unwrap();
    for (what, text) in [
        ("the agent's log", agent.log()),
        ("events.jsonl", events),
        ("status --json", status.to_string()),
        ("status", table),
    ] {
        assert!(
            !text.contains("SECRET"),
            "the URL's secret is in {what}:\n{text}"
        );
        assert!(!text.contains(MARKER), "the app's environment is in {what}");
    }
}

fn rustix_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn an_outage_and_an_agent_restart_lose_nothing_and_send_nothing_twice() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("api", port, &[]);
    let mut rx = Receiver::down();
    let hook = format!("/hook/{SECRET}");
    let notify = format!(
        "[[notify]]\ntype = \"webhook\"\nname = \"hook\"\nurl = \"{}\"\nretry_max_interval = \"1s\"\n",
        rx.url(&hook)
    );
    let apps = format!("{}\n{notify}", app("api", port, "max_retries = 2"));
    let mut agent = Agent::start(&pm2, &apps);
    agent.wait_for_probe_ok();
    // Down: connection refused. The alerts wait in the spool.
    hang_and_recover(&agent, port, 1);
    wait_until(Duration::from_secs(10), "every alert queued", || {
        sink(&status_json(&agent), "hook")["queued"] == expected(&agent, RESTART_RECOVERED, 0).len()
    });
    let st = status_json(&agent);
    assert!(
        sink(&st, "hook")["last_error"]
            .as_str()
            .unwrap()
            .contains("connect"),
        "{st}"
    );
    assert!(agent.stop().success());
    let spool = agent.state().join("spool/notify.jsonl");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&spool).unwrap().mode() & 0o777, 0o600);
    // Back, but answering 500; the agent starts again and more events happen.
    rx.start(500);
    agent.spawn(&[]);
    agent.wait_for_probe_ok();
    hang_and_recover(&agent, port, 2);
    wait_until(
        Duration::from_secs(15),
        "500s seen, every alert queued",
        || {
            !rx.requests().is_empty()
                && sink(&status_json(&agent), "hook")["queued"]
                    == expected(&agent, RESTART_RECOVERED, 0).len()
        },
    );
    assert!(rx.delivered(&hook).is_empty());
    let failed_attempts = rx.requests().len();
    // Healthy again: every alert arrives, once, in order.
    let healed = Instant::now();
    rx.set_status(200);
    let want = expected(&agent, RESTART_RECOVERED, 0);
    wait_until(Duration::from_secs(20), "every delivery", || {
        rx.delivered(&hook).len() >= want.len()
    });
    eprintln!(
        "outage: {failed_attempts} attempts answered 500; {} alerts delivered {:?} after the receiver healed",
        want.len(),
        healed.elapsed()
    );
    std::thread::sleep(Duration::from_secs(2));
    let got = rx.delivered(&hook);
    assert_eq!(
        sent(&got),
        want,
        "each alert once, in order, across the outage and the restart"
    );
    assert_eq!(agent.of_kind("recovered").len(), 2);
    assert!(want.len() >= 4, "{want:?}");
    let ids: BTreeSet<&str> = got.iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), want.len(), "an alert was sent twice: {got:#?}");
    let times: Vec<u64> = got
        .iter()
        .map(|b| {
            b["id"]
                .as_str()
                .unwrap()
                .split('-')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "out of order: {times:?}"
    );
    wait_until(Duration::from_secs(5), "the spool emptied", || {
        !spool.exists()
    });
    // Everything went from the second run: the first one delivered nothing.
    assert_eq!(sink(&status_json(&agent), "hook")["delivered"], want.len());
    assert!(!agent.log().contains("SECRET"));
}

#[test]
fn a_burst_for_one_app_sends_the_limit_and_the_next_alert_says_how_many_were_held_back() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("web", port, &[]);
    let rx = Receiver::up();
    let notify = format!(
        "[[notify]]\ntype = \"webhook\"\nname = \"hook\"\nurl = \"{}\"\nrate_limit = 1\nrate_window = \"8s\"\n",
        rx.url("/h")
    );
    let agent = Agent::start(
        &pm2,
        &format!("{}\n{notify}", app("web", port, "max_retries = 1")),
    );
    agent.wait_for_probe_ok();
    hang_and_recover(&agent, port, 1);
    hang_and_recover(&agent, port, 2);
    let first = agent.of_kind("restart")[0]["ts_ms"].as_u64().unwrap();
    // Within the window: one alert went, the other three were held back (and said so).
    let in_window = agent.events().iter().filter(|e| notifiable(e)).count() as u64;
    wait_until(
        Duration::from_secs(5),
        "status counting the held-back alerts",
        || sink(&status_json(&agent), "hook")["held_back"] == in_window - 1,
    );
    assert_eq!(rx.delivered("/h").len(), 1, "{:#?}", rx.requests());
    assert!(agent.log().contains("Alert held back by the rate limit."));
    // After the window, the next alert goes and carries the count.
    while common_now_ms() < first + 8_000 {
        std::thread::sleep(Duration::from_millis(100));
    }
    hang_and_recover(&agent, port, 3);
    wait_until(Duration::from_secs(10), "the second delivery", || {
        rx.delivered("/h").len() >= 2
    });
    let got = rx.delivered("/h");
    let held_before: u64 = agent
        .events()
        .iter()
        .filter(|e| {
            notifiable(e)
                && e["ts_ms"].as_u64().unwrap()
                    < got[1]["id"]
                        .as_str()
                        .unwrap()
                        .split('-')
                        .next()
                        .unwrap()
                        .parse::<u64>()
                        .unwrap()
        })
        .count() as u64
        - 1;
    assert_eq!(got[0]["held_back"], 0);
    assert_eq!(got[1]["held_back"], held_before, "{got:#?}");
    assert!(held_before >= 3, "{got:#?}");
}

fn notifiable(e: &Value) -> bool {
    ["restart", "recovered", "give_up", "escalation", "resurrect"]
        .contains(&e["kind"].as_str().unwrap_or(""))
}

fn common_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `validate` and a reload refuse a bad [[notify]], naming the line and the fix; a reload
/// that adds a good one applies it at once.
#[test]
fn bad_notify_config_is_refused_with_line_and_fix_and_a_reload_applies_a_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("pmguard.toml");
    let head = "[[apps]]\nname = \"web\"\n\n[[notify]]\n";
    for (body, line, says, fix) in [
        (
            "type = \"webhook\"\nurl = \"http://alerts.example.com/hook/SECRET\"\n",
            6,
            "plain http to a host that is not loopback",
            "use https://",
        ),
        (
            "type = \"slack\"\nurl = \"https://hooks.example.com/x\"\nevents = [\"restart\", \"reboot\"]\n",
            7,
            "unknown notify event `reboot`",
            "choose from events = [\"give_up\"",
        ),
        (
            "type = \"pagerduty\"\nurl = \"https://hooks.example.com/x\"\n",
            5,
            "unknown notify type `pagerduty`",
            "write type = \"webhook\" or \"slack\"",
        ),
    ] {
        std::fs::write(&cfg, format!("{head}{body}")).unwrap();
        let out = Command::new(AGENT)
            .args(["validate", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(text.contains(&format!("pmguard.toml:{line}:")), "{text}");
        assert!(text.contains(says) && text.contains(fix), "{text}");
        assert!(!text.contains("SECRET"), "{text}");
    }
    // A running agent keeps its config when a reload brings a bad sink.
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("web", port, &[]);
    let agent = Agent::start(&pm2, &app("web", port, ""));
    agent.wait_for_probe_ok();
    let good = std::fs::read_to_string(agent.config()).unwrap();
    std::fs::write(
        agent.config(),
        format!("{good}\n[[notify]]\ntype = \"webhook\"\nurl = \"http://10.1.2.3/SECRET\"\n"),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    let rejected = agent.wait_for(Duration::from_secs(10), "config_rejected");
    assert!(
        rejected["message"].as_str().unwrap().contains("plain http"),
        "{rejected}"
    );
    assert!(!rejected.to_string().contains("SECRET"));
    // A valid sink added by a reload applies at once.
    let rx = Receiver::up();
    std::fs::write(
        agent.config(),
        format!(
            "{good}\n[[notify]]\ntype = \"webhook\"\nurl = \"{}\"\n",
            rx.url("/added")
        ),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    let reloaded = agent.wait_for(Duration::from_secs(10), "reload")["ts_ms"]
        .as_u64()
        .unwrap();
    hang_and_recover(&agent, port, 1);
    wait_until(
        Duration::from_secs(10),
        "alerts to the sink the reload added",
        || sent(&rx.delivered("/added")) == expected(&agent, RESTART_RECOVERED, reloaded),
    );
}

/// A 4xx other than 408/429 means the endpoint will never take the alert: dropped, counted,
/// one error in the log, never retried.
#[test]
fn an_alert_the_endpoint_refuses_is_dropped_once_and_counted_never_retried() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("web", port, &[]);
    let mut rx = Receiver::down();
    rx.start(404);
    let notify = format!(
        "[[notify]]\ntype = \"webhook\"\nname = \"hook\"\nurl = \"{}\"\nevents = [\"restart\"]\nretry_max_interval = \"1s\"\n",
        rx.url(&format!("/gone/{SECRET}"))
    );
    let agent = Agent::start(
        &pm2,
        &format!("{}\n{notify}", app("web", port, "max_retries = 1")),
    );
    agent.wait_for_probe_ok();
    hang_and_recover(&agent, port, 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    let restarts = || agent.of_kind("restart").len();
    while sink(&status_json(&agent), "hook")["dropped"] != restarts() {
        assert!(
            Instant::now() < deadline,
            "the refusal was not counted: {}\n{:#?}\n{}",
            status_json(&agent),
            rx.requests(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Well past several backoff periods: still the one attempt.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(rx.requests().len(), restarts(), "{:#?}", rx.requests());
    let st = status_json(&agent);
    let hook = sink(&st, "hook");
    assert_eq!(
        (hook["queued"].as_u64(), hook["delivered"].as_u64()),
        (Some(0), Some(0)),
        "{st}"
    );
    assert!(
        hook["last_error"].as_str().unwrap().contains("HTTP 404"),
        "{st}"
    );
    let log = agent.log();
    assert_eq!(
        log.matches("The notify endpoint refused an alert").count(),
        restarts(),
        "one error per alert: {log}"
    );
    assert!(!log.contains("SECRET"));
    assert!(!agent.state().join("spool/notify.jsonl").exists());
}

// ---- The library API against raw servers on 127.0.0.1 (a server that never answers, a fast
// 204 receiver): what a stop, a burst, a reload and odd replies do to the queue.

mod raw {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use pmguard_agent::config::{Config, NotifyConfig};
    use pmguard_agent::notify::{LogPaths, Notify, Options, Origin};
    use pmguard_agent::report::events::{Event, Forward, Kind};
    use serde_json::Value;

    /// A server that accepts and never answers; counts the connections.
    pub fn silent() -> (u16, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let seen = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        std::thread::spawn(move || {
            let mut keep = Vec::new();
            for c in l.incoming() {
                s.fetch_add(1, Ordering::SeqCst);
                keep.push(c);
            }
        });
        (port, seen)
    }

    /// A receiver that reads each request whole and answers with `replies` in turn (the last
    /// one again after that); counts the requests.
    pub fn answering(replies: &'static [&'static str]) -> (u16, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let got = Arc::new(AtomicUsize::new(0));
        let g = got.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                read_request(&mut s);
                let n = g.fetch_add(1, Ordering::SeqCst);
                let reply = replies[n.min(replies.len() - 1)];
                let _ = s.write_all(reply.as_bytes());
            }
        });
        (port, got)
    }

    pub fn read_request(s: &mut TcpStream) {
        let mut buf = Vec::new();
        let mut b = [0u8; 65536];
        loop {
            let n = s.read(&mut b).unwrap_or(0);
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&b[..n]);
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..p]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if buf.len() >= p + 4 + len {
                    return;
                }
            }
        }
    }

    pub fn sinks(name: &str, port: u16, extra: &str) -> Vec<NotifyConfig> {
        let text = format!("[[apps]]\nname = \"web\"\n[[notify]]\ntype = \"webhook\"\nname = \"{name}\"\nurl = \"http://127.0.0.1:{port}/h\"\nrate_limit = 1000\n{extra}");
        Config::parse(Path::new("/x.toml"), &text).unwrap().notify
    }

    pub fn start(sinks: Vec<NotifyConfig>, state: &Path, logs: LogPaths) -> Notify {
        let origin = Origin {
            host: "box".into(),
            instance_id: None,
        };
        Notify::start(sinks, state, origin, logs, Options::default()).unwrap()
    }

    pub fn no_logs() -> LogPaths {
        Arc::new(|_: &str| None)
    }

    /// A notify sink `hook` on the loopback `port`, its state in `state`, given one give_up.
    pub fn one_give_up(port: u16, state: &Path) -> Notify {
        let n = start(sinks("hook", port, ""), state, no_logs());
        event(&n, Kind::GiveUp, "web", "gave up");
        n
    }

    pub fn event(n: &Notify, kind: Kind, app: &str, message: &str) {
        let mut e = Event::new(kind, Some(app), message.to_string());
        e.ts_ms = pmguard_agent::clock::wall_ms();
        n.inbox().forward(&e);
    }

    /// The journal replayed as a reader would: each sink's spooled messages, in order.
    pub fn spooled(state: &Path) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(state.join("spool/notify.jsonl")).unwrap_or_default();
        let mut out: Vec<(String, String, String)> = Vec::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let sink = v["sink"].as_str().unwrap_or("").to_string();
            match v["op"].as_str() {
                Some("add") => out.push((
                    sink,
                    v["alert"]["id"].as_str().unwrap_or("").to_string(),
                    v["alert"]["message"].as_str().unwrap_or("").to_string(),
                )),
                Some("done") => {
                    let id = v["id"].as_str().unwrap_or("");
                    out.retain(|(s, i, _)| !(*s == sink && i == id));
                }
                _ => {}
            }
        }
        out.into_iter().map(|(s, _, m)| (s, m)).collect()
    }

    /// Bytes this process has written so far (files and sockets), from /proc/self/io.
    pub fn written() -> u64 {
        std::fs::read_to_string("/proc/self/io")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("wchar: ").map(|v| v.trim().parse().unwrap()))
            .unwrap()
    }
}

#[test]
fn alerts_accepted_while_an_attempt_hangs_are_on_disk_at_once_and_survive_a_stop() {
    use std::sync::atomic::Ordering;
    let (port, seen) = raw::silent();
    let d = tempfile::tempdir().unwrap();
    let n = raw::start(raw::sinks("hook", port, ""), d.path(), raw::no_logs());
    raw::event(
        &n,
        pmguard_agent::report::events::Kind::Restart,
        "web",
        "first",
    );
    wait_until(
        Duration::from_secs(5),
        "the first attempt in flight",
        || seen.load(Ordering::SeqCst) == 1,
    );
    for i in 0..3 {
        raw::event(
            &n,
            pmguard_agent::report::events::Kind::Restart,
            "web",
            &format!("later {i}"),
        );
    }
    // The attempt hangs (5 s deadline); the later alerts must not wait for it to reach the disk:
    // this is what a SIGKILL now would leave.
    let want: Vec<(String, String)> = ["first", "later 0", "later 1", "later 2"]
        .iter()
        .map(|m| ("hook".to_string(), m.to_string()))
        .collect();
    wait_until(Duration::from_secs(1), "all four alerts spooled", || {
        raw::spooled(d.path()) == want
    });
    n.stop();
    assert_eq!(raw::spooled(d.path()), want, "a stop keeps them spooled");
    // The next start sends them, in order, once each.
    let (port, got) = raw::answering(&["HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"]);
    let n = raw::start(raw::sinks("hook", port, ""), d.path(), raw::no_logs());
    wait_until(Duration::from_secs(10), "the four delivered", || {
        n.status().sinks.first().is_some_and(|s| s.delivered == 4)
    });
    assert_eq!(got.load(Ordering::SeqCst), 4);
    n.stop();
    assert!(!d.path().join("spool/notify.jsonl").exists());
}

#[test]
fn a_burst_of_a_thousand_alerts_costs_a_journal_append_each_not_a_spool_rewrite() {
    use std::sync::atomic::Ordering;
    let (port, got) = raw::answering(&["HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"]);
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("web-error.log");
    let line = format!("{}\n", "x".repeat(79));
    std::fs::write(&log, line.repeat(60)).unwrap();
    let logs: pmguard_agent::notify::LogPaths =
        std::sync::Arc::new(move |_: &str| Some(log.clone()));
    let sinks = raw::sinks("hook", port, "attach_log_lines = 50\n");
    let n = raw::start(sinks, d.path(), logs);
    let before = raw::written();
    let t = Instant::now();
    let count = 1000;
    for i in 0..count {
        raw::event(
            &n,
            pmguard_agent::report::events::Kind::Restart,
            &format!("app{i}"),
            &format!("restart {i}"),
        );
    }
    wait_until(Duration::from_secs(120), "the burst delivered", || {
        n.status()
            .sinks
            .first()
            .is_some_and(|s| s.delivered == count)
    });
    let mb = (raw::written() - before) as f64 / 1e6;
    eprintln!(
        "burst: {count} alerts with 50 log lines each delivered in {:?}; {mb:.1} MB written (spool and requests)",
        t.elapsed()
    );
    assert_eq!(got.load(Ordering::SeqCst), count as usize);
    // Each alert is ~5 KB: its request, its journal line and a bounded share of rewrites.
    // A rewrite of the whole spool per delivery was 1.7 GB here.
    assert!(mb < 60.0, "{mb:.1} MB written for {count} alerts");
    n.stop();
    assert!(
        !d.path().join("spool/notify.jsonl").exists(),
        "all delivered: no spool"
    );
}

#[test]
fn a_redirect_is_not_followed_nor_dropped_the_alert_waits_for_a_fixed_endpoint() {
    let (port, got) = raw::answering(&[
        "HTTP/1.1 301 Moved Permanently\r\nLocation: http://127.0.0.1:9/elsewhere\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
    ]);
    let d = tempfile::tempdir().unwrap();
    let n = raw::one_give_up(port, d.path());
    wait_until(Duration::from_secs(10), "the 301 seen", || {
        n.status()
            .sinks
            .first()
            .is_some_and(|s| s.last_error.is_some())
    });
    let st = n.status().sinks[0].clone();
    assert!(
        st.last_error.as_deref().unwrap().contains("HTTP 301"),
        "{st:?}"
    );
    assert!(
        st.last_error
            .as_deref()
            .unwrap()
            .contains("fix the sink's URL"),
        "{st:?}"
    );
    assert_eq!((st.dropped, st.queued), (0, 1), "{st:?}");
    // The endpoint answers again (the person fixed it): the same alert goes, once.
    wait_until(
        Duration::from_secs(10),
        "delivered after the redirect",
        || n.status().sinks[0].delivered == 1,
    );
    assert_eq!(got.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(n.status().sinks[0].dropped, 0);
    n.stop();
}

#[test]
fn a_2xx_with_a_body_over_the_limit_is_delivered_once() {
    let body = "x".repeat(100_000);
    let reply: &'static str = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_boxed_str(),
    );
    let replies: &'static [&'static str] = Box::leak(vec![reply].into_boxed_slice());
    let (port, got) = raw::answering(replies);
    let d = tempfile::tempdir().unwrap();
    let n = raw::one_give_up(port, d.path());
    wait_until(Duration::from_secs(10), "delivered", || {
        n.status().sinks.first().is_some_and(|s| s.delivered == 1)
    });
    n.stop();
    assert_eq!(
        got.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "sent again"
    );
    assert!(!d.path().join("spool/notify.jsonl").exists());
}

/// `sudo pmguard-agent validate` judges `url_file` for the agent's user (PM2_HOME's owner,
/// whom `run` becomes), not for root: that user's file passes, another user's is refused
/// naming the file, the owner found and the fix, and so is a root file the agent cannot read.
#[test]
fn validate_under_sudo_judges_url_file_for_the_agents_user_not_root() {
    use std::os::unix::fs::{chown, PermissionsExt};
    if !rustix_is_root() {
        eprintln!("skipped: needs root (validate run through sudo)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    // The agent's user: nobody (65534), owning PM2_HOME as `pm2 startup` would leave it.
    let (agent_uid, agent_gid, stranger) = (65534, 65534, 4242);
    let home = d.path().join("pm2");
    std::fs::create_dir(&home).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    chown(&home, Some(agent_uid), Some(agent_gid)).unwrap();
    let file = d.path().join("hook.url");
    std::fs::write(&file, format!("https://hooks.example.com/{SECRET}\n")).unwrap();
    let cfg = d.path().join("pmguard.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\npm2_home = \"{}\"\nstate_dir = \"{}\"\n\n[[apps]]\nname = \"web\"\n\n[[notify]]\ntype = \"webhook\"\nurl_file = \"{}\"\n",
            home.display(),
            d.path().join("state").display(),
            file.display()
        ),
    )
    .unwrap();
    let validate = || {
        let out = Command::new(AGENT)
            .args(["validate", "--config"])
            .arg(&cfg)
            .env_remove("PM2_HOME")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains("SECRET"), "{text}");
        (out.status.code(), text)
    };
    let set = |uid: u32, gid: u32, mode: u32| {
        chown(&file, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    // The agent's user's own 0600 file: what the installer's guide says to write.
    set(agent_uid, agent_gid, 0o600);
    let (code, text) = validate();
    assert_eq!(code, Some(0), "{text}");
    // root:<the agent's group> 0640: readable by the agent through its group.
    set(0, agent_gid, 0o640);
    let (code, text) = validate();
    assert_eq!(code, Some(0), "{text}");
    // Another user's file: refused, naming the file, who owns it, whose it should be, the fix.
    set(stranger, stranger, 0o600);
    let (code, text) = validate();
    assert_eq!(code, Some(1), "{text}");
    let path = file.display().to_string();
    assert!(
        text.contains(&format!("url_file {path}: owned by uid 4242")),
        "{text}"
    );
    assert!(
        text.contains("not by the agent's user nobody (uid 65534"),
        "{text}"
    );
    assert!(
        text.contains(&format!("PM2_HOME {}", home.display())),
        "{text}"
    );
    assert!(
        text.contains(&format!("chown nobody {path} && chmod 0600 {path}")),
        "{text}"
    );
    // root's own 0600: root may read it, the agent at its next reload may not.
    set(0, 0, 0o600);
    let (code, text) = validate();
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("cannot read it"), "{text}");
    assert!(text.contains(&format!("chown nobody {path}")), "{text}");
}

fn rustix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        .unwrap_or(false)
}

/// A server that reads each request whole and answers it only when told (`release`), so an
/// attempt can be kept in flight across a reload.
mod gated {
    use std::io::Write;
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc::{channel, Sender};
    use std::sync::Arc;

    pub struct Gated {
        pub port: u16,
        pub seen: Arc<AtomicUsize>,
        release: Sender<&'static str>,
    }

    impl Gated {
        pub fn start() -> Gated {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            let seen = Arc::new(AtomicUsize::new(0));
            let (release, rx) = channel::<&'static str>();
            let s = seen.clone();
            std::thread::spawn(move || {
                for c in l.incoming() {
                    let Ok(mut c) = c else { continue };
                    super::raw::read_request(&mut c);
                    s.fetch_add(1, Ordering::SeqCst);
                    let Ok(reply) = rx.recv() else { return };
                    let _ = c.write_all(reply.as_bytes());
                }
            });
            Gated {
                port,
                seen,
                release,
            }
        }

        pub fn release(&self, reply: &'static str) {
            self.release.send(reply).unwrap();
        }
    }
}

/// A reload that fixes a sink's URL while an attempt to the old one is in flight: the old
/// URL's 404, coming after the reload, must not drop the alert the new URL would take.
#[test]
fn a_refusal_from_the_old_url_after_a_reload_does_not_drop_the_alert_the_new_url_takes() {
    use pmguard_agent::report::events::Kind;
    use std::sync::atomic::Ordering;
    let old = gated::Gated::start();
    let (new_port, got) = raw::answering(&["HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"]);
    let d = tempfile::tempdir().unwrap();
    let n = raw::start(raw::sinks("hook", old.port, ""), d.path(), raw::no_logs());
    raw::event(&n, Kind::GiveUp, "web", "gave up");
    wait_until(Duration::from_secs(5), "the attempt at the old URL", || {
        old.seen.load(Ordering::SeqCst) == 1
    });
    n.reconfigure(raw::sinks("hook", new_port, ""));
    wait_until(Duration::from_secs(5), "the reload applied", || {
        n.status()
            .sinks
            .first()
            .is_some_and(|s| s.url.contains(&format!(":{new_port}/")))
    });
    old.release("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    wait_until(Duration::from_secs(10), "delivered at the new URL", || {
        n.status().sinks[0].delivered == 1
    });
    let st = n.status().sinks[0].clone();
    assert_eq!((st.dropped, st.queued), (0, 0), "{st:?}");
    assert_eq!(
        st.last_error, None,
        "the old URL's 404 is not the new one's: {st:?}"
    );
    assert_eq!(got.load(Ordering::SeqCst), 1);
    n.stop();
    assert!(!d.path().join("spool/notify.jsonl").exists());
}

/// The queue follows a sink renamed in the config while the agent was stopped (same type and
/// URL), as it does across a reload: nothing dropped, nothing counted lost.
#[test]
fn a_sink_renamed_while_the_agent_was_stopped_keeps_its_alerts() {
    use pmguard_agent::report::events::Kind;
    use std::sync::atomic::Ordering;
    let (port, got) = raw::answering(&[
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 60\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
    ]);
    let d = tempfile::tempdir().unwrap();
    let n = raw::start(raw::sinks("hook", port, ""), d.path(), raw::no_logs());
    raw::event(&n, Kind::GiveUp, "web", "gave up");
    wait_until(Duration::from_secs(5), "the 503", || {
        got.load(Ordering::SeqCst) == 1
    });
    n.stop();
    assert_eq!(raw::spooled(d.path()), [("hook".into(), "gave up".into())]);
    let n = raw::start(raw::sinks("ops-hook", port, ""), d.path(), raw::no_logs());
    wait_until(
        Duration::from_secs(10),
        "delivered under the new name",
        || n.status().sinks.first().is_some_and(|s| s.delivered == 1),
    );
    assert_eq!(n.status().lost, 0);
    n.stop();
    assert!(!d.path().join("spool/notify.jsonl").exists());
}

/// A spool of more than 16 MiB (many alerts with long log tails waiting on a long outage)
/// is replayed to its last line at start: the alerts at its end are sent, the ones marked
/// done are not sent again.
#[test]
fn a_spool_over_sixteen_mib_is_replayed_whole_at_start() {
    use std::sync::atomic::Ordering;
    let d = tempfile::tempdir().unwrap();
    let spool = d.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    // Written as the journal writes it: 4000 alerts of ~4.5 KB, all but the last two done.
    let mut text = String::new();
    let n = 4000;
    for i in 0..n {
        let alert = serde_json::json!({
            "id": format!("1-{i}"), "event": "restart", "app": "web", "host": "box",
            "reason": "probe failed", "message": format!("restart {i}"),
            "time": "2026-01-01T00:00:00.000Z", "ts_ms": 1, "fields": {}, "held_back": 0,
            "log": {"lines": [format!("{i} {}", "x".repeat(4400))]}
        });
        let line = serde_json::json!({"op": "add", "sink": "hook", "alert": alert});
        text.push_str(&line.to_string());
        text.push('\n');
    }
    for i in 0..n - 2 {
        text.push_str(&format!(
            "{{\"op\":\"done\",\"sink\":\"hook\",\"id\":\"1-{i}\"}}\n"
        ));
    }
    assert!(text.len() > 17 * 1024 * 1024, "{}", text.len());
    std::fs::write(spool.join("notify.jsonl"), text).unwrap();
    let (port, got) = raw::answering(&["HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"]);
    let n = raw::start(raw::sinks("hook", port, ""), d.path(), raw::no_logs());
    wait_until(
        Duration::from_secs(10),
        "the two waiting alerts delivered",
        || n.status().sinks.first().is_some_and(|s| s.delivered == 2),
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(got.load(Ordering::SeqCst), 2, "done alerts sent again");
    n.stop();
    assert!(!spool.join("notify.jsonl").exists());
}
