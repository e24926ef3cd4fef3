#!/usr/bin/env python3
"""One small HTTP server answering `GET /health` with 200 "ok" on many 127.0.0.1 ports.

usage: multiport.py COUNT   binds COUNT free 127.0.0.1 ports, then prints "ready PORT..." on stdout

Stands in for the health endpoints of the scale benchmark's PM2 apps that are not node
processes (bench/compare.py explains why). Like node's http server: a connection stays open for
the next request unless the request says `Connection: close`, and closes after 5 s idle.
"""
import asyncio
import sys

OK = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n"


async def handle(reader, writer):
    try:
        while True:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
            close = b"connection: close" in head.lower()
            reply = OK if path == b"/health" else NOT_FOUND
            tail = b"connection: close\r\n\r\n" if close else b"\r\n"
            writer.write(reply + tail + (b"ok" if path == b"/health" else b""))
            await writer.drain()
            if close:
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
            ConnectionError):
        pass
    finally:
        writer.close()


async def main(count):
    servers = [await asyncio.start_server(handle, "127.0.0.1", 0, backlog=128) for _ in range(count)]
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    print("ready", *ports, flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
