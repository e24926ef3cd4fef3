#!/usr/bin/env python3
"""A local webhook receiver for pmguard's notify tests (127.0.0.1 only).

Usage: webhook_receiver.py PORT RECORD_FILE [STATUS]
Every POST is answered with the current status (default 200) and recorded as one JSON line in
RECORD_FILE: {"path", "status", "body"} (body parsed as JSON when it is JSON). GET /_status/<code>
changes the status for later requests (500 to fail, 200 to recover). Stop it to be "down".
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

PORT = int(sys.argv[1])
RECORD = sys.argv[2]
STATE = {"status": int(sys.argv[3]) if len(sys.argv) > 3 else 200}


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n)
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        status = STATE["status"]
        with open(RECORD, "a") as f:
            f.write(json.dumps({"path": self.path, "status": status, "body": body}) + "\n")
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def do_GET(self):
        if self.path.startswith("/_status/"):
            STATE["status"] = int(self.path[len("/_status/"):])
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
