"""
The process's statistics, under Envoy's names (``http2.tx_reset``,
``listener.<addr>.downstream_cx_overflow``...): counters and gauges, cheap to update on the
data path (an attribute increment), read by whoever exposes them.
"""

from __future__ import annotations

import weakref
from bisect import bisect_left
from itertools import accumulate
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


class Family:
    """
    A labelled metric (Istio's ``istio_requests_total{...}`` and the like): a counter, or a
    histogram with fixed bucket bounds.
    """

    def __init__(self, name: str, kind: str, labels: tuple[str, ...],
                 buckets: tuple[float, ...] = (), doc: str = "") -> None:
        self.name = name
        self.kind = kind
        self.labels = labels
        self.buckets = buckets
        self.doc = doc or name
        #: label values -> count (counter), or for a histogram [count in each bucket alone
        #: (the last one past every bound), sum]: one increment per observation, made
        #: cumulative only when read (histogram()).
        self.values: dict[tuple[str, ...], Any] = {}

    def inc(self, labels: tuple[str, ...], amount: float = 1) -> None:
        self.values[labels] = self.values.get(labels, 0) + amount

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        cells = self.values.get(labels)
        if cells is None:
            cells = self.values[labels] = [0] * (len(self.buckets) + 1) + [0.0]
        cells[bisect_left(self.buckets, value)] += 1  # the first bound >= value
        cells[-1] += value

    def histogram(self, labels: tuple[str, ...]) -> tuple[list[int], int, float]:
        """One label set's cumulative bucket counts (Prometheus' ``le``), count and sum."""
        cells = self.values[labels]
        cumulative = list(accumulate(cells[:-2]))
        return cumulative, (cumulative[-1] if cumulative else 0) + cells[-2], cells[-1]


class StatsSource(Protocol):
    def stats_values(self) -> dict[str, int]:
        """Current values by full stat name."""


class StatsStore:
    def __init__(self) -> None:
        self.counters: dict[str, Counter] = {}
        self.gauges: dict[str, Gauge] = {}
        self.families: dict[str, Family] = {}
        #: Objects that keep their own counts (listeners, clusters, filters), held weakly.
        self._sources: list[weakref.ref[Any]] = []

    def add_source(self, source: StatsSource) -> None:
        self._sources.append(weakref.ref(source))

    def counter(self, name: str) -> Counter:
        counter = self.counters.get(name)
        if counter is None:
            counter = self.counters[name] = Counter(name)
        return counter

    def family(self, name: str, kind: str, labels: tuple[str, ...],
               buckets: tuple[float, ...] = (), doc: str = "") -> Family:
        family = self.families.get(name)
        if family is None:
            family = self.families[name] = Family(name, kind, labels, buckets, doc)
        return family

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

__all__ = ["STATS", "Counter", "Family", "Gauge", "StatsStore"]
