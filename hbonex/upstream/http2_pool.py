"""
Upstream HTTP/2 for the router: requests multiplexed on the cluster's pooled HTTP/2
connections (the same pools and limits as its CONNECT tunnels), each request one stream.
:class:`H2Exchange` gives the router the same calls as an HTTP/1.1 connection.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from hbonex.h2.connection import ErrorCodes
from hbonex.http.codec1 import HOP_BY_HOP
from hbonex.http.headers import Headers


class H2Exchange:
    """One request/response on an upstream HTTP/2 connection."""

    #: The router hands a finished HTTP/1.1 connection back through this; a stream needs
    #: no handing back.
    on_idle = None

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.stream: Any = None
        self.transport: Any = None

    @property
    def busy(self) -> bool:
        return self.stream is not None and not self.stream._closed

    def start_request(self, headers: Headers, end_stream: bool, response: Any) -> None:
        items = [(n, v) for n, v in headers.items()
                 if n not in HOP_BY_HOP or (n == b"te" and v == b"trailers")]
        self.stream = self.connection.open_request(items, end_stream, response)
        self.transport = self.stream

    def send_data(self, data: bytes, end_stream: bool) -> None:
        if data:
            self.stream.write(data)
        if end_stream:
            self.stream.loseWriteConnection()

    def send_trailers(self, trailers: Headers) -> None:
        self.stream.writeTrailers(trailers.items())

    def abort(self) -> None:
        if self.stream is not None and not self.stream._closed:
            self.stream.reset(ErrorCodes.CANCEL)


class H2RequestPool:
    """``acquire()`` an exchange on a connection of the cluster with a free stream."""

    #: HTTP/1.1 upgrades (websocket) are not converted to extended CONNECT upstream.
    carries_upgrades = False

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
