"""
The one table of what hbonex does with each field of Envoy's messages it builds from.

Every field Envoy's schema has is accepted by the parser; set in a configuration it is one of:

* implemented (``yes``): the builders in hbonex.config.loader and the extensions use it;
* a tuning knob without effect here (``WARN``): one warning line, the configuration runs;
* anything else: an error naming the field, because it changes behaviour hbonex cannot honour
  (security, routing, data).  Fields listed under ``ERROR`` say why; unlisted ones are errors
  too ("not implemented by hbonex").

Messages reached through implemented fields are in ``TABLE`` or ``OPAQUE`` (kept or ignored
whole); tests walk the descriptors to keep that so.  docs/configuration.md prints ``markdown()``.
"""

from __future__ import annotations

from typing import Any, Optional

from google.protobuf.message import Message

from hbonex.config.schema import message_class, type_name
from hbonex.config.yamlpath import child_path

__all__ = ["ERROR", "OFF_IS_DEFAULT", "OPAQUE", "TABLE", "WARN", "check", "markdown"]

YES = "yes"
WARN = "warn"
ERROR = "error"

_DNS = "hbonex resolves with the reactor's resolver"
_STATS = "hbonex keeps no Envoy stats"
_LOG = "log output only"
_NOT_YET = ("rate limit actions: request_headers, generic_key, remote_address, "
            "destination_cluster, header_value_match")
_RUNTIME_OVERRIDE = "no runtime overrides: the configured values apply"
_H2_TUNING = "HTTP/2 tuning hbonex leaves at h2's behaviour"
_PASSTHROUGH_KINDS = ("internal_upstream passes host or cluster metadata: use host: {} or "
                      "cluster: {}")
_RBAC_MATCHER = "no matcher trees: use rules / shadow_rules"
_RBAC_CEL = "no CEL conditions"
_RBAC_METADATA = "no metadata matching: use filter_state"
_EVERY_LEVEL = ("request_headers_to_add request_headers_to_remove "
                     "response_headers_to_add response_headers_to_remove "
                     "typed_per_filter_config")


def _m(yes: str = "", warn: Optional[dict[str, str]] = None,
       error: Optional[dict[str, str]] = None) -> dict[str, tuple[str, str]]:
    entry = {name: (YES, "") for name in yes.split()}
    entry.update({name: (WARN, why) for name, why in (warn or {}).items()})
    entry.update({name: (ERROR, why) for name, why in (error or {}).items()})
    return entry


_ROUTES = "envoy.config.route.v3"
_HCM = "envoy.extensions.filters.network.http_connection_manager.v3"
_TCP = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
_TLS = "envoy.extensions.transport_sockets.tls.v3"
_AUTHZ = "envoy.extensions.filters.http.ext_authz.v3"
_GRPC_ONLY = "only a gRPC CheckRequest carries it; hbonex has the http_service"
_HEADER_MUTATION = "envoy.extensions.filters.http.header_mutation.v3"

