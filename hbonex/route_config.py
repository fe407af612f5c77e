"""
Envoy's ``route_config`` (RouteConfiguration) -> hbonex.routing.RouteConfig: virtual hosts by
domain, routes by path / header / CONNECT matchers, to a cluster or a direct response.
"""

from __future__ import annotations

from typing import Any

from hbonex.routing import HeaderMatcher, Route, RouteConfig, VirtualHost
from hbonex.transport_sockets import regex_field
from hbonex.yamlpath import Node

__all__ = ["parse_route_config"]


def parse_route_config(node: Node, context: Any, *, connect_enabled: bool = False) -> RouteConfig:
    node.expect_map()
    name = node.str_field("name", "")
    node.bool_field("validate_clusters")  # clusters are always validated
    vhosts = []
    names: dict[str, str] = {}
    domains: dict[str, str] = {}
    for vhost_node in node.list_field("virtual_hosts"):
        vhost = _virtual_host(vhost_node, context)
        if vhost.name in names:
            raise vhost_node.error(
                f"duplicate virtual host name {vhost.name!r} (also {names[vhost.name]})", "name"
            )
        names[vhost.name] = vhost_node.path
        for domain in vhost.domains:
            if domain.lower() in domains:
                raise vhost_node.error(
                    f"domain {domain!r} is also in {domains[domain.lower()]}; each domain "
                    "may appear in one virtual host only", "domains",
                )
            domains[domain.lower()] = vhost_node.path
        vhosts.append(vhost)
    node.finish()
    return RouteConfig(name, tuple(vhosts), connect_enabled=connect_enabled)


def _virtual_host(node: Node, context: Any) -> VirtualHost:
    node.expect_map()
    name = node.str_field("name", required=True)
    domain_nodes = node.list_field("domains", required=True)
    domains = []
    for d in domain_nodes:
        domain = d.as_str()
        if not domain or ("*" in domain and domain != "*" and (
            domain.count("*") > 1 or not (domain.startswith("*") or domain.endswith("*"))
        )):
            raise d.error(
                f"invalid domain {domain!r}: '*' may only be the whole domain, or its first "
                "or last character"
            )
        domains.append(domain)
    routes = tuple(_route(r, context) for r in node.list_field("routes"))
    node.finish()
    return VirtualHost(name, tuple(domains), routes)


def _route(node: Node, context: Any) -> Route:
    node.expect_map()
    node.str_field("name")
    match = node.map_field("match", required=True)
    assert match is not None
    kind, value = match.oneof("prefix", "path", "safe_regex", "connect_matcher")  # type: ignore[misc]
    fields: dict[str, Any] = {}
    if kind == "connect_matcher":
        value.expect_map().finish()
        fields["connect_matcher"] = True
    elif kind == "safe_regex":
        fields["safe_regex"] = regex_field(value)
    else:
        fields[kind] = value.as_str()
    fields["headers"] = tuple(_header_matcher(h) for h in match.list_field("headers"))
    match.finish()
    action, config = node.oneof("route", "direct_response", "redirect")  # type: ignore[misc]
    if action == "redirect":
        raise node.error("redirect routes are not supported", "redirect")
    config.expect_map()
    if action == "direct_response":
        fields["direct_status"] = config.int_field("status", required=True, minimum=200,
                                                   maximum=599)
        body = config.map_field("body")
        if body is not None:
            path, data = context.data_source(body)
            if path is not None:
                try:
                    data = path.read_bytes()
                except OSError as e:
                    raise body.error(f"{path}: {e.strerror or e}", "filename")
            fields["direct_body"] = data
    else:
        cluster = context.cluster(config, "cluster")
        fields["cluster"] = cluster
        for upgrade in config.list_field("upgrade_configs"):
            upgrade.expect_map()
            kind = upgrade.str_field("upgrade_type", required=True)
            if kind.upper() != "CONNECT":
                raise upgrade.error(
                    f"upgrade_type {kind!r} is not supported; accepted: CONNECT", "upgrade_type"
                )
            enabled = upgrade.bool_field("enabled", True)
            connect = upgrade.map_field("connect_config")
            allow_post = False
            if connect is not None:
                allow_post = connect.bool_field("allow_post")
                connect.finish()
            upgrade.finish()
            fields["connect_enabled"] = enabled
            fields["allow_post"] = allow_post
        fields["idle_timeout"] = config.duration_field("idle_timeout", 3600.0)
        fields["timeout"] = config.duration_field("timeout")
    config.finish()
    node.finish()
    return Route(**fields)


def _header_matcher(node: Node) -> HeaderMatcher:
    node.expect_map()
    name = node.str_field("name", required=True).lower()
    invert = node.bool_field("invert_match")
    kind, value = node.oneof(  # type: ignore[misc]
        "string_match", "exact_match", "prefix_match", "suffix_match", "contains_match",
        "safe_regex_match", "present_match",
    )
    fields: dict[str, Any] = {}
    if kind == "present_match":
        if not isinstance(value.value, bool):
            raise value.error(f"expected true or false, got {value.value!r}")
        fields["present"] = value.value
    elif kind == "safe_regex_match":
        fields["regex"] = regex_field(value)
    elif kind == "string_match":
        value.expect_map()
        which, inner = value.oneof(  # type: ignore[misc]
            "exact", "prefix", "suffix", "contains", "safe_regex"
        )
        value.finish()
        if which == "safe_regex":
            fields["regex"] = regex_field(inner)
        else:
            fields[which] = inner.as_str()
    else:
        fields[kind[: -len("_match")]] = value.as_str()
    node.finish()
    return HeaderMatcher(name, invert=invert, **fields)
