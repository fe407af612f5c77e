"""
Choosing a filter chain after the listener filters: a listener's ``filter_chain_matcher``
(each network input, exact / prefix maps, IP ranges, lists of predicates, nesting,
on_no_match, default_filter_chain), listener filters' ``filter_disabled``, and the errors
their configuration gives.
"""

from __future__ import annotations

from typing import Any

from hbonex.http.stream_info import FilterState
from hbonex.network.listener import ConnectionInfo, Listener
from hbonex.network.listener_predicate import (
    AllPredicates,
    AnyMatch,
    AnyPredicate,
    DestinationPortRange,
    NotPredicate,
)
from tests.test_config import Base

INPUTS = "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3."
ACTION = "type.googleapis.com/google.protobuf.StringValue"
IP_MATCHER = "type.googleapis.com/xds.type.matcher.v3.IPMatcher"
TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


def chain(name: str, extra: str = "") -> str:
    return f"""\
    - name: {name}
{extra}      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": {TCP_PROXY}
          stat_prefix: {name}
          cluster: c
"""


def config(matcher: str, chains: tuple[str, ...] = ("a", "b", "c"), extra: str = "",
           listener_filters: str = "") -> str:
    body = "".join(chain(n) for n in chains)
    return f"""\
static_resources:
  listeners:
  - name: l
    address:
      socket_address: {{address: 127.0.0.1, port_value: 0}}
{listener_filters}    filter_chain_matcher:
{matcher}    filter_chains:
{body}{extra}  clusters:
  - name: c
    load_assignment:
      cluster_name: c
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: 1}}
"""


def action(name: str, indent: int) -> str:
    pad = " " * indent
    return (f"{pad}action:\n{pad}  name: n\n{pad}  typed_config:\n"
            f"{pad}    '@type': {ACTION}\n{pad}    value: {name}\n")


def tree(input_name: str, kind: str, entries: dict[str, str], indent: int = 6,
         input_extra: str = "", on_no_match: str = "") -> str:
    pad = " " * indent
    text = (f"{pad}matcher_tree:\n{pad}  input:\n{pad}    name: i\n{pad}    typed_config:\n"
            f"{pad}      '@type': {INPUTS}{input_name}\n")
    if input_extra:
        text += f"{pad}      {input_extra}\n"
    text += f"{pad}  {kind}:\n{pad}    map:\n"
    for key, target in entries.items():
        text += f"{pad}      \"{key}\":\n" + action(target, indent + 8)
    if on_no_match:
        text += f"{pad}on_no_match:\n" + action(on_no_match, indent + 2)
    return text


def info(**kw: Any) -> ConnectionInfo:
    fields: dict[str, Any] = {"listenerName": "l", "remoteAddress": "10.0.0.9:40000",
                              "localAddress": "10.0.0.1:80"}
    fields.update(kw)
    return ConnectionInfo(**fields)


