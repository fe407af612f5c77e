"""
Built-in cluster types (Envoy's ``type: STATIC | STRICT_DNS | LOGICAL_DNS | ORIGINAL_DST``), as
IClusterTypeExtension plugins registered in ``twisted/plugins/hbonex_extensions.py``.
"""

from __future__ import annotations

from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.interfaces import IClusterTypeExtension
from hbonex.upstream.cluster import Cluster, SocketAddress

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

    def parseConfig(self, config: Any, path: str, context: Any) -> Any:
        return config

    def buildCluster(self, common: Any, config: Any, path: str, context: Any) -> Cluster:
        if common.get("lb_policy") == "CLUSTER_PROVIDED":
            raise context.error(
                path,
                f"lb_policy CLUSTER_PROVIDED is only for ORIGINAL_DST clusters, not {self.name}",
                "lb_policy",
            )
        if common.get("target_policy") is not None:
            raise context.error(
                path, "metadata.filter_metadata.hbonex.allowed_targets applies to ORIGINAL_DST "
                f"clusters only, not {self.name}", "metadata",
            )
        endpoints = context.load_assignment(config, path, hostnames=self.hostnames)
        self.check_endpoints(config, path, endpoints, context)
        return Cluster(endpoints=endpoints, **common)

    def check_endpoints(self, config: Any, path: str, endpoints: tuple[Any, ...],
                        context: Any) -> None:
        pass


class StaticClusterType(_ClusterType):
    name = "STATIC"


class StrictDnsClusterType(_ClusterType):
    name = "STRICT_DNS"
    hostnames = True


class LogicalDnsClusterType(_ClusterType):
    name = "LOGICAL_DNS"
    hostnames = True

    def check_endpoints(self, config: Any, path: str, endpoints: tuple[Any, ...],
                        context: Any) -> None:
        if len(endpoints) != 1 or not isinstance(endpoints[0], SocketAddress):
            raise context.error(path,
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
        if config.HasField("load_assignment"):
            raise context.error(
                path, "ORIGINAL_DST clusters take their destination from the connection or a "
                "header and must not have a load_assignment", "load_assignment",
            )
        explicit = context.has(f"{path}.lb_policy")
        if common.get("lb_policy") not in ("CLUSTER_PROVIDED", "ROUND_ROBIN") or (
            explicit and common.get("lb_policy") != "CLUSTER_PROVIDED"
        ):
            raise context.error(
                path, f"ORIGINAL_DST clusters need lb_policy CLUSTER_PROVIDED (or none), "
                f"not {common.get('lb_policy')}", "lb_policy",
            )
        common = dict(common, lb_policy="CLUSTER_PROVIDED")
        header = None
        metadata_key = None
        port_override = None
        if config.HasField("original_dst_lb_config"):
            lb_config = config.original_dst_lb_config
            where = f"{path}.original_dst_lb_config"
            if lb_config.use_http_header:
                header = lb_config.http_header_name.lower() or DEFAULT_ORIGINAL_DST_HEADER
            elif lb_config.http_header_name:
                raise context.error(where, "http_header_name needs use_http_header: true",
                                    "http_header_name")
            if lb_config.HasField("metadata_key"):
                key = lb_config.metadata_key
                if not key.key:
                    raise context.error(f"{where}.metadata_key", "missing required field "
                                        "'key' (the filter_metadata namespace)")
                steps = []
                for index, segment in enumerate(key.path):
                    if not segment.key:
                        raise context.error(f"{where}.metadata_key.path[{index}]",
                                            "missing required field 'key'")
                    steps.append(segment.key)
                metadata_key = (key.key, tuple(steps))
            if lb_config.HasField("upstream_port_override"):
                port_override = lb_config.upstream_port_override.value
                if not 0 < port_override < 65536:
                    raise context.error(f"{where}.upstream_port_override",
                                        f"must be a port (1-65535), got {port_override}")
        return Cluster(original_dst_header=header, original_dst_metadata_key=metadata_key,
                       upstream_port_override=port_override, **common)
