//! `pmguard-agent status`: what the daemon wrote to `status.json`, for a person or as JSON. A
//! live daemon rewrites it when it is opened (`StateDir::read_status_fresh`): what is shown is at
//! most a second old.

use std::io::Write;

use serde_json::json;

use crate::clock;
use crate::report::state::{AppStatus, StateDir, StatusFile, StatusReadError, ASK_WAIT};

/// Prints the status. Returns false when there is no fresh heartbeat.
pub fn print(
    state: &StateDir,
    as_json: bool,
    out: &mut dyn Write,
) -> Result<bool, StatusReadError> {
    let Some(status) = state.read_status_fresh(ASK_WAIT)? else {
        if as_json {
            let _ = writeln!(out, "{}", json!({"running": false, "apps": []}));
        } else {
            let _ = writeln!(
                out,
                "No status in {}: pmguard-agent has not run with this state_dir.",
                state.dir.display()
            );
        }
        return Ok(false);
    };
    let fresh = status.is_fresh();
    if as_json {
        let mut v = serde_json::to_value(&status).map_err(|source| StatusReadError::Json {
            path: state.dir.display().to_string(),
            source,
        })?;
        v["fresh"] = json!(fresh);
        v["age_ms"] = json!(status.age_ms());
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_default()
        );
        return Ok(fresh);
    }
    render(&status, fresh, out);
    Ok(fresh)
}

/// Prints the status in Prometheus' text format (the textfile's content); nothing but a comment
/// without a status file. Returns false when there is no fresh heartbeat.
pub fn print_prometheus(state: &StateDir, out: &mut dyn Write) -> Result<bool, StatusReadError> {
    let Some(status) = state.read_status_fresh(ASK_WAIT)? else {
        let _ = writeln!(out, "# No status in {}.", state.dir.display());
        return Ok(false);
    };
    let _ = out.write_all(crate::report::prometheus::encode(&status).as_bytes());
    Ok(status.is_fresh())
}

fn render(s: &StatusFile, fresh: bool, out: &mut dyn Write) {
    let age = s.age_ms().map_or("from another boot".to_string(), |a| {
        format!("{:.1} s ago", a as f64 / 1000.0)
    });
    let _ = writeln!(
        out,
        "pmguard-agent {} (pid {}): heartbeat {} ({})",
        s.version,
        s.pid,
        age,
        if fresh {
            "alive"
        } else {
            "STALE: the agent is not running or is stuck"
        }
    );
    let _ = writeln!(
        out,
        "{:<20} {:<13} {:<9} {:<18} {:<28} RESPONSE ms (p50/max)",
        "APP", "HEALTH", "FAILURES", "PM2", "LAST PROBE"
    );
    for a in &s.apps {
        render_app(a, out);
    }
    for n in &s.notify {
        let _ = writeln!(
            out,
            "notify {} ({}, {}): queued {}, delivered {}, dropped {}, held back {}",
            n.name, n.kind, n.url, n.queued, n.delivered, n.dropped, n.held_back
        );
        if let Some(e) = &n.last_error {
            let at = n.last_error_at.as_deref().unwrap_or("-");
            let _ = writeln!(out, "    last error: {e} (at {at})");
        }
    }
    if s.notify_lost > 0 {
        let _ = writeln!(
            out,
            "notify: {} alerts lost before a sink kept them (a full inbox, or a removed sink's queue)",
            s.notify_lost
        );
    }
}

/// One app: its line in the table, then its note, probe history and last restarts.
fn render_app(a: &AppStatus, out: &mut dyn Write) {
    let pm2 = pm2_column(a);
    let last = a.probes.back().map_or("-".to_string(), |p| {
        format!("{} {} ms", if p.ok { "ok" } else { "FAIL" }, p.latency_ms)
    });
    let mut lat: Vec<u64> = a.probes.iter().map(|p| p.latency_ms).collect();
    lat.sort_unstable();
    let stats = match (lat.get(lat.len() / 2), lat.last()) {
        (Some(mid), Some(max)) => format!("{mid}/{max}"),
        _ => "-".to_string(),
    };
    let _ = writeln!(
        out,
        "{:<20} {:<13} {:<9} {:<18} {:<28} {}",
        a.name,
        a.health,
        format!("{}/{}", a.failures, a.max_retries),
        pm2,
        last,
        stats
    );
    if let Some(p) = &a.paused {
        let _ = writeln!(out, "    {}", p.describe());
    }
    if let Some(n) = &a.note {
        let _ = writeln!(out, "    note: {n}");
    }
    let _ = writeln!(out, "    checks since the agent started: {}", a.checks);
    cert_line(a, out);
    if !a.probes.is_empty() {
        let hist: Vec<String> = a
            .probes
            .iter()
            .map(|p| {
                if p.ok {
                    p.latency_ms.to_string()
                } else {
                    "x".into()
                }
            })
            .collect();
        let _ = writeln!(
            out,
            "    response times, oldest first (x = failed): {}",
            hist.join(" ")
        );
    }
    for r in a.restarts.iter().rev().take(5) {
        let _ = writeln!(
            out,
            "    restarted {}: {}",
            clock::rfc3339(r.ts_ms),
            r.reason
        );
    }
}

/// The certificate expiry of the app's https probes, as of the last probe that saw one.
fn cert_line(a: &AppStatus, out: &mut dyn Write) {
    if let Some(d) = a.probes.iter().rev().find_map(|p| p.cert_days) {
        let _ = match d {
            d if d < 0 => writeln!(out, "    certificate: EXPIRED {} day(s) ago", -d),
            d => writeln!(out, "    certificate: expires in {d} day(s)"),
        };
    }
}

/// `pid:status` of each instance, or `-`.
fn pm2_column(a: &AppStatus) -> String {
    if a.instances.is_empty() {
        return "-".to_string();
    }
    a.instances
        .iter()
        .map(|i| format!("{}:{}", i.pid, short(&i.status)))
        .collect::<Vec<_>>()
        .join(",")
}

fn short(status: &str) -> &str {
    match status {
        "waiting restart" => "waiting",
        s => s,
    }
}
