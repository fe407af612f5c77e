"""
Envoy's runtime flag ``envoy.reloadable_features.reject_early_connect_data`` in the YAML
(``layered_runtime`` static layer), end to end: ``hbonex config render server
--reject-early-connect-data`` writes it, a real ``twistd hbone-server --config`` with that YAML
refuses (400) HTTP/1.1 and HTTP/2 CONNECTs that send tunnel bytes before the 200, and nothing
of theirs reaches the target; the same YAML without the flag lets early data through.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

from hbonex.cli import main as cli
from tests.peers import start_recorder
from tests.support import (
    TUNNEL_REFUSED_RE,
    RawH2Client,
    RawTLSClient,
    StreamClient,
    connect_tls,
    e2e,
    response_status,
    start_twistd,
    wait_until,
)
from tests.test_e2e_tunnel import E2ETestCase

FLAG = "envoy.reloadable_features.reject_early_connect_data: true"


class EarlyDataYamlTests(E2ETestCase):
    timeout = 60

    async def start_yaml_server(self, *flags: str) -> Any:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli.main(["config", "render", "server", *self.pki.args("server"),
                             "--listen", "127.0.0.1:0", *flags])
        self.assertEqual(code, 0)
        text = out.getvalue()
        self.assertEqual(FLAG in text, "--reject-early-connect-data" in flags)
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir()
        path = workdir / "server.yaml"
        path.write_text(text)
        return await start_twistd(self, "hbone-server", ["--config", str(path)],
                                  name="hbone-server")

    def creator(self, alpn: bytes) -> RawTLSClient:
        return RawTLSClient(self.pki.ca, self.pki.cert("client"), self.pki.key("client"),
                            alpn=(alpn,))

    async def h1_connect_with_early_data(self, server: Any, port: int) -> StreamClient:
        c = StreamClient()
        await connect_tls(server.port, self.creator(b"http/1.1"), c)
        self.addCleanup(lambda: c.transport.abortConnection() if c.reason is None else None)
        # CONNECT and tunnel bytes in one write: data before the 200.
        c.transport.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\nearly bytes".encode())
        await c.wait_until(lambda c: b"\r\n\r\n" in c.data or c.reason is not None,
                           "a response")
        return c

    @e2e
    async def test_http1_early_data_refused(self) -> None:
        target = start_recorder(self)
        server = await self.start_yaml_server("--reject-early-connect-data")
        c = await self.h1_connect_with_early_data(server, target.port)
        await c.done
        self.assertRegex(c.data.decode("latin-1"), r"^HTTP/1\.1 400 ")
        m = await server.wait_for(TUNNEL_REFUSED_RE)
        self.assertEqual(m["status"], "400")
        self.assertIn("early data", m["reason"])
        # Without early data the same server tunnels, and only those bytes arrive.
        good = StreamClient()
        await connect_tls(server.port, self.creator(b"http/1.1"), good)
        good.transport.write(f"CONNECT 127.0.0.1:{target.port} HTTP/1.1\r\n\r\n".encode())
        await good.wait_contains(b"\r\n\r\n")
        self.assertRegex(good.data.decode("latin-1"), r"^HTTP/1\.1 200 ")
        good.transport.write(b"after the 200")
        await wait_until(lambda: any(bytes(t.data) == b"after the 200"
                                     for t in target.connections), "the bytes at the target")
        self.assertEqual([bytes(t.data) for t in target.connections], [b"after the 200"])
        good.transport.loseConnection()
        await good.done

    @e2e
    async def test_http1_early_data_allowed_without_the_flag(self) -> None:
        target = start_recorder(self)
        server = await self.start_yaml_server()
        c = await self.h1_connect_with_early_data(server, target.port)
        self.assertRegex(c.data.decode("latin-1"), r"^HTTP/1\.1 200 ")
        await wait_until(lambda: any(bytes(t.data) == b"early bytes"
                                     for t in target.connections), "the early bytes at the target")
        c.transport.loseConnection()
        await c.done

    @e2e
    async def test_http2_early_data_refused(self) -> None:
        target = start_recorder(self)
        server = await self.start_yaml_server("--reject-early-connect-data")
        h2c = RawH2Client()
        await connect_tls(server.port, self.creator(b"h2"), h2c)
        self.addCleanup(h2c.close)
        await h2c.ready
        authority = f"127.0.0.1:{target.port}".encode()
        sid = h2c.request([(b":method", b"CONNECT"), (b":authority", authority)])
        h2c.send(sid, b"early bytes")
        self.assertEqual(response_status(await h2c.wait_answer(sid)), 400)
        good = h2c.request([(b":method", b"CONNECT"), (b":authority", authority)])
        self.assertEqual(response_status(await h2c.wait_answer(good)), 200)
        h2c.send(good, b"after the 200")
        await wait_until(lambda: any(bytes(t.data) == b"after the 200"
                                     for t in target.connections), "the bytes at the target")
        self.assertEqual([bytes(t.data) for t in target.connections if t.data],
                         [b"after the 200"])
        m = await server.wait_for(TUNNEL_REFUSED_RE)
        self.assertEqual(m["status"], "400")
        self.assertEqual(server.crashes(), [])
