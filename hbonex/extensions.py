"""
The extension registry: every network filter, HTTP filter, cluster type and transport socket
is a Twisted plugin (``twisted/plugins/``), found with ``getPlugins`` and looked up by its
``@type`` URL or Envoy name.  Built-ins register exactly as third-party dropins do.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from twisted.plugin import getPlugins

from hbonex.errors import ConfigError
from hbonex.interfaces import IExtension

_cache: dict[Any, list[Any]] = {}


def extensions(interface: Any, refresh: bool = False) -> list[Any]:
    """
    Every plugin providing ``interface`` (de-duplicated by name: a package installed and also
    on sys.path from a checkout shows up twice).
    """
    if refresh or interface not in _cache:
        import twisted.plugins

        seen: dict[str, Any] = {}
        for plugin in getPlugins(interface, twisted.plugins):
            seen.setdefault(plugin.name, plugin)
        _cache[interface] = sorted(seen.values(), key=lambda p: p.name)
    return _cache[interface]


def resolve(
    interface: Any,
    path: str,
    *,
    name: Optional[str] = None,
    type_url: Optional[str] = None,
    what: str = "extension",
) -> Any:
    """
    The plugin for ``type_url`` (preferred) or ``name``; a ConfigError listing the known ones
    otherwise.
    """
    plugins = extensions(interface)
    if type_url:
        for plugin in plugins:
            if type_url in plugin.typeUrls:
                return plugin
        known = sorted(url for p in plugins for url in p.typeUrls)
        raise ConfigError(
            f"{path}.typed_config.@type",
            f"unknown {what} type {type_url!r}; known: {', '.join(known) or 'none'}",
        )
    if name:
        for plugin in plugins:
            if plugin.name == name:
                return plugin
    raise ConfigError(
        f"{path}.name",
        f"unknown {what} {name!r}; known: {', '.join(p.name for p in plugins) or 'none'}",
    )


def names(plugins: Iterable[IExtension]) -> list[str]:
    return [p.name for p in plugins]
