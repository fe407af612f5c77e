"""
The configuration as Envoy messages: every shipped config round-trips (YAML -> message -> YAML
-> message, equal), `config render` output does too, and random mutations of the shipped configs
only ever give a ConfigError naming a YAML path (hypothesis), never a traceback.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from hbonex.config import load_config, load_message
from hbonex.config.render import message_to_data, message_to_yaml
from hbonex.errors import ConfigError

HERE = Path(__file__).resolve().parent
SHIPPED = sorted(HERE.glob("configs/*.yaml")) + sorted(
    (HERE.parent.parent / "shared" / "configs").glob("*.yaml"))


class RoundTripTests(unittest.TestCase):
    def test_shipped_configs_round_trip(self) -> None:
        self.assertTrue(SHIPPED)
        for path in SHIPPED:
            first, _, _ = load_message(path)
            text = message_to_yaml(first)
            second, _, _ = load_message(text)
            # Compared as data: an Any holds its message serialized, and a Struct's map (a
            # json_format log with several keys) serializes its keys in no fixed order.
            self.assertEqual(message_to_data(first), message_to_data(second), path)
            self.assertEqual(message_to_data(second), yaml.safe_load(text), path)

    def test_render_output_round_trips(self) -> None:
        from hbonex.cli.config_cmd import render

        for side, flags in (("client", ["--forward", "127.0.0.1:9000=127.0.0.1:8080"]),
                            ("server", [])):
            text = render(side, flags)
            message, _, _ = load_message(text)
            again, _, _ = load_message(message_to_yaml(message))
            self.assertEqual(message, again)


# -- mutations -------------------------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=8), st.sampled_from(["5s", "-1s", "TLSv1_3", "STATIC", "@type", "*", ""]),
    st.just([]), st.just({}), st.just({"@type": "type.googleapis.com/nope.Nope"}),
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    result = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            result += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            result += _paths(item, (*prefix, index))
    return result


def _mutate(data: Any, draw: Any) -> Any:
    data = copy.deepcopy(data)
    paths = [p for p in _paths(data) if p]
    if not paths:
        return data
    path = draw(st.sampled_from(paths))
    parent = data
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    action = draw(st.sampled_from(["replace", "delete", "rename", "duplicate"]))
    if action == "replace":
        parent[last] = draw(SCALARS)
    elif action == "delete":
        del parent[last]
    elif action == "rename" and isinstance(parent, dict):
        parent[f"{last}{draw(st.sampled_from(['x', '_', 's']))}"] = parent.pop(last)
    elif isinstance(parent, list):
        parent.append(copy.deepcopy(parent[last]))
    else:
        parent[last] = [parent[last]]
    return data


@st.composite
def mutated(draw: Any) -> tuple[Path, str]:
    path = draw(st.sampled_from(SHIPPED))
    data = yaml.safe_load(path.read_text())
    for _ in range(draw(st.integers(1, 3))):
        data = _mutate(data, draw)
    return path, yaml.safe_dump(data)


class MutationTests(unittest.TestCase):
    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutated())
    def test_mutations_give_config_errors_with_a_path(self, case: tuple[Path, str]) -> None:
        source, text = case
        try:
            load_config(text + "\n", MemoryReactorClock(), base_dir=source.parent)
        except ConfigError as e:
            message = str(e)
            # A YAML path, or for the top level the source or the line.
            self.assertTrue(e.path or message.startswith("<config>") or "(line 1)" in message,
                            message)
            # Protobuf's own wording never reaches the user.
            self.assertNotIn("Failed to parse", message)
            self.assertNotIn("Message type", message)
