"""Tests for hbonex.network.relay: two byte-stream transports spliced together."""

from __future__ import annotations

from twisted.internet import error as ierror
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest

from hbonex.network.relay import Relay
from tests.fakes import HalfCloseTransport

DONE = Failure(ierror.ConnectionDone("closed"))


def relay_pair(idle_timeout: float = 0, start: bool = True) -> tuple[
    Relay, HalfCloseTransport, HalfCloseTransport, Clock, list[Relay]
]:
    """
    A Relay with both ends connected to HalfCloseTransports (``ta`` downstream, ``tb``
    upstream); ``done`` collects on_done calls.
    """
    clock = Clock()
    done: list[Relay] = []
    relay = Relay(clock, idle_timeout, on_done=done.append)
    ta, tb = HalfCloseTransport(), HalfCloseTransport()
    relay.a.makeConnection(ta)
    relay.b.makeConnection(tb)
    if start:
        relay.start()
    return relay, ta, tb, clock, done


class DataTests(unittest.TestCase):
    def test_ends_are_half_closeable(self) -> None:
        relay, *_ = relay_pair()
        self.assertTrue(IHalfCloseableProtocol.providedBy(relay.a))
        self.assertTrue(IHalfCloseableProtocol.providedBy(relay.b))

    def test_bytes_flow_both_ways(self) -> None:
        relay, ta, tb, _, _ = relay_pair()
        relay.a.dataReceived(b"up-1 ")
        relay.a.dataReceived(b"up-2")
        relay.b.dataReceived(b"down")
        self.assertEqual(tb.value(), b"up-1 up-2")
        self.assertEqual(ta.value(), b"down")
        self.assertEqual((relay.a.bytes_in, relay.b.bytes_in), (9, 4))

    def test_bytes_pass_through_before_start(self) -> None:
        # With both ends connected, data is written at once; start() only wires producers.
        relay, ta, tb, _, _ = relay_pair(start=False)
        relay.a.dataReceived(b"early-a")
        relay.b.dataReceived(b"early-b")
        self.assertEqual((ta.value(), tb.value()), (b"early-b", b"early-a"))
        self.assertIsNone(ta.producer)
        relay.start()
        self.assertEqual((ta.value(), tb.value()), (b"early-b", b"early-a"))
        self.assertIs(ta.producer.transport, tb)

    def test_bytes_before_peer_connected_are_held(self) -> None:
        clock = Clock()
        relay = Relay(clock)
        ta, tb = HalfCloseTransport(), HalfCloseTransport()
        relay.a.makeConnection(ta)
        relay.a.dataReceived(b"held-1 ")
        relay.a.dataReceived(b"held-2 ")
        relay.b.makeConnection(tb)
        self.assertEqual(tb.value(), b"")
        relay.start()
        relay.a.dataReceived(b"later")
        self.assertEqual(tb.value(), b"held-1 held-2 later")
        self.assertEqual(relay.a.bytes_in, len(b"held-1 held-2 later"))

    def test_producers_back_to_back(self) -> None:
        relay, ta, tb, _, _ = relay_pair()
        # Each transport is the (streaming) producer of the other.
        self.assertIs(tb.producer.transport, ta)
        self.assertIs(ta.producer.transport, tb)
        self.assertTrue(ta.streaming)
        self.assertTrue(tb.streaming)
        # A full upstream pauses reading from downstream.
        tb.producer.pauseProducing()
        self.assertEqual(ta.producerState, "paused")
        tb.producer.resumeProducing()
        self.assertEqual(ta.producerState, "producing")

    def test_pauses_are_counted_per_end(self) -> None:
        from hbonex.filters.network.tcp_proxy import TcpProxyStats

        relay, ta, tb, _, _ = relay_pair()
        relay.stats = stats = TcpProxyStats()
        tb.producer.pauseProducing()  # upstream full: reading from downstream pauses
        tb.producer.resumeProducing()
        tb.producer.pauseProducing()
        ta.producer.pauseProducing()  # downstream full: reading from upstream pauses
        self.assertEqual((relay.a.pauses, relay.b.pauses), (2, 1))
        self.assertEqual((stats.downstream_paused, stats.upstream_paused), (2, 1))


class HalfCloseTests(unittest.TestCase):
    def test_eof_is_forwarded_after_unregistering_producer(self) -> None:
        relay, ta, tb, _, done = relay_pair()
        relay.a.dataReceived(b"last bytes")
        relay.a.readConnectionLost()
        self.assertEqual(tb.value(), b"last bytes")
        self.assertEqual(tb.calls, ["unregisterProducer", "loseWriteConnection"])
        self.assertIsNone(tb.producer)
        self.assertTrue(tb.write_closed)
        # The other direction stays open.
        self.assertFalse(ta.disconnecting)
        self.assertIs(ta.producer.transport, tb)
        relay.b.dataReceived(b"reply")
        self.assertEqual(ta.value(), b"reply")
        self.assertEqual(done, [])

    def test_both_eofs_close_both(self) -> None:
        relay, ta, tb, _, done = relay_pair()
        relay.a.readConnectionLost()
        self.assertFalse(tb.disconnecting)
        relay.b.readConnectionLost()
        self.assertEqual(ta.calls, ["unregisterProducer", "loseWriteConnection",
                                    "loseConnection"])
        self.assertEqual(tb.calls, ["unregisterProducer", "loseWriteConnection",
                                    "loseConnection"])
        self.assertTrue(ta.disconnecting and tb.disconnecting)
        self.assertFalse(ta.aborted or tb.aborted)
        relay.a.connectionLost(DONE)
        relay.b.connectionLost(DONE)
        self.assertEqual(done, [relay])
        self.assertTrue(relay.done)

    def test_eof_before_start(self) -> None:
        relay, ta, tb, _, _ = relay_pair(start=False)
        relay.a.dataReceived(b"request")
        relay.a.readConnectionLost()
        relay.start()
        self.assertEqual(tb.value(), b"request")
        self.assertTrue(tb.write_closed)
        # Downstream already ended: it is not registered as upstream's producer.
        self.assertIsNone(tb.producer)
        self.assertIs(ta.producer.transport, tb)

    def test_clean_close_of_one_side_finishes_the_other(self) -> None:
        relay, ta, tb, _, done = relay_pair()
        relay.b.connectionLost(DONE)
        self.assertEqual(ta.calls, ["unregisterProducer", "loseWriteConnection",
                                    "loseConnection"])
        self.assertFalse(ta.aborted)
        self.assertEqual(done, [])
        relay.a.connectionLost(DONE)
        self.assertEqual(done, [relay])


