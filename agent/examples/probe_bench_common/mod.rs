//! What both probe benches share: the schedule (N apps, each probed once per period, start times
//! spread over the period as the watch loop spreads them) and the measurement (this process's
//! CPU from /proc/self/stat, peak RSS from /proc/self/status VmHWM), printed as `key=value`.

use std::time::{Duration, Instant};

pub struct Args {
    pub url: String,
    pub apps: usize,
    pub secs: u64,
    pub period: Duration,
    pub ca_file: Option<String>,
}

/// `<url> <apps> <seconds> [ca_file]`.
pub fn args() -> Args {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let get = |i: usize, d: &str| a.get(i).cloned().unwrap_or_else(|| d.to_string());
    Args {
        url: get(0, "http://127.0.0.1:8080/health"),
        apps: get(1, "100").parse().unwrap_or(100),
        secs: get(2, "30").parse().unwrap_or(30),
        period: Duration::from_secs(1),
        ca_file: a.get(3).cloned(),
    }
}

/// When app `i`'s first probe is due.
pub fn first_due(start: Instant, a: &Args, i: usize) -> Instant {
    start + a.period.mul_f64(i as f64 / a.apps as f64)
}

/// utime + stime of this process, seconds (/proc/self/stat, clock ticks).
pub fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(") ").map_or("", |r| r.1);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = rustix::param::clock_ticks_per_second() as f64;
    (t(11) + t(12)) / hz
}

fn status_kib(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

pub fn report(design: &str, a: &Args, probes: u64, passed: u64, cpu0: f64, began: Instant) {
    let cpu = cpu_secs() - cpu0;
    let wall = began.elapsed().as_secs_f64();
    println!(
        "design={design} url_scheme={} apps={} secs={} probes={probes} passed={passed} cpu_s={cpu:.2} cpu_us_per_probe={:.1} core_pct={:.2} vmhwm_kib={} threads={}",
        a.url.split(':').next().unwrap_or(""),
        a.apps,
        a.secs,
        cpu * 1e6 / probes.max(1) as f64,
        cpu * 100.0 / wall,
        status_kib("VmHWM:"),
        status_kib("Threads:"),
    );
}
