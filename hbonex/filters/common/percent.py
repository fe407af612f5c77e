"""
Envoy's FractionalPercent (``numerator`` over a ``denominator`` of 100, 10 000 or 1 000 000)
and the random source that decides it, injectable so that tests can seed it.
"""

from __future__ import annotations

import os
import random
from typing import Any

import attrs

#: Test only: a seed for the random source of every filter that decides by percentage (fault
#: injection), so that an end-to-end test of a real process is reproducible.  Read only when
#: set; production configurations must not rely on it.
SEED_ENVIRONMENT = "HBONEX_TEST_RANDOM_SEED"

#: FractionalPercent.DenominatorType by number -> its value.
DENOMINATORS = {0: 100, 1: 10_000, 2: 1_000_000}


@attrs.frozen
class Percent:
    numerator: int
    denominator: int = 100

    def enabled(self, rng: random.Random) -> bool:
        """Envoy's evaluateFractionalPercent: a uniform draw below the numerator."""
        if self.numerator <= 0:
            return False
        return rng.randrange(self.denominator) < self.numerator

    def capped(self, numerator: int) -> Percent:
        """The same denominator, the numerator at most ``numerator`` (a header's)."""
        return Percent(min(numerator, self.numerator), self.denominator)

    def __str__(self) -> str:
        return f"{self.numerator}/{self.denominator}"


NEVER = Percent(0)
ALWAYS = Percent(100)


def parse_percent(message: Any) -> Percent:
    """An envoy.type.v3.FractionalPercent message (the proto default is 0/100)."""
    return Percent(message.numerator, DENOMINATORS[message.denominator])


def random_source() -> random.Random:
    """A new random generator: seeded from ``HBONEX_TEST_RANDOM_SEED`` when set (tests)."""
    seed = os.environ.get(SEED_ENVIRONMENT)
    return random.Random(int(seed)) if seed else random.Random()


__all__ = ["ALWAYS", "DENOMINATORS", "NEVER", "SEED_ENVIRONMENT", "Percent", "parse_percent",
           "random_source"]
