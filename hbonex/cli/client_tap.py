"""
``twistd hbone-client``: port-forwards local TCP connections through HBONE tunnels.

The flags build Envoy's objects: one listener per ``--forward`` whose tcp_proxy tunnels to the
``hbone`` cluster (the server, over mutual TLS, HTTP/2 or HTTP/1.1 CONNECT).
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.python import usage

from hbonex.bootstrap import Bootstrap
from hbonex.cli.tap_common import TLSOptions, endpoint_string, parse_header
from hbonex.filters.network.tcp_proxy import (
    HeaderToAdd,
    TcpProxyConfig,
    TunnelingConfig,
    WeightedCluster,
    tcp_proxy_factory,
)
from hbonex.network.listener import FilterChain, Listener
from hbonex.observability.formatter import Template
from hbonex.tls.context import PeerPolicy, tls_settings_from_material
from hbonex.tls.spiffe import IdentityMatcher, SpiffeId, SpiffeIdError
from hbonex.tunnel.connect import BadAuthority, parse_authority
from hbonex.upstream.cluster import Cluster, SocketAddress


class Options(TLSOptions):
    tapname = "hbone-client"
    with_config = ("max-connections", "admin", "cert-poll",
                   "cert-warn-days", "log-format", "workers")
    synopsis = "[options] --forward 127.0.0.1:9000=127.0.0.1:8080"
    longdesc = (
        "Forward local TCP connections through HBONE tunnels (HTTP CONNECT over mutual TLS) "
        "to an HBONE server."
    )
    optFlags = [["http1", None, "Use HTTP/1.1 CONNECT (one TLS connection per tunnel)."]]
    optParameters = [
        ["server", "s", "127.0.0.1:15008", "HBONE server HOST:PORT."],
        ["server-identity", None, None, "SPIFFE ID the server must present (default: any "
         "identity of the trust domain)."],
        ["max-streams", None, 100, "Tunnels per HTTP/2 connection (never above the server's "
         "MAX_CONCURRENT_STREAMS).", int],
        ["pool-idle-timeout", None, 300.0, "Close pooled connections idle this long.", float],
        ["idle-timeout", None, 3600.0, "Close a tunnel with no traffic this long.", float],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["forward"] = []
        self["header"] = []

    def opt_forward(self, value: str) -> None:
        """
        LISTEN=TARGET: tunnel connections accepted on LISTEN (host:port or endpoint) to
        TARGET (host:port). Repeatable.
        """
        listen, sep, target = value.rpartition("=")
        if not sep or not listen or not target:
            raise usage.UsageError(f"--forward {value!r}: expected LISTEN=TARGET")
        try:
            parse_authority(target)
        except BadAuthority as e:
            raise usage.UsageError(f"--forward {value!r}: {e}")
        self["forward"].append((endpoint_string(listen, "--forward"), target))

    def opt_header(self, value: str) -> None:
        """
        NAME=VALUE header added to every CONNECT. Repeatable.
        """
        self["header"].append(parse_header(value))

    def postOptions(self) -> None:
        if not self["forward"] and not self["config"]:
            hint = " (or --config FILE)" if self.accepts_config else ""
            raise usage.UsageError(f"give at least one --forward LISTEN=TARGET{hint}")
        try:
            parse_authority(self["server"])
        except BadAuthority as e:
            raise usage.UsageError(f"--server: {e}")
        if self["server-identity"]:
            try:
                SpiffeId.parse(self["server-identity"])
            except SpiffeIdError as e:
                raise usage.UsageError(f"--server-identity: {e}")
        if self["max-streams"] < 1:
            raise usage.UsageError("--max-streams must be at least 1")
        self.tls_min()
        self.load_material("client")


def build(options: Options, reactor: Any) -> Bootstrap:
    """
    The Bootstrap the flags describe.
    """
    bootstrap = Bootstrap(reactor)
    material = options.tls_material("client")
    if options["server-identity"]:
        identities = IdentityMatcher([options["server-identity"]])
    else:
        identities = IdentityMatcher.trust_domain(options["trust-domain"])
    http1 = bool(options["http1"])
    tls = tls_settings_from_material(
        material,
        peer_policy=PeerPolicy(identities=identities),
        alpn=(b"http/1.1",) if http1 else (b"h2",),
        min_version=options.tls_min(),
    )
    server = parse_authority(options["server"])
    bootstrap.add_cluster(
        Cluster(
            "hbone",
            bootstrap.runtime,
            endpoints=(SocketAddress(server.host, server.port),),
            connect_timeout=options["connect-timeout"],
            upstream_protocol="http1" if http1 else "http2",
            tls=tls,
            h2_settings=options.h2_settings(),
            max_streams_per_connection=options["max-streams"],
            pool_idle_timeout=options["pool-idle-timeout"],
        )
    )
    headers = [HeaderToAdd("forwarded", Template('for="%DOWNSTREAM_REMOTE_ADDRESS%"'))]
    headers += [HeaderToAdd(k, Template(v, f"--header {k}")) for k, v in options["header"]]
    for index, (listen, target) in enumerate(options["forward"]):
        proxy = TcpProxyConfig(
            stat_prefix=f"forward_{index}",
            clusters=[WeightedCluster("hbone", 1)],
            runtime=bootstrap.runtime,
            idle_timeout=options["idle-timeout"],
            tunneling=TunnelingConfig(hostname=Template(target), headers_to_add=tuple(headers)),
        )
        bootstrap.add_listener(
            Listener(
                f"forward_{index}",
                reactor,
                [FilterChain([tcp_proxy_factory(proxy)])],
                endpoint=listen,
            ),
            path=f"--forward {listen}={target}",
        )
    return bootstrap


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    if options["config"]:
        bootstrap = options.config_bootstrap(reactor)
        options.apply_limits(bootstrap)
        return options.proxy_service(  # type: ignore[no-any-return]
            bootstrap, source=f"--config {options['config']}")
    bootstrap = build(options, reactor)
    options.apply_limits(bootstrap)
    return options.proxy_service(bootstrap)  # type: ignore[no-any-return]
