"""
The stats of several worker processes as one: each worker answers the supervisor's ``stats``
command with a snapshot (``snapshot``); the supervisor sums them (``StatsMerge``).  Counters
and the labelled families are summed, and a worker that exits leaves its last counts behind
(``retire``) so totals never go down when a worker is replaced.  Gauges are summed over the
live workers (active connections), but for the certificate expiry gauges, which are the same
fact in every worker: the soonest is shown.
"""

from __future__ import annotations

from typing import Any

import attrs

from hbonex.observability.stats import STATS, Family

#: Gauges that are a property, not a level: the minimum across workers, never a sum.
_NOT_SUMMED = ("expiration_unix_time_seconds", "days_until_first_cert_expiring")


def snapshot(bootstrap: Any) -> dict[str, Any]:
    """This process's stats, as JSON-able data for the supervisor."""
    from hbonex.observability.admin import collect

    values = collect(bootstrap)
    return {
        "values": values,
        "gauges": sorted(name for name in values if STATS.is_gauge(name)),
        "families": [_family_data(f) for f in STATS.families.values()],
    }


def _family_data(f: Family) -> dict[str, Any]:
    return {"name": f.name, "kind": f.kind, "labels": list(f.labels),
            "buckets": list(f.buckets), "doc": f.doc,
            "values": [[list(key), value] for key, value in f.values.items()]}


@attrs.define
class MergedStats:
    values: dict[str, float]
    families: dict[str, Family]
    gauges: set[str]

    def is_gauge(self, name: str) -> bool:
        return name in self.gauges


def _add(cells: Any, more: Any) -> Any:
    if isinstance(cells, list):
        return [a + b for a, b in zip(cells, more, strict=True)]
    return cells + more


def _add_families(into: dict[str, Family], families: list[dict[str, Any]]) -> None:
    for data in families:
        family = into.get(data["name"])
        if family is None:
            family = into[data["name"]] = Family(
                data["name"], data["kind"], tuple(data["labels"]), tuple(data["buckets"]),
                data["doc"])
        for key, value in data["values"]:
            labels = tuple(key)
            old = family.values.get(labels)
            family.values[labels] = value if old is None else _add(old, value)


class StatsMerge:
    def __init__(self) -> None:
        #: What exited workers counted (counters and families only).
        self.retired: dict[str, float] = {}
        self.retired_families: dict[str, Family] = {}

    def retire(self, snap: dict[str, Any] | None) -> None:
        """A worker exited: keep its counters (its gauges went with it)."""
        if not snap:
            return
        gauges = set(snap["gauges"])
        for name, value in snap["values"].items():
            if name not in gauges:
                self.retired[name] = self.retired.get(name, 0) + value
        _add_families(self.retired_families, snap["families"])

    def merge(self, snaps: list[dict[str, Any]]) -> MergedStats:
        values = dict(self.retired)
        gauges: set[str] = set()
        for snap in snaps:
            gauges.update(snap["gauges"])
        for snap in snaps:
            for name, value in snap["values"].items():
                if name in gauges and name.endswith(_NOT_SUMMED) and name in values:
                    values[name] = min(values[name], value)
                else:
                    values[name] = values.get(name, 0) + value
        families: dict[str, Family] = {}
        _add_families(families, [_family_data(f) for f in self.retired_families.values()])
        for snap in snaps:
            _add_families(families, snap["families"])
        return MergedStats(dict(sorted(values.items())), families, gauges)


__all__ = ["MergedStats", "StatsMerge", "snapshot"]
