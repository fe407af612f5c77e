"""
Clusters: load balancing over endpoints (internal listeners here, so no sockets), active
connection counts, and ORIGINAL_DST's target policy.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial import unittest

from hbonex.cluster import Cluster, InternalAddress, Runtime, UpstreamRequest
from hbonex.connect import TargetPolicy, TargetRule
from hbonex.errors import UpstreamError


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

    def test_bad_authority_is_400(self) -> None:
        failure = self.decision("no-port")
        self.assertEqual(failure.value.status, 400)
