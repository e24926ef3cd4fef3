//! The native PM2 client against a real PM2 daemon (one private daemon per test).

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{free_port, http_get, set_mode, wait_until, Pm2Sandbox};
use pmguard_agent::pm2::{Bus, BusEvent, Client, ExecMode, Pm2Error, Status};

const T: Duration = Duration::from_secs(5);
const ACTION: Duration = Duration::from_secs(10);

fn entry_pid(c: &Client, name: &str, idx: usize) -> (u32, Status) {
    let s = c.list(T).unwrap();
    let e = s.by_name(name)[idx];
    (e.pid, e.status.clone())
}

#[test]
fn ping_and_version() {
    let sb = Pm2Sandbox::new();
    assert!(sb.pm2(&["ping"]).status.success());
    let c = Client::new(sb.paths());
    assert_eq!(
        c.generation(),
        0,
        "lazy: no connection before the first call"
    );
    c.ping(T).unwrap();
    assert_eq!(c.generation(), 1);
    let cli = String::from_utf8(sb.pm2(&["--version"]).stdout).unwrap();
    assert_eq!(c.version(T).unwrap(), cli.lines().last().unwrap().trim());
    assert_eq!(c.generation(), 1, "one kept connection");
}

#[test]
fn list_matches_jlist_and_never_holds_the_env() {
    let sb = Pm2Sandbox::new();
    let (p1, p2) = (free_port(), free_port());
    sb.start_app_env("web", p1, &[], &[("SECRET_TOKEN", "hunter2")]);
    sb.start_app("api", p2, &["--kill-timeout", "3000"]);
    let c = Client::new(sb.paths());
    let snap = c.list(T).unwrap();
    let jlist = sb.jlist();
    assert!(
        jlist.to_string().contains("hunter2"),
        "the secret is in what the daemon sends"
    );
    assert!(
        !format!("{snap:?}").contains("hunter2"),
        "and nowhere in what the client keeps"
    );

    let j = jlist.as_array().unwrap();
    assert_eq!(snap.processes().len(), j.len());
    assert_eq!(snap.generation, c.generation());
    for je in j {
        let e = snap
            .processes()
            .iter()
            .find(|e| u64::from(e.pm_id) == je["pm_id"].as_u64().unwrap())
            .unwrap();
        assert_eq!(e.name, je["name"].as_str().unwrap());
        assert_eq!(u64::from(e.pid), je["pid"].as_u64().unwrap());
        assert_eq!(e.status, Status::Online);
        assert_eq!(e.exec_mode, ExecMode::Fork);
        assert!(e.pid > 0 && e.memory > 0, "{e:?}");
        assert!(
            e.pm_uptime_ms.is_some_and(|t| t > 1_600_000_000_000),
            "{e:?}"
        );
        assert_eq!(e.restart_time, 0);
    }
    assert_eq!(snap.by_name("api")[0].kill_timeout_ms, Some(3000));
    assert_eq!(snap.by_name("web").len(), 1);
    assert!(snap.by_name("nope").is_empty());
}

#[test]
fn restart_gives_a_new_pid_and_online() {
    let sb = Pm2Sandbox::new();
    let port = free_port();
    sb.start_app("web", port, &[]);
    let c = Client::new(sb.paths());
    let snap = c.list(T).unwrap();
    let e = snap.by_name("web")[0].clone();
    c.restart(e.pm_id, snap.generation, ACTION).unwrap();
    wait_until(ACTION, "web online with a new pid", || {
        let (pid, status) = entry_pid(&c, "web", 0);
        pid != 0 && pid != e.pid && status == Status::Online
    });
    let after = c.list(T).unwrap();
    assert_eq!(after.by_name("web")[0].restart_time, e.restart_time + 1);
    assert_eq!(sb.pids("web"), vec![after.by_name("web")[0].pid]);
    wait_until(ACTION, "web healthy again", || {
        http_get(port, "/health").is_some_and(|(s, _)| s == 200)
    });
}

#[test]
fn stop_then_start() {
    let sb = Pm2Sandbox::new();
    let port = free_port();
    sb.start_app("web", port, &[]);
    let c = Client::new(sb.paths());
    let snap = c.list(T).unwrap();
    let id = snap.by_name("web")[0].pm_id;
    c.stop(id, snap.generation, ACTION).unwrap();
    let s = c.list(T).unwrap();
    assert_eq!(s.by_name("web")[0].status, Status::Stopped);
    assert_eq!(s.by_name("web")[0].pid, 0);
    assert!(http_get(port, "/health").is_none());
    c.start(id, snap.generation, ACTION).unwrap();
    wait_until(ACTION, "web online after start", || {
        entry_pid(&c, "web", 0).1 == Status::Online
    });
    wait_until(ACTION, "web healthy after start", || {
        http_get(port, "/health").is_some_and(|(s, _)| s == 200)
    });
}

