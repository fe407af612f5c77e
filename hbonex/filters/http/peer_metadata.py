"""
``istio.peer_metadata`` (Istio's ``io.istio.http.peer_metadata.Config``, as a TypedStruct):
find out which workload is at each end of a request and leave it in filter state
(``downstream_peer``, ``upstream_peer``) for ``istio.stats`` and access logs.

Discovery methods, tried in order, the first that finds a peer wins:

* ``baggage``: the W3C ``baggage`` header (ztunnel's, on the request downstream; the
  response's, upstream);
* ``workload_discovery``: Istio's workload xDS (WDS), which hbonex has no client for: accepted
  with one warning at load, it never finds a peer;
* ``istio_headers``: the sidecar ``x-envoy-peer-metadata`` headers are removed (as Istio
  does) but not decoded.

Propagation (sending this proxy's own metadata) is accepted with a warning: hbonex has no
workload metadata of its own to send.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.filters.common.peer_metadata import DOWNSTREAM_PEER, UPSTREAM_PEER, PeerMetadata
from hbonex.http.filter_manager import FilterHeadersStatus
from hbonex.http.headers import Headers
from hbonex.http.pass_through import PassThroughFilter
from hbonex.http.stream_info import FilterStateError, SharedWithUpstream
from hbonex.interfaces import IHTTPFilterExtension, IStreamFilter

NAME = "istio.peer_metadata"
TYPE_URL = "type.googleapis.com/io.istio.http.peer_metadata.Config"

BAGGAGE = "baggage"
WORKLOAD_DISCOVERY = "workload_discovery"
ISTIO_HEADERS = "istio_headers"
_DISCOVERY = (BAGGAGE, WORKLOAD_DISCOVERY, ISTIO_HEADERS)
_PEER_HEADERS = (b"x-envoy-peer-metadata", b"x-envoy-peer-metadata-id")


@attrs.frozen
class PeerMetadataConfig:
    downstream: tuple[str, ...] = ()
    upstream: tuple[str, ...] = ()
    shared_with_upstream: bool = False


def _discover(methods: tuple[str, ...], headers: Headers) -> PeerMetadata | None:
    peer = None
    for method in methods:
        if method == ISTIO_HEADERS:
            for name in _PEER_HEADERS:
                headers.remove(name)
        elif method == BAGGAGE and peer is None:
            value = headers.get(b"baggage")
            if value is not None:
                peer = PeerMetadata.from_baggage(value.decode("latin-1"))
    return peer


@implementer(IStreamFilter)
class PeerMetadataFilter(PassThroughFilter):
    """One per request."""

    def __init__(self, config: PeerMetadataConfig) -> None:
        self.config = config
        self.decoder: Any = None

    def setDecoderFilterCallbacks(self, callbacks: Any) -> None:
        self.decoder = callbacks

    def _store(self, key: str, peer: PeerMetadata | None, shared: SharedWithUpstream) -> None:
        if peer is None:
            return
        try:
            self.decoder.streamInfo().filter_state.set_data(key, peer, shared, True)
        except FilterStateError:
            pass  # an earlier filter (or the CONNECT's connection) already knows the peer

    def decodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        if self.config.downstream:
            shared = (SharedWithUpstream.ONCE if self.config.shared_with_upstream
                      else SharedWithUpstream.NONE)
            self._store(DOWNSTREAM_PEER, _discover(self.config.downstream, headers), shared)
        return FilterHeadersStatus.Continue

    def encodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        if self.config.upstream:
            self._store(UPSTREAM_PEER, _discover(self.config.upstream, headers),
                        SharedWithUpstream.NONE)
        return FilterHeadersStatus.Continue


def _methods(node: Any, key: str, context: Any) -> tuple[str, ...]:
    methods = []
    for item in node.list_field(key):
        found = item.oneof(*_DISCOVERY)
        assert found is not None
        method, settings = found
        settings.expect_map()
        if method == ISTIO_HEADERS:
            settings.bool_field("skip_external_clusters")
            context.warn(settings.path, f"{NAME}: istio_headers: the x-envoy-peer-metadata "
                         "headers are removed but not decoded (no sidecar metadata exchange)")
        elif method == WORKLOAD_DISCOVERY:
            context.warn(settings.path, f"{NAME}: workload_discovery: hbonex has no workload "
                         "xDS (WDS) client, so this method never finds a peer; ztunnel's "
                         "baggage header is read with `baggage: {}`")
        settings.finish()
        item.finish()
        methods.append(method)
    return tuple(methods)


def parse_config(config: Any, path: str, context: Any) -> PeerMetadataConfig:
    node = context.node(config, path).expect_map()
    parsed = PeerMetadataConfig(
        downstream=_methods(node, "downstream_discovery", context),
        upstream=_methods(node, "upstream_discovery", context),
        shared_with_upstream=node.bool_field("shared_with_upstream"),
    )
    for key in ("downstream_propagation", "upstream_propagation"):
        for item in node.list_field(key):
            found = item.oneof(ISTIO_HEADERS, BAGGAGE)
            assert found is not None
            found[1].expect_map()
            found[1].bool_field("skip_external_clusters")
            found[1].finish()
            item.finish()
            context.warn(item.path, f"{NAME}: {key}: hbonex has no workload metadata of its "
                         "own to send; nothing is propagated")
    if node.list_field("additional_labels"):
        context.warn(f"{path}.additional_labels", f"{NAME}: additional_labels come from "
                     "workload discovery, which hbonex does not have: ignored")
    node.finish()
    return parsed


@implementer(IPlugin, IHTTPFilterExtension)
class PeerMetadataExtension:
    name = NAME
    typeUrls = (TYPE_URL,)

    def parseConfig(self, config: Any, path: str, context: Any) -> PeerMetadataConfig:
        return parse_config(config, path, context)

    def filterFactory(self, parsed: Any, context: Any
                      ) -> Callable[[], PeerMetadataFilter]:
        return lambda: PeerMetadataFilter(parsed)


__all__ = ["PeerMetadataConfig", "PeerMetadataExtension", "PeerMetadataFilter"]
