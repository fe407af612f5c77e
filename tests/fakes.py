"""
Small in-memory fakes shared by the unit tests: a half-closeable StringTransport, a protocol
that records what it is told, and a push producer that records pause/resume.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer


class HalfCloseTransport(StringTransport):
    """
    A StringTransport that can also shut down its write side, and that records the order of
    the calls a relay makes on it in ``calls``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []
        self.write_closed = False
        self.aborted = False

    def loseWriteConnection(self) -> None:
        self.calls.append("loseWriteConnection")
        self.write_closed = True

    def loseConnection(self) -> None:
        self.calls.append("loseConnection")
        super().loseConnection()

    def abortConnection(self) -> None:
        self.calls.append("abortConnection")
        self.aborted = True
        super().abortConnection()

    def unregisterProducer(self) -> None:
        # Lenient like Twisted's TCP and TLS transports: no producer is not an error.
        self.calls.append("unregisterProducer")
        self.producer = None
        self.streaming = None


class RecordingProtocol(Protocol):
    """
    Records data, whether makeConnection happened, and the reason of connectionLost.
    Not half-closeable: EOF from the transport loses the whole connection.
    """

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost_reason: Failure | None = None
        self.made = False

    @property
    def data(self) -> bytes:
        return b"".join(self.received)

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost_reason = reason


@implementer(IHalfCloseableProtocol)
class HalfCloseProtocol(RecordingProtocol):
    """
    A RecordingProtocol that can be told about EOF in each direction separately.
    """

    def __init__(self) -> None:
        super().__init__()
        self.read_lost = False
        self.write_lost = False

    def readConnectionLost(self) -> None:
        self.read_lost = True

    def writeConnectionLost(self) -> None:
        self.write_lost = True


@implementer(IPushProducer)
class FakeProducer:
    """
    A push producer recording its state: "producing", "paused" or "stopped", and how many
    times it was paused and resumed.
    """

    def __init__(self) -> None:
        self.state = "producing"
        self.pauses = 0
        self.resumes = 0

    def pauseProducing(self) -> None:
        self.state = "paused"
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.state = "producing"
        self.resumes += 1

    def stopProducing(self) -> None:
        self.state = "stopped"