class ErrorTests(unittest.TestCase):
    def test_error_on_one_side_aborts_the_other(self) -> None:
        relay, ta, tb, _, done = relay_pair()
        reason = Failure(ierror.ConnectionLost("reset"))
        relay.a.connectionLost(reason)
        self.assertTrue(tb.aborted)
        self.assertFalse(ta.aborted)
        self.assertIs(relay.a.reason, reason)
        relay.b.connectionLost(Failure(ierror.ConnectionAborted()))
        self.assertEqual(done, [relay])

    def test_error_upstream_aborts_downstream(self) -> None:
        relay, ta, tb, _, _ = relay_pair()
        relay.b.connectionLost(Failure(ierror.ConnectionRefusedError()))
        self.assertTrue(ta.aborted)
        self.assertNotIn("loseWriteConnection", ta.calls)

    def test_lost_before_peer_connected_finishes(self) -> None:
        clock = Clock()
        done: list[Relay] = []
        relay = Relay(clock, on_done=done.append)
        relay.a.makeConnection(HalfCloseTransport())
        relay.a.connectionLost(DONE)
        self.assertEqual(done, [relay])

    def test_connection_lost_twice_is_ignored(self) -> None:
        relay, ta, tb, _, done = relay_pair()
        relay.a.connectionLost(Failure(ierror.ConnectionLost()))
        relay.a.connectionLost(DONE)
        self.assertEqual(tb.calls.count("abortConnection"), 1)
        self.assertTrue(relay.a.reason.check(ierror.ConnectionLost))


    def test_stop_producing_leaves_the_decision_to_connection_lost(self) -> None:
        """
        A transport going away calls its producer's stopProducing before connectionLost:
        that must not end the other side early (the reason decides: FIN or reset).
        """
        relay, ta, tb, _, _ = relay_pair()
        tb.producer.stopProducing()
        self.assertFalse(ta.aborted)
        self.assertEqual(ta.calls, [])
        relay.b.connectionLost(Failure(ierror.ConnectionLost("reset by peer")))
        self.assertTrue(ta.aborted)

    def test_first_end_lost_is_remembered(self) -> None:
        relay, ta, tb, _, _ = relay_pair()
        relay.b.connectionLost(Failure(ierror.ConnectionLost("reset by peer")))
        relay.a.connectionLost(Failure(ierror.ConnectionAborted()))
        self.assertIs(relay.first_lost, relay.b)


class IdleTimeoutTests(unittest.TestCase):
    def test_idle_relay_is_aborted(self) -> None:
        relay, ta, tb, clock, _ = relay_pair(idle_timeout=10)
        clock.advance(9.9)
        self.assertFalse(ta.aborted or tb.aborted)
        clock.advance(0.1)
        self.assertTrue(ta.aborted and tb.aborted)
        self.assertEqual(relay.close_reason, "idle timeout (10s)")

    def test_activity_postpones_the_timeout(self) -> None:
        relay, ta, tb, clock, _ = relay_pair(idle_timeout=10)
        clock.advance(6)
        relay.b.dataReceived(b"x")
        clock.advance(6)  # 12s since start, 6s since the data
        self.assertFalse(ta.aborted or tb.aborted)
        relay.a.dataReceived(b"y")
        clock.advance(9)
        self.assertFalse(ta.aborted or tb.aborted)
        clock.advance(1)
        self.assertTrue(ta.aborted and tb.aborted)

    def test_finished_relay_cancels_its_timer(self) -> None:
        relay, ta, tb, clock, done = relay_pair(idle_timeout=10)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        relay.a.connectionLost(DONE)
        relay.b.connectionLost(DONE)
        self.assertEqual(done, [relay])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_idle_timeout_resets_streams_with_cancel(self) -> None:
        class StreamLike(HalfCloseTransport):
            def __init__(self) -> None:
                super().__init__()
                self.resets: list[int] = []

            def reset(self, code: int) -> None:
                self.resets.append(code)

        clock = Clock()
        relay = Relay(clock, 10)
        stream, tcp = StreamLike(), HalfCloseTransport()
        relay.a.makeConnection(stream)
        relay.b.makeConnection(tcp)
        relay.start()
        clock.advance(10)
        self.assertEqual(stream.resets, [0x8])  # CANCEL, not CONNECT_ERROR
        self.assertFalse(stream.aborted)
        self.assertTrue(tcp.aborted)

    def test_no_timeout_when_disabled(self) -> None:
        relay, ta, tb, clock, _ = relay_pair(idle_timeout=0)
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(10**6)
        self.assertFalse(ta.aborted or tb.aborted)
