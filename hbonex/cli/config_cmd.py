"""
``hbonex config check FILE``: load an Envoy bootstrap YAML without running it (no socket is
bound) and print what it describes.  ``hbonex config render client|server [flags...]``: print
the YAML equivalent of a ``twistd hbone-client`` / ``hbone-server`` command line.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, Sequence

from twisted.python import usage

from hbonex.config import LoadedConfig, load_config
from hbonex.errors import ConfigError

__all__ = ["add_subcommand", "describe", "render_client", "render_server"]

TCP_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
DOWNSTREAM_TLS = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
)


# -- check ----------------------------------------------------------------------------------------


def _tls_summary(tls: Any, upstream: bool) -> str:
    if tls is None:
        return "TLS no"
    parts = [f"min {tls.min_version}"]
    if tls.alpn:
        parts.append("ALPN " + ",".join(p.decode() for p in tls.alpn))
    if tls.sni:
        parts.append(f"SNI {tls.sni}")
    if not upstream:
        parts.append("client certificate " + (
            "required" if tls.require_peer_certificate else "optional"))
    parts.append(f"peer: {tls.peer_policy.describe()}")
    return f"TLS yes ({'; '.join(parts)})"


def _match_summary(match: Any) -> str:
    parts = []
    if match.destination_port is not None:
        parts.append(f"destination_port {match.destination_port}")
    if match.server_names:
        parts.append("server_names " + ",".join(match.server_names))
    if match.transport_protocol:
        parts.append(f"transport_protocol {match.transport_protocol}")
    if match.application_protocols:
        parts.append("application_protocols " + ",".join(match.application_protocols))
    return "match " + ("; ".join(parts) if parts else "any")


def describe(loaded: LoadedConfig) -> list[str]:
    """
    The summary tree ``hbonex config check`` prints.
    """
    lines = [f"{loaded.source}: OK ({len(loaded.listeners)} listener(s), "
             f"{len(loaded.clusters)} cluster(s))"]
    limit = loaded.bootstrap.runtime.downstream_limit.max_active
    if limit:
        lines.append(f"global downstream connection limit: {limit}")
    router_flags = [getattr(f.parsed, "router", None) for i in loaded.listeners
                    for c in i.chains for f in c.filters]
    if any(getattr(r, "reject_early_data", False) for r in router_flags):
        lines.append("early CONNECT data refused (reject_early_connect_data)")
    lines.append("listeners:")
    for info in loaded.listeners:
        listener = info.listener
        where = "internal listener" if listener.internal else (
            f"{info.address} ({listener.endpoint})")
        lines.append(f"  {listener.name}: {where}")
        names = [getattr(e, "name", "") for e in listener.listener_filters]
        if any(names):
            lines.append(f"    listener filters: {', '.join(n for n in names if n)}")
        if getattr(listener, "filter_chain_matcher", None) is not None:
            lines.append("    filter chains chosen by filter_chain_matcher")
        for index, chain in enumerate(info.chains):
            name = f" {chain.chain.name}" if chain.chain.name else ""
            lines.append(f"    filter chain {index}{name}: {_match_summary(chain.chain.match)}; "
                         f"{_tls_summary(chain.tls, upstream=False)}")
            for f in chain.filters:
                summary = getattr(f.plugin, "describe", None)
                detail = summary(f.parsed) if summary is not None else []
                first = f" {detail[0]}" if detail else ""
                lines.append(f"      {f.name}{first}")
                lines.extend(f"        {line}" for line in detail[1:])
    lines.append("clusters:")
    for name, cinfo in loaded.clusters.items():
        c = cinfo.cluster
        parts = [c.type]
        if c.type == "ORIGINAL_DST":
            source = (f"header {c.original_dst_header}" if c.original_dst_header
                      else "the connection's destination")
            parts.append(f"destination from {source}")
            parts.append("allowed targets " + (
                str(c.target_policy) if c.target_policy
                else "any (no metadata.filter_metadata.hbonex.allowed_targets)"))
        else:
            parts.append("endpoints " + (", ".join(str(e) for e in c.endpoints) or "none"))
            parts.append(f"lb {c.lb_policy}")
        parts.append("protocol " + {"http1": "HTTP/1.1 CONNECT", "http2": "HTTP/2 CONNECT",
                                    "auto": "HTTP/2 or HTTP/1.1 by ALPN"}.get(
            c.upstream_protocol or "", "TCP"))
        if c.passthrough_metadata:
            parts.append("passes metadata " + ", ".join(
                f"{kind}:{namespace}" for kind, namespace in c.passthrough_metadata))
        parts.append(f"connect_timeout {c.connect_timeout:g}s")
        parts.append(_tls_summary(c.tls, upstream=True))
        lines.append(f"  {name}: {', '.join(parts)}")
    return lines


def _cmd_check(args: argparse.Namespace) -> int:
    from twisted.internet import reactor

    from hbonex.cli.main import CLIError

    try:
        loaded = load_config(args.file, reactor, base_dir=args.base_dir)
    except ConfigError as e:
        text = str(e)
        raise CLIError(text if text.startswith(args.file) else f"{args.file}: {text}")
    for line in describe(loaded):
        print(line)
    # Set fields hbonex runs without (hbonex.config.support.WARN): one line each.
    for path, text in loaded.warnings:
        print(f"warning: {path}: {text}")
    return 0


# -- render ---------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def _listen_address(endpoint: str, option: str) -> dict[str, Any]:
    """
    ``tcp:PORT:interface=ADDR`` / ``tcp6:...`` -> an Envoy socket_address.
    """
    parts = re.split(r"(?<!\\):", endpoint)
    kind = parts[0]
    if kind not in ("tcp", "tcp6") or len(parts) < 2 or not parts[1].isdigit():
        from hbonex.cli.main import CLIError

        raise CLIError(f"{option} {endpoint}: only tcp/tcp6 endpoints have an Envoy equivalent")
    host = "0.0.0.0" if kind == "tcp" else "::"
    for part in parts[2:]:
        key, _, value = part.partition("=")
        if key == "interface":
            host = value.replace("\\:", ":")
    return {"socket_address": {"address": host, "port_value": int(parts[1])}}


def _tls_context(material: Any, min_version: str, alpn: Sequence[str],
                 matchers: list[dict[str, Any]]) -> dict[str, Any]:
    validation: dict[str, Any] = {"trusted_ca": {"filename": str(material.ca_path)}}
    if matchers:
        validation["match_typed_subject_alt_names"] = matchers
    return {
        "tls_params": {"tls_minimum_protocol_version": min_version},
        "alpn_protocols": list(alpn),
        "tls_certificates": [{
            "certificate_chain": {"filename": str(material.cert_path)},
            "private_key": {"filename": str(material.key_path)},
        }],
        "validation_context": validation,
    }


def _identity_matchers(patterns: Sequence[str]) -> list[dict[str, Any]]:
    """
    SPIFFE ID patterns (hbonex.tls.spiffe.IdentityMatcher) as URI SAN matchers.
    """
    result = []
    for pattern in patterns:
        body = pattern[len("spiffe://"):]
        if "*" in pattern:
            regex = "spiffe://" + "[^/]*".join(re.escape(p) for p in body.split("*"))
            matcher: dict[str, Any] = {"safe_regex": {"regex": regex}}
        elif "/" not in body.rstrip("/"):
            matcher = {"prefix": f"spiffe://{body.rstrip('/')}/"}
        else:
            matcher = {"exact": pattern}
        result.append({"san_type": "URI", "matcher": matcher})
    return result


def _h2_options(options: Any, streams: int, server: bool) -> dict[str, Any]:
    h2: dict[str, Any] = {}
    if server:
        h2["allow_connect"] = True
    h2.update({
        "max_concurrent_streams": streams,
        "initial_stream_window_size": options["stream-window"],
        "initial_connection_window_size": options["connection-window"],
        "connection_keepalive": {
            "interval": _duration(options["keepalive-interval"]),
            "timeout": _duration(options["keepalive-timeout"]),
        },
    })
    return h2


def _notes(options: Any) -> list[str]:
    notes = []
    if options["max-frame-size"] != 1024 * 1024:
        notes.append(f"--max-frame-size {options['max-frame-size']} has no Envoy field; the "
                     "YAML runs with 1048576")
    return notes


def render_client(options: Any) -> tuple[dict[str, Any], list[str]]:
    """
    The bootstrap (as plain data) a parsed ``hbone-client`` Options describes, and notes on
    flags with no YAML equivalent.
    """
    material = options.tls_material("client")
    http1 = bool(options["http1"])
    if options["server-identity"]:
        matchers = _identity_matchers([options["server-identity"]])
    else:
        matchers = _identity_matchers([f"spiffe://{options['trust-domain']}"])
    server = options["server"]
    host, _, port = server.rpartition(":")
    host = host.strip("[]")
    if http1:
        explicit: dict[str, Any] = {"http_protocol_options": {}}
    else:
        explicit = {"http2_protocol_options": _h2_options(options, options["max-streams"],
                                                          server=False)}
    cluster = {
        "name": "hbone",
        "connect_timeout": _duration(options["connect-timeout"]),
        "typed_extension_protocol_options": {HTTP_OPTIONS: {
            "@type": f"type.googleapis.com/{HTTP_OPTIONS}",
            "explicit_http_config": explicit,
            "common_http_protocol_options": {
                "idle_timeout": _duration(options["pool-idle-timeout"])
            },
        }},
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": UPSTREAM_TLS,
                "common_tls_context": _tls_context(
                    material, options.tls_min(), ["http/1.1"] if http1 else ["h2"], matchers
                ),
            },
        },
        "load_assignment": {"cluster_name": "hbone", "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": {"socket_address": {
                "address": host, "port_value": int(port)}}}}]}]},
    }
    headers = [{"header": {"key": "forwarded", "value": 'for="%DOWNSTREAM_REMOTE_ADDRESS%"'}}]
    headers += [{"header": {"key": k, "value": v}} for k, v in options["header"]]
    listeners = []
    for index, (listen, target) in enumerate(options["forward"]):
        listeners.append({
            "name": f"forward_{index}",
            "address": _listen_address(listen, "--forward"),
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {
                    "@type": TCP_PROXY_TYPE,
                    "stat_prefix": f"forward_{index}",
                    "cluster": "hbone",
                    "idle_timeout": _duration(options["idle-timeout"]),
                    "tunneling_config": {"hostname": target, "headers_to_add": headers},
                },
            }]}],
        })
    data: dict[str, Any] = {"static_resources": {"listeners": listeners,
                                                 "clusters": [cluster]}}
    _process_options(options, data)
    return data, _notes(options)


def render_server(options: Any) -> tuple[dict[str, Any], list[str]]:
    from hbonex.tunnel.connect import LOOPBACK_RULES

    material = options.tls_material("server")
    patterns = options["allow-identity"] or [f"spiffe://{options['trust-domain']}"]
    targets = [str(r) for r in (tuple(options["allow-target"]) or LOOPBACK_RULES)]
    hcm: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": "hbone",
        "codec_type": "AUTO",
        "http2_protocol_options": _h2_options(
            options, options["max-concurrent-streams"], server=True
        ),
    }
    if options["max-requests-per-connection"]:
        hcm["common_http_protocol_options"] = {
            "max_requests_per_connection": options["max-requests-per-connection"]
        }
    hcm.update({
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "route_config": {"name": "hbone", "virtual_hosts": [{
            "name": "any_target",
            "domains": ["*"],
            "routes": [{
                "match": {"connect_matcher": {}},
                "route": {
                    "cluster": "original_dst",
                    "idle_timeout": _duration(options["idle-timeout"]),
                    "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}],
                },
            }],
        }]},
        "http_filters": [{"name": "envoy.filters.http.router",
                          "typed_config": {"@type": ROUTER_TYPE}}],
    })
    listener = {
        "name": "hbone",
        "address": _listen_address(options["listen"], "--listen"),
        "filter_chains": [{
            "transport_socket_connect_timeout": _duration(options["handshake-timeout"]),
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": DOWNSTREAM_TLS,
                    "require_client_certificate": True,
                    "common_tls_context": _tls_context(
                        material, options.tls_min(), ["h2", "http/1.1"],
                        _identity_matchers(patterns),
                    ),
                },
            },
            "filters": [{"name": "envoy.filters.network.http_connection_manager",
                         "typed_config": hcm}],
        }],
    }
    cluster = {
        "name": "original_dst",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": _duration(options["connect-timeout"]),
        "original_dst_lb_config": {"use_http_header": True, "http_header_name": ":authority"},
        "metadata": {"filter_metadata": {"hbonex": {"allowed_targets": targets}}},
    }
    notes = _notes(options)
    if options["allow-target"]:
        notes.append("--allow-target replaces the loopback default: allowed_targets holds "
                     "exactly the targets given")
    if options["drain-timeout"] != 5.0:
        notes.append(f"--drain-timeout {options['drain-timeout']:g} is not part of the YAML; "
                     "pass it to twistd hbone-server along with --config")
    data: dict[str, Any] = {"static_resources": {"listeners": [listener],
                                                 "clusters": [cluster]}}
    if options["reject-early-connect-data"]:
        data["layered_runtime"] = {"layers": [{"name": "static_layer_0", "static_layer": {
            "envoy.reloadable_features.reject_early_connect_data": True}}]}
    _process_options(options, data)
    return data, notes


def _process_options(options: Any, data: dict[str, Any]) -> None:
    """
    --max-connections as the overload manager's downstream connections resource monitor;
    --admin as the bootstrap's ``admin.address``; --workers as the runtime key
    ``hbonex.workers`` (Envoy's --concurrency has no place in the Bootstrap).
    """
    if "workers" in options.given:
        layers = data.setdefault("layered_runtime", {"layers": [
            {"name": "static_layer_0", "static_layer": {}}]})["layers"]
        layers[0]["static_layer"]["hbonex.workers"] = options["workers"]
    if options["admin"]:
        from hbonex.cli.tap_common import endpoint_string

        endpoint = endpoint_string(options["admin"], "--admin")
        data["admin"] = {"address": _listen_address(endpoint, "--admin")}
    if options["max-connections"]:
        data["overload_manager"] = {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                         "downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": options["max-connections"],
            },
        }]}


def render(side: str, flags: Sequence[str]) -> str:
    """
    The YAML for ``twistd hbone-<side> FLAGS``.
    """
    from hbonex.cli import client_tap, server_tap
    from hbonex.cli.main import CLIError

    module: Any = client_tap if side == "client" else server_tap
    if any(f in ("-c", "--config") or f.startswith(("--config=", "-c")) for f in flags):
        raise CLIError("render turns command-line flags into YAML; --config is YAML already")
    options = module.Options()
    options.accepts_config = False
    try:
        options.parseOptions(list(flags))
    except usage.UsageError as e:
        raise CLIError(f"{' '.join([f'hbone-{side}', *flags])}: {e}")
    except ConfigError as e:
        raise CLIError(str(e))
    try:
        data, notes = (render_client if side == "client" else render_server)(options)
    except ConfigError as e:
        raise CLIError(str(e))
    header = [f"# hbonex config render {side} {' '.join(flags)}".rstrip(),
              f"# The Envoy v3 bootstrap equivalent of `twistd hbone-{side}` with these flags."]
    header += [f"# note: {n}" for n in notes]
    # Through Envoy's Bootstrap message: what is printed is valid Envoy by construction.
    from hbonex.config.render import bootstrap_from_data, message_to_yaml

    body = message_to_yaml(bootstrap_from_data(data))
    return "\n".join(header) + "\n" + body


def _cmd_render(args: argparse.Namespace) -> int:
    flags = list(args.flags)
    if flags and flags[0] == "--":
        flags = flags[1:]
    print(render(args.side, flags), end="")
    return 0


def _usage(parser: argparse.ArgumentParser) -> int:
    import sys

    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: a command is required (check or render)", file=sys.stderr)
    return 2


def add_subcommand(subparsers: Any) -> None:
    """
    Register ``hbonex config check|render``.
    """
    from hbonex.cli import main as cli

    if ConfigError not in cli.USER_ERRORS:
        cli.USER_ERRORS.append(ConfigError)
    parser = subparsers.add_parser(
        "config",
        help="check an Envoy v3 bootstrap YAML, or render command-line flags as one",
        description="Check an Envoy v3 bootstrap YAML or render twistd flags as one.",
    )
    sub = parser.add_subparsers(dest="config_command", metavar="COMMAND")
    parser.set_defaults(func=lambda args: _usage(parser))
    check = sub.add_parser(
        "check", help="validate FILE without running it and print what it describes",
        description="Load FILE as hbonex would (certificates included) without binding any "
                    "socket, and print its listeners, filter chains, routes and clusters. "
                    "Exit status 0 if it is valid, 2 with the error otherwise.",
    )
    check.add_argument("file", metavar="FILE", help="Envoy v3 bootstrap YAML")
    check.add_argument("--base-dir", default=None, metavar="DIR",
                       help="resolve relative file names from DIR (default: the working "
                            "directory, as Envoy does)")
    check.set_defaults(func=_cmd_check)
    render_parser = sub.add_parser(
        "render", help="print the YAML equivalent of twistd hbone-client/server flags",
        description="Print the Envoy v3 bootstrap YAML equivalent of `twistd hbone-client` or "
                    "`twistd hbone-server` with the given flags, e.g. "
                    "`hbonex config render client --forward 127.0.0.1:9000=127.0.0.1:8080`.",
    )
    render_parser.add_argument("side", choices=("client", "server"))
    render_parser.add_argument("flags", nargs=argparse.REMAINDER,
                               help="the twistd subcommand's flags")
    render_parser.set_defaults(func=_cmd_render)
