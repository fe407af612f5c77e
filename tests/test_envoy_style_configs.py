"""
Configurations in the shapes of Envoy's own tunneling examples (tests/configs/envoy-style/,
written for hbonex; each names the Envoy example it follows): they load with only the
documented no-effect warnings, and the loopback pairs run end to end with real ``twistd
hbone-server --config`` processes, every byte hashed.

The files use Envoy's example ports (200xx, the service at 20100); each test replaces them with
free ports (the service port with its echo server's) in a copy.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from twisted.trial import unittest

from hbonex.config import load_config
from tests.support import (
    StreamClient,
    connect_tcp,
    e2e,
    exchange,
    pseudorandom,
    sha256,
    start_echo,
    start_twistd,
    unused_port,
)
from tests.test_e2e_tunnel import E2ETestCase

CONFIGS = Path(__file__).resolve().parent / "configs" / "envoy-style"
MiB = 1024 * 1024
SERVICE_PORT = 20100

#: File -> the Envoy example it follows, and the warnings (paths) it is allowed.
EXPECTED: dict[str, tuple[str, list[str]]] = {
    "h1-connect-encap.yaml": ("encapsulate_in_http1_connect.yaml",
                              ["static_resources.clusters[0].dns_lookup_family"]),
    "h1-connect-terminate.yaml": ("terminate_http1_connect.yaml", [
        "static_resources.listeners[0].filter_chains[0].filters[0].typed_config."
        "http_protocol_options", "static_resources.clusters[0].dns_lookup_family"]),
    "h2-connect-encap.yaml": ("encapsulate_in_http2_connect.yaml", []),
    "h2-connect-terminate.yaml": ("terminate_http2_connect.yaml",
                                  ["static_resources.clusters[0].dns_lookup_family"]),
    "h2-post-encap.yaml": ("encapsulate_in_http2_post.yaml", []),
    "h2-post-terminate.yaml": ("encapsulate_in_http2_post.yaml",
                               ["static_resources.clusters[0].dns_lookup_family"]),
    "proxy-connect.yaml": ("proxy_connect.yaml", []),
    "internal-listener-relay.yaml": ("internal_listener_proxy.yaml", []),
}


class LoadTests(unittest.TestCase):
    def test_every_file_is_listed(self) -> None:
        self.assertEqual(sorted(p.name for p in CONFIGS.glob("*.yaml")), sorted(EXPECTED))

    def test_all_load_with_only_the_documented_warnings(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        for name, (example, warnings) in EXPECTED.items():
            text = (CONFIGS / name).read_text()
            self.assertIn(f"configs/{example}", text.split("\nadmin:")[0], name)
            loaded = load_config(CONFIGS / name, MemoryReactorClock())
            self.assertEqual([p for p, _ in loaded.warnings], warnings, name)

    def test_each_example_is_covered(self) -> None:
        examples = {example for example, _ in EXPECTED.values()}
        self.assertEqual(examples, {
            "encapsulate_in_http1_connect.yaml", "encapsulate_in_http2_connect.yaml",
            "encapsulate_in_http2_post.yaml", "terminate_http1_connect.yaml",
            "terminate_http2_connect.yaml", "proxy_connect.yaml",
            "internal_listener_proxy.yaml"})


class EnvoyStyleE2ETests(E2ETestCase):
    timeout = 90

    async def ports_for(self, *names: str) -> dict[int, int]:
        """A free port for each example port found in ``names``; the service gets the echo."""
        found: set[int] = set()
        for name in names:
            found.update(int(p) for p in re.findall(r"port_value: (\d+)",
                                                     (CONFIGS / name).read_text()))
        echo = await start_echo(self)
        mapping = {SERVICE_PORT: echo.port}
        for port in sorted(found - {SERVICE_PORT}):
            mapping[port] = await unused_port(self)
        return mapping

    async def launch(self, name: str, mapping: dict[int, int], listeners: int = 1) -> Any:
        text = re.sub(r"port_value: (\d+)", lambda m: f"port_value: {mapping[int(m[1])]}",
                      (CONFIGS / name).read_text())
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir()
        path = workdir / name
        path.write_text(text)
        return await start_twistd(self, "hbone-server", ["--config", str(path)],
                                  listeners=listeners, name=name)

    async def check_echo(self, port: int, seed: int, *procs: Any) -> None:
        payload = pseudorandom(4 * MiB + 7, seed=seed)
        client = await exchange(port, payload, keep=False)
        self.assertEqual(client.nbytes, len(payload))
        self.assertEqual(client.hexdigest, sha256(payload))
        for proc in procs:
            self.assertEqual(proc.crashes(), [])

    async def pair(self, encap: str, terminate: str, front: int, seed: int) -> None:
        mapping = await self.ports_for(encap, terminate)
        back = await self.launch(terminate, mapping)
        fore = await self.launch(encap, mapping)
        await self.check_echo(mapping[front], seed, back, fore)

    @e2e
    async def test_http1_connect_pair(self) -> None:
        await self.pair("h1-connect-encap.yaml", "h1-connect-terminate.yaml", 20000, 1)

    @e2e
    async def test_http2_connect_pair(self) -> None:
        await self.pair("h2-connect-encap.yaml", "h2-connect-terminate.yaml", 20010, 2)

    @e2e
    async def test_http2_post_pair(self) -> None:
        await self.pair("h2-post-encap.yaml", "h2-post-terminate.yaml", 20020, 3)

    @e2e
    async def test_internal_listener_relay(self) -> None:
        mapping = await self.ports_for("internal-listener-relay.yaml")
        proc = await self.launch("internal-listener-relay.yaml", mapping)
        await self.check_echo(mapping[20040], 4, proc)

    @e2e
    async def test_proxy_connect(self) -> None:
        mapping = await self.ports_for("proxy-connect.yaml")
        proc = await self.launch("proxy-connect.yaml", mapping)
        client = StreamClient()
        await connect_tcp(mapping[20031], client)
        client.transport.write(b"CONNECT echo.internal:7 HTTP/1.1\r\nHost: echo.internal:7\r\n\r\n")
        await client.wait_contains(b"\r\n\r\n")
        head, _, rest = client.data.partition(b"\r\n\r\n")
        self.assertRegex(head.decode("latin-1"), r"^HTTP/1\.1 200 ")
        self.assertEqual(rest, b"")
        payload = pseudorandom(MiB + 3, seed=5)
        start = client.nbytes
        self.assertTrue(await client.send(payload))
        await client.wait_received(start + len(payload))
        self.assertEqual(sha256(client.data[start:]), sha256(payload))
        client.transport.loseConnection()
        await client.done
        self.assertEqual(proc.crashes(), [])
