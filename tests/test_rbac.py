"""
RBAC (hbonex.filters.common.rbac): the policy engine's principals, permissions, combinators
and actions; the HTTP filter in a FilterManager (403, shadow rules, stats, dynamic metadata,
per-route RBACPerRoute); the network filter on in-memory connections; configuration errors.
Policies are written in YAML and loaded through the real config loader.
"""

from __future__ import annotations

import itertools
import textwrap
from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from hbonex.config import load_config
from hbonex.errors import ConfigError
from hbonex.filters.common.rbac import Attributes, Engine, stat_prefix_join
from hbonex.filters.network.rbac import RbacNetworkFilter
from hbonex.http.connection_manager import route_resolver
from hbonex.http.filter_manager import FilterHeadersStatus, FilterManager
from hbonex.http.headers import Headers
from hbonex.http.stream_info import FilterState, SharedWithUpstream
from hbonex.interfaces import INetworkFilter, IStreamDecoderFilter
from hbonex.network.listener import ConnectionInfo
from hbonex.observability.stats import STATS
from tests.test_http_filter_manager import Sink

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3." \
      "HttpConnectionManager"
CLIENT = "spiffe://cluster.local/ns/default/sa/client"
IMPOSTOR = "spiffe://cluster.local/ns/default/sa/impostor"
_PREFIXES = itertools.count(1)

CONFIG = """\
static_resources:
  listeners:
  - name: l
    address:
      socket_address: {{address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
{network}
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm}
          stat_prefix: {prefix}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
{routes}
              - match: {{prefix: /}}
                route: {{cluster: backend}}
          http_filters:
{http}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    connect_timeout: 1s
    load_assignment:
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: 8080}}
"""


def indent(text: str, spaces: int) -> str:
    return textwrap.indent(textwrap.dedent(text).strip("\n"), " " * spaces)


def _filter(name: str, type_url: str, body: str, spaces: int) -> str:
    head = f"- name: {name}\n  typed_config:\n    \"@type\": {type_url}\n"
    return indent(head + indent(body, 4), spaces)


def http_filter(body: str) -> str:
    return _filter("envoy.filters.http.rbac",
                   "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC", body, 10)


def network_filter(body: str) -> str:
    return _filter("envoy.filters.network.rbac",
                   "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
                   body, 6)


def config_text(http: str = "", network: str = "", routes: str = "", prefix: str = "") -> str:
    return CONFIG.format(hcm=HCM, prefix=prefix or "web", routes=indent(routes, 14),
                         http=http_filter(http) if http else "",
                         network=network_filter(network) if network else "")


def load(text: str) -> Any:
    return load_config(text, MemoryReactorClock())


def connection(remote: str = "10.1.2.3:4567", local: str = "10.0.0.1:8443", *,
               peer: str = "", sni: str = "") -> ConnectionInfo:
    return ConnectionInfo("l", remote, local, requestedServerName=sni, peerIdentity=peer)


def request(path: str = "/", method: str = "GET", **headers: str) -> Headers:
    h = Headers.of(method=method, path=path, authority="svc.example", scheme="http")
    for name, value in headers.items():
        h.add(name.replace("_", "-").encode(), value.encode())
    return h


class Loaded:
    """One loaded configuration's HCM (its RBAC filter and routes) and network filters."""

    def __init__(self, text: str) -> None:
        loaded = load(text)
        listener = loaded.bootstrap.listeners[0] if isinstance(
            loaded.bootstrap.listeners, list) else next(iter(loaded.bootstrap.listeners.values()))
        filters = [make() for make in listener.filter_chains[0].filters]
        self.network = [f for f in filters if isinstance(f, RbacNetworkFilter)]
        self.hcm = filters[-1].config
        self.http = [f for f in getattr(self.hcm, "http_filters", ())
                     if f.name == "envoy.filters.http.rbac"]

    def engine(self) -> Engine:
        engine = self.http[0].make().config.rules.engine
        assert engine is not None
        return engine


def rules(policies: str, action: str = "ALLOW") -> str:
    return f"rules:\n  action: {action}\n  policies:\n{indent(policies, 4)}"


def engine(permission: str = "any: true", principal: str = "any: true",
           action: str = "ALLOW") -> Engine:
    return Loaded(config_text(http=rules(f"""
        p:
          permissions:
          - {permission}
          principals:
          - {principal}
        """, action))).engine()


