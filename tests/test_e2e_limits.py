"""
Connection limits from the YAML with a real ``twistd hbone-server --config``: the
``connection_limit`` network filter (per filter chain) and the overload manager's
``global_downstream_max_connections`` resource monitor.  Past a limit the extra connection is
closed without a byte reaching the target, and the connections already open keep carrying
hashed bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support import (
    LISTENER_RE,
    StreamClient,
    Target,
    TwistdProcess,
    connect_tcp,
    e2e,
    pseudorandom,
    sha256,
    start_echo,
    start_twistd,
)
from tests.test_e2e_tunnel import E2ETestCase

TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
LIMIT = "type.googleapis.com/envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit"
MONITOR = ("type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3."
           "DownstreamConnectionsConfig")


def listener(name: str, limit: int | None) -> str:
    limit_filter = "" if limit is None else f"""\
      - name: envoy.filters.network.connection_limit
        typed_config:
          "@type": {LIMIT}
          stat_prefix: {name}_limit
          max_connections: {limit}
"""
    return f"""\
  - name: {name}
    address:
      socket_address: {{address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
{limit_filter}      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": {TCP_PROXY}
          stat_prefix: {name}
          cluster: echo
"""


def config(echo_port: int, listeners: str, extra: str = "") -> str:
    return extra + f"""\
static_resources:
  listeners:
{listeners}  clusters:
  - name: echo
    connect_timeout: 2s
    load_assignment:
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: {echo_port}}}
"""


class LimitTests(E2ETestCase):
    timeout = 60

    async def start(self, text: str, listeners: int) -> tuple[TwistdProcess, dict[str, int]]:
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir()
        path = workdir / "limits.yaml"
        path.write_text(text)
        server = await start_twistd(self, "hbone-server", ["--config", str(path)],
                                    listeners=listeners, name="limits")
        ports = {m["name"]: int(m["port"]) for m in server.matches(LISTENER_RE)}
        return server, ports

    async def echoed(self, port: int, seed: int) -> StreamClient:
        """A connection through the proxy whose first 100 kB came back intact."""
        client = StreamClient()
        await connect_tcp(port, client)
        self.addCleanup(lambda: client.transport.abortConnection()
                        if client.reason is None else None)
        await self.round_trip(client, seed)
        return client

    async def round_trip(self, client: StreamClient, seed: int) -> None:
        payload = pseudorandom(100_000, seed=seed)
        start = client.nbytes
        self.assertTrue(await client.send(payload))
        await client.wait_received(start + len(payload))
        self.assertEqual(sha256(client.data[start:]), sha256(payload))

    async def refused(self, port: int, echo: Target) -> StreamClient:
        """A connection closed by the proxy: nothing echoed, no new target connection."""
        made = echo.connections_made
        client = StreamClient()
        await connect_tcp(port, client)
        client.transport.write(b"must not reach the target")
        await client.done
        self.assertEqual(client.data, b"")
        self.assertEqual(echo.connections_made, made)
        return client

    async def admitted_again(self, port: int, seed: int) -> None:
        """A freed slot is usable again (the proxy notices the close a moment later)."""
        for attempt in range(50):
            client = StreamClient()
            await connect_tcp(port, client)
            payload = pseudorandom(1000, seed=seed + attempt)
            client.transport.write(payload)
            try:
                await client.wait_until(lambda c: c.nbytes >= 1000 or c.eof,
                                        "the echo or the close")
            except AssertionError:  # refused at accept: the socket is closed under us
                await client.done
                continue
            if client.nbytes >= len(payload):
                self.assertEqual(client.data, payload)
                client.transport.loseConnection()
                await client.done
                return
            await client.done
        self.fail("a freed slot was never usable again")

    @e2e
    async def test_connection_limit_filter(self) -> None:
        echo = await start_echo(self)
        server, ports = await self.start(
            config(echo.port, listener("limited", 2) + listener("other", None)), 2)
        port = ports["limited"]
        first = await self.echoed(port, 1)
        second = await self.echoed(port, 2)
        await self.refused(port, echo)
        await server.wait_for(
            r"connection_limit limited_limit: connection from 127\.0\.0\.1:\d+ closed: 2 "
            r"connections active, the limit is 2 \(1 limited so far\)")
        # Another chain (listener) is not limited by this one's count.
        third = await self.echoed(ports["other"], 3)
        # The open ones are untouched and keep working.
        for client, seed in ((first, 4), (second, 5), (third, 6)):
            self.assertIsNone(client.reason)
            await self.round_trip(client, seed)
        first.transport.loseConnection()
        await first.done
        await self.admitted_again(port, 100)
        await self.round_trip(second, 7)
        self.assertEqual(server.crashes(), [])

    @e2e
    async def test_overload_manager_global_limit(self) -> None:
        echo = await start_echo(self)
        overload = f"""\
overload_manager:
  resource_monitors:
  - name: envoy.resource_monitors.global_downstream_max_connections
    typed_config:
      "@type": {MONITOR}
      max_active_downstream_connections: 3
"""
        server, ports = await self.start(
            config(echo.port, listener("a", None) + listener("b", None), overload), 2)
        open_ones: list[Any] = [await self.echoed(ports["a"], 1),
                                await self.echoed(ports["a"], 2),
                                await self.echoed(ports["b"], 3)]
        # The count is process-wide: the fourth is refused on either listener.
        await self.refused(ports["b"], echo)
        await server.wait_for(r"b: connection from 127\.0\.0\.1:\d+ refused: 3 connections "
                              r"active, the limit is 3 \(1 refused so far\)")
        await self.refused(ports["a"], echo)
        for seed, client in enumerate(open_ones, 10):
            self.assertIsNone(client.reason)
            await self.round_trip(client, seed)
        open_ones[0].transport.loseConnection()
        await open_ones[0].done
        await self.admitted_again(ports["b"], 200)
        self.assertEqual(server.crashes(), [])
