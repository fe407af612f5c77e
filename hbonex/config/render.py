"""
Envoy messages -> YAML: what ``hbonex config render`` prints is a Bootstrap message written out
with protobuf's JSON mapping (Envoy's field names), so it is valid Envoy by construction.
"""

from __future__ import annotations

from typing import Any

import yaml
from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
from google.protobuf import json_format
from google.protobuf.message import Message

from hbonex.config.schema import to_message

__all__ = ["bootstrap_from_data", "message_to_data", "message_to_yaml"]


def bootstrap_from_data(data: Any) -> Bootstrap:
    """
    Plain data (dicts and lists in Envoy's YAML shape) as a Bootstrap message.
    """
    return to_message(data, Bootstrap)  # type: ignore[return-value]


def message_to_data(message: Message) -> dict[str, Any]:
    # preserving_proto_field_name: Envoy's docs and configs use snake_case names.
    return _plain(json_format.MessageToDict(message, preserving_proto_field_name=True))


def _plain(value: Any) -> Any:
    # MessageToDict gives OrderedDicts for Any, which safe_dump refuses.
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def message_to_yaml(message: Message) -> str:
    return yaml.safe_dump(message_to_data(message), sort_keys=False,
                          default_flow_style=False, width=100)
