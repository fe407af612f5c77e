"""
``envoy.filters.http.set_filter_state``: on each request's headers, store values built from
substitution formats in the request's filter state (Envoy's FilterStateValue: ``object_key``,
``format_string``, ``read_only``, ``shared_with_upstream``, ``skip_if_empty``).  Istio's
``connect_terminate`` listener stores the CONNECT's ``%REQ(:AUTHORITY)%`` and the peer's
``%DOWNSTREAM_PEER_URI_SAN%`` this way for the filters and logs after it.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.http.filter_manager import (
    FilterDataStatus,
    FilterHeadersStatus,
    FilterTrailersStatus,
)
from hbonex.http.headers import Headers
from hbonex.http.stream_info import FilterStateError, SharedWithUpstream
from hbonex.interfaces import IHTTPFilterExtension, IStreamDecoderFilter
from hbonex.observability.formatter import Template

NAME = "envoy.filters.http.set_filter_state"
TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config"

log = Logger()


@attrs.frozen
class FilterStateValue:
    key: str
    template: Template
    read_only: bool = False
    shared: SharedWithUpstream = SharedWithUpstream.NONE
    skip_if_empty: bool = False


def substitutions(connection: Any, headers: Headers) -> dict[str, str]:
    """What the format operators read: the connection's facts and the request's headers."""
    record = dict(connection.substitutions()) if connection is not None else {}
    for name, value in headers:
        key = f"req:{name.decode('latin-1')}"
        # A repeated header reads as Envoy's: the values joined with commas.
        text = value.decode("latin-1")
        record[key] = f"{record[key]},{text}" if key in record else text
    return record


def store(values: tuple[FilterStateValue, ...], record: dict[str, str], state: Any) -> None:
    """Render each value from ``record`` into ``state`` (the HTTP and network filters' work)."""
    for value in values:
        text = value.template.render(record)
        if value.skip_if_empty and text in ("", "-"):
            continue
        try:
            state.set_data(value.key, text, value.shared, value.read_only)
        except FilterStateError as e:
            # Envoy leaves a read-only object as it is.
            log.debug("set_filter_state: {error}", error=e)


@implementer(IStreamDecoderFilter)
class SetFilterStateFilter:
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

    def decodeData(self, data: bytes, endStream: bool) -> Any:
        return FilterDataStatus.Continue

    def decodeTrailers(self, trailers: Headers) -> Any:
        return FilterTrailersStatus.Continue

    def onDestroy(self) -> None:
        pass


def parse_values(values: Any, path: str, context: Any) -> tuple[FilterStateValue, ...]:
    """Envoy's repeated FilterStateValue (shared with the network filter of the same name)."""
    from envoy.extensions.filters.common.set_filter_state.v3 import value_pb2

    shared_names = value_pb2.FilterStateValue.SharedWithUpstream
    parsed = []
    for index, value in enumerate(values):
        item = f"{path}[{index}]"
        if not value.object_key:
            raise context.error(item, "missing required field 'object_key'")
        if value.factory_key:
            raise context.error(item, "factory_key is not implemented: values are stored as "
                                "strings", "factory_key")
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
