#!/usr/bin/env bash
# Two pmguard-agent builds, A and B, watching the same app in turns (A, B, idle, A, B, idle ...):
# the agent's own CPU (schedstat ns, all threads, steady window), the CPU it induces in the PM2
# daemon (daemon CPU minus the idle window's), wake-ups/s and VmHWM. Meant for before/after
# comparisons on a loaded machine (interleaving exposes both to the same load; CPU seconds are
# far less sensitive to load than wall times). valgrind cannot run the agent here (rustix's vDSO
# lookup reads the host's auxv under valgrind and faults), and perf has no counters in this VM.
# Usage: A=old/pmguard-agent B=new/pmguard-agent [REPS=3] [DURATION=40] [EXTRA_PROCS=0] [WITH_AWS=1] bench/ab_cpu.sh
#   EXTRA_PROCS: that many `/bin/sleep` processes more in PM2 (a bigger process list).
#   A_APP / B_APP: extra lines for that build's [[apps]] section (e.g. B_APP='keep_alive = true':
#   the same build with and without a setting).
#   WITH_AWS=1: both agents also run the AWS sink (`[aws]`, flush_interval = AWS_FLUSH, 10s by
#   default so a window holds several flushes) against a private ministack on 127.0.0.1, with
#   dummy keys and IMDS off.
# Prints one key=value line per run on stderr and medians on stdout. Kills its PM2 at the end.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
: "${A:?}" "${B:?}"
REPS=${REPS:-3}
DURATION=${DURATION:-40}
SETTLE=${SETTLE:-5}
EXTRA_PROCS=${EXTRA_PROCS:-0}
PM2=${PMGUARD_TEST_PM2:-pm2}
W=$(mktemp -d)
export PM2_HOME=$W/pm2
unset PM2_DAEMON_RPC_PORT PM2_DAEMON_PUB_PORT
MS_PID=
trap '"$PM2" kill >/dev/null 2>&1 || true; if [[ -n "$MS_PID" ]]; then kill -- -"$MS_PID" 2>/dev/null || true; fi; rm -rf "$W"' EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
PORT=$PORT "$PM2" start "$ROOT/agent/tests/apps/app.js" --name bench >/dev/null
for i in $(seq 1 "$EXTRA_PROCS"); do
    "$PM2" start /bin/sleep --name "stub$i" --interpreter none -- 1000000 >/dev/null
done
sleep 3
DPID=$(cat "$PM2_HOME/pm2.pid")
AWS_SECTION=
if [[ -n "${WITH_AWS:-}" ]]; then
    command -v ministack >/dev/null 2>&1 || { echo "WITH_AWS needs ministack on PATH (pip install ministack cbor2)" >&2; exit 2; }
    MS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    mkdir -p "$W/ministack"
    # exec: the background job is ministack itself, leader of its own process group.
    (cd "$W/ministack" && BIND_HOST=127.0.0.1 GATEWAY_PORT=$MS_PORT MINISTACK_HOST=127.0.0.1 \
        exec setsid ministack >"$W/ministack.log" 2>&1) &
    MS_PID=$!
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$MS_PORT/_localstack/health" >/dev/null && break
        sleep 0.2
    done
    # Read before every AWS_* variable is cleared below (AWS_FLUSH among them: until 1 December
    # 2026 this line came after the clearing, so every run flushed every 10 s whatever was asked).
    FLUSH=${AWS_FLUSH:-10s}
    for v in $(compgen -e | grep '^AWS_' || true); do unset "$v"; done
    export AWS_ENDPOINT_URL=http://127.0.0.1:$MS_PORT AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test \
        AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true AWS_CONFIG_FILE=/dev/null \
        AWS_SHARED_CREDENTIALS_FILE=/dev/null
    AWS_SECTION="[aws]
namespace = \"PMGuard/Bench\"
log_group = \"/pmguard/bench\"
instance_id = \"bench-host\"
flush_interval = \"$FLUSH\""
fi
cfg() {
    cat <<EOF
[agent]
interval = "1s"
state_dir = "$W/state-$1"
pm2_home = "$PM2_HOME"

[[apps]]
name = "bench"
health_url = "http://127.0.0.1:$PORT/health"
timeout = "1s"
max_retries = 3
retry_interval = "1s"
$2

$AWS_SECTION
EOF
}
cfg a "${A_APP:-}" > "$W/a.toml"
cfg b "${B_APP:-}" > "$W/b.toml"
run() { # label cmd...
    local label=$1; shift
    local line
    line=$(python3 "$ROOT/bench/lib/measure.py" --duration "$((DURATION + SETTLE))" --settle "$SETTLE" \
        --daemon-pid "$DPID" -- "$@")
    echo "$label $line" | tee -a "$W/raw" >&2
}
for r in $(seq "$REPS"); do
    rm -rf "$W/state-a" "$W/state-b"
    run A "$A" run --config "$W/a.toml"
    run B "$B" run --config "$W/b.toml"
    run idle sleep "$((DURATION + SETTLE + 1))"
done
python3 - "$W/raw" "$DURATION" "$EXTRA_PROCS" "${WITH_AWS:+on (ministack)}" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    label, *kv = line.split()
    rows.setdefault(label, []).append(dict(x.split("=", 1) for x in kv))
dur = float(sys.argv[2])
# The daemon's CPU per second over the steady window, to the ns (schedstat of its threads).
def dcpu(r):
    return float(r["daemon_sched_s"]) / float(r["steady_s"])
idle = [dcpu(r) for r in rows["idle"]]
med = statistics.median
print(f"PM2 processes: 1 app + {sys.argv[3]} more; idle daemon: {med(idle) * 60:.4f} s per 60 s; AWS sink: {sys.argv[4] or 'off'}")
print("| build | agent CPU s per 60 s | induced PM2 CPU s per 60 s | cost to the box s per 60 s | wake-ups/s | VmHWM KiB |")
print("|---|---:|---:|---:|---:|---:|")
for label in ("A", "B"):
    rs = rows[label]
    own = med([float(r["own_sched_s"]) / float(r["steady_s"]) * 60 for r in rs])
    ind = med([(dcpu(r) - i) * 60 for r, i in zip(rs, idle)])
    box = med([(float(r["own_sched_s"]) / float(r["steady_s"]) + dcpu(r) - i) * 60 for r, i in zip(rs, idle)])
    wk = med([float(r["own_wakeups"]) / float(r["steady_s"]) for r in rs])
    hwm = med([float(r["own_hwm_kib"]) for r in rs])
    print(f"| {label} | {own:.4f} | {ind:.4f} | {box:.4f} | {wk:.1f} | {hwm:.0f} |")
EOF
