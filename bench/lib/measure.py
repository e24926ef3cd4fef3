#!/usr/bin/env python3
"""Runs one watcher for a fixed time and reports what it cost.

usage: measure.py --duration S [--settle S] [--daemon-pid N] [--log FILE] -- CMD ARGS...

The command runs in its own session, with this process as a child subreaper
(prctl PR_SET_CHILD_SUBREAPER), so every descendant - the bash loop's curl, `pm2 jlist`, ps,
sleep; monit's programs - is reaped here, even if its parent died first. After `duration`
seconds the command's process group gets SIGTERM (SIGKILL 5 s later), everything is reaped, and

  tree_cpu_s      utime+stime of the command and all its descendants over the whole run
                  (getrusage(RUSAGE_CHILDREN) of this process, which only the watcher tree feeds)
  tree_maxrss_kib largest peak RSS of any single process in the tree (ru_maxrss of children)
  own_cpu_s       utime+stime of the watcher process itself (all its threads), /proc/<pid>/stat,
                  from `settle` seconds after start to the end: steady state, no start-up
  own_hwm_kib     VmHWM of the watcher process itself, read just before SIGTERM
  own_rss_kib     VmRSS at the same moment; threads = Threads at the same moment
  daemon_cpu_s    utime+stime of --daemon-pid (the PM2 God daemon) over the whole run
  daemon_sched_s  the daemon's CPU over the steady window (settle to the end) to the ns: the sum
                  of its threads' schedstat (its /proc stat ticks are 10 ms, too coarse for the
                  share one watched app induces)
  window_s        wall seconds from start to SIGTERM; steady_s from settle to SIGTERM
  own_syscr/syscw/rchar/wchar  /proc/<pid>/io deltas of the watcher over the steady window
  own_sched_s     the same steady-state CPU to the ns (sum of the threads' schedstat; threads
                  that ended inside the window are missed, /proc stat ticks are 10 ms)
  own_threads_cpu CPU seconds per thread name over the steady window (app:* threads summed;
                  schedstat, threads alive at the end only)
  own_wakeups     voluntary context switches of all the watcher's threads over the steady window
                  (/proc/<pid>/task/*/status; each is one sleep that ended: a wake-up; threads
                  alive at the end only); own_nvcsw the involuntary ones (preemptions)
are printed as one key=value line on stdout.
"""
import ctypes
import os
import resource
import signal
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def stat_cpu(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    fields = s[s.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def thread_cpu(pid):
    """Seconds on CPU per thread name (threads named app:* summed as app:*), from
    /proc/<pid>/task/<tid>/schedstat (ns; per-thread stat ticks round a thread's few ms to 0)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if name.startswith("app:"):
            name = "app:*"
        out[name] = out.get(name, 0.0) + ns / 1e9
    return out


def ctxt_switches(pid):
    """(voluntary, involuntary) context switches summed over the threads of `pid`."""
    vol = invol = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        invol += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return vol, invol


def io_counters(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = int(v)
    except OSError:
        pass
    return out


def status_fields(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "VmRSS", "Threads"):
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def main():
    args = sys.argv[1:]
    opts = {"--duration": "60", "--settle": "0", "--daemon-pid": "", "--log": "/dev/null"}
    while args and args[0] != "--":
        k = args.pop(0)
        opts[k] = args.pop(0)
    cmd = args[1:]
    duration = float(opts["--duration"])
    settle = float(opts["--settle"])
    dpid = int(opts["--daemon-pid"]) if opts["--daemon-pid"] else None

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    d0 = stat_cpu(dpid) if dpid else None
    log = open(opts["--log"], "ab")
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                         start_new_session=True)
    own0 = None
    early = False
    while True:
        now = time.monotonic() - t0
        if own0 is None and now >= settle:
            own0 = stat_cpu(p.pid) or 0.0
            thr0, io0, cs0 = thread_cpu(p.pid), io_counters(p.pid), ctxt_switches(p.pid)
            ds0 = sum(thread_cpu(dpid).values()) if dpid else None
            ts_settle = now
        if now >= duration:
            break
        if p.poll() is not None:
            early = True
            break
        time.sleep(min(0.2, max(0.0, duration - now), max(0.001, settle - now) if own0 is None else 1))
    window = time.monotonic() - t0
    st = status_fields(p.pid)
    own1 = stat_cpu(p.pid)
    thr1, io1 = (thread_cpu(p.pid), io_counters(p.pid)) if own0 is not None else ({}, {})
    cs1 = ctxt_switches(p.pid) if own0 is not None else None
    d1 = stat_cpu(dpid) if dpid else None
    ds1 = sum(thread_cpu(dpid).values()) if dpid and own0 is not None else None
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    # Reap orphans that came to us as subreaper.
    deadline = time.monotonic() + 5
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            if time.monotonic() > deadline:
                for name in os.listdir("/proc"):
                    if name.isdigit():
                        try:
                            with open(f"/proc/{name}/stat") as f:
                                s = f.read()
                            if int(s[s.rindex(")") + 2:].split()[1]) == os.getpid():
                                os.kill(int(name), signal.SIGKILL)
                        except (OSError, ValueError):
                            pass
                deadline = time.monotonic() + 5
            time.sleep(0.05)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    tree = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out = {
        "tree_cpu_s": f"{tree:.3f}",
        "tree_user_s": f"{after.ru_utime - before.ru_utime:.3f}",
        "tree_sys_s": f"{after.ru_stime - before.ru_stime:.3f}",
        "tree_maxrss_kib": after.ru_maxrss,
        "own_cpu_s": f"{(own1 - own0):.3f}" if own1 is not None and own0 is not None else "nan",
        "own_hwm_kib": st.get("VmHWM", "nan"),
        "own_rss_kib": st.get("VmRSS", "nan"),
        "threads": st.get("Threads", "nan"),
        "daemon_cpu_s": f"{(d1 - d0):.3f}" if d0 is not None and d1 is not None else "nan",
        "daemon_sched_s": f"{(ds1 - ds0):.4f}" if ds1 is not None and ds0 is not None else "nan",
        "window_s": f"{window:.2f}",
        "steady_s": f"{(window - ts_settle):.2f}" if own0 is not None else "nan",
        "exited_early": int(early),
    }
    # Steady-state breakdown of the watcher process: CPU per thread name, I/O per /proc/<pid>/io.
    for k in ("syscr", "syscw", "rchar", "wchar"):
        if k in io1 and k in io0:
            out[f"own_{k}"] = io1[k] - io0[k]
    if cs1 and cs0:
        out["own_wakeups"] = cs1[0] - cs0[0]
        out["own_nvcsw"] = cs1[1] - cs0[1]
    if thr1:
        out["own_sched_s"] = f"{sum(thr1.values()) - sum(thr0.get(n, 0.0) for n in thr1):.4f}"
        out["own_threads_cpu"] = ",".join(
            f"{n.replace(' ', '_')}:{thr1[n] - thr0.get(n, 0.0):.3f}" for n in sorted(thr1))
    print(" ".join(f"{k}={v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
