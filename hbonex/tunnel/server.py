"""
The tunnel server: terminates CONNECT over HTTP/2 (one stream per tunnel) and HTTP/1.1, asks
a router where each tunnel goes, connects upstream, and only then answers 200 and relays.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import h2.events
import h2.exceptions
from h2.stream import StreamState
from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.internet.interfaces import IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hbonex.errors import UpstreamError, status_and_reason
from hbonex.h2 import fastheaders
from hbonex.h2.connection import ErrorCodes, H2Stream, H2TunnelConnection
from hbonex.h2.settings import H2Settings
from hbonex.http.filter_manager import FilterManager, reason_phrase
from hbonex.http.headers import Headers
from hbonex.http.routing import RouteDecision
from hbonex.http.stream_info import FilterState, existing_filter_state
from hbonex.http.upgrade import h2_upgrade_protocol
from hbonex.network.relay import Relay
from hbonex.observability import istio_metrics
from hbonex.tunnel.client import H1TunnelTransport
from hbonex.tunnel.connect import ConnectRequest, MalformedRequest, parse_h2_request
from hbonex.tunnel.filter_chain import TunnelResponseSink, connect_filter_chain
from hbonex.upstream.cluster import UpstreamRequest

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_REQUEST_HEAD = 64 * 1024


class TunnelLog:
    """
    One line per tunnel when it ends (and per refused CONNECT), counters, and the HCM's
    access log sinks (records keyed as hbonex.observability.formatter expects).
    """

    log = Logger(namespace="hbonex.tunnel")

    def __init__(self, access_log: Sequence[Callable[[dict[str, str]], None]] = (),
                 flush_interval: float = 0.0, flush_on_established: bool = False) -> None:
        self.flush_interval = flush_interval
        self.flush_on_established = flush_on_established
        self.opened = 0
        self.refused = 0
        self.active = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.access_log = tuple(access_log)

    def refused_tunnel(
        self, info: Any, authority: str, status: int, reason: str, flags: str = "-",
        cluster: str = "", failure: str = "", state: FilterState | None = None,
    ) -> None:
        self.refused += 1
        # The line is formatted here, once: Twisted's formatter re-parses a format string
        # per event, which for one line per tunnel was a fifth of the server's CPU per tunnel.
        # The fields stay on the event for structured observers.
        identity = info.peerIdentity or "-"
        self.log.info(
            "{tunnel}",
            tunnel=f"tunnel from {info.remoteAddress} ({identity}) to {authority} refused: "
                   f"{status} {reason}",
            peer=info.remoteAddress, identity=identity, target=authority,
            status=status, reason=reason,
        )
        self.record(info, authority, status, reason, 0, 0, 0.0, "", {
            "response_flags": flags, "upstream_cluster": cluster, "upstream_failure": failure},
            state)

    def established(
        self, reactor: Any, info: Any, authority: str, relay: Relay, started: float,
        upstream_host: str, cluster: str, state: FilterState | None = None,
    ) -> None:
        """
        The tunnel is up: its access records while it lasts (Envoy's
        DownstreamTunnelSuccessfullyEstablished, then DownstreamPeriodic every interval).
        """
        if not self.access_log:
            return

        def record(kind: str) -> None:
            self.record(info, authority, 200, relay.close_reason or "", relay.a.bytes_in,
                        relay.b.bytes_in, time.monotonic() - started, upstream_host,
                        {"response_flags": "-", "upstream_cluster": cluster,
                         "access_log_type": kind}, state)

        if self.flush_on_established:
            record("DownstreamTunnelSuccessfullyEstablished")
        if self.flush_interval > 0:
            def tick() -> None:
                if not relay.done:
                    record("DownstreamPeriodic")
                    relay.flush_call = reactor.callLater(self.flush_interval, tick)

            relay.flush_call = reactor.callLater(self.flush_interval, tick)

    def finished(
        self, info: Any, authority: str, relay: Relay, started: float, upstream_host: str = "",
        cluster: str = "", state: FilterState | None = None,
    ) -> None:
        call = relay.flush_call
        if call is not None and call.active():
            call.cancel()
        self.active -= 1
        self.bytes_in += relay.a.bytes_in
        self.bytes_out += relay.b.bytes_in
        reason = relay.end_reason()
        duration = time.monotonic() - started
        identity = info.peerIdentity or "-"
        up, down = relay.a.bytes_in, relay.b.bytes_in
        self.log.info(
            "{tunnel}",
            tunnel=f"tunnel from {info.remoteAddress} ({identity}) to {authority} closed "
                   f"after {duration:.3f}s: {up} bytes up, {down} bytes down, {reason}",
            peer=info.remoteAddress, identity=identity, target=authority,
            duration=duration, up=up, down=down, reason=reason,
        )
        flags = "-" if reason == "closed cleanly" else "UC"
        istio_metrics.tcp_closed(info, sent=down, received=up, flags=flags)
        self.record(info, authority, 200, reason, up, down, duration, upstream_host,
                    {"response_flags": flags, "upstream_cluster": cluster,
                     "access_log_type": "DownstreamEnd"}, state)

    def record(
        self, info: Any, authority: str, status: int, reason: str, up: int, down: int,
        duration: float, upstream_host: str, extra: dict[str, str] | None = None,
        state: FilterState | None = None,
    ) -> None:
        if not self.access_log:
            return
        record = info.substitutions()
        record["access_log_type"] = "DownstreamEnd"
        if extra:
            record.update(extra)
        if state is not None:
            # %FILTER_STATE%: what the CONNECT's HTTP filters stored, over the connection's.
            record.update((f"fs:{key}", str(state.get_data(key))) for key in state.keys())
        record["req::authority"] = authority  # %REQ(:AUTHORITY)%: the CONNECT's target
        record.update(
            authority=authority,
            response_code=str(status),
            termination=reason,
            bytes_received=str(up),
            bytes_sent=str(down),
            duration_ms=str(int(duration * 1000)),
            upstream_host=upstream_host,
            start_epoch=str(time.time() - duration),
            start_time=time.strftime(
                "%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - duration)
            ) + "Z",
        )
        for sink in self.access_log:
            sink(record)


def route_flags(decision: RouteDecision) -> str:
    """Envoy's response flag for a CONNECT the routes refused: NR (no route), NC (no cluster)."""
    if decision.status == 404:
        return "NR"
    if decision.status == 503 and decision.cluster is None:
        return "NC"
    return "-"


