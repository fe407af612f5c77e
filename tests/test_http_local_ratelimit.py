"""
``envoy.filters.http.local_ratelimit``: the token bucket on a Clock (Envoy's timer refills),
enabled / enforced percentages, x-ratelimit headers, per-connection buckets, descriptors from
the route's and the filter's rate_limits, per-route configuration, and configuration errors.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from hbonex.config import load_config
from hbonex.errors import ConfigError
from hbonex.filters.common.percent import ALWAYS, NEVER, Percent
from hbonex.filters.common.token_bucket import BucketSpec, DescriptorSpec
from hbonex.filters.http.local_ratelimit import LocalRateLimitConfig, LocalRateLimitFilter
from hbonex.http.connection_manager import HttpStreamFactory
from hbonex.http.filter_manager import FilterManager
from hbonex.http.headers import Headers
from hbonex.http.routing import HeaderMutation, HeaderMutations
from hbonex.network.listener import ConnectionInfo
from hbonex.observability.formatter import Template
from hbonex.observability.stats import STATS
from tests.test_e2e_hcm import HCM_TYPE
from tests.test_http_fault import Sink
from tests.test_http_filter_manager import Router

_PREFIXES = itertools.count()


def get(*extra: tuple[bytes, bytes], path: str = "/x") -> Headers:
    headers = Headers.of(method="GET", path=path, authority="a", scheme="http")
    for name, value in extra:
        headers.add(name, value)
    return headers


class Case(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.prefix = f"lrl_test{next(_PREFIXES)}"

    def config(self, **fields: Any) -> LocalRateLimitConfig:
        fields.setdefault("bucket", BucketSpec(2, 1, 1.0))
        fields.setdefault("enabled", ALWAYS)
        fields.setdefault("enforced", ALWAYS)
        return LocalRateLimitConfig(self.prefix, self.clock, random.Random(3), **fields)

    def send(self, config: LocalRateLimitConfig, *extra: tuple[bytes, bytes],
             info: Any = None) -> tuple[FilterManager, Sink]:
        sink = Sink()
        manager = FilterManager([LocalRateLimitFilter(config), Router([])], sink,
                                connection_info=info)
        manager.decodeHeaders(get(*extra), True)
        return manager, sink

    def statuses(self, config: LocalRateLimitConfig, n: int, **kwargs: Any) -> list[bytes]:
        return [self.send(config, **kwargs)[1].status or b"" for _ in range(n)]

    def stat(self, name: str) -> int:
        return STATS.counters[f"{self.prefix}.http_local_rate_limit.{name}"].value


class BucketTests(Case):
    def test_empty_bucket_answers_429_until_the_next_fill(self) -> None:
        config = self.config()
        self.assertEqual(self.statuses(config, 3), [b"200", b"200", b"429"])
        manager, sink = self.send(config)
        self.assertEqual((sink.status, sink.body), (b"429", b"local_rate_limited"))
        self.assertEqual(manager.stream_info.response_flags, {"RL"})
        self.assertEqual(manager.stream_info.response_code_details, "local_rate_limited")
        self.clock.advance(0.999)
        self.assertEqual(self.statuses(config, 1), [b"429"])
        self.clock.advance(0.001)  # the fill timer's tick: one token
        self.assertEqual(self.statuses(config, 2), [b"200", b"429"])
        self.clock.advance(10)  # ten ticks, but never more than max_tokens
        self.assertEqual(self.statuses(config, 3), [b"200", b"200", b"429"])
        self.assertEqual((self.stat("enabled"), self.stat("ok"), self.stat("rate_limited"),
                          self.stat("enforced")), (10, 5, 5, 5))
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no timer is left running

    def test_tokens_per_fill(self) -> None:
        config = self.config(bucket=BucketSpec(5, 3, 0.5))
        self.assertEqual(self.statuses(config, 6).count(b"200"), 5)
        self.clock.advance(0.5)
        self.assertEqual(self.statuses(config, 4).count(b"200"), 3)

    def test_not_enabled_by_default(self) -> None:
        config = self.config(enabled=NEVER)
        self.assertEqual(set(self.statuses(config, 5)), {b"200"})
        self.assertEqual(self.stat("enabled"), 0)

    def test_not_enforced_marks_the_request(self) -> None:
        mark = HeaderMutations((HeaderMutation("x-limited", Template("yes"),
                                               "OVERWRITE_IF_EXISTS_OR_ADD"),))
        config = self.config(enforced=NEVER, request_headers=mark)
        managers = [self.send(config)[0] for _ in range(3)]
        self.assertEqual([m.decoding.headers.get(b"x-limited") for m in managers],
                         [None, None, b"yes"])
        self.assertTrue(all(m.stream_info.response_code == 200 for m in managers))
        self.assertEqual((self.stat("rate_limited"), self.stat("enforced")), (1, 0))

    def test_enabled_percentage_seeded(self) -> None:
        # 40 % of 1000 requests are looked at (sd ~15.5); a large bucket limits none.
        config = self.config(enabled=Percent(40), bucket=BucketSpec(10_000, 1, 1.0))
        self.statuses(config, 1000)
        self.assertTrue(338 <= self.stat("enabled") <= 462, self.stat("enabled"))
        self.assertEqual(self.stat("ok"), self.stat("enabled"))

    def test_status_and_response_headers(self) -> None:
        extra = HeaderMutations((HeaderMutation("x-rl", Template("%DOWNSTREAM_REMOTE_ADDRESS%"),
                                                "OVERWRITE_IF_EXISTS_OR_ADD"),))
        config = self.config(bucket=BucketSpec(1, 1, 1.0), status=503,
                             response_headers=extra)
        info = ConnectionInfo("l", "10.1.2.3:4000", "10.0.0.1:80")
        self.send(config, info=info)
        _, sink = self.send(config, info=info)
        assert sink.headers is not None
        self.assertEqual(sink.status, b"503")
        self.assertEqual(sink.headers.get(b"x-rl"), b"10.1.2.3:4000")

    def test_grpc_resource_exhausted(self) -> None:
        config = self.config(bucket=BucketSpec(1, 1, 1.0), resource_exhausted=True)
        grpc = (b"content-type", b"application/grpc")
        self.send(config, grpc)
        _, sink = self.send(config, grpc)
        assert sink.headers is not None
        self.assertEqual((sink.status, sink.headers.get(b"grpc-status")), (b"200", b"8"))

    def test_x_ratelimit_headers(self) -> None:
        config = self.config(bucket=BucketSpec(2, 1, 60.0), x_ratelimit_headers=True)
        _, sink = self.send(config)
        assert sink.headers is not None
        self.assertEqual([sink.headers.get(b"x-ratelimit-" + n) for n in
                          (b"limit", b"remaining", b"reset")], [b"2", b"1", b"60"])
        self.clock.advance(10.5)
        self.send(config)
        _, sink = self.send(config)
        assert sink.headers is not None
        self.assertEqual(sink.status, b"429")  # the local reply carries them too
        self.assertEqual([sink.headers.get(b"x-ratelimit-" + n) for n in
                          (b"limit", b"remaining", b"reset")], [b"2", b"0", b"50"])
        off = self.config(bucket=BucketSpec(2, 1, 60.0))
        _, sink = self.send(off)
        assert sink.headers is not None
        self.assertIsNone(sink.headers.get(b"x-ratelimit-limit"))

    def test_per_connection_buckets(self) -> None:
        one = ConnectionInfo("l", "10.0.0.1:1", "10.0.0.9:80")
        two = ConnectionInfo("l", "10.0.0.2:1", "10.0.0.9:80")
        per = self.config(bucket=BucketSpec(1, 1, 1.0), per_connection=True)
        self.assertEqual(self.statuses(per, 2, info=one), [b"200", b"429"])
        self.assertEqual(self.statuses(per, 2, info=two), [b"200", b"429"])
        self.assertIn("per_connection_local_rate_limiter", one.filter_state.keys())
        shared = self.config(bucket=BucketSpec(1, 1, 1.0))
        self.assertEqual(self.statuses(shared, 1, info=one), [b"200"])
        self.assertEqual(self.statuses(shared, 1, info=two), [b"429"])

    def test_descriptor_buckets(self) -> None:
        from hbonex.http.rate_limit_policy import RateLimitPolicy, RequestHeadersAction

        config = self.config(
            bucket=BucketSpec(100, 1, 1.0),
            descriptors=(DescriptorSpec((("user", "alice"),), BucketSpec(1, 1, 2.0)),),
            rate_limits=(RateLimitPolicy((RequestHeadersAction("x-user", "user"),)),))
        alice, bob = (b"x-user", b"alice"), (b"x-user", b"bob")
        self.assertEqual([self.send(config, alice)[1].status for _ in range(2)],
                         [b"200", b"429"])
        self.assertEqual([self.send(config, bob)[1].status for _ in range(3)], [b"200"] * 3)
        self.clock.advance(1)  # the bucket's tick, not yet the descriptor's (every 2nd)
        self.assertEqual(self.send(config, alice)[1].status, b"429")
        self.clock.advance(1)
        self.assertEqual(self.send(config, alice)[1].status, b"200")


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
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              rate_limits:
              - actions: [{{generic_key: {{descriptor_value: vhost}}}}]
              routes:
              - match: {{prefix: /users}}
                route:
                  cluster: backend
                  rate_limits:
                  - actions:
                    - request_headers: {{header_name: x-user, descriptor_key: user}}
                  - actions: [{{remote_address: {{}}}}]
              - match: {{prefix: /route}}
                route: {{cluster: backend}}
                typed_per_filter_config:
                  envoy.filters.http.local_ratelimit:
                    "@type": {lrl_type}
                    stat_prefix: per_route
                    token_bucket: {{max_tokens: 1, fill_interval: 1s}}
                    filter_enabled: {{default_value: {{numerator: 100}}}}
                    filter_enforced: {{default_value: {{numerator: 100}}}}
              - match: {{prefix: /}}
                route: {{cluster: backend}}
          http_filters:
          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": {lrl_type}
{filter}
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
LRL_TYPE = ("type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3."
            "LocalRateLimit")
PATH = ("static_resources.listeners[0].filter_chains[0].filters[0].typed_config."
        "http_filters[0].typed_config")
FILTER = """\
stat_prefix: {prefix}
token_bucket: {{max_tokens: 100, fill_interval: 1s}}
filter_enabled: {{default_value: {{numerator: 100}}}}
filter_enforced: {{default_value: {{numerator: 100}}}}
descriptors:
- entries: [{{key: user, value: alice}}]
  token_bucket: {{max_tokens: 1, fill_interval: 1s}}
