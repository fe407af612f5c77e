"""
twistd plugin discovery and option parsing, and ``verifyObject`` on every class in hbonex that
declares ``@implementer``.
"""

from __future__ import annotations

import importlib
import inspect
import io
import os
import pkgutil
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from twisted.application.service import IService, IServiceMaker
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver
from twisted.plugin import IPlugin, getPlugins
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions
from twisted.trial import unittest
from zope.interface import implementedBy, providedBy
from zope.interface.verify import verifyObject

import hbonex
from hbonex.bootstrap import ProxyService
from hbonex.cli import client_tap, server_tap
from hbonex.h2.settings import H2Settings
from hbonex.tls import pki
from hbonex.tunnel.connect import TargetRule

MAKERS = {"hbone-client": client_tap, "hbone-server": server_tap}


def service_makers() -> dict[str, Any]:
    found: dict[str, Any] = {}
    for maker in getPlugins(IServiceMaker):
        if maker.tapname in MAKERS:
            # A checkout on sys.path and an installed copy may both be found: keep one.
            found.setdefault(maker.tapname, maker)
    return found


class DiscoveryTests(unittest.TestCase):
    def test_both_taps_are_found(self) -> None:
        makers = service_makers()
        self.assertEqual(sorted(makers), ["hbone-client", "hbone-server"])
        for tapname, maker in makers.items():
            self.assertTrue(verifyObject(IServiceMaker, maker))
            self.assertTrue(IPlugin.providedBy(maker))
            self.assertTrue(maker.description)
            module = MAKERS[tapname]
            self.assertIs(maker.options, module.Options)
            self.assertTrue(issubclass(maker.options, usage.Options))
            self.assertIs(maker.makeService, module.makeService)


def extension_plugins() -> dict[str, Any]:
    """
    Every built-in extension plugin (twisted/plugins/hbonex_extensions.py), by name; a name
    two kinds share (Istio's ``istio.stats``, HTTP and network) is kept for both, the network
    one as ``<name> (network)``.
    """
    from hbonex.interfaces import IExtension, INetworkFilterExtension

    found: dict[str, Any] = {}
    for plugin in getPlugins(IExtension):
        if plugin.name in found and type(found[plugin.name]) is not type(plugin):
            network = INetworkFilterExtension.providedBy(plugin)
            key = f"{plugin.name} (network)" if network else plugin.name
            if not network:
                found[f"{plugin.name} (network)"] = found[plugin.name]
            found[key] = plugin
            continue
        found.setdefault(plugin.name, plugin)
    return found


class ExtensionDiscoveryTests(unittest.TestCase):
    def test_built_in_extensions_are_found_and_verify(self) -> None:
        from hbonex.interfaces import (
            IClusterTypeExtension,
            IHTTPFilterExtension,
            IHTTPFilterPerRouteExtension,
            IListenerFilterExtension,
            INetworkFilterExtension,
            ITransportSocketExtension,
        )

        expected = {
            "envoy.filters.listener.tls_inspector": IListenerFilterExtension,
            "envoy.filters.listener.original_dst": IListenerFilterExtension,
            "envoy.transport_sockets.internal_upstream": ITransportSocketExtension,
            "envoy.filters.network.tcp_proxy": INetworkFilterExtension,
            "envoy.filters.network.connection_limit": INetworkFilterExtension,
            "envoy.filters.network.rbac": INetworkFilterExtension,
            "envoy.filters.http.rbac": IHTTPFilterPerRouteExtension,
            "envoy.filters.network.http_connection_manager": INetworkFilterExtension,
            "envoy.filters.http.router": IHTTPFilterExtension,
            "envoy.filters.http.ext_authz": IHTTPFilterPerRouteExtension,
            "envoy.filters.http.fault": IHTTPFilterPerRouteExtension,
            "envoy.filters.http.local_ratelimit": IHTTPFilterPerRouteExtension,
            "envoy.filters.http.header_mutation": IHTTPFilterPerRouteExtension,
            "envoy.filters.http.cors": IHTTPFilterPerRouteExtension,
            "envoy.filters.http.grpc_stats": IHTTPFilterExtension,
            "istio.peer_metadata": IHTTPFilterExtension,
            "istio.stats": IHTTPFilterExtension,
            "istio.stats (network)": INetworkFilterExtension,
            "istio.metadata_exchange": INetworkFilterExtension,
            "STATIC": IClusterTypeExtension,
            "STRICT_DNS": IClusterTypeExtension,
            "LOGICAL_DNS": IClusterTypeExtension,
            "ORIGINAL_DST": IClusterTypeExtension,
            "envoy.transport_sockets.tls": ITransportSocketExtension,
            "envoy.transport_sockets.raw_buffer": ITransportSocketExtension,
        }
        plugins = extension_plugins()
        self.assertLessEqual(set(expected), set(plugins))
        for name, plugin in plugins.items():
            self.assertTrue(IPlugin.providedBy(plugin), name)
            for interface in providedBy(plugin):
                verifyObject(interface, plugin)
        for name, interface in expected.items():
            self.assertTrue(interface.providedBy(plugins[name]), name)
            self.assertIn(plugins[name], list(getPlugins(interface)))


