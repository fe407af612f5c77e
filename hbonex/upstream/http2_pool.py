"""
Upstream HTTP/2 for the router: requests multiplexed on the cluster's pooled HTTP/2
connections (the same pools and limits as its CONNECT tunnels), each request one stream.
:class:`H2Exchange` gives the router the same calls as an HTTP/1.1 connection.

An upgrade (websocket) goes as an extended CONNECT (RFC 8441), as Envoy's HTTP/2 client codec
sends it (``transformUpgradeRequestFromH1toH2``): ``:method CONNECT``, ``:protocol`` the
upgrade, no ``upgrade``/``connection``; a 200 to it comes back to the router as a 101
(``transformUpgradeResponseFromH2toH1``) and the stream is then the relay's upstream end
(:meth:`H2Exchange.take_over`).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from hbonex.h2.connection import ErrorCodes
from hbonex.http.codec1 import HOP_BY_HOP
from hbonex.http.headers import Headers
from hbonex.http.upgrade import upgrade_type


class H2Exchange:
    """One request/response on an upstream HTTP/2 connection."""

    #: The router hands a finished HTTP/1.1 connection back through this; a stream needs
    #: no handing back.
    on_idle = None

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.stream: Any = None
        self.transport: Any = None
        #: The Upgrade value of an upgrade request (sent as extended CONNECT), or None.
        self.upgrade: bytes | None = None

    @property
    def busy(self) -> bool:
        return self.stream is not None and not self.stream._closed

    @property
    def lost(self) -> bool:
        """The stream is gone (for an upgrade whose 200 is on its way downstream)."""
        return self.stream is None or self.stream._closed

    def start_request(self, headers: Headers, end_stream: bool, response: Any) -> None:
        if upgrade_type(headers) is not None:
            self.upgrade = headers.get(b"upgrade") or b""
            headers = _upgrade_request(headers, self.upgrade)
            response = _UpgradeResponse(self, response)
            end_stream = False
        items = [(n, v) for n, v in headers.items()
                 if n not in HOP_BY_HOP or (n == b"te" and v == b"trailers")]
        self.stream = self.connection.open_request(items, end_stream, response)
        self.transport = self.stream

    def send_data(self, data: bytes, end_stream: bool) -> None:
        if data:
            self.stream.write(data)
        if end_stream and self.upgrade is None:  # an upgrade's side ends with the relay
            self.stream.loseWriteConnection()

    def take_over(self, protocol: Any) -> None:
        """
        After the 200 to an extended CONNECT: the stream is ``protocol``'s (the relay's
        upstream end), with what arrived since (held while the 101 went downstream).
        """
        stream = self.stream
        stream.attach(protocol)
        stream.resumeProducing()

    def send_trailers(self, trailers: Headers) -> None:
        self.stream.writeTrailers(trailers.items())

    def abort(self) -> None:
        if self.stream is not None and not self.stream._closed:
            self.stream.reset(ErrorCodes.CANCEL)


def _upgrade_request(headers: Headers, upgrade: bytes) -> Headers:
    """Envoy's transformUpgradeRequestFromH1toH2 (on a copy)."""
    result = headers.copy()
    result.set(b":method", b"CONNECT")
    result.set(b":protocol", upgrade)
    result.remove(b"upgrade")
    result.remove(b"connection")
    if result.get(b"content-length") == b"0":
        result.remove(b"content-length")
    return result


class _UpgradeResponse:
    """
    The router's response side for an extended CONNECT: a 200 that leaves the stream open is
    the upgrade accepted, passed on as a 101 (Envoy's transformUpgradeResponseFromH2toH1);
    the stream is paused until take_over, so that no byte of the upgraded protocol is taken
    for a response body.
    """

    __slots__ = ("exchange", "response")

    def __init__(self, exchange: H2Exchange, response: Any) -> None:
        self.exchange = exchange
        self.response = response

    def decodeHeaders(self, headers: Headers, endStream: bool) -> None:
        if headers.get(b":status") == b"200" and not endStream:
            self.exchange.stream.pauseProducing()
            headers.set(b":status", b"101")
            headers.set(b"upgrade", self.exchange.upgrade or b"")
            headers.set(b"connection", b"upgrade")
        self.response.decodeHeaders(headers, endStream)

    def decodeData(self, data: bytes, endStream: bool) -> None:
        self.response.decodeData(data, endStream)

    def decodeTrailers(self, trailers: Headers) -> None:
        self.response.decodeTrailers(trailers)

    def onUpstreamReset(self, why: str) -> None:
        self.response.onUpstreamReset(why)


class H2RequestPool:
    """``acquire()`` an exchange on a connection of the cluster with a free stream."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster

    def acquire(self) -> defer.Deferred[H2Exchange]:
        from hbonex.upstream.cluster import UpstreamRequest

        d = self.cluster.pick(UpstreamRequest())
        # The pool fires with a connection whose room the caller takes at once (the router
        # opens the stream in the same callback chain).
        d.addCallback(lambda address: self.cluster._pool_for(address).acquire_connection())
        return d.addCallback(H2Exchange)


__all__ = ["H2Exchange", "H2RequestPool"]
