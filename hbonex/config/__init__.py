"""
Envoy v3 static bootstrap YAML -> ``hbonex.bootstrap.Bootstrap``, through Envoy's own protos.

``schema`` turns YAML into Envoy's v3 messages (xds-protos) with positions; ``support`` is the
one table of what hbonex implements of them; ``loader`` builds the runtime objects from the
messages; ``render`` writes messages back as YAML.
"""

from hbonex.config.loader import (
    ChainInfo,
    ClusterInfo,
    ConfigContext,
    FilterInfo,
    ListenerInfo,
    LoadedConfig,
    endpoint_for,
    load_bootstrap,
    load_config,
    load_message,
)

__all__ = [
    "ChainInfo",
    "ClusterInfo",
    "ConfigContext",
    "FilterInfo",
    "ListenerInfo",
    "LoadedConfig",
    "endpoint_for",
    "load_bootstrap",
    "load_config",
    "load_message",
]
