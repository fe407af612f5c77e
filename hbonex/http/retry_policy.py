"""
Envoy's route ``retry_policy``, as the router acts on it: which outcomes are retried, how many
times, each attempt's deadline and the back-off between attempts.
"""

from __future__ import annotations

import random

import attrs

#: The ``retry_on`` conditions hbonex acts on (Envoy's names).
RETRY_ON = frozenset({"5xx", "gateway-error", "reset", "connect-failure", "retriable-4xx",
                      "retriable-status-codes"})


@attrs.frozen
class RetryPolicy:
    """Envoy's RetryPolicy, the parts the router acts on."""

    retry_on: frozenset[str] = frozenset()
    num_retries: int = 1
    #: Each attempt's own deadline (0: only the route's timeout).
    per_try_timeout: float = 0.0
    retriable_status_codes: frozenset[int] = frozenset()
    base_interval: float = 0.025
    max_interval: float = 0.25
    #: Past this many request bytes there is nothing to replay: no retry.
    buffer_limit: int = 1024 * 1024

    def on_status(self, status: int) -> bool:
        on = self.retry_on
        return (("5xx" in on and status >= 500)
                or ("gateway-error" in on and status in (502, 503, 504))
                or ("retriable-4xx" in on and status == 409)
                or ("retriable-status-codes" in on and status in self.retriable_status_codes))

    def on_connect_failure(self) -> bool:
        return bool(self.retry_on & {"5xx", "gateway-error", "connect-failure"})

    def on_reset(self) -> bool:
        return bool(self.retry_on & {"5xx", "gateway-error", "reset"})

    def backoff(self, retry: int) -> float:
        """Envoy's fully jittered exponential back-off before retry number ``retry`` (1...)."""
        ceiling = min(self.max_interval, self.base_interval * (2 ** retry - 1))
        return random.uniform(0, ceiling)


NO_RETRIES = RetryPolicy()


__all__ = ["NO_RETRIES", "RETRY_ON", "RetryPolicy"]
