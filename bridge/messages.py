"""Message building: readings -> MQTT topic and payload bytes. Pure.

Topics and payloads are DESIGN.md's MQTT contract, to the byte: `json` payloads are compact
(`{"value":230.5,"ts":1764000000123,"unit":"V"}`), `value` payloads are the bare JSON value.
Messages are built when a reading is taken, so the buffer and the publisher only move bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from bridge.codec import Value

Format = Literal["json", "value"]

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT publish, ready for the wire. `ts` (epoch ms) is when the data was acquired."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    ts: int


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names under one gateway's prefix."""

    prefix: str

    @property
    def gateway_status(self) -> str:
        return f"{self.prefix}/status"

    def device_status(self, device: str) -> str:
        return f"{self.prefix}/{device}/status"

    def point(self, device: str, point: str) -> str:
        return f"{self.prefix}/{device}/{point}"

    def device(self, device: str) -> str:
        return f"{self.prefix}/{device}"

    def command(self, device: str, point: str) -> str:
        return f"{self.prefix}/{device}/{point}/set"


def point_payload(value: Value, ts: int, unit: str | None, fmt: Format) -> bytes:
    """`{"value": v, "ts": ms, "unit": u}` (unit left out when the point has none), or `v`."""
    if fmt == "value":
        return _dumps(value).encode()
    body: dict[str, Value] = {"value": value, "ts": ts}
    if unit is not None:
        body["unit"] = unit
    return _dumps(body).encode()


def device_payload(values: Mapping[str, Value], ts: int) -> bytes:
    """`{"ts": ms, "values": {point: value, ...}}` for `messages: per-device`."""
    return _dumps({"ts": ts, "values": values}).encode()
