"""
The process's statistics, under Envoy's names (``http2.tx_reset``,
``listener.<addr>.downstream_cx_overflow``...): counters and gauges, cheap to update on the
data path (an attribute increment), read by whoever exposes them.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol


class Counter:
    """A value that only grows."""

    __slots__ = ("name", "value")

    def __init__(self, name: str) -> None:
        self.name = name
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class Gauge:
    """A value that goes up and down."""

    __slots__ = ("name", "value")

    def __init__(self, name: str) -> None:
        self.name = name
        self.value = 0

    def set(self, value: int) -> None:
        self.value = value

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def dec(self, amount: int = 1) -> None:
        self.value -= amount


class StatsSource(Protocol):
    def stats_values(self) -> dict[str, int]:
        """Current values by full stat name."""


class StatsStore:
    def __init__(self) -> None:
        self.counters: dict[str, Counter] = {}
        self.gauges: dict[str, Gauge] = {}
        #: Objects that keep their own counts (listeners, clusters, filters), held weakly.
        self._sources: list[weakref.ref[Any]] = []

    def add_source(self, source: StatsSource) -> None:
        self._sources.append(weakref.ref(source))

    def counter(self, name: str) -> Counter:
        counter = self.counters.get(name)
        if counter is None:
            counter = self.counters[name] = Counter(name)
        return counter

    def gauge(self, name: str) -> Gauge:
        gauge = self.gauges.get(name)
        if gauge is None:
            gauge = self.gauges[name] = Gauge(name)
        return gauge

    def snapshot(self) -> dict[str, int]:
        """Every stat's current value, by name."""
        values = {name: c.value for name, c in self.counters.items()}
        values.update((name, g.value) for name, g in self.gauges.items())
        alive = []
        for ref in self._sources:
            source = ref()
            if source is not None:
                alive.append(ref)
                values.update(source.stats_values())
        self._sources = alive
        return dict(sorted(values.items()))

    def is_gauge(self, name: str) -> bool:
        """Gauges go up and down (Envoy's ``*_active``, ``*_connections``); counters grow."""
        return name in self.gauges or name.endswith(("_active", "active_connections"))


#: The process's store.
STATS = StatsStore()

__all__ = ["STATS", "Counter", "Gauge", "StatsStore"]
