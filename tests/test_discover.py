"""`m2m-bridge discover`: scan, identify, SunSpec and library match, and the starter config.

Matching is tested pure (bridge.core.recognition); the command against the simulator over TCP
(a library meter that names itself, one that does not, a SunSpec inverter, an unknown device)
and over an RTU pty (a meter, an inverter and a dead unit). The configs it writes are
validated and read back with `read -c`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from bridge.config import Config, DeviceMap, library_names, load_library_map
from bridge.core.codec import Field, encode
from bridge.core.recognition import (
    check,
    match_identity,
    normalise,
    vendor_maps,
)
from bridge.sim.run import library_config
from bridge.sim.sunspec import MANUFACTURER, MODEL
from bridge.tools.discover import library_devices
from tests.helpers import assert_usage_error, cli, free_port, rtu_line, simulated

LIBRARY = library_devices()


def matched(objects: dict[str, str]) -> list[str]:
    return [m.name for m in match_identity(objects, LIBRARY)]


# --- recognition, pure ----------------------------------------------------------------------


class TestIdentity:
    def test_text_is_compared_as_letters_and_digits(self) -> None:
        assert normalise("SDM630-Modbus V2") == "sdm630modbusv2"
        assert normalise("Lambda Wärmepumpen") == "lambdawarmepumpen"

    @pytest.mark.parametrize(("vendor", "model", "name"), [
        ("EASTRON", "SDM630", "eastron-sdm630"),
        ("Eastron", "SDM630-Modbus V2", "eastron-sdm630"),
        ("Eastron Electronic Co.", "SDM630MCT", "eastron-sdm630"),
        ("Schneider", "iEM3255", "schneider-iem3255"),
        ("Siemens AG", "PAC3200", "siemens-pac3200"),
        ("Finder", "7M.38.8.400.0212", "finder-7m38"),
        ("Lambda Waermepumpen", "EU13L", "lambda-eureka"),
        ("Socomec", "COUNTIS E44", "socomec-countis-e4x"),
    ])
    def test_the_maker_and_model_name_the_map(self, vendor: str, model: str, name: str) -> None:
        assert matched({"VendorName": vendor, "ProductCode": model})[0] == name

    def test_a_long_model_matches_without_the_maker(self) -> None:
        found = match_identity({"VendorName": "Rebadged", "ModelName": "DTSU666"}, LIBRARY)
        assert [(m.name, m.vendor) for m in found] == [("chint-dtsu666", False)]

    def test_a_short_model_needs_the_maker(self) -> None:
        assert matched({"VendorName": "Other", "ProductCode": "E44"}) == []
        assert matched({"VendorName": "Socomec", "ProductCode": "E44"}) == ["socomec-countis-e4x"]

    def test_a_known_maker_with_an_unknown_model_matches_nothing(self) -> None:
        objects = {"VendorName": "Eastron", "ProductCode": "SDM530"}
        assert matched(objects) == []
        assert vendor_maps(objects, LIBRARY) == [
            "eastron-sdm120", "eastron-sdm230", "eastron-sdm630", "eastron-sdm72"]

    def test_words_without_digits_match_nothing(self) -> None:
        assert matched({"VendorName": "m2m-bridge", "ProductCode": "simulated device"}) == []


def registers(point: Any, value: float) -> list[int]:
    """What a device holding `value` (engineering units) has in the point's registers."""
    raw = (value - point.offset) / point.scale
    number = raw if point.type.startswith("float") else round(raw)
    return encode(Field(0, point.type, point.order, count=point.count), number)


class TestSignature:
    @pytest.mark.parametrize("name", [e.name for e in LIBRARY if e.signature])
    def test_the_simulated_values_fit_their_own_signature(self, name: str) -> None:
        entry = next(e for e in LIBRARY if e.name == name)
        for point, want in entry.signature:
            assert point.simulate is not None
            assert isinstance(point.simulate.value, float | int)
            result = check(point, want, registers(point, point.simulate.value))
            assert result.ok, (name, point.name, result)

    def test_a_value_outside_the_range_or_in_another_word_order_fails(self) -> None:
        entry = next(e for e in LIBRARY if e.name == "eastron-sdm630")
        point, want = entry.signature[0]
        assert check(point, want, registers(point, 230.2)).ok
        assert check(point, want, registers(point, 230.2)).value == 230.2
        assert not check(point, want, registers(point, 400.0)).ok
        high, low = registers(point, 230.2)
        assert not check(point, want, [low, high]).ok

    def test_a_scaled_point_is_judged_in_its_own_units(self) -> None:
        entry = next(e for e in LIBRARY if e.name == "chint-dtsu666")
        point, want = entry.signature[0]
        assert point.scale == 0.1
        assert check(point, want, registers(point, 231.0)).ok

    @pytest.mark.parametrize(("signature", "needle"), [
        ([{"point": "nope", "min": 1, "max": 2}], "'nope' is not a point of this map"),
        ([{"point": "name", "min": 1, "max": 2}], "'name' is not a number"),
        ([{"point": "volts", "min": 3, "max": 2}], "max 2 is below min 3"),
    ])
    def test_a_signature_names_numeric_points_of_its_map(
        self, signature: list[dict[str, Any]], needle: str
    ) -> None:
        with pytest.raises(ValidationError, match=needle):
            DeviceMap.model_validate({"points": [
                {"name": "volts", "address": 0, "type": "float32"},
                {"name": "name", "address": 2, "type": "string", "count": 4},
            ], "signature": signature})

    def test_library_maps_with_signatures_load(self) -> None:
        signed = [n for n in library_names() if load_library_map(n).signature]
        assert {"eastron-sdm120", "eastron-sdm630", "orno-or-we-517"} <= set(signed)