class MatcherTests(Base):
    def listener(self, text: str) -> Listener:
        loaded = self.load(text)
        listener: Listener = loaded.listeners[0].listener
        return listener

    def pick(self, listener: Listener, connection: ConnectionInfo) -> str | None:
        found = listener.find_chain(connection)
        return found.name if found is not None else None

    def test_each_input(self) -> None:
        state = FilterState()
        state.set_data("k", "blue")
        cases: list[tuple[str, str, ConnectionInfo, ConnectionInfo, str]] = [
            ("DestinationIPInput", "10.0.0.1", info(), info(localAddress="10.0.0.2:80"), ""),
            ("DestinationPortInput", "80", info(), info(localAddress="10.0.0.1:81"), ""),
            ("SourceIPInput", "10.0.0.9", info(), info(remoteAddress="10.0.0.8:1"), ""),
            ("SourcePortInput", "40000", info(), info(remoteAddress="10.0.0.9:1"), ""),
            ("DirectSourceIPInput", "10.0.0.9",
             info(directRemoteAddress="10.0.0.9:5", remoteAddress="1.1.1.1:1"),
             info(directRemoteAddress="1.1.1.1:1", remoteAddress="10.0.0.9:5"), ""),
            ("ServerNameInput", "x.example", info(requestedServerName="x.example"),
             info(requestedServerName="y.example"), ""),
            ("TransportProtocolInput", "tls", info(transportProtocol="tls"),
             info(transportProtocol="raw_buffer"), ""),
            ("ApplicationProtocolInput", "'h2c'", info(requestedApplicationProtocols=("h2c",)),
             info(requestedApplicationProtocols=("http/1.1",)), ""),
            ("FilterStateInput", "blue", info(filter_state=state), info(), "key: k"),
        ]
        for name, key, hit, miss, extra in cases:
            listener = self.listener(config(
                tree(name, "exact_match_map", {key: "a"}, input_extra=extra,
                     on_no_match="b")))
            self.assertEqual((name, self.pick(listener, hit)), (name, "a"))
            self.assertEqual((name, self.pick(listener, miss)), (name, "b"))

    def test_application_protocols_are_quoted_and_joined(self) -> None:
        listener = self.listener(config(tree("ApplicationProtocolInput", "exact_match_map",
                                             {"'h2','http/1.1'": "a"})))
        self.assertEqual(self.pick(listener, info(
            requestedApplicationProtocols=("h2", "http/1.1"))), "a")

    def test_no_value_takes_on_no_match(self) -> None:
        listener = self.listener(config(tree("DestinationIPInput", "exact_match_map",
                                             {"10.0.0.1": "a"}, on_no_match="c")))
        # An internal listener's address is not an IP: the input has no value.
        self.assertEqual(self.pick(listener, info(localAddress="envoy://inner/")), "c")

    def test_no_match_without_default_is_no_chain(self) -> None:
        listener = self.listener(config(tree("DestinationPortInput", "exact_match_map",
                                             {"80": "a"})))
        self.assertIsNone(self.pick(listener, info(localAddress="10.0.0.1:81")))

    def test_default_filter_chain(self) -> None:
        default = """\
    default_filter_chain:
      name: fallback
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": """ + TCP_PROXY + """
          stat_prefix: fallback
          cluster: c
"""
        listener = self.listener(config(tree("DestinationPortInput", "exact_match_map",
                                             {"80": "a"}), extra=default))
        self.assertEqual(self.pick(listener, info(localAddress="10.0.0.1:81")), "fallback")
        self.assertEqual(self.pick(listener, info()), "a")

    def test_prefix_map_longest_wins_and_falls_back(self) -> None:
        nested = tree("DestinationPortInput", "exact_match_map", {"443": "c"}, indent=16)
        text = f"""\
      matcher_tree:
        input:
          name: sni
          typed_config: {{'@type': {INPUTS}ServerNameInput}}
        prefix_match_map:
          map:
            "api.":
{action("a", 14)}            "api.v2.":
              matcher:
{nested}            "api.v3.":
{action("b", 14)}"""
        listener = self.listener(config(text))
        self.assertEqual(self.pick(listener, info(requestedServerName="api.v3.x")), "b")
        self.assertEqual(self.pick(listener, info(requestedServerName="api.v2.x",
                                                  localAddress="10.0.0.1:443")), "c")
        # The longest prefix's nested matcher misses: the next shorter prefix is used.
        self.assertEqual(self.pick(listener, info(requestedServerName="api.v2.x")), "a")
        self.assertIsNone(self.pick(listener, info(requestedServerName="www.x")))

    def ip_listener(self, exclusive: bool) -> Listener:
        nested = tree("DestinationPortInput", "exact_match_map", {"80": "b"}, indent=18)
        text = f"""\
      matcher_tree:
        input:
          name: ip
          typed_config: {{'@type': {INPUTS}DestinationIPInput}}
        custom_match:
          name: ip
          typed_config:
            '@type': {IP_MATCHER}
            range_matchers:
            - ranges: [{{address_prefix: 10.0.0.0, prefix_len: 8}}]
              exclusive: {str(exclusive).lower()}
              on_match:
{action("a", 16)}            - ranges: [{{address_prefix: 10.1.2.0, prefix_len: 24}}]
              on_match:
                matcher:
{nested}            - ranges:
              - {{address_prefix: "2001:db8::", prefix_len: 32}}
              - {{address_prefix: "2001:db8:1::7", prefix_len: 128}}
              on_match:
{action("c", 16)}"""
        return self.listener(config(text))

    def test_ip_ranges(self) -> None:
        listener = self.ip_listener(exclusive=False)
        self.assertEqual(self.pick(listener, info(localAddress="10.9.9.9:80")), "a")
        self.assertEqual(self.pick(listener, info(localAddress="10.1.2.3:80")), "b")
        # The /24's nested matcher misses: the less specific, non-exclusive /8 applies.
        self.assertEqual(self.pick(listener, info(localAddress="10.1.2.3:81")), "a")
        self.assertEqual(self.pick(listener, info(localAddress="[2001:db8:1::7]:80")), "c")
        self.assertEqual(self.pick(listener, info(localAddress="[2001:db8:ff::1]:80")), "c")
        self.assertIsNone(self.pick(listener, info(localAddress="[2001:db9::1]:80")))
        self.assertIsNone(self.pick(listener, info(localAddress="11.0.0.1:80")))

    def test_exclusive_range_is_not_a_fallback(self) -> None:
        listener = self.ip_listener(exclusive=True)
        self.assertEqual(self.pick(listener, info(localAddress="10.9.9.9:80")), "a")
        self.assertIsNone(self.pick(listener, info(localAddress="10.1.2.3:81")))

    def test_nested_miss_takes_the_outer_on_no_match(self) -> None:
        nested = tree("DestinationPortInput", "exact_match_map", {"80": "a"}, indent=16)
        text = f"""\
      matcher_tree:
        input:
          name: ip
          typed_config: {{'@type': {INPUTS}DestinationIPInput}}
        exact_match_map:
          map:
            "10.0.0.1":
              matcher:
{nested}      on_no_match:
{action("c", 8)}"""
        listener = self.listener(config(text))
        self.assertEqual(self.pick(listener, info()), "a")
        self.assertEqual(self.pick(listener, info(localAddress="10.0.0.1:81")), "c")

    def test_matcher_list_predicates(self) -> None:
        def single(input_name: str, match: str) -> str:
            return (f"single_predicate: {{input: {{name: i, typed_config: "
                    f"{{'@type': {INPUTS}{input_name}}}}}, value_match: {match}}}")

        text = f"""\
      matcher_list:
        matchers:
        - predicate:
            and_matcher:
              predicate:
              - {single("DestinationPortInput", "{exact: '80'}")}
              - {single("ServerNameInput", "{suffix: .EXAMPLE, ignore_case: true}")}
          on_match:
{action("a", 12)}        - predicate:
            or_matcher:
              predicate:
              - {single("SourceIPInput", "{prefix: '192.168.'}")}
              - not_matcher: {{{single("TransportProtocolInput", "{exact: raw_buffer}")}}}
          on_match:
{action("b", 12)}      on_no_match:
{action("c", 8)}"""
        listener = self.listener(config(text))
        self.assertEqual(self.pick(listener, info(requestedServerName="x.example")), "a")
        self.assertEqual(self.pick(listener, info(requestedServerName="x.other",
                                                  transportProtocol="tls")), "b")
        self.assertEqual(self.pick(listener, info(remoteAddress="192.168.1.1:5",
                                                  transportProtocol="raw_buffer")), "b")
        self.assertEqual(self.pick(listener, info(transportProtocol="raw_buffer")), "c")

    def test_filter_chain_match_is_ignored_with_a_matcher(self) -> None:
        text = config(tree("DestinationPortInput", "exact_match_map", {"80": "a"}),
                      chains=())
        text = text.replace("    filter_chains:\n", "    filter_chains:\n" + chain(
            "a", "      filter_chain_match: {destination_port: 9}\n") + chain(
            "b", "      filter_chain_match: {destination_port: 9}\n"))
        listener = self.listener(text)  # the same filter_chain_match twice is no error
        self.assertEqual(self.pick(listener, info()), "a")

    def test_tls_inputs_make_the_listener_inspect(self) -> None:
        plain = self.listener(config(tree("DestinationPortInput", "exact_match_map",
                                          {"80": "a"})))
        sni = self.listener(config(tree("ServerNameInput", "exact_match_map", {"x": "a"})))
        self.assertFalse(plain.needs_inspection)
        self.assertTrue(plain.needs_filter_phase)
        self.assertTrue(sni.needs_inspection)


