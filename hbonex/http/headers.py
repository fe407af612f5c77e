"""
An HTTP header map: ordered (name, value) pairs as bytes, names lowercase (HTTP/2 style),
pseudo-headers (``:method``, ``:path``...) first, repeated names allowed.
"""

from __future__ import annotations

from typing import Iterable, Iterator


class Headers:
    """
    Request or response headers (or trailers).  Lookups are by lowercase name.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[bytes, bytes]] = ()) -> None:
        self._items: list[tuple[bytes, bytes]] = []
        for name, value in items:
            self.add(name, value)

    @classmethod
    def of(cls, **values: str) -> Headers:
        """``Headers.of(method="GET", path="/")`` -> :method, :path (underscores are dashes)."""
        headers = cls()
        for key, value in values.items():
            name = key.replace("_", "-")
            if name in ("method", "path", "authority", "scheme", "status", "protocol"):
                name = ":" + name
            headers.add(name.encode(), value.encode())
        return headers

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, bytes):
            return False
        name = name.lower()
        return any(n == name for n, _ in self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._items == other._items

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"

    def get(self, name: bytes, default: bytes | None = None) -> bytes | None:
        """The first value of ``name``."""
        name = name.lower()
        for n, v in self._items:
            if n == name:
                return v
        return default

    def get_all(self, name: bytes) -> list[bytes]:
        name = name.lower()
        return [v for n, v in self._items if n == name]

    def joined(self, name: bytes) -> bytes | None:
        """Every value of ``name`` joined with ', ' (as HTTP allows), or None."""
        values = self.get_all(name)
        return b", ".join(values) if values else None

    def add(self, name: bytes, value: bytes) -> None:
        """Append a value; pseudo-headers stay ahead of regular ones."""
        name = name.lower()
        if name.startswith(b":"):
            index = 0
            while index < len(self._items) and self._items[index][0].startswith(b":"):
                index += 1
            self._items.insert(index, (name, value))
        else:
            self._items.append((name, value))

    def set(self, name: bytes, value: bytes) -> None:
        """Replace every value of ``name`` with one (in the first one's place)."""
        name = name.lower()
        for i, (n, _) in enumerate(self._items):
            if n == name:
                self._items[i] = (name, value)
                self._items[i + 1:] = [item for item in self._items[i + 1:] if item[0] != name]
                return
        self.add(name, value)

    def remove(self, name: bytes) -> int:
        """Remove every value of ``name``; how many there were."""
        name = name.lower()
        before = len(self._items)
        self._items = [item for item in self._items if item[0] != name]
        return before - len(self._items)

    def byte_size(self) -> int:
        """Name and value bytes, as max_request_headers_kb counts them."""
        return sum(len(n) + len(v) for n, v in self._items)

    def copy(self) -> Headers:
        headers = Headers()
        headers._items = list(self._items)
        return headers

    def items(self) -> list[tuple[bytes, bytes]]:
        return list(self._items)


def substitution_record(headers: Headers, prefix: str = "req:") -> dict[str, str]:
    """
    What %REQ(...)% (prefix ``req:``) or %RESP(...)% (``resp:``) read of these headers, for
    hbonex.observability.formatter: a repeated header's values joined with ',' (Envoy's).
    """
    record: dict[str, str] = {}
    for name, value in headers:
        key = prefix + name.decode("latin-1")
        text = value.decode("latin-1")
        record[key] = f"{record[key]},{text}" if key in record else text
    return record


__all__ = ["Headers", "substitution_record"]