# --- the command, against the simulator ---------------------------------------------------


def served(link: dict[str, Any]) -> Config:
    """Unit 1 an SDM630 that names itself (FC43), unit 2 an SDM120 whose FC43 says nothing the
    library knows, unit 3 a SunSpec inverter, unit 4 a device nobody knows; 5 is empty."""
    meter = library_config("eastron-sdm630", unit=1).devices[0]
    anonymous = library_config("eastron-sdm120", unit=2).devices[0].model_copy(
        update={"name": "anonymous", "manufacturer": "Unbranded", "model": "DIN kWh meter"})
    return Config.model_validate({
        "version": 1,
        "links": [link],
        "devices": [
            meter.model_copy(update={"link": link["name"]}),
            anonymous.model_copy(update={"link": link["name"]}),
            {"name": "inverter", "link": link["name"], "unit": 3, "map": "sunspec"},
            {"name": "pump", "link": link["name"], "unit": 4,
             "points": [{"name": "speed", "address": 0, "simulate": {"value": 1450}}]},
        ],
    })


@pytest.fixture
async def tcp() -> AsyncIterator[str]:
    port = free_port()
    link = {"name": "sim", "type": "tcp", "host": "127.0.0.1", "port": port}
    async with simulated(served(link), seed=1):
        yield f"tcp://127.0.0.1:{port}"


@pytest.fixture
def rtu(tmp_path: Path) -> Iterator[str]:
    """Units 1-4 as over TCP on a pty paced at 19200 baud; unit 5 dead."""
    config = served({"name": "bus", "type": "rtu", "port": "/dev/null", "baudrate": 19200})
    with rtu_line(config, tmp_path / "ptys") as url:
        yield url


EXPECTED = {
    1: ("eastron-sdm630-1", "fc43", "eastron-sdm630", "library:eastron-sdm630"),
    2: ("eastron-sdm120-2", "signature", "eastron-sdm120", "library:eastron-sdm120"),
    3: ("inverter-3", "sunspec", "sunspec", "maps/inverter-3-sunspec.yaml"),
    4: ("unit-4", None, None, None),
}


def assert_found(found: list[dict[str, Any]], units: list[int]) -> None:
    assert [f["unit"] for f in found] == units
    for f in found:
        assert (f["name"], f["by"], f["match"], f["map"]) == EXPECTED[f["unit"]], f
    by_unit = {f["unit"]: f for f in found}
    assert by_unit[1]["identity"]["VendorName"] == "Eastron"
    assert by_unit[1]["how"] == ("FC43 says Eastron SDM630-Modbus V2 -> "
                                 "library:eastron-sdm630")
    assert "registers fit library:eastron-sdm120 (voltage 230.4 V, frequency 50.0 Hz)" in (
        by_unit[2]["how"])
    assert any("eastron-sdm230 read the same registers" in c for c in by_unit[2]["check"])
    assert by_unit[3]["how"] == "SunSpec models 1, 103, 160 at 40000"
    assert by_unit[4]["how"] == "FC43 says m2m-bridge simulated device: no library map"
    assert any("m2m-bridge probe" in c for c in by_unit[4]["check"])


async def assert_config_reads(config: Path) -> None:
    """The written config validates without warnings and reads the simulated values."""
    r = await cli("validate", "-c", str(config))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    r = await cli("read", "-c", str(config), "eastron-sdm630-1", "voltage_l1", "frequency",
                  "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"point": "voltage_l1", "value": 230.2, "unit": "V"},
                                    {"point": "frequency", "value": 50.0, "unit": "Hz"}]
    r = await cli("read", "-c", str(config), "inverter-3", "m1_Mn", "m103_A", "--json")
    assert r.returncode == 0, r.stderr
    assert [row["value"] for row in json.loads(r.stdout)] == [MANUFACTURER, 12.34]