#: message full name -> field -> (YES | WARN | ERROR, why).  Unlisted fields are errors.
TABLE: dict[str, dict[str, tuple[str, str]]] = {
    "envoy.config.bootstrap.v3.Bootstrap": _m(
        "node admin static_resources bootstrap_extensions overload_manager layered_runtime",
        warn={
            "stats_config": _STATS, "stats_flush_interval": _STATS, "stats_sinks": _STATS,
            "stats_flush_on_admin": _STATS, "deferred_stat_options": _STATS,
            "stats_server_version_override": _STATS, "enable_dispatcher_stats": _STATS,
            "watchdog": "no watchdog", "watchdogs": "no watchdog",
            "fatal_actions": "no fatal actions",
            "use_tcp_for_dns_lookups": _DNS, "dns_resolution_config": _DNS,
            "typed_dns_resolver_config": _DNS, "node_context_params": "no xDS",
            "header_prefix": "hbonex adds no x-envoy- headers", "tracing": "no tracing",
            "application_log_config": _LOG, "perf_tracing_file_path": "no tracing",
        },
        error={"dynamic_resources": "static configuration only (no xDS yet)",
               "hds_config": "no health discovery", "cluster_manager": "static clusters only"},
    ),
    "envoy.config.bootstrap.v3.Bootstrap.StaticResources": _m(
        "listeners clusters", error={"secrets": "no static secrets: use "
                                     "sds_config.path_config_source or data sources"}),
    "envoy.config.core.v3.TypedExtensionConfig": _m("name typed_config"),
    # -- overload manager: the global downstream connection limit only --
    "envoy.config.overload.v3.OverloadManager": _m(
        "resource_monitors",
        warn={"refresh_interval": "the connection count is exact, not sampled",
              "buffer_factory_config": "no buffer accounting"},
        error={"actions": "no overload actions (only the downstream connection limit)",
               "loadshed_points": "no load shed points (only the downstream connection "
                                  "limit)"}),
    "envoy.config.overload.v3.ResourceMonitor": _m("name typed_config"),
    "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig":
        _m("max_active_downstream_connections"),
    # -- runtime: static layers, for the keys in hbonex.config.loader.RUNTIME_KEYS --
    "envoy.config.bootstrap.v3.LayeredRuntime": _m("layers"),
    "envoy.config.bootstrap.v3.RuntimeLayer": _m(
        "name static_layer",
        warn={"admin_layer": "no admin endpoint: its overrides are always empty"},
        error={"disk_layer": "runtime files are not read: put the values in a static_layer",
               "rtds_layer": "no RTDS: put the values in a static_layer"}),
    "envoy.extensions.bootstrap.internal_listener.v3.InternalListener": _m("buffer_size_kb"),
    # -- listeners --
    "envoy.config.listener.v3.Listener": _m(
        "name address internal_listener per_connection_buffer_limit_bytes tcp_backlog_size "
        "listener_filters filter_chains ignore_global_conn_limit listener_filters_timeout "
        "continue_on_listener_filters_timeout filter_chain_matcher default_filter_chain",
        warn={"stat_prefix": _STATS, "metadata": "no consumer of listener metadata",
              "drain_type": "drain is shutdown's --drain-timeout",
              "socket_options": "socket options are the reactor's",
              "tcp_fast_open_queue_length": "socket tuning",
              "traffic_direction": "informational", "enable_reuse_port": "socket tuning",
              "reuse_port": "socket tuning", "connection_balance_config": "one process",
              "max_connections_to_accept_per_socket_event": "accept tuning",
              "bypass_overload_manager": "no overload actions"},
        error={"use_original_dst": "deprecated hand-off to the listener of the original "
                                   "destination; use the envoy.filters.listener.original_dst "
                                   "listener filter (false, the default, is accepted)",
               "transparent": "no transparent sockets", "freebind": "no freebind sockets",
               "bind_to_port": "listeners always bind"},
    ),
    "envoy.config.core.v3.Address": _m("socket_address envoy_internal_address pipe"),
    "envoy.config.core.v3.SocketAddress": _m(
        "address port_value named_port protocol",
        warn={"ipv4_compat": "dual-stack is the reactor's"}),
    "envoy.config.core.v3.EnvoyInternalAddress": _m("server_listener_name endpoint_id"),
    "envoy.config.core.v3.Pipe": _m("path mode"),
    "envoy.config.listener.v3.ListenerFilter": _m(
        "name typed_config filter_disabled",
        error={"config_discovery": "no extension config discovery (static config only)"}),
    "envoy.config.listener.v3.ListenerFilterChainMatchPredicate": _m(
        "or_match and_match not_match any_match destination_port_range"),
    "envoy.config.listener.v3.ListenerFilterChainMatchPredicate.MatchSet": _m("rules"),
    "envoy.type.v3.Int32Range": _m("start end"),
    "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector": _m(),
    # -- filter_chain_matcher: xds's unified matcher over the network inputs --
    "xds.type.matcher.v3.Matcher": _m("matcher_list matcher_tree on_no_match"),
    "xds.type.matcher.v3.Matcher.OnMatch": _m(
        "matcher action",
        error={"keep_matching": "the first match chooses the filter chain"}),
    "xds.type.matcher.v3.Matcher.MatcherTree": _m(
        "input exact_match_map prefix_match_map custom_match"),
    "xds.type.matcher.v3.Matcher.MatcherTree.MatchMap": _m("map"),
    "xds.type.matcher.v3.Matcher.MatcherList": _m("matchers"),
    "xds.type.matcher.v3.Matcher.MatcherList.FieldMatcher": _m("predicate on_match"),
    "xds.type.matcher.v3.Matcher.MatcherList.Predicate": _m(
        "single_predicate or_matcher and_matcher not_matcher"),
    "xds.type.matcher.v3.Matcher.MatcherList.Predicate.SinglePredicate": _m(
        "input value_match", error={"custom_match": "use value_match"}),
    "xds.type.matcher.v3.Matcher.MatcherList.Predicate.PredicateList": _m("predicate"),
    "xds.type.matcher.v3.StringMatcher": _m("exact prefix suffix contains safe_regex "
                                            "ignore_case",
                                            error={"custom": "no custom string matchers"}),
    "xds.type.matcher.v3.RegexMatcher": _m("regex google_re2"),
    "xds.type.matcher.v3.RegexMatcher.GoogleRE2": _m(),
    "xds.core.v3.TypedExtensionConfig": _m("name typed_config"),
    "xds.type.matcher.v3.IPMatcher": _m("range_matchers"),
    "xds.type.matcher.v3.IPMatcher.IPRangeMatcher": _m("ranges on_match exclusive"),
    "xds.core.v3.CidrRange": _m("address_prefix prefix_len"),
    **{f"envoy.extensions.matching.common_inputs.network.v3.{name}": _m()
       for name in ("DestinationIPInput", "DestinationPortInput", "SourceIPInput",
                    "SourcePortInput", "DirectSourceIPInput", "ServerNameInput",
                    "TransportProtocolInput", "ApplicationProtocolInput")},
    "envoy.extensions.matching.common_inputs.network.v3.FilterStateInput": _m("key"),
    "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector": _m(
        warn={"enable_ja3_fingerprinting": "no fingerprints",
              "enable_ja4_fingerprinting": "no fingerprints",
              "initial_read_buffer_size": "read tuning",
              "max_client_hello_size": "read tuning",
              "close_connection_on_client_hello_parsing_errors": "errors always close"}),
    "envoy.extensions.filters.listener.original_dst.v3.OriginalDst": _m(),
    "envoy.config.listener.v3.FilterChain": _m(
        "filter_chain_match filters transport_socket transport_socket_connect_timeout name",
        warn={"metadata": "no consumer of filter chain metadata"},
        error={"use_proxy_proto": "no PROXY protocol"},
    ),
    "envoy.config.listener.v3.FilterChainMatch": _m(
        "destination_port server_names transport_protocol application_protocols"),
    "envoy.config.listener.v3.Filter": _m("name typed_config"),
    "envoy.config.core.v3.TransportSocket": _m("name typed_config"),
    "envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit": _m(
        "stat_prefix max_connections delay",
        warn={"runtime_enabled": "no runtime switch: the filter is always enabled"}),
    # -- tcp_proxy --
    _TCP: _m(
        "stat_prefix cluster weighted_clusters idle_timeout max_connect_attempts "
        "max_downstream_connection_duration access_log tunneling_config "
        "access_log_flush_interval flush_access_log_on_connected access_log_options",
        warn={"backoff_options": "retries are immediate"},
    ),
    f"{_HCM}.HttpConnectionManager.HcmAccessLogOptions": _m(
        "access_log_flush_interval flush_log_on_tunnel_successfully_established",
        warn={"flush_access_log_on_new_request": "records are written when a request ends"}),
    f"{_TCP}.TcpAccessLogOptions": _m("access_log_flush_interval flush_access_log_on_connected"),
    f"{_TCP}.WeightedCluster": _m("clusters"),
    f"{_TCP}.WeightedCluster.ClusterWeight": _m("name weight"),
    f"{_TCP}.TunnelingConfig": _m(
        "hostname use_post headers_to_add propagate_response_headers post_path"),
    "envoy.config.core.v3.HeaderValueOption": _m("header append append_action keep_empty_value"),
    "envoy.config.core.v3.HeaderValue": _m("key value"),
    # -- access logs --
    "envoy.config.accesslog.v3.AccessLog": _m("name typed_config filter"),
    "envoy.config.accesslog.v3.AccessLogFilter": _m(
        "status_code_filter duration_filter response_flag_filter and_filter or_filter "
        "not_health_check_filter"),
    "envoy.config.accesslog.v3.StatusCodeFilter": _m("comparison"),
    "envoy.config.accesslog.v3.DurationFilter": _m("comparison"),
    "envoy.config.accesslog.v3.ComparisonFilter": _m("op value"),
    "envoy.config.core.v3.RuntimeUInt32": _m("default_value runtime_key"),
    "envoy.config.accesslog.v3.ResponseFlagFilter": _m("flags"),
    "envoy.config.accesslog.v3.AndFilter": _m("filters"),
    "envoy.config.accesslog.v3.OrFilter": _m("filters"),
    "envoy.config.accesslog.v3.NotHealthCheckFilter": _m(),
    "envoy.extensions.access_loggers.file.v3.FileAccessLog": _m("path log_format"),
    "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog": _m("log_format"),
    "envoy.extensions.access_loggers.stream.v3.StderrAccessLog": _m("log_format"),
    "envoy.config.core.v3.SubstitutionFormatString": _m(
        "text_format text_format_source json_format omit_empty_values",
        warn={"content_type": "for local replies only"}),
    "envoy.config.core.v3.DataSource": _m(
        "filename inline_string inline_bytes environment_variable",
        warn={"watched_directory": "certificate files are polled (rename and symlink swaps "
                                   "included); other files are read at load"}),
    # -- HTTP connection manager --
    f"{_HCM}.HttpConnectionManager": _m(
        "stat_prefix codec_type route_config http_filters upgrade_configs "
        "http2_protocol_options common_http_protocol_options stream_idle_timeout access_log "
        "max_request_headers_kb server_name server_header_transformation generate_request_id "
        "always_set_request_id_in_response use_remote_address skip_xff_append normalize_path "
        "merge_slashes path_with_escaped_slashes_action access_log_flush_interval "
        "access_log_options request_timeout request_headers_timeout "
        "forward_client_cert_details set_current_client_cert_details request_id_extension",
        warn={"add_user_agent": "no user agent handling", "tracing": "no tracing",
              "preserve_external_request_id": "an incoming x-request-id is always kept",
              "drain_timeout": "drain is shutdown's --drain-timeout",
              "delayed_close_timeout": "connections close at once",
              "xff_num_trusted_hops": "no internal/external origin decisions",
              "via": "no via header", "http_protocol_options": "HTTP/1.1 tuning",
              "stream_error_on_invalid_http_message": "invalid messages reset the stream",
              "flush_access_log_on_new_request": "records are written when a request ends",
              "proxy_100_continue": "HTTP/1.1 tuning"},
        error={"rds": "no RDS: use an inline route_config",
               "scoped_routes": "no scoped routes: use an inline route_config"},
    ),
    f"{_HCM}.HttpConnectionManager.SetCurrentClientCertDetails": _m(
        "subject cert chain dns uri"),
    f"{_HCM}.RequestIDExtension": _m("typed_config"),
    "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig": _m(warn={
        "pack_trace_reason": "no tracing", "use_request_id_for_trace_sampling": "no tracing"}),
    f"{_HCM}.HttpConnectionManager.UpgradeConfig": _m(
        "upgrade_type enabled",
        error={"filters": "upgrades run the HCM's http_filters (no filter chain of their own)"}),
    f"{_HCM}.HttpFilter": _m("name typed_config disabled is_optional"),
    "envoy.extensions.filters.http.router.v3.Router": _m(
        warn={"dynamic_stats": _STATS, "start_child_span": "no tracing",
              "suppress_envoy_headers": "hbonex adds no x-envoy- headers",
              "strict_check_headers": "hbonex reads no x-envoy- headers",
              "respect_expected_rq_timeout": "hbonex reads no x-envoy- headers",
              "suppress_grpc_request_failure_code_stats": _STATS}),
    "envoy.config.core.v3.Http2ProtocolOptions": _m(
        "allow_connect max_concurrent_streams initial_stream_window_size "
        "initial_connection_window_size connection_keepalive max_outbound_frames "
        "max_outbound_control_frames max_consecutive_inbound_frames_with_empty_payload "
        "max_inbound_priority_frames_per_stream "
        "max_inbound_window_update_frames_per_data_frame_sent",
        warn={"hpack_table_size": _H2_TUNING, "allow_metadata": "no METADATA frames",
              "max_metadata_size": "no METADATA frames", "use_oghttp2_codec": "h2 is the codec",
              "stream_error_on_invalid_http_messaging": "invalid messages reset the stream",
              "override_stream_error_on_invalid_http_message":
                  "invalid messages reset the stream"},
    ),
    "envoy.config.core.v3.KeepaliveSettings": _m(
        "interval timeout", warn={"interval_jitter": "PINGs are not jittered",
                                  "connection_idle_interval": "PINGs follow interval"}),
    "envoy.config.core.v3.HttpProtocolOptions": _m(
        "idle_timeout max_requests_per_connection headers_with_underscores_action",
        warn={"max_connection_duration": "connections live until idle or closed",
              "max_headers_count": "header size is limited by max_request_headers_kb",
              "max_response_headers_kb": "header size is limited by max_request_headers_kb"},
        error={"max_stream_duration": "tunnels are limited by idle timeouts only"},
    ),
    "envoy.config.core.v3.Http1ProtocolOptions": _m(warn={
        "allow_absolute_url": "HTTP/1.1 tuning", "accept_http_10": "HTTP/1.1 tuning",
        "default_host_for_http_10": "HTTP/1.1 tuning", "header_key_format": "HTTP/1.1 tuning",
        "enable_trailers": "HTTP/1.1 tuning", "allow_chunked_length": "HTTP/1.1 tuning",
        "use_balsa_parser": "Twisted parses HTTP/1.1", "allow_custom_methods": "HTTP/1.1 tuning",
        "ignore_http_11_upgrade": "HTTP/1.1 tuning",
        "override_stream_error_on_invalid_http_message": "invalid messages close the stream",
    }),
    # -- routes --
    f"{_ROUTES}.RouteConfiguration": _m(
        "name virtual_hosts validate_clusters " + _EVERY_LEVEL),
    f"{_ROUTES}.VirtualHost": _m("name domains routes retry_policy rate_limits " + _EVERY_LEVEL),
    f"{_ROUTES}.Route": _m(
        "name match route direct_response redirect " + _EVERY_LEVEL,
        warn={"metadata": "no consumer of route metadata", "decorator": "no tracing"}),
    f"{_ROUTES}.FilterConfig": _m("config is_optional disabled"),
    f"{_ROUTES}.RouteMatch": _m(
        "prefix path path_separated_prefix safe_regex connect_matcher headers case_sensitive "
        "query_parameters"),
    f"{_ROUTES}.QueryParameterMatcher": _m("name string_match present_match"),
    f"{_ROUTES}.RedirectAction": _m(
        "https_redirect scheme_redirect host_redirect port_redirect path_redirect "
        "prefix_rewrite response_code strip_query"),
    f"{_ROUTES}.WeightedCluster": _m(
        "clusters", warn={"total_weight": "weights are relative to their sum"}),
    f"{_ROUTES}.WeightedCluster.ClusterWeight": _m("name weight"),
    "envoy.type.matcher.v3.RegexMatchAndSubstitute": _m("pattern substitution"),
    f"{_ROUTES}.RouteMatch.ConnectMatcher": _m(),
    f"{_ROUTES}.HeaderMatcher": _m(
        "name string_match exact_match prefix_match suffix_match contains_match "
        "safe_regex_match present_match invert_match"),
    "envoy.type.matcher.v3.StringMatcher": _m("exact prefix suffix contains safe_regex "
                                              "ignore_case"),
    "envoy.type.matcher.v3.RegexMatcher": _m("regex google_re2"),
    "envoy.type.matcher.v3.RegexMatcher.GoogleRE2": _m(
        warn={"max_program_size": "Python's re has no program size"}),
    f"{_ROUTES}.RouteAction": _m(
        "cluster weighted_clusters cluster_header upgrade_configs idle_timeout timeout "
        "prefix_rewrite regex_rewrite host_rewrite_literal auto_host_rewrite retry_policy "
        "rate_limits include_vh_rate_limits",
        # istiod writes it on every route, with 0s values (no limit, grpc-timeout honoured).
        warn={"max_stream_duration": "no stream duration limit and the grpc-timeout header "
                                     "does not set the route's timeout"}),
    # -- fault injection (hbonex.filters.http.fault) --
    "envoy.extensions.filters.http.fault.v3.HTTPFault": _m(
        "delay abort upstream_cluster headers downstream_nodes max_active_faults "
        "filter_metadata",
        warn={**{key: _RUNTIME_OVERRIDE for key in (
            "delay_percent_runtime", "abort_percent_runtime", "delay_duration_runtime",
            "abort_http_status_runtime", "max_active_faults_runtime",
            "response_rate_limit_percent_runtime", "abort_grpc_status_runtime")},
            "disable_downstream_cluster_stats": "no per-downstream-cluster stats"},
        error={"response_rate_limit": "no response bandwidth limiting"}),
    "envoy.extensions.filters.http.fault.v3.FaultAbort": _m(
        "http_status grpc_status header_abort percentage"),
    "envoy.extensions.filters.http.fault.v3.FaultAbort.HeaderAbort": _m(),
    "envoy.extensions.filters.common.fault.v3.FaultDelay": _m(
        "fixed_delay header_delay percentage"),
    "envoy.extensions.filters.common.fault.v3.FaultDelay.HeaderDelay": _m(),
    "envoy.type.v3.FractionalPercent": _m("numerator denominator"),
    # -- local rate limit (hbonex.filters.http.local_ratelimit) --
    "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit": _m(
        "stat_prefix status token_bucket filter_enabled filter_enforced "
        "request_headers_to_add_when_not_enforced response_headers_to_add descriptors stage "
        "local_rate_limit_per_downstream_connection enable_x_ratelimit_headers vh_rate_limits "
        "always_consume_default_token_bucket rate_limited_as_resource_exhausted rate_limits",
        warn={"max_dynamic_descriptors": "no dynamic descriptors (every descriptor entry "
                                         "has its value)"},
        error={"local_cluster_rate_limit": "no local cluster to share the limit with"}),
    "envoy.type.v3.HttpStatus": _m("code"),
    "envoy.type.v3.TokenBucket": _m("max_tokens tokens_per_fill fill_interval"),
    "envoy.config.core.v3.RuntimeFractionalPercent": _m(
        "default_value", warn={"runtime_key": "runtime keys are not read: default_value "
                                              "applies"}),
    "envoy.extensions.common.ratelimit.v3.LocalRateLimitDescriptor": _m("entries token_bucket"),
    "envoy.extensions.common.ratelimit.v3.RateLimitDescriptor.Entry": _m("key value"),
    f"{_ROUTES}.RateLimit": _m(
        "stage disable_key actions",
        error={"limit": "local rate limits take one token per request",
               "hits_addend": "local rate limits take one token per request",
               "apply_on_stream_done": "requests are limited when they arrive"}),
    f"{_ROUTES}.RateLimit.Action": _m(
        "request_headers generic_key remote_address destination_cluster header_value_match",
        error={"source_cluster": "no local cluster name", "query_parameters": _NOT_YET,
               "dynamic_metadata": _NOT_YET, "metadata": _NOT_YET, "extension": _NOT_YET,
               "masked_remote_address": _NOT_YET, "query_parameter_value_match": _NOT_YET}),
    f"{_ROUTES}.RateLimit.Action.RequestHeaders": _m(
        "header_name descriptor_key skip_if_absent"),
    f"{_ROUTES}.RateLimit.Action.GenericKey": _m("descriptor_value descriptor_key"),
    f"{_ROUTES}.RateLimit.Action.RemoteAddress": _m(),
    f"{_ROUTES}.RateLimit.Action.DestinationCluster": _m(),
    f"{_ROUTES}.RateLimit.Action.HeaderValueMatch": _m(
        "descriptor_key descriptor_value expect_match headers"),
    "envoy.extensions.filters.http.set_filter_state.v3.Config": _m("on_request_headers"),
    # -- ext_authz: the HTTP authorization service --
    f"{_AUTHZ}.ExtAuthz": _m(
        "http_service failure_mode_allow failure_mode_allow_header_add with_request_body "
        "clear_route_cache status_on_error stat_prefix allowed_headers disallowed_headers "
        "max_denied_response_body_bytes",
        warn={"transport_api_version": _GRPC_ONLY, "metadata_context_namespaces": _GRPC_ONLY,
              "typed_metadata_context_namespaces": _GRPC_ONLY,
              "route_metadata_context_namespaces": _GRPC_ONLY,
              "route_typed_metadata_context_namespaces": _GRPC_ONLY,
              "include_peer_certificate": _GRPC_ONLY, "include_tls_session": _GRPC_ONLY,
              "bootstrap_metadata_labels_key": _GRPC_ONLY, "encode_raw_headers": _GRPC_ONLY,
              "enable_dynamic_metadata_ingestion": _GRPC_ONLY,
              "charge_cluster_response_stats": _STATS, "emit_filter_state_stats": _STATS,
              "filter_metadata": "no ext_authz logging info",
              "enforce_response_header_limits": "no header count limit"},
        error={"grpc_service": "use http_service (an HTTP authorization service)",
               "filter_enabled": "the filter is always enabled (no runtime fraction)",
               "filter_enabled_metadata": "the filter is always enabled",
               "deny_at_disable": "the filter is always enabled",
               "validate_mutations": "security: the service's headers are not validated",
               "decoder_header_mutation_rules": "security: no header mutation rules"}),
    f"{_AUTHZ}.HttpService": _m(
        "server_uri path_prefix authorization_request authorization_response",
        error={"retry_policy": "a failed check is not retried"}),
    "envoy.config.core.v3.HttpUri": _m("uri cluster timeout"),
    f"{_AUTHZ}.AuthorizationRequest": _m("allowed_headers headers_to_add"),
    f"{_AUTHZ}.AuthorizationResponse": _m(
        "allowed_upstream_headers allowed_upstream_headers_to_append allowed_client_headers "
        "allowed_client_headers_on_success",
        warn={"dynamic_metadata_from_headers": "no consumer of ext_authz dynamic metadata"}),
    f"{_AUTHZ}.BufferSettings": _m("max_request_bytes allow_partial_message",
                                   warn={"pack_as_bytes": _GRPC_ONLY}),
    f"{_AUTHZ}.ExtAuthzPerRoute": _m("disabled check_settings"),
    f"{_AUTHZ}.CheckSettings": _m(
        "with_request_body disable_request_body_buffering",
        warn={"context_extensions": _GRPC_ONLY},
        error={"grpc_service": "use http_service on the filter",
               "http_service": "one authorization service per filter (no per-route "
                               "service)"}),
    "envoy.type.matcher.v3.ListStringMatcher": _m("patterns"),
    # -- header_mutation and cors (HTTP filters with per-route policies) --
    f"{_HEADER_MUTATION}.HeaderMutation": _m("mutations most_specific_header_mutations_wins"),
    f"{_HEADER_MUTATION}.HeaderMutationPerRoute": _m("mutations"),
    f"{_HEADER_MUTATION}.Mutations": _m(
        "request_mutations response_mutations request_trailers_mutations "
        "response_trailers_mutations",
        error={"query_parameter_mutations": "query parameters are not changed: rewrite the "
               "path with the route's regex_rewrite"}),
    "envoy.config.common.mutation_rules.v3.HeaderMutation": _m("remove append remove_on_match"),
    "envoy.config.common.mutation_rules.v3.HeaderMutation.RemoveOnMatch": _m("key_matcher"),
    "envoy.extensions.filters.http.cors.v3.Cors": _m(),
    "envoy.extensions.filters.http.cors.v3.CorsPolicy": _m(
        "allow_origin_string_match allow_methods allow_headers expose_headers max_age "
        "allow_credentials filter_enabled shadow_enabled allow_private_network_access "
        "forward_not_matching_preflights"),
    "envoy.extensions.filters.network.set_filter_state.v3.Config": _m("on_new_connection"),
    # -- RBAC (HTTP and network filters; one policy engine) --
    "envoy.extensions.filters.http.rbac.v3.RBAC": _m(
        "rules rules_stat_prefix shadow_rules shadow_rules_stat_prefix track_per_rule_stats",
        error={"matcher": _RBAC_MATCHER, "shadow_matcher": _RBAC_MATCHER}),
    "envoy.extensions.filters.http.rbac.v3.RBACPerRoute": _m("rbac"),
    "envoy.extensions.filters.network.rbac.v3.RBAC": _m(
        "rules shadow_rules shadow_rules_stat_prefix stat_prefix enforcement_type delay_deny",
        error={"matcher": _RBAC_MATCHER, "shadow_matcher": _RBAC_MATCHER}),
    "envoy.config.rbac.v3.RBAC": _m(
        "action policies", error={"audit_logging_options": "no RBAC audit loggers"}),
    "envoy.config.rbac.v3.Policy": _m(
        "permissions principals",
        error={"condition": _RBAC_CEL, "checked_condition": _RBAC_CEL, "cel_config": _RBAC_CEL}),
    "envoy.config.rbac.v3.Permission": _m(
        "any header url_path destination_ip destination_port destination_port_range "
        "requested_server_name and_rules or_rules not_rule",
        error={"metadata": _RBAC_METADATA, "sourced_metadata": _RBAC_METADATA,
               "matcher": "no permission extensions",
               "uri_template": "no URI templates: use url_path"}),
    "envoy.config.rbac.v3.Permission.Set": _m("rules"),
    "envoy.config.rbac.v3.Principal": _m(
        "any authenticated filter_state direct_remote_ip remote_ip source_ip header url_path "
        "and_ids or_ids not_id",
        error={"metadata": _RBAC_METADATA, "sourced_metadata": _RBAC_METADATA,
               "custom": "no principal extensions"}),
    "envoy.config.rbac.v3.Principal.Set": _m("ids"),
    "envoy.config.rbac.v3.Principal.Authenticated": _m("principal_name"),
    "envoy.type.matcher.v3.FilterStateMatcher": _m(
        "key string_match", error={"address_match": "filter state is matched as a string"}),
    "envoy.type.matcher.v3.PathMatcher": _m("path"),
    "envoy.config.core.v3.CidrRange": _m("address_prefix prefix_len"),
    "envoy.extensions.filters.common.set_filter_state.v3.FilterStateValue": _m(
        "object_key factory_key format_string read_only shared_with_upstream skip_if_empty"),
    f"{_ROUTES}.RetryPolicy": _m(
        "retry_on num_retries per_try_timeout retriable_status_codes retry_back_off",
        error={"retry_priority": "no retry priorities",
               "retry_host_predicate": "no retry host predicates",
               "retriable_headers": "retries are decided on the status and resets only",
               "retriable_request_headers": "every request with a policy may be retried",
               "rate_limited_retry_back_off": "no rate-limited back-off",
               "retry_options_predicates": "no retry options predicates",
               "per_try_idle_timeout": "per_try_timeout bounds each attempt"},
        warn={"host_selection_retry_max_attempts": "no host selection retries"}),
    f"{_ROUTES}.RetryPolicy.RetryBackOff": _m("base_interval max_interval"),
    f"{_ROUTES}.RouteAction.UpgradeConfig": _m("upgrade_type enabled connect_config"),
    f"{_ROUTES}.RouteAction.UpgradeConfig.ConnectConfig": _m("allow_post"),
    f"{_ROUTES}.DirectResponseAction": _m("status body"),
    # -- clusters --
    "envoy.config.cluster.v3.Cluster": _m(
        "name type cluster_type lb_policy connect_timeout load_assignment "
        "typed_extension_protocol_options http2_protocol_options http_protocol_options "
        "circuit_breakers transport_socket metadata original_dst_lb_config",
        warn={"dns_lookup_family": _DNS, "dns_refresh_rate": _DNS, "dns_jitter": _DNS,
              "dns_failure_refresh_rate": _DNS, "respect_dns_ttl": _DNS, "dns_resolvers": _DNS,
              "use_tcp_for_dns_lookups": _DNS, "dns_resolution_config": _DNS,
              "typed_dns_resolver_config": _DNS, "alt_stat_name": _STATS,
              "track_timeout_budgets": _STATS, "track_cluster_stats": _STATS,
              "wait_for_warm_on_init": "static clusters are warm",
              "per_connection_buffer_limit_bytes": "buffers follow flow control",
              "cleanup_interval": "ORIGINAL_DST keeps no hosts to clean up",
              "upstream_connection_options": "socket options are the reactor's",
              "close_connections_on_host_health_failure": "no health checks",
              "ignore_health_on_host_removal": "no health checks",
              "common_lb_config": "load balancing tuning",
              "max_requests_per_connection": "deprecated; pools reuse connections"},
        error={"health_checks": "no active health checking",
               "outlier_detection": "no outlier detection", "eds_cluster_config": "no EDS",
               "lb_subset_config": "routing: no subsets",
               "upstream_bind_config": "no source address binding",
               "transport_socket_matches": "one transport socket per cluster",
               "ring_hash_lb_config": "no RING_HASH", "maglev_lb_config": "no MAGLEV"},
    ),
    "envoy.config.cluster.v3.Cluster.CustomClusterType": _m("name typed_config"),
    "envoy.config.cluster.v3.Cluster.OriginalDstLbConfig": _m(
        "use_http_header http_header_name metadata_key upstream_port_override"),
    "envoy.type.metadata.v3.MetadataKey": _m("key path"),
    "envoy.type.metadata.v3.MetadataKey.PathSegment": _m("key"),
    "envoy.config.cluster.v3.CircuitBreakers": _m("thresholds"),
    "envoy.config.cluster.v3.CircuitBreakers.Thresholds": _m(
        "priority max_connections max_pending_requests max_requests",
        warn={"max_retries": "tunnels are not retried", "retry_budget": "tunnels are not retried",
              "track_remaining": _STATS, "max_connection_pools": "pools are bounded by keys"}),
    "envoy.config.endpoint.v3.ClusterLoadAssignment": _m("cluster_name endpoints"),
    "envoy.config.endpoint.v3.LocalityLbEndpoints": _m(
        "lb_endpoints", warn={"locality": "no locality-aware balancing"}),
    "envoy.config.endpoint.v3.LbEndpoint": _m("endpoint metadata"),
    "envoy.config.endpoint.v3.Endpoint": _m(
        "address", warn={"hostname": "informational",
                         "health_check_config": "no active health checking"}),
    "envoy.config.core.v3.Metadata": _m(
        "filter_metadata", warn={"typed_filter_metadata": "no consumer of typed metadata"}),
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _m(
        "explicit_http_config auto_config use_downstream_protocol_config "
        "common_http_protocol_options"),
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.UseDownstreamHttpConfig": _m(
        "http_protocol_options http2_protocol_options",
        error={"http3_protocol_options": "no HTTP/3"}),
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.AutoHttpConfig": _m(
        "http_protocol_options http2_protocol_options",
        error={"http3_protocol_options": "no HTTP/3",
               "alternate_protocols_cache_options": "no HTTP/3 (Alt-Svc)"}),
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.ExplicitHttpConfig": _m(
        "http_protocol_options http2_protocol_options",
        error={"http3_protocol_options": "no HTTP/3"}),
    # -- TLS --
    f"{_TLS}.UpstreamTlsContext": _m(
        "common_tls_context sni", warn={"max_session_keys": "no session resumption"}),
    f"{_TLS}.DownstreamTlsContext": _m(
        "common_tls_context require_client_certificate",
        warn={"disable_stateless_session_resumption": "no session resumption",
              "disable_stateful_session_resumption": "no session resumption",
              "session_timeout": "no session resumption",
              "full_scan_certs_on_sni_mismatch": "one certificate per chain"}),
    f"{_TLS}.CommonTlsContext": _m(
        "tls_params alpn_protocols tls_certificates validation_context "
        "tls_certificate_sds_secret_configs validation_context_sds_secret_config "
        "combined_validation_context"),
    "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext.CombinedCertificateValidationContext":
        _m("default_validation_context validation_context_sds_secret_config"),
    # -- file-based SDS: a watched file holding Secret resources (hbonex.tls.certwatch) --
    f"{_TLS}.SdsSecretConfig": _m("name sds_config"),
    "envoy.config.core.v3.ConfigSource": _m(
        "path_config_source path",
        warn={"resource_api_version": "the file holds v3 resources",
              "initial_fetch_timeout": "the file is read when the configuration loads"},
        error={"api_config_source": "no xDS server: use path_config_source",
               "ads": "no xDS server: use path_config_source",
               "self": "no xDS server: use path_config_source",
               "authorities": "no xDS server: use path_config_source"}),
    "envoy.config.core.v3.PathConfigSource": _m(
        "path", warn={"watched_directory": "the file is polled (rename and symlink swaps "
                                           "included)"}),
    f"{_TLS}.Secret": _m(
        "name tls_certificate validation_context",
        error={"session_ticket_keys": "no session resumption",
               "generic_secret": "no consumer of generic secrets"}),
    f"{_TLS}.TlsParameters": _m("tls_minimum_protocol_version tls_maximum_protocol_version"),
    f"{_TLS}.TlsCertificate": _m("certificate_chain private_key"),
    f"{_TLS}.CertificateValidationContext": _m("trusted_ca match_typed_subject_alt_names"),
    f"{_TLS}.SubjectAltNameMatcher": _m("san_type matcher"),
    "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer": _m(),
    "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport": _m(
        "passthrough_metadata transport_socket"),
    "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport."
    "MetadataValueSource": _m("kind name"),
    "envoy.type.metadata.v3.MetadataKind": _m(
        "host cluster", error={"request": _PASSTHROUGH_KINDS, "route": _PASSTHROUGH_KINDS}),
    "envoy.type.metadata.v3.MetadataKind.Host": _m(),
    "envoy.type.metadata.v3.MetadataKind.Cluster": _m(),
    "envoy.config.listener.v3.Listener.InternalListenerConfig": _m(),
    "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig": _m(
        "emit_filter_state individual_method_stats_allowlist stats_for_all_methods "
        "replace_dots_in_grpc_service_name",
        warn={"enable_upstream_stats": "no upstream_rq_time histogram per gRPC method"}),
    "envoy.config.core.v3.GrpcMethodList": _m("services"),
    "envoy.config.core.v3.GrpcMethodList.Service": _m("name method_names"),
}

