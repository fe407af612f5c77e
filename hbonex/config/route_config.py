"""
Envoy's ``route_config`` (RouteConfiguration) -> hbonex.http.routing.RouteConfig: virtual hosts by
domain, routes by path / header / CONNECT matchers, to a cluster or a direct response.
"""

from __future__ import annotations

from typing import Any

import attrs
from google.protobuf import json_format

from hbonex import extensions
from hbonex.config.schema import TYPED_STRUCTS, message_class, type_name
from hbonex.config.yamlpath import MarkedDict
from hbonex.errors import ConfigError
from hbonex.http.routing import (
    HeaderMatcher,
    HeaderMutation,
    HeaderMutations,
    PerFilterConfig,
    QueryMatcher,
    Redirect,
    Route,
    RouteConfig,
    VirtualHost,
)
from hbonex.http.upgrade import TOKEN, UpgradeMap
from hbonex.interfaces import IHTTPFilterPerRouteExtension
from hbonex.tls.transport_sockets import regex_field, string_matcher

__all__ = ["header_matcher", "header_matchers", "header_value_option", "header_value_options",
           "parse_route_config", "rate_limits", "upgrade_configs"]


def parse_route_config(message: Any, path: str, context: Any, *,
                       connect_enabled: bool = False, reject_early_data: bool = False,
                       upgrades: UpgradeMap = ()) -> RouteConfig:
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
    request, response = header_mutations(message, path, context)
    # typed_per_filter_config: the most specific level wins, per filter (Envoy's
    # mostSpecificPerFilterConfig), merged here once instead of per request.
    top = per_filter_configs(message, path, context)
    vhosts = [attrs.evolve(vhost, routes=tuple(
        _with_levels(route, top, vhost.per_filter_config) for route in vhost.routes))
        for vhost in vhosts]
    return RouteConfig(message.name, tuple(vhosts), connect_enabled=connect_enabled,
                       upgrades=upgrades, reject_early_data=reject_early_data,
                       request_headers=request, response_headers=response,
                       clusters=context.runtime.clusters, per_filter_config=top,
                       switches_filters=any(
                           entry.disabled
                           for vhost in vhosts for route in vhost.routes
                           for entry in route.per_filter_config.values()))


def _with_levels(route: Route, top: dict[str, PerFilterConfig],
                 vhost: Any) -> Route:
    """The route with its per-filter configuration merged, and each level kept."""
    own = route.per_filter_config
    if not (top or vhost or own):
        return route
    return attrs.evolve(route, per_filter_config={**top, **vhost, **own},
                        per_filter_levels=(top, vhost, own))


_FILTER_CONFIG = "envoy.config.route.v3.FilterConfig"


def per_filter_configs(message: Any, path: str, context: Any) -> dict[str, PerFilterConfig]:
    """
    A route's, virtual host's or route configuration's ``typed_per_filter_config``: each
    entry, keyed by a filter's name in ``http_filters``, is parsed by the HTTP filter plugin
    that takes its @type as per-route configuration (IHTTPFilterPerRouteExtension), or is
    Envoy's FilterConfig wrapper around one (``config``, ``is_optional``, ``disabled``).
    """
    result: dict[str, PerFilterConfig] = {}
    for name in sorted(message.typed_per_filter_config):
        any_ = message.typed_per_filter_config[name]
        where = f"{path}.typed_per_filter_config.{name}"
        if type_name(any_.type_url) != _FILTER_CONFIG:
            result[name] = PerFilterConfig(_per_route(any_, where, context))
            continue
        cls = message_class(_FILTER_CONFIG)
        assert cls is not None
        wrapper: Any = cls()
        any_.Unpack(wrapper)
        if not wrapper.HasField("config"):
            if not wrapper.disabled:
                raise context.error(where, "a FilterConfig needs config or disabled: true")
            result[name] = PerFilterConfig(disabled=True)
            continue
        try:
            config = _per_route(wrapper.config, f"{where}.config", context)
        except ConfigError:
            if wrapper.is_optional:
                continue  # Envoy: an optional config no filter takes is ignored
            raise
        result[name] = PerFilterConfig(config, disabled=wrapper.disabled)
    return result


