"""
YAML with positions, and a walker that names every value by its path.

``load_yaml`` parses with ``yaml.SafeLoader`` into dicts and lists that remember where each key
and value was (``MarkedDict`` / ``MarkedList``); a syntax error becomes a ConfigError
``FILE:LINE:COLUMN: problem``.  ``Node`` walks the result: typed getters that fail with the
exact path (``static_resources.listeners[1].filter_chains[0]...``) and line, and ``finish()``
that rejects every key nobody asked for, suggesting the closest accepted one.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Iterator, Optional, Sequence

import yaml

from hbonex.errors import ConfigError

__all__ = ["MarkedDict", "MarkedList", "Node", "load_yaml", "to_plain"]


class MarkedDict(dict):  # type: ignore[type-arg]
    """
    A mapping from YAML that knows where it and each of its keys and values were.
    """

    mark: Any = None
    key_marks: dict[Any, Any]
    value_marks: dict[Any, Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key_marks = {}
        self.value_marks = {}

    def without(self, *keys: str) -> MarkedDict:
        """
        A copy without ``keys`` (e.g. ``@type``), marks kept.
        """
        copy = MarkedDict((k, v) for k, v in self.items() if k not in keys)
        copy.mark = self.mark
        copy.key_marks = {k: m for k, m in self.key_marks.items() if k not in keys}
        copy.value_marks = {k: m for k, m in self.value_marks.items() if k not in keys}
        return copy


class MarkedList(list):  # type: ignore[type-arg]
    mark: Any = None
    item_marks: list[Any]

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.item_marks = []


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> MarkedDict:
    loader.flatten_mapping(node)
    result = MarkedDict()
    result.mark = node.start_mark
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                "found an unhashable key", key_node.start_mark,
            )
        if key in result:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r}", key_node.start_mark,
            )
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_marks[key] = key_node.start_mark
        result.value_marks[key] = value_node.start_mark
    return result


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> MarkedList:
    result = MarkedList()
    result.mark = node.start_mark
    for child in node.value:
        result.append(loader.construct_object(child, deep=True))
        result.item_marks.append(child.start_mark)
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def load_yaml(text: str, filename: str = "<config>") -> Any:
    """
    Parse ``text``; syntax errors become ``ConfigError('', 'FILE:LINE:COLUMN: problem')``.
    """
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "invalid YAML"
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
        context = f" ({e.context})" if e.context and e.problem else ""
        raise ConfigError("", f"{where}: {problem}{context}")
    except yaml.YAMLError as e:
        raise ConfigError("", f"{filename}: {e}")


def to_plain(value: Any) -> Any:
    """
    Plain dicts and lists (for storing or dumping).
    """
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    return value


_IDENT = re.compile(r"[A-Za-z_@][A-Za-z0-9_@]*\Z")
_DURATION = re.compile(r"(-?)(\d+)(?:\.(\d{1,9}))?s\Z")
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def child_path(path: str, key: Any) -> str:
    text = str(key)
    if not _IDENT.match(text):
        text = f'"{text}"'
        return f"{path}[{text}]" if path else f"[{text}]"
    return f"{path}.{text}" if path else text


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _show(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return _type_name(value)
    if isinstance(value, str):
        return repr(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


_MISSING = object()


class Node:
    """
    One value of the configuration, with its path and position.  Mapping nodes remember
    which keys were read, so ``finish()`` can reject the others.
    """

    def __init__(self, value: Any, path: str = "", mark: Any = None) -> None:
        self.value = value
        self.path = path
        self.mark = mark if mark is not None else getattr(value, "mark", None)
        self.used: set[Any] = set()
        self._children: dict[Any, Node] = {}

    # -- errors ---------------------------------------------------------------------------------

    @property
    def line(self) -> int | None:
        return self.mark.line + 1 if self.mark is not None else None

    def error(self, message: str, key: Any = _MISSING) -> ConfigError:
        """
        A ConfigError at this node (or at its ``key``), with the line appended when known.
        """
        path, mark = self.path, self.mark
        if key is not _MISSING:
            path = child_path(self.path, key)
            marks = getattr(self.value, "key_marks", None)
            if marks and key in marks:
                mark = marks[key]
        if mark is not None:
            message = f"{message} (line {mark.line + 1})"
        return ConfigError(path, message)

    def wrap(self, error: ConfigError) -> ConfigError:
        """
        ``error`` (raised by code that only knew a path) with this node's line added.
        """
        if self.mark is None or "(line " in error.message:
            return error
        return ConfigError(error.path or self.path, f"{error.message} (line {self.line})")

    # -- structure ------------------------------------------------------------------------------

    def is_map(self) -> bool:
        return isinstance(self.value, dict)

    def expect_map(self, what: str = "a mapping") -> Node:
        if self.value is None:
            self.value = MarkedDict()
        if not isinstance(self.value, dict):
            raise self.error(f"expected {what}, got {_show(self.value)}")
        return self

    def has(self, key: str) -> bool:
        return isinstance(self.value, dict) and self.value.get(key) is not None

    def keys(self) -> list[Any]:
        return list(self.value) if isinstance(self.value, dict) else []

    def get(self, key: str) -> Optional[Node]:
        """
        The child at ``key`` (marked as read), or None when absent or null.
        """
        self.expect_map()
        self.used.add(key)
        if key not in self.value or self.value[key] is None:
            return None
        child = self._children.get(key)
        if child is None:
            marks = getattr(self.value, "value_marks", {})
            child = Node(self.value[key], child_path(self.path, key), marks.get(key))
            self._children[key] = child
        return child

    def require(self, key: str, what: str = "") -> Node:
        child = self.get(key)
        if child is None:
            message = f"missing required field '{key}'{what}"
            unread = [str(k) for k in self.keys() if k not in self.used]
            close = difflib.get_close_matches(key, unread, n=1, cutoff=0.6)
            if close:
                message += f" (is {close[0]!r} a misspelling of it?)"
            raise self.error(message)
        return child

    def ignore(self, *keys: str) -> None:
        """
        Accept ``keys`` without using them (documented as ignored).
        """
        self.used.update(keys)

    def items(self) -> Iterator[tuple[Any, Node]]:
        """
        Every (key, child) of a mapping with free-form keys.
        """
        self.expect_map()
        for key in list(self.value):
            child = self.get(key)
            if child is not None:
                yield key, child

    def elements(self) -> list[Node]:
        if self.value is None:
            return []
        if not isinstance(self.value, list):
            raise self.error(f"expected a list, got {_show(self.value)}")
        marks = getattr(self.value, "item_marks", [])
        return [
            Node(v, f"{self.path}[{i}]", marks[i] if i < len(marks) else None)
            for i, v in enumerate(self.value)
        ]

    def finish(self, extra_accepted: Sequence[str] = ()) -> None:
        """
        Reject keys nobody read: ``PATH.key: unknown field 'key'; accepted here: ...``.
        """
        if not isinstance(self.value, dict):
            return
        accepted = sorted({str(k) for k in self.used} | set(extra_accepted))
        for key in self.value:
            if key in self.used:
                continue
            message = f"unknown field {str(key)!r}; accepted here: {', '.join(accepted) or 'none'}"
            hint = _suggest(str(key), accepted)
            if hint:
                message += f" (did you mean {hint!r}?)"
            raise self.error(message, key)

    # -- typed getters --------------------------------------------------------------------------

    def str_field(
        self, key: str, default: Any = None, *, required: bool = False,
        choices: Sequence[str] = (),
    ) -> Any:
        child = self.require(key) if required else self.get(key)
        if child is None:
            return default
        return child.as_str(choices)

    def as_str(self, choices: Sequence[str] = ()) -> str:
        value = self.value
        if not isinstance(value, str):
            raise self.error(f"expected a string, got {_show(value)}")
        if choices and value not in choices:
            message = f"{value!r} is not one of {', '.join(choices)}"
            hint = _suggest(value, list(choices))
            if hint:
                message += f" (did you mean {hint!r}?)"
            raise self.error(message)
        return value

    def int_field(
        self, key: str, default: Any = None, *, required: bool = False,
        minimum: int | None = None, maximum: int | None = None,
    ) -> Any:
        child = self.require(key) if required else self.get(key)
        if child is None:
            return default
        return child.as_int(minimum, maximum)

    def as_int(self, minimum: int | None = None, maximum: int | None = None) -> int:
        value = self.value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit() and value.isascii():
            value = int(value)  # protobuf JSON accepts integers as strings
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"expected an integer, got {_show(self.value)}")
        if minimum is not None and value < minimum:
            raise self.error(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.error(f"must be at most {maximum}, got {value}")
        return value

    def bool_field(self, key: str, default: bool = False) -> bool:
        child = self.get(key)
        if child is None:
            return default
        if not isinstance(child.value, bool):
            raise child.error(f"expected true or false, got {_show(child.value)}")
        return child.value

    def duration_field(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        child = self.require(key) if required else self.get(key)
        if child is None:
            return default
        return child.as_duration()

    def as_duration(self) -> float:
        """
        Envoy durations: ``"5s"``, ``"0.25s"``, or ``{seconds: 5, nanos: 0}``; never negative.
        """
        value = self.value
        if isinstance(value, str):
            m = _DURATION.match(value.strip())
            if m and not m.group(1):
                return int(m.group(2)) + (int((m.group(3) or "0").ljust(9, "0")) / 1e9)
        elif isinstance(value, dict):
            seconds = self.int_field("seconds", 0, minimum=0)
            nanos = self.int_field("nanos", 0, minimum=0, maximum=999_999_999)
            self.finish()
            return seconds + nanos / 1e9
        raise self.error(f"expected a duration like '5s', got {_show(value)}")

    def list_field(self, key: str, *, required: bool = False) -> list[Node]:
        child = self.require(key) if required else self.get(key)
        if child is None:
            return []
        elements = child.elements()
        if required and not elements:
            raise child.error("must not be empty")
        return elements

    def str_list_field(self, key: str) -> list[str]:
        return [e.as_str() for e in self.list_field(key)]

    def map_field(self, key: str, *, required: bool = False) -> Optional[Node]:
        child = self.require(key) if required else self.get(key)
        if child is None:
            return None
        return child.expect_map()

    def oneof(self, *keys: str, required: bool = True) -> Optional[tuple[str, Node]]:
        """
        The one of ``keys`` that is set (as Envoy's protobuf oneofs): an error if several are,
        or (``required``) none.
        """
        self.expect_map()
        present = [k for k in keys if self.has(k)]
        self.used.update(keys)
        if len(present) > 1:
            raise self.error(f"only one of {', '.join(present)} may be set", present[1])
        if not present:
            if required:
                raise self.error(f"one of {', '.join(keys)} is required")
            return None
        child = self.get(present[0])
        assert child is not None
        return present[0], child


def _suggest(key: str, accepted: Sequence[str]) -> str | None:
    snake = _CAMEL.sub("_", key).lower()
    if snake != key and snake in accepted:
        return snake
    close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
    return close[0] if close else None
