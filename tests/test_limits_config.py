"""
Connection limits and runtime keys in the YAML: the overload manager's
``global_downstream_max_connections`` resource monitor, the ``connection_limit`` network
filter (parsing with YAML paths, and the filter against in-memory connections), and
``layered_runtime`` static layers (``reject_early_connect_data``).
"""

from __future__ import annotations

import io
import sys
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from hbonex.cli import main as cli
from hbonex.config import load_config
from hbonex.errors import ConfigError
from hbonex.filters.network.connection_limit import ConnectionLimitConfig, ConnectionLimitFilter
from hbonex.network.listener import ConnectionInfo
from hbonex.observability.stats import STATS
from hbonex.tunnel.connect import ConnectRequest

TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
LIMIT = "type.googleapis.com/envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit"
MONITOR = ("type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3."
           "DownstreamConnectionsConfig")
HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")

LISTENER = """\
static_resources:
  listeners:
  - name: front
    address:
      socket_address: {{address: 127.0.0.1, port_value: 9000}}
    filter_chains:
    - filters:
{filters}
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": {tcp}
          stat_prefix: front
          cluster: backend
  clusters:
  - name: backend
    load_assignment:
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: 8080}}
"""


def with_limit(body: str) -> str:
    filters = ("      - name: envoy.filters.network.connection_limit\n"
               "        typed_config:\n"
               f'          "@type": {LIMIT}\n'
               + "".join(f"          {line}\n" for line in body.splitlines()))
    return LISTENER.format(filters=filters.rstrip("\n"), tcp=TCP_PROXY)


PLAIN = LISTENER.format(filters="", tcp=TCP_PROXY).replace("    - filters:\n\n",
                                                           "    - filters:\n")

CONNECT_HCM = f"""\
static_resources:
  listeners:
  - name: hbone
    address:
      socket_address: {{address: 127.0.0.1, port_value: 15008}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM}
          stat_prefix: hbone
          upgrade_configs: [{{upgrade_type: CONNECT}}]
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{connect_matcher: {{}}}}
                route: {{cluster: original_dst}}
              - match: {{prefix: /}}
                route:
                  cluster: original_dst
                  upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{allow_post: true}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: original_dst
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    original_dst_lb_config: {{use_http_header: true, http_header_name: ":authority"}}
"""


