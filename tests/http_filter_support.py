"""
In-memory HCM chains for HTTP filter unit tests: a YAML connection manager loaded as
hbone-server would, its http_filters and route table driving a FilterManager whose last
filter stands in for the upstream.
"""

from __future__ import annotations

import textwrap
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from hbonex.config import load_config
from hbonex.http.connection_manager import route_resolver
from hbonex.http.filter_manager import FilterHeadersStatus, FilterManager
from hbonex.http.headers import Headers
from hbonex.interfaces import IStreamDecoderFilter
from hbonex.network.listener import ConnectionInfo
from tests.test_http_filter_manager import Sink

HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager")

TEMPLATE = """\
static_resources:
  listeners:
  - name: http
    address:
      socket_address: {{address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm}
          stat_prefix: t
          route_config:
{route_config}
            virtual_hosts:
            - name: all
              domains: ["*"]
{vhost}
              routes:
{routes}
          http_filters:
{filters}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    connect_timeout: 1s
    load_assignment:
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: 8080}}
"""

DEFAULT_ROUTES = """\
- match: {prefix: /}
  route: {cluster: backend}
"""


def hcm_yaml(filters: str, routes: str = DEFAULT_ROUTES, vhost: str = "",
             route_config: str = "") -> str:
    return TEMPLATE.format(hcm=HCM_TYPE, filters=textwrap.indent(filters, " " * 10),
                           routes=textwrap.indent(routes, " " * 14),
                           vhost=textwrap.indent(vhost, " " * 14),
                           route_config=textwrap.indent(route_config, " " * 12))


def load_hcm(text: str) -> Any:
    """The parsed HttpConnectionManagerConfig of the YAML's one listener."""
    loaded = load_config(text, MemoryReactorClock())
    [listener] = loaded.listeners
    return listener.chains[0].filters[0].parsed


@implementer(IStreamDecoderFilter)
class Upstream:
    """Stands for the router: keeps the request's headers, answers with ``response``."""

    def __init__(self, response: Headers, end: bool = True) -> None:
        self.response = response
        self.end = end
        self.request: Headers | None = None

    def setDecoderFilterCallbacks(self, callbacks: Any) -> None:
        self.callbacks = callbacks

    def decodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        self.request = headers.copy()
        self.callbacks.encodeHeaders(self.response, self.end)
        return FilterHeadersStatus.StopIteration

    def decodeData(self, data: bytes, endStream: bool) -> Any:
        return None

    def decodeTrailers(self, trailers: Headers) -> Any:
        return None

    def onDestroy(self) -> None:
        pass


def run(config: Any, request: Headers, response: Headers | None = None,
        info: Any = None, filters: list[Any] | None = None, end: bool = True
        ) -> tuple[Upstream, Headers, Sink, FilterManager]:
    """
    One request through the configured filters and a stand-in upstream: (upstream, the
    response headers the client got, the sink, the manager).
    """
    upstream = Upstream(response if response is not None else Headers([(b":status", b"200")]),
                        end)
    made = filters if filters is not None else [f() for f in config.http_filters]
    sent: list[Headers] = []

    class Capture(Sink):
        def sendHeaders(self, headers: Headers, endStream: bool) -> None:
            sent.append(headers)
            super().sendHeaders(headers, endStream)

    sink = Capture()
    if info is None:
        info = ConnectionInfo("http", "10.0.0.1:5555", "10.0.0.2:80",
                              peerIdentity="spiffe://cluster.local/ns/a/sa/client")
    manager = FilterManager([*made, upstream], sink, connection_info=info,
                            route_resolver=route_resolver(config.router),
                            names=[*(f.name for f in config.http_filters), "upstream"])
    manager.decodeHeaders(request, end)
    return upstream, (sent[0] if sent else Headers()), sink, manager
