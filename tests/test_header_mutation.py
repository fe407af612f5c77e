"""
``envoy.filters.http.header_mutation`` (hbonex.filters.http.header_mutation): ordered request
and response mutations with substitution formats, per-route levels combined as Envoy does,
and the configuration errors.
"""

from __future__ import annotations

from twisted.trial import unittest
from zope.interface.verify import verifyObject

from hbonex.errors import ConfigError
from hbonex.filters.http.header_mutation import (
    HeaderMutationExtension,
    HeaderMutationFilter,
)
from hbonex.http.headers import Headers
from hbonex.http.stream_info import SharedWithUpstream
from hbonex.interfaces import IHTTPFilterPerRouteExtension, IStreamFilter
from tests.http_filter_support import hcm_yaml, load_hcm, run

TYPE = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"
PER_ROUTE = ("type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3."
             "HeaderMutationPerRoute")


def filter_yaml(mutations: str, extra: str = "") -> str:
    body = "\n".join("      " + line for line in mutations.splitlines())
    return (f"- name: hm\n  typed_config:\n    \"@type\": {TYPE}\n{extra}"
            f"    mutations:\n{body}\n")


def per_route(label: str, header: str = "x-level") -> str:
    """A typed_per_filter_config block setting ``header`` to ``label`` both ways."""
    return f"""\
typed_per_filter_config:
  hm:
    "@type": {PER_ROUTE}
    mutations:
      request_mutations:
      - append:
          header: {{key: {header}, value: {label}}}
          append_action: OVERWRITE_IF_EXISTS_OR_ADD
      response_mutations:
      - append:
          header: {{key: {header}, value: {label}}}
          append_action: OVERWRITE_IF_EXISTS_OR_ADD
"""


def request(path: str = "/a", **more: str) -> Headers:
    headers = Headers.of(method="GET", path=path, authority="svc.local", scheme="http")
    for name, value in more.items():
        headers.add(name.replace("_", "-").encode(), value.encode())
    return headers


BASIC = """\
request_mutations:
- append: {header: {key: x-added, value: one}}
- append: {header: {key: x-added, value: two}}
- append: {header: {key: x-over, value: new}, append_action: OVERWRITE_IF_EXISTS_OR_ADD}
- append: {header: {key: x-absent, value: kept}, append_action: ADD_IF_ABSENT}
- append: {header: {key: x-only, value: set}, append_action: OVERWRITE_IF_EXISTS}
- append: {header: {key: x-never, value: set}, append_action: OVERWRITE_IF_EXISTS}
- remove: x-secret
- append: {header: {key: x-copy, value: "%REQ(x-over)%"}}
- append: {header: {key: x-from, value: "%REQ(:AUTHORITY)% %DOWNSTREAM_PEER_URI_SAN%"}}
- append: {header: {key: x-empty, value: "%REQ(x-missing)%"}}
- append: {header: {key: x-kept-empty, value: "%REQ(x-missing)%"}, keep_empty_value: true}
- remove_on_match: {key_matcher: {prefix: x-drop-}}
response_mutations:
- append: {header: {key: x-resp, value: "%RESP(x-upstream)%/%REQ(x-over)%/%RESPONSE_CODE%"}}
- remove: x-upstream
- append: {header: {key: server, value: mutated}, append_action: OVERWRITE_IF_EXISTS_OR_ADD}
"""


