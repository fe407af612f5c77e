"""
Certificate rotation with real processes: the server's leaf and its CA bundle change under
steady load (HTTP/1.1 tunnels, one handshake each, and HTTP/2 tunnels over a pooled
connection); no tunnel fails, new handshakes show the new serial, the new bundle is in force.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from hbonex.tls import pki
from tests.support import (
    RawH2Client,
    RawTLSClient,
    StreamClient,
    connect_tcp,
    connect_tls,
    e2e,
    exchange,
    make_pki,
    pseudorandom,
    sha256,
    start_echo,
    start_twistd,
    wait_until,
)


def serial_of(path: Path) -> int:
    return pki._parse_certs(path, path.read_bytes())[0].serial_number


class RotationTests(unittest.TestCase):
    timeout = 60

    async def peer_serial(self, port: int, ca: Path, cert: Path, key: Path) -> int:
        """A new handshake with the server: the serial of the certificate it presents."""
        h2c = RawH2Client()
        await connect_tls(port, RawTLSClient(ca, cert, key), h2c)
        await h2c.ready
        serial = h2c.transport.getPeerCertificate().get_serial_number()  # type: ignore
        await h2c.close()
        return int(serial)

    @e2e
    async def test_rotate_leaf_and_bundle_under_load(self) -> None:
        p = make_pki(self)
        bundle = Path(self.mktemp()).resolve()
        bundle.write_bytes(p.ca.read_bytes())
        echo = await start_echo(self)
        server = await start_twistd(self, "hbone-server", [
            "--listen", "127.0.0.1:0", "--pki", str(p.root / "server"), "--ca", str(bundle),
            "--cert-poll", "0.2", "--drain-timeout", "2"], name="hbone-server")
        clients = []
        for extra in (["--http1"], []):
            clients.append(await start_twistd(self, "hbone-client", [
                f"--forward=127.0.0.1:0=127.0.0.1:{echo.port}",
                "--server", f"127.0.0.1:{server.port}", *p.args("client"), *extra],
                name=f"hbone-client{' '.join(extra)}"))
        old = serial_of(p.cert("server"))
        self.assertEqual(await self.peer_serial(server.port, p.ca, p.cert("client"),
                                                p.key("client")), old)

        # A long tunnel over the pooled HTTP/2 connection, open across the rotation.
        long = StreamClient()
        await connect_tcp(clients[1].ports["forward_0"], long)
        first, second = pseudorandom(256 * 1024, 1), pseudorandom(256 * 1024, 2)
        await long.send(first)
        await long.wait_received(len(first))

        # Steady load: workers exchanging 64 KiB each through both clients until told to stop.
        done = [0]
        failures: list[str] = []
        stop = [False]

        async def worker(index: int) -> None:
            port = clients[index % 2].ports["forward_0"]
            n = 0
            while not stop[0]:
                payload = pseudorandom(64 * 1024, index * 1000 + n)
                c = await exchange(port, payload, keep=False)
                if c.nbytes != len(payload) or c.hexdigest != sha256(payload) or not c.eof:
                    failures.append(f"worker {index} exchange {n}: {c.nbytes} bytes, "
                                    f"{c.reason}")
                n += 1
                done[0] += 1

        workers = [defer.ensureDeferred(worker(i)) for i in range(6)]
        await wait_until(lambda: done[0] >= 12, "12 exchanges before the rotation")

        # Before: the other CA's client is not trusted.
        mark = server.mark()
        refused = StreamClient()
        await connect_tls(server.port, RawTLSClient(
            p.ca, p.cert("client", other_ca=True), p.key("client", other_ca=True)), refused)
        await refused.done
        await server.wait_for(r"TLS handshake from \S+ failed", start=mark)
        mark = server.mark()

        # Rotate: the bundle gains the other CA, the leaf is re-issued in place.
        before = done[0]
        pki._write_atomic(bundle, p.ca.read_bytes() + p.other_ca.read_bytes(), 0o644)
        pki.renew(p.root, "server")
        new = serial_of(p.cert("server"))
        self.assertNotEqual(new, old)
        await server.wait_for(
            rf"certificates reloaded \(changed\) .*serial {new:x} \(was [0-9a-f]+\).*"
            r"trust bundle of 2 CA\(s\)", start=mark)

        # New handshakes show the new serial; the other CA's client is accepted now.
        self.assertEqual(await self.peer_serial(server.port, p.ca, p.cert("client"),
                                                p.key("client")), new)
        self.assertEqual(await self.peer_serial(
            server.port, p.ca, p.cert("client", other_ca=True),
            p.key("client", other_ca=True)), new)

        await wait_until(lambda: done[0] >= before + 24, "24 exchanges after the rotation")
        stop[0] = True
        await defer.gatherResults(workers)
        await long.send(second)
        long.close_write()
        await long.done
        self.assertEqual(long.hexdigest, sha256(first + second))
        self.assertTrue(long.closed_cleanly, long.reason)
        self.assertEqual(failures, [])
        self.assertEqual(server.matches(r"failed: |refused", start=mark), [])
        for proc in clients:
            self.assertEqual(proc.matches(r"failed: |refused"), [], proc.output(last=40))

    @e2e
    async def test_bad_file_refused_and_expiry_warning(self) -> None:
        p = make_pki(self)
        server = await start_twistd(self, "hbone-server", [
            "--listen", "127.0.0.1:0", *p.args("server"), "--cert-poll", "0.2",
            "--cert-warn-days", "400"], name="hbone-server")
        old = serial_of(p.cert("server"))
        await server.wait_for(rf"certificate serial {old:x} .* of listener hbone expires in "
                              r"36\d\.\d days, on .* \(warning at 400 days\)")
        p.key("server").write_bytes(p.key("client").read_bytes())
        m = await server.wait_for(r"certificate reload refused \(changed\): (?P<why>.*)")
        self.assertEqual(
            m["why"], f"{p.key('server')}: private key does not match certificate "
            f"{p.cert('server')}; still using serial {old:x} (for listener hbone)")
        self.assertEqual(await self.peer_serial(
            server.port, p.ca, p.cert("client"), p.key("client")), old)
        # SIGHUP reloads at once (and refuses the same bad key again).
        mark = server.mark()
        server.signal("HUP")
        await server.wait_for(r"certificate reload refused \(SIGHUP\)", start=mark)
        self.assertEqual(len(server.matches(r"certificate reload refused")), 2)
