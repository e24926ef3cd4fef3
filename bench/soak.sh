#!/usr/bin/env bash
# Soak: 20 healthy node apps under a private PM2, watched every 1 s by one pmguard-agent for
# SOAK_MINUTES (30). Pass: zero restarts, RSS flat, fd count flat, thread count flat.
# Usage: bench/soak.sh > soak.md     (samples on stderr; summary, markdown, on stdout)
# Knobs: SOAK_MINUTES (30), SOAK_APPS (20), SAMPLE_EVERY (30 s), AGENT (a built binary; else a
#   release build), KEEP_WORK=1 (keep the private directory). Only 127.0.0.1 is contacted.
# Everything lives in one private mktemp -d directory with its own PM2_HOME; the PM2 daemon and
# the agent are stopped at the end, even on Ctrl-C. Not part of the test suite.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MINUTES=${SOAK_MINUTES:-30}
APPS=${SOAK_APPS:-20}
EVERY=${SAMPLE_EVERY:-30}

command -v pm2 >/dev/null 2>&1 || { echo "pm2 is not on PATH (npm install -g pm2@7.0.4)" >&2; exit 2; }
if [[ -z "${AGENT:-}" ]]; then
    PMGUARD_HOT_TEXT=1 cargo build --quiet --release -p pmguard-agent --manifest-path "$ROOT/Cargo.toml"
    AGENT="${CARGO_TARGET_DIR:-$ROOT/target}/release/pmguard-agent"
fi

WORK=$(mktemp -d /tmp/pmguard-soak.XXXXXXXX)
export PM2_HOME="$WORK/pm2"
AGENT_PID=
cleanup() {
    [[ -n "$AGENT_PID" ]] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null || true
    # Only against a live daemon: the pm2 CLI starts one whenever none answers.
    if [[ -S "$PM2_HOME/rpc.sock" ]]; then pm2 kill >/dev/null 2>&1 || true; fi
    [[ "${KEEP_WORK:-}" == 1 ]] || rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

CONFIG="$WORK/pmguard.toml"
printf '[agent]\ninterval = "1s"\nstate_dir = "%s"\n\n' "$WORK/state" > "$CONFIG"
for i in $(seq 1 "$APPS"); do
    port=$(free_port)
    PORT=$port pm2 start "$ROOT/agent/tests/apps/app.js" --name "soak$i" >/dev/null
    printf '[[apps]]\nname = "soak%s"\nhealth_url = "http://127.0.0.1:%s/health"\ntimeout = "1s"\nretry_interval = "1s"\nstartup_grace = "5s"\n\n' "$i" "$port" >> "$CONFIG"
done
"$AGENT" validate --config "$CONFIG" >&2

PM2_PID=$(cat "$PM2_HOME/pm2.pid")
"$AGENT" run --config "$CONFIG" 2>"$WORK/agent.log" &
AGENT_PID=$!
sleep 5

sample() {  # elapsed_s rss_kib hwm_kib fds threads agent_cpu_s pm2_cpu_s
    local ticks; ticks=$(getconf CLK_TCK)
    local a_cpu p_cpu
    a_cpu=$(python3 -c "import sys; f=open('/proc/$AGENT_PID/stat').read().rsplit(')',1)[1].split(); print((int(f[11])+int(f[12]))/$ticks)")
    p_cpu=$(python3 -c "import sys; f=open('/proc/$PM2_PID/stat').read().rsplit(')',1)[1].split(); print((int(f[11])+int(f[12]))/$ticks)")
    printf '%s %s %s %s %s %s %s\n' "$1" \
        "$(awk '/^VmRSS/{print $2}' "/proc/$AGENT_PID/status")" \
        "$(awk '/^VmHWM/{print $2}' "/proc/$AGENT_PID/status")" \
        "$(ls "/proc/$AGENT_PID/fd" | wc -l)" \
        "$(awk '/^Threads/{print $2}' "/proc/$AGENT_PID/status")" \
        "$a_cpu" "$p_cpu"
}

START=$(date +%s)
END=$((START + MINUTES * 60))
SAMPLES="$WORK/samples.txt"
: > "$SAMPLES"
while :; do
    now=$(date +%s)
    kill -0 "$AGENT_PID" 2>/dev/null || { echo "the agent died" >&2; cat "$WORK/agent.log" >&2; exit 1; }
    sample $((now - START)) | tee -a "$SAMPLES" >&2
    (( now >= END )) && break
    sleep "$EVERY"
done

RESTARTS=$(grep -c '"kind":"restart"' "$WORK/state/events.jsonl" || true)
FAILING=$(grep -c '"ok":false' "$WORK/state/events.jsonl" || true)
CHECKS=$("$AGENT" status --config "$CONFIG" --json | python3 -c 'import json,sys; print(sum(a["checks"] for a in json.load(sys.stdin)["apps"]))')
python3 - "$SAMPLES" "$MINUTES" "$APPS" "$RESTARTS" "$FAILING" "$CHECKS" <<'EOF'
import sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
minutes, apps, restarts, failing, checks = sys.argv[2:7]
first, last = rows[0], rows[-1]
col = lambda i: [r[i] for r in rows]
span = last[0] - first[0]
cpu = (last[5] - first[5]) / span * 100 if span else 0
pm2 = (last[6] - first[6]) / span * 100 if span else 0
print(f"| soak: {apps} apps at 1 s for {minutes} min | value |")
print("|---|---:|")
print(f"| checks made | {int(float(checks))} |")
print(f"| restarts | {restarts} |")
print(f"| failing checks | {failing} |")
print(f"| agent RSS first / last / max (KiB) | {int(first[1])} / {int(last[1])} / {int(max(col(1)))} |")
print(f"| agent VmHWM at the end (KiB) | {int(last[2])} |")
print(f"| open fds first / last / max | {int(first[3])} / {int(last[3])} / {int(max(col(3)))} |")
print(f"| threads first / last / max | {int(first[4])} / {int(last[4])} / {int(max(col(4)))} |")
print(f"| agent CPU (% of one core) | {cpu:.2f} |")
print(f"| PM2 daemon CPU over the same window (% of one core) | {pm2:.2f} |")
EOF
