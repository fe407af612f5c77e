"""
The overload manager's downstream connection limit (Envoy's ``downstream_connections``
resource monitor, ``max_active_downstream_connections``): one count of accepted connections
across every listener of the process; past the limit a new connection is closed as soon as it
is accepted (before any TLS work), and counted.
"""

from __future__ import annotations

from twisted.logger import Logger

from hbonex.observability.stats import STATS


class DownstreamLimit:
    """
    Active downstream connections against a maximum (0: no limit).
    """

    log = Logger()

    def __init__(self, max_active: int = 0) -> None:
        self.max_active = max_active
        self.active = 0
        #: Envoy's downstream_cx_overflow / overload-rejected connections.
        self.overflow = 0

    def admit(self, listener: str, peer: str) -> bool:
        """
        Count a new connection in, or refuse it (False) when the limit is reached.
        """
        if self.max_active and self.active >= self.max_active:
            self.overflow += 1
            STATS.counter(f"listener.{listener}.downstream_global_cx_overflow").inc()
            # One line per refusal would itself be a flood: every 1st, 10th, 100th...
            n = self.overflow
            if n & (n - 1) == 0 or n % 1000 == 0:
                self.log.warn(
                    "{listener}: connection from {peer} refused: {active} connections "
                    "active, the limit is {limit} ({n} refused so far)",
                    listener=listener, peer=peer, active=self.active,
                    limit=self.max_active, n=n,
                )
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1


__all__ = ["DownstreamLimit"]
