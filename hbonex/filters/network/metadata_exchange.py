"""
``istio.metadata_exchange`` (Istio's ``envoy.tcp.metadataexchange.config.MetadataExchange``,
as a TypedStruct): sidecars exchange workload metadata in-band after negotiating the
``istio-peer-exchange`` ALPN.  Under ambient no peer speaks it (ztunnel sends baggage, read by
``istio.peer_metadata``), so the filter is accepted, warned about once, and passes every byte
through untouched.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.interfaces import INetworkFilter, INetworkFilterCallbacks, INetworkFilterExtension

NAME = "istio.metadata_exchange"
TYPE_URL = "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange"


@implementer(INetworkFilter)
class MetadataExchangeFilter:
    """Passes everything on."""

    def onNewConnection(self, callbacks: INetworkFilterCallbacks) -> bool:
        return True

    def onData(self, data: bytes, endStream: bool) -> bool:
        return True

    def onClose(self, reason: object) -> None:
        pass


@implementer(IPlugin, INetworkFilterExtension)
class MetadataExchangeExtension:
    name = NAME
    typeUrls = (TYPE_URL,)
    terminal = False

    def parseConfig(self, config: Any, path: str, context: Any) -> None:
        node = context.node(config, path).expect_map()
        node.str_field("protocol", "")
        node.bool_field("enable_discovery")
        node.list_field("additional_labels")
        node.finish()
        context.warn(path, f"{NAME}: no effect: the ALPN-based metadata exchange has no "
                     "peer under ambient (istio.peer_metadata reads ztunnel's baggage)")

    def filterFactory(self, parsed: Any, context: Any) -> Callable[[], MetadataExchangeFilter]:
        return MetadataExchangeFilter


__all__ = ["MetadataExchangeExtension", "MetadataExchangeFilter"]
