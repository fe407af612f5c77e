"""
``twistd --reactor hbonex-epoll``: Twisted's epoll reactor without ``callWithLogger`` per event.

Twisted's ``EPollReactor.doPoll`` wraps every readable/writable event in
``log.callWithLogger(selectable, ...)``: a ``logPrefix()`` call plus ``callWithContext``, about
3 µs per event against 0.16 µs for a direct call, a quarter of a proxy's busy time on small
round trips. ``_doReadOrWrite`` already catches and logs what ``doRead``/``doWrite`` raise and
disconnects the selectable, so this reactor calls it directly. It is the default of
``twistd hbone-client`` / ``hbone-server`` on Linux (``install_default``, called by
hbonex/cli/tap_common.py); ``--reactor epoll`` gives Twisted's.

What is lost: the legacy log context. Lines logged through ``twisted.python.log`` while a
selectable handles an event (Twisted's own "Unhandled Error" from ``_doReadOrWrite``) carry the
system ``-`` instead of the selectable's ``logPrefix()`` (e.g. ``HBoneProtocol,3,127.0.0.1``).
``twisted.logger.Logger`` events, which is all hbonex logs, never read that context.

Internals relied on (pinned by tests/test_epollreactor.py against the installed Twisted):
``EPollReactor.doPoll``'s body, ``_poller``, ``_selectables`` and
``_PollLikeMixin._doReadOrWrite(selectable, fd, event)``, identical from Twisted 23.10 to 26.10.
"""

from __future__ import annotations

import errno
import select
import sys

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import installReactor
from twisted.logger import Logger

_log = Logger()


class DirectEPollReactor(EPollReactor):
    """EPollReactor whose doPoll dispatches each event straight to ``_doReadOrWrite``."""

    def doPoll(self, timeout: float | None) -> None:
        if timeout is None:
            timeout = -1  # wait indefinitely
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise  # as Twisted: only a programming error makes epoll_wait fail otherwise
        selectables = self._selectables
        dispatch = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # removed by an earlier event of this batch
            try:
                dispatch(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                # What _doReadOrWrite does not catch (connectionLost raising while it
                # disconnects): logged as callWithLogger did, and the batch goes on.
                _log.failure("Unhandled error handling {fd}", fd=fd,
                             log_system=_prefix(selectable))

    doIteration = doPoll


def _prefix(selectable: object) -> str:
    try:
        return str(selectable.logPrefix())  # type: ignore[attr-defined]
    except Exception:
        return "(buggy logPrefix method)"


def install() -> None:
    installReactor(DirectEPollReactor())


def install_default() -> bool:
    """
    Install DirectEPollReactor unless a reactor is already installed (``twistd --reactor X``
    installs X while parsing its global options, before a plugin's options are parsed) or
    epoll is missing (not Linux: twistd's own default then). Returns whether it installed.
    """
    if "twisted.internet.reactor" in sys.modules or not hasattr(select, "epoll"):
        return False
    install()
    return True


__all__ = ["DirectEPollReactor", "install", "install_default"]
