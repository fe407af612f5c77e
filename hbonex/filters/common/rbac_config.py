"""
``envoy.config.rbac.v3.RBAC`` (a filter's ``rules`` or ``shadow_rules``) -> an RBAC Engine.
What hbonex does not evaluate (metadata, matcher trees, CEL conditions, URI templates...) is
refused by hbonex.config.support before this runs, naming the field; this checks the values.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from hbonex.config.route_config import header_matcher
from hbonex.config.yamlpath import child_path
from hbonex.filters.common.rbac import (
    Action,
    And,
    Any_,
    Authenticated,
    DestinationPort,
    DestinationPortRange,
    Engine,
    FilterState,
    Header,
    IpMatcher,
    Matcher,
    Not,
    Or,
    Policy,
    ServerName,
    UrlPath,
    policies_of,
)
from hbonex.tls.transport_sockets import string_matcher

__all__ = ["parse_rules"]

_L4_REFUSED = ("is not supported by the network RBAC filter (a connection has no HTTP "
               "headers); use envoy.filters.http.rbac for it")


def parse_rules(message: Any, path: str, context: Any, *, network: bool = False) -> Engine:
    """One RBAC message at YAML ``path``; ``network``: the L4 filter's (no header rules)."""
    enum = message.DESCRIPTOR.fields_by_name["action"].enum_type
    action = Action(enum.values_by_number[message.action].name)
    policies = []
    for name in sorted(message.policies):
        where = child_path(f"{path}.policies", name)
        policy = message.policies[name]
        if not policy.permissions:
            raise context.error(where, "missing required field 'permissions' (at least one; "
                                "use any: true for every request)")
        if not policy.principals:
            raise context.error(where, "missing required field 'principals' (at least one; "
                                "use any: true for everyone)")
        policies.append(Policy(
            name,
            tuple(_permission(p, f"{where}.permissions[{i}]", context, network)
                  for i, p in enumerate(policy.permissions)),
            tuple(_principal(p, f"{where}.principals[{i}]", context, network)
                  for i, p in enumerate(policy.principals)),
        ))
    return Engine(action, policies_of(policies))


def _set(rules: Any, path: str, context: Any, network: bool, principal: bool) -> tuple[
        Matcher, ...]:
    field = "ids" if principal else "rules"
    items = getattr(rules, field)
    if not items:
        raise context.error(path, f"missing required field '{field}' (at least one)")
    parse = _principal if principal else _permission
    return tuple(parse(item, f"{path}.{field}[{i}]", context, network)
                 for i, item in enumerate(items))


def _permission(message: Any, path: str, context: Any, network: bool) -> Matcher:
    kind = message.WhichOneof("rule")
    if kind is None:
        raise context.error(path, "one of any, header, url_path, destination_ip, "
                            "destination_port, destination_port_range, requested_server_name, "
                            "and_rules, or_rules, not_rule is required")
    where = f"{path}.{kind}"
    if kind == "any":
        if not message.any:
            raise context.error(path, "any must be true", "any")
        return Any_()
    if kind == "and_rules":
        return And(_set(message.and_rules, where, context, network, principal=False))
    if kind == "or_rules":
        return Or(_set(message.or_rules, where, context, network, principal=False))
    if kind == "not_rule":
        return Not(_permission(message.not_rule, where, context, network))
    if kind == "header":
        return _header(message.header, where, context, network)
    if kind == "url_path":
        return _url_path(message.url_path, where, context)
    if kind == "destination_ip":
        return IpMatcher(_cidr(message.destination_ip, where, context), "destination")
    if kind == "destination_port":
        port = message.destination_port
        if port > 65535:
            raise context.error(path, f"must be at most 65535, got {port}", kind)
        return DestinationPort(port)
    if kind == "destination_port_range":
        start, end = message.destination_port_range.start, message.destination_port_range.end
        if not 0 <= start <= end <= 65536:
            raise context.error(where, f"[{start}, {end}) is not a port range: start must not "
                                "be above end, both within 0-65536 (end is excluded)")
        return DestinationPortRange(start, end)
    if kind == "requested_server_name":
        return ServerName(string_matcher(message.requested_server_name, where, context))
    raise context.error(path, f"{kind} is not supported", kind)  # support.py refused it


def _principal(message: Any, path: str, context: Any, network: bool) -> Matcher:
    kind = message.WhichOneof("identifier")
    if kind is None:
        raise context.error(path, "one of any, authenticated, filter_state, direct_remote_ip, "
                            "remote_ip, source_ip, header, url_path, and_ids, or_ids, not_id "
                            "is required")
    where = f"{path}.{kind}"
    if kind == "any":
        if not message.any:
            raise context.error(path, "any must be true", "any")
        return Any_()
    if kind == "and_ids":
        return And(_set(message.and_ids, where, context, network, principal=True))
    if kind == "or_ids":
        return Or(_set(message.or_ids, where, context, network, principal=True))
    if kind == "not_id":
        return Not(_principal(message.not_id, where, context, network))
    if kind == "authenticated":
        authenticated = message.authenticated
        if not authenticated.HasField("principal_name"):
            return Authenticated()
        return Authenticated(string_matcher(authenticated.principal_name,
                                            f"{where}.principal_name", context))
    if kind in ("direct_remote_ip", "remote_ip", "source_ip"):
        # source_ip (deprecated) is the connection's remote address, as remote_ip here
        # (no x-forwarded-for handling).
        address = "direct_remote" if kind == "direct_remote_ip" else "remote"
        return IpMatcher(_cidr(getattr(message, kind), where, context), address)
    if kind == "header":
        return _header(message.header, where, context, network)
    if kind == "url_path":
        return _url_path(message.url_path, where, context)
    if kind == "filter_state":
        state = message.filter_state
        if not state.key:
            raise context.error(where, "missing required field 'key'")
        which = state.WhichOneof("matcher")
        if which != "string_match":
            raise context.error(where, "string_match is required (address_match is not "
                                "implemented)" if which else "missing required field "
                                "'string_match'", which)
        return FilterState(state.key, string_matcher(state.string_match,
                                                     f"{where}.string_match", context))
    raise context.error(path, f"{kind} is not supported", kind)  # support.py refused it


def _header(message: Any, path: str, context: Any, network: bool) -> Matcher:
    if network:
        raise context.error(path, f"a header rule {_L4_REFUSED}")
    return Header(header_matcher(message, path, context))


def _url_path(message: Any, path: str, context: Any) -> Matcher:
    if not message.HasField("path"):
        raise context.error(path, "missing required field 'path'")
    return UrlPath(string_matcher(message.path, f"{path}.path", context))


def _cidr(message: Any, path: str, context: Any) -> Any:
    """Envoy's CidrRange; a missing prefix_len is 0 (every address of the family), as in
    Envoy."""
    prefix_len = message.prefix_len.value if message.HasField("prefix_len") else 0
    try:
        ip = ipaddress.ip_address(message.address_prefix)
    except ValueError:
        raise context.error(path, f"address_prefix {message.address_prefix!r} is not an IP "
                            "address", "address_prefix") from None
    if prefix_len > ip.max_prefixlen:
        raise context.error(path, f"prefix_len {prefix_len} is over {ip.max_prefixlen} for "
                            f"{ip}", "prefix_len")
    return ipaddress.ip_network(f"{ip}/{prefix_len}", strict=False)
