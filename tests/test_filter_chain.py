"""
Running a listener's network filter chain: filters before the terminal one see (and may
transform) the bytes, a filter may hold the chain at connection time, order is kept.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from hbonex.interfaces import INetworkFilter, INetworkFilterCallbacks
from hbonex.network.listener import FilterChain, Listener, ListenerConnection


class Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


@implementer(INetworkFilter)
class Upper:
    """
    Non-terminal: counts bytes and passes them on upper-cased.
    """

    def __init__(self) -> None:
        self.seen = 0
        self.callbacks: Any = None

    def onNewConnection(self, callbacks: Any) -> bool:
        self.callbacks = callbacks
        return True

    def onData(self, data: bytes, endStream: bool) -> bool:
        self.seen += len(data)
        self.callbacks.injectReadData(self, data.upper(), endStream)
        return False

    def onClose(self, reason: object) -> None:
        pass


@implementer(INetworkFilter)
class Gate:
    """
    Holds the chain at connection time until opened.
    """

    def __init__(self) -> None:
        self.callbacks: Any = None

    def onNewConnection(self, callbacks: Any) -> bool:
        self.callbacks = callbacks
        return False

    def open(self) -> None:
        self.callbacks.continueReading()

    def onData(self, data: bytes, endStream: bool) -> bool:
        return True

    def onClose(self, reason: object) -> None:
        pass


@implementer(INetworkFilter)
class Terminal:
    def __init__(self) -> None:
        self.protocol = Recorder()

    def onNewConnection(self, callbacks: Any) -> bool:
        callbacks.takeOver(self.protocol)
        return False

    def onData(self, data: bytes, endStream: bool) -> bool:
        raise AssertionError("a terminal filter never sees onData after takeOver")

    def onClose(self, reason: object) -> None:
        pass


def connect(*filters: Any) -> ListenerConnection:
    instances = list(filters)
    chain = FilterChain([lambda f=f: f for f in instances])
    listener = Listener("test", Clock(), [chain])
    connection = ListenerConnection(listener, chain, False)
    connection.makeConnection(StringTransport())
    return connection


class FilterChainTests(unittest.SynchronousTestCase):
    def test_callbacks_interface(self) -> None:
        connection = connect(Terminal())
        self.assertTrue(verifyObject(INetworkFilterCallbacks, connection))

    def test_terminal_only_gets_bytes_directly(self) -> None:
        terminal = Terminal()
        connection = connect(terminal)
        connection.dataReceived(b"abc")
        self.assertEqual(terminal.protocol.data, b"abc")

    def test_filter_before_terminal_sees_and_transforms(self) -> None:
        upper, terminal = Upper(), Terminal()
        connection = connect(upper, terminal)
        connection.dataReceived(b"hello ")
        connection.dataReceived(b"world")
        self.assertEqual(upper.seen, 11)
        self.assertEqual(terminal.protocol.data, b"HELLO WORLD")

    def test_held_chain_keeps_order(self) -> None:
        gate, upper, terminal = Gate(), Upper(), Terminal()
        connection = connect(gate, upper, terminal)
        connection.dataReceived(b"one ")
        connection.dataReceived(b"two ")
        self.assertEqual(terminal.protocol.data, b"")
        gate.open()
        connection.dataReceived(b"three")
        self.assertEqual(terminal.protocol.data, b"ONE TWO THREE")
