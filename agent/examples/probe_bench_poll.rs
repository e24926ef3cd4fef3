//! Probe cost, the agent's design: N apps, each probed once a second, every probe a non-blocking
//! state machine (`pmguard_agent::probe`) driven by one poll(2) loop on one thread, a new
//! connection per probe. `probe_bench_poll <url> <apps> <seconds> [ca_file]`; see
//! bench/probe_bench.sh and BENCHMARKS.md.

#[path = "probe_bench_common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use pmguard_agent::config::Config;
use pmguard_agent::probe::{InFlight, Prober, Started};
use rustix::event::{poll, PollFd, Timespec};

fn main() {
    let a = common::args();
    let ca = match &a.ca_file {
        Some(c) if a.url.starts_with("https:") => format!("ca_file = \"{c}\"\n"),
        _ => String::new(),
    };
    let text = format!(
        "[[apps]]\nname = \"a\"\ntimeout = \"2s\"\nhealth_url = \"{}\"\nexpect_body = \"healthy\"\n{ca}",
        a.url
    );
    let cfg = match Config::parse(Path::new("/bench.toml"), &text) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let mut probers: Vec<Prober> = (0..a.apps)
        .map(|_| Prober::new(cfg.apps[0].probes.clone()))
        .collect();
    let began = Instant::now();
    let cpu0 = common::cpu_secs();
    let end = began + Duration::from_secs(a.secs);
    let mut due: Vec<Instant> = (0..a.apps)
        .map(|i| common::first_due(began, &a, i))
        .collect();
    let mut flights: Vec<Option<InFlight>> = (0..a.apps).map(|_| None).collect();
    let (mut probes, mut passed) = (0u64, 0u64);
    let mut count = |ok: bool| {
        probes += 1;
        passed += u64::from(ok);
    };
    while Instant::now() < end {
        let now = Instant::now();
        for i in 0..a.apps {
            if flights[i].is_none() && due[i] <= now {
                due[i] += a.period;
                match probers[i].start() {
                    Started::Pending(f) => flights[i] = Some(f),
                    Started::Done(r) => count(r.outcome.passed()),
                }
            }
        }
        let next = due.iter().min().copied().unwrap_or(end);
        let wait = next.saturating_duration_since(Instant::now());
        let live: Vec<usize> = (0..a.apps).filter(|&i| flights[i].is_some()).collect();
        let mut ready = vec![false; a.apps];
        {
            let mut fds: Vec<PollFd<'_>> = live
                .iter()
                .filter_map(|&i| flights[i].as_ref())
                .map(|f| PollFd::from_borrowed_fd(f.fd(), f.events()))
                .collect();
            let ts = Timespec {
                tv_sec: 0,
                tv_nsec: i64::from(wait.subsec_nanos()).max(1_000_000),
            };
            let _ = poll(&mut fds, Some(&ts));
            for (k, &i) in live.iter().enumerate() {
                ready[i] = !fds[k].revents().is_empty();
            }
        }
        for &i in &live {
            let Some(f) = flights[i].as_mut() else {
                continue;
            };
            if ready[i] || Instant::now() >= f.deadline() {
                if let Some(r) = probers[i].advance(f) {
                    count(r.outcome.passed());
                    flights[i] = None;
                }
            }
        }
    }
    common::report("poll", &a, probes, passed, cpu0, began);
}