def matches(e: Engine, info: Any = None, headers: Headers | None = None,
            state: Any = None) -> bool:
    decision = e.evaluate(Attributes(info if info is not None else connection(), headers,
                                     state))
    return decision.policy == "p"


class PrincipalTests(unittest.TestCase):
    def test_any(self) -> None:
        self.assertTrue(matches(engine(principal="any: true")))

    def test_authenticated_principal_name(self) -> None:
        e = engine(principal=f'authenticated: {{principal_name: {{exact: "{CLIENT}"}}}}')
        self.assertTrue(matches(e, connection(peer=CLIENT)))
        self.assertFalse(matches(e, connection(peer=IMPOSTOR)))
        self.assertFalse(matches(e, connection()))

    def test_authenticated_string_matchers(self) -> None:
        cases = {
            "prefix: spiffe://cluster.local/ns/default/": (CLIENT, "spiffe://other/ns/x"),
            "suffix: /sa/client": (CLIENT, IMPOSTOR),
            "contains: sa/cli": (CLIENT, IMPOSTOR),
            "safe_regex: {regex: 'spiffe://[^/]+/ns/default/sa/c.*'}": (CLIENT, IMPOSTOR),
            "{exact: SPIFFE://CLUSTER.LOCAL/ns/default/sa/CLIENT, ignore_case: true}": (
                CLIENT, IMPOSTOR),
        }
        for matcher, (yes, no) in cases.items():
            body = matcher if matcher.startswith("{") else f"{{{matcher}}}"
            e = engine(principal=f"authenticated: {{principal_name: {body}}}")
            self.assertTrue(matches(e, connection(peer=yes)), matcher)
            self.assertFalse(matches(e, connection(peer=no)), matcher)

    def test_authenticated_without_a_name_is_any_peer(self) -> None:
        e = engine(principal="authenticated: {}")
        self.assertTrue(matches(e, connection(peer=IMPOSTOR)))
        self.assertFalse(matches(e, connection()))

    def test_remote_addresses(self) -> None:
        for kind in ("direct_remote_ip", "remote_ip", "source_ip"):
            e = engine(principal=f"{kind}: {{address_prefix: 10.1.0.0, prefix_len: 16}}")
            self.assertTrue(matches(e, connection(remote="10.1.2.3:4")), kind)
            self.assertFalse(matches(e, connection(remote="10.2.2.3:4")), kind)
            self.assertFalse(matches(e, connection(remote="[::1]:4")), kind)
        e = engine(principal="remote_ip: {address_prefix: '::1', prefix_len: 128}")
        self.assertTrue(matches(e, connection(remote="[::1]:4")))

    def test_direct_remote_is_the_address_before_a_listener_filter_restored_another(
            self) -> None:
        info = connection(remote="10.9.9.9:1")
        info.directRemoteAddress = "127.0.0.1:5"  # what was accepted
        direct = engine(principal="direct_remote_ip: {address_prefix: 127.0.0.1, "
                                  "prefix_len: 32}")
        remote = engine(principal="remote_ip: {address_prefix: 127.0.0.1, prefix_len: 32}")
        self.assertTrue(matches(direct, info))
        self.assertFalse(matches(remote, info))

    def test_filter_state_request_then_connection(self) -> None:
        e = engine(principal="filter_state: {key: io.istio.peer_principal, "
                             f"string_match: {{exact: '{CLIENT}'}}}}")
        info = connection(peer=IMPOSTOR)
        self.assertFalse(matches(e, info))
        # The connection's state (an internal listener's, shared ONCE by the tunnel's HCM).
        info.filter_state.set_data("io.istio.peer_principal", CLIENT, SharedWithUpstream.NONE)
        self.assertTrue(matches(e, info, request(), FilterState()))
        # The request's own state is looked at first.
        mine = FilterState()
        mine.set_data("io.istio.peer_principal", IMPOSTOR)
        self.assertFalse(matches(e, info, request(), mine))

    def test_header_and_url_path(self) -> None:
        e = engine(principal="header: {name: x-team, string_match: {exact: blue}}")
        self.assertTrue(matches(e, headers=request(x_team="blue")))
        self.assertFalse(matches(e, headers=request(x_team="red")))
        self.assertFalse(matches(e))  # no headers (L4)
        # Repeated values are read joined with ',' (Envoy's header matching).
        both = request()
        both.add(b"x-team", b"red")
        both.add(b"x-team", b"blue")
        joined = engine(principal="header: {name: x-team, exact_match: 'red,blue'}")
        self.assertTrue(matches(joined, headers=both))
        path = engine(principal="url_path: {path: {prefix: /api/}}")
        self.assertTrue(matches(path, headers=request("/api/x?q=/other")))
        self.assertFalse(matches(path, headers=request("/web/x?q=/api/")))

    def test_combinators(self) -> None:
        both = engine(principal=f"""and_ids: {{ids: [{{authenticated: {{principal_name:
              {{exact: '{CLIENT}'}}}}}}, {{remote_ip: {{address_prefix: 10.1.0.0,
              prefix_len: 16}}}}]}}""".replace("\n", " "))
        self.assertTrue(matches(both, connection(peer=CLIENT)))
        self.assertFalse(matches(both, connection(peer=CLIENT, remote="10.2.0.1:1")))
        either = engine(principal=f"or_ids: {{ids: [{{authenticated: {{principal_name: "
                                  f"{{exact: '{CLIENT}'}}}}}}, {{remote_ip: "
                                  "{address_prefix: 10.2.0.0, prefix_len: 16}}]}")
        self.assertTrue(matches(either, connection(peer=CLIENT)))
        self.assertTrue(matches(either, connection(remote="10.2.0.1:1")))
        self.assertFalse(matches(either, connection(peer=IMPOSTOR)))
        negated = engine(principal=f"not_id: {{authenticated: {{principal_name: "
                                   f"{{exact: '{IMPOSTOR}'}}}}}}")
        self.assertTrue(matches(negated, connection(peer=CLIENT)))
        self.assertFalse(matches(negated, connection(peer=IMPOSTOR)))


