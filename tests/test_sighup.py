"""hbonex.sighup.SighupHook: SIGHUP reaches the reactor thread; stop restores the handler."""

from __future__ import annotations

import signal
from typing import Any, Callable

from twisted.trial import unittest

from hbonex.sighup import SighupHook


class ThreadCalls:
    """A reactor that records callFromThread instead of running it."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], Any]] = []

    def callFromThread(self, f: Callable[[], Any]) -> None:
        self.calls.append(f)


class SighupHookTests(unittest.TestCase):
    def test_signal_goes_through_the_reactor_and_stop_restores(self) -> None:
        before = signal.getsignal(signal.SIGHUP)
        got: list[str] = []
        hook = SighupHook(lambda: got.append("hup"))
        reactor = ThreadCalls()
        hook.start(reactor)
        self.addCleanup(hook.stop)
        handler = signal.getsignal(signal.SIGHUP)
        self.assertNotEqual(handler, before)
        handler(signal.SIGHUP, None)  # type: ignore[operator]
        self.assertEqual(got, [])  # not from inside the handler...
        self.assertEqual(len(reactor.calls), 1)
        reactor.calls[0]()
        self.assertEqual(got, ["hup"])  # ...but on the reactor's turn
        hook.stop()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)
        hook.stop()  # twice is harmless
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)
