"""
The built-in hbonex extensions, registered exactly as third-party dropins are: listener
filters, network filters, HTTP filters, cluster types and transport sockets, found by
hbonex.extensions.
"""

from hbonex.filters.http.cors import CorsExtension
from hbonex.filters.http.ext_authz import ExtAuthzExtension
from hbonex.filters.http.fault import FaultExtension
from hbonex.filters.http.grpc_stats import GrpcStatsExtension
from hbonex.filters.http.header_mutation import HeaderMutationExtension
from hbonex.filters.http.istio_stats import IstioStatsExtension
from hbonex.filters.http.local_ratelimit import LocalRateLimitExtension
from hbonex.filters.http.peer_metadata import PeerMetadataExtension
from hbonex.filters.http.rbac import RbacExtension
from hbonex.filters.http.set_filter_state import SetFilterStateExtension
from hbonex.filters.listener.http_inspector import HttpInspectorExtension
from hbonex.filters.listener.original_dst import OriginalDstExtension
from hbonex.filters.listener.tls_inspector import TlsInspectorExtension
from hbonex.filters.network.connection_limit import ConnectionLimitExtension
from hbonex.filters.network.hcm_config import HttpConnectionManagerExtension, RouterExtension
from hbonex.filters.network.istio_stats import IstioStatsNetworkExtension
from hbonex.filters.network.metadata_exchange import MetadataExchangeExtension
from hbonex.filters.network.rbac import RbacNetworkExtension
from hbonex.filters.network.set_filter_state import SetFilterStateNetworkExtension
from hbonex.filters.network.tcp_proxy import TcpProxyExtension
from hbonex.network.internal_upstream import InternalUpstreamTransportSocket
from hbonex.tls.transport_sockets import RawBufferTransportSocket, TlsTransportSocket
from hbonex.upstream.cluster_types import (
    LogicalDnsClusterType,
    OriginalDstClusterType,
    StaticClusterType,
    StrictDnsClusterType,
)

tls_inspector = TlsInspectorExtension()
original_dst = OriginalDstExtension()
http_inspector = HttpInspectorExtension()
tcp_proxy = TcpProxyExtension()
connection_limit = ConnectionLimitExtension()
http_connection_manager = HttpConnectionManagerExtension()
router = RouterExtension()
set_filter_state = SetFilterStateExtension()
ext_authz = ExtAuthzExtension()
fault = FaultExtension()
local_ratelimit = LocalRateLimitExtension()
header_mutation = HeaderMutationExtension()
cors = CorsExtension()
set_filter_state_network = SetFilterStateNetworkExtension()
rbac = RbacExtension()
rbac_network = RbacNetworkExtension()
grpc_stats = GrpcStatsExtension()
peer_metadata = PeerMetadataExtension()
istio_stats = IstioStatsExtension()
istio_stats_network = IstioStatsNetworkExtension()
metadata_exchange = MetadataExchangeExtension()
static_cluster = StaticClusterType()
strict_dns_cluster = StrictDnsClusterType()
logical_dns_cluster = LogicalDnsClusterType()
original_dst_cluster = OriginalDstClusterType()
tls_transport_socket = TlsTransportSocket()
raw_buffer_transport_socket = RawBufferTransportSocket()
internal_upstream_transport_socket = InternalUpstreamTransportSocket()
