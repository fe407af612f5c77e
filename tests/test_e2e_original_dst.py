"""
Istio's waypoint shapes end to end, in a real ``twistd hbone-server --config`` process: a
tunnel's target carried across an internal listener hop, either as host metadata passed
through by ``envoy.transport_sockets.internal_upstream`` or as filter state shared with the
upstream, restored by the ``envoy.filters.listener.original_dst`` listener filter so that an
ORIGINAL_DST cluster (and ``%DOWNSTREAM_LOCAL_ADDRESS%``) sees it.  Bytes hashed at both ends.
"""

from __future__ import annotations

from pathlib import Path

from tests.faults_support import start_yaml_twistd
from tests.support import (
    exchange,
    pseudorandom,
    sha256,
    start_echo,
    unused_port,
    wait_until,
)
from tests.test_e2e_configs import INTERNAL_LISTENER_EXTENSION
from tests.test_e2e_hcm import HCM_TYPE, json_records
from tests.test_e2e_tunnel import E2ETestCase

TCP_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
INTERNAL_UPSTREAM_TYPE = ("type.googleapis.com/envoy.extensions.transport_sockets."
                          "internal_upstream.v3.InternalUpstreamTransport")
ORIGINAL_DST_FILTER = """\
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst
"""
#: The inner listener Istio's waypoint calls connect_originate / main_internal: restore the
#: target, relay to it through ORIGINAL_DST, log what the connection's local address became.
INNER_LISTENER = """\
  - name: inner
    internal_listener: {{}}
{listener_filters}    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": """ + TCP_PROXY_TYPE + """
          stat_prefix: inner
          cluster: passthrough
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {log}
              log_format:
                json_format:
                  local: "%DOWNSTREAM_LOCAL_ADDRESS%"
                  local_port: "%DOWNSTREAM_LOCAL_PORT%"
                  upstream: "%UPSTREAM_HOST%"
                  up: "%BYTES_RECEIVED%"
                  down: "%BYTES_SENT%"
"""
PASSTHROUGH_CLUSTER = """\
  - name: passthrough
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s
"""

METADATA_CONFIG = INTERNAL_LISTENER_EXTENSION + """\
static_resources:
  listeners:
  - name: outbound
    address:
      socket_address: {{address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": """ + TCP_PROXY_TYPE + """
          stat_prefix: outbound
          cluster: internal_outbound
""" + INNER_LISTENER + """\
  clusters:
  - name: internal_outbound
    connect_timeout: 2s
    load_assignment:
      cluster_name: internal_outbound
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              envoy_internal_address: {{server_listener_name: inner}}
          metadata:
            filter_metadata:
              envoy.filters.listener.original_dst: {{local: "127.0.0.1:{echo}"}}
              istio: {{workload: "echo;default"}}
    transport_socket:
      name: envoy.transport_sockets.internal_upstream
      typed_config:
        "@type": """ + INTERNAL_UPSTREAM_TYPE + """
        passthrough_metadata:
        - kind: {{host: {{}}}}
          name: envoy.filters.listener.original_dst
        transport_socket:
          name: envoy.transport_sockets.raw_buffer
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer
""" + PASSTHROUGH_CLUSTER

FILTER_STATE_CONFIG = INTERNAL_LISTENER_EXTENSION + """\
static_resources:
  listeners:
  - name: connect_terminate
    address:
      socket_address: {{address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.set_filter_state
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.set_filter_state.v3.Config
          on_new_connection:
          - object_key: envoy.filters.listener.original_dst.local_ip
            format_string: {{text_format: "127.0.0.1:{echo}"}}
            shared_with_upstream: ONCE
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": """ + HCM_TYPE + """
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
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
""" + INNER_LISTENER + """\
  clusters:
  - name: main_internal
    connect_timeout: 2s
    load_assignment:
      cluster_name: main_internal
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              envoy_internal_address: {{server_listener_name: inner}}
""" + PASSTHROUGH_CLUSTER


#: Istio's own connect_terminate: the HTTP set_filter_state stores the CONNECT's
#: %REQ(:AUTHORITY)% (it runs on CONNECT requests too), shared ONCE with the internal hop.
HTTP_FILTER_STATE_CONFIG = FILTER_STATE_CONFIG.replace("""\
      - name: envoy.filters.network.set_filter_state
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.set_filter_state.v3.Config
          on_new_connection:
          - object_key: envoy.filters.listener.original_dst.local_ip
            format_string: {{text_format: "127.0.0.1:{echo}"}}
            shared_with_upstream: ONCE
""", "").replace("""\
          http_filters:
          - name: envoy.filters.http.router
""", """\
          http_filters:
          - name: envoy.filters.http.set_filter_state
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config
              on_request_headers:
              - object_key: envoy.filters.listener.original_dst.local_ip
                format_string: {{text_format_source: {{inline_string: "%REQ(:AUTHORITY)%"}}}}
                shared_with_upstream: ONCE
          - name: envoy.filters.http.router
""")

