"""
``envoy.transport_sockets.internal_upstream`` (InternalUpstreamTransport): a cluster's
transport socket for connections to internal listeners that passes metadata across the hop.
Each ``passthrough_metadata`` entry names a ``filter_metadata`` namespace of the chosen host
(its lb_endpoint's ``metadata``) or of the cluster; the internal listener's connection starts
with those namespaces as its dynamic metadata (where the original_dst listener filter finds
``envoy.filters.listener.original_dst.local``, as Istio's waypoint puts it there).

The wrapped ``transport_socket`` must be raw_buffer: an internal connection carries no TLS
here.  Filter state crosses the hop without this socket (its ``shared_with_upstream``
objects always do).
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.errors import ConfigError
from hbonex.interfaces import ITransportSocketExtension

NAME = "envoy.transport_sockets.internal_upstream"
TYPE_URL = ("type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3."
            "InternalUpstreamTransport")
#: The metadata kinds Envoy's internal_upstream reads (request and route are not).
KINDS = ("host", "cluster")


@attrs.frozen
class InternalUpstreamConfig:
    path: str
    #: ("host" | "cluster", namespace) in configuration order.
    passthrough_metadata: tuple[tuple[str, str], ...] = ()


@implementer(IPlugin, ITransportSocketExtension)
class InternalUpstreamTransportSocket:
    name = NAME
    typeUrls = (TYPE_URL,)

    def parseConfig(self, config: Any, path: str, context: Any) -> InternalUpstreamConfig:
        sources = []
        for index, source in enumerate(config.passthrough_metadata):
            where = f"{path}.passthrough_metadata[{index}]"
            if not source.HasField("kind"):
                raise context.error(where, "missing required field 'kind' (host: {} or "
                                    "cluster: {})")
            kind = source.kind.WhichOneof("kind")
            if kind not in KINDS:
                raise context.error(
                    f"{where}.kind", f"metadata kind {kind or 'unset'!r} is not supported "
                    "here; use host: {} (the endpoint's metadata) or cluster: {}",
                    kind)
            if not source.name:
                raise context.error(where, "missing required field 'name' (the "
                                    "filter_metadata namespace to pass, e.g. "
                                    "envoy.filters.listener.original_dst)")
            sources.append((kind, source.name))
        if not config.HasField("transport_socket"):
            raise context.error(
                path, "missing required field 'transport_socket' (the wrapped socket: "
                "{name: envoy.transport_sockets.raw_buffer, typed_config: {'@type': "
                "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3."
                "RawBuffer}})")
        inner_path = f"{path}.transport_socket"
        settings, _ = context.transport_socket(config.transport_socket, inner_path,
                                               upstream=True)
        if settings is not None:
            raise context.error(inner_path, "internal connections carry no TLS in hbonex: "
                                "wrap envoy.transport_sockets.raw_buffer")
        return InternalUpstreamConfig(path, tuple(sources))

    def buildTransport(self, parsed: Any, upstream: bool, context: Any) -> None:
        if not upstream:
            raise ConfigError(f"{parsed.path}.@type", f"{NAME} is an upstream transport "
                              "socket: it belongs on a cluster, not a listener")
        return None


__all__ = ["InternalUpstreamConfig", "InternalUpstreamTransportSocket"]