def _per_route(any_: Any, path: str, context: Any) -> Any:
    """One per-route configuration, parsed by the plugin whose perRouteTypeUrls has its type."""
    type_url = any_.type_url
    config: Any
    cls = message_class(type_name(type_url))
    if cls is None:
        raise context.error(path, f"unknown type {type_url!r}")
    message: Any = cls()
    any_.Unpack(message)
    if type_name(type_url) in TYPED_STRUCTS:
        type_url = message.type_url
        config_path = f"{path}.value"
        config = context.positions.raw.get(config_path)
        if not isinstance(config, dict):
            config = MarkedDict(json_format.MessageToDict(message.value))
    else:
        config_path, config = path, message
    plugins = extensions.extensions(IHTTPFilterPerRouteExtension)
    for plugin in plugins:
        if type_url in plugin.perRouteTypeUrls:
            try:
                parsed = plugin.parsePerRouteConfig(config, config_path, context)
            except ConfigError as e:
                raise context.wrap(config_path, e) from None
            if isinstance(config, dict):
                context.node(config, config_path).finish()
            return parsed
    known = sorted(url for p in plugins for url in p.perRouteTypeUrls)
    raise context.error(
        path, f"no HTTP filter takes per-route configuration of type {type_url!r}; known: "
        + (", ".join(known) or "none"))


_APPEND_ACTIONS = ("APPEND_IF_EXISTS_OR_ADD", "ADD_IF_ABSENT", "OVERWRITE_IF_EXISTS_OR_ADD",
                   "OVERWRITE_IF_EXISTS")


def header_value_option(option: Any, path: str, context: Any, *,
                        pseudo: bool = False) -> HeaderMutation:
    """
    One HeaderValueOption (``header``, ``append_action`` or the older ``append``,
    ``keep_empty_value``), its value a substitution format.  ``pseudo``: a pseudo-header
    (``:path``...) may be overwritten (the header_mutation filter; never ``host``).
    """
    if not option.HasField("header"):
        raise context.error(path, "missing required field 'header'")
    key = option.header.key
    if not key:
        raise context.error(f"{path}.header", "missing required field 'key'")
    if key.lower() == "host" or (key.startswith(":") and not pseudo):
        raise context.error(f"{path}.header", f"header {key!r} cannot be changed here", "key")
    value = context.template(option.header.value, f"{path}.header.value")
    if option.HasField("append") and context.has(f"{path}.append_action"):
        raise context.error(path, "only one of append, append_action may be set",
                            "append_action")
    enum = option.DESCRIPTOR.fields_by_name["append_action"].enum_type
    action = enum.values_by_number[option.append_action].name
    if option.HasField("append"):
        action = ("APPEND_IF_EXISTS_OR_ADD" if option.append.value
                  else "OVERWRITE_IF_EXISTS_OR_ADD")
    if action not in _APPEND_ACTIONS:  # pragma: no cover - Envoy's enum is closed
        raise context.error(path, f"unknown append_action {action}")
    if key.startswith(":") and not action.startswith("OVERWRITE"):
        raise context.error(
            path, f"a pseudo-header ({key}) has one value: set append_action: "
            "OVERWRITE_IF_EXISTS_OR_ADD or OVERWRITE_IF_EXISTS", "append_action")
    return HeaderMutation(key.lower(), value, action, option.keep_empty_value)