#: Istio's connect_originate: the inner listener opens an HBONE (HTTP/2 CONNECT) tunnel to
#: its restored local address; a CONNECT-terminating listener of the same process ends it.
CONNECT_ORIGINATE_CONFIG = METADATA_CONFIG.replace("""\
          stat_prefix: inner
          cluster: passthrough
""", """\
          stat_prefix: inner
          cluster: hbone
          tunneling_config: {{hostname: "%DOWNSTREAM_LOCAL_ADDRESS%"}}
""").replace("""\
  clusters:
""", """\
  - name: tunnels
    address:
      socket_address: {{address: 127.0.0.1, port_value: {tunnels}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": """ + HCM_TYPE + """
          stat_prefix: tunnels
          codec_type: HTTP2
          http2_protocol_options: {{allow_connect: true}}
          upgrade_configs: [{{upgrade_type: CONNECT}}]
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {tunnel_log}
              log_format:
                json_format: {{authority: "%REQ(:AUTHORITY)%", code: "%RESPONSE_CODE%"}}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{connect_matcher: {{}}}}
                route:
                  cluster: passthrough
                  upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: hbone
    connect_timeout: 2s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: hbone
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: {tunnels}}}
""") + """\
    original_dst_lb_config: {{use_http_header: true, http_header_name: ":authority"}}
"""


#: connect_originate as Istio builds its cluster: ORIGINAL_DST whose target is the pod address
#: the connection's passed-through metadata carries (metadata_key), on the HBONE port
#: (upstream_port_override, Istio's 15008; here the tunnels listener's).
CONNECT_ORIGINATE_ODST_CONFIG = CONNECT_ORIGINATE_CONFIG.replace("""\
    load_assignment:
      cluster_name: hbone
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: {tunnels}}}
""", """\
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    original_dst_lb_config:
      upstream_port_override: {tunnels}
      metadata_key:
        key: envoy.filters.listener.original_dst
        path: [{{key: local}}]
""")


