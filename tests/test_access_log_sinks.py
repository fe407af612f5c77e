"""Access log sinks: a failing disk drops records and counts them, never raising."""

from __future__ import annotations

import shutil
from pathlib import Path

from twisted.trial import unittest

from hbonex.observability.access_log import TemplateSink, reopen_files
from hbonex.observability.formatter import Template
from hbonex.observability.stats import STATS


class SinkTests(unittest.TestCase):
    def test_write_errors_are_counted_not_raised(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        sink = TemplateSink(Template("%RESPONSE_CODE%"), str(directory / "a.log"))
        sink({"response_code": "200"})
        self.assertEqual((directory / "a.log").read_text(), "200\n")
        shutil.rmtree(directory)
        reopen_files()  # as after logrotate: the next record opens the path again
        before = STATS.counter("access_log.write_errors").value
        sink({"response_code": "503"})  # the directory is gone: ENOENT
        self.assertEqual(STATS.counter("access_log.write_errors").value, before + 1)
        directory.mkdir()
        sink({"response_code": "201"})  # it recovers once the path works again
        self.assertEqual((directory / "a.log").read_text(), "201\n")
