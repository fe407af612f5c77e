"""
``istio.stats`` as a network filter (the same ``stats.PluginConfig``): Istio's TCP metrics
(``istio_tcp_connections_opened/closed_total``, ``istio_tcp_received_bytes_total``,
``istio_tcp_sent_bytes_total``) for the connections of a filter chain, with its reporter.
Bytes received are counted as they pass this filter; bytes sent are counted on the downstream
transport's writes.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.filters.common.istio_stats_config import TYPE_URL, StatsConfig, parse_stats_config
from hbonex.interfaces import INetworkFilter, INetworkFilterCallbacks, INetworkFilterExtension
from hbonex.observability import istio_metrics

NAME = "istio.stats"


@implementer(INetworkFilter)
class IstioStatsNetworkFilter:
    """One per connection; it never holds the connection up."""

    def __init__(self, config: StatsConfig) -> None:
        self.config = config
        self.info: Any = None
        self.received = 0
        self.sent = 0

    def onNewConnection(self, callbacks: INetworkFilterCallbacks) -> bool:
        self.info = callbacks.info
        self._count_writes(callbacks.transport)
        istio_metrics.tcp_opened(self.info, self.config.reporter, self.config.drop)
        return True

    def _count_writes(self, transport: Any) -> None:
        """Count the bytes written to the downstream, whoever writes them."""
        write = transport.write
        write_sequence = getattr(transport, "writeSequence", None)

        def counted(data: bytes) -> None:
            self.sent += len(data)
            write(data)

        def counted_sequence(data: Any) -> None:
            data = list(data)
            self.sent += sum(len(d) for d in data)
            assert write_sequence is not None
            write_sequence(data)

        try:
            transport.write = counted
            if write_sequence is not None:
                transport.writeSequence = counted_sequence
        except AttributeError:  # a transport with fixed attributes: sent bytes stay 0
            pass

    def onData(self, data: bytes, endStream: bool) -> bool:
        self.received += len(data)
        return True

    def onClose(self, reason: object) -> None:
        if self.info is not None:
            istio_metrics.tcp_closed(self.info, self.sent, self.received,
                                     reporter=self.config.reporter, drop=self.config.drop)


@implementer(IPlugin, INetworkFilterExtension)
class IstioStatsNetworkExtension:
    name = NAME
    typeUrls = (TYPE_URL,)
    terminal = False

    def parseConfig(self, config: Any, path: str, context: Any) -> StatsConfig:
        parsed = parse_stats_config(config, path, context, NAME)
        if parsed.tags_to_remove:
            context.warn(f"{path}.metrics", f"{NAME}: tags_to_remove applies to request "
                         "metrics only in hbonex; TCP metrics keep every label")
        return parsed

    def filterFactory(self, parsed: Any, context: Any
                      ) -> Callable[[], IstioStatsNetworkFilter]:
        return lambda: IstioStatsNetworkFilter(parsed)


__all__ = ["IstioStatsNetworkExtension", "IstioStatsNetworkFilter"]
