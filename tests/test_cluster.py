"""
Clusters: load balancing over endpoints (internal listeners here, so no sockets), active
connection counts, and ORIGINAL_DST's target policy.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial import unittest

from hbonex.errors import UpstreamError
from hbonex.tunnel.connect import TargetPolicy, TargetRule
from hbonex.upstream.cluster import Cluster, InternalAddress, Runtime, UpstreamRequest


class Server(Protocol):
    pass


class FakeListener:
    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.factory = Factory.forProtocol(Server)
        self.accepted = 0
        original = self.factory.buildProtocol

        def build(addr: Any) -> Any:
            self.accepted += 1
            return original(addr)

        self.factory.buildProtocol = build  # type: ignore[method-assign]


def cluster_with(lb_policy: str, names: tuple[str, ...] = ("a", "b")) -> tuple[Cluster, dict]:
    runtime = Runtime(Clock())
    listeners = {}
    for name in names:
        listeners[name] = FakeListener(runtime.reactor)
        runtime.internal_listeners.register(name, listeners[name])
    cluster = Cluster(
        "c", runtime, endpoints=tuple(InternalAddress(n) for n in names), lb_policy=lb_policy
    )
    return cluster, listeners


def connect(cluster: Cluster) -> tuple[Protocol, str]:
    protocol = Protocol()
    result: list[Any] = []
    cluster.connect_stream(protocol, UpstreamRequest()).addBoth(result.append)
    return protocol, result[0].server_listener_name


class LoadBalancingTests(unittest.SynchronousTestCase):
    def test_round_robin(self) -> None:
        cluster, _ = cluster_with("ROUND_ROBIN")
        self.assertEqual([connect(cluster)[1] for _ in range(4)], ["a", "b", "a", "b"])

    def test_least_request_counts_open_connections(self) -> None:
        cluster, _ = cluster_with("LEAST_REQUEST")
        first, name1 = connect(cluster)
        second, name2 = connect(cluster)
        self.assertEqual({name1, name2}, {"a", "b"})
        self.assertEqual(cluster.stats.upstream_cx_active, 2)
        first.transport.abortConnection()  # type: ignore[union-attr]
        self.assertEqual(cluster.stats.upstream_cx_active, 1)
        # The endpoint whose connection went away is now the least loaded.
        self.assertEqual(connect(cluster)[1], name1)

    def test_random_uses_every_endpoint(self) -> None:
        cluster, listeners = cluster_with("RANDOM", ("a", "b", "c"))
        for _ in range(200):
            connect(cluster)
        self.assertTrue(all(listener.accepted > 20 for listener in listeners.values()))


class OriginalDestinationTests(unittest.SynchronousTestCase):
    def decision(self, destination: str) -> Any:
        runtime = Runtime(Clock())
        cluster = Cluster(
            "odst", runtime, type="ORIGINAL_DST",
            target_policy=TargetPolicy((TargetRule.parse("127.0.0.1:8000-8100"),)),
        )
        result: list[Any] = []
        cluster.pick(UpstreamRequest(original_destination=destination)).addBoth(result.append)
        return result[0]

    def test_allowed(self) -> None:
        self.assertEqual(str(self.decision("127.0.0.1:8080")), "127.0.0.1:8080")

    def test_outside_policy_is_403(self) -> None:
        failure = self.decision("127.0.0.1:9000")
        self.assertIsInstance(failure.value, UpstreamError)
        self.assertEqual(failure.value.status, 403)
        # The address once: it resolved to itself.
        self.assertEqual(failure.value.reason,
                         "target 127.0.0.1:9000 is outside the allowed targets")

    def test_bad_authority_is_400(self) -> None:
        failure = self.decision("no-port")
        self.assertEqual(failure.value.status, 400)


class OriginalDestinationOverrideTests(unittest.SynchronousTestCase):
    """Envoy's order: filter state object, metadata_key, header/restored address; then port."""

    def target(self, request: UpstreamRequest, **cluster: Any) -> str:
        result: list[Any] = []
        Cluster("odst", Runtime(Clock()), type="ORIGINAL_DST", **cluster).pick(
            request).addBoth(result.append)
        return str(result[0] if not hasattr(result[0], "value") else result[0].value)

    def test_precedence_and_port_override(self) -> None:
        from hbonex.http.stream_info import FilterState

        key = ("envoy.filters.listener.original_dst", ("local",))
        metadata = {"envoy.filters.listener.original_dst": {"local": "10.0.0.2:8080"}}
        state = FilterState()
        state.set_data("envoy.network.transport_socket.original_dst_address", "10.0.0.3:81")
        plain = UpstreamRequest(original_destination="10.0.0.1:80")
        self.assertEqual(self.target(plain, original_dst_metadata_key=key), "10.0.0.1:80")
        with_metadata = UpstreamRequest(original_destination="10.0.0.1:80",
                                        downstream_metadata=metadata)
        self.assertEqual(self.target(with_metadata, original_dst_metadata_key=key),
                         "10.0.0.2:8080")
        # Without metadata_key the metadata is not looked at.
        self.assertEqual(self.target(with_metadata), "10.0.0.1:80")
        both = UpstreamRequest(original_destination="10.0.0.1:80",
                               downstream_metadata=metadata, downstream_state=state)
        self.assertEqual(self.target(both, original_dst_metadata_key=key), "10.0.0.3:81")
        self.assertEqual(self.target(with_metadata, original_dst_metadata_key=key,
                                     upstream_port_override=15008), "10.0.0.2:15008")
        # A list takes its first element, as in Envoy.
        listed = UpstreamRequest(downstream_metadata={
            "envoy.filters.listener.original_dst": {"local": ["10.0.0.4:90", "x"]}})
        self.assertEqual(self.target(listed, original_dst_metadata_key=key), "10.0.0.4:90")


