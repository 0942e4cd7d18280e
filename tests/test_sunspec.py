"""SunSpec: the chain walk and its scale factors on synthesized registers (no I/O), the
simulated inverter, and `m2m-bridge sunspec` against it over TCP and over an RTU pty with a
dead unit beside it.
"""

from __future__ import annotations

import itertools
import json
import re
import struct
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path

import pytest
import yaml

from bridge.config import Config, load_config
from bridge.core.codec import Field, encode
from bridge.core.sunspec import (
    END,
    MARKER,
    Chain,
    ChainWalk,
    NotSunSpec,
    SunSpecError,
    decode_model,
    model_definition,
)
from bridge.sim.sunspec import MANUFACTURER, MODEL, sunspec_config, sunspec_points
from tests.helpers import assert_usage_error, cli, free_port, rtu_line, simulated

NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def text(value: str, registers: int) -> list[int]:
    return list(struct.unpack(f">{registers}H", value.encode().ljust(2 * registers, b"\0")))


def s16(value: int) -> int:
    return value & 0xFFFF


def common(maker: str = "ACME", model: str = "Inv 3000", serial: str = "SN123") -> list[int]:
    """Model 1: Mn, Md, Opt (not implemented), Vr, SN, DA and the pad."""
    body = text(maker, 16) + text(model, 16) + [0] * 8 + text("1.0", 8) + text(serial, 16)
    return [1, 66, *body, 1, 0]


def inverter_101(**raw: int) -> list[int]:
    """Model 101 (single phase), every point not implemented but those given (raw values)."""
    definition = model_definition(101)
    assert definition is not None
    missing = {"int16": 0x8000, "sunssf": 0x8000, "acc32": 0}
    words: list[int] = []
    for point in definition.group.points[2:]:
        value = raw.get(point.name, missing.get(point.type, 0xFFFFFFFF))
        words += [value >> 16 & 0xFFFF, value & 0xFFFF] if point.size == 2 else [s16(value)]
    return [101, len(words), *words]


def walk(registers: Mapping[int, int], base: int = 40000, *, chunk: int = 125) -> Chain:
    """Walk a chain over `registers` as a device would serve them (address -> word)."""
    walker = ChainWalk(base, max_registers=chunk)
    while (want := walker.wants()) is not None:
        address, count = want
        assert count <= chunk
        walker.feed([registers.get(a, 0) for a in range(address, address + count)])
    return walker.chain()


def laid(base: int, *blocks: Sequence[int]) -> dict[int, int]:
    words = [w for block in blocks for w in block]
    return dict(enumerate(words, base))


def chain_101(**raw: int) -> Chain:
    return walk(laid(40000, MARKER, common(), inverter_101(**raw), [END, 0]))


def values(chain: Chain) -> dict[str, object]:
    return {p.name: p.value for m in chain.models for p in m.points}