class OptionsTestCase(unittest.TestCase):
    module: Any = None

    def parse(self, *args: str) -> Any:
        options = self.module.Options()
        options.parseOptions(["--state-dir", self.state_dir, *args])
        return options

    def rejects(self, *args: str) -> str:
        with self.assertRaises(usage.UsageError) as cm:
            self.parse(*args)
        return str(cm.exception)

    def setUp(self) -> None:
        # Parsing loads the certificates: a dev PKI made in a temporary state directory.
        self.state_dir = self.mktemp()


class ClientOptionsTests(OptionsTestCase):
    module = client_tap

    def test_forward(self) -> None:
        options = self.parse("--forward", "127.0.0.1:9000=127.0.0.1:8080")
        self.assertEqual(options["forward"], [("tcp:9000:interface=127.0.0.1", "127.0.0.1:8080")])
        self.assertEqual(options["server"], "127.0.0.1:15008")
        self.assertEqual(options["max-streams"], 100)
        self.assertFalse(options["http1"])
        self.assertEqual(options.material.spiffe_id.service_account, "client")

    def test_forward_forms_and_repeats(self) -> None:
        options = self.parse(
            "--forward", "9000=[::1]:80",
            "--forward", "tcp:9001:interface=0.0.0.0=db.internal:5432",
            "--forward", "[::1]:9002=10.0.0.1:443",
        )
        self.assertEqual(options["forward"], [
            ("tcp:9000:interface=127.0.0.1", "[::1]:80"),
            ("tcp:9001:interface=0.0.0.0", "db.internal:5432"),
            ("tcp6:9002:interface=\\:\\:1", "10.0.0.1:443"),
        ])

    def test_other_flags(self) -> None:
        options = self.parse(
            "--forward", "9000=a:1", "--server", "[::1]:15008", "--http1",
            "--server-identity", "spiffe://cluster.local/ns/default/sa/server",
            "--max-streams", "6", "--header", "X-Tenant=blue", "--header", "x-b=1=2",
            "--stream-window", "1048576", "--keepalive-interval", "0",
        )
        self.assertEqual(options["server"], "[::1]:15008")
        self.assertTrue(options["http1"])
        self.assertEqual(options["max-streams"], 6)
        self.assertEqual(options["header"], [("x-tenant", "blue"), ("x-b", "1=2")])
        settings = options.h2_settings()
        self.assertEqual(settings.initial_stream_window_size, 1024 * 1024)
        self.assertEqual(settings.keepalive_interval, 0)

    def test_bad_flags(self) -> None:
        for args in (
            (),  # no --forward
            ("--forward", "no-equals-sign"),
            ("--forward", "9000="),
            ("--forward", "9000=host-without-port"),
            ("--forward", "9000=::1:80"),
            ("--forward", "nonsense=a:1"),
            ("--forward", "9000=a:1", "--server", "nohostport"),
            ("--forward", "9000=a:1", "--server-identity", "https://not/spiffe"),
            ("--forward", "9000=a:1", "--max-streams", "0"),
            ("--forward", "9000=a:1", "--max-streams", "many"),
            ("--forward", "9000=a:1", "--tls-min", "1.1"),
            ("--forward", "9000=a:1", "--header", "no-value"),
            ("--forward", "9000=a:1", "--header", "=v"),
            ("--forward", "9000=a:1", "--pki", "/nonexistent/hbonex-test-pki"),
        ):
            self.rejects(*args)

    def test_error_names_the_flag(self) -> None:
        self.assertIn("--forward", self.rejects("--forward", "9000=host-without-port"))
        self.assertIn("--server", self.rejects("--forward", "9000=a:1", "--server", "x"))

    def test_bad_h2_settings(self) -> None:
        options = self.parse("--forward", "9000=a:1", "--max-frame-size", "100")
        self.assertRaises(usage.UsageError, options.h2_settings)

    def test_make_service(self) -> None:
        service = client_tap.makeService(self.parse("--forward", "127.0.0.1:0=127.0.0.1:1"))
        self.assertTrue(IService.providedBy(service))
        self.assertFalse(service.running)