fn wait_event(
    rx: &mpsc::Receiver<BusEvent>,
    what: &str,
    pred: impl Fn(&BusEvent) -> bool,
) -> BusEvent {
    let deadline = Instant::now() + ACTION;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(e) if pred(&e) => return e,
            Ok(_) => {}
            Err(_) => panic!("no bus event: {what}"),
        }
    }
}

#[test]
fn bus_reports_restart_and_crash() {
    let sb = Pm2Sandbox::new();
    let port = free_port();
    sb.start_app_env("web", port, &[], &[("SECRET_TOKEN", "hunter2")]);
    let c = Client::new(sb.paths());
    let snap = c.list(T).unwrap();
    let id = snap.by_name("web")[0].pm_id;
    let (tx, rx) = mpsc::channel();
    let bus = Bus::spawn(sb.paths(), move |e| {
        let _ = tx.send(e);
    })
    .unwrap();

    // The bus has no handshake: notify until the subscriber is connected and sees one.
    let mut seen = None;
    wait_until(
        ACTION,
        "bus connected (a notify_restart event seen)",
        || {
            c.notify_restart(id, T).unwrap();
            seen = rx.recv_timeout(Duration::from_millis(200)).ok();
            seen.is_some()
        },
    );
    let ev = seen.unwrap();
    assert_eq!(
        (ev.event.as_str(), ev.name.as_str(), ev.pm_id, ev.manually),
        ("restart", "web", id, true)
    );
    assert!(!format!("{ev:?}").contains("hunter2"));

    c.restart(id, snap.generation, ACTION).unwrap();
    let online = wait_event(&rx, "online after restart", |e| {
        e.event == "online" && e.name == "web"
    });
    // PM2 emits `online` before it updates pm2_env.status: the payload still says launching.
    assert!(online.status.is_some(), "{online:?}");
    assert!(online.at_ms > 1_600_000_000_000);

    wait_until(ACTION, "web healthy", || {
        http_get(port, "/health").is_some_and(|(s, _)| s == 200)
    });
    let _ = set_mode(port, "crash");
    let exit = wait_event(&rx, "exit after crash", |e| {
        e.event == "exit" && e.name == "web"
    });
    assert!(!exit.manually);
    assert_eq!(exit.pm_id, id);
    bus.stop();
}

#[test]
fn daemon_down_then_back() {
    let sb = Pm2Sandbox::new();
    let port = free_port();
    sb.start_app("web", port, &[]);
    let paths = sb.paths();
    let c = Client::new(paths.clone());
    let old = c.list(T).unwrap();
    let old_id = old.by_name("web")[0].pm_id;

    sb.kill_daemon();
    let until = Instant::now() + Duration::from_secs(1);
    let mut calls = 0;
    while Instant::now() < until {
        let t0 = Instant::now();
        let err = c.list(T).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        assert!(matches!(err, Pm2Error::DaemonDown { .. }), "{err:?}");
        assert!(matches!(
            c.restart(old_id, old.generation, T),
            Err(Pm2Error::DaemonDown { .. } | Pm2Error::Reconnected { .. })
        ));
        calls += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(calls > 10);
    assert!(
        !paths.rpc.exists(),
        "no daemon was spawned: the socket stays absent"
    );
    assert!(sb.daemon_pid().is_none());

    sb.start_app("web", port, &[]);
    wait_until(ACTION, "client reconnects", || c.ping(T).is_ok());
    assert!(c.generation() > old.generation);
    assert!(matches!(
        c.restart(old_id, old.generation, T),
        Err(Pm2Error::Reconnected {
            method: "restartProcessId"
        })
    ));
    let new = c.list(T).unwrap();
    let e = new.by_name("web")[0];
    c.restart(e.pm_id, new.generation, ACTION).unwrap();
}

#[test]
fn cluster_restart_of_one_worker_leaves_the_other() {
    let sb = Pm2Sandbox::new();
    let port = free_port();
    sb.start_app("web", port, &["-i", "2"]);
    let c = Client::new(sb.paths());
    let snap = c.list(T).unwrap();
    let workers = snap.by_name("web");
    assert_eq!(workers.len(), 2);
    assert_ne!(workers[0].pm_id, workers[1].pm_id);
    assert!(workers
        .iter()
        .all(|w| w.exec_mode == ExecMode::Cluster && w.instances == Some(2)));
    let (a, b) = (workers[0].clone(), workers[1].clone());
    c.restart(a.pm_id, snap.generation, ACTION).unwrap();
    wait_until(ACTION, "worker restarted", || {
        let s = c.list(T).unwrap();
        let w = s.processes().iter().find(|p| p.pm_id == a.pm_id).unwrap();
        w.pid != 0 && w.pid != a.pid && w.status == Status::Online
    });
    let s = c.list(T).unwrap();
    assert_eq!(
        s.processes()
            .iter()
            .find(|p| p.pm_id == b.pm_id)
            .unwrap()
            .pid,
        b.pid
    );
}