@pytest.mark.integration
async def test_discover_tcp_writes_a_config_that_validates_and_reads(
    tcp: str, tmp_path: Path
) -> None:
    config = tmp_path / "site" / "bridge.yaml"
    config.parent.mkdir()
    r = await cli("discover", tcp, "--units", "1-5", "-o", str(config), "--json")
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    assert_found(found, [1, 2, 3, 4])
    assert any(f"m2m-bridge probe {tcp} --unit 4 --table input" in c for c in found[3]["check"])
    assert "4 of 5 units answered, 3 recognised" in r.stderr
    assert (tmp_path / "site" / "maps" / "inverter-3-sunspec.yaml").is_file()
    text = config.read_text()
    assert "  # unit 1: FC43 says Eastron SDM630-Modbus V2 -> library:eastron-sdm630\n" in text
    assert "  # unit 3: SunSpec models 1, 103, 160 at 40000\n" in text
    assert "    # no map: add its points here" in text
    data = yaml.safe_load(text)
    assert data["mqtt"] == {"host": "localhost", "port": 1883}
    assert data["links"] == [{"name": "tcp-127-0-0-1", "type": "tcp", "host": "127.0.0.1",
                              "port": int(tcp.rsplit(":", 1)[1])}]
    assert data["devices"][3] == {"name": "unit-4", "link": "tcp-127-0-0-1", "unit": 4,
                                  "points": []}
    await assert_config_reads(config)
    r = await cli("discover", tcp, "--units", "1", "-o", str(config))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1
    assert "exists (--force overwrites it)" in r.stderr


@pytest.mark.integration
async def test_discover_prints_the_config_and_the_table_on_stderr(
    tcp: str, tmp_path: Path
) -> None:
    """Without -o the config goes to stdout (`discover URL > bridge.yaml`), SunSpec maps to
    ./maps, and the table to stderr."""
    r = await cli("discover", tcp, "--units", "3,4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["devices"][0]["map"] == "maps/inverter-3-sunspec.yaml"
    assert (tmp_path / "maps" / "inverter-3-sunspec.yaml").is_file()
    header, *rows = r.stderr.splitlines()
    assert header.split() == ["unit", "answer", "identified", "as", "how", "map"]
    assert rows[0].split()[:5] == ["3", "registers", MANUFACTURER, *MODEL.split()[:2]]
    assert rows[0].split()[-1] == "maps/inverter-3-sunspec.yaml"
    assert rows[1].split()[:2] == ["4", "registers"]
    assert rows[2] == "2 of 2 units answered, 1 recognised, in " + rows[2].split(" in ")[1]


@pytest.mark.integration
async def test_discover_over_rtu_with_a_dead_unit(rtu: str, tmp_path: Path) -> None:
    config = tmp_path / "bridge.yaml"
    r = await cli("discover", rtu, "--units", "1-5", "--timeout", "100ms", "-o", str(config))
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[1:]]
    assert [row[0] for row in rows] == ["1", "2", "3", "4"]
    assert rows[0][-1] == "library:eastron-sdm630"
    assert rows[1][-1] == "library:eastron-sdm120"
    assert rows[2][-1] == "maps/inverter-3-sunspec.yaml"
    link = yaml.safe_load(config.read_text())["links"][0]
    assert (link["type"], link["baudrate"], link["parity"]) == ("rtu", 19200, "N")
    await assert_config_reads(config)


@pytest.mark.integration
async def test_discover_of_only_dead_units_is_exit_1(rtu: str, tmp_path: Path) -> None:
    config = tmp_path / "bridge.yaml"
    r = await cli("discover", rtu, "--units", "5-6", "--timeout", "100ms", "--json",
                  "-o", str(config))
    assert r.returncode == 1
    assert json.loads(r.stdout) == []
    assert r.stderr.count("\n") == 1
    assert "no unit answered (2 asked" in r.stderr
    assert not config.exists()


@pytest.mark.integration
@pytest.mark.parametrize(("args", "needle"), [
    (["discover", "tcp://127.0.0.1", "--units", "0-3"], "must lie within 1-247"),
    (["discover", "tcp://127.0.0.1", "--timeout", "never"], "argument --timeout"),
    (["discover", "ftp://x"], "scheme must be one of"),
    (["discover"], "url"),
])
async def test_discover_usage_errors_exit_2(args: list[str], needle: str) -> None:
    assert_usage_error(await cli(*args), needle)


@pytest.mark.integration
async def test_discover_help_has_an_example() -> None:
    r = await cli("discover", "--help")
    assert r.returncode == 0
    assert "example: m2m-bridge discover 'rtu:///dev/ttyUSB0" in r.stdout
