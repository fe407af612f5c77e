"""
``envoy.filters.http.rbac``: allow or refuse each request by Envoy's RBAC policies
(hbonex.filters.common.rbac) on its headers and its connection (peer SPIFFE id, addresses,
SNI, filter state).  A refused request gets 403 ``RBAC: access denied`` with response code
details ``rbac_access_denied_matched_policy[<policy>]``; ``shadow_rules`` are evaluated and
counted only.  A route's RBACPerRoute replaces the rules (an empty one switches them off).

Stats (Envoy's names): ``http.<hcm stat_prefix>.rbac.[<rules_stat_prefix>]allowed`` /
``denied``, ``...rbac.[<shadow_rules_stat_prefix>]shadow_allowed`` / ``shadow_denied``.
Dynamic metadata ``envoy.filters.http.rbac``: ``shadow_effective_policy_id``,
``shadow_engine_result``, ``enforced_effective_policy_id``, ``enforced_engine_result``
(each behind its stat prefix); a LOG engine sets ``envoy.common.access_log_hint``.
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
from hbonex.http.filter_manager import (
    FilterHeadersStatus,
)
from hbonex.http.headers import Headers
from hbonex.http.pass_through import PassThroughDecoderFilter
from hbonex.interfaces import IHTTPFilterPerRouteExtension, IStreamDecoderFilter

__all__ = ["RbacConfig", "RbacExtension", "RbacFilter", "RbacRules"]

NAME = "envoy.filters.http.rbac"
TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
PER_ROUTE_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute"
DENIED_BODY = b"RBAC: access denied"

log = Logger(namespace="hbonex.rbac")


@attrs.frozen
class RbacRules:
    """One RBAC message (the filter's, or a route's): its engines and key prefixes."""

    engine: Engine | None = None
    shadow: Engine | None = None
    rules_stat_prefix: str = ""
    shadow_rules_stat_prefix: str = ""
    per_rule_stats: bool = False


@attrs.frozen
class RbacConfig:
    rules: RbacRules
    stats: RbacStats


@implementer(IStreamDecoderFilter)
class RbacFilter(PassThroughDecoderFilter):
    """One per request; decides on the request headers."""

    def __init__(self, config: RbacConfig) -> None:
        self.config = config
        self.callbacks: Any = None

    def setDecoderFilterCallbacks(self, callbacks: Any) -> None:
        self.callbacks = callbacks

    def decodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        own = self.config.rules
        route: RbacRules | None = self.callbacks.perFilterConfig()
        rules = route if route is not None else own
        # Envoy: a route's non-empty stat prefixes rename the metadata keys (not the stats).
        rules_prefix = (route and route.rules_stat_prefix) or own.rules_stat_prefix
        shadow_prefix = (route and route.shadow_rules_stat_prefix) or own.shadow_rules_stat_prefix
        if rules.engine is None and rules.shadow is None:
            return FilterHeadersStatus.Continue
        info = self.callbacks.streamInfo()
        attributes = Attributes(self.callbacks.connection(), headers, info.filter_state)
        stats = self.config.stats
        fields: dict[str, Any] = {}
        if rules.shadow is not None:
            shadow = rules.shadow.evaluate(attributes)
            stats.count(shadow, shadow=True, per_rule=rules.per_rule_stats)
            if shadow.policy:
                fields[f"{shadow_prefix}shadow_effective_policy_id"] = shadow.policy
            fields[f"{shadow_prefix}shadow_engine_result"] = shadow.result
        status = FilterHeadersStatus.Continue
        if rules.engine is not None:
            decision = rules.engine.evaluate(attributes)
            stats.count(decision, shadow=False, per_rule=rules.per_rule_stats)
            if decision.policy:
                fields[f"{rules_prefix}enforced_effective_policy_id"] = decision.policy
            fields[f"{rules_prefix}enforced_engine_result"] = decision.result
            hint = log_hint(rules.engine, decision)
            if hint is not None:
                info.dynamic_metadata.setdefault("envoy.common", {}).update(hint)
            if not decision.allowed:
                status = FilterHeadersStatus.StopIteration
                log.debug("RBAC denied a request from {peer} (policy {policy})",
                          peer=attributes.peer_identity or attributes.info.remoteAddress,
                          policy=decision.policy or "none")
        info.dynamic_metadata.setdefault(NAME, {}).update(fields)
        if status is FilterHeadersStatus.StopIteration:
            self.callbacks.sendLocalReply(403, DENIED_BODY, None,
                                          response_detail(decision.policy), "")
        return status


def parse_rbac(message: Any, path: str, context: Any) -> RbacRules:
    """The HTTP filter's RBAC message (or a route's) -> its rules."""
    return RbacRules(
        engine=(parse_rules(message.rules, f"{path}.rules", context)
                if message.HasField("rules") else None),
        shadow=(parse_rules(message.shadow_rules, f"{path}.shadow_rules", context)
                if message.HasField("shadow_rules") else None),
        rules_stat_prefix=message.rules_stat_prefix,
        shadow_rules_stat_prefix=message.shadow_rules_stat_prefix,
        per_rule_stats=message.track_per_rule_stats,
    )


@implementer(IPlugin, IHTTPFilterPerRouteExtension)
class RbacExtension:
    name = NAME
    typeUrls = (TYPE_URL,)
    perRouteTypeUrls = (PER_ROUTE_TYPE_URL,)

    def parseConfig(self, config: Any, path: str, context: Any) -> RbacConfig:
        rules = parse_rbac(config, path, context)
        # The owning connection manager's prefix (hcm_config sets it before its filters).
        prefix = getattr(context, "http_stat_prefix", "") or "http."
        return RbacConfig(rules, RbacStats(prefix, rules.rules_stat_prefix,
                                           rules.shadow_rules_stat_prefix, rules.per_rule_stats))

    def parsePerRouteConfig(self, config: Any, path: str, context: Any) -> RbacRules:
        # No rbac, or one without rules: this route's requests are not checked (Envoy).
        if not config.HasField("rbac"):
            return RbacRules()
        return parse_rbac(config.rbac, f"{path}.rbac", context)

    def filterFactory(self, parsed: Any, context: Any) -> Callable[[], RbacFilter]:
        return lambda: RbacFilter(parsed)
