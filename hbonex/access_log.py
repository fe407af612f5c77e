"""
Access loggers (``envoy.access_loggers.file`` / ``stdout`` / ``stderr``): a sink is a callable
taking the record dict a filter fills in (see hbonex.formatter.OPERATORS for the keys).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, TextIO

from hbonex.formatter import Template
from hbonex.yamlpath import Node

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

    def _open(self) -> TextIO:
        if self._stream is None:
            if self.target == "stdout":
                self._stream = sys.stdout
            elif self.target == "stderr":
                self._stream = sys.stderr
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
        stream = self._open()
        stream.write(line)
        stream.flush()

    def __repr__(self) -> str:
        return f"TemplateSink({self.target!r}, {self.template.text!r})"


def _iso(t: float) -> str:
    ms = int((t % 1) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{ms:03d}Z"


def parse_access_logs(nodes: list[Node], context: Any) -> list[Sink]:
    """
    An access_log list: ``[{name, typed_config: {@type, path, log_format}}]``.
    """
    return [parse_access_log(node, context) for node in nodes]


def parse_access_log(node: Node, context: Any) -> Sink:
    node.expect_map()
    name = node.str_field("name")
    typed = node.map_field("typed_config")
    type_url = typed.str_field("@type") if typed is not None else None
    if type_url is not None:
        if type_url not in LOGGERS.values():
            known = ", ".join(sorted(LOGGERS.values()))
            raise typed.error(  # type: ignore[union-attr]
                f"unknown access logger type {type_url!r}; known: {known}", "@type"
            )
    elif name in LOGGERS:
        type_url = LOGGERS[name]
    else:
        raise node.error(
            f"unknown access logger {name!r}; known: {', '.join(sorted(LOGGERS))}",
            "name" if name is not None else "typed_config",
        )
    config = typed if typed is not None else Node({}, f"{node.path}.typed_config")
    if type_url == FILE:
        target = config.str_field("path", required=True)
        directory = os.path.dirname(os.path.abspath(context.file_path(target)))
        if not os.path.isdir(directory):
            raise config.error(f"directory {directory} does not exist", "path")
        target = str(context.file_path(target))
    else:
        target = "stdout" if type_url == STDOUT else "stderr"
    text = DEFAULT_FORMAT
    log_format = config.map_field("log_format")
    if log_format is not None:
        kind, value = log_format.oneof("text_format_source", "text_format")  # type: ignore[misc]
        if kind == "text_format":
            text = value.as_str()
            template_node = value
        else:
            value.expect_map()
            template_node = value.require("inline_string")
            text = template_node.as_str()
            value.finish()
        log_format.finish()
    else:
        template_node = config
    try:
        template = Template(text, template_node.path)
    except Exception as e:
        from hbonex.errors import ConfigError

        if isinstance(e, ConfigError):
            raise template_node.wrap(e)
        raise
    config.finish()
    node.finish()
    return TemplateSink(template, target)
