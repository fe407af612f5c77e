"""
Config for a listener's ``filter_chain_matcher`` (``xds.type.matcher.v3.Matcher`` over
Envoy's network inputs, actions naming filter chains) and its listener filters'
``filter_disabled`` (``ListenerFilterChainMatchPredicate``), into hbonex.network.matching and
hbonex.network.listener_predicate objects.  Errors name the YAML path and the fix.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from hbonex.config.schema import message_class, type_name
from hbonex.config.yamlpath import child_path
from hbonex.network.listener_predicate import (
    AllPredicates,
    AnyMatch,
    AnyPredicate,
    DestinationPortRange,
    ListenerPredicate,
    NotPredicate,
)
from hbonex.network.matching import (
    INPUT_NAMES,
    AllOf,
    AnyOf,
    IPMatcher,
    IPRange,
    Matcher,
    MatcherList,
    MatcherTree,
    Not,
    OnMatch,
    Predicate,
    SinglePredicate,
    input_value,
)
from hbonex.tls.transport_sockets import string_matcher

__all__ = ["MatcherBuilder", "listener_predicate"]

INPUTS_PACKAGE = "envoy.extensions.matching.common_inputs.network.v3"
ACTION_TYPE = "google.protobuf.StringValue"
IP_MATCHER_TYPE = "xds.type.matcher.v3.IPMatcher"


def _typed(extension: Any, path: str, context: Any, what: str) -> tuple[str, Any, str]:
    """(full type name, unpacked message, typed_config path) of a TypedExtensionConfig."""
    if not extension.HasField("typed_config"):
        raise context.error(path, f"missing required field 'typed_config' (the {what})")
    full = type_name(extension.typed_config.type_url)
    cls = message_class(full)
    where = child_path(path, "typed_config")
    if cls is None:
        raise context.error(where, f"unknown type {full!r} for the {what}")
    message = cls()
    extension.typed_config.Unpack(message)
    return full, message, where


class MatcherBuilder:
    """
    Builds one listener's ``filter_chain_matcher``; ``chains`` are its filter chains' names
    (each with its YAML path), which the actions must name.
    """

    def __init__(self, chains: dict[str, str], context: Any) -> None:
        self.chains = chains
        self.context = context
        #: The inputs the matcher reads (message names), for the listener to know whether
        #: it must inspect the ClientHello.
        self.inputs: set[str] = set()

    def matcher(self, message: Any, path: str) -> Matcher:
        context = self.context
        kind = message.WhichOneof("matcher_type")
        on_no_match = (self.on_match(message.on_no_match, f"{path}.on_no_match")
                       if message.HasField("on_no_match") else None)
        if kind == "matcher_tree":
            return self.tree(message.matcher_tree, f"{path}.matcher_tree", on_no_match)
        if kind == "matcher_list":
            where = f"{path}.matcher_list"
            entries = []
            if not message.matcher_list.matchers:
                raise context.error(where, "matchers needs at least one entry")
            for index, item in enumerate(message.matcher_list.matchers):
                item_path = f"{where}.matchers[{index}]"
                for field in ("predicate", "on_match"):
                    if not item.HasField(field):
                        raise context.error(item_path, f"missing required field '{field}'")
                entries.append((self.predicate(item.predicate, f"{item_path}.predicate"),
                                self.on_match(item.on_match, f"{item_path}.on_match")))
            return MatcherList(tuple(entries), on_no_match)
        raise context.error(path, "one of matcher_tree, matcher_list is required")

    def on_match(self, message: Any, path: str) -> OnMatch:
        kind = message.WhichOneof("on_match")
        if kind == "matcher":
            return OnMatch(matcher=self.matcher(message.matcher, f"{path}.matcher"))
        if kind == "action":
            return OnMatch(action=self.action(message.action, f"{path}.action"))
        raise self.context.error(path, "one of matcher, action is required")

    def action(self, message: Any, path: str) -> str:
        full, value, where = _typed(message, path, self.context, "action")
        if full != ACTION_TYPE:
            raise self.context.error(
                child_path(where, "@type"), f"unknown filter chain matcher action {full!r}; "
                f"an action names a filter chain: '@type': type.googleapis.com/{ACTION_TYPE} "
                "with value: <the chain's name>")
        name = value.value
        if name not in self.chains:
            known = ", ".join(repr(n) for n in self.chains) or "none"
            raise self.context.error(
                child_path(where, "value"), f"no filter chain is named {name!r} (the "
                f"listener's chains: {known}); name a chain of filter_chains, or add one "
                "with that name")
        return str(name)

    def input(self, message: Any, path: str) -> Any:
        full, value, where = _typed(message, path, self.context, "input")
        package, _, name = full.rpartition(".")
        if package != INPUTS_PACKAGE or name not in INPUT_NAMES:
            known = ", ".join(INPUT_NAMES)
            raise self.context.error(
                child_path(where, "@type"), f"{full!r} is not an input hbonex's filter chain "
                f"matcher reads; use one of {INPUTS_PACKAGE}.{{{known}}}")
        if name == "FilterStateInput" and not value.key:
            raise self.context.error(where, "missing required field 'key'")
        self.inputs.add(name)
        return input_value(name, getattr(value, "key", ""))

    def tree(self, message: Any, path: str, on_no_match: OnMatch | None) -> MatcherTree:
        context = self.context
        if not message.HasField("input"):
            raise context.error(path, "missing required field 'input'")
        read = self.input(message.input, f"{path}.input")
        kind = message.WhichOneof("tree_type")
        if kind in ("exact_match_map", "prefix_match_map"):
            where = f"{path}.{kind}"
            entries = getattr(message, kind).map
            if not entries:
                raise context.error(where, "map needs at least one entry")
            table = {key: self.on_match(entries[key], child_path(f"{where}.map", key))
                     for key in sorted(entries)}
            if kind == "exact_match_map":
                return MatcherTree(read, exact=table, on_no_match=on_no_match)
            return MatcherTree(read, prefix=table, on_no_match=on_no_match)
        if kind == "custom_match":
            where = f"{path}.custom_match"
            full, value, typed = _typed(message.custom_match, where, context, "custom matcher")
            if full != IP_MATCHER_TYPE:
                raise context.error(child_path(typed, "@type"), f"custom matcher {full!r} is "
                                    f"not supported; use {IP_MATCHER_TYPE}")
            return MatcherTree(read, ip=self.ip_matcher(value, typed), on_no_match=on_no_match)
        raise context.error(path, "one of exact_match_map, prefix_match_map, custom_match is "
                            "required")

    def ip_matcher(self, message: Any, path: str) -> IPMatcher:
        ranges = []
        for index, item in enumerate(message.range_matchers):
            where = f"{path}.range_matchers[{index}]"
            if not item.ranges:
                raise self.context.error(where, "ranges needs at least one CIDR range")
            if not item.HasField("on_match"):
                raise self.context.error(where, "missing required field 'on_match'")
            networks = tuple(_cidr(r, f"{where}.ranges[{i}]", self.context)
                             for i, r in enumerate(item.ranges))
            ranges.append(IPRange(networks, self.on_match(item.on_match, f"{where}.on_match"),
                                  item.exclusive))
        return IPMatcher(tuple(ranges))

    def predicate(self, message: Any, path: str) -> Predicate:
        context = self.context
        kind = message.WhichOneof("match_type")
        if kind == "single_predicate":
            single = message.single_predicate
            where = f"{path}.single_predicate"
            if not single.HasField("input"):
                raise context.error(where, "missing required field 'input'")
            read = self.input(single.input, f"{where}.input")
            if single.WhichOneof("matcher") != "value_match":
                raise context.error(where, "a single_predicate needs value_match (custom_match "
                                    "is not supported)")
            return SinglePredicate(read, string_matcher(single.value_match,
                                                        f"{where}.value_match", context))
        if kind in ("or_matcher", "and_matcher"):
            where = f"{path}.{kind}"
            items = getattr(message, kind).predicate
            if len(items) < 2:
                raise context.error(where, "predicate needs at least two entries")
            parts = tuple(self.predicate(p, f"{where}.predicate[{i}]")
                          for i, p in enumerate(items))
            return AnyOf(parts) if kind == "or_matcher" else AllOf(parts)
        if kind == "not_matcher":
            return Not(self.predicate(message.not_matcher, f"{path}.not_matcher"))
        raise context.error(path, "one of single_predicate, or_matcher, and_matcher, "
                            "not_matcher is required")


def _cidr(message: Any, path: str, context: Any) -> Any:
    # xds.core.v3.CidrRange: prefix_len defaults to 0 (as Envoy reads it).
    length = message.prefix_len.value if message.HasField("prefix_len") else 0
    try:
        ip = ipaddress.ip_address(message.address_prefix)
    except ValueError:
        raise context.error(path, f"malformed IP address {message.address_prefix!r}",
                            "address_prefix")
    if length > ip.max_prefixlen:
        raise context.error(child_path(path, "prefix_len"), f"must be at most "
                            f"{ip.max_prefixlen} for {ip}, got {length}")
    return ipaddress.ip_network(f"{ip}/{length}", strict=False)


def listener_predicate(message: Any, path: str, context: Any) -> ListenerPredicate:
    """A ``ListenerFilterChainMatchPredicate`` (a listener filter's ``filter_disabled``)."""
    kind = message.WhichOneof("rule")
    if kind == "any_match":
        if not message.any_match:
            raise context.error(path, "any_match must be true", "any_match")
        return AnyMatch()
    if kind == "destination_port_range":
        where = f"{path}.destination_port_range"
        start, end = message.destination_port_range.start, message.destination_port_range.end
        if not 0 <= start < end <= 65536:
            raise context.error(where, f"start must be below end, both within 0..65536 "
                                f"(got [{start}, {end}))")
        return DestinationPortRange(start, end)
    if kind in ("and_match", "or_match"):
        where = f"{path}.{kind}"
        rules = getattr(message, kind).rules
        if len(rules) < 2:
            raise context.error(where, "rules needs at least two entries")
        parts = tuple(listener_predicate(r, f"{where}.rules[{i}]", context)
                      for i, r in enumerate(rules))
        return AllPredicates(parts) if kind == "and_match" else AnyPredicate(parts)
    if kind == "not_match":
        return NotPredicate(listener_predicate(message.not_match, f"{path}.not_match", context))
    raise context.error(path, "one of any_match, destination_port_range, and_match, or_match, "
                        "not_match is required")
