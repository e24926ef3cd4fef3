#!/usr/bin/env python3
"""pmguard vs monit vs the seed's bash loop, side by side on this machine (run by bench/compare.sh).

Everything lives in one private `mktemp -d` directory (PM2_HOME, configs, state, logs) and talks
only to 127.0.0.1. The PM2 daemon this starts is killed at the end (`pm2 kill` with the same
private PM2_HOME), as are monit, the agent, the health server and ministack.

Sections (SECTIONS env, default "footprint scale detect cost"):
  footprint  one app watched every 1 s for DURATION s (default 60), REPS times, the watchers
             interleaved (rep 1: pmguard, monit, bash loop, [pmguard+CloudWatch]; rep 2: ...)
  scale      pmguard alone watching 1, 10, 100 apps at 1 s, SCALE_DURATION s of steady state
             after SCALE_SETTLE s; plus one run with no watcher (PM2 daemon baseline) per count
  detect     faults (FAULTS, default "sigstop 500 spin crash") x (pmguard, monit) x DETECT_REPS
  cost       AWS API calls per hour: not measured here (see BENCHMARKS.md)
Raw key=value lines go to stderr; the summary (markdown) to stdout.
"""
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = os.path.join(ROOT, "bench", "lib")
APP_JS = os.path.join(ROOT, "agent", "tests", "apps", "app.js")
AGENT = os.environ["AGENT"]
PM2 = shutil.which(os.environ.get("PM2_BIN", "pm2"))
MONIT = shutil.which("monit")
REPS = int(os.environ.get("REPS", "3"))
DURATION = float(os.environ.get("DURATION", "60"))
SCALE_DURATION = float(os.environ.get("SCALE_DURATION", "15"))
SCALE_SETTLE = float(os.environ.get("SCALE_SETTLE", "3"))
SCALE_COUNTS = [int(x) for x in os.environ.get("SCALE_COUNTS", "1 10 100").split()]
SCALE_REAL = int(os.environ.get("SCALE_REAL", "10"))  # node PM2 apps; the rest are stand-ins
# Also run the largest count without health_url (PM2 state + /proc only): splits the probe's cost off.
SCALE_NOPROBE = os.environ.get("SCALE_NOPROBE", "1") == "1"
# Also run the largest count with `keep_alive = true` (one kept connection per probe).
SCALE_KEEPALIVE = os.environ.get("SCALE_KEEPALIVE", "1") == "1"
DETECT_REPS = int(os.environ.get("DETECT_REPS", str(REPS)))
FAULTS = os.environ.get("FAULTS", "sigstop 500 spin crash").split()
SECTIONS = os.environ.get("SECTIONS", "footprint scale detect cost").split()
WINDOW_MS = 3 * 1000  # max_retries x retry_interval, the configured detection window
IDLE = "no watcher (PM2 idle)"

WORK = tempfile.mkdtemp(prefix="pmguard-compare.")
PM2_HOME = os.path.join(WORK, "pm2")
os.makedirs(PM2_HOME)
ENV = dict(os.environ, PM2_HOME=PM2_HOME)
ENV.pop("PM2_DAEMON_RPC_PORT", None)
ENV.pop("PM2_DAEMON_PUB_PORT", None)
# Keep AWS settings of the caller's shell out of every run but the CloudWatch one.
for k in list(ENV):
    if k.startswith("AWS_"):
        ENV.pop(k)