class PermissionTests(unittest.TestCase):
    def test_destination(self) -> None:
        ip = engine(permission="destination_ip: {address_prefix: 10.0.0.0, prefix_len: 24}")
        self.assertTrue(matches(ip, connection(local="10.0.0.1:80")))
        self.assertFalse(matches(ip, connection(local="10.0.1.1:80")))
        port = engine(permission="destination_port: 8443")
        self.assertTrue(matches(port, connection(local="10.0.0.1:8443")))
        self.assertFalse(matches(port, connection(local="10.0.0.1:8444")))
        self.assertFalse(matches(port, connection(local="envoy://internal/x")))
        span = engine(permission="destination_port_range: {start: 8000, end: 8443}")
        self.assertTrue(matches(span, connection(local="10.0.0.1:8000")))
        self.assertTrue(matches(span, connection(local="10.0.0.1:8442")))
        self.assertFalse(matches(span, connection(local="10.0.0.1:8443")))  # end excluded

    def test_requested_server_name(self) -> None:
        e = engine(permission="requested_server_name: {suffix: .example.com}")
        self.assertTrue(matches(e, connection(sni="api.example.com")))
        self.assertFalse(matches(e, connection(sni="api.example.org")))
        self.assertFalse(matches(e, connection()))

    def test_header_and_url_path(self) -> None:
        method = engine(permission="header: {name: ':method', string_match: {exact: GET}}")
        self.assertTrue(matches(method, headers=request(method="GET")))
        self.assertFalse(matches(method, headers=request(method="POST")))
        path = engine(permission="url_path: {path: {exact: /healthz}}")
        self.assertTrue(matches(path, headers=request("/healthz?full=1")))
        self.assertFalse(matches(path, headers=request("/healthz/x")))

    def test_combinators(self) -> None:
        both = engine(permission="and_rules: {rules: [{destination_port: 80}, "
                                 "{url_path: {path: {prefix: /a}}}]}")
        self.assertTrue(matches(both, connection(local="1.1.1.1:80"), request("/a")))
        self.assertFalse(matches(both, connection(local="1.1.1.1:81"), request("/a")))
        either = engine(permission="or_rules: {rules: [{destination_port: 80}, "
                                   "{destination_port: 81}]}")
        self.assertTrue(matches(either, connection(local="1.1.1.1:81")))
        self.assertFalse(matches(either, connection(local="1.1.1.1:82")))
        negated = engine(permission="not_rule: {destination_port: 80}")
        self.assertFalse(matches(negated, connection(local="1.1.1.1:80")))
        self.assertTrue(matches(negated, connection(local="1.1.1.1:81")))

    def test_a_policy_needs_a_permission_and_a_principal(self) -> None:
        e = engine(permission="destination_port: 80",
                   principal=f"authenticated: {{principal_name: {{exact: '{CLIENT}'}}}}")
        self.assertTrue(matches(e, connection(local="1.1.1.1:80", peer=CLIENT)))
        self.assertFalse(matches(e, connection(local="1.1.1.1:81", peer=CLIENT)))
        self.assertFalse(matches(e, connection(local="1.1.1.1:80", peer=IMPOSTOR)))


