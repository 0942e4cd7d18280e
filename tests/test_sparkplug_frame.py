"""A device's DDATA frame (bridge.core.sparkplug._Frame), kept between polls: the bytes are
those the general path writes for the same values, poll after poll, whatever came between.

The general path is what `ddata` takes for anything but a good poll of every metric; a name
no metric has sends it there (and is left out), so the two are compared on the same input,
metric by metric (the frame lists them in the points' order, the general path in the values';
a host reads them by alias).
tck-id-payloads-name-birth-data-requirement: every DDATA metric has its timestamp.
"""

from __future__ import annotations

from typing import Any

import pysparkplug as ps
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.config import Device, Point
from bridge.core import sparkplug as sp
from bridge.core import sparkplug_pb2 as pb
from bridge.core.codec import Value
from bridge.core.sparkplug_frame import Frames
from tests.helpers import examples

# point fields, and values a reading may take (in range, out of range, of another type)
KINDS: dict[str, tuple[dict[str, Any], st.SearchStrategy[Any]]] = {
    "int16": ({"type": "int16"}, st.integers(-(2**15) - 2, 2**15 + 1)),
    "uint16": ({"type": "uint16"}, st.integers(-2, 2**16 + 1) | st.just(3.0) | st.just(True)),
    "int32": ({"type": "int32"}, st.integers(-(2**31), 2**31 - 1)),
    "uint32": ({"type": "uint32"}, st.integers(0, 2**32)),
    "int64": ({"type": "int64"}, st.integers(-(2**63), 2**63 - 1)),
    "uint64": ({"type": "uint64"}, st.integers(0, 2**64 - 1)),
    "float32": ({"type": "float32"}, st.floats(width=32) | st.just(1e300)),
    "float64": ({"type": "float64"}, st.floats(allow_nan=False)),
    "bool": ({"type": "bool"}, st.booleans()),
    "string": ({"type": "string", "count": 4}, st.text(max_size=8)),
    "enum": ({"values": {0: "stopped"}}, st.sampled_from(["stopped", "7"])),
    "scaled": ({"type": "int32", "scale": 0.1}, st.floats(-1e6, 1e6)),
}
SECOND = {f"{kind}_2": KINDS[kind] for kind in ("uint16", "int16")}  # groups of two and more
POINTS = {**KINDS, **SECOND}


def _device(points: dict[str, tuple[dict[str, Any], Any]]) -> sp.DeviceMetrics:
    device = Device(name="d", link="bus", points=[
        Point(name=name, address=10 * i, **fields) for i, (name, (fields, _)) in
        enumerate(points.items())
    ])  # fmt: skip
    found = sp.NodeMetrics([device]).device("d")
    assert found is not None
    return found


def _general(device: sp.DeviceMetrics, values: dict[str, Value], ts: int) -> bytes:
    return sp.ddata(device, {**values, "no such point": 0}, acquired=ts, seq=None, ts=ts + 1)


def _by_alias(raw: bytes) -> tuple[int, list[bytes]]:
    """A payload's timestamp and its metrics' bytes, by alias (hosts read them so)."""
    payload = pb.Payload.FromString(raw)
    assert not payload.HasField("seq")
    metrics = sorted(payload.metrics, key=lambda m: m.alias)
    return payload.timestamp, [m.SerializeToString() for m in metrics]


POLL = st.fixed_dictionaries({name: values for name, (_, values) in POINTS.items()})


@settings(max_examples=examples(150))
@given(st.lists(POLL, min_size=1, max_size=5))
def test_the_frame_writes_what_the_general_path_writes(polls: list[dict[str, Value]]) -> None:
    device = _device(POINTS)
    for ts, values in enumerate(polls, start=1000):
        framed = sp.ddata(device, values, acquired=ts, seq=None, ts=ts + 1)
        assert _by_alias(framed) == _by_alias(_general(device, values, ts))
        assert all(m.timestamp == ts for m in pb.Payload.FromString(framed).metrics)


def test_a_frame_reused_decodes_as_its_own_poll_only() -> None:
    """Three polls of one device through one frame, a value that does not fit between:
    pysparkplug reads each as it was read, with its seq and its timestamps."""
    points = {"a": ({"type": "int16"}, None), "b": ({"type": "uint16"}, None),
              "c": ({"type": "float32"}, None)}  # fmt: skip
    device = _device(points)
    birth = ps.DBirth.decode(sp.dbirth(device, {}, seq=0, ts=1))
    polls = [({"a": -5, "b": 7, "c": 1.5}, 5), ({"a": 1, "b": 70000, "c": 2.5}, 6),
             ({"a": 32767, "b": 0, "c": -0.25}, 7)]  # fmt: skip
    for seq, (values, ts) in enumerate(polls, start=1):
        data = ps.DData.decode(sp.ddata(device, values, acquired=ts, seq=seq, ts=ts), birth=birth)
        assert data.seq == seq
        seen = {m.name: (m.value, m.is_null, m.timestamp) for m in data.metrics}
        assert seen == {
            name: (None, True, ts) if (name, value) == ("b", 70000) else (value, False, ts)
            for name, value in values.items()
        }


@settings(max_examples=examples(100))
@given(st.lists(st.tuples(st.sampled_from(["d1", "d2", "d3"]), POLL), min_size=1, max_size=8))
def test_devices_of_one_map_share_a_frame_and_each_poll_carries_its_own_aliases(
    polls: list[tuple[str, dict[str, Value]]],
) -> None:
    """Past the node's frame budget, devices of one shape (one map's) share one frame: polls
    of them in any order, a value that does not fit among them, each DDATA is that
    device's, alias for alias. d1's frame is its own (within the budget), d2 and d3 share."""
    points = [Point(name=name, address=10 * i, **fields)
              for i, (name, (fields, _)) in enumerate(POINTS.items())]  # fmt: skip
    node = sp.NodeMetrics([Device(name=name, link="bus", points=points)
                           for name in ("d1", "d2", "d3")],
                          frames=Frames(budget=len(points)))  # fmt: skip
    devices = {name: node.device(name) for name in ("d1", "d2", "d3")}
    d1, d2, d3 = (d.frame for d in devices.values() if d is not None)
    assert d2 is d3
    assert d1 is not d2
    for ts, (name, values) in enumerate(polls, start=1000):
        device = devices[name]
        assert device is not None
        framed = sp.ddata(device, values, acquired=ts, seq=None, ts=ts + 1)
        assert _by_alias(framed) == _by_alias(_general(device, values, ts))
        assert {m.alias for m in pb.Payload.FromString(framed).metrics} <= set(device.aliases)
