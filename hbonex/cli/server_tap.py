"""
``twistd hbone-server``: terminates HBONE (HTTP/2 and HTTP/1.1 CONNECT over mutual TLS) and
connects each tunnel to the target in its :authority, within the target policy.

The flags build Envoy's objects: a TLS listener whose http_connection_manager routes every
CONNECT to an ORIGINAL_DST cluster that only connects to allowed targets.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.python import usage

from hbonex.bootstrap import Bootstrap
from hbonex.cli.tap_common import TLSOptions, endpoint_string
from hbonex.filters.network.http_connection_manager import (
    HttpConnectionManagerConfig,
    http_connection_manager_factory,
)
from hbonex.http.routing import ConnectRouter
from hbonex.network.listener import FilterChain, Listener
from hbonex.tls.context import PeerPolicy, ServerTLS, tls_settings_from_material
from hbonex.tls.spiffe import IdentityMatcher
from hbonex.tunnel.connect import LOOPBACK_RULES, TargetPolicy, TargetRule
from hbonex.upstream.cluster import Cluster


class Options(TLSOptions):
    tapname = "hbone-server"
    # Not part of the YAML: how long shutdown waits for open tunnels.
    with_config = ("drain-timeout", "max-connections", "admin", "cert-poll",
                   "cert-warn-days", "log-format", "workers")
    synopsis = "[options]"
    longdesc = "Terminate HBONE tunnels (HTTP CONNECT over mutual TLS) and relay them."
    optFlags = [
        ["reject-early-connect-data", None, "Refuse (400) a CONNECT whose client sends "
         "tunnel bytes before the 200 (Envoy's reject_early_connect_data)."],
    ]
    optParameters = [
        ["listen", "l", "tcp:15008:interface=127.0.0.1", "Where to listen (endpoint string "
         "or host:port)."],
        ["max-concurrent-streams", None, 200, "SETTINGS_MAX_CONCURRENT_STREAMS.", int],
        ["idle-timeout", None, 3600.0, "Close a tunnel with no traffic this long.", float],
        ["handshake-timeout", None, 10.0, "TLS handshake timeout in seconds.", float],
        ["max-requests-per-connection", None, 0, "Send GOAWAY after this many tunnels on one "
         "HTTP/2 connection (0: no limit).", int],
        ["drain-timeout", None, 5.0, "On shutdown, how long open tunnels may finish after "
         "GOAWAY.", float],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["allow-identity"] = []
        self["allow-target"] = []

    def opt_allow_identity(self, value: str) -> None:
        """
        SPIFFE ID pattern allowed to connect (exact, glob with *, or spiffe://td/).
        Repeatable. Default: any identity of the trust domain.
        """
        self["allow-identity"].append(value)

    def opt_allow_target(self, value: str) -> None:
        """
        CIDR[:PORT|:LO-HI] tunnels may connect to. Repeatable. Replaces the default
        (loopback only: 127.0.0.0/8 and ::1/128), it does not add to it.
        """
        try:
            self["allow-target"].append(TargetRule.parse(value))
        except ValueError as e:
            raise usage.UsageError(f"--allow-target {e}")

    def postOptions(self) -> None:
        self["listen"] = endpoint_string(self["listen"], "--listen")
        self.tls_min()
        try:
            if self["allow-identity"]:
                IdentityMatcher(self["allow-identity"])
        except ValueError as e:
            raise usage.UsageError(f"--allow-identity: {e}")
        self.load_material("server")


def build(options: Options, reactor: Any) -> Bootstrap:
    bootstrap = Bootstrap(reactor)
    material = options.tls_material("server")
    if options["allow-identity"]:
        identities = IdentityMatcher(options["allow-identity"])
    else:
        identities = IdentityMatcher.trust_domain(options["trust-domain"])
    tls = tls_settings_from_material(
        material,
        peer_policy=PeerPolicy(identities=identities),
        alpn=(b"h2", b"http/1.1"),
        min_version=options.tls_min(),
    )
    policy = TargetPolicy(tuple(options["allow-target"]) or LOOPBACK_RULES)
    cluster = bootstrap.add_cluster(
        Cluster(
            "original_dst",
            bootstrap.runtime,
            type="ORIGINAL_DST",
            connect_timeout=options["connect-timeout"],
            target_policy=policy,
        )
    )
    hcm = HttpConnectionManagerConfig(
        stat_prefix="hbone",
        router=ConnectRouter(
            cluster, idle_timeout=options["idle-timeout"],
            reject_early_data=bool(options["reject-early-connect-data"]),
        ),
        runtime=bootstrap.runtime,
        h2_settings=options.h2_settings(options["max-concurrent-streams"]),
        max_requests_per_connection=options["max-requests-per-connection"],
    )
    chain = FilterChain(
        [http_connection_manager_factory(hcm)],
        tls=ServerTLS(tls),
        handshake_timeout=options["handshake-timeout"],
    )
    bootstrap.add_listener(
        Listener("hbone", reactor, [chain], endpoint=options["listen"]), path="--listen"
    )
    return bootstrap


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    if options["config"]:
        bootstrap = options.config_bootstrap(reactor)
        options.apply_limits(bootstrap)
        return options.proxy_service(  # type: ignore[no-any-return]
            bootstrap, drain_timeout=options["drain-timeout"],
            source=f"--config {options['config']}",
        )
    bootstrap = build(options, reactor)
    options.apply_limits(bootstrap)
    return options.proxy_service(  # type: ignore[no-any-return]
        bootstrap, drain_timeout=options["drain-timeout"])
