"""
``envoy.filters.http.fault``: aborts, delays on the reactor's clock, header-controlled faults,
percentages with a seeded generator, max_active_faults, matching, per-route HTTPFault, and its
configuration errors.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import implementer

from hbonex.config import load_config
from hbonex.errors import ConfigError
from hbonex.filters.common.percent import Percent
from hbonex.filters.http.fault import FaultConfig, FaultFilter, FaultSettings
from hbonex.http.connection_manager import HttpStreamFactory
from hbonex.http.filter_manager import FilterManager, IResponseSink
from hbonex.http.headers import Headers
from hbonex.observability.stats import STATS
from tests.test_e2e_hcm import HCM_TYPE
from tests.test_http_filter_manager import Router

_PREFIXES = itertools.count()


@implementer(IResponseSink)
class Sink:
    """Keeps the response's headers and body."""

    def __init__(self) -> None:
        self.headers: Headers | None = None
        self.body = b""
        self.ended = False
        self.was_reset = False

    def sendHeaders(self, headers: Headers, endStream: bool) -> None:
        self.headers = headers
        self.ended = endStream

    def sendData(self, data: bytes, endStream: bool) -> None:
        self.body += data
        self.ended = endStream

    def sendTrailers(self, trailers: Headers) -> None:
        self.ended = True

    def reset(self) -> None:
        self.was_reset = True

    def registerProducer(self, producer: Any) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def requestProducer(self) -> Any:
        return None

    def switchProtocols(self, protocol: Any) -> bool:
        return False

    @property
    def status(self) -> bytes | None:
        return None if self.headers is None else self.headers.get(b":status")


def request(*extra: tuple[bytes, bytes], end: bool = True) -> Headers:
    headers = Headers.of(method="GET", path="/x", authority="a", scheme="http")
    for name, value in extra:
        headers.add(name, value)
    return headers


