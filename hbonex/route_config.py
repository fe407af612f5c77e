"""
Envoy's ``route_config`` (RouteConfiguration) -> hbonex.routing.RouteConfig: virtual hosts by
domain, routes by path / header / CONNECT matchers, to a cluster or a direct response.
"""

from __future__ import annotations

from typing import Any

from hbonex.routing import HeaderMatcher, Route, RouteConfig, VirtualHost
from hbonex.transport_sockets import regex_field

__all__ = ["parse_route_config"]


def parse_route_config(message: Any, path: str, context: Any, *,
                       connect_enabled: bool = False, reject_early_data: bool = False
                       ) -> RouteConfig:
    vhosts = []
    names: dict[str, str] = {}
    domains: dict[str, str] = {}
    for index, vhost_message in enumerate(message.virtual_hosts):
        vhost_path = f"{path}.virtual_hosts[{index}]"
        vhost = _virtual_host(vhost_message, vhost_path, context)
        if vhost.name in names:
            raise context.error(
                vhost_path, f"duplicate virtual host name {vhost.name!r} (also "
                f"{names[vhost.name]})", "name")
        names[vhost.name] = vhost_path
        for domain in vhost.domains:
            if domain.lower() in domains:
                raise context.error(
                    vhost_path, f"domain {domain!r} is also in {domains[domain.lower()]}; each "
                    "domain may appear in one virtual host only", "domains",
                )
            domains[domain.lower()] = vhost_path
        vhosts.append(vhost)
    return RouteConfig(message.name, tuple(vhosts), connect_enabled=connect_enabled,
                       reject_early_data=reject_early_data)


def _virtual_host(message: Any, path: str, context: Any) -> VirtualHost:
    if not message.name:
        raise context.error(path, "missing required field 'name'")
    if not message.domains:
        raise context.error(path, "missing required field 'domains'")
    for index, domain in enumerate(message.domains):
        if not domain or ("*" in domain and domain != "*" and (
            domain.count("*") > 1 or not (domain.startswith("*") or domain.endswith("*"))
        )):
            raise context.error(
                f"{path}.domains[{index}]",
                f"invalid domain {domain!r}: '*' may only be the whole domain, or its first "
                "or last character"
            )
    routes = tuple(_route(r, f"{path}.routes[{i}]", context)
                   for i, r in enumerate(message.routes))
    return VirtualHost(message.name, tuple(message.domains), routes)


def _route(message: Any, path: str, context: Any) -> Route:
    if not message.HasField("match"):
        raise context.error(path, "missing required field 'match'")
    match = message.match
    match_path = f"{path}.match"
    kind = match.WhichOneof("path_specifier")
    fields: dict[str, Any] = {}
    if kind is None:
        raise context.error(match_path, "one of prefix, path, safe_regex, connect_matcher is "
                            "required")
    if kind == "connect_matcher":
        fields["connect_matcher"] = True
    elif kind == "safe_regex":
        fields["safe_regex"] = regex_field(match.safe_regex, f"{match_path}.safe_regex", context)
    elif kind in ("prefix", "path"):
        fields[kind] = getattr(match, kind)
    else:
        raise context.error(match_path, f"{kind} is not supported; use prefix, path, "
                            "safe_regex or connect_matcher", kind)
    fields["headers"] = tuple(_header_matcher(h, f"{match_path}.headers[{i}]", context)
                              for i, h in enumerate(match.headers))
    action = message.WhichOneof("action")
    if action is None:
        raise context.error(path, "one of route, direct_response, redirect is required")
    if action not in ("route", "direct_response"):
        raise context.error(path, f"{action} routes are not supported", action)
    config = getattr(message, action)
    config_path = f"{path}.{action}"
    if action == "direct_response":
        status = config.status
        if not 200 <= status <= 599:
            raise context.error(f"{config_path}.status" if context.has(
                f"{config_path}.status") else config_path,
                f"must be between 200 and 599, got {status}" if status else
                "missing required field 'status'")
        fields["direct_status"] = status
        if config.HasField("body"):
            body_path = f"{config_path}.body"
            source, data = context.data_source(config.body, body_path)
            if source is not None:
                try:
                    data = source.read_bytes()
                except OSError as e:
                    raise context.error(body_path, f"{source}: {e.strerror or e}", "filename")
            fields["direct_body"] = data
    else:
        kind = config.WhichOneof("cluster_specifier")
        if kind not in (None, "cluster"):
            raise context.error(config_path, f"{kind} is not supported; use cluster", kind)
        fields["cluster"] = context.cluster(config.cluster, config_path, "cluster")
        for index, upgrade in enumerate(config.upgrade_configs):
            upgrade_path = f"{config_path}.upgrade_configs[{index}]"
            if not upgrade.upgrade_type:
                raise context.error(upgrade_path, "missing required field 'upgrade_type'")
            if upgrade.upgrade_type.upper() != "CONNECT":
                raise context.error(
                    upgrade_path, f"upgrade_type {upgrade.upgrade_type!r} is not supported; "
                    "accepted: CONNECT", "upgrade_type")
            fields["connect_enabled"] = (upgrade.enabled.value if upgrade.HasField("enabled")
                                         else True)
            fields["allow_post"] = upgrade.connect_config.allow_post
        fields["idle_timeout"] = _seconds(config, "idle_timeout", 3600.0)
        fields["timeout"] = _seconds(config, "timeout", None)
    return Route(**fields)


def _seconds(message: Any, field: str, default: Any) -> Any:
    if not message.HasField(field):
        return default
    value = getattr(message, field)
    return value.seconds + value.nanos / 1e9


def _header_matcher(message: Any, path: str, context: Any) -> HeaderMatcher:
    if not message.name:
        raise context.error(path, "missing required field 'name'")
    kind = message.WhichOneof("header_match_specifier")
    fields: dict[str, Any] = {}
    if kind is None:
        raise context.error(path, "one of string_match, exact_match, prefix_match, "
                            "suffix_match, contains_match, safe_regex_match, present_match is "
                            "required")
    if kind == "present_match":
        fields["present"] = message.present_match
    elif kind == "safe_regex_match":
        fields["regex"] = regex_field(message.safe_regex_match, f"{path}.safe_regex_match",
                                      context)
    elif kind == "string_match":
        matcher = message.string_match
        where = f"{path}.string_match"
        if matcher.ignore_case:
            raise context.error(where, "ignore_case is not implemented for header matchers",
                                "ignore_case")
        which = matcher.WhichOneof("match_pattern")
        if which is None:
            raise context.error(where, "one of exact, prefix, suffix, contains, safe_regex is "
                                "required")
        if which == "safe_regex":
            fields["regex"] = regex_field(matcher.safe_regex, f"{where}.safe_regex", context)
        elif which in ("exact", "prefix", "suffix", "contains"):
            fields[which] = getattr(matcher, which)
        else:
            raise context.error(where, f"{which} is not supported", which)
    elif kind in ("exact_match", "prefix_match", "suffix_match", "contains_match"):
        fields[kind[: -len("_match")]] = getattr(message, kind)
    else:
        raise context.error(path, f"{kind} is not supported", kind)
    return HeaderMatcher(message.name.lower(), invert=message.invert_match, **fields)
