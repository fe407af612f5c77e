"""
``upgrade_configs`` (HCM and route level) for upgrades other than CONNECT: what loads, the
precise errors, and Envoy's HCM/route table (hbonex.http.upgrade).
"""

from __future__ import annotations

from twisted.trial import unittest

from hbonex.http.headers import Headers
from hbonex.http.upgrade import upgrade_allowed, upgrade_type
from tests.test_config import Base
from tests.test_route_config import ROUTES, config

HCM = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"


def with_hcm_upgrades(text: str, upgrades: str) -> str:
    return text.replace("          stat_prefix: h\n",
                        f"          stat_prefix: h\n          upgrade_configs: {upgrades}\n")


class UpgradeConfigTests(Base):
    def router(self, text: str) -> object:
        loaded = self.load(text)
        return loaded.listeners[0].chains[0].filters[0].parsed.router

    def test_hcm_and_route_upgrades_load_lower_cased(self) -> None:
        router = self.router(with_hcm_upgrades(config("""
            - match: {prefix: /off}
              route:
                cluster: backend
                idle_timeout: 7s
                upgrade_configs: [{upgrade_type: WebSocket, enabled: false}]
            - match: {prefix: /}
              route: {cluster: backend, upgrade_configs: [{upgrade_type: spdy/3.1}]}
            """), "[{upgrade_type: WebSocket}, {upgrade_type: CONNECT}, "
                  "{upgrade_type: foo, enabled: false}]"))
        self.assertEqual(router.upgrades, (("websocket", True), ("foo", False)))  # type: ignore
        self.assertTrue(router.connect_enabled)  # type: ignore[attr-defined]
        off, other = router.virtual_hosts[0].routes  # type: ignore[attr-defined]
        self.assertEqual(off.upgrades, (("websocket", False),))
        self.assertEqual((off.idle_timeout, off.idle_timeout_set), (7.0, True))
        self.assertEqual(other.upgrades, (("spdy/3.1", True),))
        self.assertFalse(other.idle_timeout_set)

    def test_not_a_token(self) -> None:
        error = self.error(with_hcm_upgrades(config("""
            - match: {prefix: /}
              route: {cluster: backend}
            """), '[{upgrade_type: "web socket"}]'))
        self.assertIn(f"{HCM}.upgrade_configs[0].upgrade_type: upgrade_type 'web socket' is "
                      "not an HTTP token", error)
        self.assertIn("such as websocket, or CONNECT", error)

    def test_duplicate_types_case_insensitively(self) -> None:
        error = self.error(config("""
            - match: {prefix: /}
              route:
                cluster: backend
                upgrade_configs: [{upgrade_type: websocket}, {upgrade_type: WEBSOCKET}]
            """))
        self.assertIn(f"{ROUTES}.routes[0].route.upgrade_configs[1].upgrade_type: duplicate "
                      f"upgrade_type 'WEBSOCKET' (also {ROUTES}.routes[0].route."
                      "upgrade_configs[0])", error)

    def test_connect_config_only_for_connect(self) -> None:
        error = self.error(config("""
            - match: {prefix: /}
              route:
                cluster: backend
                upgrade_configs: [{upgrade_type: websocket, connect_config: {}}]
            """))
        self.assertIn(f"{ROUTES}.routes[0].route.upgrade_configs[0].connect_config: "
                      "connect_config is only for upgrade_type CONNECT", error)

    def test_missing_type(self) -> None:
        error = self.error(with_hcm_upgrades(config("""
            - match: {prefix: /}
              route: {cluster: backend}
            """), "[{enabled: true}]"))
        self.assertIn(f"{HCM}.upgrade_configs[0]: missing required field 'upgrade_type'", error)

    def test_custom_upgrade_filter_chains_are_refused(self) -> None:
        error = self.error(with_hcm_upgrades(config("""
            - match: {prefix: /}
              route: {cluster: backend}
            """), "[{upgrade_type: websocket, filters: [{name: envoy.filters.http.router, "
                  "typed_config: {'@type': "
                  "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]}]"))
        self.assertIn(f"{HCM}.upgrade_configs[0].filters", error)


class PolicyTests(unittest.TestCase):
    def test_envoy_table(self) -> None:
        """HCM x route (Envoy's docs), a missing route entry following the HCM."""
        ws = "websocket"
        self.assertTrue(upgrade_allowed(((ws, True),), ((ws, True),), ws))
        self.assertFalse(upgrade_allowed(((ws, True),), ((ws, False),), ws))
        self.assertTrue(upgrade_allowed(((ws, False),), ((ws, True),), ws))
        self.assertFalse(upgrade_allowed(((ws, False),), ((ws, False),), ws))
        self.assertTrue(upgrade_allowed(((ws, True),), (), "WebSocket"))
        self.assertFalse(upgrade_allowed(((ws, False),), (), ws))
        self.assertTrue(upgrade_allowed((), ((ws, True),), ws))
        self.assertFalse(upgrade_allowed((), (), ws))
        self.assertFalse(upgrade_allowed(((ws, True),), (), "foo"))

    def test_upgrade_type_needs_connection_upgrade(self) -> None:
        self.assertEqual(upgrade_type(Headers([(b"upgrade", b"WebSocket"),
                                               (b"connection", b"keep-alive, Upgrade")])),
                         "websocket")
        self.assertIsNone(upgrade_type(Headers([(b"upgrade", b"websocket")])))
        self.assertIsNone(upgrade_type(Headers([(b"connection", b"upgrade")])))
        # h2c is served as an ordinary request, as Envoy does.
        self.assertIsNone(upgrade_type(Headers([(b"upgrade", b"h2c"),
                                               (b"connection", b"upgrade")])))
