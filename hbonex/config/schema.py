"""
YAML -> Envoy's v3 protobuf messages (xds-protos), with positions.

``to_message`` walks the YAML mapping along the message descriptor and fills the message field
by field, so every problem is reported at its YAML path and line in hbonex's words: unknown
fields list the message's own fields (with a "did you mean"), scalars say what was expected,
enums list their values.  ``typed_config`` (``google.protobuf.Any``) is resolved by its
``@type``, importing the xds-protos module that defines it on first use.  Protobuf's own error
text is never shown.  ``Positions`` remembers where each path was, for the errors that later
steps (message -> runtime objects) raise.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import importlib
import importlib.util
import math
import re
from pathlib import Path
from typing import Any, Optional

from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from hbonex.config.yamlpath import child_path
from hbonex.errors import ConfigError

__all__ = ["Positions", "message_class", "to_message", "type_name"]

TYPE_PREFIX = "type.googleapis.com/"
_DURATION = re.compile(r"(-?)(\d+)(?:\.(\d{1,9}))?s\Z")
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")
_WRAPPERS = {
    f"google.protobuf.{n}Value"
    for n in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
}
#: Types whose JSON form is not a mapping of their fields: parsed by json_format, errors ours.
_JSON_FORMS = {
    "google.protobuf.Struct": "a mapping",
    "google.protobuf.Value": "a value",
    "google.protobuf.ListValue": "a list",
    "google.protobuf.Timestamp": "an RFC 3339 timestamp",
    "google.protobuf.FieldMask": "a field mask",
}
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_FLOATS = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)
#: Unknown fields list every accepted field up to this many, else the implemented ones.
MAX_LISTED = 15


class Positions:
    """
    Where each YAML path was: the line of its key (``keys``) and of its value (``values``),
    and the YAML value of each TypedStruct ``value`` (plugins parse it with positions).
    """

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}
        self.values: dict[str, Any] = {}
        self.raw: dict[str, Any] = {}

    def has(self, path: str) -> bool:
        """
        Whether the YAML set ``path`` (proto3 scalars cannot tell a default from absent).
        """
        return path in self.keys or path in self.values

    def line(self, path: str, *, key: bool = False) -> Optional[int]:
        """
        The line of ``path`` (its key's with ``key``, else its value's), else of the nearest
        enclosing path that has one.
        """
        while True:
            first, second = (self.keys, self.values) if key else (self.values, self.keys)
            mark = first.get(path) or second.get(path)
            if mark is not None:
                return int(mark.line) + 1
            if not path:
                return None
            path = _parent(path)

    def error(self, path: str, message: str, key: Optional[str] = None) -> ConfigError:
        """
        A ConfigError at ``path`` (or at ``path.key``, on the key's line), line appended.
        """
        if key is not None:
            path = child_path(path, key)
        line = self.line(path, key=key is not None)
        return ConfigError(path, f"{message} (line {line})" if line is not None else message)


def _repeated(field: FieldDescriptor) -> bool:
    # protobuf >= 5.29 has is_repeated; 7 dropped label.
    flag = getattr(field, "is_repeated", None)
    if flag is not None:
        return bool(flag)
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)  # type: ignore[attr-defined]


def _parent(path: str) -> str:
    if path.endswith("]"):
        return path[: path.rindex("[")]
    cut = path.rfind(".")
    return path[:cut] if cut > 0 else ""


# -- types ----------------------------------------------------------------------------------------

_pool = descriptor_pool.Default()
_imported: set[str] = set()


#: Envoy's wrappers for a plugin's own config given as a plain struct.
TYPED_STRUCTS = ("xds.type.v3.TypedStruct", "udpa.type.v1.TypedStruct")


def type_name(type_url: str) -> str:
    return type_url.rsplit("/", 1)[-1]


def _import_package(full_name: str) -> None:
    """
    Import every ``*_pb2`` module of the xds-protos package that may define ``full_name``
    (a type's file is not derivable from its name, its package directory is).
    """
    parts = full_name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        package = ".".join(parts[:cut])
        if package in _imported:
            continue
        _imported.add(package)
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        for location in spec.submodule_search_locations:
            for module in sorted(Path(location).glob("*_pb2.py")):
                try:
                    importlib.import_module(f"{package}.{module.stem}")
                except Exception:  # a broken module must not hide the others
                    continue
        return


def descriptor_of(full_name: str) -> Optional[Descriptor]:
    """
    The descriptor of message type ``full_name``, importing its module if needed.
    """
    try:
        return _pool.FindMessageTypeByName(full_name)
    except KeyError:
        pass
    _import_package(full_name)
    try:
        return _pool.FindMessageTypeByName(full_name)
    except KeyError:
        return None


def message_class(full_name: str) -> Optional[type[Message]]:
    descriptor = descriptor_of(full_name)
    if descriptor is None:
        return None
    return message_factory.GetMessageClass(descriptor)  # type: ignore[no-any-return]


# -- YAML -> message ------------------------------------------------------------------------------


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return repr(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def suggest(key: str, accepted: list[str]) -> Optional[str]:
    snake = _CAMEL.sub("_", key).lower()
    if snake != key and snake in accepted:
        return snake
    close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
    return close[0] if close else None


class _Walker:
    def __init__(self, positions: Positions, resolve_any: Any) -> None:
        self.positions = positions
        #: (path, type_url) -> error or None: lets the caller word unknown @types by slot.
        self.resolve_any = resolve_any
        #: The message whose field is being filled (an Any's slot: filter, socket, ...).
        self.parent = ""
        #: Filling a message that says ``is_optional: true`` (Envoy's HttpFilter,
        #: FilterConfig): an Any of a type no compiled proto defines is kept as a bare type URL
        #: for the builder to skip, not refused here.
        self.optional = False

    def error(self, path: str, message: str, *, key: bool = False) -> ConfigError:
        return self.positions.error(path, message) if not key else ConfigError(
            path, f"{message} (line {self.positions.line(path, key=True)})"
        )

    def fill(self, target: Message, value: Any, path: str) -> None:
        descriptor = target.DESCRIPTOR
        full = descriptor.full_name
        if full == "google.protobuf.Any":
            self.fill_any(target, value, path)
            return
        if full == "google.protobuf.Duration":
            seconds, nanos = self.duration(value, path)
            target.seconds, target.nanos = seconds, nanos  # type: ignore[attr-defined]
            return
        if full in _WRAPPERS:
            field = descriptor.fields_by_name["value"]
            target.value = self.scalar(field, value, path)  # type: ignore[attr-defined]
            return
        if full in _JSON_FORMS:
            from hbonex.config.yamlpath import to_plain

            if full == "google.protobuf.Struct" and not isinstance(value, dict):
                raise self.error(path, f"expected a mapping, got {_show(value)}")
            try:
                json_format.ParseDict(to_plain(value), target)
            except (json_format.ParseError, TypeError, ValueError):
                raise self.error(path, f"expected {_JSON_FORMS[full]}, got {_show(value)}")
            return
        if value is None:
            target.SetInParent()
            return
        if not isinstance(value, dict):
            raise self.error(path, f"expected a mapping, got {_show(value)}")
        target.SetInParent()
        optional = self.optional
        self.optional = ("is_optional" in descriptor.fields_by_name
                         and value.get("is_optional") is True)
        try:
            self._fill_fields(target, descriptor, value, path)
        finally:
            self.optional = optional

    def _fill_fields(self, target: Message, descriptor: Descriptor, value: Any,
                     path: str) -> None:
        oneofs: dict[str, str] = {}
        marks = getattr(value, "key_marks", {})
        value_marks = getattr(value, "value_marks", {})
        for key, item in value.items():
            child = child_path(path, key)
            if key in marks:
                self.positions.keys[child] = marks[key]
            if key in value_marks:
                self.positions.values[child] = value_marks[key]
            field = descriptor.fields_by_name.get(key) if isinstance(key, str) else None
            if field is None:
                raise self.unknown(descriptor, str(key), child)
            if item is None:
                continue  # null is "not set", as in protobuf's JSON
            group = field.containing_oneof
            if group is not None:
                other = oneofs.get(group.name)
                if other is not None:
                    raise self.error(child, f"only one of {other}, {key} may be set", key=True)
                oneofs[group.name] = key
            self.set_field(target, field, item, child)

    def unknown(self, descriptor: Descriptor, key: str, path: str) -> ConfigError:
        accepted = sorted(f.name for f in descriptor.fields)
        shown = ", ".join(accepted) or "none"
        if len(accepted) > MAX_LISTED:
            # Envoy's big messages have 40-60 fields: name the ones hbonex implements.
            from hbonex.config.support import implemented

            mine = [f for f in accepted if f in implemented(descriptor.full_name)]
            shown = (", ".join(mine) + f", and {len(accepted) - len(mine)} more fields of "
                     f"{descriptor.full_name} that hbonex does not implement")
        message = f"unknown field {key!r}; accepted here: {shown}"
        hint = suggest(key, accepted)
        if hint:
            message += f" (did you mean {hint!r}?)"
        return self.error(path, message, key=True)

    def set_field(self, target: Message, field: FieldDescriptor, value: Any, path: str) -> None:
        name = field.name
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            if not isinstance(value, dict):
                raise self.error(path, f"expected a mapping, got {_show(value)}")
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            container = getattr(target, name)
            marks = getattr(value, "key_marks", {})
            value_marks = getattr(value, "value_marks", {})
            for key, item in value.items():
                child = child_path(path, key)
                if key in marks:
                    self.positions.keys[child] = marks[key]
                if key in value_marks:
                    self.positions.values[child] = value_marks[key]
                map_key = self.scalar(key_field, key, child, map_key=True)
                if value_field.message_type is not None:
                    self.fill(container[map_key], item, child)
                else:
                    container[map_key] = self.scalar(value_field, item, child)
            return
        if _repeated(field):
            if not isinstance(value, list):
                raise self.error(path, f"expected a list, got {_show(value)}")
            container = getattr(target, name)
            item_marks = getattr(value, "item_marks", [])
            for index, item in enumerate(value):
                child = f"{path}[{index}]"
                if index < len(item_marks):
                    self.positions.values[child] = item_marks[index]
                if field.message_type is not None:
                    self.parent = target.DESCRIPTOR.full_name
                    self.fill(container.add(), item, child)
                else:
                    container.append(self.scalar(field, item, child))
            return
        if field.message_type is not None:
            self.parent = target.DESCRIPTOR.full_name
            self.fill(getattr(target, name), value, path)
        else:
            setattr(target, name, self.scalar(field, value, path))

    def scalar(self, field: FieldDescriptor, value: Any, path: str, map_key: bool = False
               ) -> Any:
        kind = field.type
        if kind == FieldDescriptor.TYPE_STRING:
            if isinstance(value, str):
                return value
            if map_key and isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise self.error(path, f"expected a string, got {_show(value)}")
        if kind == FieldDescriptor.TYPE_BOOL:
            if isinstance(value, bool):
                return value
            if map_key and value in ("true", "false"):
                return value == "true"
            raise self.error(path, f"expected true or false, got {_show(value)}")
        if kind in _INT_RANGES:
            number = value
            if isinstance(value, str) and value.strip().lstrip("-").isdigit() and value.isascii():
                number = int(value)  # protobuf JSON accepts integers as strings
            if isinstance(number, float) and number.is_integer() and not map_key:
                number = int(number)
            if isinstance(number, bool) or not isinstance(number, int):
                raise self.error(path, f"expected an integer, got {_show(value)}")
            low, high = _INT_RANGES[kind]
            if not low <= number <= high:
                raise self.error(path, f"must be between {low} and {high}, got {number}")
            return number
        if kind in _FLOATS:
            if isinstance(value, str) and value in ("NaN", "Infinity", "-Infinity"):
                return float(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.error(path, f"expected a number, got {_show(value)}")
            if math.isinf(float(value)) and kind == FieldDescriptor.TYPE_FLOAT:
                return float(value)
            return float(value)
        if kind == FieldDescriptor.TYPE_BYTES:
            if not isinstance(value, str):
                raise self.error(path, f"expected base64 text, got {_show(value)}")
            try:
                return base64.b64decode(value, validate=True)
            except binascii.Error as e:
                raise self.error(path, f"not base64: {e}")
        if kind == FieldDescriptor.TYPE_ENUM:
            return self.enum(field.enum_type, value, path)
        raise self.error(path, f"unsupported field type {kind}")  # groups: not in Envoy's API

    def enum(self, enum: EnumDescriptor, value: Any, path: str) -> int:
        names = [v.name for v in enum.values]
        if isinstance(value, str) and value in enum.values_by_name:
            return int(enum.values_by_name[value].number)
        if isinstance(value, int) and not isinstance(value, bool) and (
            value in enum.values_by_number
        ):
            return value
        message = f"{_show(value)} is not one of {', '.join(names)}"
        hint = suggest(value, names) if isinstance(value, str) else None
        if hint is None and isinstance(value, str) and value.upper() in names:
            hint = value.upper()
        if hint:
            message += f" (did you mean {hint!r}?)"
        raise self.error(path, message)

    def duration(self, value: Any, path: str) -> tuple[int, int]:
        """
        Envoy durations: ``"5s"``, ``"0.25s"``, or ``{seconds: 5, nanos: 0}``; never negative.
        """
        if isinstance(value, str):
            m = _DURATION.match(value.strip())
            if m and not m.group(1) and int(m.group(2)) <= 315_576_000_000:
                return int(m.group(2)), int((m.group(3) or "0").ljust(9, "0"))
        elif isinstance(value, dict) and set(value) <= {"seconds", "nanos"}:
            seconds, nanos = value.get("seconds", 0), value.get("nanos", 0)
            if all(isinstance(v, int) and not isinstance(v, bool) for v in (seconds, nanos)) and (
                0 <= seconds <= 315_576_000_000 and 0 <= nanos <= 999_999_999
            ):
                return seconds, nanos
        raise self.error(path, f"expected a duration like '5s', got {_show(value)}")

    def fill_any(self, target: Message, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a mapping with an '@type', got {_show(value)}")
        type_path = child_path(path, "@type")
        marks = getattr(value, "key_marks", {})
        if "@type" in marks:
            self.positions.keys[type_path] = marks["@type"]
            self.positions.values[type_path] = getattr(value, "value_marks", {}).get("@type")
        type_url = value.get("@type")
        if type_url is None:
            raise self.error(path, "typed_config needs an '@type'")
        if not isinstance(type_url, str) or "/" not in type_url:
            raise self.error(type_path, f"expected a type URL like '{TYPE_PREFIX}"
                             f"envoy...', got {_show(type_url)}")
        cls = message_class(type_name(type_url))
        if cls is None and self.optional:
            target.type_url = type_url  # type: ignore[attr-defined]
            return
        if cls is None:
            error = self.resolve_any(type_path, type_url, self.parent)
            raise self.error(error.path, error.message, key=True)
        inner = cls()
        rest = value.without("@type") if hasattr(value, "without") else {
            k: v for k, v in value.items() if k != "@type"}
        if inner.DESCRIPTOR.full_name in _WRAPPERS | set(_JSON_FORMS) | {
            "google.protobuf.Duration", "google.protobuf.Any"
        }:
            # Well-known types keep their JSON form under "value" inside an Any.
            if set(rest) != {"value"}:
                raise self.error(path, f"a {inner.DESCRIPTOR.full_name} in an Any takes its "
                                 "JSON form as 'value'")
            self.fill(inner, rest["value"], child_path(path, "value"))
        else:
            self.fill(inner, rest, path)
        if inner.DESCRIPTOR.full_name in ("xds.type.v3.TypedStruct", "udpa.type.v1.TypedStruct"):
            self.positions.raw[child_path(path, "value")] = rest.get("value")
        target.Pack(inner, type_url_prefix=type_url[: -len(type_name(type_url))].rstrip("/"))


def _unknown_type(path: str, type_url: str, parent: str = "") -> ConfigError:
    return ConfigError(path, f"unknown type {type_url!r}")


def to_message(data: Any, cls: type[Message], path: str = "",
               positions: Optional[Positions] = None, resolve_any: Any = None) -> Message:
    """
    ``data`` (YAML from hbonex.config.yamlpath.load_yaml, or plain data) as a ``cls`` message.
    Raises ConfigError at the offending path.
    """
    walker = _Walker(positions if positions is not None else Positions(),
                     resolve_any or _unknown_type)
    message = cls()
    if getattr(data, "mark", None) is not None:
        walker.positions.values.setdefault(path, data.mark)
    walker.fill(message, data, path)
    return message
