#!/usr/bin/env bash
# Regenerates agent/hot-text.txt: the functions a watching pmguard-agent runs, which build.rs
# lays out together at the front of its code (see agent/build.rs for why).
#
# How: builds the agent with every function aligned to its own 4 KiB page
# (-C llvm-args=-align-all-functions=12) into a private target dir, turns readahead off for the
# disk holding it (restored on exit) and evicts the copy from the page cache, so the pages mapped
# into the process are exactly the pages it ran (the kernel's fault-around maps only pages
# already cached). Then runs three workloads against a real PM2 app and reads
# /proc/PID/pagemap after each:
#   1. steady     one app checked every 1 s, healthy
#   2. fault      the same, the app SIGSTOPped for 10 s: failures, a restart, recovery
#   3. aws        1 and 2 with the [aws] sink on against a private ministack on 127.0.0.1
# The list holds the functions of 1+2 first, then those only 3 ran, names with crate hashes
# replaced by `*` (they change with the toolchain and flags).
#
# Needs root (the readahead setting), pm2 and, for workload 3, ministack on PATH.
# Usage: bench/hot_text.sh        (~5 min; writes agent/hot-text.txt, prints a summary)
# Only 127.0.0.1 is contacted.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# The work directory (the binary's copy among it) on the disk of the build, not a tmpfs /tmp.
mkdir -p "$ROOT/target"
exec 9>"$ROOT/target/.hot_text.lock"
flock -n 9 || { echo "another bench/hot_text.sh is running" >&2; exit 2; }
W=$(mktemp -d -p "$ROOT/target" hot_text.XXXXXX)
TGT=${HOT_TEXT_TARGET_DIR:-$W/target}
RA_FILE=""; RA=""; AGENT_PID=""
cleanup() {
    [ -n "$RA_FILE" ] && [ -n "$RA" ] && echo "$RA" >"$RA_FILE"
    [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null || true
    pm2 kill >/dev/null 2>&1 || true
    [ -n "${MS:-}" ] && kill -- "-$MS" 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
export PM2_HOME=$W/pm2
command -v pm2 >/dev/null || { echo "pm2 is not on PATH" >&2; exit 2; }

echo "building the page-aligned agent (private target dir)..." >&2
CARGO_TARGET_DIR=$TGT PMGUARD_HOT_TEXT=0 RUSTFLAGS="-C llvm-args=-align-all-functions=12 -C symbol-mangling-version=v0" \
    CARGO_PROFILE_RELEASE_STRIP=false \
    cargo build --quiet --release -p pmguard-agent --manifest-path "$ROOT/Cargo.toml"
BIN=$W/agent
cp "$TGT/release/pmguard-agent" "$BIN"

# The disk's readahead: off while the workloads run (restored on exit; a SIGKILL would leave it
# at 0: `cat` the printed file's old value back by hand). A partition's setting is its disk's.
blk=$(readlink -f "/sys/dev/block/$(stat -c '%Hd:%Ld' "$BIN")" 2>/dev/null || true)
[ -n "$blk" ] && [ -f "$blk/partition" ] && blk=$(dirname "$blk")
if [ -z "$blk" ] || [ ! -w "$blk/queue/read_ahead_kb" ]; then
    echo "cannot set the readahead of the disk holding $W (not a block device, or not root)" >&2
    exit 2
fi
RA=$(cat "$blk/queue/read_ahead_kb")
RA_FILE=$blk/queue/read_ahead_kb
echo "readahead of $RA_FILE: $RA KiB, 0 during the workloads" >&2

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
APP_PORT=$(port)
PORT=$APP_PORT pm2 start "$ROOT/agent/tests/apps/app.js" --name bench >/dev/null

# run NAME SECONDS FAULT AWS_BLOCK: one workload; the present pages into $W/NAME.pages
run() {
    local name=$1 secs=$2 fault=$3 aws=$4
    sync "$BIN"
    python3 -c "import os,sys; fd=os.open(sys.argv[1],os.O_RDONLY); os.posix_fadvise(fd,0,0,os.POSIX_FADV_DONTNEED)" "$BIN"
    rm -rf "$W/state"
    cat >"$W/a.toml" <<EOT
[agent]
interval = "1s"
state_dir = "$W/state"
pm2_home = "$PM2_HOME"

[[apps]]
name = "bench"
health_url = "http://127.0.0.1:$APP_PORT/health"
timeout = "1s"
max_retries = 3
retry_interval = "1s"
restart_cooldown = "5s"
startup_grace = "3s"
$aws
EOT
    echo 0 >"$RA_FILE"
    "$BIN" run --config "$W/a.toml" >"$W/$name.log" 2>&1 &
    local pid=$!
    AGENT_PID=$pid
    if [ "$fault" = 1 ]; then
        sleep 12; local app; app=$(pm2 pid bench)
        kill -STOP "$app"; sleep 10; kill -CONT "$app" 2>/dev/null || true; sleep $((secs - 22))
    else
        sleep "$secs"
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "the agent ended during the $name workload:" >&2; tail -5 "$W/$name.log" >&2; exit 1
    fi
    python3 "$ROOT/bench/lib/pagemap.py" "$pid" "$BIN" >"$W/$name.pages"
    kill "$pid"; wait "$pid" || true
    AGENT_PID=""
    echo "$RA" >"$RA_FILE"
    echo "  $name: $(wc -l <"$W/$name.pages") pages of the binary mapped" >&2
}
echo "workloads (about 2 min)..." >&2
run steady 20 0 ""
run fault 34 1 ""
if command -v ministack >/dev/null 2>&1; then
    MS_PORT=$(port)
    mkdir -p "$W/ms"
    (cd "$W/ms" && BIND_HOST=127.0.0.1 GATEWAY_PORT=$MS_PORT MINISTACK_HOST=127.0.0.1 \
        exec setsid ministack >"$W/ms.log" 2>&1) &
    MS=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$MS_PORT/_localstack/health" >/dev/null && break; sleep 0.2; done
    export AWS_ENDPOINT_URL=http://127.0.0.1:$MS_PORT AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test \
        AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true AWS_CONFIG_FILE=/dev/null \
        AWS_SHARED_CREDENTIALS_FILE=/dev/null
    run aws 34 1 "$(printf '[aws]\nnamespace = "PMGuard/Bench"\nlog_group = "/pmguard/bench"\ninstance_id = "bench-host"\nflush_interval = "10s"\n')"
else
    echo "  aws: skipped (ministack not on PATH); the sink's code is not listed" >&2
    : >"$W/aws.pages"
fi
python3 "$ROOT/bench/lib/hot_text.py" "$BIN" "$W/steady.pages" "$W/fault.pages" -- "$W/aws.pages" \
    >"$ROOT/agent/hot-text.txt"