class ActionTests(unittest.TestCase):
    POLICIES = f"""
        b-client:
          permissions: [{{any: true}}]
          principals: [{{authenticated: {{principal_name: {{exact: '{CLIENT}'}}}}}}]
        a-port:
          permissions: [{{destination_port: 80}}]
          principals: [{{any: true}}]
        """

    def decide(self, action: str, info: Any) -> tuple[bool, str]:
        e = Loaded(config_text(http=rules(self.POLICIES, action))).engine()
        decision = e.evaluate(Attributes(info))
        return decision.allowed, decision.policy

    def test_allow(self) -> None:
        self.assertEqual(self.decide("ALLOW", connection(peer=CLIENT)), (True, "b-client"))
        self.assertEqual(self.decide("ALLOW", connection(peer=IMPOSTOR)), (False, ""))

    def test_deny(self) -> None:
        self.assertEqual(self.decide("DENY", connection(peer=CLIENT)), (False, "b-client"))
        self.assertEqual(self.decide("DENY", connection(peer=IMPOSTOR)), (True, ""))

    def test_log_allows_everything(self) -> None:
        self.assertEqual(self.decide("LOG", connection(peer=CLIENT)), (True, "b-client"))
        self.assertEqual(self.decide("LOG", connection(peer=IMPOSTOR)), (True, ""))

    def test_policies_are_tried_in_name_order(self) -> None:
        both = connection(peer=CLIENT, local="1.1.1.1:80")
        self.assertEqual(self.decide("ALLOW", both), (True, "a-port"))

    def test_stat_prefix_join(self) -> None:
        self.assertEqual(stat_prefix_join("http.web.", "rbac."), "http.web.rbac.")
        self.assertEqual(stat_prefix_join("l4", "rbac."), "l4.rbac.")
        self.assertEqual(stat_prefix_join("", "allowed"), "allowed")


@implementer(IStreamDecoderFilter)
class Upstream:
    """Where an allowed request arrives (the router's place)."""

    def __init__(self) -> None:
        self.seen: list[Headers] = []

    def setDecoderFilterCallbacks(self, callbacks: Any) -> None:
        self.callbacks = callbacks

    def decodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        self.seen.append(headers)
        self.callbacks.encodeHeaders(Headers([(b":status", b"200")]), True)
        return FilterHeadersStatus.StopIteration

    def decodeData(self, data: bytes, endStream: bool) -> Any:
        raise AssertionError("no body expected")

    def decodeTrailers(self, trailers: Headers) -> Any:
        raise AssertionError("no trailers expected")

    def onDestroy(self) -> None:
        pass