class ServerOptionsTests(OptionsTestCase):
    module = server_tap

    def test_defaults(self) -> None:
        options = self.parse()
        self.assertEqual(options["listen"], "tcp:15008:interface=127.0.0.1")
        self.assertEqual(options["allow-target"], [])
        self.assertEqual(options["max-concurrent-streams"], 200)
        self.assertEqual(options.material.spiffe_id.service_account, "server")

    def test_allow_target(self) -> None:
        options = self.parse(
            "--allow-target", "10.0.0.0/8:80-90", "--allow-target", "[::1]:8080",
            "--allow-target", "192.168.1.0/24",
        )
        self.assertEqual(options["allow-target"], [
            TargetRule.parse("10.0.0.0/8:80-90"),
            TargetRule.parse("[::1]:8080"),
            TargetRule.parse("192.168.1.0/24"),
        ])
        self.assertEqual((options["allow-target"][0].port_low,
                          options["allow-target"][0].port_high), (80, 90))

    def test_listen_and_others(self) -> None:
        options = self.parse(
            "--listen", "8443", "--max-concurrent-streams", "6",
            "--allow-identity", "spiffe://cluster.local/ns/default/sa/client",
            "--max-requests-per-connection", "1000", "--tls-min", "1.2",
        )
        self.assertEqual(options["listen"], "tcp:8443:interface=127.0.0.1")
        self.assertEqual(options["max-concurrent-streams"], 6)
        self.assertEqual(options["max-requests-per-connection"], 1000)
        self.assertEqual(options.tls_min(), "TLSv1_2")
        self.assertIsInstance(options.h2_settings(6), H2Settings)
        self.assertEqual(self.parse("--listen", "0.0.0.0:15008")["listen"],
                         "tcp:15008:interface=0.0.0.0")
        self.assertEqual(self.parse("--listen", "unix:/tmp/x.sock")["listen"], "unix:/tmp/x.sock")

    def test_bad_flags(self) -> None:
        for args in (
            ("--allow-target", "10.0.0.0/8:90-80"),
            ("--allow-target", "10.0.0.0/8:0"),
            ("--allow-target", "not-an-address"),
            ("--allow-target", "10.0.0.0/33"),
            ("--listen", "nowhere"),
            ("--listen", "host:port"),
            ("--tls-min", "1.0"),
            ("--max-concurrent-streams", "x"),
            ("--pki", "/nonexistent/hbonex-test-pki"),
            ("--unknown-flag",),
        ):
            self.rejects(*args)

    def test_error_names_the_flag(self) -> None:
        self.assertIn("--allow-target", self.rejects("--allow-target", "10.0.0.0/8:90-80"))
        self.assertIn("--listen", self.rejects("--listen", "nowhere"))


class HelpTests(unittest.TestCase):
    """What --help says (the README and docs/ say the same)."""

    def usage(self, module: Any) -> str:
        return " ".join(str(module.Options()).split())

    def test_no_stray_spaces(self) -> None:
        for module in MAKERS.values():
            for name, doc in module.Options().docs.items():
                self.assertNotIn("  ", doc or "", f"--{name}")
        self.assertIn("LISTEN=TARGET: tunnel connections accepted on LISTEN (host:port or "
                      "endpoint) to TARGET (host:port). Repeatable.", self.usage(client_tap))

    def test_allow_target_replaces_the_default(self) -> None:
        self.assertIn("CIDR[:PORT|:LO-HI] tunnels may connect to. Repeatable. Replaces the "
                      "default (loopback only: 127.0.0.0/8 and ::1/128), it does not add to it.",
                      self.usage(server_tap))

    def test_config_says_what_applies_next_to_it(self) -> None:
        self.assertIn("Envoy v3 bootstrap YAML file, instead of the other options (only "
                      "--max-connections --admin --cert-poll --cert-warn-days --log-format "
                      "--workers applies next to it).", self.usage(client_tap))
        self.assertIn("Envoy v3 bootstrap YAML file, instead of the other options (only "
                      "--drain-timeout --max-connections --admin --cert-poll "
                      "--cert-warn-days --log-format --workers applies next to it).",
                      self.usage(server_tap))

    def test_state_dir(self) -> None:
        for module in MAKERS.values():
            self.assertIn(f"Where the dev PKI is kept: {pki.DEV_PKI_LOCATION}.",
                          self.usage(module))


