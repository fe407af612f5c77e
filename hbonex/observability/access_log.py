"""
Access loggers (``envoy.access_loggers.file`` / ``stdout`` / ``stderr``): a sink is a callable
taking the record dict a filter fills in (see hbonex.observability.formatter.OPERATORS for the
keys).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import weakref
from typing import Any, Callable, TextIO

from twisted.logger import Logger

from hbonex.observability.formatter import Template
from hbonex.observability.stats import STATS

log = Logger()
_WRITE_ERRORS = STATS.counter("access_log.write_errors")
#: File sinks, reopened on SIGUSR1 (logrotate moves the file, then signals).
_FILE_SINKS: weakref.WeakSet[TemplateSink] = weakref.WeakSet()
_reopen_installed = False


def _install_reopen() -> None:
    global _reopen_installed
    if _reopen_installed:
        return
    _reopen_installed = True
    previous = signal.getsignal(signal.SIGUSR1)

    def on_usr1(signum: int, frame: Any) -> None:
        from twisted.internet import reactor

        reactor.callFromThread(reopen_files)  # type: ignore[attr-defined]
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGUSR1, on_usr1)


def reopen_files() -> None:
    """Close every access log file; the next record opens it again (at its path)."""
    for sink in list(_FILE_SINKS):
        sink.reopen()
    log.info("access log files reopened")

Sink = Callable[[dict[str, str]], None]

FILE = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
STDOUT = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
STDERR = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog"

LOGGERS = {
    "envoy.access_loggers.file": FILE,
    "envoy.access_loggers.stdout": STDOUT,
    "envoy.access_loggers.stderr": STDERR,
}

#: Envoy's default format with the HTTP parts blank, as it logs TCP connections.
DEFAULT_FORMAT = (
    '[%START_TIME%] "- - -" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% '
    '%DURATION% "%UPSTREAM_HOST%" "%DOWNSTREAM_REMOTE_ADDRESS%" "%UPSTREAM_CLUSTER%"\n'
)


class TemplateSink:
    """
    Renders each record with ``template`` and writes it to a stream (opened on first use).
    """

    def __init__(self, template: Template, target: str) -> None:
        self.template = template
        self.target = target  # a file path, "stdout" or "stderr"
        self._stream: TextIO | None = None
        if target not in ("stdout", "stderr"):
            _FILE_SINKS.add(self)
            _install_reopen()

    def reopen(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None and stream not in (sys.stdout, sys.stderr, sys.__stdout__,
                                                 sys.__stderr__):
            try:
                stream.close()
            except OSError:
                pass

    def write(self, line: str) -> None:
        """One line; a failing disk (full, gone) drops it and counts it, never stalls."""
        try:
            stream = self._open()
            stream.write(line)
            stream.flush()
        except OSError as e:
            _WRITE_ERRORS.inc()
            if _WRITE_ERRORS.value & (_WRITE_ERRORS.value - 1) == 0:
                log.warn("access log {target}: {error} (record dropped)",
                         target=self.target, error=e)
            self.reopen()

    def _open(self) -> TextIO:
        if self._stream is None:
            # The process's own streams, as Envoy writes them: twistd replaces sys.stdout
            # with a logger that would prefix every record with a timestamp and [stdout#info].
            if self.target == "stdout":
                self._stream = sys.__stdout__ or sys.stdout
            elif self.target == "stderr":
                self._stream = sys.__stderr__ or sys.stderr
            else:
                self._stream = open(self.target, "a", buffering=1, encoding="utf-8")
        return self._stream

    def __call__(self, record: dict[str, str]) -> None:
        if "start_time" not in record:
            started = time.time() - int(record.get("duration_ms", "0") or 0) / 1000
            record = dict(record, start_time=_iso(started))
        line = self.template.render(record)
        if not line.endswith("\n"):
            line += "\n"
        self.write(line)

    def __repr__(self) -> str:
        return f"TemplateSink({self.target!r}, {self.template.text!r})"


class JsonSink(TemplateSink):
    """
    One JSON object per record (Envoy's ``json_format``): each string value is a template;
    with ``typed``, a value that is one operator alone keeps its type (numbers stay numbers);
    an operator with no value is null, or left out with ``omit_empty``.
    """

    def __init__(self, fields: dict[str, Any], target: str, typed: bool,
                 omit_empty: bool) -> None:
        super().__init__(Template(""), target)
        self.fields = fields
        self.typed = typed
        self.omit_empty = omit_empty

    def _render(self, node: Any, record: dict[str, str]) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                rendered = self._render(value, record)
                if rendered is None and self.omit_empty:
                    continue
                out[key] = rendered
            return out
        if not isinstance(node, Template):
            return node  # a constant (number, bool, null) kept as configured
        if node.constant:
            return node.text
        text = node.render({k: v for k, v in record.items() if v != ""})
        single = len(node._parts) == 1
        if single and text == "-":
            return None
        if single and self.typed:
            for kind in (int, float):
                try:
                    return kind(text)
                except ValueError:
                    pass
        return text

    def __call__(self, record: dict[str, str]) -> None:
        import json

        if "start_time" not in record:
            started = time.time() - int(record.get("duration_ms", "0") or 0) / 1000
            record = dict(record, start_time=_iso(started))
        line = json.dumps(self._render(self.fields, record), separators=(",", ":"))
        self.write(line + "\n")

    def __repr__(self) -> str:
        return f"JsonSink({self.target!r}, {sorted(self.fields)})"


def _json_fields(struct: Any, path: str, context: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    def compile_node(value: Any, where: str) -> Any:
        if isinstance(value, dict):
            return {k: compile_node(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, str):
            return context.template(value, where)
        if isinstance(value, list):
            raise context.error(where, "lists are not supported in json_format values")
        if isinstance(value, float) and value.is_integer():
            return int(value)  # a Struct holds numbers as doubles; 1 is written 1, not 1.0
        return value

    plain = json_format.MessageToDict(struct)
    return compile_node(plain, path)  # type: ignore[no-any-return]


def _iso(t: float) -> str:
    ms = int((t % 1) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{ms:03d}Z"


def parse_access_logs(messages: Any, path: str, context: Any) -> list[Sink]:
    """
    An access_log list (Envoy AccessLog messages at YAML ``path``).
    """
    return [parse_access_log(m, f"{path}[{i}]", context) for i, m in enumerate(messages)]


class FilteredSink:
    """A sink behind Envoy's access log filter: only records the filter accepts."""

    def __init__(self, sink: Sink, accept: Callable[[dict[str, str]], bool]) -> None:
        self.sink = sink
        self.accept = accept

    def __call__(self, record: dict[str, str]) -> None:
        if self.accept(record):
            self.sink(record)


_OPS = {"EQ": lambda a, b: a == b, "GE": lambda a, b: a >= b, "LE": lambda a, b: a <= b,
        "NE": lambda a, b: a != b}


def parse_filter(message: Any, path: str, context: Any) -> Callable[[dict[str, str]], bool]:
    """Envoy's AccessLogFilter on a record (status, duration, response flags, and/or)."""
    kind = message.WhichOneof("filter_specifier")
    where = f"{path}.{kind}"
    if kind in ("status_code_filter", "duration_filter"):
        comparison = getattr(message, kind).comparison
        op = comparison.DESCRIPTOR.fields_by_name["op"].enum_type.values_by_number[
            comparison.op].name
        if comparison.value.runtime_key:
            raise context.error(f"{where}.comparison.value", "runtime_key is not supported; "
                                "use default_value", "runtime_key")
        threshold = comparison.value.default_value
        compare = _OPS[op]
        field = "response_code" if kind == "status_code_filter" else "duration_ms"
        return lambda r: compare(int(r.get(field, "0") or 0), threshold)
    if kind == "response_flag_filter":
        wanted = set(message.response_flag_filter.flags)

        def flagged(r: dict[str, str]) -> bool:
            flags = {f for f in r.get("response_flags", "-").split(",") if f and f != "-"}
            return bool(flags & wanted) if wanted else bool(flags)

        return flagged
    if kind in ("and_filter", "or_filter"):
        parts = [parse_filter(f, f"{where}.filters[{i}]", context)
                 for i, f in enumerate(getattr(message, kind).filters)]
        if kind == "and_filter":
            return lambda r: all(p(r) for p in parts)
        return lambda r: any(p(r) for p in parts)
    if kind == "not_health_check_filter":
        return lambda r: True  # hbonex has no health-check traffic to leave out
    raise context.error(path, f"{kind} is not supported; use status_code_filter, "
                        "duration_filter, response_flag_filter, and_filter or or_filter"
                        if kind else "one filter is required", kind)


def parse_access_log(message: Any, path: str, context: Any) -> Sink:
    sink = _parse_access_log(message, path, context)
    if message.HasField("filter"):
        return FilteredSink(sink, parse_filter(message.filter, f"{path}.filter", context))
    return sink


def _parse_access_log(message: Any, path: str, context: Any) -> Sink:
    from hbonex.config.schema import message_class, type_name

    name = message.name or None
    if message.HasField("typed_config"):
        type_url = message.typed_config.type_url
        if type_url not in LOGGERS.values():
            known = ", ".join(sorted(LOGGERS.values()))
            raise context.error(f"{path}.typed_config",
                                f"unknown access logger type {type_url!r}; known: {known}",
                                "@type")
    elif name in LOGGERS:
        type_url = LOGGERS[name]  # type: ignore[index]
    else:
        raise context.error(
            path, f"unknown access logger {name!r}; known: {', '.join(sorted(LOGGERS))}",
            "name" if name is not None else "typed_config",
        )
    cls = message_class(type_name(type_url))
    assert cls is not None
    config: Any = cls()
    if message.HasField("typed_config"):
        message.typed_config.Unpack(config)
    where = f"{path}.typed_config"
    if type_url == FILE:
        if not config.path:
            raise context.error(where, "missing required field 'path'")
        directory = os.path.dirname(os.path.abspath(context.file_path(config.path)))
        if not os.path.isdir(directory):
            raise context.error(where, f"directory {directory} does not exist", "path")
        target = str(context.file_path(config.path))
    else:
        target = "stdout" if type_url == STDOUT else "stderr"
    text = DEFAULT_FORMAT
    template_path = where
    if config.HasField("log_format"):
        log_format = config.log_format
        format_path = f"{where}.log_format"
        kind = log_format.WhichOneof("format")
        if kind == "text_format":
            text = log_format.text_format
            template_path = f"{format_path}.text_format"
        elif kind == "text_format_source":
            source = log_format.text_format_source
            template_path = f"{format_path}.text_format_source"
            if source.WhichOneof("specifier") != "inline_string":
                raise context.error(template_path, "missing required field 'inline_string'")
            text = source.inline_string
            template_path += ".inline_string"
        elif kind == "json_format":
            # Typed, as Envoy's json_format is now (typed_json_format was folded into it).
            fields = _json_fields(log_format.json_format, f"{format_path}.json_format", context)
            return JsonSink(fields, target, typed=True,
                            omit_empty=log_format.omit_empty_values)
        else:
            raise context.error(format_path, "one of text_format_source, text_format, "
                                "json_format is required")
    return TemplateSink(context.template(text, template_path), target)
