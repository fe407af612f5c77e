"""
``envoy.filters.network.connection_limit``: at most ``max_connections`` active connections
through one filter chain's filter.  Past the limit a new connection is closed (after ``delay``,
if set; nothing it sends is passed on meanwhile) and counted.

Stats (Envoy's names): ``connection_limit.<stat_prefix>.limited_connections`` (counter) and
``connection_limit.<stat_prefix>.active_connections`` (gauge).
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.interfaces import INetworkFilter, INetworkFilterCallbacks, INetworkFilterExtension
from hbonex.observability.stats import STATS, Counter, Gauge

__all__ = [
    "CONNECTION_LIMIT",
    "CONNECTION_LIMIT_TYPE",
    "ConnectionLimitConfig",
    "ConnectionLimitExtension",
    "ConnectionLimitFilter",
    "parse_connection_limit",
]

log = Logger(namespace="hbonex.connection_limit")

CONNECTION_LIMIT = "envoy.filters.network.connection_limit"
CONNECTION_LIMIT_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit"
)


@attrs.define(eq=False)
class ConnectionLimitConfig:
    """
    One per configured filter (so per filter chain): the count is shared by its connections.
    """

    stat_prefix: str
    max_connections: int
    reactor: Any
    delay: float = 0.0
    active: int = 0
    limited: Counter = attrs.field(init=False)
    active_gauge: Gauge = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.limited = STATS.counter(f"connection_limit.{self.stat_prefix}.limited_connections")
        self.active_gauge = STATS.gauge(f"connection_limit.{self.stat_prefix}.active_connections")


@implementer(INetworkFilter)
class ConnectionLimitFilter:
    """
    One per downstream connection.
    """

    def __init__(self, config: ConnectionLimitConfig) -> None:
        self.config = config
        self.counted = False
        self.rejected = False
        self._close_call: Any = None
        self._callbacks: INetworkFilterCallbacks | None = None

    def onNewConnection(self, callbacks: INetworkFilterCallbacks) -> bool:
        config = self.config
        self._callbacks = callbacks
        if config.active < config.max_connections:
            config.active += 1
            config.active_gauge.inc()
            self.counted = True
            return True
        self.rejected = True
        config.limited.inc()
        n = config.limited.value
        if n & (n - 1) == 0 or n % 1000 == 0:  # 1st, 2nd, 4th... not one line per refusal
            log.warn(
                "connection_limit {prefix}: connection from {peer} closed: {active} "
                "connections active, the limit is {limit} ({n} limited so far)",
                prefix=config.stat_prefix, peer=callbacks.info.remoteAddress,
                active=config.active, limit=config.max_connections, n=n,
            )
        if config.delay > 0:
            self._close_call = config.reactor.callLater(config.delay, self._close)
        else:
            self._close()
        return False  # the chain never goes on for this connection

    def _close(self) -> None:
        self._close_call = None
        if self._callbacks is not None:
            self._callbacks.transport.loseConnection()

    def onData(self, data: bytes, endStream: bool) -> bool:
        return not self.rejected

    def onClose(self, reason: object) -> None:
        if self._close_call is not None and self._close_call.active():
            self._close_call.cancel()
        self._close_call = None
        if self.counted:
            self.counted = False
            self.config.active -= 1
            self.config.active_gauge.dec()


def parse_connection_limit(message: Any, path: str, context: Any) -> ConnectionLimitConfig:
    """
    A ConnectionLimit message (``typed_config`` at YAML ``path``) -> ConnectionLimitConfig.
    """
    if not message.stat_prefix:
        raise context.error(path, "missing required field 'stat_prefix'")
    if not message.HasField("max_connections"):
        raise context.error(path, "missing required field 'max_connections'")
    limit = message.max_connections.value
    if limit < 1:
        raise context.error(f"{path}.max_connections", f"must be at least 1, got {limit}")
    delay = 0.0
    if message.HasField("delay"):
        delay = message.delay.seconds + message.delay.nanos / 1e9
    return ConnectionLimitConfig(message.stat_prefix, limit, context.reactor, delay=delay)


@implementer(IPlugin, INetworkFilterExtension)
class ConnectionLimitExtension:
    """
    The ``envoy.filters.network.connection_limit`` plugin (registered in
    twisted/plugins/hbonex_extensions.py); not terminal: a tcp_proxy or
    http_connection_manager follows it.
    """

    name = CONNECTION_LIMIT
    typeUrls = (CONNECTION_LIMIT_TYPE,)
    terminal = False

    def parseConfig(self, config: Any, path: str, context: Any) -> ConnectionLimitConfig:
        return parse_connection_limit(config, path, context)

    def filterFactory(self, parsed: Any, context: Any
                      ) -> Callable[[], ConnectionLimitFilter]:
        return lambda: ConnectionLimitFilter(parsed)

    def describe(self, parsed: ConnectionLimitConfig) -> list[str]:
        delay = f", closed after {parsed.delay:g} s" if parsed.delay else ""
        return [f"at most {parsed.max_connections} active connections{delay}"]
