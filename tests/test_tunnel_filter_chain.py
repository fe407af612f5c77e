"""
A CONNECT through the HCM's HTTP filters (hbonex.tunnel.filter_chain), on the HTTP/1.1
tunnel server with in-memory transports: a filter that holds the CONNECT and resumes it, one
that changes its target, and a client that leaves while its CONNECT is held.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from hbonex.http.connection_manager import HttpStreamFactory
from hbonex.http.filter_manager import FilterHeadersStatus
from hbonex.http.headers import Headers
from hbonex.http.routing import RouteDecision
from hbonex.http.stream_info import SharedWithUpstream
from hbonex.interfaces import IStreamDecoderFilter
from hbonex.network.listener import ConnectionInfo
from hbonex.tunnel.connect import ConnectRequest
from hbonex.tunnel.server import H1TunnelServer, TunnelLog


class Router:
    """Refuses every tunnel with 503 after recording it: no upstream is connected."""

    def __init__(self) -> None:
        self.requests: list[ConnectRequest] = []

    def route(self, request: ConnectRequest, info: Any) -> RouteDecision:
        self.requests.append(request)
        return RouteDecision(503, "no healthy upstream")


@implementer(IStreamDecoderFilter)
class Holding:
    """Holds each CONNECT (an asynchronous check), retargets it, and records its life."""

    def __init__(self) -> None:
        self.callbacks: Any = None
        self.destroyed = False

    def setDecoderFilterCallbacks(self, callbacks: Any) -> None:
        self.callbacks = callbacks

    def decodeHeaders(self, headers: Headers, endStream: bool) -> FilterHeadersStatus:
        headers.set(b":authority", b"10.0.0.9:443")
        self.callbacks.streamInfo().filter_state.set_data(
            "checked", "yes", SharedWithUpstream.ONCE)
        return FilterHeadersStatus.StopIteration

    def decodeData(self, data: bytes, endStream: bool) -> Any:
        raise AssertionError("tunnel bytes do not pass the filters")

    def decodeTrailers(self, trailers: Headers) -> Any:
        raise AssertionError("no trailers on a CONNECT")

    def onDestroy(self) -> None:
        self.destroyed = True


class H1ConnectFilterTests(unittest.TestCase):
    def setUp(self) -> None:
        self.filter = Holding()
        self.router = Router()
        info = ConnectionInfo("l", "1.2.3.4:5", "5.6.7.8:9")
        http = HttpStreamFactory(Clock(), self.router, lambda cluster: None, info,
                                 filter_factories=(lambda: self.filter,))
        self.server = H1TunnelServer(Clock(), self.router, info, TunnelLog(), http=http)
        self.transport = StringTransport()
        self.server.makeConnection(self.transport)
        self.server.dataReceived(b"CONNECT 10.0.0.1:80 HTTP/1.1\r\nHost: 10.0.0.1:80\r\n\r\n"
                                 b"early bytes")

    def test_held_then_resumed_with_the_filters_headers(self) -> None:
        # Held: no routing, no answer, and the client's next bytes wait.
        self.assertEqual((self.router.requests, self.transport.value()), ([], b""))
        self.assertEqual(self.transport.producerState, "paused")
        self.filter.callbacks.continueDecoding()
        [request] = self.router.requests
        self.assertEqual(request.authority, "10.0.0.9:443")
        self.assertEqual(dict(request.headers)["host"], "10.0.0.1:80")
        # The refusal is a local reply through the chain, and the connection closes.
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), head)
        self.assertIn(b"content-length: " + str(len(body)).encode(), head.lower())
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(self.filter.destroyed)

    def test_client_gone_while_held(self) -> None:
        self.server.connectionLost()
        self.assertTrue(self.filter.destroyed)
        self.filter.callbacks.continueDecoding()
        self.assertEqual(self.router.requests, [])