class MatcherConfigErrorTests(Base):
    def test_unknown_input(self) -> None:
        error = self.error(config(tree("SourceTypeInput", "exact_match_map", {"x": "a"})))
        self.assertIn("filter_chain_matcher.matcher_tree.input.typed_config.@type: "
                      "'envoy.extensions.matching.common_inputs.network.v3.SourceTypeInput' "
                      "is not an input hbonex's filter chain matcher reads; use one of", error)

    def test_unknown_action(self) -> None:
        text = config(tree("DestinationPortInput", "exact_match_map", {"80": "a"})).replace(
            ACTION, "type.googleapis.com/google.protobuf.UInt32Value").replace(
            "value: a", "value: 1")
        error = self.error(text)
        self.assertIn("matcher_tree.exact_match_map.map[\"80\"].action.typed_config.@type: unknown "
                      "filter chain matcher action 'google.protobuf.UInt32Value'; an action "
                      "names a filter chain", error)

    def test_action_naming_no_chain(self) -> None:
        error = self.error(config(tree("DestinationPortInput", "exact_match_map",
                                       {"80": "zzz"})))
        self.assertIn("exact_match_map.map[\"80\"].action.typed_config.value: no filter chain is "
                      "named 'zzz' (the listener's chains: 'a', 'b', 'c'); name a chain of "
                      "filter_chains, or add one with that name", error)

    def test_chains_need_names(self) -> None:
        text = config(tree("DestinationPortInput", "exact_match_map", {"80": "a"}),
                      chains=("a", "b")).replace("    - name: b\n", "    -\n")
        error = self.error(text)
        self.assertIn("listeners[0].filter_chains[1]: a filter chain needs a name when the "
                      "listener has a filter_chain_matcher", error)

    def test_duplicate_chain_names(self) -> None:
        error = self.error(config(tree("DestinationPortInput", "exact_match_map",
                                       {"80": "a"}), chains=("a", "a")))
        self.assertIn("filter_chains[1].name: filter chain name 'a' is also used by "
                      "static_resources.listeners[0].filter_chains[0]", error)

    def test_custom_matcher_must_be_an_ip_matcher(self) -> None:
        text = config(f"""\
      matcher_tree:
        input: {{name: i, typed_config: {{'@type': {INPUTS}DestinationIPInput}}}}
        custom_match:
          name: other
          typed_config: {{'@type': {ACTION}, value: x}}
""")
        error = self.error(text)
        self.assertIn("matcher_tree.custom_match.typed_config.@type: custom matcher "
                      "'google.protobuf.StringValue' is not supported; use "
                      "xds.type.matcher.v3.IPMatcher", error)

    def test_bad_cidr(self) -> None:
        text = config(f"""\
      matcher_tree:
        input: {{name: i, typed_config: {{'@type': {INPUTS}DestinationIPInput}}}}
        custom_match:
          name: ip
          typed_config:
            '@type': {IP_MATCHER}
            range_matchers:
            - ranges: [{{address_prefix: 10.0.0.0, prefix_len: 33}}]
              on_match:
{action("a", 16)}""")
        error = self.error(text)
        self.assertIn("range_matchers[0].ranges[0].prefix_len: must be at most 32 for "
                      "10.0.0.0, got 33", error)

    def test_keep_matching_is_refused(self) -> None:
        text = config(tree("DestinationPortInput", "exact_match_map", {"80": "a"})).replace(
            "              action:\n", "              keep_matching: true\n"
            "              action:\n", 1)
        error = self.error(text)
        self.assertIn("keep_matching (xds.type.matcher.v3.Matcher.OnMatch) is known to Envoy "
                      "but not implemented by hbonex: the first match chooses the filter "
                      "chain", error)

    def test_filter_disabled_on_tls_inspector(self) -> None:
        filters = """\
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      filter_disabled: {any_match: true}
"""
        error = self.error(config(tree("DestinationPortInput", "exact_match_map",
                                       {"80": "a"}), listener_filters=filters))
        self.assertIn("listener_filters[0].filter_disabled: filter_disabled is not supported "
                      "on envoy.filters.listener.tls_inspector", error)

    def test_bad_port_range(self) -> None:
        filters = """\
    listener_filters:
    - name: envoy.filters.listener.original_dst
      filter_disabled: {destination_port_range: {start: 90, end: 80}}
"""
        error = self.error(config(tree("DestinationPortInput", "exact_match_map",
                                       {"80": "a"}), listener_filters=filters))
        self.assertIn("listener_filters[0].filter_disabled.destination_port_range: start must "
                      "be below end", error)


