"""
Envoy's StringMatcher (``exact``, ``prefix``, ``suffix``, ``contains``, ``safe_regex``, with
``ignore_case``) as a value, and ListStringMatcher as a tuple of them.
"""

from __future__ import annotations

import re
from typing import Iterable

import attrs


@attrs.frozen
class StringMatcher:
    kind: str  # "exact", "prefix", "suffix", "contains", "safe_regex"
    value: str
    ignore_case: bool = False

    def matches(self, candidate: str) -> bool:
        if self.kind == "safe_regex":
            # Envoy: ignore_case has no effect on safe_regex.
            return re.fullmatch(self.value, candidate) is not None
        value, cand = self.value, candidate
        if self.ignore_case:
            value, cand = value.lower(), cand.lower()
        if self.kind == "exact":
            return cand == value
        if self.kind == "prefix":
            return cand.startswith(value)
        if self.kind == "suffix":
            return cand.endswith(value)
        if self.kind == "contains":
            return value in cand
        raise ValueError(f"unknown matcher kind {self.kind!r}")


def any_matches(matchers: Iterable[StringMatcher], candidate: str) -> bool:
    return any(m.matches(candidate) for m in matchers)


__all__ = ["StringMatcher", "any_matches"]
