#!/bin/sh
# monit's start/stop/restart program: runs `pm2 ACTION APP` against a private PM2 home and logs
# epoch-ms timestamps around it (monit's own log has 1 s resolution).
# usage: pm2_action.sh PM2_HOME PM2_BIN MARKER_FILE ACTION APP
PM2_HOME=$1; export PM2_HOME
PATH="$(dirname "$2"):$PATH"; export PATH
echo "$(date +%s%3N) $4 begin" >> "$3"
"$2" "$4" "$5" >/dev/null 2>&1
rc=$?
echo "$(date +%s%3N) $4 end rc=$rc" >> "$3"
exit $rc
