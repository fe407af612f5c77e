"""
Envoy's local rate limiter (extensions/filters/common/local_ratelimit): a token bucket that a
fill timer tops up by ``tokens_per_fill`` every ``fill_interval`` (at most ``max_tokens``),
and descriptor buckets refilled on every Nth tick (their interval is N times the bucket's).

The ticks are computed from the clock when a request asks rather than by a running timer: the
same counts at the same instants as Envoy's timer, with nothing scheduled on the reactor.
"""

from __future__ import annotations

from typing import Any, Sequence

import attrs

#: A request's descriptor: its (key, value) entries, in order.
Descriptor = tuple[tuple[str, str], ...]

#: Envoy's minimum fill interval (seconds).
MIN_FILL_INTERVAL = 0.05


@attrs.frozen
class BucketSpec:
    """A TokenBucket message: ``max_tokens``, ``tokens_per_fill``, ``fill_interval`` (s)."""

    max_tokens: int
    tokens_per_fill: int = 1
    fill_interval: float = 1.0

    def per_second(self) -> int:
        """Envoy's ordering key for descriptors (the strictest is consumed first)."""
        return self.tokens_per_fill // max(1, int(self.fill_interval))


@attrs.frozen
class DescriptorSpec:
    entries: Descriptor
    bucket: BucketSpec


class _Tokens:
    __slots__ = ("spec", "tokens", "fill_time", "multiplier")

    def __init__(self, spec: BucketSpec, now: float, multiplier: int = 1) -> None:
        self.spec = spec
        self.tokens = spec.max_tokens
        self.fill_time = now
        self.multiplier = multiplier

    def fill(self, times: int, when: float) -> None:
        self.tokens = min(self.spec.max_tokens, self.tokens + times * self.spec.tokens_per_fill)
        self.fill_time = when

    def take(self) -> bool:
        if self.tokens == 0:
            return False
        self.tokens -= 1
        return True


@attrs.frozen
class TokenBucketContext:
    """What the x-ratelimit-* headers report of the bucket a request used."""

    max_tokens: int
    remaining: int
    reset_seconds: int


class LocalRateLimiter:
    """
    One per configured filter (shared by every connection), or one per connection with
    ``local_rate_limit_per_downstream_connection``.
    """

    def __init__(self, clock: Any, bucket: BucketSpec,
                 descriptors: Sequence[DescriptorSpec] = (),
                 always_consume_default: bool = True) -> None:
        self.clock = clock
        now = clock.seconds()
        self._start = now
        self._ticks = 0
        self._tokens = _Tokens(bucket, now)
        self._descriptors = {
            d.entries: _Tokens(d.bucket, now, round(d.bucket.fill_interval / bucket.fill_interval))
            for d in descriptors
        }
        self._sorted = sorted(self._descriptors.items(), key=lambda i: i[1].spec.per_second())
        self.always_consume_default = always_consume_default

    def _refill(self) -> None:
        interval = self._tokens.spec.fill_interval
        now = self.clock.seconds()
        # The fill timer's ticks so far (a hair of slack for float sums of the clock).
        ticks = int((now - self._start) / interval + 1e-9)
        if ticks <= self._ticks:
            return
        when = self._start + ticks * interval
        self._tokens.fill(ticks - self._ticks, when)
        for state in self._descriptors.values():
            m = state.multiplier
            times = ticks // m - self._ticks // m
            if times:
                state.fill(times, self._start + (ticks // m) * m * interval)
        self._ticks = ticks

    def request_allowed(self, descriptors: Sequence[Descriptor]) -> tuple[bool, TokenBucketContext]:
        """Take a token (Envoy's requestAllowed); with the bucket the headers report."""
        self._refill()
        allowed = self._allowed(descriptors)
        return allowed, self._context(descriptors)

    def _allowed(self, descriptors: Sequence[Descriptor]) -> bool:
        matched = False
        if self._descriptors and descriptors:
            for entries, state in self._sorted:
                if entries in descriptors:
                    matched = True
                    if not state.take():
                        return False
        if not matched or self.always_consume_default:
            return self._tokens.take()
        return True

    def _context(self, descriptors: Sequence[Descriptor]) -> TokenBucketContext:
        state = self._tokens
        for entries in descriptors:
            found = self._descriptors.get(entries)
            if found is not None:
                state = found  # the first request descriptor with a bucket of its own
                break
        elapsed = int(self.clock.seconds() - state.fill_time)
        return TokenBucketContext(state.spec.max_tokens, state.tokens,
                                  max(0, int(state.spec.fill_interval - elapsed)))


__all__ = ["MIN_FILL_INTERVAL", "BucketSpec", "Descriptor", "DescriptorSpec",
           "LocalRateLimiter", "TokenBucketContext"]