class OriginalDstAcrossInternalListenersTests(E2ETestCase):
    async def test_host_metadata_passed_through_restores_the_target(self) -> None:
        """
        outbound (TCP) -> internal_outbound (internal_upstream, host metadata
        envoy.filters.listener.original_dst.local = the echo server) -> internal listener
        with original_dst -> ORIGINAL_DST -> echo: 300 kB echoed intact, and the inner
        listener's %DOWNSTREAM_LOCAL_ADDRESS% is the restored target, not envoy://inner/.
        (Without the restored address the inner ORIGINAL_DST would connect back to the
        outbound listener, the only destination an earlier hop knew.)
        """
        echo = await start_echo(self)
        log = Path(self.mktemp()).resolve()
        proxy = await start_yaml_twistd(
            self, "hbone-server", "waypoint", METADATA_CONFIG.format(
                echo=echo.port, log=log, listener_filters=ORIGINAL_DST_FILTER))
        payload = pseudorandom(300_000, seed=11)
        client = await exchange(proxy.port, payload)
        self.assertEqual(sha256(client.data), sha256(payload))
        self.assertEqual(echo.connections_made, 1)
        await wait_until(lambda: len(json_records(log)) >= 1, "the inner access record")
        [record] = json_records(log)
        target = f"127.0.0.1:{echo.port}"
        self.assertEqual(
            record, {"local": target, "local_port": echo.port, "upstream": target,
                     "up": 300_000, "down": 300_000})

    async def test_filter_state_shared_with_upstream_restores_the_target(self) -> None:
        """
        connect_terminate (HTTP/1.1 CONNECT to an HCM; set_filter_state stores
        envoy.filters.listener.original_dst.local_ip, shared ONCE) -> internal listener with
        original_dst -> ORIGINAL_DST -> echo.  The CONNECT names another authority
        (unresolvable): only the restored filter state can lead to the echo server.
        """
        echo = await start_echo(self)
        log = Path(self.mktemp()).resolve()
        proxy = await start_yaml_twistd(
            self, "hbone-server", "waypoint", FILTER_STATE_CONFIG.format(
                echo=echo.port, log=log, listener_filters=ORIGINAL_DST_FILTER))
        payload = pseudorandom(200_000, seed=12)
        head = b"CONNECT elsewhere.invalid:9 HTTP/1.1\r\nHost: elsewhere.invalid:9\r\n\r\n"
        client = await exchange(proxy.port, head + payload)
        self.assertEqual(sha256(client.data), sha256(b"HTTP/1.1 200 OK\r\n\r\n" + payload))
        await wait_until(lambda: len(json_records(log)) >= 1, "the inner access record")
        [record] = json_records(log)
        target = f"127.0.0.1:{echo.port}"
        self.assertEqual((record["local"], record["upstream"], record["up"], record["down"]),
                         (target, target, 200_000, 200_000))

    async def test_connect_authority_restored_by_http_set_filter_state(self) -> None:
        """
        Istio's connect_terminate as Istio writes it: the CONNECT's :authority, stored by the
        HTTP set_filter_state (shared ONCE), becomes the inner connection's local address
        (original_dst) and the ORIGINAL_DST cluster's target.
        """
        echo = await start_echo(self)
        log = Path(self.mktemp()).resolve()
        config = HTTP_FILTER_STATE_CONFIG.format(echo=echo.port, log=log,
                                                 listener_filters=ORIGINAL_DST_FILTER)
        self.assertNotIn("envoy.filters.network.set_filter_state", config)
        proxy = await start_yaml_twistd(self, "hbone-server", "waypoint", config)
        payload = pseudorandom(150_001, seed=13)
        target = f"127.0.0.1:{echo.port}"
        head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
        client = await exchange(proxy.port, head + payload)
        self.assertEqual(sha256(client.data), sha256(b"HTTP/1.1 200 OK\r\n\r\n" + payload))
        await wait_until(lambda: len(json_records(log)) >= 1, "the inner access record")
        [record] = json_records(log)
        self.assertEqual((record["local"], record["upstream"], record["up"], record["down"]),
                         (target, target, 150_001, 150_001))
        self.assertEqual(echo.connections_made, 1)

    async def test_connect_originate_cluster_by_metadata_key_and_port_override(self) -> None:
        """
        Istio's connect_originate cluster: ORIGINAL_DST takes the target from the
        connection's dynamic metadata (metadata_key envoy.filters.listener.original_dst /
        local, passed through by internal_upstream) and connects on upstream_port_override
        (the HBONE port), while the tunnel's :authority stays the target itself.
        """
        echo = await start_echo(self)
        log, tunnel_log = Path(self.mktemp()).resolve(), Path(self.mktemp()).resolve()
        tunnels = await unused_port(self)
        config = CONNECT_ORIGINATE_ODST_CONFIG.format(
            echo=echo.port, log=log, listener_filters=ORIGINAL_DST_FILTER, tunnels=tunnels,
            tunnel_log=tunnel_log)
        self.assertIn("metadata_key", config)
        proxy = await start_yaml_twistd(self, "hbone-server", "waypoint", config, listeners=2)
        payload = pseudorandom(120_007, seed=14)
        client = await exchange(proxy.ports["outbound"], payload)
        self.assertEqual(sha256(client.data), sha256(payload))
        await wait_until(lambda: len(json_records(tunnel_log)) >= 1, "the tunnel record")
        target = f"127.0.0.1:{echo.port}"
        self.assertEqual(json_records(tunnel_log), [{"authority": target, "code": 200}])
        await wait_until(lambda: len(json_records(log)) >= 1, "the inner access record")
        [record] = json_records(log)
        self.assertEqual((record["local"], record["upstream"]),
                         (target, f"127.0.0.1:{tunnels}"))

    async def test_connect_originate_tunnels_to_the_restored_address(self) -> None:
        """
        Istio's connect_originate: behind the internal listener, tcp_proxy tunnels (HTTP/2
        CONNECT) with hostname %DOWNSTREAM_LOCAL_ADDRESS%; the tunnel's :authority is the
        target the host metadata carried, and the bytes reach the echo server through it.
        """
        echo = await start_echo(self)
        log, tunnel_log = Path(self.mktemp()).resolve(), Path(self.mktemp()).resolve()
        tunnels = await unused_port(self)
        proxy = await start_yaml_twistd(
            self, "hbone-server", "waypoint", CONNECT_ORIGINATE_CONFIG.format(
                echo=echo.port, log=log, listener_filters=ORIGINAL_DST_FILTER,
                tunnels=tunnels, tunnel_log=tunnel_log), listeners=2)
        payload = pseudorandom(250_000, seed=13)
        client = await exchange(proxy.ports["outbound"], payload)
        self.assertEqual(sha256(client.data), sha256(payload))
        await wait_until(lambda: len(json_records(tunnel_log)) >= 1, "the tunnel record")
        target = f"127.0.0.1:{echo.port}"
        self.assertEqual(json_records(tunnel_log), [{"authority": target, "code": 200}])
        await wait_until(lambda: len(json_records(log)) >= 1, "the inner access record")
        [record] = json_records(log)
        self.assertEqual((record["local"], record["upstream"]),
                         (target, f"127.0.0.1:{tunnels}"))
