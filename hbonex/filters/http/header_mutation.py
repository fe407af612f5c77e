"""
``envoy.filters.http.header_mutation``: change request and response headers (and trailers)
with Envoy's ordered mutation lists: ``append`` (a HeaderValueOption whose value is a
substitution format: ``%REQ(...)%``, ``%RESP(...)%`` on the response,
``%DOWNSTREAM_PEER_URI_SAN%``, ``%FILTER_STATE(key:PLAIN)%``...), ``remove``, and
``remove_on_match``.  The filter's own mutations run first, then those of the route's
``typed_per_filter_config`` levels (HeaderMutationPerRoute): the most specific level first,
so the most general has the last word, or the reverse with
``most_specific_header_mutations_wins``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import attrs
from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.config.route_config import header_value_option
from hbonex.filters.http.set_filter_state import substitutions
from hbonex.http.filter_manager import (
    FilterHeadersStatus,
    FilterTrailersStatus,
)
from hbonex.http.headers import Headers, substitution_record
from hbonex.http.matchers import StringMatcher
from hbonex.http.pass_through import PassThroughFilter
from hbonex.http.routing import HeaderMutation
from hbonex.interfaces import IHTTPFilterPerRouteExtension, IStreamFilter
from hbonex.tls.transport_sockets import string_matcher

NAME = "envoy.filters.http.header_mutation"
_PACKAGE = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3"
TYPE_URL = f"{_PACKAGE}.HeaderMutation"
PER_ROUTE_TYPE_URL = f"{_PACKAGE}.HeaderMutationPerRoute"


@attrs.frozen
class RemoveHeader:
    name: bytes

    def apply(self, headers: Headers, record: Mapping[str, str]) -> None:
        headers.remove(self.name)


@attrs.frozen
class RemoveMatching:
    """``remove_on_match``: every header whose name the matcher matches (pseudo-headers stay)."""

    matcher: StringMatcher

    def apply(self, headers: Headers, record: Mapping[str, str]) -> None:
        names = {n for n, _ in headers if not n.startswith(b":")}
        for name in names:
            if self.matcher.matches(name.decode("latin-1")):
                headers.remove(name)


Operation = HeaderMutation | RemoveHeader | RemoveMatching


@attrs.frozen
class MutationList:
    """One ordered list of header mutations (Envoy's Http::HeaderMutations)."""

    operations: tuple[Operation, ...] = ()
    #: %REQ% (or %RESP%) reads these very headers, as they are when each value is made.
    prefix: str = "req:"

    def apply(self, headers: Headers, base: Callable[[], dict[str, str]]) -> None:
        record: dict[str, str] | None = None
        for op in self.operations:
            if isinstance(op, HeaderMutation) and not op.value.constant:
                # Envoy's formatter reads the live header map: earlier changes show.
                if record is None:
                    record = base()
                if self.prefix:
                    record.update(substitution_record(headers, self.prefix))
            op.apply(headers, record or {})


@attrs.frozen
class Mutations:
    """Envoy's header_mutation Mutations (the filter's, or one route level's)."""

    request: MutationList = MutationList()
    response: MutationList = MutationList(prefix="resp:")
    request_trailers: MutationList = MutationList(prefix="")
    response_trailers: MutationList = MutationList(prefix="")


@attrs.frozen
class HeaderMutationConfig:
    mutations: Mutations = Mutations()
    most_specific_wins: bool = False


@implementer(IStreamFilter)
class HeaderMutationFilter(PassThroughFilter):
    """One per request."""

    def __init__(self, config: HeaderMutationConfig) -> None:
        self.config = config
        self.decoder: Any = None
        self.encoder: Any = None
        self._levels: tuple[Mutations, ...] | None = None
        self._request: Headers | None = None
        self._response: Headers | None = None

    def setDecoderFilterCallbacks(self, callbacks: Any) -> None:
        self.decoder = callbacks

    def setEncoderFilterCallbacks(self, callbacks: Any) -> None:
        self.encoder = callbacks

    def _all(self, callbacks: Any) -> tuple[Mutations, ...]:
        """The filter's mutations, then each route level's, in the order they apply."""
        if self._levels is None:
            # Least specific first: reversed unless the most specific is to win (run last).
            levels = tuple(callbacks.perFilterConfigs())
            if not self.config.most_specific_wins:
                levels = levels[::-1]
            self._levels = levels
        return (self.config.mutations, *self._levels)

    def _record(self, callbacks: Any) -> dict[str, str]:
        record = substitutions(callbacks.connection(), self._request or Headers())
        state = callbacks.streamInfo().filter_state
        if not state.is_empty():
            # The request's filter state over its connection's (Envoy's stream filter state).
            record.update((f"fs:{key}", str(state.get_data(key))) for key in state.keys())
        if self._response is not None:
            record.update(substitution_record(self._response, "resp:"))
            record["response_code"] = (self._response.get(b":status") or b"").decode()
        return record

    def _run(self, callbacks: Any, lists: Sequence[MutationList], headers: Headers) -> None:
        for mutations in lists:
            if mutations.operations:
                mutations.apply(headers, lambda: self._record(callbacks))

    def decodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        self._request = headers
        self._run(self.decoder, [m.request for m in self._all(self.decoder)], headers)
        return FilterHeadersStatus.Continue


    def decodeTrailers(self, trailers: Headers) -> Any:
        self._run(self.decoder, [m.request_trailers for m in self._all(self.decoder)],
                  trailers)
        return FilterTrailersStatus.Continue

    def encodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        self._response = headers
        self._run(self.encoder, [m.response for m in self._all(self.encoder)], headers)
        return FilterHeadersStatus.Continue


    def encodeTrailers(self, trailers: Headers) -> Any:
        self._run(self.encoder, [m.response_trailers for m in self._all(self.encoder)],
                  trailers)
        return FilterTrailersStatus.Continue

    def onDestroy(self) -> None:
        self._request = self._response = None


def _operations(items: Any, path: str, context: Any, prefix: str) -> MutationList:
    """A repeated envoy.config.common.mutation_rules.v3.HeaderMutation."""
    ops: list[Operation] = []
    for index, item in enumerate(items):
        where = f"{path}[{index}]"
        action = item.WhichOneof("action")
        if action == "append":
            ops.append(header_value_option(item.append, f"{where}.append", context,
                                           pseudo=True))
        elif action == "remove":
            name = item.remove.lower()
            if not name:
                raise context.error(where, "remove needs a header name", "remove")
            if name.startswith(":") or name == "host":
                raise context.error(where, f"header {name!r} cannot be removed (a request or "
                                    "response needs it)", "remove")
            ops.append(RemoveHeader(name.encode("latin-1")))
        elif action == "remove_on_match":
            match = item.remove_on_match
            if not match.HasField("key_matcher"):
                raise context.error(f"{where}.remove_on_match",
                                    "missing required field 'key_matcher'")
            ops.append(RemoveMatching(string_matcher(
                match.key_matcher, f"{where}.remove_on_match.key_matcher", context)))
        else:
            raise context.error(where, "one of append, remove, remove_on_match is required")
    return MutationList(tuple(ops), prefix)


def parse_mutations(message: Any, path: str, context: Any) -> Mutations:
    """Envoy's header_mutation.v3.Mutations."""
    return Mutations(
        request=_operations(message.request_mutations, f"{path}.request_mutations", context,
                            "req:"),
        response=_operations(message.response_mutations, f"{path}.response_mutations",
                             context, "resp:"),
        # Trailers are not headers %REQ%/%RESP% read: the headers' values stand.
        request_trailers=_operations(message.request_trailers_mutations,
                                     f"{path}.request_trailers_mutations", context, ""),
        response_trailers=_operations(message.response_trailers_mutations,
                                      f"{path}.response_trailers_mutations", context, ""),
    )


@implementer(IPlugin, IHTTPFilterPerRouteExtension)
class HeaderMutationExtension:
    name = NAME
    typeUrls = (TYPE_URL,)
    perRouteTypeUrls = (PER_ROUTE_TYPE_URL,)

    def parseConfig(self, config: Any, path: str, context: Any) -> HeaderMutationConfig:
        return HeaderMutationConfig(
            parse_mutations(config.mutations, f"{path}.mutations", context),
            config.most_specific_header_mutations_wins)

    def parsePerRouteConfig(self, config: Any, path: str, context: Any) -> Mutations:
        return parse_mutations(config.mutations, f"{path}.mutations", context)

    def filterFactory(self, parsed: Any, context: Any
                      ) -> Callable[[], HeaderMutationFilter]:
        return lambda: HeaderMutationFilter(parsed)


__all__ = ["HeaderMutationExtension", "HeaderMutationFilter"]