class HttpFilterTests(unittest.TestCase):
    ALLOW_CLIENT = f"""
        client:
          permissions: [{{any: true}}]
          principals: [{{authenticated: {{principal_name: {{exact: '{CLIENT}'}}}}}}]
        """

    def setUp(self) -> None:
        self.prefix = f"rbac_test_{next(_PREFIXES)}"

    def loaded(self, body: str, routes: str = "") -> Loaded:
        return Loaded(config_text(http=body, routes=routes, prefix=self.prefix))

    def run_request(self, loaded: Loaded, info: Any, headers: Headers | None = None
                    ) -> tuple[FilterManager, Sink, Upstream]:
        upstream = Upstream()
        sink = Sink()
        manager = FilterManager(
            [loaded.http[0].make(), upstream], sink, connection_info=info,
            route_resolver=route_resolver(loaded.hcm.router),
            names=["envoy.filters.http.rbac", "upstream"],
            # What the HCM passes when a route switches filters off.
            disabled=frozenset() if loaded.hcm.router.switches_filters else None)
        manager.decodeHeaders(headers if headers is not None else request(), True)
        return manager, sink, upstream

    def stat(self, name: str) -> int:
        return STATS.counter(f"http.{self.prefix}.rbac.{name}").value

    def test_allowed_and_denied(self) -> None:
        loaded = self.loaded(rules(self.ALLOW_CLIENT))
        manager, sink, upstream = self.run_request(loaded, connection(peer=CLIENT))
        self.assertEqual(len(upstream.seen), 1)
        self.assertEqual(sink.events, [("headers", b"200", True)])
        self.assertEqual(manager.stream_info.dynamic_metadata["envoy.filters.http.rbac"], {
            "enforced_effective_policy_id": "client", "enforced_engine_result": "allowed"})
        manager, sink, upstream = self.run_request(loaded, connection(peer=IMPOSTOR))
        self.assertEqual(upstream.seen, [])
        self.assertEqual(sink.events[0], ("headers", b"403", False))
        self.assertEqual(sink.body, b"RBAC: access denied")
        info = manager.stream_info
        self.assertEqual(info.response_code, 403)
        self.assertEqual(info.response_code_details, "rbac_access_denied_matched_policy[none]")
        self.assertEqual(info.response_flags, set())  # Envoy's RBAC filter sets none
        self.assertEqual(info.dynamic_metadata["envoy.filters.http.rbac"],
                         {"enforced_engine_result": "denied"})
        self.assertEqual((self.stat("allowed"), self.stat("denied")), (1, 1))

    def test_deny_names_the_policy_spaces_replaced(self) -> None:
        loaded = self.loaded(rules("""
            "no impostors":
              permissions: [{any: true}]
              principals: [{authenticated: {principal_name: {suffix: /impostor}}}]
            """, "DENY"))
        manager, sink, _ = self.run_request(loaded, connection(peer=IMPOSTOR))
        self.assertEqual(manager.stream_info.response_code_details,
                         "rbac_access_denied_matched_policy[no_impostors]")

    def test_no_rules_allows_everything(self) -> None:
        loaded = self.loaded("rules_stat_prefix: x_")
        _, sink, upstream = self.run_request(loaded, connection())
        self.assertEqual(len(upstream.seen), 1)

    def test_empty_rules_deny_everything(self) -> None:
        # An ALLOW engine with no policies matches nothing (Envoy).
        loaded = self.loaded("rules: {}")
        _, sink, upstream = self.run_request(loaded, connection(peer=CLIENT))
        self.assertEqual(upstream.seen, [])
        self.assertEqual(sink.events[0][1], b"403")

    def test_shadow_rules_only_count_and_record(self) -> None:
        loaded = self.loaded(f"shadow_rules_stat_prefix: trial_\nshadow_{rules(self.ALLOW_CLIENT)}")
        manager, _, upstream = self.run_request(loaded, connection(peer=IMPOSTOR))
        self.assertEqual(len(upstream.seen), 1)
        self.assertEqual(manager.stream_info.dynamic_metadata["envoy.filters.http.rbac"],
                         {"trial_shadow_engine_result": "denied"})
        manager, _, _ = self.run_request(loaded, connection(peer=CLIENT))
        self.assertEqual(manager.stream_info.dynamic_metadata["envoy.filters.http.rbac"], {
            "trial_shadow_effective_policy_id": "client",
            "trial_shadow_engine_result": "allowed"})
        self.assertEqual((self.stat("trial_.shadow_allowed"), self.stat("trial_.shadow_denied"),
                          self.stat("allowed"), self.stat("denied")), (1, 1, 0, 0))

    def test_rules_stat_prefix_and_per_rule_stats(self) -> None:
        loaded = self.loaded(f"rules_stat_prefix: strict\ntrack_per_rule_stats: true\n"
                             f"{rules(self.ALLOW_CLIENT)}")
        manager, _, _ = self.run_request(loaded, connection(peer=CLIENT))
        self.assertEqual(self.stat("strict.allowed"), 1)
        self.assertEqual(self.stat("strict.policy.client.allowed"), 1)
        self.assertIn("strictenforced_engine_result",
                      manager.stream_info.dynamic_metadata["envoy.filters.http.rbac"])

    def test_log_action_sets_the_access_log_hint(self) -> None:
        loaded = self.loaded(rules(self.ALLOW_CLIENT, "LOG"))
        manager, _, upstream = self.run_request(loaded, connection(peer=CLIENT))
        self.assertEqual(manager.stream_info.dynamic_metadata["envoy.common"],
                         {"access_log_hint": True})
        manager, _, upstream = self.run_request(loaded, connection(peer=IMPOSTOR))
        self.assertEqual(manager.stream_info.dynamic_metadata["envoy.common"],
                         {"access_log_hint": False})
        self.assertEqual(len(upstream.seen), 1)

    def test_per_route_override_and_disable(self) -> None:
        per_route = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute"
        routes = f"""
            - match: {{prefix: /open}}
              route: {{cluster: backend}}
              typed_per_filter_config:
                envoy.filters.http.rbac:
                  "@type": {per_route}
            - match: {{prefix: /impostors}}
              route: {{cluster: backend}}
              typed_per_filter_config:
                envoy.filters.http.rbac:
                  "@type": {per_route}
                  rbac:
                    rules:
                      action: ALLOW
                      policies:
                        them:
                          permissions: [{{any: true}}]
                          principals:
                          - authenticated: {{principal_name: {{exact: '{IMPOSTOR}'}}}}
            - match: {{prefix: /off}}
              route: {{cluster: backend}}
              typed_per_filter_config:
                envoy.filters.http.rbac:
                  "@type": type.googleapis.com/envoy.config.route.v3.FilterConfig
                  disabled: true
            """
        loaded = self.loaded(rules(self.ALLOW_CLIENT), routes=routes)

        def through(path: str, peer: str) -> bool:
            _, _, upstream = self.run_request(loaded, connection(peer=peer), request(path))
            return bool(upstream.seen)

        self.assertEqual([through("/x", CLIENT), through("/x", IMPOSTOR)], [True, False])
        self.assertEqual([through("/open", CLIENT), through("/open", IMPOSTOR)], [True, True])
        self.assertEqual([through("/impostors", CLIENT), through("/impostors", IMPOSTOR)],
                         [False, True])
        self.assertEqual([through("/off", CLIENT), through("/off", IMPOSTOR)], [True, True])

    def test_verify(self) -> None:
        self.assertTrue(verifyObject(IStreamDecoderFilter,
                                     self.loaded(rules(self.ALLOW_CLIENT)).http[0].make()))


