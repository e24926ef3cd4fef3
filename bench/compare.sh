#!/usr/bin/env bash
# pmguard vs monit 5.33 vs the seed's bash loop, side by side in one run on this machine.
# Usage (from anywhere; ~17 min with the defaults on 2 cores, ~20 with the CloudWatch row):
#   bench/compare.sh                     # whole table, summary (markdown) on stdout, raw lines on stderr
#   REPS=1 DURATION=10 SCALE_DURATION=5 DETECT_REPS=1 bench/compare.sh    # quick look (~3 min)
# Knobs: REPS (3), DURATION (60 s footprint window), SCALE_DURATION (15 s) / SCALE_SETTLE (3 s),
#   SCALE_COUNTS ("1 10 100"), SCALE_REAL (10 node apps), DETECT_REPS (=REPS),
#   FAULTS ("sigstop 500 spin crash"), SECTIONS ("footprint scale detect cost"), SKIP_BASH=1
#   (leave the seed's bash loop out of the footprint: 30 % of a core that disturbs the others),
#   AGENT (use this pmguard-agent binary instead of building one; AGENT_LABEL names it in the
#   report), KEEP_WORK=1 (keep the private directory), BENCH_AWS_SECTION (the [aws] block to try
#   first for the CloudWatch row, which runs only if `pmguard-agent validate` accepts an [aws]
#   section and `ministack` is on PATH; otherwise it prints "not measured").
# Installs monit from Debian packages if missing (apt-get; needs root). Builds pmguard-agent in
# release mode (CARGO_TARGET_DIR honoured). Everything runs under one private mktemp -d directory
# with its own PM2_HOME; the PM2 daemon, monit, agents and helpers it starts are stopped at the end.
# Only 127.0.0.1 is contacted. Not part of the test suite.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

if ! command -v monit >/dev/null 2>&1; then
    echo "Installing monit from Debian packages..." >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y monit >/dev/null
fi
command -v pm2 >/dev/null 2>&1 || { echo "pm2 is not on PATH (npm install -g pm2@7.0.4)" >&2; exit 2; }
command -v curl >/dev/null 2>&1 || { echo "curl is needed for the bash loop" >&2; exit 2; }

if [[ -z "${AGENT:-}" ]]; then
    PMGUARD_HOT_TEXT=1 cargo build --quiet --release -p pmguard-agent --manifest-path "$ROOT/Cargo.toml"
    AGENT="${CARGO_TARGET_DIR:-$ROOT/target}/release/pmguard-agent"
fi
export AGENT
exec python3 "$ROOT/bench/compare.py"