class TestChainWalk:
    """The walk over synthesized registers: marker, models in order, the end marker."""

    def test_walks_the_models_in_chain_order(self) -> None:
        chain = chain_101(A=1234, A_SF=-2, W=3000, W_SF=0)
        assert [(m.id, m.address, m.length) for m in chain.models] == [
            (1, 40002, 66), (101, 40070, 50)]
        assert chain.common("Mn") == "ACME"
        assert chain.common("Md") == "Inv 3000"
        assert chain.common("SN") == "SN123"

    def test_reads_at_most_max_registers_at_a_time(self) -> None:
        chain = walk(laid(0, MARKER, common(), inverter_101(W=1, W_SF=0), [END, 0]), 0,
                     chunk=10)
        assert values(chain)["m101_W"] == 1

    def test_scale_factors_are_applied(self) -> None:
        found = values(chain_101(A=1234, A_SF=-2, PhVphA=2305, V_SF=-1, W=31, W_SF=2,
                                 Hz=5001, Hz_SF=-2))
        assert found["m101_A"] == 12.34
        assert found["m101_PhVphA"] == 230.5
        assert found["m101_W"] == 3100
        assert found["m101_Hz"] == 50.01
        assert found["m101_A_SF"] == -2

    def test_not_implemented_values_are_none(self) -> None:
        """0x8000 (int16), 0xFFFF (uint16), 0 (acc32), an empty string: None; and a point
        whose scale factor is not implemented has no number either."""
        found = values(chain_101(W=0x8000, W_SF=0, A=0xFFFF, A_SF=-2, PhVphA=2300))
        assert found["m101_W"] is None
        assert found["m101_A"] is None
        assert found["m101_WH"] is None
        assert found["m1_Opt"] is None
        assert found["m101_PhVphA"] is None  # V_SF is not implemented

    def test_enums_read_as_their_names(self) -> None:
        found = values(chain_101(St=4, StVnd=77))
        assert found["m101_St"] == "MPPT"
        assert found["m101_StVnd"] == 77  # a vendor state with no definition: the number

    def test_an_unknown_model_is_walked_over(self) -> None:
        chain = walk(laid(40000, MARKER, common(), [64999, 3, 1, 2, 3],
                          inverter_101(W=5, W_SF=0), [END, 0]))
        assert [m.id for m in chain.models] == [1, 64999, 101]
        assert chain.models[1].points == ()
        assert values(chain)["m101_W"] == 5

    def test_no_marker_is_not_sunspec(self) -> None:
        with pytest.raises(NotSunSpec, match=r"no SunSpec marker at 40000 \(found 00 2a"):
            walk(laid(40000, [42, 0]))

    @pytest.mark.parametrize(("blocks", "message"), [
        ([[103, 65000]], "model 103 of length 65000 runs past register 65535"),
        ([[0, 4]], "at 40070: model id 0"),
    ])
    def test_a_broken_chain_is_one_line(self, blocks: list[list[int]], message: str) -> None:
        with pytest.raises(SunSpecError) as caught:
            walk(laid(40000, MARKER, common(), *blocks))
        assert message in str(caught.value)
        assert "\n" not in str(caught.value)

    def test_a_chain_without_an_end_stops_at_the_last_register(self) -> None:
        with pytest.raises(SunSpecError, match="no end marker before register 65535"):
            walk(laid(65500, MARKER, [64999, 32, *[0] * 32]), 65500)

    def test_a_short_read_is_an_error(self) -> None:
        walker = ChainWalk(40000)
        with pytest.raises(SunSpecError, match="1 of 2 registers"):
            walker.feed([0x5375])


class TestModels:
    def test_repeating_groups_are_named_by_index(self) -> None:
        """Model 160's modules fill the model: two of them, module1_ and module2_, scaled by
        the model's own DCA_SF."""
        words = simulated_words()
        chain = walk(words)
        found = values(chain)
        assert found["m160_module1_DCA"] == 3.75
        assert found["m160_module2_DCV"] == 379.9
        assert found["m160_module2_IDStr"] == "PV2"
        assert "m160_module3_DCA" not in found

    @pytest.mark.parametrize("model_id", [1, 101, 103, 160, 201, 203, 701, 705, 802, 805])
    def test_definitions_lay_out_with_valid_point_names(self, model_id: int) -> None:
        definition = model_definition(model_id)
        assert definition is not None
        model = decode_model(40002, [model_id, 200, *[1] * 200])
        assert model.points
        names = [p.name for p in model.points]
        assert all(NAME.match(n) for n in names), names
        assert len(set(names)) == len(names)

    def test_a_second_instance_of_a_model_gets_its_own_names(self) -> None:
        chain = walk(laid(40000, MARKER, common(), inverter_101(W=1, W_SF=0),
                          inverter_101(W=2, W_SF=0), [END, 0]))
        assert values(chain)["m101_W"] == 1
        assert values(chain)["m101_2_W"] == 2


def simulated_words(unit: int = 1) -> dict[int, int]:
    """The registers the simulator serves for a `map: sunspec` device."""
    words: dict[int, int] = {}
    for point in sunspec_points(unit):
        assert point.address is not None
        assert point.simulate is not None
        assert point.simulate.value is not None
        value = point.simulate.value
        if point.scale != 1 and isinstance(value, (int, float)):
            value = round(value / point.scale)
        for offset, word in enumerate(encode(Field(0, point.type, "ABCD", None, point.count),
                                             value)):
            words[point.address + offset] = word
    return words


