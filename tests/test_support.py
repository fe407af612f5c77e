"""
The table of implemented / no-effect / refused fields (hbonex.config.support): consistent with
Envoy's descriptors, complete along implemented fields, printed in docs/configuration.md, and
applied (warnings from `hbonex config check`, errors naming the field).
"""

from __future__ import annotations

from pathlib import Path

from twisted.trial import unittest

from hbonex.config import load_config
from hbonex.config.schema import descriptor_of
from hbonex.config.support import OPAQUE, TABLE, YES, markdown

ROOT = Path(__file__).resolve().parent.parent

SIMPLE = """\
static_resources:
  listeners:
  - name: a
    address:
      socket_address: {address: 127.0.0.1, port_value: 9000}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: a
          cluster: backend
  clusters:
  - name: backend
    connect_timeout: 1s
    load_assignment:
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {address: 127.0.0.1, port_value: 8080}
"""


class TableTests(unittest.TestCase):
    def test_names_and_fields_exist(self) -> None:
        for name, entry in TABLE.items():
            descriptor = descriptor_of(name)
            self.assertIsNotNone(descriptor, name)
            assert descriptor is not None
            for field in entry:
                self.assertIn(field, descriptor.fields_by_name, f"{name}.{field}")
        for name in OPAQUE:
            self.assertIsNotNone(descriptor_of(name), name)

    def test_implemented_fields_lead_to_known_messages(self) -> None:
        """Every message an implemented field holds is in the table, opaque or a leaf."""
        for name, entry in TABLE.items():
            descriptor = descriptor_of(name)
            assert descriptor is not None
            for field, (kind, _) in entry.items():
                if kind != YES:
                    continue
                message = descriptor.fields_by_name[field].message_type
                if message is None or message.GetOptions().map_entry:
                    continue
                full = message.full_name
                self.assertTrue(
                    full in TABLE or full in OPAQUE or full.startswith("google.protobuf."),
                    f"{name}.{field} holds {full}, which the table does not cover",
                )

    def test_docs_print_the_table(self) -> None:
        docs = (ROOT / "docs" / "configuration.md").read_text()
        self.assertIn(markdown(), docs)


class ApplyTests(unittest.TestCase):
    def load(self, text: str) -> object:
        from twisted.internet import reactor

        return load_config(text, reactor)

    def test_tuning_knob_is_one_warning(self) -> None:
        text = SIMPLE.replace("connect_timeout: 1s", "connect_timeout: 1s\n"
                              "    dns_lookup_family: V4_ONLY")
        loaded = self.load(text)
        self.assertEqual(loaded.warnings, [(  # type: ignore[attr-defined]
            "static_resources.clusters[0].dns_lookup_family",
            "dns_lookup_family has no effect in hbonex (hbonex resolves with the reactor's "
            "resolver) (line 16)")])

    def test_behaviour_field_is_an_error(self) -> None:
        from hbonex.errors import ConfigError

        text = SIMPLE.replace("connect_timeout: 1s", "connect_timeout: 1s\n"
                              "    outlier_detection: {consecutive_5xx: 3}")
        error = self.assertRaises(ConfigError, self.load, text)
        self.assertEqual(str(error), (
            "static_resources.clusters[0].outlier_detection: outlier_detection "
            "(envoy.config.cluster.v3.Cluster) is known to Envoy but not implemented by "
            "hbonex: no outlier detection (line 16)"))

    def test_unlisted_field_is_an_error(self) -> None:
        from hbonex.errors import ConfigError

        text = SIMPLE.replace("stat_prefix: a", "stat_prefix: a\n"
                              "          max_early_data_bytes: 10")
        error = self.assertRaises(ConfigError, self.load, text)
        self.assertIn("typed_config.max_early_data_bytes: max_early_data_bytes (envoy.extensions."
                      "filters.network.tcp_proxy.v3.TcpProxy) is known to Envoy but not "
                      "implemented by hbonex (line 12)", str(error))

    def test_config_check_prints_the_warnings(self) -> None:
        import argparse
        import contextlib
        import io

        from hbonex.cli.config_cmd import _cmd_check

        path = Path(self.mktemp())
        path.write_text(SIMPLE.replace("connect_timeout: 1s", "connect_timeout: 1s\n"
                                       "    dns_lookup_family: V4_ONLY"))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = _cmd_check(argparse.Namespace(file=str(path), base_dir=None))
        self.assertEqual(code, 0)
        self.assertIn("\nwarning: static_resources.clusters[0].dns_lookup_family: "
                      "dns_lookup_family has no effect in hbonex", out.getvalue())
