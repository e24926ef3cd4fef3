"""A PM2 test app whose forked child grows its memory, which PM2 does not see.

The parent serves GET /health (always 200) on $PORT. The child adds $STEP_MB MB every $STEP_MS ms
until $TARGET_MB MB, then holds it. When the RSS of parent and child together first exceeds
$LIMIT_MB MB (decimal), the child appends the wall-clock time in ms to $CROSS_FILE: the moment
pmguard's memory rule starts counting. The child exits when its parent does.
"""
import http.server
import os
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss(pid):
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:
        return 0


def grow(parent):
    step = int(os.environ.get("STEP_MB", "10")) * 1_000_000
    target = int(os.environ.get("TARGET_MB", "100")) * 1_000_000
    limit = int(os.environ.get("LIMIT_MB", "60")) * 1_000_000
    every = int(os.environ.get("STEP_MS", "200")) / 1000
    cross_file = os.environ.get("CROSS_FILE")
    held, crossed = [], False
    while os.getppid() == parent:
        if sum(len(b) for b in held) < target:
            held.append(bytearray(b"\x01") * step)  # written, so resident
        if not crossed and rss(parent) + rss(os.getpid()) > limit:
            crossed = True
            if cross_file:
                with open(cross_file, "a") as f:
                    f.write(f"{int(time.time() * 1000)}\n")
        time.sleep(every)


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main():
    parent = os.getpid()
    if os.fork() == 0:
        try:
            grow(parent)
        finally:
            os._exit(0)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Health)
    server.serve_forever()


main()