#: Kept or ignored whole: any field inside is fine.
OPAQUE = {
    "envoy.config.core.v3.Node": "ignored",
    "envoy.config.bootstrap.v3.Admin": (
        "address serves the admin endpoint (hbonex.observability.admin); "
        "its other fields have no effect"),
    "xds.type.v3.TypedStruct": "a plugin's own config",
    "udpa.type.v1.TypedStruct": "a plugin's own config",
}
_LEAVES = ("google.protobuf.",)


def implemented(full_name: str) -> set[str]:
    return {f for f, (kind, _) in TABLE.get(full_name, {}).items() if kind == YES}


#: BoolValue fields refused when true, accepted when set to false (their default).
OFF_IS_DEFAULT = {("envoy.config.listener.v3.Listener", "use_original_dst")}


def check(message: Message, path: str, context: Any) -> None:
    """
    Raise a ConfigError for the first set field hbonex does not implement (unless it is a
    tuning knob: ``context.warn`` then).  Extensions' configs (Any) are checked unpacked.
    """
    full = message.DESCRIPTOR.full_name
    if full in OPAQUE or full.startswith(_LEAVES):
        return
    entry = TABLE.get(full, {})
    for field, value in message.ListFields():
        kind, why = entry.get(field.name, (ERROR, ""))
        if kind == ERROR and (full, field.name) in OFF_IS_DEFAULT and not value.value:
            continue  # explicitly off, as Envoy's default (istiod writes it so)
        if kind == ERROR:
            reason = f": {why}" if why else ""
            raise context.error(path, f"{field.name} ({full}) is known to Envoy but not "
                                f"implemented by hbonex{reason}", field.name)
        where = child_path(path, field.name)
        if kind == WARN:
            context.warn(where, f"{field.name} has no effect in hbonex ({why})")
            continue
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].message_type is not None:
                for key, item in value.items():
                    _check_value(item, child_path(where, key), context)
        elif _is_repeated(field):
            for index, item in enumerate(value):
                _check_value(item, f"{where}[{index}]", context)
        else:
            _check_value(value, where, context)


