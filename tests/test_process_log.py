"""
The process log: ``--log-format json`` (one JSON object per line) and per-namespace levels set at
run time through the admin's ``POST /logging``.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

from twisted.internet import reactor
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from hbonex.observability import process_log
from tests.support import exchange, gather, pseudorandom, start_echo
from tests.test_e2e_tunnel import E2ETestCase


class JSONLinesTests(unittest.TestCase):
    def setUp(self) -> None:
        self.out = io.StringIO()
        self.control = process_log.LogControl()
        self.publisher = LogPublisher(
            process_log.make_observer("json", self.out, self.control))

    def records(self) -> list[dict[str, Any]]:
        lines = self.out.getvalue().splitlines()
        return [json.loads(line) for line in lines]

    def test_fields_and_message(self) -> None:
        log = Logger(namespace="hbonex.tunnel.server.Tunnels", observer=self.publisher)
        log.info("tunnel to {target}: {up} bytes up", target="10.0.0.1:80", up=42,
                 peer=object())
        [record] = self.records()
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["namespace"], "hbonex.tunnel.server.Tunnels")
        self.assertEqual(record["message"], "tunnel to 10.0.0.1:80: 42 bytes up")
        self.assertEqual((record["target"], record["up"]), ("10.0.0.1:80", 42))
        self.assertNotIn("peer", record)  # not JSON: only in the message, if formatted
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

    def test_failure_carries_traceback(self) -> None:
        log = Logger(namespace="hbonex.x", observer=self.publisher)
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            log.failure("while relaying", Failure())
        [record] = self.records()
        self.assertEqual(record["level"], "critical")
        self.assertIn("division by zero", record["error"])
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_levels_per_namespace(self) -> None:
        quiet = Logger(namespace="hbonex.network.listener.ListenerConnection",
                       observer=self.publisher)
        other = Logger(namespace="hbonex.upstream.tunnel_pool.H2Pool", observer=self.publisher)
        self.control.set_level(LogLevel.warn, "hbonex.network.listener")
        quiet.info("dropped")
        quiet.warn("kept warn")
        other.info("kept info")
        self.control.set_level(LogLevel.debug)
        other.debug("kept debug")
        quiet.info("kept: a level for every namespace replaces the namespace's own")
        self.assertEqual([r["message"] for r in self.records()],
                         ["kept warn", "kept info", "kept debug",
                          "kept: a level for every namespace replaces the namespace's own"])

    def test_a_broken_stream_is_not_fatal(self) -> None:
        out = io.StringIO()
        out.close()
        observer = process_log.JSONLineObserver(out)
        observer({"log_format": "x", "log_level": LogLevel.info})  # no exception


async def closed_tunnels(agent: Any, port: str, count: int) -> None:
    """Poll the admin's stats (bounded) until the server counted ``count`` closed tunnels."""
    from twisted.internet import task
    from twisted.web.client import readBody

    url = f"http://127.0.0.1:{port}/stats/prometheus".encode()
    text = b""
    for _ in range(200):
        response = await agent.request(b"GET", url)
        text = await readBody(response)
        if sum(float(n) for n in re.findall(
                rb"^istio_tcp_connections_closed_total\{.*\} ([\d.]+)$", text, re.M)) >= count:
            return
        await task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"never {count} closed tunnels: {text!r}")


class JSONProcessLogTests(E2ETestCase):
    async def test_twistd_writes_json_lines_and_levels_change_at_run_time(self) -> None:
        from twisted.web.client import Agent, readBody

        echo, server = await gather([start_echo(self), self.start_server(
            "--log-format", "json", "--admin", "127.0.0.1:0")])
        [m] = await server.wait_for_count(
            r"admin listening on 127\.0\.0\.1:(?P<port>\d+)", 1)
        client = await self.start_client(server, [echo.port])
        payload = pseudorandom(10_000, seed=7)
        c = await exchange(self.forward_port(client), payload)
        self.assert_echoed(c, payload)
        await server.wait_for(r"tunnel from .* closed after")

        def records(start: int = 0) -> list[dict[str, Any]]:
            return [json.loads(line) for line in server.lines[start:]]

        # Every line is one JSON object; the tunnel's own fields are there as values.
        [closed] = [r for r in records() if "closed after" in r["message"]]
        self.assertTrue(closed["namespace"].startswith("hbonex.tunnel.server"))
        self.assertEqual((closed["up"], closed["down"]), (10_000, 10_000))
        self.assertEqual(closed["identity"], "spiffe://cluster.local/ns/default/sa/client")
        # Quieten the tunnel server only: its info lines stop, the rest still log.
        agent = Agent(reactor)
        mark = server.mark()
        url = (f"http://127.0.0.1:{m['port']}/logging?paths=hbonex.tunnel.server:warn")
        response = await agent.request(b"POST", url.encode())
        self.assertEqual((response.code, await readBody(response)),
                         (200, b"hbonex.tunnel.server: warn\n"))
        c = await exchange(self.forward_port(client), payload)
        self.assert_echoed(c, payload)
        # The closed-connection counter moves right after the tunnel's (suppressed) line.
        await closed_tunnels(agent, m["port"], 2)
        response = await agent.request(
            b"POST", f"http://127.0.0.1:{m['port']}/logging?level=info".encode())
        await readBody(response)
        await server.wait_for(r"log level set to info for every namespace", start=mark + 1)
        messages = [r["message"] for r in records(mark)]
        self.assertFalse([t for t in messages if "closed after" in t], messages)
        # And back at info, the next tunnel is logged again.
        c = await exchange(self.forward_port(client), payload)
        self.assert_echoed(c, payload)
        await server.wait_for(r"tunnel from .* closed after", start=mark)
        # Admin requests (the stats polled above) are not process log lines.
        self.assertFalse([r for r in records() if "/stats/prometheus" in r["message"]])


class TextLineObserverTests(unittest.TestCase):
    def test_same_lines_as_twisted_text_observer(self) -> None:
        """
        The fast text observer writes exactly what twisted.logger's textFileLogObserver
        writes: one-field messages (its fast path), other formats, failures, log_system.
        """
        from twisted.logger import textFileLogObserver

        theirs, ours = io.StringIO(), io.StringIO()
        publisher = LogPublisher(textFileLogObserver(theirs),
                                 process_log.TextLineObserver(ours))
        log = Logger(namespace="hbonex.tunnel", observer=publisher)
        log.info("{tunnel}", tunnel="tunnel from 1.2.3.4:5 (-) to x:1 closed\nsecond line")
        log.warn("{conn}: bad stream {sid}", conn="h2 from 1.2.3.4:5", sid=3)
        log.info("{tunnel}", tunnel=5)  # not a string: the general path
        log.debug("{a}", a="non-ASCII é")
        try:
            raise ValueError("broken")
        except ValueError:
            log.failure("failed {x}", x=1)
        publisher({"log_format": "{a}", "a": "legacy", "log_system": "sys", "log_time": 1.5})
        self.assertEqual(ours.getvalue(), theirs.getvalue())
        self.assertEqual(len(ours.getvalue().splitlines()[0].split(" ", 2)), 3)
        self.assertIn("ValueError: broken", ours.getvalue())
