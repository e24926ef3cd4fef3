#!/usr/bin/env python3
"""One small HTTP server answering `GET /health` with 200 "ok" on many 127.0.0.1 ports.

usage: multiport.py COUNT   binds COUNT free 127.0.0.1 ports, then prints "ready PORT..." on stdout

Stands in for the health endpoints of the scale benchmark's PM2 apps that are not node
processes (bench/compare.py explains why). Connection: close, like pmguard's probe.
"""
import asyncio
import sys

OK = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


async def handle(reader, writer):
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
        writer.write(OK if path == b"/health" else NOT_FOUND)
        await writer.drain()
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