class AllowTargetTests(OptionsTestCase):
    module = server_tap

    def test_replaces_the_loopback_default(self) -> None:
        from ipaddress import ip_address

        def policy(*args: str) -> Any:
            built = server_tap.build(self.parse(*args), Clock())
            return built.clusters["original_dst"].target_policy

        narrow = policy("--allow-target", "127.0.0.1/32:8080")
        self.assertTrue(narrow.allows(ip_address("127.0.0.1"), 8080))
        self.assertFalse(narrow.allows(ip_address("127.0.0.1"), 8081))
        self.assertFalse(narrow.allows(ip_address("::1"), 8080))
        default = policy()
        self.assertTrue(default.allows(ip_address("127.0.0.1"), 8081))
        self.assertTrue(default.allows(ip_address("::1"), 22))
        self.assertFalse(default.allows(ip_address("10.0.0.1"), 80))


CONFIG = Path(__file__).parent / "configs" / "seed-internal-listener-chain.yaml"


class TwistdCommandLineTests(unittest.TestCase):
    """
    The plugins' flags as twistd itself parses them (its own ServerOptions, in-process).
    """

    def setUp(self) -> None:
        self.state_dir = self.mktemp()

    def twistd(self, *argv: str) -> Any:
        config = ServerOptions()
        config.parseOptions(list(argv))
        return config

    def plugin_args(self, plugin: str) -> list[str]:
        forward = ["--forward", "127.0.0.1:0=127.0.0.1:1"] if plugin == "hbone-client" else []
        return ["--state-dir", self.state_dir, *forward]

    def test_no_pidfile_in_the_foreground(self) -> None:
        """
        With -n, two plugins can run in one directory: no ./twistd.pid unless asked for.
        """
        for plugin in MAKERS:
            args = self.plugin_args(plugin)
            self.assertEqual(self.twistd("-n", plugin, *args)["pidfile"], "")
            self.assertEqual(self.twistd("--nodaemon", plugin, *args)["pidfile"], "")
            self.assertEqual(self.twistd("-n", "--pidfile", "my.pid", plugin, *args)["pidfile"],
                             os.path.abspath("my.pid"))
            # A daemon needs one: twistd's default stays.
            self.assertEqual(self.twistd(plugin, *args)["pidfile"],
                             os.path.abspath("twistd.pid"))

    def error_line(self, *argv: str) -> str:
        error = self.assertRaises(SystemExit, self.twistd, *argv)
        self.assertIsInstance(error.code, str)
        return str(error.code)

    def test_bad_flags_are_one_line(self) -> None:
        self.assertEqual(
            self.error_line("-n", "hbone-client", "--bogus"),
            "twistd: error: hbone-client: option --bogus not recognized "
            "(see twistd hbone-client --help)",
        )
        self.assertEqual(
            self.error_line("-n", "hbone-client", "--state-dir", self.state_dir),
            "twistd: error: hbone-client: give at least one --forward LISTEN=TARGET "
            "(or --config FILE) (see twistd hbone-client --help)",
        )
        self.assertEqual(
            self.error_line("hbone-server", "--state-dir", self.state_dir, "--listen", "x"),
            "twistd: error: hbone-server: --listen: 'x' is neither host:port nor an endpoint "
            "string (see twistd hbone-server --help)",
        )

    def test_bad_flag_process_output(self) -> None:
        """A real twistd: exit status 1, one line on stderr, nothing on stdout."""
        env = {**os.environ, "PYTHONPATH": str(Path(hbonex.__file__).parent.parent)}
        result = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "hbone-server", "--bogus"],
            capture_output=True, text=True, env=env, timeout=60,
        )
        self.assertEqual(
            (result.returncode, result.stdout, result.stderr),
            (1, "", "twistd: error: hbone-server: option --bogus not recognized "
                    "(see twistd hbone-server --help)\n"),
        )

    def test_config_alone(self) -> None:
        """
        Every flag next to --config is refused, but --max-connections and the server's
        --drain-timeout.
        """
        self.assertEqual(
            self.error_line("-n", "hbone-client", "--config", str(CONFIG),
                            "--forward", "127.0.0.1:9005=127.0.0.1:1"),
            "twistd: error: hbone-client: --forward: cannot be given with --config (the YAML "
            "describes everything; only --max-connections --admin --cert-poll "
            "--cert-warn-days --log-format --workers may be given next to it) (see "
            "twistd hbone-client --help)",
        )
        self.assertEqual(
            self.error_line("-n", "hbone-server", "-c", str(CONFIG), "--listen", "9",
                            "--state-dir", self.state_dir),
            "twistd: error: hbone-server: --listen, --state-dir: cannot be given with --config "
            "(the YAML describes everything; only --drain-timeout --max-connections --admin "
            "--cert-poll --cert-warn-days --log-format --workers may be given next to it) "
            "(see twistd hbone-server --help)",
        )
        config = self.twistd("-n", "hbone-server", "--config", str(CONFIG),
                             "--drain-timeout", "3")
        service = server_tap.makeService(config.subOptions)
        self.assertIsInstance(service, ProxyService)
        assert isinstance(service, ProxyService)
        self.assertEqual(service.drain_timeout, 3.0)
        # Without twistd around (hbonex config render, tests): the same words, as UsageError.
        options = client_tap.Options()
        error = self.assertRaises(usage.UsageError, options.parseOptions,
                                  ["--header", "a=b", "--config", str(CONFIG)])
        self.assertEqual(str(error), "--header: cannot be given with --config (the YAML "
                                     "describes everything; only --max-connections --admin "
                                     "--cert-poll --cert-warn-days --log-format "
                                     "--workers may be given next to it)")


