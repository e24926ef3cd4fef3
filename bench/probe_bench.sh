#!/usr/bin/env bash
# Probe cost: the agent's poll(2) state machine vs hyper (what reqwest wraps) on a tokio runtime.
# Usage (from anywhere): bench/probe_bench.sh      # APPS=100 SECS=30 REPS=3 by default
# Starts two Python servers on 127.0.0.1 (plain HTTP and HTTPS with a certificate from a test CA
# made here by openssl), builds examples/probe_bench_{poll,hyper} in release mode (stripped, as
# the agent ships), runs each design against each server for SECS seconds with APPS apps probed
# once a second, and prints one key=value line per run plus the binaries' sizes. Only 127.0.0.1
# is contacted; everything lives in a mktemp -d directory removed at the end.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
APPS=${APPS:-100}
SECS=${SECS:-30}
REPS=${REPS:-3}
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

cd "$WORK"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem \
    -days 30 -subj "/CN=bench CA" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout leaf.key -out leaf.csr \
    -subj "/CN=127.0.0.1" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\n' > ext.cnf
openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out leaf.pem -days 30 \
    -extfile ext.cnf 2>/dev/null

cat > server.py <<'PY'
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b'{"status":"healthy"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer.request_queue_size = 512
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
if len(sys.argv) > 1:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[1], sys.argv[2])
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
PY
# The servers' stderr is dropped: a client closing at the end of a run is not news.
python3 server.py > http.port 2>/dev/null & PIDS+=($!)
python3 server.py leaf.pem leaf.key > https.port 2>/dev/null & PIDS+=($!)
for f in http.port https.port; do
    for _ in $(seq 50); do [ -s "$f" ] && break; sleep 0.1; done
done
HTTP_URL="http://127.0.0.1:$(cat http.port)/health"
HTTPS_URL="https://127.0.0.1:$(cat https.port)/health"

cargo build --quiet --release -p pmguard-agent --manifest-path "$ROOT/Cargo.toml" \
    --example probe_bench_poll --example probe_bench_hyper --bin pmguard-agent
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"

for rep in $(seq "$REPS"); do
    for url in "$HTTP_URL" "$HTTPS_URL"; do
        for design in poll hyper; do
            printf 'rep %s: ' "$rep"
            "$BIN/examples/probe_bench_$design" "$url" "$APPS" "$SECS" "$WORK/ca.pem"
        done
    done
done
for b in examples/probe_bench_poll examples/probe_bench_hyper pmguard-agent; do
    printf 'size %s bytes=%s\n' "$b" "$(stat -c %s "$BIN/$b")"
done
