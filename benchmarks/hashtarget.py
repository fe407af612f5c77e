"""
Targets for benchmarks/faults.py and benchmarks/soak.py, in their own process (asyncio and the
stdlib only), on 127.0.0.1; every byte is hashed here as well as at the client:

* duplex: reads one line ``N SEED\\n``, then sends N bytes of the stream ``chunks(SEED, N)``
  while it reads (and hashes) everything the client sends until EOF; once both are done it
  sends the trailer ``SENT_SHA256 RECEIVED_SHA256 RECEIVED_BYTES\\n`` and closes. A client that
  sends nothing and half-closes at once makes it a pure source; the client compares the
  trailer with its own hashes, so both directions are verified at both ends.
* echo: echoes everything; closes on EOF.
* http: HTTP/1.1 with keep-alive (http.server in a thread): ``GET /bytes/N/SEED`` answers
  ``chunks(SEED, N)`` with ``x-sha256``; ``POST /echo`` answers the body with ``x-sha256`` of
  what arrived.

Prints one JSON line ``{"ready": true, "duplex": PORT, "echo": PORT, "http": PORT}`` and exits
when its stdin reaches EOF (spawn it with stdin=PIPE).
"""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import random
import resource
import sys
import threading
from collections.abc import Iterator

CHUNK = 256 * 1024
#: The bytes every stream is cut from: a stream is a sequence of CHUNK-sized slices at offsets
#: that depend on its seed and the slice's index, so streams differ, and a lost, repeated or
#: reordered slice changes the hash.
POOL = random.Random(20261205).randbytes(8 * 1024 * 1024 + 4099)


def chunks(seed: int, size: int, chunk: int = CHUNK) -> Iterator[memoryview]:
    """``size`` deterministic bytes for ``seed``, as memoryviews of at most ``chunk`` bytes."""
    view = memoryview(POOL)
    span = len(POOL) - chunk
    k = 0
    left = size
    while left > 0:
        n = min(left, chunk)
        start = (seed * 2654435761 + k * 40503) % span
        yield view[start:start + n]
        left -= n
        k += 1


def stream_sha256(seed: int, size: int) -> str:
    h = hashlib.sha256()
    for c in chunks(seed, size):
        h.update(c)
    return h.hexdigest()


async def duplex(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readline()
        size, seed = map(int, head.split())
        sent = hashlib.sha256()

        async def send() -> None:
            for c in chunks(seed, size):
                sent.update(c)
                writer.write(c)
                await writer.drain()

        sender = asyncio.ensure_future(send())
        got = hashlib.sha256()
        count = 0
        while data := await reader.read(CHUNK):
            got.update(data)
            count += len(data)
        await sender
        writer.write(b"%s %s %d\n" % (sent.hexdigest().encode(), got.hexdigest().encode(),
                                       count))
        await writer.drain()
    except (OSError, ValueError, asyncio.IncompleteReadError):
        writer.transport.abort()
        return
    writer.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        writer.transport.abort()
        return
    writer.close()


class HttpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        parts = self.path.strip("/").split("/")
        if len(parts) != 3 or parts[0] != "bytes":
            self.send_error(404)
            return
        size, seed = int(parts[1]), int(parts[2])
        self.send_response(200)
        self.send_header("content-type", "application/octet-stream")
        self.send_header("content-length", str(size))
        self.send_header("x-sha256", stream_sha256(seed, size))
        self.end_headers()
        for c in chunks(seed, size):
            self.wfile.write(c)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(200)
        self.send_header("content-type", "application/octet-stream")
        self.send_header("content-length", str(len(body)))
        self.send_header("x-sha256", hashlib.sha256(body).hexdigest())
        self.end_headers()
        self.wfile.write(body)


class HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024


async def main() -> None:
    loop = asyncio.get_running_loop()
    ports = {}
    for name, handler in (("duplex", duplex), ("echo", echo)):
        server = await asyncio.start_server(handler, "127.0.0.1", 0, backlog=4096,
                                            limit=CHUNK)
        ports[name] = server.sockets[0].getsockname()[1]
    web = HttpServer(("127.0.0.1", 0), HttpHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    ports["http"] = web.server_address[1]
    stdin_closed = asyncio.Event()
    threading.Thread(
        target=lambda: (sys.stdin.buffer.read(), loop.call_soon_threadsafe(stdin_closed.set)),
        daemon=True,
    ).start()
    print(json.dumps({"ready": True, **ports}), flush=True)
    await stdin_closed.wait()
    web.shutdown()


if __name__ == "__main__":
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main())
