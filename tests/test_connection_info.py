"""
ConnectionInfo is made for every accepted connection (every tunnel on hbone-client): its
filter state and dynamic metadata are made on first use, and what an idle one costs is bounded.
"""

from __future__ import annotations

import gc
import tracemalloc

from twisted.trial import unittest

from hbonex.filters.network.tcp_proxy import _shared_state
from hbonex.http.stream_info import (
    FilterState,
    SharedWithUpstream,
    existing_dynamic_metadata,
    existing_filter_state,
)
from hbonex.network.listener import ConnectionInfo


def bytes_per_info(count: int = 2000) -> float:
    """tracemalloc's bytes per ConnectionInfo as the listener makes them (strings shared)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        kept = [ConnectionInfo("listener", "127.0.0.1:40000", "127.0.0.1:9000")
                for _ in range(count)]
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    del kept
    return grown / count


class LazyStateTests(unittest.TestCase):
    def test_nothing_made_until_used(self) -> None:
        info = ConnectionInfo("l", "10.0.0.1:1", "10.0.0.2:2")
        self.assertIsNone(info.existing_filter_state())
        self.assertIsNone(info.existing_dynamic_metadata())
        self.assertIsNone(existing_filter_state(info))
        self.assertIsNone(existing_dynamic_metadata(info))
        # Readers on the per-tunnel path leave it so.
        self.assertIsNone(_shared_state(info))
        self.assertEqual(info.substitutions()["remote"], "10.0.0.1:1")
        self.assertIsNone(info.existing_filter_state())

    def test_made_once_on_access(self) -> None:
        info = ConnectionInfo("l", "10.0.0.1:1", "10.0.0.2:2")
        state = info.filter_state
        state.set_data("k", "v", SharedWithUpstream.ONCE)
        self.assertIs(info.filter_state, state)
        self.assertIs(existing_filter_state(info), state)
        self.assertEqual(info.substitutions()["fs:k"], "v")
        self.assertEqual(_shared_state(info).get_data("k"), "v")

    def test_in_place_metadata_write_kept(self) -> None:
        # Network RBAC writes into the connection's metadata in place.
        info = ConnectionInfo("l", "10.0.0.1:1", "10.0.0.2:2")
        info.dynamic_metadata.setdefault("envoy.filters.network.rbac", {}).update(a=1)
        self.assertEqual(info.dynamic_metadata, {"envoy.filters.network.rbac": {"a": 1}})
        self.assertEqual(existing_dynamic_metadata(info),
                         {"envoy.filters.network.rbac": {"a": 1}})

    def test_constructor_and_setter(self) -> None:
        state = FilterState()
        info = ConnectionInfo("l", "r", "a", filter_state=state, dynamic_metadata={"n": {}})
        self.assertIs(info.filter_state, state)
        self.assertEqual(info.dynamic_metadata, {"n": {}})
        other = FilterState()
        info.filter_state = other
        info.dynamic_metadata = {"m": {"x": 1}}
        self.assertIs(info.existing_filter_state(), other)
        self.assertEqual(info.existing_dynamic_metadata(), {"m": {"x": 1}})

    def test_other_connection_objects(self) -> None:
        # Any IConnectionInfo with plain attributes still works with the helpers.
        class Plain:
            filter_state = FilterState()
            dynamic_metadata = {"n": {}}

        self.assertIs(existing_filter_state(Plain()), Plain.filter_state)
        self.assertEqual(existing_dynamic_metadata(Plain()), {"n": {}})


class MemoryTests(unittest.TestCase):
    def test_idle_connection_info_is_small(self) -> None:
        # 444 bytes before the filter state and metadata became lazy; about 250 after
        # (the slotted object, its start time and its connection id).
        size = bytes_per_info()
        self.assertLess(size, 340, f"{size:.0f} bytes per ConnectionInfo")
