"""
An upgraded request (a 101 to websocket or another Upgrade) as a byte relay: the downstream
connection and the upstream one spliced back to back (hbonex.network.relay: producers wired
both ways, half-close carried both ways, the stream idle timeout).  The request ends when the
relay does: one access-log record then, with the bytes relayed each way.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.logger import Logger

from hbonex.network.relay import Relay


class UpgradeRelay:
    log = Logger(namespace="hbonex.upgrade")

    def __init__(self, reactor: Any, idle_timeout: float, callbacks: Any, counters: Any,
                 kind: str, info: Any) -> None:
        self.relay = Relay(reactor, idle_timeout, on_done=self._done)
        self.callbacks = callbacks
        #: The HCM's upgrade counters (downstream_cx_upgrades_total/_active), or None.
        self.counters = counters
        self.kind = kind
        self.info = info
        self.started = time.monotonic()
        self._counted = False

    def start(self, codec: Any) -> None:
        """The downstream has switched (relay.a is connected): take the upstream, relay."""
        relay = self.relay
        if codec is None or codec.lost:
            # The upstream went while its 101 was on the way: the client's side goes too.
            relay.close_reason = "upstream: connection lost before the switch"
            relay.a.transport.abortConnection()  # type: ignore[union-attr]
            return
        codec.take_over(relay.b)
        if self.counters is not None:
            self.counters.opened += 1
            self.counters.active += 1
            self._counted = True
        relay.start()

    def _done(self, relay: Relay) -> None:
        up, down = relay.a.bytes_in, relay.b.bytes_in
        if self._counted:
            self.counters.active -= 1
            self.counters.bytes_in += up
            self.counters.bytes_out += down
        reason = relay.end_reason()
        if relay.close_reason.startswith("idle timeout"):
            self.info.response_flags.add("SI")
        elif reason != "closed cleanly":
            first = relay.first_lost
            self.info.response_flags.add("UC" if first is relay.b else "DC")
        duration = time.monotonic() - self.started
        peer = getattr(self.callbacks.connection(), "remoteAddress", "") or "-"
        self.log.info(
            "{line}", line=f"{self.kind} upgrade from {peer} to "
            f"{self.info.upstream_host or '-'} closed after {duration:.3f}s: {up} bytes up, "
            f"{down} bytes down, {reason}",
            kind=self.kind, up=up, down=down, reason=reason, duration=duration)
        self.callbacks.upgradeFinished(up, down)


__all__ = ["UpgradeRelay"]
