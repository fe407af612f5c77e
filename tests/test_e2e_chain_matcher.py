"""
Istio's waypoint ``main_internal`` end to end, in a real ``twistd hbone-server --config``
process: a CONNECT to an HCM whose set_filter_state stores the target reaches an internal
listener with ``original_dst`` and ``http_inspector``, and its ``filter_chain_matcher`` sends
the restored destination 127.0.0.1:<A> to an HCM chain when the bytes are HTTP and to a
tcp_proxy chain when they are not, and 127.0.0.1:<B> to another tcp_proxy chain whatever the
bytes.  Payloads hashed at both ends.
"""

from __future__ import annotations

from pathlib import Path

from tests.faults_support import start_yaml_twistd
from tests.support import exchange, pseudorandom, sha256, start_echo, wait_until
from tests.test_e2e_configs import INTERNAL_LISTENER_EXTENSION
from tests.test_e2e_hcm import HCM_TYPE, json_records
from tests.test_e2e_original_dst import PASSTHROUGH_CLUSTER, TCP_PROXY_TYPE
from tests.test_e2e_tunnel import E2ETestCase

HTTP_INSPECTOR_TYPE = ("type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3."
                       "HttpInspector")
INPUTS = "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3."


def _action(name: str) -> str:
    return ("{action: {name: " + name + ", typed_config: {'@type': "
            "type.googleapis.com/google.protobuf.StringValue, value: " + name + "}}}")


def _tcp_chain(name: str, log: str) -> str:
    return f"""\
    - name: {name}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": {TCP_PROXY_TYPE}
          stat_prefix: {name}
          cluster: passthrough
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {log}
              log_format:
                json_format:
                  chain: {name}
                  local: "%DOWNSTREAM_LOCAL_ADDRESS%"
                  up: "%BYTES_RECEIVED%"
"""


def config(port_a: int, port_b: int, log: Path) -> str:
    matcher = f"""\
    filter_chain_matcher:
      matcher_tree:
        input: {{name: ip, typed_config: {{'@type': {INPUTS}DestinationIPInput}}}}
        custom_match:
          name: ip
          typed_config:
            '@type': type.googleapis.com/xds.type.matcher.v3.IPMatcher
            range_matchers:
            - ranges: [{{address_prefix: 127.0.0.1, prefix_len: 32}}]
              on_match:
                matcher:
                  matcher_tree:
                    input: {{name: port, typed_config: {{'@type': {INPUTS}DestinationPortInput}}}}
                    exact_match_map:
                      map:
                        "{port_a}":
                          matcher:
                            matcher_tree:
                              input:
                                name: protocol
                                typed_config: {{'@type': {INPUTS}ApplicationProtocolInput}}
                              exact_match_map:
                                map:
                                  "'http/1.1'": {_action("http_a")}
                            on_no_match: {_action("tcp_a")}
                        "{port_b}": {_action("tcp_b")}
"""
    return INTERNAL_LISTENER_EXTENSION + f"""\
static_resources:
  listeners:
  - name: connect_terminate
    address:
      socket_address: {{address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM_TYPE}
          stat_prefix: connect_terminate
          upgrade_configs: [{{upgrade_type: CONNECT}}]
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{connect_matcher: {{}}}}
                route:
                  cluster: main_internal
                  upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{}}}}]
          http_filters:
          - name: envoy.filters.http.set_filter_state
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config
              on_request_headers:
              - object_key: envoy.filters.listener.original_dst.local_ip
                format_string: {{text_format_source: {{inline_string: "%REQ(:AUTHORITY)%"}}}}
                shared_with_upstream: ONCE
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  - name: main_internal
    internal_listener: {{}}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst
    - name: envoy.filters.listener.http_inspector
      typed_config:
        "@type": {HTTP_INSPECTOR_TYPE}
{matcher}    filter_chains:
    - name: http_a
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM_TYPE}
          stat_prefix: http_a
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                direct_response: {{status: 200, body: {{inline_string: "from the HTTP chain"}}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
{_tcp_chain("tcp_a", str(log))}{_tcp_chain("tcp_b", str(log))}  clusters:
  - name: main_internal
    connect_timeout: 2s
    load_assignment:
      cluster_name: main_internal
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              envoy_internal_address: {{server_listener_name: main_internal}}
""" + PASSTHROUGH_CLUSTER


def connect(target: str) -> bytes:
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()


OK = b"HTTP/1.1 200 OK\r\n\r\n"


class MainInternalTests(E2ETestCase):
    async def test_destination_and_protocol_choose_the_chain(self) -> None:
        echo_a, echo_b = await start_echo(self), await start_echo(self)
        log = Path(self.mktemp()).resolve()
        proxy = await start_yaml_twistd(self, "hbone-server", "waypoint",
                                        config(echo_a.port, echo_b.port, log))
        target_a, target_b = f"127.0.0.1:{echo_a.port}", f"127.0.0.1:{echo_b.port}"

        # Port A, HTTP/1.1: the HCM chain answers (the echo server never sees it).
        request = b"GET /x HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n"
        client = await exchange(proxy.port, connect(target_a) + request)
        self.assertTrue(client.data.startswith(OK + b"HTTP/1.1 200 OK\r\n"), client.data[:80])
        self.assertTrue(client.data.endswith(b"\r\n\r\nfrom the HTTP chain"), client.data[-80:])

        # Port A, raw bytes: the tcp_proxy chain relays them to A.
        raw_a = b"\x00" + pseudorandom(120_001, seed=21)
        client = await exchange(proxy.port, connect(target_a) + raw_a)
        self.assertEqual(sha256(client.data), sha256(OK + raw_a))

        # Port B, even HTTP bytes: the other tcp_proxy chain relays them unparsed to B.
        http_b = b"GET / HTTP/1.1\r\nHost: b\r\n\r\n" + pseudorandom(90_007, seed=22)
        client = await exchange(proxy.port, connect(target_b) + http_b)
        self.assertEqual(sha256(client.data), sha256(OK + http_b))

        await wait_until(lambda: len(json_records(log)) >= 2, "the tcp_proxy access records")
        records = sorted(json_records(log), key=lambda r: str(r["chain"]))
        self.assertEqual(records, [
            {"chain": "tcp_a", "local": target_a, "up": len(raw_a)},
            {"chain": "tcp_b", "local": target_b, "up": len(http_b)},
        ])
        self.assertEqual((echo_a.connections_made, echo_b.connections_made), (1, 1))