class NetworkCallbacks:
    def __init__(self, info: Any) -> None:
        self.info = info
        self.transport = StringTransport()


class NetworkFilterTests(unittest.TestCase):
    def setUp(self) -> None:
        self.prefix = f"l4_test_{next(_PREFIXES)}"

    def filter(self, body: str) -> RbacNetworkFilter:
        loaded = Loaded(config_text(network=f"stat_prefix: {self.prefix}\n{body}"))
        return loaded.network[0]

    ALLOW_CLIENT = rules(f"""
        client:
          permissions: [{{destination_port: 15008}}]
          principals: [{{authenticated: {{principal_name: {{exact: '{CLIENT}'}}}}}}]
        """)

    def test_allowed_goes_on_denied_is_closed_before_the_next_filter(self) -> None:
        allowed = NetworkCallbacks(connection(local="10.0.0.1:15008", peer=CLIENT))
        f = self.filter(self.ALLOW_CLIENT)
        self.assertTrue(verifyObject(INetworkFilter, f))
        self.assertTrue(f.onNewConnection(allowed))  # type: ignore[arg-type]
        self.assertTrue(f.onData(b"hello", False))
        self.assertFalse(allowed.transport.disconnecting)
        denied = NetworkCallbacks(connection(local="10.0.0.1:15008", peer=IMPOSTOR))
        f = self.filter(self.ALLOW_CLIENT)
        self.assertFalse(f.onNewConnection(denied))  # type: ignore[arg-type]
        self.assertTrue(denied.transport.disconnecting)
        self.assertFalse(f.onData(b"hello", False))
        self.assertEqual(STATS.counter(f"{self.prefix}.rbac.allowed").value, 1)
        self.assertEqual(STATS.counter(f"{self.prefix}.rbac.denied").value, 1)

    def test_shadow_rules_and_metadata(self) -> None:
        f = self.filter(f"shadow_rules_stat_prefix: s_\nshadow_{self.ALLOW_CLIENT}")
        callbacks = NetworkCallbacks(connection(local="10.0.0.1:15008", peer=IMPOSTOR))
        self.assertTrue(f.onNewConnection(callbacks))  # type: ignore[arg-type]
        self.assertEqual(callbacks.info.dynamic_metadata["envoy.filters.network.rbac"],
                         {"s_shadow_engine_result": "denied"})
        self.assertEqual(STATS.counter(f"{self.prefix}.rbac.s_.shadow_denied").value, 1)

    def test_delay_deny(self) -> None:
        loaded = Loaded(config_text(network=f"stat_prefix: {self.prefix}\ndelay_deny: 2s\n"
                                            f"{self.ALLOW_CLIENT}"))
        f = loaded.network[0]
        clock = f.config.reactor
        callbacks = NetworkCallbacks(connection(peer=IMPOSTOR))
        self.assertFalse(f.onNewConnection(callbacks))  # type: ignore[arg-type]
        self.assertFalse(f.onData(b"dropped", False))
        self.assertFalse(callbacks.transport.disconnecting)
        clock.advance(2)
        self.assertTrue(callbacks.transport.disconnecting)

    def test_continuous_checks_every_read(self) -> None:
        f = self.filter("enforcement_type: CONTINUOUS\n" + rules("""
            tagged:
              permissions: [{any: true}]
              principals: [{filter_state: {key: tag, string_match: {exact: ok}}}]
            """))
        info = connection()
        info.filter_state.set_data("tag", "ok")
        callbacks = NetworkCallbacks(info)
        self.assertTrue(f.onNewConnection(callbacks))  # type: ignore[arg-type]
        self.assertTrue(f.onData(b"a", False))
        info.filter_state.set_data("tag", "revoked")
        self.assertFalse(f.onData(b"b", False))
        self.assertTrue(callbacks.transport.disconnecting)
        one_time = self.filter(rules("""
            tagged:
              permissions: [{any: true}]
              principals: [{filter_state: {key: tag, string_match: {exact: ok}}}]
            """))
        info = connection()
        info.filter_state.set_data("tag", "ok")
        self.assertTrue(one_time.onNewConnection(NetworkCallbacks(info)))  # type: ignore[arg-type]
        info.filter_state.set_data("tag", "revoked")
        self.assertTrue(one_time.onData(b"b", False))


