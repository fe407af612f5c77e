"""
A CONNECT through the HCM's HTTP filters.

When the connection manager has ``http_filters`` besides the router, a CONNECT runs through
them as any request does (Envoy does the same): the decoder filters see its headers, in
order, and may change them, stop and resume later, store filter state (Istio's
``connect_terminate`` stores the tunnel's target and peer identity with set_filter_state), or
answer with a local reply; the encoder filters see the tunnel's response headers (the 200, or
a refusal). The router's place is taken by :class:`ConnectAdmission`, which hands the
headers that passed every filter back to the tunnel server: it routes them, connects
upstream and answers.

Tunnel bytes do not go through the filters: once the 200 is out, the stream is spliced to
the upstream with producers back to back, as without filters. With only the router there is
no chain at all, so plain CONNECT termination pays nothing for this.
"""

from __future__ import annotations

from typing import Any, Callable

from zope.interface import implementer

from hbonex.http.filter_manager import (
    FilterDataStatus,
    FilterHeadersStatus,
    FilterManager,
    FilterTrailersStatus,
    IResponseSink,
)
from hbonex.http.headers import Headers
from hbonex.interfaces import IStreamDecoderFilter


@implementer(IStreamDecoderFilter)
class ConnectAdmission:
    """
    The last decoder filter of a CONNECT's chain: the headers every filter let through go to
    the tunnel server (``on_headers``), which routes them, connects upstream and answers.
    """

    def __init__(self, on_headers: Callable[[Headers], None]) -> None:
        self.on_headers = on_headers
        self.callbacks: Any = None

    def setDecoderFilterCallbacks(self, callbacks: Any) -> None:
        self.callbacks = callbacks

    def decodeHeaders(self, headers: Headers, endStream: bool) -> FilterHeadersStatus:
        self.on_headers(headers)
        return FilterHeadersStatus.StopIteration

    def decodeData(self, data: bytes, endStream: bool) -> FilterDataStatus:
        # Tunnel bytes are relayed outside the chain; nothing reaches here.
        return FilterDataStatus.StopIterationNoBuffer

    def decodeTrailers(self, trailers: Headers) -> FilterTrailersStatus:
        return FilterTrailersStatus.StopIteration

    def onDestroy(self) -> None:
        pass


@implementer(IResponseSink)
class TunnelResponseSink:
    """
    Where a CONNECT's response leaves after the encoder filters: the tunnel server's own
    functions for its codec. The tunnel's bytes never pass here (they are relayed), so
    there is no producer to register.
    """

    def __init__(
        self,
        send_headers: Callable[[Headers, bool], None],
        send_data: Callable[[bytes, bool], None],
        reset: Callable[[], None],
    ) -> None:
        self._send_headers = send_headers
        self._send_data = send_data
        self._reset = reset
        #: The status that went out (None until the encoder filters let one through).
        self.status: int | None = None

    def sendHeaders(self, headers: Headers, endStream: bool) -> None:
        status = headers.get(b":status") or b""
        self.status = int(status) if status.isdigit() else 0
        self._send_headers(headers, endStream)

    def sendData(self, data: bytes, endStream: bool) -> None:
        self._send_data(data, endStream)

    def sendTrailers(self, trailers: Headers) -> None:
        # A refusal's body has no trailers; end what was sent.
        self._send_data(b"", True)

    def reset(self) -> None:
        self._reset()

    def registerProducer(self, producer: Any) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def requestProducer(self) -> Any:
        return None

    def switchProtocols(self, protocol: Any) -> bool:
        # A CONNECT is already a tunnel: nothing upgrades it further.
        return False


def connect_filter_chain(
    http: Any, sink: TunnelResponseSink, on_headers: Callable[[Headers], None]
) -> FilterManager:
    """
    The filter chain for one CONNECT on a connection whose HCM is ``http``
    (hbonex.http.connection_manager.HttpStreamFactory): its http_filters, then the
    admission in the router's place. Callers build one only when there are http_filters.
    """
    return http.chain((), ConnectAdmission(on_headers), "", sink)  # type: ignore[no-any-return]


__all__ = ["ConnectAdmission", "TunnelResponseSink", "connect_filter_chain"]