- entries: [{{key: remote_address, value: 10.9.9.9}}]
  token_bucket: {{max_tokens: 2, fill_interval: 1s}}
- entries: [{{key: generic_key, value: vhost}}]
  token_bucket: {{max_tokens: 3, fill_interval: 1s}}
"""


class _Pool:
    """The upstream never answers: an allowed request stays pending at the router."""

    def acquire(self) -> defer.Deferred[Any]:
        return defer.Deferred()


def yaml(filter_text: str) -> str:
    body = "\n".join(" " * 14 + line for line in filter_text.splitlines())
    return CONFIG.format(filter=body, hcm_type=HCM_TYPE, lrl_type=LRL_TYPE)


class RouteDescriptorTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.prefix = f"lrl_route{next(_PREFIXES)}"

    def streams(self, filter_text: str, remote: str = "10.0.0.1:5000") -> HttpStreamFactory:
        loaded = load_config(yaml(filter_text.format(prefix=self.prefix)), self.clock)
        hcm = loaded.listeners[0].chains[0].filters[0].parsed
        info = ConnectionInfo("http", remote, "127.0.0.1:80")
        return HttpStreamFactory(self.clock, hcm.router, lambda cluster: _Pool(), info,
                                 hcm.http_filters, stat_prefix="ingress")

    def status(self, streams: HttpStreamFactory, path: str, *extra: tuple[bytes, bytes]
               ) -> bytes | None:
        sink = Sink()
        streams(sink).decodeHeaders(get(*extra, path=path), True)
        return sink.status  # None: allowed, waiting for the upstream

    def test_route_actions_make_descriptors(self) -> None:
        streams = self.streams(FILTER)
        alice = (b"x-user", b"alice")
        self.assertEqual([self.status(streams, "/users/1", alice) for _ in range(2)],
                         [None, b"429"])
        # No x-user: that entry makes no descriptor; the remote address one is not limited.
        self.assertEqual([self.status(streams, "/users/1") for _ in range(3)], [None] * 3)
        # The route has rate_limits: the virtual host's are not used (OVERRIDE).
        self.assertEqual([self.status(streams, "/users/1", (b"x-user", b"bob"))
                          for _ in range(4)], [None] * 4)
        # A route without rate_limits gets the virtual host's (generic_key vhost: 3 tokens).
        self.assertEqual([self.status(streams, "/other") for _ in range(4)],
                         [None, None, None, b"429"])
        self.clock.advance(1)
        self.assertEqual(self.status(streams, "/users/1", alice), None)

    def test_remote_address_descriptor(self) -> None:
        streams = self.streams(FILTER, remote="10.9.9.9:4321")
        self.assertEqual([self.status(streams, "/users/x") for _ in range(3)],
                         [None, None, b"429"])

    def test_vh_rate_limits_include_and_ignore(self) -> None:
        include = self.streams(FILTER + "vh_rate_limits: INCLUDE\n")
        self.assertEqual([self.status(include, "/users/1", (b"x-user", b"bob"))
                          for _ in range(4)], [None, None, None, b"429"])
        ignore = self.streams(FILTER.replace("{prefix}", "{prefix}_i")
                              + "vh_rate_limits: IGNORE\n")
        self.assertEqual([self.status(ignore, "/other") for _ in range(5)], [None] * 5)

    def test_filter_rate_limits_replace_the_routes(self) -> None:
        streams = self.streams(FILTER + "rate_limits:\n- actions: [{{generic_key: "
                               "{{descriptor_value: vhost}}}}]\n")
        self.assertEqual([self.status(streams, "/users/1") for _ in range(4)],
                         [None, None, None, b"429"])

    def test_per_route_config(self) -> None:
        streams = self.streams(FILTER)
        self.assertEqual([self.status(streams, "/route") for _ in range(2)], [None, b"429"])
        self.assertEqual(STATS.counters["per_route.http_local_rate_limit.enforced"].value >= 1,
                         True)


class ConfigTests(unittest.TestCase):
    def load(self, filter_text: str) -> Any:
        return load_config(yaml(filter_text), Clock())

    def error(self, filter_text: str) -> str:
        return str(self.assertRaises(ConfigError, self.load, filter_text))

    def test_errors(self) -> None:
        base = "stat_prefix: e\n"
        message = self.error(base + "token_bucket: {max_tokens: 1, fill_interval: 0.01s}")
        self.assertTrue(message.startswith(
            f"{PATH}.token_bucket.fill_interval: must be at least 50ms (Envoy's minimum), "
            "got 0.01s"), message)
        message = self.error(base + "token_bucket: {max_tokens: 1, fill_interval: 1s}\n"
                             "descriptors:\n- entries: [{key: a, value: b}]\n"
                             "  token_bucket: {max_tokens: 1, fill_interval: 1.5s}")
        self.assertTrue(message.startswith(
            f"{PATH}.descriptors[0].token_bucket.fill_interval: must be a multiple of the "
            "filter's token_bucket fill_interval (1s)"), message)
        message = self.error(base + "token_bucket: {max_tokens: 1, fill_interval: 1s}\n"
                             "descriptors:\n- entries: [{key: a}]\n"
                             "  token_bucket: {max_tokens: 1, fill_interval: 1s}")
        self.assertTrue(message.startswith(f"{PATH}.descriptors[0].entries[0]: an entry "
                                           "without a value"), message)
        message = self.error(base + "rate_limits:\n- actions: [{source_cluster: {}}]")
        self.assertTrue(message.startswith(
            f"{PATH}.rate_limits[0].actions[0].source_cluster: "), message)
        message = self.error(base + "local_cluster_rate_limit: {}")
        self.assertTrue(message.startswith(f"{PATH}.local_cluster_rate_limit: "), message)
        message = self.error("token_bucket: {max_tokens: 1, fill_interval: 1s}")
        self.assertTrue(message.startswith(f"{PATH}: missing required field 'stat_prefix'"),
                        message)

    def test_per_route_needs_a_token_bucket(self) -> None:
        text = yaml("stat_prefix: ok").replace(
            " " * 20 + "token_bucket: {max_tokens: 1, fill_interval: 1s}\n", "")
        message = str(self.assertRaises(ConfigError, load_config, text, Clock()))
        self.assertIn("missing required field 'token_bucket' (Envoy requires one in a "
                      "per-route configuration)", message)

    def test_runtime_key_warns(self) -> None:
        loaded = self.load("stat_prefix: w\nfilter_enabled: {runtime_key: my.key, "
                           "default_value: {numerator: 100}}")
        [(path, text)] = [w for w in loaded.warnings if w[0].startswith(PATH)]
        self.assertEqual(path, f"{PATH}.filter_enabled.runtime_key")
        self.assertIn("runtime_key has no effect in hbonex (runtime keys are not read: "
                      "default_value applies)", text)
