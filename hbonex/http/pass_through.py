"""
Envoy's pass-through filters (PassThroughDecoderFilter, PassThroughEncoderFilter,
PassThroughFilter): every callback continues, so a filter overrides only what it acts on.
"""

from __future__ import annotations

from typing import Any

from hbonex.http.filter_manager import (
    FilterDataStatus,
    FilterHeadersStatus,
    FilterTrailersStatus,
)
from hbonex.http.headers import Headers


class PassThroughDecoderFilter:
    """A decoder filter that lets the request through untouched."""

    decoder_callbacks: Any = None

    def setDecoderFilterCallbacks(self, callbacks: Any) -> None:
        self.decoder_callbacks = callbacks

    def decodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        return FilterHeadersStatus.Continue

    def decodeData(self, data: bytes, endStream: bool) -> Any:
        return FilterDataStatus.Continue

    def decodeTrailers(self, trailers: Headers) -> Any:
        return FilterTrailersStatus.Continue

    def onDestroy(self) -> None:
        pass


class PassThroughEncoderFilter:
    """An encoder filter that lets the response through untouched."""

    encoder_callbacks: Any = None

    def setEncoderFilterCallbacks(self, callbacks: Any) -> None:
        self.encoder_callbacks = callbacks

    def encodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        return FilterHeadersStatus.Continue

    def encodeData(self, data: bytes, endStream: bool) -> Any:
        return FilterDataStatus.Continue

    def encodeTrailers(self, trailers: Headers) -> Any:
        return FilterTrailersStatus.Continue

    def onDestroy(self) -> None:
        pass


class PassThroughFilter(PassThroughDecoderFilter, PassThroughEncoderFilter):
    """Both paths, untouched unless the subclass says otherwise."""


__all__ = ["PassThroughDecoderFilter", "PassThroughEncoderFilter", "PassThroughFilter"]