def header_mutations(message: Any, path: str, context: Any
                     ) -> tuple[HeaderMutations, HeaderMutations]:
    """
    ``request_headers_to_add/_remove`` and ``response_headers_to_add/_remove`` of a route,
    virtual host or route configuration.
    """
    result = []
    for side in ("request", "response"):
        adds = header_value_options(getattr(message, f"{side}_headers_to_add"),
                                    f"{path}.{side}_headers_to_add", context)
        removes = tuple(h.lower() for h in getattr(message, f"{side}_headers_to_remove"))
        for index, name in enumerate(removes):
            if name.startswith(":") or name == "host":
                raise context.error(f"{path}.{side}_headers_to_remove[{index}]",
                                    f"header {name!r} cannot be removed")
        result.append(HeaderMutations(adds, removes))
    return result[0], result[1]


def header_value_options(options: Any, path: str, context: Any
                         ) -> tuple[HeaderMutation, ...]:
    """A repeated HeaderValueOption (``*_headers_to_add``) at YAML ``path``."""
    return tuple(header_value_option(option, f"{path}[{index}]", context)
                 for index, option in enumerate(options))


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
    request, response = header_mutations(message, path, context)
    retry = (retry_policy(message.retry_policy, f"{path}.retry_policy", context)
             if message.HasField("retry_policy") else None)
    return VirtualHost(message.name, tuple(message.domains), routes, request, response,
                       retry_policy=retry,
                       rate_limits=rate_limits(message.rate_limits, f"{path}.rate_limits",
                                               context),
                       per_filter_config=per_filter_configs(message, path, context))