def _is_repeated(field: Any) -> bool:
    flag = getattr(field, "is_repeated", None)
    return bool(flag) if flag is not None else field.label == field.LABEL_REPEATED


def _check_value(value: Message, path: str, context: Any) -> None:
    if value.DESCRIPTOR.full_name == "google.protobuf.Any":
        cls = message_class(type_name(value.type_url))  # type: ignore[attr-defined]
        if cls is None or cls.DESCRIPTOR.full_name not in TABLE:
            return  # not an extension hbonex has: the builder says which ones it knows
        inner = cls()
        value.Unpack(inner)  # type: ignore[attr-defined]
        check(inner, path, context)
        return
    check(value, path, context)


def markdown() -> str:
    """
    The table as docs/configuration.md prints it.
    """
    lines = [
        "| message | implemented | no effect (warning) | refused (error) |",
        "|---|---|---|---|",
    ]
    for name in sorted(TABLE):
        entry = TABLE[name]
        yes = ", ".join(f"`{f}`" for f, (k, _) in entry.items() if k == YES) or "—"
        warn = ", ".join(f"`{f}`" for f, (k, _) in entry.items() if k == WARN) or "—"
        error = "; ".join(f"`{f}` ({why})" for f, (k, why) in entry.items() if k == ERROR)
        lines.append(f"| `{name}` | {yes} | {warn} | {error or '—'} |")
    for name, why in sorted(OPAQUE.items()):
        lines.append(f"| `{name}` | all: {why} | — | — |")
    return "\n".join(lines) + "\n"
