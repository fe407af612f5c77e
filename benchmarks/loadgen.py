"""
Load generator for benchmarks/run.py, in its own process: blocking sockets, one thread per
concurrent connection, everything to 127.0.0.1 and bounded by counts and socket timeouts.

    loadgen.py upload   PORT CONNS BYTES     each connection sends BYTES to a sink, checks the count
    loadgen.py download PORT CONNS BYTES     each connection asks a source for BYTES, counts them
    loadgen.py rtt      PORT WARMUP COUNT    64-byte ping-pong on one connection to an echo target
    loadgen.py connrate PORT CONCURRENCY COUNT   connect, 64-byte echo, close; COUNT times
    loadgen.py idle     PORT COUNT           opens COUNT echo tunnels and holds them (interactive)

The last stdout line is JSON: ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``. In
``idle`` mode it prints ``{"phase": ...}`` lines and waits for a stdin line after each.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
import threading
import time
from typing import Any, Callable

HOST = "127.0.0.1"
QUANTILES = 500  # at most this many round-trip times reported (evenly spaced ranks)
TIMEOUT = 30.0
BLOCK = os.urandom(256 * 1024)
MESSAGE = 64


class CheckFailed(Exception):
    pass


def connect(port: int) -> socket.socket:
    s = socket.create_connection((HOST, port), timeout=TIMEOUT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise CheckFailed(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def count_to_eof(s: socket.socket) -> int:
    buf = bytearray(len(BLOCK))
    total = 0
    while n := s.recv_into(buf):
        total += n
    return total


def message(i: int) -> bytes:
    return i.to_bytes(8, "big") * (MESSAGE // 8)


def echo_once(s: socket.socket, i: int) -> None:
    msg = message(i)
    s.sendall(msg)
    if recv_exact(s, MESSAGE) != msg:
        raise CheckFailed(f"echo {i}: reply differs from request")


def in_threads(n: int, fn: Callable[[int], None]) -> float:
    """
    Run fn(0..n-1) in n threads started together; seconds until the last one finished.
    """
    errors: list[BaseException] = []
    barrier = threading.Barrier(n + 1)

    def body(i: int) -> None:
        try:
            barrier.wait()
            fn(i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed


def read_count(s: socket.socket) -> int:
    data = b""
    while chunk := s.recv(64):
        data += chunk
    try:
        return int(data)
    except ValueError:
        raise CheckFailed(f"sink replied {data[:40]!r}")


def upload(port: int, conns: int, size: int) -> dict[str, Any]:
    def one(_: int) -> None:
        with connect(port) as s:
            view = memoryview(BLOCK)
            left = size
            while left:
                n = min(left, len(BLOCK))
                s.sendall(view[:n])
                left -= n
            s.shutdown(socket.SHUT_WR)
            reply = read_count(s)
        if reply != size:
            raise CheckFailed(f"sink counted {reply} bytes, {size} were sent")

    seconds = in_threads(conns, one)
    return {"seconds": seconds, "mb_s": conns * size / seconds / 1e6}


def download(port: int, conns: int, size: int) -> dict[str, Any]:
    def one(_: int) -> None:
        with connect(port) as s:
            s.sendall(b"%d\n" % size)
            got = count_to_eof(s)
        if got != size:
            raise CheckFailed(f"received {got} bytes from the source, expected {size}")

    seconds = in_threads(conns, one)
    return {"seconds": seconds, "mb_s": conns * size / seconds / 1e6}


def rtt(port: int, warmup: int, count: int) -> dict[str, Any]:
    samples = []
    with connect(port) as s:
        for i in range(warmup + count):
            started = time.perf_counter_ns()
            echo_once(s, i)
            if i >= warmup:
                samples.append(time.perf_counter_ns() - started)
    samples.sort()
    return {
        "p50_us": samples[len(samples) // 2] / 1e3,
        "p99_us": samples[int(0.99 * (len(samples) - 1))] / 1e3,
        "quantiles_us": quantiles(samples, QUANTILES),
    }


def quantiles(ordered: list[int], points: int) -> list[float]:
    """
    The sorted nanosecond samples at ``points`` evenly spaced ranks (first and last
    included), in µs: the distribution at a bounded size, for run.py's CDF chart.
    """
    n = len(ordered)
    if n <= points:
        ranks = range(n)
    else:
        ranks = (round(i * (n - 1) / (points - 1)) for i in range(points))
    return [round(ordered[r] / 1e3, 1) for r in ranks]


def connrate(port: int, concurrency: int, count: int) -> dict[str, Any]:
    seconds = in_threads(concurrency, lambda w: connrate_share(port, w, concurrency, count))
    return {"seconds": seconds, "per_s": count / seconds}


def connrate_share(port: int, worker: int, concurrency: int, count: int) -> None:
    for i in range(worker, count, concurrency):
        with connect(port) as s:
            echo_once(s, i)


def idle(port: int, count: int, concurrency: int = 16) -> dict[str, Any]:
    def phase(name: str, **extra: Any) -> None:
        print(json.dumps({"phase": name, **extra}), flush=True)
        if not sys.stdin.readline():
            raise CheckFailed("stdin closed")

    # Warm-up: the HTTP/2 connection exists and the code paths ran before the baseline.
    in_threads(concurrency, lambda w: connrate_share(port, w, concurrency, 4 * concurrency))
    phase("warm")
    shares: list[list[socket.socket]] = [[] for _ in range(concurrency)]

    def open_share(worker: int) -> None:
        for i in range(worker, count, concurrency):
            s = connect(port)
            shares[worker].append(s)
            echo_once(s, i)

    try:
        seconds = in_threads(concurrency, open_share)
        phase("open", seconds=seconds)
        # Every tunnel must still be alive after the measurement.
        for i, s in enumerate(s for share in shares for s in share):
            echo_once(s, i)
    finally:
        for share in shares:
            for s in share:
                s.close()
    return {"tunnels": count, "open_seconds": seconds}


MODES: dict[str, Callable[..., dict[str, Any]]] = {
    "upload": upload,
    "download": download,
    "rtt": rtt,
    "connrate": connrate,
    "idle": idle,
}


def main(argv: list[str]) -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    mode, *args = argv
    try:
        result = {"ok": True, **MODES[mode](*map(int, args))}
    except (CheckFailed, OSError) as e:
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
