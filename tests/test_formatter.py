"""Envoy's substitution operators (hbonex.observability.formatter), parametrised ones above all."""

from __future__ import annotations

from twisted.trial import unittest

from hbonex.errors import ConfigError
from hbonex.observability.formatter import Template


class OperatorTests(unittest.TestCase):
    def test_request_and_response_headers(self) -> None:
        record = {"req::path": "/a", "req:x-b": "abcdef", "resp:server": "envoy"}
        self.assertEqual(Template("%REQ(:PATH)%").render(record), "/a")
        self.assertEqual(Template("%REQ(X-A?X-B)%").render(record), "abcdef")
        self.assertEqual(Template("%REQ(X-A?X-B):3%").render(record), "abc")
        self.assertEqual(Template("%RESP(Server)%").render(record), "envoy")
        self.assertEqual(Template("[%REQ(X-NONE)%]").render(record), "[-]")

    def test_start_time_filter_state_and_plain(self) -> None:
        record = {"start_epoch": "86400", "start_time": "iso", "fs:io.istio.peer_principal": "p",
                  "remote": "10.0.0.1:5"}
        self.assertEqual(Template("%START_TIME(%Y-%m-%d)%").render(record), "1970-01-02")
        self.assertEqual(Template("%START_TIME%").render(record), "iso")
        self.assertEqual(Template("%FILTER_STATE(io.istio.peer_principal:PLAIN)%")
                         .render(record), "p")
        self.assertEqual(Template("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%").render(record),
                         "10.0.0.1")

    def test_unknown_operators_are_config_errors(self) -> None:
        error = self.assertRaises(ConfigError, Template, "%NOPE%", "a.b")
        self.assertIn("a.b", str(error))
        self.assertIn("%REQ(X)%", str(error))
        self.assertRaises(ConfigError, Template, "%REQ()%", "a.b")
        self.assertRaises(ConfigError, Template, "%DOWNSTREAM_REMOTE_ADDRESS(x)%", "a.b")
