"""Topics and payloads are the MQTT contract, byte for byte."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.core.messages import Topics, device_payload, point_payload


def test_json_payload_has_value_ts_unit() -> None:
    """format json: {"value": v, "ts": ms, "unit": u}."""
    assert point_payload(230.5, 1764000000123, "V", "json") == (
        b'{"value":230.5,"ts":1764000000123,"unit":"V"}'
    )


def test_json_payload_without_unit_leaves_it_out() -> None:
    """A point with no unit has no unit key."""
    assert json.loads(point_payload(True, 1, None, "json")) == {"value": True, "ts": 1}


def test_value_format_is_bare_json() -> None:
    """format value: just the JSON value; strings stay quoted JSON strings."""
    assert point_payload(230.5, 1, "V", "value") == b"230.5"
    assert point_payload("running", 1, None, "value") == b'"running"'
    assert point_payload(False, 1, None, "value") == b"false"


def test_device_payload() -> None:
    """messages per-device: {"ts": ms, "values": {...}}."""
    body = json.loads(device_payload({"a": 1, "b": "x"}, 5))
    assert body == {"ts": 5, "values": {"a": 1, "b": "x"}}


def test_topics() -> None:
    """Topic names under the prefix match DESIGN.md."""
    t = Topics("m2m/gw-01")
    assert t.gateway_status == "m2m/gw-01/status"
    assert t.device_status("meter-1") == "m2m/gw-01/meter-1/status"
    assert t.point("meter-1", "voltage_l1") == "m2m/gw-01/meter-1/voltage_l1"
    assert t.device("meter-1") == "m2m/gw-01/meter-1"
    assert t.command("pump-1", "setpoint") == "m2m/gw-01/pump-1/setpoint/set"


@given(
    value=st.one_of(
        st.booleans(), st.integers(-(2**64), 2**64), st.floats(allow_nan=False,
        allow_infinity=False), st.text(max_size=20),
    ),
    ts=st.integers(0, 2**45),
    unit=st.one_of(st.none(), st.text(max_size=5)),
    fmt=st.sampled_from(["json", "value"]),
)
def test_payload_bytes_equal_json_dumps(value: object, ts: int, unit: str | None, fmt: str) -> None:
    """The precompiled payload is byte for byte what json.dumps writes for the contract."""
    body: dict[str, object] = {"value": value, "ts": ts}
    if unit is not None:
        body["unit"] = unit
    expected = json.dumps(value if fmt == "value" else body, separators=(",", ":"),
                          ensure_ascii=False)
    assert point_payload(value, ts, unit, fmt) == expected.encode()  # type: ignore[arg-type]


def test_nan_payload_is_refused() -> None:
    """NaN is not JSON: building its payload raises, as json.dumps with allow_nan=False does."""
    with pytest.raises(ValueError, match="not JSON compliant"):
        point_payload(float("nan"), 1, None, "json")