class Base(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def load(self, text: str) -> Any:
        return load_config(text, self.reactor)

    def error(self, text: str) -> str:
        return str(self.assertRaises(ConfigError, self.load, text))


class ConnectionLimitConfigTests(Base):
    def test_parsed(self) -> None:
        loaded = self.load(with_limit("stat_prefix: front_limit\nmax_connections: 3\n"
                                      "delay: 0.25s"))
        [chain] = loaded.listeners[0].chains
        limit, proxy = chain.filters
        self.assertEqual(limit.name, "envoy.filters.network.connection_limit")
        self.assertEqual((limit.parsed.stat_prefix, limit.parsed.max_connections,
                          limit.parsed.delay), ("front_limit", 3, 0.25))
        self.assertEqual(proxy.name, "envoy.filters.network.tcp_proxy")
        self.assertEqual(loaded.warnings, [])

    def test_each_chain_counts_on_its_own(self) -> None:
        text = with_limit("stat_prefix: l\nmax_connections: 1")
        loaded = self.load(text)
        again = self.load(text)
        self.assertIsNot(loaded.listeners[0].chains[0].filters[0].parsed,
                         again.listeners[0].chains[0].filters[0].parsed)

    def test_missing_max_connections(self) -> None:
        self.assertEqual(self.error(with_limit("stat_prefix: l")), (
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config: missing "
            "required field 'max_connections' (line 10)"))

    def test_zero_max_connections(self) -> None:
        self.assertEqual(self.error(with_limit("stat_prefix: l\nmax_connections: 0")), (
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config."
            "max_connections: must be at least 1, got 0 (line 12)"))

    def test_missing_stat_prefix(self) -> None:
        self.assertEqual(self.error(with_limit("max_connections: 2")), (
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config: missing "
            "required field 'stat_prefix' (line 10)"))

    def test_misspelled_field(self) -> None:
        error = self.error(with_limit("stat_prefix: l\nmax_connection: 2"))
        self.assertIn("filters[0].typed_config.max_connection: unknown field 'max_connection'",
                      error)
        self.assertIn("(did you mean 'max_connections'?) (line 12)", error)

    def test_bad_delay(self) -> None:
        error = self.error(with_limit("stat_prefix: l\nmax_connections: 2\ndelay: soon"))
        self.assertEqual(error, (
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.delay: "
            "expected a duration like '5s', got 'soon' (line 13)"))

    def test_not_terminal(self) -> None:
        text = with_limit("stat_prefix: l\nmax_connections: 2")
        text = text[:text.index("      - name: envoy.filters.network.tcp_proxy")] + text[
            text.index("  clusters:"):]
        self.assertEqual(self.error(text), (
            "static_resources.listeners[0].filter_chains[0].filters[0]: "
            "envoy.filters.network.connection_limit is not a terminal filter; the chain must "
            "end with one (envoy.filters.network.tcp_proxy or http_connection_manager) "
            "(line 8)"))

    def test_runtime_enabled_is_a_warning(self) -> None:
        loaded = self.load(with_limit(
            "stat_prefix: l\nmax_connections: 2\n"
            "runtime_enabled: {default_value: true, runtime_key: limit_on}"))
        self.assertEqual(loaded.warnings, [(
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config."
            "runtime_enabled", "runtime_enabled has no effect in hbonex (no runtime switch: the "
            "filter is always enabled) (line 13)")])


class Callbacks:
    def __init__(self, peer: str = "127.0.0.1:5000") -> None:
        self.transport = StringTransport()
        self.info = ConnectionInfo("l", peer, "127.0.0.1:9000")


class ConnectionLimitFilterTests(unittest.TestCase):
    def config(self, limit: int, delay: float = 0.0, prefix: str = "") -> ConnectionLimitConfig:
        prefix = prefix or f"t{id(self)}"
        return ConnectionLimitConfig(prefix, limit, Clock(), delay=delay)

    def open(self, config: ConnectionLimitConfig) -> tuple[ConnectionLimitFilter, Callbacks]:
        f, callbacks = ConnectionLimitFilter(config), Callbacks()
        return f, callbacks

    def test_past_the_limit_closed_and_counted(self) -> None:
        config = self.config(2)
        admitted = []
        for _ in range(2):
            f, cb = self.open(config)
            self.assertTrue(f.onNewConnection(cb))  # type: ignore[arg-type]
            self.assertTrue(f.onData(b"x", False))
            admitted.append((f, cb))
        third, cb3 = self.open(config)
        self.assertFalse(third.onNewConnection(cb3))  # type: ignore[arg-type]
        self.assertTrue(cb3.transport.disconnecting)
        self.assertFalse(third.onData(b"x", False))
        prefix = config.stat_prefix
        self.assertEqual(STATS.counters[f"connection_limit.{prefix}.limited_connections"].value,
                         1)
        self.assertEqual(STATS.gauges[f"connection_limit.{prefix}.active_connections"].value, 2)
        self.assertFalse(any(cb.transport.disconnecting for _, cb in admitted))
        third.onClose(None)  # a refused connection was never counted in
        self.assertEqual(config.active, 2)
        admitted[0][0].onClose(None)
        self.assertEqual(config.active, 1)
        self.assertEqual(STATS.gauges[f"connection_limit.{prefix}.active_connections"].value, 1)
        again, cb4 = self.open(config)
        self.assertTrue(again.onNewConnection(cb4))  # type: ignore[arg-type]

    def test_delay(self) -> None:
        config = self.config(1, delay=0.5)
        first, cb1 = self.open(config)
        self.assertTrue(first.onNewConnection(cb1))  # type: ignore[arg-type]
        second, cb2 = self.open(config)
        self.assertFalse(second.onNewConnection(cb2))  # type: ignore[arg-type]
        clock = config.reactor
        clock.advance(0.49)
        self.assertFalse(cb2.transport.disconnecting)
        self.assertFalse(second.onData(b"ignored", False))
        clock.advance(0.01)
        self.assertTrue(cb2.transport.disconnecting)

    def test_closed_during_the_delay(self) -> None:
        config = self.config(1, delay=1.0)
        first, cb1 = self.open(config)
        first.onNewConnection(cb1)  # type: ignore[arg-type]
        second, cb2 = self.open(config)
        second.onNewConnection(cb2)  # type: ignore[arg-type]
        second.onClose(None)
        self.assertEqual(config.reactor.getDelayedCalls(), [])
        self.assertEqual(config.active, 1)


OVERLOAD = f"""\
overload_manager:
  resource_monitors:
  - name: envoy.resource_monitors.global_downstream_max_connections
    typed_config:
      "@type": {MONITOR}
      max_active_downstream_connections: 7
"""


class OverloadManagerTests(Base):
    def test_resource_monitor_sets_the_global_limit(self) -> None:
        loaded = self.load(OVERLOAD + PLAIN)
        self.assertEqual(loaded.bootstrap.runtime.downstream_limit.max_active, 7)
        self.assertEqual(loaded.warnings, [])

    def test_without_monitor_no_limit(self) -> None:
        self.assertEqual(self.load(PLAIN).bootstrap.runtime.downstream_limit.max_active, 0)

    def test_zero_is_refused(self) -> None:
        self.assertEqual(self.error(OVERLOAD.replace(": 7", ": 0") + PLAIN), (
            "overload_manager.resource_monitors[0].typed_config."
            "max_active_downstream_connections: must be at least 1, got 0 (line 6)"))

    def test_other_monitor_refused(self) -> None:
        text = OVERLOAD.replace("envoy.resource_monitors.global_downstream_max_connections",
                                "envoy.resource_monitors.fixed_heap")
        self.assertEqual(self.error(text + PLAIN), (
            "overload_manager.resource_monitors[0].name: unknown resource monitor "
            "'envoy.resource_monitors.fixed_heap'; known: "
            "envoy.resource_monitors.global_downstream_max_connections (line 3)"))

    def test_other_monitor_type_refused(self) -> None:
        text = OVERLOAD.replace(
            MONITOR, "type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3."
            "FixedHeapConfig").replace("max_active_downstream_connections: 7",
                                       "max_heap_size_bytes: 1000")
        error = self.error(text + PLAIN)
        self.assertTrue(error.startswith(
            "overload_manager.resource_monitors[0].typed_config.@type: unknown resource "
            "monitor type 'type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap."
            "v3.FixedHeapConfig'"), error)

    def test_actions_refused(self) -> None:
        text = OVERLOAD + ("  actions:\n  - name: envoy.overload_actions.stop_accepting_requests\n"
                           "    triggers: []\n")
        self.assertEqual(self.error(text + PLAIN), (
            "overload_manager.actions: actions (envoy.config.overload.v3.OverloadManager) is "
            "known to Envoy but not implemented by hbonex: no overload actions (only the "
            "downstream connection limit) (line 7)"))

    def test_refresh_interval_is_a_warning(self) -> None:
        loaded = self.load(OVERLOAD + "  refresh_interval: 1s\n" + PLAIN)
        self.assertEqual([p for p, _ in loaded.warnings], ["overload_manager.refresh_interval"])

    def test_twice_refused(self) -> None:
        twice = OVERLOAD + OVERLOAD[OVERLOAD.index("  - name"):]
        self.assertIn("overload_manager.resource_monitors[1].name: "
                      "envoy.resource_monitors.global_downstream_max_connections is configured "
                      "twice", self.error(twice + PLAIN))

    def test_runtime_key_when_no_monitor(self) -> None:
        runtime = ("layered_runtime:\n  layers:\n  - name: static\n    static_layer:\n"
                   "      overload: {global_downstream_max_connections: 40}\n")
        loaded = self.load(runtime + PLAIN)
        self.assertEqual(loaded.bootstrap.runtime.downstream_limit.max_active, 40)
        loaded = self.load(runtime + OVERLOAD + PLAIN)
        self.assertEqual(loaded.bootstrap.runtime.downstream_limit.max_active, 7)
        self.assertEqual(len(loaded.warnings), 1)
        self.assertIn("is ignored: the envoy.resource_monitors.global_downstream_max_"
                      "connections resource monitor is set", loaded.warnings[0][1])

    def test_listener_may_ignore_the_global_limit(self) -> None:
        text = PLAIN.replace("    filter_chains:", "    ignore_global_conn_limit: true\n"
                             "    filter_chains:")
        loaded = self.load(OVERLOAD + text)
        self.assertTrue(loaded.bootstrap.listeners[0].ignore_global_conn_limit)
        self.assertFalse(self.load(PLAIN).bootstrap.listeners[0].ignore_global_conn_limit)


def runtime(body: str) -> str:
    return ("layered_runtime:\n  layers:\n"
            + "".join(f"  {line}\n" for line in body.splitlines()))


def request(method: str) -> ConnectRequest:
    return ConnectRequest(method, "127.0.0.1:8080", (), path=None if method == "CONNECT"
                          else "/")


class RuntimeTests(Base):
    def router(self, text: str) -> Any:
        loaded = self.load(text)
        return loaded.listeners[0].chains[0].filters[0].parsed.router

    def test_reject_early_connect_data(self) -> None:
        text = runtime("- name: static_layer_0\n  static_layer:\n"
                       "    envoy.reloadable_features.reject_early_connect_data: true")
        router = self.router(text + CONNECT_HCM)
        self.assertTrue(router.route(request("CONNECT"), None).reject_early_data)
        # Envoy's guard is about CONNECT: a POST tunnel (allow_post) is not affected.
        post = router.route(request("POST"), None)
        self.assertEqual((post.status, post.kind, post.reject_early_data),
                         (200, "tunnel", False))

    def test_nested_keys_and_layer_order(self) -> None:
        text = runtime("- name: a\n  static_layer:\n    envoy: {reloadable_features: "
                       "{reject_early_connect_data: true}}\n"
                       "- name: b\n  static_layer:\n"
                       "    envoy.reloadable_features.reject_early_connect_data: false")
        self.assertFalse(self.router(text + CONNECT_HCM).route(request("CONNECT"), None)
                         .reject_early_data)
        first = text.split("  - name: b")[0]
        self.assertTrue(self.router(first + CONNECT_HCM).route(
            request("CONNECT"), None).reject_early_data)

    def test_default_allows_early_data(self) -> None:
        self.assertFalse(self.router(CONNECT_HCM).route(request("CONNECT"), None)
                         .reject_early_data)

    def test_not_a_bool(self) -> None:
        text = runtime("- name: static\n  static_layer:\n"
                       "    envoy.reloadable_features.reject_early_connect_data: 'yes'")
        self.assertEqual(self.error(text + CONNECT_HCM), (
            "layered_runtime.layers[0].static_layer: envoy.reloadable_features."
            "reject_early_connect_data: expected true or false, got 'yes' (line 5)"))

    def test_unknown_key_is_a_warning(self) -> None:
        text = runtime("- name: static\n  static_layer:\n    re2.max_program_size.error_level: 200")
        loaded = self.load(text + CONNECT_HCM)
        [(path, message)] = loaded.warnings
        self.assertEqual(path, "layered_runtime.layers[0].static_layer")
        self.assertIn("runtime key 're2.max_program_size.error_level' has no effect in hbonex",
                      message)

    def test_disk_layer_refused(self) -> None:
        text = runtime("- name: disk\n  disk_layer: {symlink_root: /srv/runtime}")
        self.assertEqual(self.error(text + CONNECT_HCM), (
            "layered_runtime.layers[0].disk_layer: disk_layer (envoy.config.bootstrap.v3."
            "RuntimeLayer) is known to Envoy but not implemented by hbonex: runtime files are "
            "not read: put the values in a static_layer (line 4)"))

    def test_admin_layer_is_a_warning(self) -> None:
        loaded = self.load(runtime("- name: admin\n  admin_layer: {}") + CONNECT_HCM)
        self.assertEqual([p for p, _ in loaded.warnings], ["layered_runtime.layers[0]."
                                                          "admin_layer"])


class RenderTests(Base):
    def render(self, *flags: str) -> str:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(cli.main(["config", "render", "server", *flags]), 0)
        return out.getvalue()

    def pki_dir(self) -> str:
        from pathlib import Path

        from tests.test_config import make_pki

        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        return str(make_pki(directory) / "server")

    def test_reject_early_connect_data_and_max_connections(self) -> None:
        text = self.render("--pki", self.pki_dir(), "--reject-early-connect-data",
                           "--max-connections", "9")
        self.assertIn("envoy.reloadable_features.reject_early_connect_data: true", text)
        loaded = self.load(text)
        self.assertEqual(loaded.warnings, [])
        self.assertEqual(loaded.bootstrap.runtime.downstream_limit.max_active, 9)
        router = loaded.listeners[0].chains[0].filters[0].parsed.router
        self.assertTrue(router.route(request("CONNECT"), None).reject_early_data)
        plain = self.load(self.render("--pki", self.pki_dir()))
        self.assertNotIn("layered_runtime", self.render("--pki", self.pki_dir()))
        self.assertEqual(plain.bootstrap.runtime.downstream_limit.max_active, 0)
        self.assertFalse(plain.listeners[0].chains[0].filters[0].parsed.router.route(
            request("CONNECT"), None).reject_early_data)