def upstream_flags(error: BaseException | None) -> str:
    """Envoy's response flag for a target that could not be reached."""
    return (isinstance(error, UpstreamError) and error.flag) or "UF"


def connect_upstream(
    decision: RouteDecision, relay: Relay, request: ConnectRequest, info: Any,
    request_state: FilterState | None = None,
) -> defer.Deferred[Any]:
    """
    Connect the relay's upstream end to the route's cluster. What the connection's and the
    request's filter state share with upstream goes along (an internal listener's connection
    starts with it).
    """
    state = existing_filter_state(info)
    shared = None
    if state is not None and (request_state is not None or not state.is_empty()):
        shared = state.shared_with_upstream(request_state)
    elif request_state is not None:
        shared = request_state.shared_with_upstream()
    upstream = UpstreamRequest(
        original_destination=decision.original_destination,
        downstream_remote=info.remoteAddress,
        downstream_local=info.localAddress,
        peer_identity=info.peerIdentity,
        filter_state=shared,
    )
    return decision.cluster.connect_stream(relay.b, upstream)  # type: ignore[no-any-return]


class H2TunnelServer(H2TunnelConnection):
    """
    Server end of an HBONE HTTP/2 connection: one CONNECT stream per tunnel.
    """

    client_side = False
    log = Logger()

    def __init__(
        self,
        settings: H2Settings,
        reactor: IReactorTime,
        router: Any,
        info: Any,
        tunnels: TunnelLog,
        max_requests_per_connection: int = 0,
        connections: Any = None,
        http: Any = None,
    ) -> None:
        super().__init__(settings, reactor)
        self.router = router
        #: hbonex.http.connection_manager.HttpStreamFactory: ordinary requests go through the
        #: HCM's filter chain (None: only CONNECT is served, as the CLI's server does).
        self.http = http
        self.info = info
        self.tunnels = tunnels
        self.max_requests = max_requests_per_connection
        self.requests = 0
        #: The listener's set of live HTTP/2 connections (for GOAWAY at shutdown).
        self.connections = connections

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.connections is not None:
            self.connections.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.connections is not None:
            self.connections.discard(self)
        super().connectionLost(reason)

    def describe(self) -> str:
        return f"h2 from {self.info.remoteAddress}"

    def request_received(self, event: h2.events.RequestReceived) -> None:
        if not self.accepting_streams:
            # Past our GOAWAY: the client retries it on another connection.
            self.conn.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
            return
        self.requests += 1
        self._handle_request(event)
        if self.max_requests and self.requests >= self.max_requests:
            self.send_goaway()

    def _handle_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        if self.http is not None and not _is_tunnel(event.headers, self.router, self.info):
            from hbonex.http.codec2 import serve_request

            self.http.protocol = "HTTP/2"
            serve_request(self, sid, event.headers, event.stream_ended is not None, self.http)
            return
        try:
            request = parse_h2_request(event.headers)
        except MalformedRequest as e:
            self.log.warn(
                "{conn}: malformed request on stream {sid}: {error}; RST_STREAM PROTOCOL_ERROR",
                conn=self.describe(), sid=sid, error=e,
            )
            self.conn.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
            return
        chain = None
        if self.http is not None and self.http.filter_factories:
            sink = TunnelResponseSink(
                lambda headers, end: self._chain_headers(sid, list(headers), end),
                lambda data, end: self._chain_data(sid, data, end),
                lambda: self._chain_reset(sid),
            )
            chain = connect_filter_chain(
                self.http, sink, lambda headers: self._filtered_tunnel(sid, headers, chain)
            )
        if chain is None:
            self._tunnel(sid, request, None)
        else:
            chain.decodeHeaders(Headers(event.headers), False)

    def _filtered_tunnel(self, sid: int, headers: Headers, chain: Any) -> None:
        """A CONNECT's headers passed the HTTP filters (which may have changed them)."""
        h2_stream = self.conn.streams.get(sid)
        if h2_stream is None or h2_stream.closed or not self.may_send:
            chain.reset()  # the client gave up while a filter held its CONNECT
            return
        try:
            request = parse_h2_request(list(headers))
        except MalformedRequest as e:
            chain.send_local_reply(400, details=f"filters left a malformed request: {e}")
            chain.finish()
            return
        self._tunnel(sid, request, chain)

    def _tunnel(self, sid: int, request: ConnectRequest, chain: FilterManager | None) -> None:
        """Route a CONNECT, connect upstream, answer; then relay (``chain``: its filters)."""
        decision = self.router.route(request, self.info)
        if decision.status == 200 and decision.cluster is not None and decision.kind == "http":
            # Only an HCM (with its filter chain) proxies ordinary requests.
            decision = RouteDecision(405, f"method {request.method} not allowed, only CONNECT")
        state = chain.stream_info.filter_state if chain is not None else None
        # No cluster: a direct_response (which may well be a 200), not a tunnel.
        if decision.status != 200 or decision.cluster is None:
            self.tunnels.refused_tunnel(self.info, request.authority, decision.status,
                                        decision.reason, route_flags(decision), state=state)
            if chain is None:
                self._respond(sid, decision.status, decision.body)
            else:
                chain.send_local_reply(decision.status, decision.body,
                                       details=decision.reason, response_flag=route_flags(
                                           decision).strip("-"))
                chain.finish()
            return
        cluster_name = decision.cluster.name
        stream = H2Stream(self, sid)
        self.add_stream(stream)
        authority = request.authority  # keep only this for the tunnel's lifetime
        relay = Relay(self.reactor, decision.idle_timeout)
        started = time.monotonic()
        d = connect_upstream(decision, relay, request, self.info, state)
        stream.on_closed = lambda reason: d.cancel()

        def connected(address: Any) -> None:
            stream.on_closed = None
            if stream._closed or stream._reset is not None or not self.may_send:
                # The client (or the whole connection) went away while we connected.
                relay.b.transport.abortConnection()  # type: ignore[union-attr]
                if not stream._closed:
                    stream._finish(Failure(stream._reset or ierror.ConnectionLost("gone")))
                return
            if decision.reject_early_data and (stream.bytes_received or stream._ended_remote):
                # DATA (or END_STREAM) before our 200: refused, nothing reaches the target.
                relay.b.transport.abortConnection()  # type: ignore[union-attr]
                refuse_early(400, "data before the CONNECT response (early data refused)")
                return
            try:
                if chain is None:
                    fastheaders.send_headers(self.conn, sid, [(b":status", b"200")])
                else:
                    # Through the encoder filters (the sink sends it).
                    chain.encode_headers(Headers([(b":status", b"200")]), False)
                    if chain.sink.status != 200:
                        # A filter answered otherwise, or held the 200 (a tunnel cannot
                        # wait for it): no tunnel.
                        relay.b.transport.abortConnection()  # type: ignore[union-attr]
                        reason = ("an HTTP filter held the CONNECT's 200"
                                  if chain.sink.status is None else
                                  f"an HTTP filter answered {chain.sink.status}")
                        self.tunnels.refused_tunnel(
                            self.info, request.authority, chain.sink.status or 500, reason,
                            "-", cluster_name, state=state)
                        if chain.sink.status is None:
                            chain.send_local_reply(500, details=reason, through_filters=False)
                        chain.finish()
                        stream._finish(Failure(ierror.ConnectionDone("tunnel refused")))
                        return
            except h2.exceptions.ProtocolError as e:  # StreamClosedError included
                self.log.debug("{conn}: stream {sid} gone before its 200: {e}",
                               conn=self.describe(), sid=sid, e=e)
                relay.b.transport.abortConnection()  # type: ignore[union-attr]
                stream._finish(Failure(ierror.ConnectionLost(f"stream gone: {e}")))
                if chain is not None:
                    chain.finish()
                return
            self._flush()
            self.tunnels.opened += 1
            istio_metrics.tcp_opened(self.info)
            self.tunnels.active += 1

            def done(r: Relay) -> None:
                self.tunnels.finished(self.info, authority, r, started, str(address),
                                      cluster_name, state=state)
                if chain is not None:
                    chain.finish()

            relay.on_done = done
            stream.attach(relay.a)
            relay.start()
            self.tunnels.established(self.reactor, self.info, authority, relay, started,
                                     str(address), cluster_name, state=state)

        def refuse_early(status: int, reason: str, flags: str = "-", failure: str = "") -> None:
            self.tunnels.refused_tunnel(self.info, request.authority, status, reason, flags,
                                        cluster_name, failure, state=state)
            stream.on_closed = None
            if not stream._closed:
                if chain is None:
                    self._respond(sid, status)
                else:
                    chain.send_local_reply(status, details=reason, response_flag=flags.strip("-"))
                stream._finish(Failure(ierror.ConnectionDone("tunnel refused")))
            if chain is not None:
                chain.finish()

        def failed(f: Failure) -> None:
            if f.check(defer.CancelledError):
                return
            status, reason = status_and_reason(f.value)
            refuse_early(status, reason, upstream_flags(f.value), reason)

        d.addCallbacks(connected, failed)

    def _chain_headers(self, sid: int, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        """A CONNECT's response headers, from its HTTP filters."""
        if not self.may_send:
            return
        try:
            self.conn.send_headers(sid, headers, end_stream=end)
            if end:
                self._stop_request_body(sid)
        except h2.exceptions.ProtocolError:  # the stream (StreamClosedError) or connection
            pass
        self._flush()

    def _chain_data(self, sid: int, data: bytes, end: bool) -> None:
        """A refused CONNECT's response body, from its HTTP filters."""
        if not self.may_send:
            return
        try:
            self.conn.send_data(sid, data, end_stream=end)
            if end:
                self._stop_request_body(sid)
        except h2.exceptions.ProtocolError:
            pass
        self._flush()

    def _chain_reset(self, sid: int) -> None:
        if not self.may_send:
            return
        try:
            self.conn.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
        except h2.exceptions.ProtocolError:
            pass
        self._flush()

    def _respond(self, sid: int, status: int, body: bytes = b"") -> None:
        """
        A complete response (with END_STREAM) to a request we do not tunnel.
        """
        if not self.may_send:
            return
        try:
            headers = [(b":status", str(status).encode())]
            if body:
                headers.append((b"content-length", str(len(body)).encode()))
                self.conn.send_headers(sid, headers)
                self.conn.send_data(sid, body, end_stream=True)
            else:
                self.conn.send_headers(sid, headers, end_stream=True)
            self._stop_request_body(sid)
        except h2.exceptions.ProtocolError:  # the stream (StreamClosedError) or connection
            pass
        self._flush()

    def _stop_request_body(self, sid: int) -> None:
        """
        After a complete response, a client still sending (a refused CONNECT's stream stays
        open on its side) is told to stop with RST_STREAM(NO_ERROR) (RFC 9113 §8.1): the
        stream then stops counting against MAX_CONCURRENT_STREAMS.
        """
        stream = self.conn.streams.get(sid)
        if stream is not None and stream.state_machine.state is StreamState.HALF_CLOSED_LOCAL:
            self.conn.reset_stream(sid, ErrorCodes.NO_ERROR)


def _is_tunnel(headers: list[tuple[bytes, bytes]], router: Any, info: Any) -> bool:
    """
    Whether an HTTP/2 request is a tunnel (CONNECT, or a POST the route carries as one)
    rather than a request for the HTTP filter chain.  An extended CONNECT whose
    ``:protocol`` is not ``bytestream`` (websocket...) is an upgrade, for the chain.
    """
    method = b""
    for name, value in headers:
        if name == b":method":
            method = value
            break
    if method == b"CONNECT":
        return h2_upgrade_protocol(headers) is None
    if method != b"POST":
        return False
    try:
        request = parse_h2_request(headers)
    except MalformedRequest:
        return False
    return router.route(request, info).kind == "tunnel"


@implementer(IHalfCloseableProtocol)
class H1TunnelServer(Protocol):
    """
    Server end of an HTTP/1.1 CONNECT tunnel (one per connection, TLS or plain TCP).

    Half-close is carried both ways: the client's EOF (FIN, or close_notify over TLS) becomes
    a write shutdown towards the target while the target's bytes keep flowing back, and the
    other way round.
    """

    log = Logger()

    def __init__(
        self, reactor: Any, router: Any, info: Any, tunnels: TunnelLog, http: Any = None,
        idle_timeout: float = 300.0, connections: Any = None,
    ) -> None:
        self.reactor = reactor
        #: The runtime's live server connections: a shutdown drains these too.
        self.connections = connections
        self.router = router
        self.info = info
        self.tunnels = tunnels
        #: hbonex.http.connection_manager.HttpStreamFactory, for connections whose first
        #: request is not CONNECT (the HCM's HTTP filter chain).
        self.http = http
        self.idle_timeout = idle_timeout
        self._channel: Protocol | None = None
        self._buffer = b""
        self._relay: Relay | None = None
        self._head_done = False
        self._pending: defer.Deferred[Any] | None = None
        #: The client's EOF arrived before the tunnel was up (passed on after the 200).
        self._eof = False
        self._refused = False

    def dataReceived(self, data: bytes) -> None:
        if self._relay is not None and self._relay.a.transport is not None:
            self._relay.a.dataReceived(data)
            return
        if self._channel is not None:
            self._channel.dataReceived(data)
            return
        if self._refused:
            return
        if self._head_done:
            # Early tunnel bytes (the transport is paused, so at most one read).
            if self._pending is not None and self._reject_early_data:
                self._refuse_early_data()
                return
            self._buffer += data
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_REQUEST_HEAD:
                self._reply(431, close=True)
            return
        head, rest = self._buffer[:end], self._buffer[end + 4 :]
        if not head.startswith(b"CONNECT ") and self.http is not None:
            self._become_http_proxy(self._buffer)
            return
        self._buffer = rest
        self._head_done = True
        self._request(head)

    def _become_http_proxy(self, data: bytes) -> None:
        """
        The connection carries ordinary HTTP requests: hand it to the HTTP/1.1 codec, each
        request to the HCM's filter chain.
        """
        from hbonex.http.codec1 import Http1Limits, Http1ServerCodec

        self._buffer = b""
        channel = Http1ServerCodec(
            self.http, self.reactor,
            Http1Limits(idle_timeout=self.idle_timeout,
                        max_request_headers=getattr(self.http, "max_request_headers",
                                                    60 * 1024),
                        request_headers_timeout=self.http.options.request_headers_timeout),
            scheme=b"https" if self.info.peerIdentity else b"http",
        )
        self._channel = channel
        channel.makeConnection(self.transport)
        channel.dataReceived(data)

    def _request(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._reply(400, close=True)
            return
        method, target, _version = parts
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                self._reply(400, close=True)
                return
            headers.append((name.lower(), value.strip()))
        request = ConnectRequest(method=method, authority=target if method == "CONNECT" else "",
                                 headers=tuple(headers), path=None if method == "CONNECT"
                                 else target, scheme=None)
        if method != "CONNECT":
            self.tunnels.refused_tunnel(self.info, target, 405, f"method {method}")
            self._reply(405, close=True, extra="Allow: CONNECT\r\n")
            return
        chain = None
        if self.http is not None and self.http.filter_factories:
            sink = TunnelResponseSink(self._chain_head, self._chain_body,
                                      self.transport.abortConnection)  # type: ignore[union-attr]
            chain = self._chain = connect_filter_chain(
                self.http, sink, lambda headers: self._filtered_tunnel(headers, chain))
        if chain is None:
            self._tunnel(request, None)
            return
        # The tunnel's first bytes wait (one read at most) while the filters decide.
        self.transport.pauseProducing()  # type: ignore[union-attr]
        chain.decodeHeaders(Headers([
            (b":method", b"CONNECT"), (b":authority", target.encode("latin-1")),
            *((n.encode("latin-1"), v.encode("latin-1")) for n, v in headers),
        ]), False)

    _chain: FilterManager | None = None
    _lost = False

    def _filtered_tunnel(self, headers: Headers, chain: Any) -> None:
        """A CONNECT's headers passed the HTTP filters (which may have changed them)."""
        if self._lost:
            chain.reset()  # the client gave up while a filter held its CONNECT
            return
        target = (headers.get(b":authority") or b"").decode("latin-1")
        request = ConnectRequest(
            method="CONNECT", authority=target, path=None, scheme=None,
            headers=tuple((n.decode("latin-1"), v.decode("latin-1"))
                          for n, v in headers if not n.startswith(b":")),
        )
        self._tunnel(request, chain)

    def _chain_head(self, headers: Headers, end: bool) -> None:
        """A CONNECT's response head, from its HTTP filters."""
        status = int(headers.get(b":status") or b"500")
        lines = [f"HTTP/1.1 {status} {reason_phrase(status)}"]
        lines += [f"{n.decode('latin-1')}: {v.decode('latin-1')}"
                  for n, v in headers if not n.startswith(b":")]
        if status != 200:
            if headers.get(b"content-length") is None:
                lines.append("Content-Length: 0")
            lines.append("Connection: close")
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))  # type: ignore[union-attr]
        if end and status != 200:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _chain_body(self, data: bytes, end: bool) -> None:
        """A refused CONNECT's response body (the connection closes after it)."""
        if data:
            self.transport.write(data)  # type: ignore[union-attr]
        if end:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _tunnel(self, request: ConnectRequest, chain: FilterManager | None) -> None:
        """Route a CONNECT, connect upstream, answer; then relay (``chain``: its filters)."""
        target = request.authority
        decision = self.router.route(request, self.info)
        state = chain.stream_info.filter_state if chain is not None else None
        if decision.status != 200 or decision.cluster is None:  # None: a direct_response
            self.tunnels.refused_tunnel(self.info, target, decision.status, decision.reason,
                                        route_flags(decision), state=state)
            self._refuse(chain, decision.status, route_flags(decision), decision.reason)
            return
        self.transport.pauseProducing()  # type: ignore[union-attr]
        self._target = target
        self._reject_early_data = decision.reject_early_data
        if self._reject_early_data and self._buffer:
            self._refuse_early_data()
            return
        cluster_name = decision.cluster.name
        relay = Relay(self.reactor, decision.idle_timeout)
        started = time.monotonic()
        d = self._pending = connect_upstream(decision, relay, request, self.info, state)

        def connected(address: Any) -> None:
            self._pending = None
            if chain is None:
                self.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")  # type: ignore[union-attr]
            else:
                chain.encode_headers(Headers([(b":status", b"200")]), False)
                status = chain.sink.status
                if status != 200:
                    # A filter answered otherwise, or held the 200 (a tunnel cannot wait).
                    relay.b.transport.abortConnection()  # type: ignore[union-attr]
                    reason = ("an HTTP filter held the CONNECT's 200" if status is None
                              else f"an HTTP filter answered {status}")
                    self.tunnels.refused_tunnel(self.info, target, status or 500, reason, "-",
                                                cluster_name, state=state)
                    if status is None:
                        self._refuse(chain, 500, "-", reason)
                    chain.finish()
                    return
            self.tunnels.opened += 1
            istio_metrics.tcp_opened(self.info)
            self.tunnels.active += 1

            def done(r: Relay) -> None:
                self.tunnels.finished(self.info, target, r, started, str(address),
                                      cluster_name, state=state)
                if chain is not None:
                    chain.finish()

            relay.on_done = done
            self._relay = relay
            relay.a.makeConnection(H1TunnelTransport(self.transport))
            early, self._buffer = self._buffer, b""
            if early:
                relay.a.dataReceived(early)
            if self._eof and not relay.a.lost:
                relay.a.readConnectionLost()
            relay.start()
            self.tunnels.established(self.reactor, self.info, target, relay, started,
                                     str(address), cluster_name, state=state)
            if not relay.a.lost:
                self.transport.resumeProducing()  # type: ignore[union-attr]

        def failed(f: Failure) -> None:
            self._pending = None
            if f.check(defer.CancelledError):
                return
            error = f.value
            status, reason = status_and_reason(error)
            self.tunnels.refused_tunnel(self.info, target, status, reason,
                                        upstream_flags(error), cluster_name, reason, state=state)
            self._refuse(chain, status, upstream_flags(error), reason)

        d.addCallbacks(connected, failed)

    def _refuse(self, chain: FilterManager | None, status: int, flags: str, reason: str) -> None:
        """Answer a CONNECT we do not tunnel, and close the connection."""
        if chain is None:
            self._reply(status, close=True)
            return
        chain.send_local_reply(status, details=reason, response_flag=flags.strip("-"))
        chain.finish()

    _reject_early_data = False
    _target = ""

    def _refuse_early_data(self) -> None:
        """
        Bytes arrived before our 200 and the route refuses early CONNECT data (Envoy's
        reject_early_connect_data, CVE-2025-64763): 400, nothing reaches the target.
        """
        self._refused = True
        self._buffer = b""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        reason = "data before the CONNECT response (early data refused)"
        self.tunnels.refused_tunnel(self.info, self._target, 400, reason)
        self._reply(400, close=True)
        if self._chain is not None:
            self._chain.finish()

    def readConnectionLost(self) -> None:
        relay = self._relay
        if relay is not None and relay.a.transport is not None:
            relay.a.readConnectionLost()
            return
        if self._channel is not None:
            if IHalfCloseableProtocol.providedBy(self._channel):
                self._channel.readConnectionLost()  # type: ignore[attr-defined]
            else:
                self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if self._pending is not None:
            # CONNECT, maybe data, then EOF while we connect upstream: the target gets the
            # data and then the EOF, after the 200.
            self._eof = True
            return
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        relay = self._relay
        if relay is not None and relay.a.transport is not None:
            relay.a.writeConnectionLost()

    def _reply(self, status: int, close: bool, extra: str = "") -> None:
        text = (
            f"HTTP/1.1 {status} {reason_phrase(status)}\r\n{extra}"
            "Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        self.transport.write(text.encode("latin-1"))  # type: ignore[union-attr]
        if close:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionMade(self) -> None:
        if self.connections is not None:
            self.connections.add(self)

    def send_goaway(self) -> None:
        """
        Drain (the HTTP/2 GOAWAY's counterpart): an open tunnel runs on; an HTTP connection
        closes after the response in progress ("connection: close"); an idle one now.
        """
        channel = self._channel
        if channel is not None:
            channel.drain()  # type: ignore[attr-defined]
        elif self._relay is None and self._pending is None and not self._buffer:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def abort(self, why: str) -> None:
        """The drain deadline passed."""
        self.log.info("{peer}: {why}", peer=self.info.remoteAddress, why=why)
        if self._relay is not None:
            self._relay.close_reason = why
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        if self.connections is not None:
            self.connections.discard(self)
        if self._channel is not None:
            self._channel.connectionLost(reason)
        if self._pending is not None:
            self._pending.cancel()
        if self._relay is not None:
            self._relay.a.connectionLost(reason)
        if self._chain is not None:
            # A filter may still hold the CONNECT (an asynchronous check): it stops now.
            self._chain.reset()


@implementer(IHalfCloseableProtocol)
class SniffingCodec(Protocol):
    """
    Codec AUTO without ALPN: HTTP/2 if the connection starts with the HTTP/2 preface.
    Half-close goes to the codec if it can take it.
    """

    def __init__(self, make_h2: Callable[[], Protocol], make_h1: Callable[[], Protocol]) -> None:
        self.make_h2 = make_h2
        self.make_h1 = make_h1
        self._buffer = b""
        self._codec: Protocol | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._codec is not None:
            self._codec.dataReceived(data)
            return
        self._buffer += data
        if len(self._buffer) < len(H2_PREFACE) and H2_PREFACE.startswith(self._buffer):
            return
        codec = self.make_h2() if self._buffer.startswith(H2_PREFACE) else self.make_h1()
        self._codec = codec
        codec.makeConnection(self.transport)
        data, self._buffer = self._buffer, b""
        codec.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._codec is not None:
            self._codec.connectionLost(reason)

    def readConnectionLost(self) -> None:
        codec = self._codec
        if codec is not None and IHalfCloseableProtocol.providedBy(codec):
            codec.readConnectionLost()  # type: ignore[attr-defined]
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        codec = self._codec
        if codec is not None and IHalfCloseableProtocol.providedBy(codec):
            codec.writeConnectionLost()  # type: ignore[attr-defined]
