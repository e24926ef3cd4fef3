//! The memory rule end to end: a Python app under a real PM2 whose forked child (which PM2 does
//! not list) grows its memory. Over `memory_limit` for `memory_duration`, the app is restarted
//! through PM2's graceful path; under it, never. Each run prints the time from the crossing (the
//! child writes it when the tree's RSS first exceeds the limit) to the agent's `restart` event.

mod agent_harness;
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use agent_harness::{app, Agent};
use common::{free_port, http_get, wait_until, Pm2Sandbox};
use serde_json::Value;

fn memory_app() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/apps/memory_app.py")
        .display()
        .to_string()
}

/// `pm2 start memory_app.py` under python3 with `env`; waits until /health answers and PM2 says
/// online.
fn start_memory_app(pm2: &Pm2Sandbox, name: &str, port: u16, env: &[(&str, String)]) {
    let bin = std::env::var("PMGUARD_TEST_PM2").unwrap_or_else(|_| "pm2".into());
    let mut cmd = Command::new(bin);
    cmd.args([
        "start",
        &memory_app(),
        "--name",
        name,
        "--interpreter",
        "python3",
    ])
    .env("PM2_HOME", pm2.home())
    .env("PORT", port.to_string())
    .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_until(Duration::from_secs(20), "the app answering", || {
        http_get(port, "/health").is_some_and(|(s, _)| s == 200)
            && pm2.pids(name).first().is_some_and(|p| *p > 0)
    });
}

fn restart_time(pm2: &Pm2Sandbox, name: &str) -> u64 {
    pm2.jlist()
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["pm2_env"]["restart_time"].as_u64())
        .unwrap_or(0)
}

#[test]
fn a_child_growing_past_the_limit_restarts_the_app() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let cross = dir.path().join("crossed");
    start_memory_app(
        &pm2,
        "grow",
        port,
        &[
            ("TARGET_MB", "120".into()),
            ("LIMIT_MB", "60".into()),
            ("STEP_MS", "300".into()),
            ("CROSS_FILE", cross.display().to_string()),
        ],
    );
    let old = pm2.pids("grow");
    let agent = Agent::start(
        &pm2,
        &app(
            "grow",
            port,
            "max_retries = 1\nmemory_limit = \"60MB\"\nmemory_duration = \"2s\"",
        ),
    );
    let restart = agent.wait_for(Duration::from_secs(30), "restart");
    let reason = restart["reason"].as_str().unwrap();
    assert!(reason.starts_with("memory "), "{restart}");
    assert!(reason.contains("> 60 MB for "), "{restart}");
    assert!(reason.contains("(tree of 2 processes)"), "{restart}");
    let crossed_ms: u64 = std::fs::read_to_string(&cross)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let restart_ms = restart["ts_ms"].as_u64().unwrap();
    let took = restart_ms.saturating_sub(crossed_ms);
    println!(
        "memory limit crossed -> restart event: {took} ms (memory_duration 2 s, interval 300 ms)"
    );
    assert!(
        // 2 s over the limit, plus up to a tree sample period (500 ms, two 300 ms checks) at
        // each end, plus a loaded 2-core machine's scheduling.
        (2_000..6_000).contains(&took),
        "restart {took} ms after the crossing, with a 2 s duration and 300 ms checks"
    );
    let done = agent.wait_for(Duration::from_secs(15), "restart_done");
    assert_eq!(
        done["escalated"], false,
        "the graceful path, not SIGKILL: {done}"
    );
    wait_until(Duration::from_secs(10), "a new pid", || {
        let p = pm2.pids("grow");
        !p.is_empty() && p[0] != 0 && p != old
    });
    assert!(restart_time(&pm2, "grow") >= 1);
}

#[test]
fn a_tree_under_the_limit_is_measured_and_never_restarted() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    start_memory_app(
        &pm2,
        "steady",
        port,
        &[("TARGET_MB", "20".into()), ("STEP_MS", "100".into())],
    );
    let agent = Agent::start(
        &pm2,
        &app(
            "steady",
            port,
            "max_retries = 1\nmemory_limit = \"60MB\"\nmemory_duration = \"1s\"",
        ),
    );
    // Twenty checks (6 s at 300 ms) with the child's 20 MB in place.
    wait_until(Duration::from_secs(30), "twenty measured checks", || {
        agent
            .of_kind("probe")
            .iter()
            .filter(|e| e["memory_bytes"].as_u64().is_some_and(|m| m > 20_000_000))
            .count()
            >= 20
    });
    let probes: Vec<Value> = agent.of_kind("probe");
    assert!(probes.iter().all(|p| p["ok"] == true), "{probes:?}");
    assert!(agent.of_kind("restart").is_empty(), "{:?}", agent.events());
    assert_eq!(restart_time(&pm2, "steady"), 0);
    // The tree's RSS, more than PM2's view of the parent alone.
    let pm2_memory = pm2.jlist()[0]["monit"]["memory"].as_u64().unwrap();
    let tree = probes.last().unwrap()["memory_bytes"].as_u64().unwrap();
    assert!(
        tree > pm2_memory + 20_000_000,
        "tree {tree} vs PM2 {pm2_memory}"
    );
}