class ResolveTests(unittest.SynchronousTestCase):
    def test_dns_lookup_is_bounded_by_the_connect_timeout(self) -> None:
        clock = Clock()
        cluster = Cluster("dst", Runtime(clock), type="ORIGINAL_DST", connect_timeout=2.0)
        hanging: list[Any] = []

        def lookup(host: str, port: int) -> Any:
            d: Any = defer.Deferred()
            hanging.append((host, port))
            return d

        cluster.lookup = lookup  # type: ignore[method-assign]
        d = cluster.pick(UpstreamRequest(original_destination="slow.example:80"))
        self.assertEqual(hanging, [("slow.example", 80)])
        clock.advance(1.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        error = self.failureResultOf(d, UpstreamError).value
        self.assertEqual((error.status, error.reason),
                         (503, "cannot resolve slow.example within 2s"))


class StatsTests(unittest.SynchronousTestCase):
    def test_a_cancelled_connect_is_not_a_connect_failure(self) -> None:
        clock = Clock()
        cluster = Cluster("dst", Runtime(clock), type="ORIGINAL_DST")
        cluster.lookup = lambda host, port: defer.Deferred()  # type: ignore[method-assign]
        d = cluster.connect_stream(Protocol(), UpstreamRequest(original_destination="h:80"))
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(cluster.stats.upstream_cx_connect_fail, 0)
        failing = cluster.connect_stream(Protocol(), UpstreamRequest())  # no destination
        self.failureResultOf(failing, UpstreamError)
        self.assertEqual(cluster.stats.upstream_cx_connect_fail, 1)

    def test_a_connect_timeout_is_counted_as_one(self) -> None:
        from twisted.internet.error import TimeoutError
        from twisted.internet.testing import MemoryReactorClock
        from twisted.python.failure import Failure

        from hbonex.upstream.cluster import SocketAddress

        reactor = MemoryReactorClock()
        cluster = Cluster("backend", Runtime(reactor), endpoints=(SocketAddress("127.0.0.1", 9),),
                          connect_timeout=1.5)
        d = cluster.connect_stream(Protocol(), UpstreamRequest())
        [(host, port, factory, timeout, _)] = reactor.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 9, 1.5))
        factory.clientConnectionFailed(None, Failure(TimeoutError()))
        error = self.failureResultOf(d, UpstreamError).value
        self.assertEqual(error.reason, "connect to 127.0.0.1:9 timed out after 1.5s")
        self.assertEqual((cluster.stats.upstream_cx_connect_timeout,
                          cluster.stats.upstream_cx_connect_fail), (1, 1))

    def test_connect_fires_after_connection_made_and_leaves_no_trace(self) -> None:
        # connectTCP without an endpoint: the Deferred fires once the protocol's
        # connectionMade ran (the endpoint's order) and the protocol is left as it was.
        from twisted.internet.testing import MemoryReactorClock, StringTransport

        from hbonex.upstream.cluster import SocketAddress

        reactor = MemoryReactorClock()
        cluster = Cluster("backend", Runtime(reactor),
                          endpoints=(SocketAddress("::1", 9),), connect_timeout=2.0)
        events: list[str] = []

        class Recording(Protocol):
            def connectionMade(self) -> None:
                events.append("connectionMade")

        protocol = Recording()
        d = cluster.connect_stream(protocol, UpstreamRequest())
        d.addCallback(lambda address: events.append(f"connected {address}"))
        [(host, port, factory, timeout, _)] = reactor.tcpClients
        self.assertEqual((host, port, timeout), ("::1", 9, 2.0))
        built = factory.buildProtocol(None)
        self.assertIs(built, protocol)
        self.assertEqual(events, [])
        built.makeConnection(StringTransport())
        self.assertEqual(events, ["connectionMade", "connected [::1]:9"])
        self.assertNotIn("makeConnection", vars(protocol))
        self.assertEqual(cluster.stats.upstream_cx_active, 1)

    def test_a_cancelled_tcp_connect_stops_connecting(self) -> None:
        from twisted.internet.error import UserError
        from twisted.internet.testing import MemoryReactorClock
        from twisted.python.failure import Failure

        from hbonex.upstream.cluster import SocketAddress

        reactor = MemoryReactorClock()
        cluster = Cluster("backend", Runtime(reactor), endpoints=(SocketAddress("127.0.0.1", 9),))
        d = cluster.connect_stream(Protocol(), UpstreamRequest())
        [(_, _, factory, _, _)] = reactor.tcpClients
        [connector] = reactor.connectors
        d.cancel()
        self.assertTrue(connector.stoppedConnecting)
        self.failureResultOf(d, defer.CancelledError)
        # The connector then reports the stop; nothing fires twice and nothing is counted.
        factory.clientConnectionFailed(connector, Failure(UserError()))
        self.assertEqual(cluster.stats.upstream_cx_connect_fail, 0)

    def test_a_refused_connect_names_the_address(self) -> None:
        from twisted.internet.error import ConnectionRefusedError
        from twisted.internet.testing import MemoryReactorClock
        from twisted.python.failure import Failure

        from hbonex.upstream.cluster import SocketAddress

        reactor = MemoryReactorClock()
        cluster = Cluster("backend", Runtime(reactor), endpoints=(SocketAddress("127.0.0.1", 9),))
        d = cluster.connect_stream(Protocol(), UpstreamRequest())
        [(_, _, factory, _, _)] = reactor.tcpClients
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        error = self.failureResultOf(d, UpstreamError).value
        self.assertEqual((error.status, error.reason),
                         (503, "connect to 127.0.0.1:9 failed: connection refused"))
        self.assertEqual(cluster.stats.upstream_cx_connect_fail, 1)

    def test_a_resolved_name_outside_the_policy_names_both(self) -> None:
        cluster = Cluster(
            "odst", Runtime(Clock()), type="ORIGINAL_DST",
            target_policy=TargetPolicy((TargetRule.parse("127.0.0.1:8000-8100"),)),
        )
        cluster.lookup = lambda host, port: defer.succeed(  # type: ignore[method-assign]
            [(2, 1, 6, "", ("127.0.0.1", port))]
        )
        d = cluster.pick(UpstreamRequest(original_destination="db.internal:9000"))
        error = self.failureResultOf(d, UpstreamError).value
        self.assertEqual(
            error.reason, "target db.internal:9000 (127.0.0.1:9000) is outside the allowed targets"
        )