# -- verifyObject on every @implementer class ------------------------------------------------


def _tls_settings(test: unittest.TestCase) -> Any:
    from hbonex.tls.context import PeerPolicy, tls_settings_from_material

    dev = pki.ensure_dev_pki(test.mktemp())
    material = pki.load_pki_dir(dev / "server")
    return tls_settings_from_material(material, peer_policy=PeerPolicy())


def _listener_connection(test: unittest.TestCase) -> Any:
    from hbonex.network.listener import FilterChain, Listener, ListenerConnection

    listener = Listener("test", Clock(), [FilterChain([])])
    connection = ListenerConnection(listener, listener.filter_chains[0], False)
    connection.makeConnection(StringTransport())  # sets .info
    return connection


def _inspecting_protocol() -> Any:
    from hbonex.network.listener import FilterChain, InspectingProtocol, Listener

    listener = Listener("test", Clock(), [FilterChain([])])
    inspecting = InspectingProtocol(listener, None)
    inspecting.makeConnection(StringTransport())  # sets .info
    return inspecting


def _providers(test: unittest.TestCase) -> dict[str, Callable[[], Any]]:
    """
    One instance of each class in hbonex that declares @implementer, keyed by
    ``module.Class``.
    """
    from hbonex.cli import demo
    from hbonex.filters.listener.http_inspector import HttpInspectorFilter
    from hbonex.filters.listener.original_dst import OriginalDstFilter
    from hbonex.filters.listener.tls_inspector import TlsInspectorFilter
    from hbonex.filters.network.connection_limit import ConnectionLimitConfig, ConnectionLimitFilter
    from hbonex.filters.network.http_connection_manager import (
        HttpConnectionManagerConfig,
        HttpConnectionManagerFilter,
    )
    from hbonex.filters.network.tcp_proxy import TcpProxyConfig, TcpProxyFilter, WeightedCluster
    from hbonex.h2.connection import H2Stream
    from hbonex.network.internal import InternalEndpointAddress, internal_pair
    from hbonex.network.listener import ConnectionInfo
    from hbonex.network.relay import RelayEnd
    from hbonex.observability.process_log import JSONLineObserver, TextLineObserver
    from hbonex.tls.context import ClientTLS, ServerTLS
    from hbonex.tunnel.client import H1TunnelClient, H1TunnelTransport, H2TunnelClient
    from hbonex.tunnel.server import H1TunnelServer, SniffingCodec, TunnelLog
    from hbonex.upstream.auto_pool import AlpnSwitch

    def tcp_proxy() -> Any:
        return TcpProxyFilter(TcpProxyConfig("p", [WeightedCluster("c", 1)], runtime=None))

    def relay_end() -> Any:
        from hbonex.network.relay import Relay

        end = Relay(Clock()).a
        assert isinstance(end, RelayEnd)
        return end

    return {
        **_http_providers(),
        "hbonex.network.listener.ListenerConnection": lambda: _listener_connection(test),
        "hbonex.network.listener.InspectingProtocol": lambda: _inspecting_protocol(),
        "hbonex.network.listener.ConnectionInfo": lambda: ConnectionInfo(
            "l", "1.2.3.4:5", "5.6.7.8:9"
        ),
        "hbonex.filters.network.tcp_proxy.TcpProxyFilter": tcp_proxy,
        "hbonex.filters.network.connection_limit.ConnectionLimitFilter": lambda: (
            ConnectionLimitFilter(ConnectionLimitConfig("verify", 1, Clock()))
        ),
        "hbonex.filters.network.http_connection_manager.HttpConnectionManagerFilter": lambda: (
            HttpConnectionManagerFilter(HttpConnectionManagerConfig("h", None, None))
        ),
        "hbonex.filters.listener.original_dst.OriginalDstFilter": OriginalDstFilter,
        "hbonex.filters.listener.tls_inspector.TlsInspectorFilter": TlsInspectorFilter,
        "hbonex.filters.listener.http_inspector.HttpInspectorFilter": HttpInspectorFilter,
        "hbonex.upstream.auto_pool.AlpnSwitch": lambda: AlpnSwitch(lambda negotiated: None),
        "hbonex.tls.context.ServerTLS": lambda: ServerTLS(_tls_settings(test)),
        "hbonex.tls.context.ClientTLS": lambda: ClientTLS(_tls_settings(test)),
        "hbonex.network.internal.InternalTransport": lambda: (
            internal_pair(Clock(), "l", "e", 10)[0]
        ),
        "hbonex.network.internal.InternalEndpointAddress": lambda: (
            InternalEndpointAddress("l", "e")
        ),
        "hbonex.tunnel.client.H1TunnelTransport": lambda: H1TunnelTransport(StringTransport()),
        "hbonex.tunnel.client.H2TunnelClient": lambda: H2TunnelClient(H2Settings(), Clock()),
        "hbonex.tunnel.client.H1TunnelClient": lambda: H1TunnelClient("a:1", []),
        "hbonex.h2.connection.H2Stream": lambda: H2Stream(
            H2TunnelClient(H2Settings(), Clock()), 1
        ),
        "hbonex.network.relay.RelayEnd": relay_end,
        "hbonex.cli.demo.Echo": demo.Echo,
        "hbonex.cli.demo.Pusher": lambda: demo.Pusher(1024, 1),
        "hbonex.tls.fasttls.FastTLSProtocol": lambda: _fast_tls_protocol(test),
        "hbonex.tunnel.server.H1TunnelServer": lambda: H1TunnelServer(
            Clock(), None, None, TunnelLog()
        ),
        "hbonex.tunnel.server.SniffingCodec": lambda: SniffingCodec(Protocol, Protocol),
        "hbonex.observability.process_log.JSONLineObserver": lambda: (
            JSONLineObserver(io.StringIO())
        ),
        "hbonex.observability.process_log.TextLineObserver": lambda: (
            TextLineObserver(io.StringIO())
        ),
    }


