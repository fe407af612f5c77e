"""
The listener filter phase and ``envoy.filters.listener.http_inspector`` on real bytes:
HTTP/1.0, HTTP/1.1, the h2c preface, garbage, a slow sender split across reads, the peer's
EOF, the 64 KiB bound and the timeout; listener filters run before the chain is chosen (a
restored destination picks the chain); ``filter_disabled`` skips a filter.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from hbonex.filters.listener.http_inspector import (
    H2_PREFACE,
    MAX_INSPECT_SIZE,
    HttpInspectorFilter,
    NotHttp,
    detect,
)
from hbonex.interfaces import IListenerFilter, IListenerFilterCallbacks, INetworkFilter
from hbonex.network.listener import (
    FilterChain,
    FilterChainMatch,
    InspectingProtocol,
    Listener,
    ListenerConnection,
    ListenerFilterEntry,
)
from hbonex.network.listener_predicate import DestinationPortRange
from tests.test_chain_match import client_hello

HTTP11 = b"GET /index.html HTTP/1.1\r\nHost: a\r\n\r\n"
HTTP10 = b"GET / HTTP/1.0\r\n\r\n"


class DetectTests(unittest.SynchronousTestCase):
    def test_versions(self) -> None:
        self.assertEqual(detect(HTTP11), "http/1.1")
        self.assertEqual(detect(HTTP10), "http/1.0")
        self.assertEqual(detect(b"POST /x HTTP/1.1\n"), "http/1.1")
        self.assertEqual(detect(H2_PREFACE + b"\x00\x00\x00\x04"), "h2c")
        # A request line naming HTTP/2.0 is not the preface: "another version", 1.0.
        self.assertEqual(detect(b"PRI * HTTP/2.0\r\n\r\nXX"), "http/1.0")

    def test_every_prefix_needs_more(self) -> None:
        for data in (HTTP11, H2_PREFACE):
            first_line = data.index(b"\n") if data is HTTP11 else len(data) - 1
            for cut in range(1, first_line):
                self.assertIsNone(detect(data[:cut]), data[:cut])

    def test_not_http(self) -> None:
        for data in (b"\x16\x03\x01\x02\x00", b"\r\n", b"hello world\r\n", b"GET  / HTTP/1.1\r\n",
                     b"GET / FTP/1.1\r\n", b"\x00\x01", b"GET / HTTP/1.1x", b"SSH-2.0-x\r\n"):
            self.assertRaises(NotHttp, detect, data)


@implementer(INetworkFilter)
class Recorder:
    """Records what its chain receives."""

    def __init__(self, seen: list[tuple[str, bytes]], name: str) -> None:
        self.seen = seen
        self.name = name

    def onNewConnection(self, callbacks: Any) -> bool:
        self.seen.append((self.name, b""))
        return True

    def onData(self, data: bytes, endStream: bool) -> bool:
        self.seen.append((self.name, data))
        return False

    def onClose(self, reason: object) -> None:
        pass


class Phase:
    """A listener with the given listener filters and chains (by name), driven by hand."""

    def __init__(self, chains: dict[str, FilterChainMatch],
                 filters: list[ListenerFilterEntry], timeout: float = 15.0) -> None:
        self.clock = Clock()
        self.seen: list[tuple[str, bytes]] = []

        def chain(name: str, match: FilterChainMatch) -> FilterChain:
            return FilterChain([lambda: Recorder(self.seen, name)], match=match, name=name)

        self.listener = Listener("l", self.clock, [chain(n, m) for n, m in chains.items()])
        self.listener.listener_filters = list(filters)
        self.listener.listener_filters_timeout = timeout

    def connect(self, port: int = 80) -> tuple[Any, StringTransport]:
        transport = StringTransport(IPv4Address("TCP", "10.0.0.1", port),
                                    IPv4Address("TCP", "10.0.0.9", 40000))
        protocol = self.listener.factory.buildProtocol(transport.getPeer())
        assert protocol is not None
        protocol.makeConnection(transport)
        return protocol, transport

    def chosen(self) -> list[str]:
        return [name for name, data in self.seen if not data]

    def received(self) -> bytes:
        return b"".join(data for _, data in self.seen)


def http_inspector() -> ListenerFilterEntry:
    return ListenerFilterEntry(HttpInspectorFilter, None, "envoy.filters.listener.http_inspector")


BY_PROTOCOL = {
    "h1": FilterChainMatch(application_protocols=("http/1.1", "http/1.0")),
    "h2": FilterChainMatch(application_protocols=("h2c",)),
    "raw": FilterChainMatch(),
}


class HttpInspectorPhaseTests(unittest.SynchronousTestCase):
    def test_protocols_pick_chains_and_every_byte_follows(self) -> None:
        for data, expected in ((HTTP11, "h1"), (HTTP10, "h1"), (H2_PREFACE + b"rest", "h2"),
                               (b"\x00\x01binary", "raw")):
            phase = Phase(BY_PROTOCOL, [http_inspector()])
            protocol, _ = phase.connect()
            protocol.dataReceived(data)
            self.assertEqual(phase.chosen(), [expected], data)
            self.assertEqual(phase.received(), data)

    def test_slow_sender(self) -> None:
        phase = Phase(BY_PROTOCOL, [http_inspector()])
        protocol, transport = phase.connect()
        for index in range(len(HTTP11)):
            if phase.chosen():
                break
            protocol.dataReceived(HTTP11[index:index + 1])
        # Chosen at the end of the request line, not before.
        self.assertEqual(phase.chosen(), ["h1"])
        self.assertEqual(index, HTTP11.index(b"\n") + 1)
        protocol.dataReceived(HTTP11[index:])
        self.assertEqual(phase.received(), HTTP11)
        self.assertFalse(transport.disconnecting)

    def test_preface_split_across_reads(self) -> None:
        phase = Phase(BY_PROTOCOL, [http_inspector()])
        protocol, _ = phase.connect()
        protocol.dataReceived(H2_PREFACE[:10])
        self.assertEqual(phase.chosen(), [])
        protocol.dataReceived(H2_PREFACE[10:])
        self.assertEqual(phase.chosen(), ["h2"])
        self.assertEqual(phase.received(), H2_PREFACE)

    def test_timeout_closes(self) -> None:
        phase = Phase(BY_PROTOCOL, [http_inspector()], timeout=3)
        protocol, transport = phase.connect()
        protocol.dataReceived(b"GET /slow")
        phase.clock.advance(2.9)
        self.assertFalse(transport.disconnecting)
        phase.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(phase.chosen(), [])

    def test_timeout_continues_when_configured(self) -> None:
        phase = Phase(BY_PROTOCOL, [http_inspector()], timeout=3)
        phase.listener.continue_on_listener_filters_timeout = True
        protocol, transport = phase.connect()
        protocol.dataReceived(b"GET /slow")
        phase.clock.advance(3)
        self.assertEqual(phase.chosen(), ["raw"])
        self.assertEqual(phase.received(), b"GET /slow")
        self.assertFalse(transport.disconnecting)

    def test_eof_while_inspecting_closes(self) -> None:
        phase = Phase(BY_PROTOCOL, [http_inspector()])
        protocol, transport = phase.connect()
        protocol.dataReceived(b"GET / HT")
        protocol.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(phase.chosen(), [])
        self.assertEqual(phase.clock.getDelayedCalls(), [])

    def test_request_line_too_long_closes(self) -> None:
        phase = Phase(BY_PROTOCOL, [http_inspector()])
        protocol, transport = phase.connect()
        protocol.dataReceived(b"GET /" + b"a" * (MAX_INSPECT_SIZE - 6))
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"aa")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(phase.chosen(), [])

    def test_nothing_on_tls(self) -> None:
        chains = {"tls": FilterChainMatch(transport_protocol="tls"),
                  "h1": FilterChainMatch(application_protocols=("http/1.1",)),
                  "raw": FilterChainMatch()}
        phase = Phase(chains, [http_inspector()])
        self.assertTrue(phase.listener.needs_inspection)
        protocol, _ = phase.connect()
        hello = client_hello("a.example")
        protocol.dataReceived(hello)
        self.assertEqual(phase.chosen(), ["tls"])
        self.assertEqual(protocol.info.requestedApplicationProtocols, ())
        self.assertEqual(protocol.info.transportProtocol, "tls")
        self.assertEqual(phase.received(), hello)
        # The same listener, plain HTTP: the TLS inspector says raw_buffer, HTTP/1.1 found.
        protocol, _ = phase.connect()
        protocol.dataReceived(HTTP11)
        self.assertEqual(phase.chosen()[-1], "h1")
        self.assertEqual(protocol.info.transportProtocol, "raw_buffer")


@implementer(IListenerFilter)
class Restore:
    """Sets the destination, as original_dst does."""

    def __init__(self, address: str) -> None:
        self.address = address

    def onAccept(self, callbacks: IListenerFilterCallbacks) -> None:
        callbacks.info.localAddress = self.address
        callbacks.info.localAddressRestored = True


@implementer(IListenerFilter)
class Later:
    """Stops iteration and continues when told."""

    def __init__(self, box: list[Any]) -> None:
        self.box = box

    def onAccept(self, callbacks: IListenerFilterCallbacks) -> bool:
        self.box.append(callbacks)
        return False


def restore(address: str) -> Callable[[], Restore]:
    return lambda: Restore(address)


class ListenerFilterOrderTests(unittest.SynchronousTestCase):
    def test_restored_destination_picks_the_chain(self) -> None:
        chains = {"p9000": FilterChainMatch(destination_port=9000), "any": FilterChainMatch()}
        phase = Phase(chains, [ListenerFilterEntry(restore("10.0.0.5:9000"))])
        protocol, _ = phase.connect(port=80)
        self.assertEqual(phase.chosen(), ["p9000"])
        inner = protocol._inner
        self.assertIsInstance(inner, ListenerConnection)
        self.assertEqual(inner.info.localAddress, "10.0.0.5:9000")
        self.assertTrue(inner.info.localAddressRestored)

    def test_filter_disabled_sees_the_restored_port(self) -> None:
        chains = {"h1": BY_PROTOCOL["h1"], "raw": BY_PROTOCOL["raw"]}
        skip_9000 = DestinationPortRange(9000, 9001)
        filters = [ListenerFilterEntry(restore("10.0.0.5:9000")),
                   ListenerFilterEntry(HttpInspectorFilter, skip_9000, "http_inspector")]
        phase = Phase(chains, filters)
        protocol, _ = phase.connect(port=80)
        protocol.dataReceived(HTTP11)
        # The inspector is disabled for the restored port: no application protocol found.
        self.assertEqual(phase.chosen(), ["raw"])
        self.assertEqual(protocol.info.requestedApplicationProtocols, ())
        self.assertEqual(phase.received(), HTTP11)
        phase = Phase(chains, [ListenerFilterEntry(restore("10.0.0.5:9001")), filters[1]])
        protocol, _ = phase.connect(port=80)
        protocol.dataReceived(HTTP11)
        self.assertEqual(phase.chosen(), ["h1"])

    def test_asynchronous_filter(self) -> None:
        box: list[Any] = []
        phase = Phase({"any": FilterChainMatch()}, [ListenerFilterEntry(lambda: Later(box))])
        protocol, transport = phase.connect()
        protocol.dataReceived(b"early")
        self.assertEqual(phase.chosen(), [])
        box[0].continueFilterChain(True)
        self.assertEqual(phase.chosen(), ["any"])
        self.assertEqual(phase.received(), b"early")
        phase = Phase({"any": FilterChainMatch()}, [ListenerFilterEntry(lambda: Later(box))])
        protocol, transport = phase.connect()
        box[-1].continueFilterChain(False)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(phase.chosen(), [])

    def test_no_chain_closes(self) -> None:
        phase = Phase({"p1": FilterChainMatch(destination_port=1)}, [http_inspector()])
        protocol, transport = phase.connect()
        protocol.dataReceived(HTTP11)
        self.assertTrue(transport.disconnecting)
        self.assertIsInstance(protocol, InspectingProtocol)
        self.assertEqual(phase.seen, [])
