"""
Worker processes (``--workers N``, YAML runtime key ``hbonex.workers``): a supervisor binds
every kernel listener once and runs N copies of the same twistd command that accept on the
inherited sockets (``supervisor.py``, ``worker.py``); their stats are summed for the admin
endpoint (``stats_merge.py``).
"""

from __future__ import annotations

import os
from typing import Any, Callable


def resolve_workers(value: Any, cpu_count: Callable[[], int | None] = os.cpu_count) -> int:
    """
    A worker count as given (``--workers`` text or the YAML's integer) -> how many workers:
    0 is one per core.  ValueError (with the reason) for anything but a non-negative integer.
    """
    count = None
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    elif isinstance(value, str) and value.strip().isdigit():
        count = int(value)
    if count is None or count < 0:
        raise ValueError(f"expected a non-negative integer (0: one per core), got {value!r}")
    return count if count else (cpu_count() or 1)


__all__ = ["resolve_workers"]
