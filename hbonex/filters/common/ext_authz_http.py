"""
The HTTP authorization check of ``envoy.filters.http.ext_authz`` (Envoy's RawHttpClientImpl):
one request to the authorization cluster through the router's upstream pools, its response
collected whole and classified as Envoy does — 200 allows, a 5xx (or no answer: connect
failure, reset, timeout) is an error, any other status denies.
"""

from __future__ import annotations

import enum
from typing import Any, Callable

import attrs
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from hbonex.errors import UpstreamError
from hbonex.http.headers import Headers

log = Logger(namespace="hbonex.ext_authz")

#: An authorization response body past this is an error (Envoy's async client buffers it
#: whole; hbonex bounds it).
MAX_RESPONSE_BODY = 1024 * 1024


class CheckStatus(enum.Enum):
    OK = "ok"
    DENIED = "denied"
    ERROR = "error"


@attrs.frozen
class CheckResponse:
    status: CheckStatus
    #: The authorization service's status (DENIED: relayed to the client).
    status_code: int = 403
    headers: Headers = attrs.field(factory=Headers)
    body: bytes = b""
    #: Why the check failed (ERROR), for logs and response details.
    reason: str = ""


def classify(headers: Headers, body: bytes) -> CheckResponse:
    """Envoy's toResponse: 200 allows, 5xx is an error, any other status denies."""
    raw = headers.get(b":status") or b""
    if not raw.isdigit():
        return CheckResponse(CheckStatus.DENIED, 403, headers, body)
    code = int(raw)
    if 500 <= code <= 599:
        return CheckResponse(CheckStatus.ERROR, code, headers, body,
                             reason=f"authorization service answered {code}")
    if code == 200:
        return CheckResponse(CheckStatus.OK, 200, headers, body)
    return CheckResponse(CheckStatus.DENIED, code, headers, body)


class HttpCheck:
    """
    One authorization request: ``start()`` sends it on a connection of ``pool`` (the
    cluster's, as the router gets it), ``on_complete(CheckResponse)`` is called once (never
    after ``cancel()``).  ``timeout`` bounds everything, the connect included.
    """

    def __init__(self, reactor: Any, pool: Any, headers: Headers, body: bytes,
                 timeout: float, on_complete: Callable[[CheckResponse], None]) -> None:
        self.reactor = reactor
        self.pool = pool
        self.headers = headers
        self.body = body
        self.timeout = timeout
        self.on_complete: Callable[[CheckResponse], None] | None = on_complete
        self._timer: IDelayedCall | None = None
        self._acquiring: Any = None
        self._codec: Any = None
        self._response: Headers | None = None
        self._body = bytearray()

    def start(self) -> None:
        if self.timeout > 0:
            self._timer = self.reactor.callLater(self.timeout, self._timed_out)
        d = self._acquiring = self.pool.acquire()
        d.addCallbacks(self._connected, self._connect_failed)

    @property
    def done(self) -> bool:
        return self.on_complete is None

    def cancel(self) -> None:
        """The request the check was for is gone: drop the check (Envoy's cancel())."""
        if self.done:
            return
        self.on_complete = None
        self._stop()

    def _stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        acquiring, self._acquiring = self._acquiring, None
        if acquiring is not None:
            acquiring.cancel()
        codec, self._codec = self._codec, None
        if codec is not None and codec.busy:
            codec.abort()  # the exchange did not finish: the connection is not reusable

    def _complete(self, response: CheckResponse) -> None:
        callback, self.on_complete = self.on_complete, None
        self._stop()
        if callback is not None:
            callback(response)

    def _error(self, reason: str) -> None:
        log.info("ext_authz check failed: {reason}", reason=reason)
        self._complete(CheckResponse(CheckStatus.ERROR, reason=reason))

    # -- the connection -------------------------------------------------------------------------

    def _connected(self, codec: Any) -> None:
        self._acquiring = None
        if self.done:
            if codec.on_idle is not None and not codec.busy:
                codec.on_idle(codec)  # unused: back to the pool
            return
        self._codec = codec
        codec.start_request(self.headers, not self.body, self)
        if self.body and self._codec is not None:
            codec.send_data(self.body, True)

    def _connect_failed(self, failure: Any) -> None:
        self._acquiring = None
        if self.done:
            return
        error = failure.value
        reason = error.reason if isinstance(error, UpstreamError) else str(error)
        self._error(f"connect failure: {reason}")

    def _timed_out(self) -> None:
        self._timer = None
        self._error(f"timeout ({self.timeout:g}s)")

    # -- the response (the upstream codec calls these) ------------------------------------------

    def decodeHeaders(self, headers: Headers, endStream: bool) -> None:
        if self.done:
            return
        self._response = headers
        if endStream:
            self._finish()

    def decodeData(self, data: bytes, endStream: bool) -> None:
        if self.done:
            return
        self._body += data
        if len(self._body) > MAX_RESPONSE_BODY:
            self._error(f"response body over {MAX_RESPONSE_BODY} bytes")
            return
        if endStream:
            self._finish()

    def decodeTrailers(self, trailers: Headers) -> None:
        if not self.done:
            self._finish()

    def onUpstreamReset(self, why: str) -> None:
        self._codec = None
        if not self.done:
            self._error(f"reset: {why}")

    def _finish(self) -> None:
        assert self._response is not None
        # The exchange is over: the codec goes back to its pool by itself.
        self._codec = None
        self._complete(classify(self._response, bytes(self._body)))


__all__ = ["CheckResponse", "CheckStatus", "HttpCheck", "classify"]
