#!/usr/bin/env bash
# Cost of one PM2 status check: `pm2 jlist` (what the old script ran) vs. pmguard's native client.
# Starts a private PM2 daemon (mktemp -d PM2_HOME) with 3 copies of the test app, then, 5 times:
#   (a) `pm2 jlist` x 10      -> CPU per call (getrusage of children), peak RSS of the largest child
#   (b) pm2_bench client 1000 -> CPU per call (getrusage self), peak RSS
# and prints medians. Daemon-side CPU per call is read from /proc/<daemon>/stat in both cases.
# Kills the daemon at the end. Usage: bench/pm2_client.sh   (from the repository root)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
REPS=${REPS:-5}
JLIST_N=${JLIST_N:-10}
CLIENT_N=${CLIENT_N:-1000}
PM2=${PMGUARD_TEST_PM2:-pm2}

cargo build --quiet --release -p pmguard-agent --example pm2_bench --manifest-path "$ROOT/Cargo.toml"
BENCH="${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/pm2_bench"

PM2_HOME=$(mktemp -d)
export PM2_HOME
unset PM2_DAEMON_RPC_PORT PM2_DAEMON_PUB_PORT
cleanup() {
    "$PM2" kill >/dev/null 2>&1 || true
    rm -rf "$PM2_HOME"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
for i in 1 2 3; do
    PORT=$(free_port) "$PM2" start "$ROOT/agent/tests/apps/app.js" --name "app$i" >/dev/null
done
sleep 2 # let the apps settle (this is a benchmark, not a test)

field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p"; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

declare -a J_CPU J_RSS J_DMN C_CPU C_RSS C_DMN C_WALL
for r in $(seq "$REPS"); do
    j=$("$BENCH" jlist "$JLIST_N")
    c=$("$BENCH" client "$CLIENT_N")
    J_CPU+=("$(echo "$j" | field cpu_us_per_call)"); J_RSS+=("$(echo "$j" | field peak_rss_kib)")
    J_DMN+=("$(echo "$j" | field daemon_cpu_us_per_call)")
    C_CPU+=("$(echo "$c" | field cpu_us_per_call)"); C_RSS+=("$(echo "$c" | field peak_rss_kib)")
    C_DMN+=("$(echo "$c" | field daemon_cpu_us_per_call)"); C_WALL+=("$(echo "$c" | field wall_us_per_call)")
    echo "rep $r: $j" >&2
    echo "rep $r: $c" >&2
done
med() { printf '%s\n' "$@" | median; }
jc=$(med "${J_CPU[@]}"); jr=$(med "${J_RSS[@]}"); jd=$(med "${J_DMN[@]}")
cc=$(med "${C_CPU[@]}"); cr=$(med "${C_RSS[@]}"); cd_=$(med "${C_DMN[@]}"); cw=$(med "${C_WALL[@]}")

echo
echo "machine: $(nproc) cpus, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1), kernel $(uname -r)"
echo "medians of $REPS repetitions; 3 apps; pm2 $("$PM2" --version | tail -1)"
printf '%-28s %16s %16s %14s %10s\n' "per status check" "client CPU (us)" "daemon CPU (us)" "peak RSS (MiB)" "processes"
printf '%-28s %16.0f %16.0f %14.1f %10s\n' "pm2 jlist (x$JLIST_N)" "$jc" "$jd" "$(echo "$jr/1024" | bc -l)" "1 per call"
printf '%-28s %16.1f %16.0f %14.1f %10s\n' "native client list (x$CLIENT_N)" "$cc" "$cd_" "$(echo "$cr/1024" | bc -l)" "0"
echo "native client wall per call: ${cw} us"
printf 'ratio, client CPU only:      %.0fx less\n' "$(echo "$jc/$cc" | bc -l)"
printf 'ratio, client + daemon CPU:  %.0fx less\n' "$(echo "($jc+$jd)/($cc+$cd_)" | bc -l)"