class Case(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.prefix = f"http.fault_test{next(_PREFIXES)}."

    def config(self, seed: int = 7, **settings: Any) -> FaultConfig:
        return FaultConfig(FaultSettings(**settings), self.clock, random.Random(seed),
                           self.prefix)

    def run_request(self, config: FaultConfig, *extra: tuple[bytes, bytes], end: bool = True
                    ) -> tuple[FilterManager, Sink]:
        sink = Sink()
        manager = FilterManager([FaultFilter(config), Router([])], sink)
        manager.decodeHeaders(request(*extra), end)
        return manager, sink

    def stat(self, name: str) -> int:
        full = f"{self.prefix}fault.{name}"
        source = STATS.gauges if name == "active_faults" else STATS.counters
        return source[full].value


class AbortTests(Case):
    def test_fixed_abort(self) -> None:
        config = self.config(abort_status=503, abort_percent=Percent(100))
        manager, sink = self.run_request(config)
        self.assertEqual(sink.status, b"503")
        self.assertEqual(sink.body, b"fault filter abort")
        self.assertEqual(manager.stream_info.response_flags, {"FI"})
        self.assertEqual(manager.stream_info.response_code_details, "fault_filter_abort")
        self.assertEqual(self.stat("aborts_injected"), 1)
        self.assertEqual(self.stat("active_faults"), 0)  # the request is over

    def test_percentage_is_drawn_per_request(self) -> None:
        # 30 %, seeded: 2000 requests land within 4 standard deviations (sd ~20.5) of 600.
        config = self.config(abort_status=503, abort_percent=Percent(30))
        statuses = [self.run_request(config)[1].status for _ in range(2000)]
        aborted = statuses.count(b"503")
        self.assertEqual(aborted + statuses.count(b"200"), 2000)
        self.assertTrue(518 <= aborted <= 682, aborted)
        self.assertEqual(self.stat("aborts_injected"), aborted)

    def test_denominator(self) -> None:
        # 25 per TEN_THOUSAND: 20000 requests, about 50 (sd ~7).
        config = self.config(abort_status=500, abort_percent=Percent(25, 10_000))
        aborted = sum(self.run_request(config)[1].status == b"500" for _ in range(20_000))
        self.assertTrue(22 <= aborted <= 78, aborted)

    def test_zero_percent_never_aborts(self) -> None:
        config = self.config(abort_status=503, abort_percent=Percent(0))
        statuses = {self.run_request(config)[1].status for _ in range(200)}
        self.assertEqual(statuses, {b"200"})

    def test_grpc_status(self) -> None:
        config = self.config(abort_grpc_status=14, abort_percent=Percent(100))
        manager, sink = self.run_request(config, (b"content-type", b"application/grpc"))
        assert sink.headers is not None
        self.assertEqual(sink.status, b"200")
        self.assertEqual(sink.headers.get(b"grpc-status"), b"14")
        self.assertEqual(sink.headers.get(b"grpc-message"), b"fault filter abort")
        self.assertEqual(sink.headers.get(b"content-type"), b"application/grpc")
        self.assertEqual(sink.body, b"")
        self.assertTrue(sink.ended)
        self.assertIn("FI", manager.stream_info.response_flags)
        # Not a gRPC request: Envoy's plain 200 with the text.
        _, sink = self.run_request(config)
        self.assertEqual((sink.status, sink.body), (b"200", b"fault filter abort"))

    def test_http_status_to_a_grpc_request(self) -> None:
        config = self.config(abort_status=503, abort_percent=Percent(100))
        _, sink = self.run_request(config, (b"content-type", b"application/grpc+proto"))
        assert sink.headers is not None
        self.assertEqual(sink.status, b"200")
        self.assertEqual(sink.headers.get(b"grpc-status"), b"14")  # UNAVAILABLE

    def test_header_abort(self) -> None:
        config = self.config(header_abort=True, abort_percent=Percent(100))
        self.assertEqual(self.run_request(config)[1].status, b"200")
        abort = (b"x-envoy-fault-abort-request", b"418")
        self.assertEqual(self.run_request(config, abort)[1].status, b"418")
        for bad in (b"600", b"199", b"x", b""):
            self.assertEqual(
                self.run_request(config, (b"x-envoy-fault-abort-request", bad))[1].status,
                b"200", bad)
        grpc = (b"x-envoy-fault-abort-grpc-request", b"5")
        _, sink = self.run_request(config, grpc, (b"content-type", b"application/grpc"))
        assert sink.headers is not None
        self.assertEqual(sink.headers.get(b"grpc-status"), b"5")
        # The percentage header caps the configured percentage (here to 0).
        zero = (b"x-envoy-fault-abort-request-percentage", b"0")
        self.assertEqual(self.run_request(config, abort, zero)[1].status, b"200")
        self.assertEqual(self.stat("aborts_injected"), 2)

    def test_header_percentage_is_a_cap(self) -> None:
        # Configured 10 %, the header asks for 100 %: still about 10 % (sd ~9.5 of 1000).
        config = self.config(header_abort=True, abort_percent=Percent(10))
        headers = ((b"x-envoy-fault-abort-request", b"503"),
                   (b"x-envoy-fault-abort-request-percentage", b"100"))
        aborted = sum(self.run_request(config, *headers)[1].status == b"503"
                      for _ in range(1000))
        self.assertTrue(62 <= aborted <= 138, aborted)


class DelayTests(Case):
    def test_fixed_delay_on_the_clock(self) -> None:
        config = self.config(fixed_delay=2.0, delay_percent=Percent(100))
        sink = Sink()
        manager = FilterManager([FaultFilter(config), Router([])], sink)
        manager.decodeHeaders(request(), False)
        manager.decodeData(b"body ", False)
        self.assertEqual(self.stat("delays_injected"), 1)
        self.assertEqual(self.stat("active_faults"), 1)
        self.assertEqual(manager.stream_info.response_flags, {"DI"})
        manager.decodeData(b"bytes", True)  # arrives during the delay: held here
        self.clock.advance(1.999)
        self.assertIsNone(sink.headers)
        self.clock.advance(0.001)
        self.assertEqual((sink.status, sink.body), (b"200", b"body bytes"))
        self.assertEqual(self.stat("active_faults"), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_delay_then_abort(self) -> None:
        config = self.config(fixed_delay=1.0, delay_percent=Percent(100), abort_status=500,
                             abort_percent=Percent(100))
        manager, sink = self.run_request(config)
        self.assertIsNone(sink.headers)
        self.clock.advance(1)
        self.assertEqual(sink.status, b"500")
        self.assertEqual(manager.stream_info.response_flags, {"DI", "FI"})
        self.assertEqual((self.stat("delays_injected"), self.stat("aborts_injected")), (1, 1))

    def test_client_gone_during_delay_cancels_it(self) -> None:
        config = self.config(fixed_delay=5.0, delay_percent=Percent(100))
        manager, sink = self.run_request(config)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        manager.reset()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.stat("active_faults"), 0)
        self.assertIsNone(sink.headers)

    def test_header_delay(self) -> None:
        config = self.config(header_delay=True, delay_percent=Percent(100))
        _, sink = self.run_request(config)
        self.assertEqual(sink.status, b"200")  # no header: no delay
        _, sink = self.run_request(config, (b"x-envoy-fault-delay-request", b"250"))
        self.assertIsNone(sink.headers)
        [call] = self.clock.getDelayedCalls()
        self.assertAlmostEqual(call.getTime(), 0.25)
        self.clock.advance(0.25)
        self.assertEqual(sink.status, b"200")
        capped = (b"x-envoy-fault-delay-request-percentage", b"0")
        _, sink = self.run_request(config, (b"x-envoy-fault-delay-request", b"250"), capped)
        self.assertEqual(sink.status, b"200")
        self.assertEqual(self.stat("delays_injected"), 1)

    def test_delay_percentage(self) -> None:
        config = self.config(fixed_delay=1.0, delay_percent=Percent(50))
        sinks = [self.run_request(config)[1] for _ in range(1000)]
        delayed = sum(s.headers is None for s in sinks)
        self.assertTrue(437 <= delayed <= 563, delayed)  # sd ~15.8
        self.clock.advance(1)
        self.assertTrue(all(s.status == b"200" for s in sinks))

    def test_max_active_faults(self) -> None:
        config = self.config(fixed_delay=1.0, delay_percent=Percent(100), max_active_faults=1)
        _, first = self.run_request(config)
        manager, second = self.run_request(config)
        self.assertIsNone(first.headers)
        self.assertEqual(second.status, b"200")  # not faulted: the limit is reached
        self.assertNotIn("DI", manager.stream_info.response_flags)
        self.assertEqual(self.stat("faults_overflow"), 1)
        self.clock.advance(1)
        _, third = self.run_request(config)
        self.assertIsNone(third.headers)  # the first one's fault is over


class MatchTests(Case):
    def test_headers(self) -> None:
        from hbonex.http.routing import HeaderMatcher

        config = self.config(abort_status=503, abort_percent=Percent(100),
                             headers=(HeaderMatcher("x-fault", exact="yes"),))
        self.assertEqual(self.run_request(config)[1].status, b"200")
        self.assertEqual(self.run_request(config, (b"x-fault", b"no"))[1].status, b"200")
        self.assertEqual(self.run_request(config, (b"x-fault", b"yes"))[1].status, b"503")

    def test_upstream_cluster(self) -> None:
        from types import SimpleNamespace

        config = self.config(abort_status=503, abort_percent=Percent(100),
                             upstream_cluster="reviews")

        def status(cluster: str | None) -> bytes | None:
            route = SimpleNamespace(cluster=SimpleNamespace(name=cluster) if cluster else None)
            sink = Sink()
            manager = FilterManager([FaultFilter(config), Router([])], sink,
                                    route_resolver=lambda headers, info: route)
            manager.decodeHeaders(request(), True)
            return sink.status

        self.assertEqual([status("reviews"), status("ratings"), status(None)],
                         [b"503", b"200", b"200"])

    def test_downstream_nodes(self) -> None:
        config = self.config(abort_status=503, abort_percent=Percent(100),
                             downstream_nodes=frozenset({"node-a"}))
        self.assertEqual(self.run_request(config)[1].status, b"200")
        node = b"x-envoy-downstream-service-node"
        self.assertEqual(self.run_request(config, (node, b"node-b"))[1].status, b"200")
        self.assertEqual(self.run_request(config, (node, b"node-a"))[1].status, b"503")


CONFIG = """\
static_resources:
  listeners:
  - name: http
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm_type}
          stat_prefix: {prefix}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /noisy}}
                direct_response: {{status: 200}}
                typed_per_filter_config:
                  envoy.filters.http.fault:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
                    abort: {{http_status: 502, percentage: {{numerator: 100}}}}
              - match: {{prefix: /backend}}
                direct_response: {{status: 200}}
              - match: {{prefix: /}}
                direct_response: {{status: 200}}
          http_filters:
          - name: envoy.filters.http.fault
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
{fault}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 1}}}}}}
"""

PATH = ("static_resources.listeners[0].filter_chains[0].filters[0].typed_config."
        "http_filters[0].typed_config")


def yaml(fault: str, prefix: str = "faulty") -> str:
    body = "\n".join(" " * 14 + line for line in fault.splitlines())
    return CONFIG.format(fault=body, prefix=prefix, hcm_type=HCM_TYPE)


class ConfigTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def load(self, fault: str, prefix: str = "faulty") -> Any:
        return load_config(yaml(fault, prefix), self.clock)

    def error(self, fault: str) -> str:
        return str(self.assertRaises(ConfigError, self.load, fault))

    def test_loaded_settings_and_stats_prefix(self) -> None:
        loaded = self.load("abort: {http_status: 503, percentage: {numerator: 5, denominator: "
                           "MILLION}}\ndelay: {header_delay: {}, percentage: {numerator: 100}}\n"
                           "max_active_faults: 3\nheaders: [{name: x-a, present_match: true}]",
                           prefix="cfgtest")
        hcm = loaded.listeners[0].chains[0].filters[0].parsed
        [factory] = hcm.http_filters
        config = factory.make().config
        self.assertEqual(config.settings.abort_status, 503)
        self.assertEqual(config.settings.abort_percent, Percent(5, 1_000_000))
        self.assertTrue(config.settings.header_delay)
        self.assertEqual(config.settings.max_active_faults, 3)
        self.assertEqual(config.settings.headers[0].name, "x-a")
        self.assertIn("http.cfgtest.fault.aborts_injected", STATS.counters)
        self.assertEqual(loaded.warnings, [])

    def test_per_route_config_replaces_the_filters(self) -> None:
        loaded = self.load("delay: {fixed_delay: 3s, percentage: {numerator: 100}}")
        hcm = loaded.listeners[0].chains[0].filters[0].parsed
        clock = self.clock
        streams = HttpStreamFactory(clock, hcm.router, lambda cluster: None, None,
                                    hcm.http_filters, stat_prefix="faulty")

        def get(path: str) -> Sink:
            sink = Sink()
            streams(sink).decodeHeaders(Headers.of(method="GET", path=path, authority="a",
                                                   scheme="http"), True)
            return sink

        self.assertEqual(get("/noisy").status, b"502")  # the route's: abort, no delay
        plain = get("/other")
        self.assertIsNone(plain.headers)  # the filter's: delayed 3 s
        clock.advance(3)
        self.assertEqual(plain.status, b"200")

    def test_unset_percentage_warns(self) -> None:
        loaded = self.load("abort: {http_status: 503}")
        [(path, text)] = loaded.warnings
        self.assertEqual(path, f"{PATH}.abort")
        self.assertIn("percentage is 0 (its default when unset): no request is faulted", text)

    def test_runtime_keys_warn(self) -> None:
        loaded = self.load("abort: {http_status: 503, percentage: {numerator: 1}}\n"
                           "abort_percent_runtime: my.key")
        [(path, text)] = loaded.warnings
        self.assertEqual(path, f"{PATH}.abort_percent_runtime")
        self.assertIn("no runtime overrides", text)

    def test_errors(self) -> None:
        self.assertEqual(self.error("abort: {http_status: 700, percentage: {numerator: 1}}"),
                         f"{PATH}.abort.http_status: must be at least 200 and below 600, got "
                         "700 (line 30)")
        self.assertEqual(self.error("abort: {percentage: {numerator: 1}}"),
                         f"{PATH}.abort: one of http_status, grpc_status, header_abort is "
                         "required (line 30)")
        self.assertEqual(self.error("delay: {fixed_delay: 0s, percentage: {numerator: 1}}"),
                         f"{PATH}.delay.fixed_delay: must be above 0 (line 30)")
        self.assertEqual(self.error("delay: {percentage: {numerator: 1}}"),
                         f"{PATH}.delay: one of fixed_delay, header_delay is required "
                         "(line 30)")
        message = self.error("response_rate_limit: {fixed_limit: {limit_kbps: 1}}")
        self.assertTrue(message.startswith(f"{PATH}.response_rate_limit: "), message)
        self.assertIn("no response bandwidth limiting", message)
        message = self.error("headers: [{name: x-a, string_match: {exact: b, ignore_case: "
                             "true}}]")
        self.assertTrue(message.startswith(f"{PATH}.headers[0].string_match.ignore_case: "),
                        message)