def retry_policy(message: Any, path: str, context: Any) -> Any:
    """Envoy's RetryPolicy (route or virtual host) as the router's RetryPolicy."""
    from hbonex.http.retry_policy import RETRY_ON, RetryPolicy

    conditions = frozenset(c.strip() for c in message.retry_on.split(",") if c.strip())
    unknown = sorted(conditions - RETRY_ON)
    if unknown:
        raise context.error(path, f"retry_on {', '.join(unknown)} is not "
                            f"implemented; accepted: {', '.join(sorted(RETRY_ON))}", "retry_on")
    fields: dict[str, Any] = {"retry_on": conditions}
    if message.HasField("num_retries"):
        fields["num_retries"] = message.num_retries.value
    fields["per_try_timeout"] = _seconds(message, "per_try_timeout", 0.0)
    fields["retriable_status_codes"] = frozenset(message.retriable_status_codes)
    if message.HasField("retry_back_off"):
        back_off = message.retry_back_off
        where = f"{path}.retry_back_off"
        base = _seconds(back_off, "base_interval", None)
        if base is None:
            raise context.error(where, "missing required field 'base_interval'")
        if base <= 0:
            raise context.error(f"{where}.base_interval", "must be above 0")
        top = _seconds(back_off, "max_interval", base * 10)
        if top < base:
            raise context.error(f"{where}.max_interval", "must be at least base_interval")
        fields.update(base_interval=base, max_interval=top)
    return RetryPolicy(**fields)


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
    elif kind in ("prefix", "path", "path_separated_prefix"):
        value = getattr(match, kind)
        if kind == "path_separated_prefix" and (not value.startswith("/") or value.endswith("/")
                                                or "?" in value or "#" in value):
            raise context.error(match_path, "path_separated_prefix must start with '/' and "
                                "end without '/', '?' or '#'", kind)
        fields[kind] = value
    else:
        raise context.error(match_path, f"{kind} is not supported; use prefix, path, "
                            "path_separated_prefix, safe_regex or connect_matcher", kind)
    if match.HasField("case_sensitive"):
        fields["case_sensitive"] = match.case_sensitive.value
    fields["headers"] = tuple(_header_matcher(h, f"{match_path}.headers[{i}]", context)
                              for i, h in enumerate(match.headers))
    fields["query_parameters"] = tuple(
        _query_matcher(q, f"{match_path}.query_parameters[{i}]", context)
        for i, q in enumerate(match.query_parameters)
    )
    fields["name"] = message.name
    fields["request_headers"], fields["response_headers"] = header_mutations(message, path,
                                                                             context)
    action = message.WhichOneof("action")
    if action is None:
        raise context.error(path, "one of route, direct_response, redirect is required")
    if action not in ("route", "direct_response", "redirect"):
        raise context.error(path, f"{action} routes are not supported", action)
    config = getattr(message, action)
    config_path = f"{path}.{action}"
    if action == "redirect":
        fields["redirect"] = _redirect(config, config_path, context)
    elif action == "direct_response":
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
        if kind == "weighted_clusters":
            weighted = []
            for index, item in enumerate(config.weighted_clusters.clusters):
                item_path = f"{config_path}.weighted_clusters.clusters[{index}]"
                weight = item.weight.value if item.HasField("weight") else 0
                weighted.append((context.cluster(item.name, item_path, "name"), weight))
            if not weighted or not any(w for _, w in weighted):
                raise context.error(f"{config_path}.weighted_clusters",
                                    "needs at least one cluster with a weight above 0")
            fields["weighted_clusters"] = tuple(weighted)
        elif kind == "cluster_header":
            fields["cluster_header"] = config.cluster_header.lower()
        elif kind in (None, "cluster"):
            fields["cluster"] = context.cluster(config.cluster, config_path, "cluster")
        else:
            raise context.error(config_path, f"{kind} is not supported; use cluster, "
                                "weighted_clusters or cluster_header", kind)
        if config.rate_limits:
            fields["rate_limits"] = rate_limits(config.rate_limits, f"{config_path}.rate_limits",
                                                context)
        if config.HasField("include_vh_rate_limits"):
            fields["include_vh_rate_limits"] = config.include_vh_rate_limits.value
        if config.prefix_rewrite:
            fields["prefix_rewrite"] = config.prefix_rewrite
        if config.HasField("regex_rewrite"):
            rewrite_path = f"{config_path}.regex_rewrite"
            pattern = regex_field(config.regex_rewrite.pattern, f"{rewrite_path}.pattern",
                                  context)
            fields["regex_rewrite"] = (pattern, config.regex_rewrite.substitution)
        host = config.WhichOneof("host_rewrite_specifier")
        if host == "host_rewrite_literal":
            fields["host_rewrite_literal"] = config.host_rewrite_literal
        elif host == "auto_host_rewrite":
            fields["auto_host_rewrite"] = config.auto_host_rewrite.value
        elif host is not None:
            raise context.error(config_path, f"{host} is not supported; use "
                                "host_rewrite_literal or auto_host_rewrite", host)
        upgrades = []
        for upgrade, kind, enabled in upgrade_configs(config.upgrade_configs,
                                                      f"{config_path}.upgrade_configs", context):
            if kind == "connect":
                fields["connect_enabled"] = enabled
                fields["allow_post"] = upgrade.connect_config.allow_post
            else:
                upgrades.append((kind, enabled))
        fields["upgrades"] = tuple(upgrades)
        fields["idle_timeout_set"] = config.HasField("idle_timeout")
        fields["idle_timeout"] = _seconds(config, "idle_timeout", 3600.0)
        fields["timeout"] = _seconds(config, "timeout", None)
        if config.HasField("retry_policy"):
            fields["retry_policy"] = retry_policy(config.retry_policy,
                                                  f"{config_path}.retry_policy", context)
    fields["per_filter_config"] = per_filter_configs(message, path, context)
    return Route(**fields)


