"""
SIGHUP into the reactor: what the certificate watcher (reload) and the workers' supervisor
(forward to every worker) both need.
"""

from __future__ import annotations

import signal
from typing import Any, Callable


class SighupHook:
    """
    While started, SIGHUP calls ``callback()`` from the reactor's thread (a signal handler
    must not run application code itself); ``stop`` puts the previous handler back.
    """

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self._previous: Any = None

    def start(self, reactor: Any) -> None:
        def handler(signum: int, frame: Any) -> None:
            reactor.callFromThread(self.callback)

        try:
            self._previous = signal.signal(signal.SIGHUP, handler)
        except ValueError:  # pragma: no cover - not the main thread (tests with threads)
            pass

    def stop(self) -> None:
        if self._previous is not None:
            try:
                signal.signal(signal.SIGHUP, self._previous)
            except ValueError:  # pragma: no cover - not the main thread
                pass
            self._previous = None