class ConfigErrorTests(unittest.TestCase):
    def error(self, text: str) -> str:
        return str(self.assertRaises(ConfigError, load, text))

    HTTP = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config." \
           "http_filters[0].typed_config"
    NETWORK = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"

    def policy(self, permission: str = "any: true", principal: str = "any: true") -> str:
        return rules(f"""
            p:
              permissions:
              - {permission}
              principals:
              - {principal}
            """)

    def test_unsupported_rules_name_their_path(self) -> None:
        where = f"{self.HTTP}.rules.policies.p"
        cases = {
            ("metadata: {filter: f, path: [{key: k}], value: {present_match: true}}", ""):
                f"{where}.permissions[0].metadata: metadata (envoy.config.rbac.v3.Permission) "
                "is known to Envoy but not implemented by hbonex: no metadata matching: use "
                "filter_state",
            ("uri_template: {name: x, typed_config: {'@type': type.googleapis.com/envoy."
             "extensions.path.match.uri_template.v3.UriTemplateMatchConfig, "
             "path_template: '/a/{x}'}}", ""):
                f"{where}.permissions[0].uri_template: uri_template (envoy.config.rbac.v3."
                "Permission) is known to Envoy but not implemented by hbonex: no URI "
                "templates: use url_path",
            ("any: true", "metadata: {filter: f, path: [{key: k}], value: {present_match: "
                          "true}}"):
                f"{where}.principals[0].metadata: metadata (envoy.config.rbac.v3.Principal) "
                "is known to Envoy but not implemented by hbonex: no metadata matching: use "
                "filter_state",
        }
        for (permission, principal), expected in cases.items():
            text = config_text(http=self.policy(permission, principal or "any: true"))
            self.assertTrue(self.error(text).startswith(expected), self.error(text))

    def test_cel_condition_and_matcher_are_refused(self) -> None:
        text = config_text(http=rules("""
            p:
              permissions: [{any: true}]
              principals: [{any: true}]
              condition: {const_expr: {bool_value: true}}
            """))
        self.assertIn(f"{self.HTTP}.rules.policies.p.condition: condition (envoy.config.rbac."
                      "v3.Policy) is known to Envoy but not implemented by hbonex: no CEL "
                      "conditions", self.error(text))
        text = config_text(http="matcher: {matcher_list: {matchers: []}}")
        self.assertIn(f"{self.HTTP}.matcher: matcher (envoy.extensions.filters.http.rbac.v3."
                      "RBAC) is known to Envoy but not implemented by hbonex: no matcher "
                      "trees", self.error(text))

    def test_values(self) -> None:
        where = f"{self.HTTP}.rules.policies.p"
        cases = {
            ("destination_port_range: {start: 90, end: 80}", "any: true"):
                f"{where}.permissions[0].destination_port_range: [90, 80) is not a port range",
            ("any: true", "remote_ip: {address_prefix: nope, prefix_len: 8}"):
                f"{where}.principals[0].remote_ip.address_prefix: address_prefix 'nope' is "
                "not an IP address",
            ("any: true", "remote_ip: {address_prefix: 10.0.0.0, prefix_len: 33}"):
                f"{where}.principals[0].remote_ip.prefix_len: prefix_len 33 is over 32",
            ("requested_server_name: {prefix: ''}", "any: true"):
                f"{where}.permissions[0].requested_server_name.prefix: prefix must not be "
                "empty",
            ("any: true", "filter_state: {key: k}"):
                f"{where}.principals[0].filter_state: missing required field 'string_match'",
            ("any: true", "and_ids: {ids: []}"):
                f"{where}.principals[0].and_ids: missing required field 'ids'",
            ("any: true", "authenticated: {principal_name: {safe_regex: {regex: '('}}}"):
                f"{where}.principals[0].authenticated.principal_name.safe_regex.regex: "
                "invalid regex '('",
        }
        for (permission, principal), expected in cases.items():
            message = self.error(config_text(http=self.policy(permission, principal)))
            self.assertTrue(message.startswith(expected), message)

    def test_policy_needs_permissions_and_principals(self) -> None:
        text = config_text(http=rules("p: {principals: [{any: true}]}"))
        self.assertTrue(self.error(text).startswith(
            f"{self.HTTP}.rules.policies.p: missing required field 'permissions'"))

    def test_network_filter_refuses_header_rules_and_needs_stat_prefix(self) -> None:
        text = config_text(network="stat_prefix: n\n" + self.policy(
            principal="header: {name: x, present_match: true}"))
        self.assertTrue(self.error(text).startswith(
            f"{self.NETWORK}.rules.policies.p.principals[0].header: a header rule is not "
            "supported by the network RBAC filter"), self.error(text))
        self.assertTrue(self.error(config_text(network=self.policy())).startswith(
            f"{self.NETWORK}: missing required field 'stat_prefix'"))

    def test_error_has_the_line(self) -> None:
        text = config_text(http=self.policy(permission="destination_port_range: "
                                                       "{start: 9, end: 1}"))
        line = next(i for i, t in enumerate(text.splitlines(), 1) if "start: 9" in t)
        self.assertTrue(self.error(text).endswith(f"(line {line})"), self.error(text))


class DocsTests(unittest.TestCase):
    def test_the_documented_examples_load(self) -> None:
        """docs/waypoint-filters.md's RBAC examples, in a listener as written."""
        import re
        from pathlib import Path

        import yaml

        text = (Path(__file__).parent.parent / "docs" / "waypoint-filters.md").read_text()
        start = text.index("## envoy.filters.http.rbac")
        network_at = text.index("## envoy.filters.network.rbac")
        end = text.find("\n## ", network_at)
        section = text[start:end if end >= 0 else len(text)]
        http, network = (yaml.safe_load(block) for block in
                         re.findall(r"^```yaml\n(.*?)^```", section, re.MULTILINE | re.DOTALL))
        base = yaml.safe_load(config_text())
        chain = base["static_resources"]["listeners"][0]["filter_chains"][0]
        chain["filters"][0]["typed_config"]["http_filters"] = http["http_filters"]
        loaded = Loaded(yaml.safe_dump(base))
        self.assertEqual([p.name for p in loaded.engine().policies], ["reviews-readers"])
        chain["filters"] = network["filters"]
        [rbac] = Loaded(yaml.safe_dump(base)).network
        assert rbac.config.engine is not None
        self.assertEqual([p.name for p in rbac.config.engine.policies], ["clients"])