def _http_providers() -> dict[str, Callable[[], Any]]:
    """The HTTP layer's providers (filter chain callbacks, codecs, sinks, the router)."""
    from hbonex.filters.common.rbac import RbacStats
    from hbonex.filters.http.cors import CorsFilter
    from hbonex.filters.http.fault import FaultConfig, FaultFilter, FaultSettings
    from hbonex.filters.http.header_mutation import HeaderMutationConfig, HeaderMutationFilter
    from hbonex.filters.http.local_ratelimit import LocalRateLimitConfig, LocalRateLimitFilter
    from hbonex.filters.http.rbac import RbacConfig, RbacFilter, RbacRules
    from hbonex.filters.http.router import RouterFilter
    from hbonex.filters.http.set_filter_state import SetFilterStateFilter
    from hbonex.filters.network.rbac import RbacNetworkConfig, RbacNetworkFilter
    from hbonex.filters.network.set_filter_state import SetFilterStateNetworkFilter
    from hbonex.h2.connection import H2Stream
    from hbonex.http import codec1, codec2
    from hbonex.http.connection_manager import StandardHeaders
    from hbonex.http.filter_manager import FilterManager
    from hbonex.tunnel.client import H2TunnelClient
    from hbonex.tunnel.filter_chain import ConnectAdmission, TunnelResponseSink
    from hbonex.upstream.http1_client import Http1ClientCodec

    def manager() -> FilterManager:
        return FilterManager([RouterFilter(Clock(), lambda c: None)], None)  # type: ignore

    def h1_sink() -> Any:
        codec = codec1.Http1ServerCodec(lambda sink: None, Clock())
        return codec1._Sink(codec, codec1._Stream(b"GET", b"HTTP/1.1", True))

    return {
        "hbonex.http.filter_manager._DecoderCallbacks":
            lambda: manager().decoding.sides[0].callbacks,
        "hbonex.http.filter_manager._EncoderCallbacks": lambda: _encoder_callbacks(),
        "hbonex.http.codec1._Sink": h1_sink,
        "hbonex.tunnel.filter_chain.ConnectAdmission": lambda: ConnectAdmission(print),
        "hbonex.tunnel.filter_chain.TunnelResponseSink": lambda: TunnelResponseSink(
            lambda h, e: None, lambda d, e: None, lambda: None
        ),
        "hbonex.http.codec1.Http1ServerCodec":
            lambda: codec1.Http1ServerCodec(lambda sink: None, Clock()),
        "hbonex.filters.http.set_filter_state.SetFilterStateFilter":
            lambda: SetFilterStateFilter(()),
        "hbonex.filters.http.header_mutation.HeaderMutationFilter":
            lambda: HeaderMutationFilter(HeaderMutationConfig()),
        "hbonex.filters.http.cors.CorsFilter": lambda: CorsFilter(),
        "hbonex.filters.network.set_filter_state.SetFilterStateNetworkFilter":
            lambda: SetFilterStateNetworkFilter(()),
        "hbonex.filters.http.rbac.RbacFilter": lambda: RbacFilter(
            RbacConfig(RbacRules(), RbacStats("http.verify."))),
        "hbonex.filters.network.rbac.RbacNetworkFilter": lambda: RbacNetworkFilter(
            RbacNetworkConfig(RbacStats("verify"))),
        "hbonex.http.codec2.H2ResponseSink": lambda: codec2.H2ResponseSink(
            H2Stream(H2TunnelClient(H2Settings(), Clock()), 1)
        ),
        "hbonex.http.codec2.H2RequestBody": lambda: codec2.H2RequestBody(None, False),
        "hbonex.http.codec2.H2ResponseBody": lambda: codec2.H2ResponseBody(None),
        "hbonex.http.codec2.H2UpgradeSink": lambda: codec2.H2UpgradeSink(
            H2Stream(H2TunnelClient(H2Settings(), Clock()), 1), codec2.H2UpgradeBody()
        ),
        "hbonex.http.codec2.H2UpgradeBody": lambda: codec2.H2UpgradeBody(),
        "hbonex.http.codec1._RequestSource":
            lambda: codec1._RequestSource(codec1.Http1ServerCodec(lambda sink: None, Clock())),
        "hbonex.filters.http.router._Reading": lambda: _router_reading(),
        "hbonex.upstream.http1_client.Http1ClientCodec": Http1ClientCodec,
        "hbonex.filters.http.router.RouterFilter": lambda: RouterFilter(Clock(), lambda c: None),
        "hbonex.http.connection_manager.StandardHeaders": lambda: StandardHeaders(None),
        "hbonex.filters.http.ext_authz.ExtAuthzFilter": _ext_authz_filter,
        "hbonex.filters.http.fault.FaultFilter": lambda: FaultFilter(
            FaultConfig(FaultSettings(), Clock(), random.Random(0), "http.verify.")
        ),
        "hbonex.filters.http.local_ratelimit.LocalRateLimitFilter": lambda: (
            LocalRateLimitFilter(LocalRateLimitConfig("verify", Clock(), random.Random(0)))
        ),
        **_istio_providers(),
    }