def upgrade_configs(configs: Any, path: str, context: Any) -> list[tuple[Any, str, bool]]:
    """
    An ``upgrade_configs`` list (the HCM's or a route's): each entry with its lower-cased
    type and whether it is enabled (Envoy's default: yes).  Any RFC 9110 token is a type, as
    in Envoy; CONNECT is the tunnel, every other type an HTTP/1.1 Upgrade (e.g. websocket).
    """
    result = []
    seen: dict[str, str] = {}
    for index, upgrade in enumerate(configs):
        upgrade_path = f"{path}[{index}]"
        if not upgrade.upgrade_type:
            raise context.error(upgrade_path, "missing required field 'upgrade_type'")
        if not TOKEN.match(upgrade.upgrade_type):
            raise context.error(
                upgrade_path, f"upgrade_type {upgrade.upgrade_type!r} is not an HTTP token "
                "nor token/version (an Upgrade protocol such as websocket, or CONNECT)",
                "upgrade_type")
        kind = upgrade.upgrade_type.lower()
        if kind in seen:
            raise context.error(upgrade_path, f"duplicate upgrade_type {upgrade.upgrade_type!r} "
                                f"(also {seen[kind]}); name each type once", "upgrade_type")
        seen[kind] = upgrade_path
        if (kind != "connect" and "connect_config" in upgrade.DESCRIPTOR.fields_by_name
                and upgrade.HasField("connect_config")):
            raise context.error(upgrade_path, "connect_config is only for upgrade_type "
                                "CONNECT", "connect_config")
        enabled = upgrade.enabled.value if upgrade.HasField("enabled") else True
        result.append((upgrade, kind, enabled))
    return result


_REDIRECT_CODES = {"MOVED_PERMANENTLY": 301, "FOUND": 302, "SEE_OTHER": 303,
                   "TEMPORARY_REDIRECT": 307, "PERMANENT_REDIRECT": 308}


def _redirect(message: Any, path: str, context: Any) -> Redirect:
    scheme = message.WhichOneof("scheme_rewrite_specifier")
    fields: dict[str, Any] = {}
    if scheme == "https_redirect" and message.https_redirect:
        fields["scheme"] = "https"
    elif scheme == "scheme_redirect":
        fields["scheme"] = message.scheme_redirect.lower()
    if message.host_redirect:
        fields["host"] = message.host_redirect
    if message.port_redirect:
        fields["port"] = message.port_redirect
    rewrite = message.WhichOneof("path_rewrite_specifier")
    if rewrite == "path_redirect":
        fields["path"] = message.path_redirect
    elif rewrite == "prefix_rewrite":
        fields["prefix_rewrite"] = message.prefix_rewrite
    elif rewrite is not None:
        raise context.error(path, f"{rewrite} is not supported; use path_redirect or "
                            "prefix_rewrite", rewrite)
    enum = message.DESCRIPTOR.fields_by_name["response_code"].enum_type
    fields["response_code"] = _REDIRECT_CODES[enum.values_by_number[message.response_code].name]
    fields["strip_query"] = message.strip_query
    return Redirect(**fields)


def _query_matcher(message: Any, path: str, context: Any) -> QueryMatcher:
    if not message.name:
        raise context.error(path, "missing required field 'name'")
    kind = message.WhichOneof("query_parameter_match_specifier")
    if kind is None:
        raise context.error(path, "one of string_match, present_match is required")
    if kind == "present_match":
        return QueryMatcher(message.name, present=message.present_match)
    matcher = message.string_match
    where = f"{path}.string_match"
    which = matcher.WhichOneof("match_pattern")
    if which == "safe_regex":
        return QueryMatcher(message.name, regex=regex_field(matcher.safe_regex,
                                                            f"{where}.safe_regex", context),
                            ignore_case=matcher.ignore_case)
    if which in ("exact", "prefix"):
        return QueryMatcher(message.name, ignore_case=matcher.ignore_case,
                            **{which: getattr(matcher, which)})
    raise context.error(where, f"{which} is not supported for query parameters; use exact, "
                        "prefix or safe_regex" if which else "one of exact, prefix, "
                        "safe_regex is required", which)


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
        where = f"{path}.string_match"
        if message.string_match.ignore_case:
            raise context.error(where, "ignore_case is not implemented for header matchers",
                                "ignore_case")
        matcher = string_matcher(message.string_match, where, context)
        fields["regex" if matcher.kind == "safe_regex" else matcher.kind] = matcher.value
    elif kind in ("exact_match", "prefix_match", "suffix_match", "contains_match"):
        fields[kind[: -len("_match")]] = getattr(message, kind)
    else:
        raise context.error(path, f"{kind} is not supported", kind)
    return HeaderMatcher(message.name.lower(), invert=message.invert_match, **fields)