class TestTheMap:
    def test_the_map_keeps_implemented_points_scaled_from_their_factor_points(self) -> None:
        """Scale factors are points of the map, read live: each scaled point names its own
        (a module of model 160 the model's), with no `scale` baked in."""
        device_map = walk(simulated_words(7)).device_map(source="test")
        points = {p.name: p for p in device_map.points}
        assert (device_map.manufacturer, device_map.model) == (MANUFACTURER, MODEL)
        assert device_map.sunspec_base == 40000
        amps = points["m103_A"]
        assert (amps.address, amps.type, amps.scale, amps.precision, amps.unit,
                amps.scale_from) == (40072, "uint16", 1, None, "A", "m103_A_SF")
        assert (points["m103_A_SF"].address, points["m103_A_SF"].type) == (40076, "int16")
        assert points["m103_W"].scale_from == "m103_W_SF"
        assert points["m160_module2_DCA"].scale_from == "m160_DCA_SF"
        assert all(p.scale == 1 for p in device_map.points)
        assert points["m103_TmpCab"].unit == "°C"
        assert points["m103_St"].values is not None
        assert points["m103_St"].values[4] == "MPPT"
        assert points["m103_St"].scale_from is None
        assert points["m1_SN"].count == 16
        assert "m103_TmpSnk" not in points  # not implemented
        assert "m103_ID" not in points
        assert "m160_module1_Tms" not in points

    def test_a_baked_map_multiplies_the_factors_read_into_scale(self) -> None:
        device_map = walk(simulated_words(7)).device_map(source="test", baked=True)
        points = {p.name: p for p in device_map.points}
        amps = points["m103_A"]
        assert (amps.address, amps.type, amps.scale, amps.precision, amps.unit,
                amps.scale_from) == (40072, "uint16", 0.01, 2, "A", None)
        assert points["m103_W"].scale == 1
        assert not [n for n in points if n.endswith("_SF")]  # baked into scale
        live = walk(simulated_words(7)).device_map(source="test")
        assert {p.name for p in device_map.points} == {
            p.name for p in live.points if not p.name.endswith("_SF")}

    def test_a_written_map_loads_without_modicon_warnings(self, tmp_path: Path) -> None:
        device_map = walk(simulated_words()).device_map(source="test")
        (tmp_path / "inverter.yaml").write_text(yaml.safe_dump(
            device_map.model_dump(mode="python", exclude_defaults=True), allow_unicode=True))
        (tmp_path / "bridge.yaml").write_text(yaml.safe_dump({
            "version": 1, "links": [{"name": "plc", "type": "tcp", "host": "127.0.0.1"}],
            "devices": [{"name": "inverter", "link": "plc", "map": "inverter.yaml"}],
        }))
        config = load_config(tmp_path / "bridge.yaml")
        assert config.warnings == []
        assert len(config.device("inverter").points) == len(device_map.points)


# --- the command, against the simulator ---------------------------------------------------


def expected_values() -> dict[str, object]:
    """What the map's points read on the simulated inverter (unit 1)."""
    found = values(walk(simulated_words()))
    return {k: v for k, v in found.items() if v is not None}


@pytest.fixture
async def tcp() -> AsyncIterator[str]:
    port = free_port()
    async with simulated(sunspec_config(unit=1, host="127.0.0.1", port=port)):
        yield f"tcp://127.0.0.1:{port}"


def rtu_config() -> Config:
    """Unit 1 a SunSpec inverter, unit 2 a meter that is not; unit 3 dead."""
    return Config.model_validate({
        "version": 1,
        "links": [{"name": "bus", "type": "rtu", "port": "/dev/null", "baudrate": 19200}],
        "devices": [
            {"name": "inverter", "link": "bus", "unit": 1, "map": "sunspec"},
            {"name": "meter", "link": "bus", "unit": 2, "points": [
                {"name": "volts", "address": 0, "simulate": {"value": 230}}]},
        ],
    })


@pytest.fixture
def rtu(tmp_path: Path) -> Iterator[str]:
    with rtu_line(rtu_config(), tmp_path / "ptys") as url:
        yield url