started = []  # (description, Popen) of long-lived helpers to stop at the end


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def now_ms():
    return time.time_ns() // 1_000_000


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def pm2(*args, check=True):
    r = subprocess.run([PM2, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=120)
    if check and r.returncode != 0:
        raise RuntimeError(f"pm2 {' '.join(args)} failed: {r.stderr[-500:]}")
    return r.stdout


def jlist():
    out = pm2("jlist")
    return json.loads(out[out.index("["):])


def http_get(url, timeout=1.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception:
        return None


def daemon_pid():
    with open(os.path.join(PM2_HOME, "pm2.pid")) as f:
        return int(f.read().strip())


def app_pid(name="bench", pm_id=0):
    try:
        with open(os.path.join(PM2_HOME, "pids", f"{name}-{pm_id}.pid")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


def proc_age_s(pid):
    """Seconds since process `pid` started."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        start_ticks = int(s[s.rindex(")") + 2:].split()[19])
        with open("/proc/uptime") as f:
            up = float(f.read().split()[0])
        return up - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, spec=".3f", none="n/a"):
    return none if x is None else format(x, spec)


def measure(cmd, duration, settle=0.0, env=None, logfile="/dev/null"):
    """Runs bench/lib/measure.py; returns its key=value line as a dict of floats."""
    m = [sys.executable, os.path.join(LIB, "measure.py"), "--duration", str(duration),
         "--settle", str(settle), "--daemon-pid", str(daemon_pid()), "--log", logfile, "--", *cmd]
    r = subprocess.run(m, env=env or ENV, stdout=subprocess.PIPE, text=True, check=True)
    d = {}
    for kv in r.stdout.split():
        k, _, v = kv.partition("=")
        try:
            d[k] = float(v)
        except ValueError:
            d[k] = v if v and v != "nan" else None
    return d


# --------------------------------------------------------------------------- set-up

def start_pm2_app(name, port):
    env = dict(ENV, PORT=str(port))
    r = subprocess.run([PM2, "start", APP_JS, "--name", name], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"pm2 start {name}: {r.stderr[-500:]}")


def wait_healthy(port, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if http_get(f"http://127.0.0.1:{port}/health", 0.5) == 200:
            return True
        time.sleep(0.05)
    return False


MAIN_PORT = free_port()


def ensure_main_app_healthy(min_age=0.0):
    """Makes sure `bench` is online, running (not SIGSTOPped), healthy, and at least min_age old."""
    pid = app_pid()
    if pid:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    if not wait_healthy(MAIN_PORT, 5):
        http_get(f"http://127.0.0.1:{MAIN_PORT}/mode/ok", 0.5)
        if not wait_healthy(MAIN_PORT, 2):
            log("# main app unhealthy; pm2 restart bench")
            pm2("restart", "bench")
            if not wait_healthy(MAIN_PORT, 30):
                raise RuntimeError("main app does not come back")
    pid = app_pid()
    age = proc_age_s(pid)
    if age < min_age:
        time.sleep(min_age - age)


def agent_config(path, state_dir, apps, aws_section="", log_passing_checks=False, keep_alive=False):
    lines = ["[agent]", 'interval = "1s"', f'state_dir = "{state_dir}"',
             f'pm2_home = "{PM2_HOME}"']
    if log_passing_checks:  # the detect section reads the first passing check from events.jsonl
        lines.append("log_passing_checks = true")
    lines.append("")
    for name, port in apps:
        lines += ["[[apps]]", f'name = "{name}"']
        if port is not None:
            lines.append(f'health_url = "http://127.0.0.1:{port}/health"')
            if keep_alive:
                lines.append("keep_alive = true")
        lines += ['timeout = "1s"', "max_retries = 3", 'retry_interval = "1s"',
                  'restart_cooldown = "10s"', 'startup_grace = "5s"', ""]
    if aws_section:
        lines += [aws_section, ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def monit_config(dirpath, port):
    os.makedirs(dirpath, exist_ok=True)
    action = os.path.join(LIB, "pm2_action.sh")
    marker = os.path.join(dirpath, "actions.log")

    def prog(a):
        return f'"{action} {PM2_HOME} {PM2} {marker} {a} bench"'

    text = f"""set daemon 1
set logfile {dirpath}/monit.log
set idfile {dirpath}/monit.id
set statefile {dirpath}/monit.state
set pidfile {dirpath}/monit.pid
check process bench with pidfile {PM2_HOME}/pids/bench-0.pid
  start program = {prog("restart")} with timeout 5 seconds
  stop program = {prog("stop")}
  restart program = {prog("restart")} with timeout 5 seconds
  if failed host 127.0.0.1 port {port} protocol http request "/health" with timeout 1 seconds for 3 cycles then restart
"""
    path = os.path.join(dirpath, "monitrc")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path, marker


# --------------------------------------------------------------------------- CloudWatch sink

AWS_CANDIDATES = [
    os.environ.get("BENCH_AWS_SECTION", ""),
    # The sink at its defaults (flush_interval 60 s, standard resolution, no SNS topic); a fixed
    # instance_id so nothing asks IMDS for one.
    '[aws]\nnamespace = "PMGuard/Bench"\nlog_group = "/pmguard/bench"\ninstance_id = "bench-host"',
    '[aws]\nnamespace = "PMGuard/Bench"\nlog_group = "/pmguard/bench"',
    "[aws]",
]


def aws_mode():
    """Returns (aws_section, env) when this build's agent accepts an [aws] section and ministack
    is on PATH, else (None, reason)."""
    if not shutil.which("ministack"):
        return None, "ministack not on PATH"
    d = os.path.join(WORK, "aws-validate")
    os.makedirs(d, exist_ok=True)
    for sec in AWS_CANDIDATES:
        if not sec:
            continue
        cfg = agent_config(os.path.join(d, "v.toml"), os.path.join(d, "state"),
                           [("bench", MAIN_PORT)], sec)
        r = subprocess.run([AGENT, "validate", "--config", cfg], env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode == 0:
            return sec, None
        log(f"# validate rejected [aws] candidate: {r.stdout.strip()[:300]}")
    return None, "this build's `pmguard-agent validate` rejects an [aws] section"


def start_ministack():
    port = free_port()
    env = dict(ENV, BIND_HOST="127.0.0.1", GATEWAY_PORT=str(port))
    out = open(os.path.join(WORK, "ministack.log"), "ab")
    p = subprocess.Popen(["ministack"], env=env, stdout=out, stderr=out, start_new_session=True)
    started.append(("ministack", p))
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if http_get(f"http://127.0.0.1:{port}/_localstack/health", 1) == 200:
            break
        time.sleep(0.3)
    else:
        raise RuntimeError("ministack did not become ready")
    aws_env = dict(ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="test",
                   AWS_SECRET_ACCESS_KEY="test", AWS_REGION="us-east-1",
                   AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    return port, aws_env


# --------------------------------------------------------------------------- footprint

def status_checks(state_dir):
    """Checks made, summed over the apps in the agent's status.json (0 if unreadable)."""
    try:
        with open(os.path.join(state_dir, "status.json")) as f:
            return sum(a.get("checks", 0) for a in json.load(f)["apps"])
    except (OSError, ValueError, KeyError):
        return 0


def count_lines(path, needle):
    try:
        with open(path) as f:
            return sum(1 for line in f if needle in line)
    except OSError:
        return 0


def footprint(results):
    ensure_main_app_healthy(min_age=6)
    url = f"http://127.0.0.1:{MAIN_PORT}/health"
    fp = os.path.join(WORK, "footprint")
    os.makedirs(fp, exist_ok=True)
    monitrc, _ = monit_config(os.path.join(fp, "monit"), MAIN_PORT)
    aws_sec, why = aws_mode()
    aws_env = None
    if aws_sec is not None:
        try:
            _, aws_env = start_ministack()
        except Exception as e:  # noqa: BLE001
            aws_sec, why = None, f"ministack failed to start: {e}"
    results["aws_why"] = why
    tools = {"pmguard": None, "monit": None}
    if os.environ.get("SKIP_BASH") != "1":
        tools["bash loop"] = None
    if aws_sec is not None:
        tools["pmguard + CloudWatch sink"] = None
    # The PM2 daemon with no watcher over the same window, in every rep: what a watcher costs the
    # daemon is its daemon CPU minus this (the "induced" share).
    tools[IDLE] = None
    rows = {t: [] for t in tools}
    cmds = {}
    for rep in range(1, REPS + 1):
        for tool in tools:
            ensure_main_app_healthy(min_age=6)
            env = ENV
            extra = {}
            if tool.startswith("pmguard"):
                aws = "Cloud" in tool
                state = os.path.join(fp, "state-aws" if aws else "state")
                shutil.rmtree(state, ignore_errors=True)
                cfg = agent_config(os.path.join(fp, "pmguard-aws.toml" if aws else "pmguard.toml"),
                                   state, [("bench", MAIN_PORT)], aws_sec if aws else "")
                cmd = [AGENT, "run", "--config", cfg]
                if aws:
                    env = aws_env
            elif tool == "monit":
                for f in ("monit.log", "monit.state", "monit.id"):
                    try:
                        os.unlink(os.path.join(fp, "monit", f))
                    except FileNotFoundError:
                        pass
                cmd = [MONIT, "-I", "-c", monitrc]
            elif tool == IDLE:
                cmd = ["sleep", str(DURATION + 1)]
            else:
                cmd = [os.path.join(LIB, "seed_loop.sh"), "bench", url, "1"]
            cmds[tool] = cmd
            lg = os.path.join(fp, f"{tool.split()[0]}-{rep}.log")
            m = measure(cmd, DURATION, settle=5, env=env, logfile=lg)
            if tool.startswith("pmguard"):
                extra["checks"] = status_checks(state)
                extra["restarts"] = count_lines(os.path.join(state, "events.jsonl"), '"kind":"restart"')
                try:
                    extra["status_json_bytes"] = os.path.getsize(os.path.join(state, "status.json"))
                    extra["events_bytes"] = os.path.getsize(os.path.join(state, "events.jsonl"))
                except OSError:
                    pass
            elif tool == "monit":
                extra["restarts"] = count_lines(os.path.join(fp, "monit", "actions.log"), "begin")
                extra["errors"] = count_lines(os.path.join(fp, "monit", "monit.log"), "error")
            elif tool != IDLE:
                extra["checks"] = count_lines(lg, "http=")
                extra["ok_checks"] = count_lines(lg, "http=200 status=online")
            m.update(extra)
            rows[tool].append(m)
            log(f"footprint rep {rep}: tool={tool.replace(' ', '_')} "
                + " ".join(f"{k}={v}" for k, v in m.items()))
    results["footprint"] = rows
    results["footprint_cmds"] = cmds
    results["footprint_files"] = {
        "pmguard.toml": open(os.path.join(fp, "pmguard.toml")).read(),
        "monitrc": open(monitrc).read(),
    }
    if aws_sec is not None:
        results["footprint_files"]["pmguard-aws.toml"] = open(os.path.join(fp, "pmguard-aws.toml")).read()


# --------------------------------------------------------------------------- scale

def scale(results):
    maxn = max(SCALE_COUNTS)
    real = min(SCALE_REAL, maxn)
    apps = [("bench", MAIN_PORT)]
    for i in range(2, real + 1):
        port = free_port()
        start_pm2_app(f"node{i}", port)
        apps.append((f"node{i}", port))
    stand_in = maxn - real
    if stand_in > 0:
        srv = subprocess.Popen([sys.executable, os.path.join(LIB, "multiport.py"), str(stand_in)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               start_new_session=True)
        started.append(("multiport", srv))
        line = srv.stdout.readline().split()
        if not line or line[0] != "ready":
            raise RuntimeError("multiport server did not start")
        ports = [int(p) for p in line[1:]]
        eco = {"apps": [{"name": f"stub{real + i + 1}", "script": "/bin/sleep", "args": "1000000",
                         "interpreter": "none", "autorestart": True} for i in range(stand_in)]}
        eco_path = os.path.join(WORK, "stubs.json")
        with open(eco_path, "w") as f:
            json.dump(eco, f)
        pm2("start", eco_path)
        apps += [(f"stub{real + i + 1}", ports[i]) for i in range(stand_in)]
    for _, port in apps:
        if not wait_healthy(port, 30):
            raise RuntimeError(f"app on {port} not healthy")
    time.sleep(3)
    entries = jlist()
    results["scale_setup"] = {
        "pm2_processes": len(entries),
        "real": real,
        "stand_in": stand_in,
        "jlist_bytes": len(json.dumps(entries)),
    }
    sc = os.path.join(WORK, "scale")
    os.makedirs(sc, exist_ok=True)
    rows, base, cmds, extra = {}, {}, {}, {}
    counts = (list(SCALE_COUNTS) + ([f"{maxn} without health_url"] if SCALE_NOPROBE else [])
              + ([f"{maxn} keep_alive"] if SCALE_KEEPALIVE else []))
    for n in counts:
        if isinstance(n, int):
            sel, key = apps[:n], str(n)
        elif n.endswith("keep_alive"):
            sel, key = apps[:maxn], f"{maxn}-keepalive"
        else:
            sel, key = [(name, None) for name, _ in apps[:maxn]], f"{maxn}-noprobe"
        cfg = agent_config(os.path.join(sc, f"pmguard-{key}.toml"), os.path.join(sc, f"state-{str(n).replace(' ', '_')}"),
                           sel, keep_alive=isinstance(n, str) and n.endswith("keep_alive"))
        cmds[n] = [AGENT, "run", "--config", cfg]
        rows[n] = []
    base_reps = []
    for rep in range(1, REPS + 1):
        # PM2 daemon baseline: the same PM2 (all processes running), no watcher, in every rep.
        m = measure(["sleep", str(SCALE_SETTLE + SCALE_DURATION + 1)], SCALE_SETTLE + SCALE_DURATION,
                    settle=SCALE_SETTLE)
        base_reps.append(m)
        log(f"scale rep {rep}: baseline (no watcher) " + " ".join(f"{k}={v}" for k, v in m.items()))
        for n in counts:
            shutil.rmtree(os.path.join(sc, f"state-{str(n).replace(' ', '_')}"), ignore_errors=True)
            m = measure(cmds[n], SCALE_SETTLE + SCALE_DURATION, settle=SCALE_SETTLE,
                        logfile=os.path.join(sc, f"agent-{n}-{rep}.log"))
            ev = os.path.join(sc, f"state-{str(n).replace(' ', '_')}", "events.jsonl")
            m["checks"] = status_checks(os.path.join(sc, f"state-{str(n).replace(' ', '_')}"))
            m["failed_checks"] = count_lines(ev, '"ok":false')
            m["restarts"] = count_lines(ev, '"kind":"restart"')
            try:
                m["status_json_bytes"] = os.path.getsize(os.path.join(sc, f"state-{str(n).replace(' ', '_')}", "status.json"))
                m["events_bytes"] = os.path.getsize(ev)
            except OSError:
                pass
            rows[n].append(m)
            log(f"scale rep {rep}: apps={str(n).replace(' ', '_')} " + " ".join(f"{k}={v}" for k, v in m.items()))
    base = {"daemon_cpu_s": median([m["daemon_cpu_s"] for m in base_reps]),
            "window_s": median([m["window_s"] for m in base_reps]),
            "daemon_pct": median([m["daemon_cpu_s"] / m["window_s"] * 100 for m in base_reps])}
    results["scale"] = rows
    results["scale_base"] = base
    results["scale_cmds"] = cmds
    results["scale_apps"] = apps
    # Remove the extra apps so later sections see the same machine as the footprint.
    for name, _ in apps[1:]:
        pm2("delete", name, check=False)
    for desc, p in list(started):
        if desc == "multiport":
            os.killpg(p.pid, signal.SIGTERM)
            p.wait()
            started.remove((desc, p))


# --------------------------------------------------------------------------- detection

class Poller(threading.Thread):
    """An outside observer: GET /health every 25 ms (timeout 200 ms), records (ts_ms, status)."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/health"
        self.stop_ev = threading.Event()
        self.samples = []

    def run(self):
        while not self.stop_ev.is_set():
            t = now_ms()
            st = http_get(self.url, 0.2)
            self.samples.append((now_ms(), st))
            rest = 0.025 - (now_ms() - t) / 1000
            if rest > 0:
                time.sleep(rest)

    def first_ok_after(self, ts):
        for t, st in self.samples:
            if t > ts and st == 200:
                return t
        return None


def inject(fault, pid):
    base = f"http://127.0.0.1:{MAIN_PORT}/mode/"
    t0 = now_ms()
    if fault == "sigstop":
        os.kill(pid, signal.SIGSTOP)
    elif fault in ("500", "spin", "crash"):
        http_get(base + fault, 1.0)
    else:
        raise ValueError(fault)
    return t0


def read_events(path):
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    return out


def read_marker(path):
    out = []
    try:
        with open(path) as f:
            for line in f:
                p = line.split()
                if len(p) >= 3:
                    out.append((int(p[0]), p[1], p[2]))
    except OSError:
        pass
    return out


def detect_one(tool, fault, rep, dd):
    ensure_main_app_healthy()
    tag = f"{tool}-{fault}-{rep}"
    if tool == "pmguard":
        state = os.path.join(dd, f"state-{tag}")
        cfg = agent_config(os.path.join(dd, "pmguard.toml"), state, [("bench", MAIN_PORT)],
                           log_passing_checks=True)
        cmd = [AGENT, "run", "--config", cfg]
    else:
        mdir = os.path.join(dd, f"monit-{tag}")
        cfg, marker = monit_config(mdir, MAIN_PORT)
        cmd = [MONIT, "-I", "-c", cfg]
    out = open(os.path.join(dd, f"{tag}.log"), "ab")
    w = subprocess.Popen(cmd, env=ENV, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                         start_new_session=True)
    w_started = time.monotonic()
    # Past pmguard's 5 s startup grace and monit's 5 s start timeout (it pauses port tests until
    # the process is that old), then a random phase against both watchers' 1 s cycles.
    ensure_main_app_healthy(min_age=6)
    time.sleep(max(0.0, 6 - (time.monotonic() - w_started)) + random.random())
    old_pid = app_pid()
    t0 = inject(fault, old_pid)
    # Started after the injection returned: every 200 it sees comes after the fault (for crash,
    # from the new process: the old one exits on its next /health).
    poller = Poller(MAIN_PORT)
    poller.start()
    deadline = t0 + 30_000
    issued = done = None
    pid_changed_at = None
    while now_ms() < deadline:
        if tool == "pmguard":
            evs = read_events(os.path.join(state, "events.jsonl"))
            r = [e for e in evs if e["kind"] == "restart" and e["ts_ms"] >= t0]
            d = [e for e in evs if e["kind"] in ("restart_done", "restart_failed") and e["ts_ms"] >= t0]
            issued = r[0]["ts_ms"] if r else None
            done = d[0]["ts_ms"] if d else None
        else:
            mk = [x for x in read_marker(marker) if x[0] >= t0]
            b = [x for x in mk if x[2] == "begin"]
            e = [x for x in mk if x[2] == "end" and x[1] in ("restart", "start")]
            issued = b[0][0] if b else None
            done = e[0][0] if e else None
        p = app_pid()
        if pid_changed_at is None and p and p != old_pid:
            pid_changed_at = now_ms()
        if fault == "crash":
            # PM2 restarts a crashed app by itself; watch 8 s more for a needless restart.
            if pid_changed_at and poller.first_ok_after(t0) and now_ms() > t0 + 8_000:
                break
        elif done and poller.first_ok_after(done):
            time.sleep(1.5)  # let the agent log its first passing probe after the restart
            break
        time.sleep(0.05)
    poller.stop_ev.set()
    poller.join()
    os.killpg(w.pid, signal.SIGTERM)
    try:
        w.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(w.pid, signal.SIGKILL)
        w.wait()
    r = {"t0": t0, "issued": issued, "done": done}
    r["detect_ms"] = issued - t0 if issued else None
    r["restart_ms"] = done - issued if done and issued else None
    after = issued if issued else t0
    first_ok = poller.first_ok_after(after)
    if fault == "crash" and not issued:
        first_ok = poller.first_ok_after(t0)
    r["healthy_ms"] = first_ok - t0 if first_ok else None
    if tool == "pmguard":
        evs = read_events(os.path.join(state, "events.jsonl"))
        probes = [e for e in evs if e["kind"] == "probe" and e["ts_ms"] >= t0]
        if issued:
            failed = [e for e in probes if not e.get("ok") and e["ts_ms"] <= issued]
            okp = [e for e in probes if e.get("ok") and e["ts_ms"] > issued]
            r["agent_ok_ms"] = okp[0]["ts_ms"] - t0 if okp else None
            if len(failed) >= 3:
                p1, p3 = failed[0], failed[-1]
                p1_start = p1["ts_ms"] - p1.get("latency_ms", 0)
                p3_start = p3["ts_ms"] - p3.get("latency_ms", 0)
                r["phase_ms"] = p1_start - t0
                r["last_probe_ms"] = p3.get("latency_ms", 0)
                # Everything beyond the schedule (2 x retry_interval between the first and the
                # third failing check) and the third probe's own duration.
                r["own_overhead_ms"] = issued - (p1_start + 2 * 1000) - p3.get("latency_ms", 0)
                r["decide_ms"] = issued - p3["ts_ms"]
                r["slip_ms"] = p3_start - p1_start - 2000
        else:
            okp = [e for e in probes if e.get("ok")]
            r["agent_ok_ms"] = okp[0]["ts_ms"] - t0 if okp else None
        r["restarts"] = sum(1 for e in evs if e["kind"] == "restart" and e["ts_ms"] >= t0)
    else:
        r["restarts"] = sum(1 for x in read_marker(marker) if x[0] >= t0 and x[2] == "begin")
    r["pid_changed_ms"] = pid_changed_at - t0 if pid_changed_at else None
    log(f"detect: tool={tool} fault={fault} rep={rep} "
        + " ".join(f"{k}={v}" for k, v in r.items()))
    return r


def detect(results):
    dd = os.path.join(WORK, "detect")
    os.makedirs(dd, exist_ok=True)
    rows = {}
    for rep in range(1, DETECT_REPS + 1):
        for fault in FAULTS:
            for tool in ("pmguard", "monit"):
                rows.setdefault((tool, fault), []).append(detect_one(tool, fault, rep, dd))
    results["detect"] = rows
    results["detect_files"] = {
        "pmguard.toml": open(os.path.join(dd, "pmguard.toml")).read(),
        "monitrc": open(os.path.join(dd, f"monit-monit-{FAULTS[0]}-1", "monitrc")).read(),
    }


# --------------------------------------------------------------------------- report

def machine():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    deb = open("/etc/debian_version").read().strip() if os.path.exists("/etc/debian_version") else "?"
    monit_v = subprocess.run([MONIT, "-V"], stdout=subprocess.PIPE, text=True).stdout.split("\n")[0]
    node_v = subprocess.run(["node", "--version"], stdout=subprocess.PIPE, text=True).stdout.strip()
    pm2_v = pm2("--version").strip().split("\n")[-1]
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "agent", "Cargo.lock"],
                           stdout=subprocess.PIPE, text=True).stdout.strip()
    nprocs = sum(1 for d in os.listdir("/proc") if d.isdigit())
    label = os.environ.get("AGENT_LABEL") or (
        f"pmguard at {rev}{' + uncommitted agent changes' if dirty else ''}")
    return (f"{os.cpu_count()} CPUs, {model}; kernel {os.uname().release}; Debian {deb}; "
            f"{monit_v}; PM2 {pm2_v}; node {node_v}; {label}; {nprocs} processes on the machine "
            f"at the end of the run")


def short(cmd):
    return " ".join(c.replace(WORK, "$W") for c in cmd)


def report(results):
    P = print
    P(f"## Results ({time.strftime('%Y-%m-%d %H:%M %Z')})\n")
    P(f"Machine: {results['machine']}\n")
    P(f"Load average at start: {results.get('load0')}; at the end: {results.get('load1')} "
      "(the machine is shared; other work was running).\n")
    P(f"`$W` = the run's private directory. REPS={REPS} DURATION={DURATION:g}s "
      f"SCALE_DURATION={SCALE_DURATION:g}s DETECT_REPS={DETECT_REPS}.\n")
    if "footprint" in results:
        fp = results["footprint"]
        P(f"### 1. Footprint: one app, checked every 1 s, {DURATION:g} s (medians of {REPS})\n")
        P("CPU = utime+stime of the watcher and every descendant over the whole window "
          "(getrusage(RUSAGE_CHILDREN) in bench/lib/measure.py, a child subreaper). Peak RSS = "
          "VmHWM of the watcher process (pmguard, monit: no child processes while healthy); for the "
          "bash loop, ru_maxrss of its largest child (`pm2 jlist`). Syscalls and bytes written: "
          "/proc/<pid>/io of the watcher process alone over the steady window (from 5 s).\n")
        P("Induced PM2 CPU = the daemon's CPU in the watcher's window minus its CPU in the same "
          "rep's window with no watcher (median over reps). **Cost to the box** = watcher CPU + "
          "induced PM2 CPU. Wake-ups/s = voluntary context switches of all the watcher's threads "
          "(/proc/<pid>/task/*/status) over the steady window.\n")
        P("| watcher | CPU s / window | % of a core | induced PM2 CPU s | **cost to the box s** | "
          "% of a core | peak RSS (VmHWM) | threads | wake-ups/s | syscalls/s | written/s | "
          "PM2 daemon CPU s | checks | command |")
        P("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        med = {}
        idle = {m_i: m["daemon_cpu_s"] for m_i, m in enumerate(fp.get(IDLE, []))}
        for tool, ms in fp.items():
            if tool == IDLE:
                continue
            cpu = median([m["tree_cpu_s"] for m in ms])
            if tool == "bash loop":
                rss = median([m["tree_maxrss_kib"] for m in ms])
            else:
                rss = median([m["own_hwm_kib"] for m in ms])
            thr = median([m["threads"] for m in ms])
            dmn = median([m["daemon_cpu_s"] for m in ms])
            ind = median([m["daemon_cpu_s"] - idle[i] for i, m in enumerate(ms)
                          if idle.get(i) is not None and m.get("daemon_cpu_s") is not None])
            box = median([m["tree_cpu_s"] + m["daemon_cpu_s"] - idle[i] for i, m in enumerate(ms)
                          if idle.get(i) is not None and m.get("daemon_cpu_s") is not None])
            chk = median([m.get("checks") for m in ms])
            win = median([m["window_s"] for m in ms])
            wk = median([m["own_wakeups"] / m["steady_s"] for m in ms if m.get("own_wakeups") is not None])
            sc = median([(m.get("own_syscr", 0) + m.get("own_syscw", 0)) / m["steady_s"] for m in ms])
            wr = median([m.get("own_wchar", 0) / m["steady_s"] for m in ms])
            med[tool] = (cpu, rss, box)
            P(f"| {tool} | {fmt(cpu)} | {fmt(cpu / win * 100 if cpu is not None else None, '.2f')} | "
              f"{fmt(ind)} | **{fmt(box)}** | {fmt(box / win * 100 if box is not None else None, '.3f')} | "
              f"{fmt(rss / 1024 if rss else None, '.1f')} MiB | {fmt(thr, '.0f')} | {fmt(wk, '.1f')} | "
              f"{fmt(sc, '.0f')} | {fmt(wr / 1024 if wr is not None else None, '.1f')} KiB | {fmt(dmn, '.2f')} | "
              f"{fmt(chk, '.0f', '-')} | `{short(results['footprint_cmds'][tool])}` |")
        if IDLE in fp:
            P(f"| {IDLE} | | | | | | | | | | | "
              f"{fmt(median([m['daemon_cpu_s'] for m in fp[IDLE]]), '.2f')} | | "
              f"`{short(results['footprint_cmds'][IDLE])}` |")
        if results.get("aws_why"):
            P(f"| pmguard + CloudWatch sink | not measured (sink not available in this build: "
              f"{results['aws_why']}) | | | | | | | | | | | | |")
        P()
        if "pmguard" in med and "monit" in med and med["monit"][0]:
            pc, pr, pb = med["pmguard"]
            mc, mr, mb = med["monit"]
            P(f"- pmguard / monit CPU: **{pc / mc:.2f}x**; cost to the box: "
              f"**{fmt(pb)} s** per {DURATION:g} s (goal <= 0.030 s per 60 s with the sink on); "
              f"peak RSS {fmt(pr / 1024, '.2f')} MiB (goal <= 5 MiB) = {pr / mr:.2f}x monit's.")
        if "pmguard + CloudWatch sink" in med and "monit" in med:
            ac, ar, ab = med["pmguard + CloudWatch sink"]
            P(f"- With the AWS sink: cost to the box **{fmt(ab)} s** per {DURATION:g} s; peak RSS "
              f"{fmt(ar / 1024, '.2f')} MiB = **{ar / med['monit'][1]:.2f}x** monit's (goal <= 1x).")
        if "bash loop" in med and med["pmguard"][0]:
            P(f"- bash loop / pmguard CPU: {med['bash loop'][0] / med['pmguard'][0]:.0f}x.")
        own = {t: median([m.get("own_sched_s") for m in ms]) for t, ms in fp.items() if t != IDLE}
        steady = {t: median([m["steady_s"] for m in ms]) for t, ms in fp.items() if t != IDLE}
        P("- Steady state of the watcher process alone (from 5 s after start, sum of its threads' "
          "schedstat; for the bash loop, bash itself without its children): "
          + "; ".join(f"{t} {fmt(own[t])} s in {fmt(steady[t], '.1f')} s" for t in own) + ".")
        for t, ms in fp.items():
            if t.startswith("pmguard"):
                P(f"- {t}, CPU s per thread over the steady window, each rep: "
                  + "; ".join(str(m.get("own_threads_cpu")) for m in ms) + ".")
        P()
    if "scale" in results:
        s = results["scale"]
        setup = results["scale_setup"]
        b = results["scale_base"]
        P(f"### 2. Scale: pmguard alone, N apps at 1 s (medians of {REPS}; {SCALE_DURATION:g} s "
          f"steady state after {SCALE_SETTLE:g} s)\n")
        P(f"PM2 ran {setup['pm2_processes']} processes for all counts: {setup['real']} node apps "
          f"(agent/tests/apps/app.js) and {setup['stand_in']} `/bin/sleep` apps whose health URLs are "
          f"served by one `bench/lib/multiport.py` on {setup['stand_in']} ports. getMonitorData reply "
          f"~{setup['jlist_bytes'] / 1024:.0f} KiB.\n")
        bd = b.get("daemon_pct")
        P("Agent CPU = sum over its threads of /proc/<pid>/task/*/schedstat over the steady window "
          "(ns resolution; in brackets the same from /proc/<pid>/stat, 10 ms ticks). Checks/s over "
          "the whole window, start-up included.\n")
        P("Induced PM2 CPU = the daemon's CPU % with the agent minus its median with no watcher "
          "(measured in every rep, same window). Cost to the box = agent + induced.\n")
        P("| apps | agent CPU % of one core | induced PM2 CPU % | **cost to the box %** | agent VmHWM | "
          "threads | checks/s | wake-ups/s | syscalls/s | "
          f"written/s | PM2 daemon CPU % (no watcher: {fmt(bd, '.2f')} %) | status.json | command |")
        P("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for n, ms in s.items():
            cpu = median([m["own_sched_s"] / m["steady_s"] * 100 for m in ms])
            tick = median([m["own_cpu_s"] / m["steady_s"] * 100 for m in ms])
            hwm = median([m["own_hwm_kib"] for m in ms])
            thr = median([m["threads"] for m in ms])
            cps = median([m["checks"] / m["window_s"] for m in ms])
            dmn = median([m["daemon_cpu_s"] / m["window_s"] * 100 for m in ms])
            sj = median([m.get("status_json_bytes") for m in ms])
            sc = median([(m.get("own_syscr", 0) + m.get("own_syscw", 0)) / m["steady_s"] for m in ms])
            wr = median([m.get("own_wchar", 0) / m["steady_s"] for m in ms])
            ind = dmn - bd if dmn is not None and bd is not None else None
            box = cpu + ind if cpu is not None and ind is not None else None
            wk = median([m["own_wakeups"] / m["steady_s"] for m in ms if m.get("own_wakeups") is not None])
            P(f"| {n} | {fmt(cpu, '.2f')} ({fmt(tick, '.2f')}) | {fmt(ind, '.2f')} | **{fmt(box, '.2f')}** | "
              f"{fmt(hwm / 1024, '.1f')} MiB | {fmt(thr, '.0f')} | "
              f"{fmt(cps, '.1f')} | {fmt(wk, '.1f')} | {fmt(sc, '.0f')} | {fmt(wr / 1024, '.1f')} KiB | {fmt(dmn, '.2f')} | "
              f"{fmt(sj / 1024 if sj else None, '.1f')} KiB | `{short(results['scale_cmds'][n])}` |")
        P()
        for n, ms in s.items():
            P(f"- {n} apps, agent CPU s per thread over {SCALE_DURATION:g} s, each rep: "
              + "; ".join(str(m.get("own_threads_cpu")) for m in ms) + ".")
        P()
    if "detect" in results:
        d = results["detect"]
        P(f"### 3. Detection and recovery (medians of {DETECT_REPS}; window = 3 failures x 1 s)\n")
        P("Fault at t0, then: restart issued (pmguard: `restart` event; monit: its restart program "
          "starts), restart done, first 200 seen by an outside poller (every 25 ms) after the "
          "restart was issued, and (pmguard) its own first passing probe.\n")
        P("| fault | watcher | t0 -> restart issued | minus 3 s window | restart took | t0 -> healthy "
          "(poller) | t0 -> agent's first ok probe | pmguard's own overhead | restarts |")
        P("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for fault in FAULTS:
            for tool in ("pmguard", "monit"):
                rs = d.get((tool, fault), [])
                det = median([r["detect_ms"] for r in rs])
                rst = median([r["restart_ms"] for r in rs])
                hl = median([r["healthy_ms"] for r in rs])
                ag = median([r.get("agent_ok_ms") for r in rs]) if tool == "pmguard" else None
                ov = median([r.get("own_overhead_ms") for r in rs]) if tool == "pmguard" else None
                nr = median([r["restarts"] for r in rs])
                ms = lambda x: fmt(x, ".0f") + " ms" if x is not None else "-"  # noqa: E731
                P(f"| {fault} | {tool} | {ms(det)} | {ms(det - WINDOW_MS if det is not None else None)} | "
                  f"{ms(rst)} | {ms(hl)} | {ms(ag) if tool == 'pmguard' else '-'} | "
                  f"{ms(ov) if tool == 'pmguard' else '-'} | {fmt(nr, '.0f')} |")
        P()
        P("pmguard per rep (ms): own overhead = restart issued - (start of the 1st failing check + "
          "2 x 1 s) - duration of the 3rd failing probe; slip = how late the 3rd check started "
          "against that schedule; probe = duration of the 3rd failing probe; phase = fault to the "
          "start of the 1st failing check.\n")
        for fault in FAULTS:
            rs = d.get(("pmguard", fault), [])
            P(f"- {fault}: " + "; ".join(
                f"overhead {r.get('own_overhead_ms')}, slip {r.get('slip_ms')}, probe "
                f"{r.get('last_probe_ms')}, phase {r.get('phase_ms')}, decide {r.get('decide_ms')}"
                for r in rs))
        P()
    P("### 4. Cost: AWS API calls per hour\n")
    P("Not measured by this script; see \"AWS API calls per hour (issue 4)\" in BENCHMARKS.md.\n")
    P("### Configs used\n")
    for sec in ("footprint_files", "detect_files"):
        for name, text in results.get(sec, {}).items():
            P(f"{sec.split('_')[0]} `{name}`:\n\n```\n{text.replace(WORK, '$W').rstrip()}\n```\n")
    if "scale_cmds" in results:
        P("scale configs: the footprint's `[[apps]]` block once per app (names bench, node2.., "
          "stub11..), same settings.\n")


def main():
    for tool in (PM2, MONIT):
        if not tool:
            sys.exit("pm2 and monit must be on PATH")
    log(f"# work dir {WORK}")
    start_pm2_app("bench", MAIN_PORT)
    if not wait_healthy(MAIN_PORT):
        sys.exit("test app did not start")
    results = {"load0": open("/proc/loadavg").read().split()[:3]}
    try:
        if "footprint" in SECTIONS:
            footprint(results)
        if "scale" in SECTIONS:
            scale(results)
        if "detect" in SECTIONS:
            detect(results)
        results["machine"] = machine()
        results["load1"] = open("/proc/loadavg").read().split()[:3]
        report(results)
    finally:
        for desc, p in started:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=10)
            except Exception:  # noqa: BLE001
                pass
        pid = None
        try:
            pid = daemon_pid()
        except OSError:
            pass
        if pid:
            try:
                os.kill(app_pid(), signal.SIGCONT)
            except OSError:
                pass
        subprocess.run([PM2, "kill"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=60)
        if pid:
            for _ in range(50):
                if not os.path.exists(f"/proc/{pid}"):
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
        if os.environ.get("KEEP_WORK") != "1":
            shutil.rmtree(WORK, ignore_errors=True)
        else:
            log(f"# kept {WORK}")


if __name__ == "__main__":
    main()
