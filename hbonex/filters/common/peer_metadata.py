"""
Istio's peer metadata (istio/proxy ``WorkloadMetadataObject``): who the workload at the other
end is, as ztunnel announces it in the W3C ``baggage`` header of its requests
(``k8s.namespace.name=default,k8s.deployment.name=curl,service.name=curl,...``).  The
``istio.peer_metadata`` filter stores it in filter state under Istio's keys; ``istio.stats``
reads it back for the ``source_*`` / ``destination_*`` labels.
"""

from __future__ import annotations

from typing import Optional
from urllib.parse import quote, unquote

import attrs

#: Istio's filter state keys (istio/proxy extensions/common/metadata_object.h).
DOWNSTREAM_PEER = "downstream_peer"
UPSTREAM_PEER = "upstream_peer"
#: The peer's SPIFFE ID, as Istio's connect_terminate listener stores it.
PEER_PRINCIPAL = "io.istio.peer_principal"

#: Baggage keys naming the workload, in Istio's order of precedence.
_WORKLOAD_KEYS = ("k8s.deployment.name", "k8s.job.name", "k8s.cronjob.name", "k8s.pod.name")
_WORKLOAD_TYPES = {"k8s.deployment.name": "deployment", "k8s.job.name": "job",
                   "k8s.cronjob.name": "cronjob", "k8s.pod.name": "pod"}


@attrs.frozen
class PeerMetadata:
    """One workload's telemetry attributes; empty strings where unknown."""

    namespace: str = ""
    cluster: str = ""
    workload: str = ""
    workload_type: str = "pod"
    instance: str = ""
    canonical_service: str = ""
    canonical_revision: str = ""
    app: str = ""
    version: str = ""

    @classmethod
    def from_baggage(cls, header: str) -> Optional[PeerMetadata]:
        """Parse a ``baggage`` header; None when it names no workload attribute at all."""
        values: dict[str, str] = {}
        for member in header.split(","):
            # A member is key=value, maybe with ;properties after the value (W3C baggage).
            key, sep, rest = member.partition("=")
            key = key.strip()
            if not sep or not key:
                continue
            values[key] = unquote(rest.split(";", 1)[0].strip())
        workload_key = next((k for k in _WORKLOAD_KEYS if values.get(k)), None)
        peer = cls(
            namespace=values.get("k8s.namespace.name", ""),
            cluster=values.get("k8s.cluster.name", ""),
            workload=values.get(workload_key, "") if workload_key else "",
            workload_type=_WORKLOAD_TYPES[workload_key] if workload_key else "pod",
            instance=values.get("k8s.pod.name", ""),
            canonical_service=values.get("service.name", ""),
            canonical_revision=values.get("service.version", ""),
            app=values.get("app.name", ""),
            version=values.get("app.version", ""),
        )
        return None if peer == cls() else peer

    def baggage(self) -> str:
        """The baggage header value naming this workload (Istio's serialisation)."""
        items = [("k8s.namespace.name", self.namespace), ("k8s.cluster.name", self.cluster),
                 ("service.name", self.canonical_service),
                 ("service.version", self.canonical_revision),
                 ("app.name", self.app), ("app.version", self.version)]
        if self.workload:
            items.append((f"k8s.{self.workload_type}.name", self.workload))
        if self.instance and self.workload_type != "pod":
            items.append(("k8s.pod.name", self.instance))
        return ",".join(f"{k}={quote(v, safe='')}" for k, v in items if v)

    def __str__(self) -> str:  # %FILTER_STATE(downstream_peer:PLAIN)%, access logs
        return self.baggage()


__all__ = ["DOWNSTREAM_PEER", "PEER_PRINCIPAL", "UPSTREAM_PEER", "PeerMetadata"]
