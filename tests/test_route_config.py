"""
Route configuration errors name the YAML path (and line), for the route features of the
HTTP router: weighted clusters, cluster_header, redirects, rewrites, header changes, query
and path matchers.
"""

from __future__ import annotations

import textwrap

from tests.test_config import Base

HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)


def config(routes: str, vhost_extra: str = "") -> str:
    routes = textwrap.indent(textwrap.dedent(routes).strip("\n"), " " * 14)
    return f"""\
static_resources:
  listeners:
  - name: http
    address: {{socket_address: {{address: 127.0.0.1, port_value: 8000}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM_TYPE}
          stat_prefix: h
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              {vhost_extra}
              routes:
{routes}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 1}}}}}}
"""


ROUTES = ("static_resources.listeners[0].filter_chains[0].filters[0].typed_config."
          "route_config.virtual_hosts[0]")


class RouteFeatureConfigTests(Base):
    def test_everything_loads(self) -> None:
        self.load(config("""
            - match: {prefix: /old}
              redirect: {https_redirect: true, path_redirect: /new, response_code: SEE_OTHER}
            - match:
                path_separated_prefix: /svc
                case_sensitive: false
                query_parameters:
                - {name: a, present_match: true}
                - name: b
                  string_match: {prefix: x, ignore_case: true}
              route:
                cluster: backend
                prefix_rewrite: /api
                host_rewrite_literal: internal
              request_headers_to_add:
              - header: {key: x-a, value: "%DOWNSTREAM_REMOTE_ADDRESS%"}
                append_action: ADD_IF_ABSENT
              response_headers_to_remove: [server]
            - match: {prefix: /w}
              route:
                weighted_clusters:
                  clusters: [{name: backend, weight: 2}]
            - match: {prefix: /h}
              route: {cluster_header: x-cluster, auto_host_rewrite: true}
            """, vhost_extra="request_headers_to_remove: [x-internal]"))

    def test_weighted_clusters_need_a_weight(self) -> None:
        error = self.error(config("""
            - match: {prefix: /}
              route:
                weighted_clusters:
                  clusters: [{name: backend, weight: 0}]
            """))
        self.assertIn(f"{ROUTES}.routes[0].route.weighted_clusters", error)
        self.assertIn("weight above 0", error)

    def test_unknown_weighted_cluster(self) -> None:
        error = self.error(config("""
            - match: {prefix: /}
              route:
                weighted_clusters:
                  clusters: [{name: nope, weight: 1}]
            """))
        self.assertIn(f"{ROUTES}.routes[0].route.weighted_clusters.clusters[0]", error)
        self.assertIn("nope", error)

    def test_retry_policy(self) -> None:
        from hbonex.http.retry_policy import RetryPolicy

        loaded = self.load(config("""
            - match: {prefix: /}
              route:
                cluster: backend
                retry_policy:
                  retry_on: "5xx, retriable-status-codes"
                  num_retries: 3
                  per_try_timeout: 2s
                  retriable_status_codes: [418]
                  retry_back_off: {base_interval: 0.1s}
            """, vhost_extra="retry_policy: {retry_on: reset}"))
        vhost = loaded.listeners[0].chains[0].filters[0].parsed.router.virtual_hosts[0]
        self.assertEqual(vhost.routes[0].retry_policy, RetryPolicy(
            retry_on=frozenset({"5xx", "retriable-status-codes"}), num_retries=3,
            per_try_timeout=2.0, retriable_status_codes=frozenset({418}), base_interval=0.1,
            max_interval=1.0))
        self.assertEqual(vhost.retry_policy.retry_on, frozenset({"reset"}))
        error = self.error(config("""
            - match: {prefix: /}
              route: {cluster: backend, retry_policy: {retry_on: "5xx,envoy-ratelimited"}}
            """))
        self.assertIn(f"{ROUTES}.routes[0].route.retry_policy.retry_on: retry_on "
                      "envoy-ratelimited is not implemented; accepted: 5xx, ", error)
        error = self.error(config("""
            - match: {prefix: /}
              route:
                cluster: backend
                retry_policy: {retry_on: 5xx, retry_back_off: {base_interval: 1s,
                                                               max_interval: 0.5s}}
            """))
        self.assertIn("retry_policy.retry_back_off.max_interval: must be at least "
                      "base_interval", error)

    def test_bad_path_separated_prefix(self) -> None:
        error = self.error(config("""
            - match: {path_separated_prefix: /api/}
              route: {cluster: backend}
            """))
        self.assertIn(f"{ROUTES}.routes[0].match", error)
        self.assertIn("path_separated_prefix", error)

    def test_pseudo_headers_cannot_be_changed(self) -> None:
        error = self.error(config("""
            - match: {prefix: /}
              route: {cluster: backend}
              request_headers_to_remove: [":path"]
            """))
        self.assertIn(f"{ROUTES}.routes[0].request_headers_to_remove[0]", error)
        error = self.error(config("""
            - match: {prefix: /}
              route: {cluster: backend}
              response_headers_to_add:
              - header: {key: ":status", value: "500"}
            """))
        self.assertIn(f"{ROUTES}.routes[0].response_headers_to_add[0].header", error)

    def test_unknown_operator_in_a_header_value(self) -> None:
        error = self.error(config("""
            - match: {prefix: /}
              route: {cluster: backend}
              request_headers_to_add:
              - header: {key: x-a, value: "%NOT_AN_OPERATOR%"}
            """))
        self.assertIn(f"{ROUTES}.routes[0].request_headers_to_add[0].header.value", error)
        self.assertIn("%NOT_AN_OPERATOR%", error)
