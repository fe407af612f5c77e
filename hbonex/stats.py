"""
The process's statistics, under Envoy's names (``http2.tx_reset``,
``listener.<addr>.downstream_cx_overflow``...): counters and gauges, cheap to update on the
data path (an attribute increment), read by whoever exposes them.
"""

from __future__ import annotations


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


class StatsStore:
    def __init__(self) -> None:
        self.counters: dict[str, Counter] = {}
        self.gauges: dict[str, Gauge] = {}

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
        return dict(sorted(values.items()))


#: The process's store.
STATS = StatsStore()

__all__ = ["STATS", "Counter", "Gauge", "StatsStore"]
