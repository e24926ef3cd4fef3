//! Cost of the tree scan (`memory_limit`, `cpu_scope = "tree"`) per check.
//!
//! `tree_bench APPS ITERATIONS [ROOT_CMD...]` starts APPS process trees (default root command:
//! `sh -c "sleep 600 & sleep 600 & wait"`, a parent with two children, like a gunicorn master
//! and two workers), then samples every tree ITERATIONS times three ways and prints the CPU
//! (getrusage RUSAGE_SELF user+sys) per round of all apps: the children files (what the agent
//! does), the /proc scan fallback, and the kept-fd pid sample a check makes without tree rules.
//! Output is one `key=value` line for scripts. Kills the trees at the end.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::resource::{getrusage, UsageWho};
use nix::sys::time::TimeVal;
use pmguard_agent::procfs::tree::{page_size, scan_parents, walk, Children};
use pmguard_agent::procfs::ProcWatch;

fn cpu() -> f64 {
    let Ok(ru) = getrusage(UsageWho::RUSAGE_SELF) else {
        return 0.0;
    };
    let secs = |tv: TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    secs(ru.user_time()) + secs(ru.system_time())
}

/// CPU and wall time per call of `f`, in microseconds.
fn measure(n: usize, mut f: impl FnMut() -> usize) -> (f64, f64, usize) {
    let (c0, w0) = (cpu(), Instant::now());
    let mut members = 0;
    for _ in 0..n {
        members = f();
    }
    let per = |x: f64| x * 1e6 / n as f64;
    (per(cpu() - c0), per(w0.elapsed().as_secs_f64()), members)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let apps: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(1);
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let cmd: Vec<String> = if args.len() > 2 {
        args[2..].to_vec()
    } else {
        ["sh", "-c", "sleep 600 & sleep 600 & wait"]
            .map(String::from)
            .to_vec()
    };
    let mut roots: Vec<Child> = (0..apps)
        .map(|_| {
            Command::new(&cmd[0])
                .args(&cmd[1..])
                .stdout(Stdio::null())
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let proc_root = Path::new("/proc");
    let pids: Vec<u32> = roots.iter().map(Child::id).collect();
    let page = page_size();
    let files = measure(n, || {
        let c = Children::find(proc_root);
        pids.iter()
            .map(|p| walk(proc_root, &c, *p, page).len())
            .sum()
    });
    let scan = measure(n.div_ceil(10), || {
        let c = Children::Scanned(scan_parents(proc_root));
        pids.iter()
            .map(|p| walk(proc_root, &c, *p, page).len())
            .sum()
    });
    let watches: Vec<ProcWatch> = pids
        .iter()
        .filter_map(|p| ProcWatch::open(proc_root, *p).ok())
        .collect();
    let per_pid = measure(n, || watches.iter().filter(|w| w.sample().is_ok()).count());
    let procs = std::fs::read_dir(proc_root).map_or(0, |d| d.count());
    println!(
        "apps={apps} members={} machine_entries={procs} files_cpu_us={:.1} files_wall_us={:.1} scan_cpu_us={:.1} scan_wall_us={:.1} pid_only_cpu_us={:.1}",
        files.2, files.0, files.1, scan.0, scan.1, per_pid.0
    );
    for r in &mut roots {
        // Each tree is its own process group: the children go with their root.
        let group = nix::unistd::Pid::from_raw(r.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = r.wait();
    }
}