def _istio_providers() -> dict[str, Callable[[], Any]]:
    """Istio's extensions (istio.peer_metadata, istio.stats, ...) and grpc_stats."""
    from hbonex.filters.common.istio_stats_config import StatsConfig
    from hbonex.filters.http.grpc_stats import GrpcStatsConfig, GrpcStatsFilter
    from hbonex.filters.http.istio_stats import IstioStatsFilter
    from hbonex.filters.http.peer_metadata import PeerMetadataConfig, PeerMetadataFilter
    from hbonex.filters.network.istio_stats import IstioStatsNetworkFilter
    from hbonex.filters.network.metadata_exchange import MetadataExchangeFilter

    return {
        "hbonex.filters.http.grpc_stats.GrpcStatsFilter":
            lambda: GrpcStatsFilter(GrpcStatsConfig()),
        "hbonex.filters.http.istio_stats.IstioStatsFilter":
            lambda: IstioStatsFilter(StatsConfig()),
        "hbonex.filters.http.peer_metadata.PeerMetadataFilter":
            lambda: PeerMetadataFilter(PeerMetadataConfig()),
        "hbonex.filters.network.istio_stats.IstioStatsNetworkFilter":
            lambda: IstioStatsNetworkFilter(StatsConfig()),
        "hbonex.filters.network.metadata_exchange.MetadataExchangeFilter":
            MetadataExchangeFilter,
    }


