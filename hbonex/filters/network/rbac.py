"""
``envoy.filters.network.rbac``: allow or close each connection by Envoy's RBAC policies
(hbonex.filters.common.rbac) on its facts: the mTLS peer's SPIFFE id, the addresses, the SNI
and the connection's filter state.  It goes before the terminal filter (tcp_proxy, the HCM);
a refused connection is closed before any later filter runs, so nothing is relayed and no
upstream connection is made (after ``delay_deny``, if set: its bytes are dropped meanwhile).

The decision is made when the connection starts (after its TLS handshake and listener
filters), not on its first byte as Envoy does: the facts RBAC reads at L4 are the same then,
and a denied peer of a server-first protocol never hears the server.  With
``enforcement_type: CONTINUOUS`` the rules are checked again on every read (the connection's
filter state may have changed).

Stats (Envoy's names): ``<stat_prefix>.rbac.allowed`` / ``denied``,
``<stat_prefix>.rbac.[<shadow_rules_stat_prefix>]shadow_allowed`` / ``shadow_denied``; the
shadow result goes to the connection's dynamic metadata ``envoy.filters.network.rbac``.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.filters.common.rbac import (
    Attributes,
    Engine,
    RbacStats,
    log_hint,
    response_detail,
)
from hbonex.filters.common.rbac_config import parse_rules
from hbonex.interfaces import INetworkFilter, INetworkFilterCallbacks, INetworkFilterExtension

__all__ = ["RbacNetworkConfig", "RbacNetworkExtension", "RbacNetworkFilter"]

NAME = "envoy.filters.network.rbac"
TYPE_URL = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"

log = Logger(namespace="hbonex.rbac")


@attrs.frozen
class RbacNetworkConfig:
    stats: RbacStats
    engine: Engine | None = None
    shadow: Engine | None = None
    shadow_rules_stat_prefix: str = ""
    continuous: bool = False
    delay_deny: float = 0.0
    reactor: Any = None


@implementer(INetworkFilter)
class RbacNetworkFilter:
    """One per connection."""

    def __init__(self, config: RbacNetworkConfig) -> None:
        self.config = config
        self.callbacks: INetworkFilterCallbacks | None = None
        self.denied = False
        self._close_call: Any = None

    def onNewConnection(self, callbacks: INetworkFilterCallbacks) -> bool:
        self.callbacks = callbacks
        return self._check()

    def onData(self, data: bytes, endStream: bool) -> bool:
        if self.denied:
            return False  # held until the delayed close: nothing goes further
        if self.config.continuous:
            return self._check()
        return True

    def onClose(self, reason: object) -> None:
        if self._close_call is not None and self._close_call.active():
            self._close_call.cancel()
        self._close_call = None

    def _check(self) -> bool:
        config = self.config
        assert self.callbacks is not None
        info: Any = self.callbacks.info
        attributes = Attributes(info)
        if config.shadow is not None:
            shadow = config.shadow.evaluate(attributes)
            config.stats.count(shadow, shadow=True)
            fields = {f"{config.shadow_rules_stat_prefix}shadow_engine_result": shadow.result}
            if shadow.policy:
                fields[f"{config.shadow_rules_stat_prefix}shadow_effective_policy_id"] = (
                    shadow.policy)
            info.dynamic_metadata.setdefault(NAME, {}).update(fields)
        if config.engine is None:
            return True
        decision = config.engine.evaluate(attributes)
        config.stats.count(decision, shadow=False)
        hint = log_hint(config.engine, decision)
        if hint is not None:
            info.dynamic_metadata.setdefault("envoy.common", {}).update(hint)
        if decision.allowed:
            return True
        self.denied = True
        log.info("RBAC closed a connection from {peer} on {listener}: {details}",
                 peer=info.peerIdentity or info.remoteAddress, listener=info.listenerName,
                 details=response_detail(decision.policy))
        if config.delay_deny > 0:
            self._close_call = config.reactor.callLater(config.delay_deny, self._close)
        else:
            self._close()
        return False  # the chain does not go on: no later filter sees this connection

    def _close(self) -> None:
        self._close_call = None
        if self.callbacks is not None:
            self.callbacks.transport.loseConnection()


@implementer(IPlugin, INetworkFilterExtension)
class RbacNetworkExtension:
    """Not terminal: a tcp_proxy or http_connection_manager follows it."""

    name = NAME
    typeUrls = (TYPE_URL,)
    terminal = False

    def parseConfig(self, config: Any, path: str, context: Any) -> RbacNetworkConfig:
        if not config.stat_prefix:
            raise context.error(path, "missing required field 'stat_prefix'")
        enum = config.DESCRIPTOR.fields_by_name["enforcement_type"].enum_type
        delay = 0.0
        if config.HasField("delay_deny"):
            delay = config.delay_deny.seconds + config.delay_deny.nanos / 1e9
        return RbacNetworkConfig(
            stats=RbacStats(config.stat_prefix, "", config.shadow_rules_stat_prefix),
            engine=(parse_rules(config.rules, f"{path}.rules", context, network=True)
                    if config.HasField("rules") else None),
            shadow=(parse_rules(config.shadow_rules, f"{path}.shadow_rules", context,
                                network=True)
                    if config.HasField("shadow_rules") else None),
            shadow_rules_stat_prefix=config.shadow_rules_stat_prefix,
            continuous=enum.values_by_number[config.enforcement_type].name == "CONTINUOUS",
            delay_deny=delay,
            reactor=context.reactor,
        )

    def filterFactory(self, parsed: Any, context: Any
                      ) -> Callable[[], RbacNetworkFilter]:
        return lambda: RbacNetworkFilter(parsed)

    def describe(self, parsed: RbacNetworkConfig) -> list[str]:
        def text(engine: Engine | None) -> str:
            if engine is None:
                return "none"
            return f"{engine.action.value} {', '.join(p.name for p in engine.policies) or '-'}"

        return [f"rules: {text(parsed.engine)}; shadow: {text(parsed.shadow)}"]