def header_matchers(messages: Any, path: str, context: Any) -> tuple[HeaderMatcher, ...]:
    """A repeated HeaderMatcher (a route's ``match.headers``, a filter's ``headers``)."""
    return tuple(_header_matcher(m, f"{path}[{i}]", context) for i, m in enumerate(messages))


_RATE_LIMIT_ACTIONS = ("request_headers", "generic_key", "remote_address", "destination_cluster",
                       "header_value_match")


def rate_limits(messages: Any, path: str, context: Any) -> tuple[Any, ...]:
    """A repeated RateLimit (a route's, a virtual host's, local_ratelimit's ``rate_limits``)."""
    from hbonex.http import rate_limit_policy as rl

    policies = []
    for index, message in enumerate(messages):
        where = f"{path}[{index}]"
        for field in ("limit", "hits_addend"):
            if message.HasField(field):
                raise context.error(where, f"{field} is not implemented by hbonex (local rate "
                                    "limits take one token per request)", field)
        if message.apply_on_stream_done:
            raise context.error(where, "apply_on_stream_done is not implemented by hbonex "
                                "(requests are limited when they arrive)",
                                "apply_on_stream_done")
        if not message.actions:
            raise context.error(where, "missing required field 'actions'")
        actions: list[Any] = []
        for number, action in enumerate(message.actions):
            action_path = f"{where}.actions[{number}]"
            kind = action.WhichOneof("action_specifier")
            if kind is None:
                raise context.error(action_path, "one action is required: "
                                    + ", ".join(_RATE_LIMIT_ACTIONS))
            if kind not in _RATE_LIMIT_ACTIONS:
                raise context.error(action_path, f"{kind} is not implemented by hbonex; "
                                    "accepted: " + ", ".join(_RATE_LIMIT_ACTIONS), kind)
            config = getattr(action, kind)
            config_path = f"{action_path}.{kind}"
            if kind == "request_headers":
                for field in ("header_name", "descriptor_key"):
                    if not getattr(config, field):
                        raise context.error(config_path, f"missing required field '{field}'")
                actions.append(rl.RequestHeadersAction(config.header_name.lower(),
                                                       config.descriptor_key,
                                                       config.skip_if_absent))
            elif kind == "generic_key":
                if not config.descriptor_value:
                    raise context.error(config_path, "missing required field "
                                        "'descriptor_value'")
                actions.append(rl.GenericKeyAction(config.descriptor_value,
                                                   config.descriptor_key or "generic_key"))
            elif kind == "remote_address":
                actions.append(rl.RemoteAddressAction())
            elif kind == "destination_cluster":
                actions.append(rl.DestinationClusterAction())
            else:
                if not config.descriptor_value:
                    raise context.error(config_path, "missing required field "
                                        "'descriptor_value'")
                if not config.headers:
                    raise context.error(config_path, "missing required field 'headers'")
                actions.append(rl.HeaderValueMatchAction(
                    config.descriptor_value,
                    header_matchers(config.headers, f"{config_path}.headers", context),
                    config.expect_match.value if config.HasField("expect_match") else True,
                    config.descriptor_key or "header_match"))
        stage = message.stage.value if message.HasField("stage") else 0
        policies.append(rl.RateLimitPolicy(tuple(actions), stage, message.disable_key))
    return tuple(policies)


#: The route's header matcher parser, for other users of Envoy's HeaderMatcher (RBAC).
header_matcher = _header_matcher
