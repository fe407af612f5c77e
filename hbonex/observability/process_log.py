"""
The process's own log (not the access log): ``--log-format json`` for structured
twisted.logger output, one JSON object per line, and per-namespace levels settable at run time
(the admin's ``POST /logging``).

twistd builds its log observer after ``makeService``, from the application's ILogObserver
component when there is one: ``ProxyService`` sets that component when it joins the
application, so ``--log-format`` needs nothing from twistd's own flags.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from zope.interface import implementer

FORMATS = ("text", "json")

#: Event keys that are twisted.logger's bookkeeping, not the event's own fields.
_SKIP = frozenset({"format", "message", "isError", "why", "failure", "time", "system"})


def json_line(event: dict[str, Any], worker: int | None = None) -> str:
    """
    One event as one line of JSON: time (RFC 3339, UTC), level, namespace, the formatted
    message, the worker process's index (``--workers``), then the event's own fields that
    JSON can carry as they are.
    """
    when = event.get("log_time") or time.time()
    record: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
        + f".{int(when % 1 * 1000):03d}Z",
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    if worker is not None:
        record["worker"] = worker
    for key, value in event.items():
        if key.startswith("log_") or key in _SKIP or key in record:
            continue
        if value is None or isinstance(value, (bool, int, float, str)):
            record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False, default=str) + "\n"


@implementer(ILogObserver)
class JSONLineObserver:
    """Writes each event as one JSON line (flushed, so a crash keeps the lines before it)."""

    def __init__(self, out: IO[str], worker: int | None = None) -> None:
        self.out = out
        self.worker = worker

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            self.out.write(json_line(event, self.worker))
            self.out.flush()
        except (OSError, ValueError):
            pass  # a full disk or a closed stream must not take the process down


_ONE_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@implementer(ILogObserver)
class TextLineObserver:
    """
    twistd's text log, line for line as twisted.logger's ``textFileLogObserver`` writes it
    (``TIME [SYSTEM] MESSAGE``), for less: the time text is made once per second, and a
    message that is one field (``"{tunnel}"``: the line per tunnel, formatted by its
    emitter) is taken as it is instead of re-parsing the format. Anything else (failures,
    other formats) goes through twisted.logger's own formatter.  A worker process
    (``--workers``) puts ``worker-N`` before the system: ``TIME [worker-1 SYSTEM] MESSAGE``.
    """

    def __init__(self, out: IO[str], worker: int | None = None) -> None:
        self.out = out
        self._second = -1
        self._stamp = ""
        self._tag = "" if worker is None else f"worker-{worker} "

    def __call__(self, event: dict[str, Any]) -> None:
        fmt = event.get("log_format")
        when = event.get("log_time")
        match = _ONE_FIELD.fullmatch(fmt) if isinstance(fmt, str) else None
        value = event.get(match.group(1)) if match is not None else None
        if (not isinstance(value, str) or when is None or "log_failure" in event
                or "log_system" in event):
            if self._tag:
                level = event.get("log_level")
                system = event.get("log_system") or (
                    f"{event.get('log_namespace', '-')}#{level.name if level else '-'}")
                event = {**event, "log_system": f"{self._tag}{system}"}
            text = formatEventAsClassicLogText(event)
            if text is None:
                return  # nothing to say (as textFileLogObserver)
        else:
            second = int(when)
            if second != self._second:
                self._second, self._stamp = second, formatTime(when)
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
            message = value.replace(chr(10), chr(10) + chr(9))
            text = f"{self._stamp} [{self._tag}{system}] {message}\n"
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):
            pass  # a full disk or a closed stream must not take the process down


class LogControl:
    """
    The levels: one predicate in front of the process's observer, per namespace (a namespace
    covers its children, as twisted.logger's predicate does).
    """

    def __init__(self) -> None:
        self.predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)

    def wrap(self, observer: Any) -> ILogObserver:
        return FilteringLogObserver(observer, [self.predicate])  # type: ignore[no-any-return]

    def set_level(self, level: LogLevel, namespace: str = "") -> None:
        """``namespace`` "" sets every namespace, as Envoy's ``/logging?level=`` does."""
        if not namespace:
            self.predicate.clearLogLevels()
        self.predicate.setLogLevelForNamespace(namespace, level)


def output_for(twistd_options: Any) -> IO[str]:
    """Where twistd would have written: stdout in the foreground, else the log file."""
    name = twistd_options.get("logfile") if twistd_options is not None else "-"
    nodaemon = twistd_options.get("nodaemon", True) if twistd_options is not None else True
    if name == "-" or (not name and nodaemon):
        return sys.stdout
    from twisted.python.logfile import LogFile

    # twistd's own default: a file rotated at 1 MB.
    return LogFile.fromFullPath(name or "twistd.log")  # type: ignore[return-value]


def make_observer(log_format: str, out: IO[str], control: LogControl,
                  worker: int | None = None) -> ILogObserver:
    if log_format == "json":
        return control.wrap(JSONLineObserver(out, worker))
    return control.wrap(TextLineObserver(out, worker))
