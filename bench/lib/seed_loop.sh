#!/usr/bin/env bash
# What the seed's monitor does per check, in a loop with a fixed period:
#   curl the health URL, `pm2 jlist` for the app's status and pid, `ps` for its CPU.
# The seed also ran `pm2 pid <app>` (a second node CLI) and 4 `aws cloudwatch put-metric-data`
# calls per check; this loop leaves both out, so it is a lower bound of the seed's cost.
# usage: seed_loop.sh APP_NAME HEALTH_URL [PERIOD_S]     (PM2_HOME must be set by the caller)
set -u
name=$1 url=$2 period=${3:-1}
: "${PM2_HOME:?PM2_HOME must point to a private PM2 home}"
while :; do
    start=${EPOCHREALTIME/./}
    code=$(curl -s -o /dev/null -m 5 -w '%{http_code}' "$url")
    json=$(pm2 jlist 2>/dev/null)
    status=unknown pid=0
    # One app in this PM2: the first "pid" and "status" are its own (no jq in the seed's set-up).
    [[ $json =~ \"pid\":([0-9]+) ]] && pid=${BASH_REMATCH[1]}
    [[ $json =~ \"status\":\"([a-z ]+)\" ]] && status=${BASH_REMATCH[1]}
    cpu=$(ps -p "$pid" -o %cpu= 2>/dev/null || echo -)
    echo "$(( start / 1000 )) http=$code status=$status pid=$pid cpu=${cpu// /}"
    left=$(( period * 1000000 - (${EPOCHREALTIME/./} - start) ))
    (( left > 0 )) && sleep "$(( left / 1000000 )).$(printf '%06d' $(( left % 1000000 )))"
done