class HeaderMutationTests(unittest.TestCase):
    def test_plugin_and_filter_verify(self) -> None:
        extension = HeaderMutationExtension()
        self.assertTrue(verifyObject(IHTTPFilterPerRouteExtension, extension))
        config = load_hcm(hcm_yaml(filter_yaml(BASIC)))
        made = config.http_filters[0]()
        self.assertIsInstance(made, HeaderMutationFilter)
        self.assertTrue(verifyObject(IStreamFilter, made))

    def test_request_and_response_mutations_in_order(self) -> None:
        config = load_hcm(hcm_yaml(filter_yaml(BASIC)))
        upstream, response, _, _ = run(
            config,
            request(x_over="old", x_absent="mine", x_only="old", x_secret="s",
                    x_drop_a="1", x_drop_b="2", x_added="zero"),
            Headers([(b":status", b"201"), (b"x-upstream", b"up")]))
        seen = upstream.request
        assert seen is not None
        self.assertEqual(seen.get_all(b"x-added"), [b"zero", b"one", b"two"])
        self.assertEqual(seen.get_all(b"x-over"), [b"new"])
        self.assertEqual(seen.get(b"x-absent"), b"mine")
        self.assertEqual(seen.get(b"x-only"), b"set")
        self.assertNotIn(b"x-never", seen)
        self.assertNotIn(b"x-secret", seen)
        # %REQ% reads the headers as the earlier mutations left them.
        self.assertEqual(seen.get(b"x-copy"), b"new")
        self.assertEqual(seen.get(b"x-from"),
                         b"svc.local spiffe://cluster.local/ns/a/sa/client")
        # An operator without a value renders empty: not added, unless keep_empty_value.
        self.assertNotIn(b"x-empty", seen)
        self.assertEqual(seen.get(b"x-kept-empty"), b"")
        self.assertNotIn(b"x-drop-a", seen)
        self.assertNotIn(b"x-drop-b", seen)
        self.assertEqual(seen.get(b":path"), b"/a")  # pseudo-headers never match
        self.assertEqual(response.get(b"x-resp"), b"up/new/201")
        self.assertNotIn(b"x-upstream", response)
        self.assertEqual(response.get(b"server"), b"mutated")

    def test_filter_state_and_pseudo_headers(self) -> None:
        mutations = """\
request_mutations:
- append: {header: {key: x-fs, value: "%FILTER_STATE(my.key:PLAIN)%"}}
- append: {header: {key: ":path", value: "/rewritten"}, append_action: OVERWRITE_IF_EXISTS_OR_ADD}
"""
        config = load_hcm(hcm_yaml(filter_yaml(mutations)))
        # The request's filter state (set by a filter before) over the connection's.
        made = [f() for f in config.http_filters]

        class Before(HeaderMutationFilter):
            def decodeHeaders(self, headers: Headers, endStream: bool) -> object:
                self.decoder.streamInfo().filter_state.set_data(
                    "my.key", "from-request", SharedWithUpstream.NONE)
                return super().decodeHeaders(headers, endStream)

        first = Before(made[0].config)
        upstream, _, _, _ = run(config, request(), filters=[first])
        assert upstream.request is not None
        self.assertEqual(upstream.request.get(b"x-fs"), b"from-request")
        self.assertEqual(upstream.request.get(b":path"), b"/rewritten")

    def test_trailers(self) -> None:
        mutations = """\
request_trailers_mutations:
- append: {header: {key: x-req-trailer, value: "%REQ(:METHOD)%"}}
response_trailers_mutations:
- remove: x-gone
"""
        config = load_hcm(hcm_yaml(filter_yaml(mutations)))
        made = config.http_filters[0]()
        upstream, _, _, manager = run(config, request(), filters=[made], end=False)
        trailers = Headers([(b"x-other", b"1")])
        made.decodeTrailers(trailers)
        self.assertEqual(trailers.get(b"x-req-trailer"), b"GET")
        response_trailers = Headers([(b"x-gone", b"1"), (b"x-stays", b"2")])
        made.encodeTrailers(response_trailers)
        self.assertEqual(response_trailers.items(), [(b"x-stays", b"2")])

    def _levels(self, extra: str = "") -> object:
        filter_level = """\
request_mutations:
- append: {header: {key: x-level, value: filter}, append_action: OVERWRITE_IF_EXISTS_OR_ADD}
- append: {header: {key: x-filter, value: "yes"}}
"""
        routes = (
            "- match: {prefix: /route}\n  route: {cluster: backend}\n"
            + "\n".join("  " + line for line in per_route("route").splitlines()) + "\n"
            + "- match: {prefix: /}\n  route: {cluster: backend}\n")
        return load_hcm(hcm_yaml(filter_yaml(filter_level, extra), routes=routes,
                                 vhost=per_route("vhost"), route_config=per_route("config")))

    def test_per_route_levels_most_general_wins_by_default(self) -> None:
        config = self._levels()
        for path, expected in (("/route/x", b"config"), ("/other", b"config")):
            upstream, response, _, _ = run(config, request(path))
            assert upstream.request is not None
            # The filter's own first, then route, virtual host, route configuration.
            self.assertEqual(upstream.request.get(b"x-level"), expected, path)
            self.assertEqual(upstream.request.get(b"x-filter"), b"yes")
            self.assertEqual(response.get(b"x-level"), expected)

    def test_most_specific_header_mutations_wins(self) -> None:
        config = self._levels("    most_specific_header_mutations_wins: true\n")
        for path, expected in (("/route/x", b"route"), ("/other", b"vhost")):
            upstream, response, _, _ = run(config, request(path))
            assert upstream.request is not None
            self.assertEqual(upstream.request.get(b"x-level"), expected, path)
            self.assertEqual(response.get(b"x-level"), expected, path)

    def test_local_reply_gets_response_mutations(self) -> None:
        # A route with a direct response: the encoder mutations still run.
        routes = "- match: {prefix: /}\n  direct_response: {status: 403}\n"
        mutations = ("response_mutations:\n"
                     "- append: {header: {key: x-denied-by, value: proxy}}\n")
        from twisted.internet.task import Clock

        from hbonex.filters.http.router import RouterFilter

        config = load_hcm(hcm_yaml(filter_yaml(mutations), routes=routes))
        made = config.http_filters[0]()
        _, response, sink, _ = run(config, request(), filters=[made, RouterFilter(
            Clock(), lambda c: None)])
        self.assertEqual(response.get(b":status"), b"403")
        self.assertEqual(response.get(b"x-denied-by"), b"proxy")


