"""
HTTP/1.1 request proxying for the http_connection_manager: requests that are not CONNECT are
routed like Envoy's router filter does and forwarded to the route's cluster as HTTP/1.1 (the
cluster may be an internal listener whose tcp_proxy tunnels them — the article's client side).

Downstream parsing is ``twisted.web.http.HTTPChannel``; upstream is ``twisted.web.client.Agent``
over an endpoint that connects through the cluster, with a persistent pool per cluster.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory
from zope.interface import implementer

from hbonex.cluster import UpstreamRequest
from hbonex.connect import ConnectRequest
from hbonex.errors import UpstreamError

log = Logger(namespace="hbonex.http_proxy")

HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
     b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization"}
)


@implementer(IStreamClientEndpoint)
class ClusterEndpoint:
    """
    A client endpoint that connects through a cluster (TCP, TLS or an internal listener).
    """

    def __init__(self, cluster: Any, request: UpstreamRequest) -> None:
        self.cluster = cluster
        self.request = request

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[Any]:
        proto = protocolFactory.buildProtocol(None)  # type: ignore[arg-type]
        d = self.cluster.connect_stream(proto, self.request)
        return d.addCallback(lambda _: proto)


@implementer(IAgentEndpointFactory)
class ClusterEndpointFactory:
    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster

    def endpointForURI(self, uri: Any) -> ClusterEndpoint:
        return ClusterEndpoint(self.cluster, UpstreamRequest())


class Agents:
    """
    One pooled Agent per cluster.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 16
        self._agents: dict[str, Agent] = {}

    def for_cluster(self, cluster: Any) -> Agent:
        agent = self._agents.get(cluster.name)
        if agent is None:
            agent = Agent.usingEndpointFactory(
                self.reactor, ClusterEndpointFactory(cluster), pool=self.pool
            )
            self._agents[cluster.name] = agent
        return agent


class _BodyForwarder(protocol.Protocol):
    def __init__(self, request: ProxyRequest) -> None:
        self.request = request

    def dataReceived(self, data: bytes) -> None:
        if not self.request._disconnected:
            self.request.write(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.request._disconnected:
            return
        if reason.check(ResponseDone, http.PotentialDataLoss):
            self.request.finish()
        else:
            # The upstream broke mid-body: the client must not take a truncated body as whole.
            self.request.channel.transport.abortConnection()  # type: ignore[union-attr]


class ProxyRequest(http.Request):
    """
    One downstream request: route it, forward it, stream the response back.
    """

    channel: ProxyChannel

    def process(self) -> None:
        # Kept for the access log: twisted.web drops ``channel`` and ``content`` before it
        # fires notifyFinish.
        ctx = self._context = self.channel.context
        content = self.content
        assert content is not None
        content.seek(0, 2)
        self._received = content.tell()
        content.seek(0)
        self._started = time.monotonic()
        self._upstream_host = ""
        if ctx.tunnels is not None:
            self.notifyFinish().addBoth(self._access_log)
        method = self.method.decode("latin-1")
        host = (self.getHeader(b"host") or b"").decode("latin-1")
        if method == "CONNECT":
            self._reply(400, b"CONNECT must be the first request on a connection\n")
            return
        headers = tuple(
            (k.decode("latin-1").lower(), v.decode("latin-1"))
            for k, vs in self.requestHeaders.getAllRawHeaders() for v in vs
        )
        request = ConnectRequest(
            method=method, authority=host, headers=headers,
            path=self.uri.decode("latin-1"), scheme="http",
        )
        decision = ctx.router.route(request, ctx.info)
        if decision.status != 200 or decision.kind != "http":
            status = decision.status if decision.status != 200 else 501
            self._reply(status, decision.body or f"{decision.reason}\n".encode())
            return
        upstream_headers = Headers()
        for name, values in self.requestHeaders.getAllRawHeaders():
            # Content-Length: the Agent sets it from the body; a second one is a 400.
            if name.lower() not in HOP_BY_HOP and name.lower() not in (b"host", b"content-length"):
                upstream_headers.setRawHeaders(name, values)
        upstream_headers.setRawHeaders(b"host", [host.encode("latin-1")])
        peer = ctx.info.remoteAddress.rsplit(":", 1)[0].strip("[]")
        upstream_headers.addRawHeader(b"x-forwarded-for", peer.encode())
        body: Optional[FileBodyProducer] = (
            FileBodyProducer(content) if self._received or method in ("POST", "PUT", "PATCH")
            else None
        )
        agent = ctx.agents.for_cluster(decision.cluster)
        uri = b"http://" + (host or "upstream").encode("latin-1") + self.uri
        d = agent.request(self.method, uri, upstream_headers, body)
        d.addTimeout(ctx.route_timeout, ctx.reactor)
        self.notifyFinish().addErrback(lambda _: d.cancel())
        d.addCallbacks(self._respond, self._failed)

    def _access_log(self, result: Any) -> None:
        ctx = self._context
        ctx.tunnels.record(
            ctx.info, (self.getHeader(b"host") or b"").decode("latin-1"), self.code,
            f"{self.method.decode('latin-1')} {self.uri.decode('latin-1')}",
            self._received, self.sentLength, time.monotonic() - self._started,
            self._upstream_host,
        )

    def _respond(self, response: Any) -> None:
        if self._disconnected:
            return
        self.setResponseCode(response.code, response.phrase)
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in HOP_BY_HOP and name.lower() != b"content-length":
                self.responseHeaders.setRawHeaders(name, values)
        if response.length is not None and response.length is not UNKNOWN_LENGTH:
            self.responseHeaders.setRawHeaders(b"content-length", [str(response.length).encode()])
        response.deliverBody(_BodyForwarder(self))

    def _failed(self, failure: Failure) -> None:
        if self._disconnected:
            return
        if failure.check(defer.TimeoutError, defer.CancelledError):
            self._reply(504, b"upstream request timeout\n")
            return
        error = failure.value
        reason = error.reason if isinstance(error, UpstreamError) else str(error)
        log.warn("{method} {uri}: upstream failed: {reason}", method=self.method,
                 uri=self.uri, reason=reason)
        self._reply(503, b"upstream connect error or disconnect/reset before headers\n")

    def _reply(self, status: int, body: bytes) -> None:
        self.setResponseCode(status)
        self.responseHeaders.setRawHeaders(b"content-type", [b"text/plain"])
        self.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
        self.write(body)
        self.finish()


class ProxyContext:
    def __init__(self, reactor: Any, router: Any, info: Any, agents: Agents,
                 tunnels: Any = None, route_timeout: float = 15.0) -> None:
        self.reactor = reactor
        self.router = router
        self.info = info
        self.agents = agents
        #: hbonex.tunnel_server.TunnelLog: the HCM's counters and access log.
        self.tunnels = tunnels
        self.route_timeout = route_timeout


class ProxyChannel(http.HTTPChannel):
    requestFactory = ProxyRequest

    def __init__(self, context: ProxyContext, idle_timeout: float = 300.0) -> None:
        super().__init__()
        self.context = context
        self.timeOut = int(idle_timeout)
        self.callLater = context.reactor.callLater  # type: ignore[assignment]
