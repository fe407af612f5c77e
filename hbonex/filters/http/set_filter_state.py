"""
``envoy.filters.http.set_filter_state``: on each request's headers, store values built from
substitution formats in the request's filter state (Envoy's FilterStateValue: ``object_key``,
``factory_key``, ``format_string``, ``read_only``, ``shared_with_upstream``,
``skip_if_empty``).  Istio's
``connect_terminate`` listener stores the CONNECT's ``%REQ(:AUTHORITY)%`` and the peer's
``%DOWNSTREAM_PEER_URI_SAN%`` this way for the filters and logs after it.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable

import attrs
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.http.filter_manager import (
    FilterHeadersStatus,
)
from hbonex.http.headers import Headers, substitution_record
from hbonex.http.pass_through import PassThroughDecoderFilter
from hbonex.http.stream_info import FilterStateError, SharedWithUpstream
from hbonex.interfaces import IHTTPFilterExtension, IStreamDecoderFilter
from hbonex.observability.formatter import Template

NAME = "envoy.filters.http.set_filter_state"
TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config"

log = Logger()


def _address(text: str) -> str | None:
    """An ``IP:PORT`` object (IPv6 in brackets), or None when the text is not one."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return None
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        return None
    # IPv6 with a port takes brackets (fd00::1:443 would be ambiguous).
    return text if bracketed == (ip.version == 6) else None


def _string(text: str) -> str | None:
    return text


#: Envoy's object factories (by ``factory_key``, else by ``object_key``): what a value is
#: made into. Objects are kept as their text; an address that does not parse is not stored.
OBJECT_FACTORIES: dict[str, Callable[[str], str | None]] = {
    "envoy.string": _string,
    "envoy.filters.listener.original_dst.local_ip": _address,
    "envoy.filters.listener.original_dst.remote_ip": _address,
    "envoy.network.transport_socket.original_dst_address": _address,
    "envoy.network.upstream_server_name": _string,
    "envoy.network.application_protocols": _string,
    "envoy.network.upstream_subject_alt_names": _string,
    "envoy.tcp_proxy.cluster": _string,
}


@attrs.frozen
class FilterStateValue:
    key: str
    template: Template
    read_only: bool = False
    shared: SharedWithUpstream = SharedWithUpstream.NONE
    skip_if_empty: bool = False
    factory: Callable[[str], str | None] = _string


def substitutions(connection: Any, headers: Headers) -> dict[str, str]:
    """What the format operators read: the connection's facts and the request's headers."""
    record = dict(connection.substitutions()) if connection is not None else {}
    record.update(substitution_record(headers))
    return record


def store(values: tuple[FilterStateValue, ...], record: dict[str, str], state: Any) -> None:
    """Render each value from ``record`` into ``state`` (the HTTP and network filters' work)."""
    for value in values:
        text = value.template.render(record)
        if value.skip_if_empty and text in ("", "-"):
            continue
        made = value.factory(text)
        if made is None:
            log.debug("set_filter_state: {key}: {text!r} is not a valid value",
                      key=value.key, text=text)
            continue
        try:
            state.set_data(value.key, made, value.shared, value.read_only)
        except FilterStateError as e:
            # Envoy leaves a read-only object as it is.
            log.debug("set_filter_state: {error}", error=e)


@implementer(IStreamDecoderFilter)
class SetFilterStateFilter(PassThroughDecoderFilter):
    """One per request."""

    def __init__(self, values: tuple[FilterStateValue, ...]) -> None:
        self.values = values
        self.callbacks: Any = None

    def setDecoderFilterCallbacks(self, callbacks: Any) -> None:
        self.callbacks = callbacks

    def decodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        record = substitutions(self.callbacks.connection(), headers)
        store(self.values, record, self.callbacks.streamInfo().filter_state)
        return FilterHeadersStatus.Continue


def parse_values(values: Any, path: str, context: Any) -> tuple[FilterStateValue, ...]:
    """Envoy's repeated FilterStateValue (shared with the network filter of the same name)."""
    from envoy.extensions.filters.common.set_filter_state.v3 import value_pb2

    shared_names = value_pb2.FilterStateValue.SharedWithUpstream
    parsed = []
    for index, value in enumerate(values):
        item = f"{path}[{index}]"
        if not value.object_key:
            raise context.error(item, "missing required field 'object_key'")
        factory_key = value.factory_key or value.object_key
        factory = OBJECT_FACTORIES.get(factory_key)
        if factory is None:
            where = f"{item}.factory_key" if value.factory_key else f"{item}.object_key"
            raise context.error(
                where, f"{factory_key!r} does not have an object factory (Envoy's message); "
                "set factory_key: envoy.string to store the value as a string, or use one of "
                + ", ".join(sorted(OBJECT_FACTORIES)))
        if not value.HasField("format_string"):
            raise context.error(item, "missing required field 'format_string'")
        fmt = value.format_string
        kind = fmt.WhichOneof("format")
        where = f"{item}.format_string"
        if kind == "text_format":
            text, where = fmt.text_format, f"{where}.text_format"
        elif kind == "text_format_source" and fmt.text_format_source.WhichOneof(
                "specifier") == "inline_string":
            text = fmt.text_format_source.inline_string
            where = f"{where}.text_format_source.inline_string"
        else:
            raise context.error(where, "a filter state value is text: use text_format or "
                                "text_format_source.inline_string")
        parsed.append(FilterStateValue(
            key=value.object_key,
            template=context.template(text, where),
            read_only=value.read_only,
            shared=SharedWithUpstream(shared_names.Name(value.shared_with_upstream)),
            skip_if_empty=value.skip_if_empty,
            factory=factory,
        ))
    return tuple(parsed)


@implementer(IPlugin, IHTTPFilterExtension)
class SetFilterStateExtension:
    name = NAME
    typeUrls = (TYPE_URL,)

    def parseConfig(self, config: Any, path: str, context: Any
                    ) -> tuple[FilterStateValue, ...]:
        return parse_values(config.on_request_headers, f"{path}.on_request_headers", context)

    def filterFactory(self, parsed: Any, context: Any) -> Callable[[], SetFilterStateFilter]:
        return lambda: SetFilterStateFilter(parsed)


__all__ = ["SetFilterStateExtension", "SetFilterStateFilter"]
