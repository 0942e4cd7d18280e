"""Scale factors read live (`scale_from:`, SunSpec sunssf): the config's checks, located; the
value a factor makes (positive, negative, not implemented, out of range); the planner reading
a factor with every point scaled from it; the Sparkplug datatype; and, against the simulator,
a factor that changes at run time changing what is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.config import Config, Point, load_config
from bridge.core import sparkplug_pb2 as pb
from bridge.core.codec import Value
from bridge.core.planner import plan_device
from bridge.core.scalefactors import LiveScales, exponent, scaled, with_factors
from bridge.core.sparkplug_types import datatype
from bridge.errors import ConfigError
from bridge.tools.points import read_config_points
from tests.helpers import free_port, simulated

POINTS: list[dict[str, Any]] = [
    {"name": "w", "address": 0, "unit": "W", "scale_from": "w_sf",
     "simulate": {"value": 2840}},
    {"name": "v", "address": 1, "unit": "V", "scale_from": "v_sf",
     "simulate": {"value": 230.5}},
    {"name": "w_sf", "address": 2, "type": "int16", "simulate": {"value": 1}},
    {"name": "v_sf", "address": 3, "type": "int16", "simulate": {"value": -1}},
]


def _config(tmp_path: Path, points: list[dict[str, Any]], port: int = 1502) -> Path:
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1,
        "links": [{"name": "bus", "type": "tcp", "host": "127.0.0.1", "port": port}],
        "devices": [{"name": "inverter", "link": "bus", "points": points}],
    }, sort_keys=False))
    return path


def _errors(tmp_path: Path, points: list[dict[str, Any]]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(_config(tmp_path, points))
    return [f"{i.line}: {i.path}: {i.message}" for i in caught.value.issues]


def pt(name: str, address: int, **kw: Any) -> Point:
    return Point(name=name, address=address, **kw)


class TestTheConfig:
    def test_a_valid_map_loads(self, tmp_path: Path) -> None:
        device = load_config(_config(tmp_path, POINTS)).device("inverter")
        assert {p.name: p.scale_from for p in device.points}["w"] == "w_sf"

    def test_an_unknown_point_is_a_located_error(self, tmp_path: Path) -> None:
        points = [*POINTS[:1], {**POINTS[1], "scale_from": "hz_sf"}, *POINTS[2:]]
        assert _errors(tmp_path, points) == [
            "20: devices[0].points[1].scale_from: no point 'hz_sf' in this device"]

    def test_a_factor_that_is_not_int16_is_a_located_error(self, tmp_path: Path) -> None:
        points = [*POINTS[:2], {**POINTS[2], "type": "uint16"}, POINTS[3]]
        assert _errors(tmp_path, points) == [
            "14: devices[0].points[0].scale_from: 'w_sf' is uint16: a scale factor is an int16 "
            "register (SunSpec sunssf)"]

    def test_a_chained_factor_is_a_located_error(self, tmp_path: Path) -> None:
        points = [*POINTS[:2], {**POINTS[2], "scale_from": "v_sf"}, POINTS[3]]
        assert _errors(tmp_path, points) == [
            "14: devices[0].points[0].scale_from: 'w_sf' is itself scaled from 'v_sf': scale "
            "factors do not chain"]

    def test_a_writable_point_cannot_be_scaled_live(self, tmp_path: Path) -> None:
        points = [{**POINTS[0], "writable": True}, *POINTS[1:]]
        assert _errors(tmp_path, points) == [
            "14: devices[0].points[0].scale_from: a point scaled from a live "
            "factor cannot be writable"]

    @pytest.mark.parametrize(("extra", "why"), [
        ({"type": "string", "count": 2}, "only numbers are scaled, not a string"),
        ({"type": "int16", "bit": 3}, "only numbers are scaled, not a bit"),
        ({"values": {0: "off"}}, "an enum (values) names raw codes"),
        ({"scale_from": "w"}, "a point cannot be scaled from itself"),
    ])
    def test_what_a_factor_cannot_scale(
        self, tmp_path: Path, extra: dict[str, Any], why: str
    ) -> None:
        points = [{**POINTS[0], **extra}, *POINTS[1:]]
        errors = _errors(tmp_path, points)
        assert len(errors) == 1
        assert ": devices[0].points[0].scale_from: " in errors[0]
        assert why in errors[0]


class TestTheValue:
    @pytest.mark.parametrize(("raw", "factor", "value"), [
        (2840, 0, 2840), (284, 1, 2840), (2305, -1, 230.5), (5001, -2, 50.01),
        (7, 3, 7000), (-125, -2, -1.25),
    ])
    def test_a_factor_is_a_power_of_ten(self, raw: int, factor: int, value: Value) -> None:
        found = scaled(pt("w", 0), raw, factor)
        assert found == value
        assert type(found) is type(value)  # a whole number stays an integer

    def test_scale_and_offset_apply_after_the_factor(self) -> None:
        """W to kW: raw 2305 with factor -1 is 230.5 W, 0.2305 kW (no binary noise)."""
        assert scaled(pt("w", 0, scale=0.001), 2305, -1) == 0.2305
        assert scaled(pt("t", 0, offset=-2), 415, -1) == 39.5
        assert scaled(pt("t", 0, precision=0), 2305, -1) == 230

    @pytest.mark.parametrize("raw", [-0x8000, 11, -11, None, 1.5, True])
    def test_not_implemented_or_out_of_range_is_no_factor(self, raw: Value | None) -> None:
        assert exponent(raw) is None

    def test_a_poll_scales_by_the_factor_read_with_it(self) -> None:
        points = [pt("w", 0, scale_from="w_sf"), pt("w_sf", 1, type="int16"), pt("x", 2)]
        live = LiveScales.of(points)
        assert live is not None
        values: dict[str, Value] = {}
        # The value before its factor in the reply: scaled all the same.
        assert live.normalize_all(list(zip(points, [284, 1, 5], strict=True)), values) == 0
        assert values == {"w": 2840, "w_sf": 1, "x": 5}

    @pytest.mark.parametrize("factor", [-0x8000, 12, -20])
    def test_an_unusable_factor_leaves_its_points_out(self, factor: int) -> None:
        """Not implemented (0x8000) or out of -10..10: no value, counted, nothing raised."""
        points = [pt("w", 0, scale_from="w_sf"), pt("w_sf", 1, type="int16"), pt("x", 2)]
        live = LiveScales.of(points)
        assert live is not None
        values: dict[str, Value] = {}
        assert live.normalize_all(list(zip(points, [284, factor, 5], strict=True)),
                                  values) == 1
        assert values == {"w_sf": factor, "x": 5}

    def test_a_factor_not_read_leaves_its_points_out(self) -> None:
        live = LiveScales.of([pt("w", 0, scale_from="w_sf"), pt("w_sf", 1, type="int16")])
        assert live is not None
        values: dict[str, Value] = {}
        assert live.normalize_all([(pt("w", 0, scale_from="w_sf"), 284)], values) == 1
        assert values == {}

    def test_a_device_without_scale_from_takes_the_plain_path(self) -> None:
        assert LiveScales.of([pt("x", 0), pt("y", 1, scale=0.1)]) is None

    def test_sparkplug_calls_a_live_scaled_point_a_double(self) -> None:
        assert datatype(pt("w", 0, scale_from="w_sf")) == pb.Double
        assert datatype(pt("w_sf", 1, type="int16")) == pb.Int16


class TestThePlan:
    def test_a_factor_is_read_in_every_poll_of_the_points_it_scales(self) -> None:
        """The factor polls every 10 s, its values every 1 s and 5 s: it is read in all three
        groups, so every value is scaled by the factor read with it."""
        points = [pt("w", 0, scale_from="sf", interval=1.0), pt("a", 50, scale_from="sf"),
                  pt("sf", 100, type="int16", interval=10.0), pt("x", 200, interval=1.0)]
        groups = plan_device(points, interval=5.0)
        read = {g.interval: {p.name for r in g.requests for p in r.points} for g in groups}
        assert read == {1.0: {"w", "sf", "x"}, 5.0: {"a", "sf"}, 10.0: {"sf"}}

    def test_a_factor_in_the_same_group_is_read_once(self) -> None:
        points = [pt("w", 0, scale_from="sf"), pt("sf", 1, type="int16")]
        (group,) = plan_device(points, interval=1.0)
        assert [p.name for r in group.requests for p in r.points] == ["w", "sf"]

    def test_a_read_of_some_points_reads_their_factors_too(self) -> None:
        points = {p.name: p for p in [pt("w", 0, scale_from="sf"), pt("sf", 1, type="int16"),
                                      pt("x", 2)]}
        assert with_factors(points, ["x", "w"]) == ["x", "w", "sf"]
        assert with_factors(points, ["sf", "w"]) == ["sf", "w"]


@pytest.mark.integration
async def test_a_factor_changed_on_the_device_changes_the_value_read(tmp_path: Path) -> None:
    """The simulator stores W = 2840 as 284 with W_SF 1; when the device's factor changes
    (SolarEdge does this), the same register reads a value ten times larger: the factor is
    read with it, not baked in when the map was made."""
    config: Config = load_config(_config(tmp_path, POINTS, free_port()))
    async with simulated(config) as sim:
        assert sim.registers("inverter", "holding", 0, 4) == [284, 2305, 1, 0xFFFF]
        first = {r.name: r.value for r in await read_config_points(config, "inverter", [])}
        assert first == {"w": 2840, "v": 230.5, "w_sf": 1, "v_sf": -1}
        sim.set_value("inverter", "w_sf", 2)
        only = await read_config_points(config, "inverter", ["w"])  # its factor read with it
        assert [(r.name, r.value) for r in only] == [("w", 28400)]
        sim.set_value("inverter", "v_sf", -0x8000)  # "not implemented"
        with pytest.raises(Exception, match="'v_sf' reads none"):
            await read_config_points(config, "inverter", ["v"])
