"""
Filter chain selection: the TLS inspector (SNI, ALPN, TLS or not) and Envoy's precedence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory
from twisted.trial import unittest
from zope.interface import implementer

from hbonex.filters.listener.tls_inspector import NeedMore, looks_like_tls, parse_client_hello
from hbonex.interfaces import INetworkFilter
from hbonex.network.listener import FilterChain, FilterChainMatch, Listener
from hbonex.tls import pki
from hbonex.tls.context import ClientTLS, PeerPolicy, ServerTLS, tls_settings_from_material
from hbonex.tls.spiffe import uri_sans


def client_hello(sni: str = "", alpn: tuple[bytes, ...] = ()) -> bytes:
    """
    The bytes a real OpenSSL client sends first.
    """
    ctx = SSL.Context(SSL.TLS_METHOD)
    if alpn:
        ctx.set_alpn_protos(list(alpn))
    conn = SSL.Connection(ctx, None)
    if sni:
        conn.set_tlsext_host_name(sni.encode())
    conn.set_connect_state()
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    return conn.bio_read(65536)


class InspectorTests(unittest.SynchronousTestCase):
    def test_sni_and_alpn(self) -> None:
        hello = parse_client_hello(client_hello("a.example.com", (b"h2", b"http/1.1")))
        self.assertEqual(hello.server_name, "a.example.com")
        self.assertEqual(hello.alpn, ("h2", "http/1.1"))

    def test_no_extensions_of_interest(self) -> None:
        hello = parse_client_hello(client_hello())
        self.assertEqual((hello.server_name, hello.alpn), ("", ()))

    def test_partial_hello_needs_more(self) -> None:
        data = client_hello("b.example.com")
        for cut in (1, 5, 20, len(data) - 1):
            self.assertRaises(NeedMore, parse_client_hello, data[:cut])

    def test_tls_or_not(self) -> None:
        self.assertTrue(looks_like_tls(client_hello()))
        self.assertFalse(looks_like_tls(b"GET / HTTP/1.1\r\n"))
        self.assertFalse(looks_like_tls(b"\x00"))
        self.assertIsNone(looks_like_tls(b"\x16"))

    def test_not_a_client_hello(self) -> None:
        self.assertRaises(ValueError, parse_client_hello, b"\x17\x03\x03\x00\x01x")


def chain(**match: Any) -> FilterChain:
    return FilterChain([], match=FilterChainMatch(**match), name=repr(match))


class PrecedenceTests(unittest.SynchronousTestCase):
    def select(self, chains: list[FilterChain], **kw: Any) -> str:
        listener = Listener("l", reactor, chains, endpoint="tcp:15008:interface=127.0.0.1")
        picked = listener.select_chain(**kw)
        return picked.name if picked is not None else "none"

    def test_server_names_exact_beats_wildcard_beats_default(self) -> None:
        chains = [chain(), chain(server_names=("*.example.com",)),
                  chain(server_names=("a.example.com",))]
        self.assertEqual(self.select(chains, server_name="a.example.com"),
                         chains[2].name)
        self.assertEqual(self.select(chains, server_name="b.example.com"), chains[1].name)
        self.assertEqual(self.select(chains, server_name="other.org"), chains[0].name)
        self.assertEqual(self.select(chains), chains[0].name)

    def test_longest_wildcard(self) -> None:
        chains = [chain(server_names=("*.com",)), chain(server_names=("*.example.com",))]
        self.assertEqual(self.select(chains, server_name="x.example.com"), chains[1].name)

    def test_destination_port_first(self) -> None:
        chains = [chain(server_names=("a.example.com",)), chain(destination_port=15008)]
        self.assertEqual(self.select(chains, local_port=15008, server_name="a.example.com"),
                         chains[1].name)
        self.assertEqual(self.select(chains, local_port=9, server_name="a.example.com"),
                         chains[0].name)

    def test_transport_and_alpn(self) -> None:
        chains = [chain(transport_protocol="raw_buffer"),
                  chain(transport_protocol="tls", application_protocols=("h2",)),
                  chain(transport_protocol="tls")]
        self.assertEqual(self.select(chains, transport_protocol="raw_buffer"), chains[0].name)
        self.assertEqual(self.select(chains, transport_protocol="tls",
                                     application_protocols=("http/1.1", "h2")), chains[1].name)
        self.assertEqual(self.select(chains, transport_protocol="tls",
                                     application_protocols=("http/1.1",)), chains[2].name)

    def test_no_match(self) -> None:
        chains = [chain(server_names=("a.example.com",))]
        self.assertEqual(self.select(chains, server_name="b.example.com"), "none")


@implementer(INetworkFilter)
class Hello:
    """
    Terminal test filter: greets with its chain's name, then closes.
    """

    def __init__(self, name: bytes) -> None:
        self.name = name

    def onNewConnection(self, callbacks: Any) -> bool:
        callbacks.transport.write(self.name)
        callbacks.transport.loseConnection()
        return False

    def onData(self, data: bytes, endStream: bool) -> bool:
        return False

    def onClose(self, reason: object) -> None:
        pass


class Collect(protocol.Protocol):
    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()
        self.peer_uris: list[str] = []

    def connectionMade(self) -> None:
        if self.greeting:
            self.transport.write(self.greeting)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        cert = getattr(self.transport, "getPeerCertificate", lambda: None)()
        if cert is not None and not self.peer_uris:
            self.peer_uris = uri_sans(cert)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.data)


class SelectionOverSocketsTests(unittest.TestCase):
    """
    One listener, three chains: two TLS chains with their own certificates picked by SNI,
    and a plain-text chain for connections that are not TLS.
    """

    def setUp(self) -> None:
        d = Path(self.mktemp())
        pki.init_ca(d)
        self.ids = {}
        for name in ("alpha", "beta", "client"):
            pki.issue(d, name, spiffe=f"spiffe://cluster.local/ns/default/sa/{name}")
            self.ids[name] = f"spiffe://cluster.local/ns/default/sa/{name}"
        self.material = {n: pki.load_pki_dir(d / n) for n in self.ids}

        def server_tls(name: str) -> ServerTLS:
            return ServerTLS(tls_settings_from_material(
                self.material[name], peer_policy=PeerPolicy(), alpn=(b"h2",)))

        chains = [
            FilterChain([lambda: Hello(b"alpha")], tls=server_tls("alpha"),
                        match=FilterChainMatch(server_names=("alpha.example",))),
            FilterChain([lambda: Hello(b"beta")], tls=server_tls("beta"),
                        match=FilterChainMatch(server_names=("*.beta.example",))),
            FilterChain([lambda: Hello(b"plain")],
                        match=FilterChainMatch(transport_protocol="raw_buffer")),
        ]
        self.listener = Listener("multi", reactor, chains,
                                 endpoint="tcp:0:interface=127.0.0.1")
        self.port = reactor.listenTCP(0, self.listener.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def connect(self, sni: str | None) -> defer.Deferred[Collect]:
        # As with Envoy's TLS inspector, a plain-text client must speak first.
        proto = Collect(b"hi" if sni is None else b"")
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        if sni is None:
            d = connectProtocol(endpoint, proto)
        else:
            from hbonex.tls.fasttls import FastTLSFactory

            settings = tls_settings_from_material(
                self.material["client"], peer_policy=PeerPolicy(), alpn=(b"h2",), sni=sni)
            factory = FastTLSFactory(ClientTLS(settings), True,
                                     Factory.forProtocol(lambda: proto))
            d = endpoint.connect(factory)
        return d.addCallback(lambda _: proto.done).addCallback(lambda _: proto)

    @defer.inlineCallbacks
    def test_sni_picks_chain_and_certificate(self) -> Any:
        alpha = yield self.connect("alpha.example")
        self.assertEqual((alpha.data, alpha.peer_uris), (b"alpha", [self.ids["alpha"]]))
        beta = yield self.connect("x.beta.example")
        self.assertEqual((beta.data, beta.peer_uris), (b"beta", [self.ids["beta"]]))

    @defer.inlineCallbacks
    def test_plain_text_picks_raw_chain(self) -> Any:
        plain = yield self.connect(None)
        self.assertEqual(plain.data, b"plain")

    @defer.inlineCallbacks
    def test_unknown_sni_is_closed(self) -> Any:
        other = yield self.connect("nobody.example")
        self.assertEqual(other.data, b"")
        self.assertEqual(self.listener.connections_total, 0)
