"""
Istio's ``stats.PluginConfig`` (the ``istio.stats`` HTTP and network filters' TypedStruct
value), parsed once for both.
"""

from __future__ import annotations

from typing import Any

import attrs

from hbonex.observability.istio_metrics import METRIC_NAMES

TYPE_URL = "type.googleapis.com/stats.PluginConfig"
#: Istio's ``reporter`` label for each Reporter: a shared server gateway is a waypoint; an
#: unspecified one is inferred from the listener's direction (inbound, for hbonex).
REPORTERS = {"UNSPECIFIED": "destination", "SERVER_GATEWAY": "waypoint"}


@attrs.frozen
class StatsConfig:
    reporter: str = "destination"
    disable_host_header_fallback: bool = False
    #: Family names (istio_requests...) not to record.
    drop: frozenset[str] = frozenset()
    #: Family name -> labels to report empty (Prometheus: the same as absent).
    tags_to_remove: tuple[tuple[str, frozenset[str]], ...] = ()

    def removed(self, family: str) -> frozenset[str]:
        return next((tags for name, tags in self.tags_to_remove if name == family),
                    frozenset())


def parse_stats_config(config: Any, path: str, context: Any, filter_name: str
                       ) -> StatsConfig:
    node = context.node(config, path).expect_map()
    reporter = node.str_field("reporter", "UNSPECIFIED", choices=tuple(REPORTERS))
    fallback = node.bool_field("disable_host_header_fallback")
    for key in ("tcp_reporting_duration", "rotation_interval", "graceful_deletion_interval"):
        if node.duration_field(key) is not None:
            context.warn(f"{path}.{key}", f"{filter_name}: {key}: hbonex reports TCP metrics "
                         "when a connection opens and closes and never rotates them: ignored")
    drop: set[str] = set()
    removed: dict[str, set[str]] = {}
    for item in node.list_field("metrics"):
        name = item.str_field("name", "")
        if name and name not in METRIC_NAMES:
            raise item.error(f"unknown metric {name!r}; Istio's standard metrics are "
                             + ", ".join(sorted(METRIC_NAMES)), "name")
        families = [METRIC_NAMES[name]] if name else list(METRIC_NAMES.values())
        if item.bool_field("drop"):
            drop.update(families)
        tags = item.str_list_field("tags_to_remove")
        for family in families:
            removed.setdefault(family, set()).update(tags)
        if item.get("dimensions") is not None:
            item.map_field("dimensions")
            context.warn(f"{item.path}.dimensions", f"{filter_name}: dimensions are CEL "
                         "expressions, which hbonex does not evaluate: no labels are added")
        if item.str_field("match"):
            context.warn(f"{item.path}.match", f"{filter_name}: match (CEL) is not "
                         "evaluated: the override applies to every request")
        item.finish()
    for item in node.list_field("definitions"):
        item.expect_map()
        item.ignore("name", "value", "type")
        item.finish()
        context.warn(item.path, f"{filter_name}: custom metric definitions are CEL "
                     "expressions, which hbonex does not evaluate: not reported")
    node.finish()
    return StatsConfig(
        reporter=REPORTERS[reporter], disable_host_header_fallback=fallback,
        drop=frozenset(drop),
        tags_to_remove=tuple((f, frozenset(t)) for f, t in sorted(removed.items()) if t),
    )


__all__ = ["REPORTERS", "TYPE_URL", "StatsConfig", "parse_stats_config"]