class RouteLevelMutationTests(unittest.TestCase):
    """The route table's own request_headers_to_add read %REQ% too (the shared code)."""

    def test_route_request_headers_to_add_reads_the_request(self) -> None:
        routes = """\
- match: {prefix: /}
  route: {cluster: backend}
  request_headers_to_add:
  - header: {key: x-copied, value: "%REQ(x-in)%"}
  - header: {key: x-none, value: "%REQ(x-missing)%"}
"""
        config = load_hcm(hcm_yaml("", routes=routes))
        resolved = config.router
        from hbonex.http.connection_manager import route_resolver

        route = route_resolver(resolved)(request(x_in="v"), None)
        headers = request(x_in="v")
        for mutate in route.request_mutations:
            mutate(headers)
        self.assertEqual(headers.get(b"x-copied"), b"v")
        self.assertNotIn(b"x-none", headers)


class HeaderMutationConfigErrorTests(unittest.TestCase):
    def error(self, text: str) -> str:
        return str(self.assertRaises(ConfigError, load_hcm, text))

    WHERE = ("static_resources.listeners[0].filter_chains[0].filters[0].typed_config."
             "http_filters[0].typed_config.mutations")

    def test_errors_name_the_path_and_the_fix(self) -> None:
        cases = [
            ("request_mutations:\n- remove: ':path'\n",
             f"{self.WHERE}.request_mutations[0].remove: header ':path' cannot be removed"),
            ("request_mutations:\n- remove: host\n",
             f"{self.WHERE}.request_mutations[0].remove: header 'host' cannot be removed"),
            ("request_mutations:\n- append: {header: {key: host, value: x}}\n",
             f"{self.WHERE}.request_mutations[0].append.header.key: header 'host' cannot be "
             "changed here"),
            ("request_mutations:\n- append: {header: {key: ':path', value: /x}}\n",
             f"{self.WHERE}.request_mutations[0].append.append_action: a pseudo-header "
             "(:path) has one value: set append_action: OVERWRITE_IF_EXISTS_OR_ADD"),
            ("response_mutations:\n- append: {header: {key: x, value: '%NOPE%'}}\n",
             f"{self.WHERE}.response_mutations[0].append.header.value: unknown substitution "
             "operator %NOPE%"),
            ("request_mutations:\n- {}\n",
             f"{self.WHERE}.request_mutations[0]: one of append, remove, remove_on_match is "
             "required"),
            ("request_mutations:\n- remove_on_match: {}\n",
             f"{self.WHERE}.request_mutations[0].remove_on_match: missing required field "
             "'key_matcher'"),
            ("query_parameter_mutations:\n- remove: q\n",
             f"{self.WHERE}.query_parameter_mutations: query_parameter_mutations "
             "(envoy.extensions.filters.http.header_mutation.v3.Mutations) is known to Envoy "
             "but not implemented by hbonex: query parameters are not changed"),
        ]
        for mutations, expected in cases:
            message = self.error(hcm_yaml(filter_yaml(mutations)))
            self.assertTrue(message.startswith(expected), f"{message!r}\n!= {expected!r}")
            self.assertIn("(line ", message)

    def test_per_route_errors(self) -> None:
        routes = (
            "- match: {prefix: /}\n  route: {cluster: backend}\n"
            + "\n".join("  " + line for line in per_route("x", header="host").splitlines())
            + "\n")
        message = self.error(hcm_yaml(filter_yaml("request_mutations: []\n"), routes=routes))
        self.assertIn("virtual_hosts[0].routes[0].typed_per_filter_config.hm.mutations."
                      "request_mutations[0].append.header.key: header 'host' cannot be "
                      "changed here", message)
