"""
Request path normalisation, as Envoy's connection manager does it before routing (so that
routes and, later, RBAC see one spelling of a path): RFC 3986 §6 normalisation
(``normalize_path``: percent-decoding of unreserved characters, dot-segment removal),
``merge_slashes``, and ``path_with_escaped_slashes_action`` for %2F and %5C.
"""

from __future__ import annotations

import enum
import re

_UNRESERVED = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")
_ESCAPED_SLASH = re.compile(rb"%(2[Ff]|5[Cc])")


class EscapedSlashes(enum.Enum):
    """Envoy's PathWithEscapedSlashesAction."""

    KEEP_UNCHANGED = "KEEP_UNCHANGED"
    REJECT_REQUEST = "REJECT_REQUEST"
    UNESCAPE_AND_REDIRECT = "UNESCAPE_AND_REDIRECT"
    UNESCAPE_AND_FORWARD = "UNESCAPE_AND_FORWARD"


class PathRejected(Exception):
    """The path must be answered with 400 (``reason`` for the response flag details)."""


class PathRedirect(Exception):
    """The client should ask again for ``location`` (UNESCAPE_AND_REDIRECT)."""

    def __init__(self, location: bytes) -> None:
        super().__init__(location)
        self.location = location


def _decode_unreserved(path: bytes) -> bytes:
    def replace(match: re.Match[bytes]) -> bytes:
        value = int(match.group(1), 16)
        return bytes([value]) if value in _UNRESERVED else b"%" + match.group(1).upper()

    return _PERCENT.sub(replace, path)


def remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 §5.2.4 on an absolute path."""
    output: list[bytes] = []
    for segment in path.split(b"/")[1:]:
        if segment == b"..":
            if output:
                output.pop()
        elif segment != b".":
            output.append(segment)
    trailing = path.endswith((b"/.", b"/..", b"/"))
    result = b"/" + b"/".join(output)
    if trailing and not result.endswith(b"/"):
        result += b"/"
    return result


def normalize(
    path_and_query: bytes,
    normalize_path: bool = False,
    merge_slashes: bool = False,
    escaped_slashes: EscapedSlashes = EscapedSlashes.KEEP_UNCHANGED,
) -> bytes:
    """
    The path to route on.  Raises PathRejected (400) or PathRedirect.
    """
    path, sep, query = path_and_query.partition(b"?")
    if not path.startswith(b"/"):
        return path_and_query  # "*" or an authority: nothing to normalise
    escaped = escaped_slashes is not EscapedSlashes.KEEP_UNCHANGED and bool(
        _ESCAPED_SLASH.search(path)
    )
    if escaped:
        if escaped_slashes is EscapedSlashes.REJECT_REQUEST:
            raise PathRejected("path contains escaped slashes")
        path = _ESCAPED_SLASH.sub(lambda m: b"/" if m.group(1) in (b"2F", b"2f") else b"\\",
                                  path)
    if normalize_path:
        path = _decode_unreserved(path)
        path = remove_dot_segments(path)
    if merge_slashes:
        path = re.sub(rb"/{2,}", b"/", path)
    if escaped and escaped_slashes is EscapedSlashes.UNESCAPE_AND_REDIRECT:
        raise PathRedirect(path + sep + query)
    return path + sep + query


__all__ = ["EscapedSlashes", "PathRedirect", "PathRejected", "normalize", "remove_dot_segments"]
