//! Cost of one PM2 status check: the native client vs. the `pm2 jlist` CLI.
//!
//! `pm2_bench client N`: connects once, calls `list` N times; prints this process's CPU per call
//! (getrusage RUSAGE_SELF user+sys / N), its peak RSS, and the daemon's CPU per call.
//! `pm2_bench ping N`: connects once, sends PM2's `ping` N times (the same figures per call).
//! `pm2_bench jlist N`: runs `pm2 jlist` N times; prints the children's CPU per call
//! (RUSAGE_CHILDREN), the largest child's peak RSS, and the daemon's CPU per call.
//! Uses `$PM2_HOME` (or the default home). Output is one `key=value` line for scripts.

use std::time::{Duration, Instant};

use nix::sys::resource::{getrusage, UsageWho};
use nix::sys::time::TimeVal;
use pmguard_agent::pm2::{Client, Pm2Paths};

fn rusage(who: UsageWho) -> (f64, u64) {
    let Ok(ru) = getrusage(who) else {
        return (0.0, 0);
    };
    let secs = |tv: TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    (
        secs(ru.user_time()) + secs(ru.system_time()),
        ru.max_rss() as u64,
    )
}

/// utime+stime of the daemon, from /proc/<pm2.pid>/stat, in seconds.
fn daemon_cpu(paths: &Pm2Paths) -> Option<f64> {
    let pid = std::fs::read_to_string(paths.home.join("pm2.pid")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let hz = rustix::param::clock_ticks_per_second() as f64;
    Some(ticks / hz)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "client".into());
    let n: u32 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let paths = match Pm2Paths::resolve(None) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("pm2_bench: {e}");
            std::process::exit(2);
        }
    };
    let d0 = daemon_cpu(&paths);
    let t0 = Instant::now();
    let (cpu, rss_kib, procs) = match mode.as_str() {
        "client" => {
            let client = Client::new(paths.clone());
            let (c0, _) = rusage(UsageWho::RUSAGE_SELF);
            let mut procs = 0;
            for _ in 0..n {
                match client.list(Duration::from_secs(5)) {
                    Ok(s) => procs = s.processes().len(),
                    Err(e) => {
                        eprintln!("pm2_bench: {e}");
                        std::process::exit(1);
                    }
                }
            }
            let (c1, rss) = rusage(UsageWho::RUSAGE_SELF);
            (c1 - c0, rss, procs)
        }
        "ping" => {
            // What the watch loop sends every 5 s while it reuses a quiet list.
            let client = Client::new(paths.clone());
            let (c0, _) = rusage(UsageWho::RUSAGE_SELF);
            for _ in 0..n {
                if let Err(e) = client.ping(Duration::from_secs(5)) {
                    eprintln!("pm2_bench: {e}");
                    std::process::exit(1);
                }
            }
            let (c1, rss) = rusage(UsageWho::RUSAGE_SELF);
            (c1 - c0, rss, 0)
        }
        "jlist" => {
            let bin = std::env::var("PMGUARD_TEST_PM2").unwrap_or_else(|_| "pm2".into());
            let mut procs = 0;
            for _ in 0..n {
                let out = std::process::Command::new(&bin)
                    .arg("jlist")
                    .output()
                    .expect("run pm2 jlist");
                let v: serde_json::Value =
                    serde_json::from_slice(&out.stdout).expect("pm2 jlist output");
                procs = v.as_array().map_or(0, |a| a.len());
            }
            let (c, rss) = rusage(UsageWho::RUSAGE_CHILDREN);
            (c, rss, procs)
        }
        other => {
            eprintln!("pm2_bench: unknown mode {other} (client|jlist)");
            std::process::exit(2);
        }
    };
    let wall = t0.elapsed().as_secs_f64();
    let daemon = match (d0, daemon_cpu(&paths)) {
        (Some(a), Some(b)) => format!("{:.1}", (b - a) / f64::from(n) * 1e6),
        _ => "na".into(),
    };
    println!(
        "mode={mode} n={n} procs={procs} cpu_us_per_call={:.1} wall_us_per_call={:.1} peak_rss_kib={rss_kib} daemon_cpu_us_per_call={daemon}",
        cpu / f64::from(n) * 1e6,
        wall / f64::from(n) * 1e6,
    );
}
