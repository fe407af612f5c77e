"""
``envoy.filters.network.set_filter_state``: when a connection arrives, store values built from
substitution formats in the connection's filter state (the same FilterStateValue as the HTTP
filter of that name); every record and format on the connection can read them back with
``%FILTER_STATE(key:PLAIN)%``.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.filters.http.set_filter_state import FilterStateValue, parse_values, store
from hbonex.interfaces import INetworkFilter, INetworkFilterCallbacks, INetworkFilterExtension

NAME = "envoy.filters.network.set_filter_state"
TYPE_URL = "type.googleapis.com/envoy.extensions.filters.network.set_filter_state.v3.Config"


@implementer(INetworkFilter)
class SetFilterStateNetworkFilter:
    """One per connection; it never holds the connection up."""

    def __init__(self, values: tuple[FilterStateValue, ...]) -> None:
        self.values = values

    def onNewConnection(self, callbacks: INetworkFilterCallbacks) -> bool:
        info: Any = callbacks.info
        store(self.values, info.substitutions(), info.filter_state)
        return True

    def onData(self, data: bytes, endStream: bool) -> bool:
        return True

    def onClose(self, reason: object) -> None:
        pass


@implementer(IPlugin, INetworkFilterExtension)
class SetFilterStateNetworkExtension:
    name = NAME
    typeUrls = (TYPE_URL,)
    terminal = False

    def parseConfig(self, config: Any, path: str, context: Any
                    ) -> tuple[FilterStateValue, ...]:
        return parse_values(config.on_new_connection, f"{path}.on_new_connection", context)

    def filterFactory(self, parsed: Any, context: Any
                      ) -> Callable[[], SetFilterStateNetworkFilter]:
        return lambda: SetFilterStateNetworkFilter(parsed)


__all__ = ["SetFilterStateNetworkExtension", "SetFilterStateNetworkFilter"]