def _ext_authz_filter() -> Any:
    from hbonex.filters.http.ext_authz import ExtAuthzFilter, _Shared
    from hbonex.filters.http.ext_authz_config import ExtAuthzConfig, ExtAuthzStats

    return ExtAuthzFilter(_Shared(ExtAuthzConfig(None, 1.0), Clock(), lambda c: None,
                                  ExtAuthzStats("verify.")))


def _router_reading() -> Any:
    from hbonex.filters.http.router import _Reading

    return _Reading(StringTransport())


def _encoder_callbacks() -> Any:
    from zope.interface import implementer as _implementer

    from hbonex.http.filter_manager import FilterManager
    from hbonex.interfaces import IStreamEncoderFilter

    @_implementer(IStreamEncoderFilter)
    class Encoder:
        def setEncoderFilterCallbacks(self, callbacks: Any) -> None:
            self.callbacks = callbacks

    return FilterManager([Encoder()], None).encoding.sides[0].callbacks  # type: ignore


class _TCPStringTransport(StringTransport):
    """What FastTLSProtocol passes on from a TCP transport (ITCPTransport's options)."""

    def getTcpNoDelay(self) -> bool:
        return True

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass


def _fast_tls_protocol(test: unittest.TestCase) -> Any:
    from hbonex.tls.context import ClientTLS
    from hbonex.tls.fasttls import FastTLSFactory

    factory = FastTLSFactory(ClientTLS(_tls_settings(test)), True, Factory.forProtocol(Protocol))
    proto = factory.buildProtocol(None)
    proto.makeConnection(_TCPStringTransport())
    return proto


def _declaring_classes() -> dict[str, type]:
    """Every class defined in an hbonex module that itself declares @implementer."""
    found: dict[str, type] = {}
    for info in pkgutil.walk_packages(hbonex.__path__, "hbonex."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and implementedBy(cls).declared:
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


class ImplementerTests(unittest.TestCase):
    def test_every_provider_verifies(self) -> None:
        for name, make in sorted(_providers(self).items()):
            instance = make()
            self.assertEqual(f"{type(instance).__module__}.{type(instance).__qualname__}", name)
            interfaces = list(providedBy(instance))
            self.assertTrue(interfaces, name)
            for interface in interfaces:
                try:
                    verifyObject(interface, instance)
                except Exception as e:
                    self.fail(f"{name} does not provide {interface.__name__}: {e}")

    def test_key_interfaces(self) -> None:
        from twisted.internet.interfaces import (
            IOpenSSLClientConnectionCreator,
            IOpenSSLServerConnectionCreator,
        )

        from hbonex.interfaces import (
            IConnectionInfo,
            IHalfCloseableTransport,
            INetworkFilter,
            INetworkFilterCallbacks,
        )

        expected = {
            "hbonex.network.listener.ListenerConnection": INetworkFilterCallbacks,
            "hbonex.filters.network.tcp_proxy.TcpProxyFilter": INetworkFilter,
            "hbonex.filters.network.connection_limit.ConnectionLimitFilter": INetworkFilter,
            "hbonex.filters.network.http_connection_manager.HttpConnectionManagerFilter":
                INetworkFilter,
            "hbonex.tls.context.ServerTLS": IOpenSSLServerConnectionCreator,
            "hbonex.tls.context.ClientTLS": IOpenSSLClientConnectionCreator,
            "hbonex.network.internal.InternalTransport": IHalfCloseableTransport,
            "hbonex.tunnel.client.H1TunnelTransport": IHalfCloseableTransport,
            "hbonex.h2.connection.H2Stream": IHalfCloseableTransport,
            "hbonex.network.listener.ConnectionInfo": IConnectionInfo,
            "hbonex.observability.process_log.JSONLineObserver": ILogObserver,
        }
        providers = _providers(self)
        for name, interface in expected.items():
            instance = providers[name]()
            self.assertTrue(interface.providedBy(instance), f"{name} / {interface.__name__}")
            self.assertTrue(verifyObject(interface, instance))

    def test_every_implementer_is_covered(self) -> None:
        covered = set(_providers(self))
        # Extension plugins are verified (with their base classes) by ExtensionDiscoveryTests.
        for plugin in extension_plugins().values():
            covered.update(f"{c.__module__}.{c.__qualname__}" for c in type(plugin).__mro__)
        missing = sorted(set(_declaring_classes()) - covered)
        self.assertEqual(
            missing, [],
            "classes declaring @implementer without an instance in "
            "tests/test_plugins.py:_providers, nor found as a plugin (add one so "
            "verifyObject checks them)",
        )