class ListenerPredicateTests(Base):
    def test_predicates(self) -> None:
        port_80 = DestinationPortRange(80, 81)
        self.assertTrue(AnyMatch().matches(info()))
        self.assertTrue(port_80.matches(info()))
        self.assertFalse(port_80.matches(info(localAddress="10.0.0.1:81")))
        self.assertFalse(port_80.matches(info(localAddress="envoy://inner/")))
        self.assertTrue(DestinationPortRange(1, 65536).matches(info(
            localAddress="[::1]:65535")))
        self.assertFalse(NotPredicate(port_80).matches(info()))
        self.assertFalse(AllPredicates((port_80, NotPredicate(AnyMatch()))).matches(info()))
        self.assertTrue(AnyPredicate((NotPredicate(AnyMatch()), port_80)).matches(info()))

    def test_config(self) -> None:
        filters = """\
    listener_filters:
    - name: envoy.filters.listener.http_inspector
      filter_disabled:
        or_match:
          rules:
          - destination_port_range: {start: 1, end: 80}
          - not_match: {and_match: {rules: [{any_match: true}, {any_match: true}]}}
"""
        loaded = self.load(config(tree("DestinationPortInput", "exact_match_map",
                                       {"80": "a"}), listener_filters=filters))
        [entry] = loaded.listeners[0].listener.listener_filters
        self.assertEqual(entry.name, "envoy.filters.listener.http_inspector")
        self.assertFalse(entry.disabled.matches(info()))
        self.assertTrue(entry.disabled.matches(info(localAddress="10.0.0.1:79")))
