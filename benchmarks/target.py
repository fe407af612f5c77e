"""
Benchmark targets, in their own process (asyncio, stdlib only), on 127.0.0.1:

* sink:   reads to EOF, then replies with the byte count (ASCII, newline) and closes;
* source: reads one line "N\\n", sends N bytes, closes;
* echo:   echoes everything; closes on EOF.

Prints one JSON line ``{"ready": true, "sink": PORT, "source": PORT, "echo": PORT}`` and exits
when its stdin reaches EOF (spawn it with stdin=PIPE).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import threading

BLOCK = os.urandom(256 * 1024)


class Sink(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.count = 0

    def data_received(self, data: bytes) -> None:
        self.count += len(data)

    def eof_received(self) -> bool:
        self.transport.write(b"%d\n" % self.count)  # type: ignore[attr-defined]
        self.transport.close()
        return True


class Source(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=1024 * 1024)  # type: ignore[attr-defined]
        self.request = b""
        self.left = -1
        self.paused = False

    def data_received(self, data: bytes) -> None:
        if self.left >= 0:
            return
        self.request += data
        if b"\n" in self.request:
            self.left = int(self.request.split(b"\n", 1)[0])
            self.pump()

    def eof_received(self) -> bool:
        return True  # a half-closed client still gets its bytes

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.pump()

    def pump(self) -> None:
        while self.left > 0 and not self.paused:
            n = min(self.left, len(BLOCK))
            self.transport.write(BLOCK if n == len(BLOCK) else BLOCK[:n])  # type: ignore[attr-defined]
            self.left -= n
        if self.left == 0:
            self.left = -2
            self.transport.close()


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        return False  # close


async def main() -> None:
    loop = asyncio.get_running_loop()
    ports = {}
    for name, proto in (("sink", Sink), ("source", Source), ("echo", Echo)):
        server = await loop.create_server(proto, "127.0.0.1", 0, backlog=4096)
        ports[name] = server.sockets[0].getsockname()[1]
    stdin_closed = asyncio.Event()
    threading.Thread(
        target=lambda: (sys.stdin.buffer.read(), loop.call_soon_threadsafe(stdin_closed.set)),
        daemon=True,
    ).start()
    print(json.dumps({"ready": True, **ports}), flush=True)
    await stdin_closed.wait()


if __name__ == "__main__":
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main())