@pytest.mark.integration
async def test_sunspec_tcp_table(tcp: str) -> None:
    r = await cli("sunspec", tcp, "--unit", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"SunSpec device at 40000: {MANUFACTURER} {MODEL}"
    assert lines[2].split() == ["model", "name", "address", "length", "points"]
    assert lines[3].split()[:1] + lines[3].split()[-3:-1] == ["1", "40002", "66"]
    rows = {line.split()[0]: line.split() for line in lines if line}
    assert rows["103"][-3:-1] == ["40070", "50"]
    assert rows["m103_A"] == ["m103_A", "40072", "uint16", "12.34", "A"]
    assert rows["m103_TmpSnk"][3:5] == ["(not", "implemented)"]
    assert rows["m160_module2_DCW"][3] == "1410"
    assert r.stderr == ""
    r = await cli("identify", tcp, "--unit", "1", "--json")  # FC43 says the same
    assert r.returncode == 0, r.stderr
    objects = json.loads(r.stdout)["objects"]
    assert (objects["VendorName"], objects["ModelName"]) == (MANUFACTURER, MODEL)


@pytest.mark.integration
async def test_sunspec_tcp_json_write_validate_and_read(tcp: str, tmp_path: Path) -> None:
    """--json gives the walk and the map; --write a map file a config uses, and reading the
    device through it gives the simulated values."""
    written = tmp_path / "inverter.yaml"
    r = await cli("sunspec", tcp, "--unit", "1", "--json", "--write", str(written))
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    assert found["base"] == 40000
    assert [m["id"] for m in found["models"]] == [1, 103, 160]
    assert found["serial"] == "SIM00001"
    by_name = {p["name"]: p for p in found["points"]}
    assert by_name["m103_Hz"]["value"] == 50.01
    assert by_name["m103_Hz"]["scale_factor"] == -2
    assert by_name["m103_TmpOt"]["value"] is None
    assert found["map"]["points"][0]["name"] == "m1_Mn"
    assert f"{written}: a map of" in r.stderr
    header = written.read_text().splitlines()[:3]
    assert header[0].startswith(f"# Made by `m2m-bridge sunspec {tcp} --unit 1`")
    assert "SunSpec model chain of unit 1" in header[1]

    config = tmp_path / "bridge.yaml"
    config.write_text(yaml.safe_dump({
        "version": 1, "gateway": {"state_dir": str(tmp_path / "state")},
        "links": [{"name": "plc", "type": "tcp", "host": "127.0.0.1",
                   "port": int(tcp.rsplit(":", 1)[1])}],
        "devices": [{"name": "inverter", "link": "plc", "map": "inverter.yaml"}],
    }))
    r = await cli("validate", "-c", str(config))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no Modicon warnings for SunSpec's own 40000s
    r = await cli("read", "-c", str(config), "inverter", "--json")
    assert r.returncode == 0, r.stderr
    read = {row["point"]: row["value"] for row in json.loads(r.stdout)}
    want = expected_values()
    assert read == {name: want[name] for name in read}
    assert read["m103_A"] == 12.34
    assert read["m103_St"] == "MPPT"
    assert read["m160_module1_DCA"] == 3.75


@pytest.mark.integration
async def test_sunspec_over_rtu_with_a_dead_unit(rtu: str) -> None:
    r = await cli("sunspec", rtu, "--unit", "1", "--json", "--timeout", "500ms")
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    assert [m["id"] for m in found["models"]] == [1, 103, 160]
    assert {p["name"]: p["value"] for p in found["points"]}["m103_PhVphB"] == 231.2
    for unit, why in (("2", "not a SunSpec device"), ("3", "")):
        r = await cli("sunspec", rtu, "--unit", unit, "--timeout", "200ms")
        assert r.returncode == 1, r.stdout
        assert r.stdout == ""
        assert r.stderr.count("\n") == 1, r.stderr
        assert why in r.stderr
        assert "Traceback" not in r.stderr


@pytest.mark.integration
@pytest.mark.parametrize(("args", "needle"), [
    (["sunspec", "tcp://127.0.0.1"], "--unit"),
    (["sunspec", "tcp://127.0.0.1", "--unit", "0"], "--unit 0"),
    (["sunspec", "tcp://127.0.0.1", "--unit", "1", "--base", "70000"], "--base 70000"),
    (["sunspec", "ftp://x", "--unit", "1"], "scheme must be one of"),
    (["simulate", "--sunspec", "--unit", "300"], "1-247"),
    (["simulate", "--sunspec", "--map", "library:abb-b23"], "not allowed with"),
])
async def test_sunspec_usage_errors_exit_2(args: list[str], needle: str) -> None:
    assert_usage_error(await cli(*args), needle)


@pytest.mark.integration
async def test_sunspec_help_has_an_example() -> None:
    r = await cli("sunspec", "--help")
    assert r.returncode == 0
    assert "example: m2m-bridge sunspec tcp://" in r.stdout


def test_the_simulated_inverter_serves_every_register_of_its_models() -> None:
    """Marker, three models back to back, the end marker: no point overlaps another."""
    spans = sorted((p.address or 0, p.size) for p in sunspec_points(1))
    assert all(a + n <= following for (a, n), (following, _) in itertools.pairwise(spans))
    assert spans[0] == (40000, 2)  # "SunS"
    assert spans[-1] == (40173, 1)  # the end marker's length, after its 0xFFFF
