"""
Built-in cluster types (Envoy's ``type: STATIC | STRICT_DNS | LOGICAL_DNS | ORIGINAL_DST``), as
IClusterTypeExtension plugins registered in ``twisted/plugins/hbonex_extensions.py``.
"""

from __future__ import annotations

from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.cluster import Cluster, SocketAddress
from hbonex.interfaces import IClusterTypeExtension

__all__ = [
    "LogicalDnsClusterType",
    "OriginalDstClusterType",
    "StaticClusterType",
    "StrictDnsClusterType",
]

DEFAULT_ORIGINAL_DST_HEADER = "x-envoy-original-dst-host"


@implementer(IPlugin, IClusterTypeExtension)
class _ClusterType:
    name = ""
    typeUrls: tuple[str, ...] = ()
    hostnames = False

    def parseConfig(self, config: dict[str, Any], path: str, context: Any) -> Any:
        node = context.node(config, path)
        node.finish()
        return config

    def buildCluster(self, common: Any, config: Any, path: str, context: Any) -> Cluster:
        node = context.node(config, path)
        if common.get("lb_policy") == "CLUSTER_PROVIDED":
            raise node.error(
                f"lb_policy CLUSTER_PROVIDED is only for ORIGINAL_DST clusters, not {self.name}",
                "lb_policy",
            )
        if common.get("target_policy") is not None:
            raise node.error(
                "metadata.filter_metadata.hbonex.allowed_targets applies to ORIGINAL_DST "
                f"clusters only, not {self.name}", "metadata",
            )
        endpoints = context.load_assignment(node, hostnames=self.hostnames)
        self.check_endpoints(node, endpoints)
        return Cluster(endpoints=endpoints, **common)

    def check_endpoints(self, node: Any, endpoints: tuple[Any, ...]) -> None:
        pass


class StaticClusterType(_ClusterType):
    name = "STATIC"


class StrictDnsClusterType(_ClusterType):
    name = "STRICT_DNS"
    hostnames = True


class LogicalDnsClusterType(_ClusterType):
    name = "LOGICAL_DNS"
    hostnames = True

    def check_endpoints(self, node: Any, endpoints: tuple[Any, ...]) -> None:
        if len(endpoints) != 1 or not isinstance(endpoints[0], SocketAddress):
            raise node.error(
                f"LOGICAL_DNS clusters need exactly one socket_address endpoint, "
                f"got {len(endpoints)}", "load_assignment",
            )


class OriginalDstClusterType(_ClusterType):
    """
    Connects to the destination the downstream asked for (a header such as :authority with
    ``original_dst_lb_config.use_http_header``, else the connection's original destination).
    hbonex extension: ``metadata.filter_metadata.hbonex.allowed_targets`` limits where.
    """

    name = "ORIGINAL_DST"

    def buildCluster(self, common: Any, config: Any, path: str, context: Any) -> Cluster:
        node = context.node(config, path)
        if node.has("load_assignment"):
            raise node.error(
                "ORIGINAL_DST clusters take their destination from the connection or a header "
                "and must not have a load_assignment", "load_assignment",
            )
        if common.get("lb_policy") not in ("CLUSTER_PROVIDED", "ROUND_ROBIN") or (
            node.has("lb_policy") and common.get("lb_policy") != "CLUSTER_PROVIDED"
        ):
            raise node.error(
                f"ORIGINAL_DST clusters need lb_policy CLUSTER_PROVIDED (or none), "
                f"not {common.get('lb_policy')}", "lb_policy",
            )
        common = dict(common, lb_policy="CLUSTER_PROVIDED")
        header = None
        lb_config = node.map_field("original_dst_lb_config")
        if lb_config is not None:
            if lb_config.bool_field("use_http_header"):
                header = lb_config.str_field("http_header_name", DEFAULT_ORIGINAL_DST_HEADER)
                header = header.lower() or DEFAULT_ORIGINAL_DST_HEADER
            elif lb_config.has("http_header_name"):
                raise lb_config.error(
                    "http_header_name needs use_http_header: true", "http_header_name"
                )
            lb_config.finish()
        return Cluster(original_dst_header=header, **common)
