"""A simulated SunSpec inverter: the "SunS" marker at 40000, model 1 (common), model 103
(three-phase inverter), model 160 (two MPPT inputs) and the end marker, laid out from the
model definitions (bridge.core.sunspec) as ordinary simulator points.

A device with `map: sunspec` (in a config file under `simulate -c`, `simulate --sunspec`, the
tests) is served as this chain, its own points after it; the daemon maps such a device when
it starts (bridge.sunspec_maps). Every point the values below leave out holds its "not
implemented" value, as on a real inverter, so a mapper must skip it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bridge.config import SUNSPEC, Config, Device, Point
from bridge.core.sunspec import END, MARKER, TYPES, GroupDef, model_definition
from bridge.errors import UsageError

BASE = 40000
MANUFACTURER = "SunSim"
MODEL = "Inverter 3P 3000"

# Engineering values by point path (as the mapper names them, without m<id>_); scale factors
# (sunssf) are the exponents the values are stored with.
_VALUES: Mapping[int, Mapping[str, object]] = {
    1: {"Mn": MANUFACTURER, "Md": MODEL, "Vr": "1.4.2", "DA": 1},
    103: {
        "A_SF": -2, "A": 12.34, "AphA": 4.11, "AphB": 4.12, "AphC": 4.11,
        "V_SF": -1, "PPVphAB": 400.1, "PPVphBC": 399.8, "PPVphCA": 400.4,
        "PhVphA": 230.5, "PhVphB": 231.2, "PhVphC": 229.8,
        "W_SF": 0, "W": 2840, "Hz_SF": -2, "Hz": 50.01, "VA_SF": 0, "VA": 2900,
        "VAr_SF": 0, "VAr": 120, "PF_SF": -1, "PF": 97.9, "WH_SF": 0, "WH": 12345678,
        "DCA_SF": -2, "DCA": 7.5, "DCV_SF": -1, "DCV": 380.2, "DCW_SF": 0, "DCW": 2950,
        "Tmp_SF": -1, "TmpCab": 41.5, "St": 4, "Evt1": 0,
    },  # TmpSnk, TmpTrns, TmpOt, StVnd, Evt2 and the vendor events: not implemented
    160: {
        "DCA_SF": -2, "DCV_SF": -1, "DCW_SF": 0, "DCWH_SF": 0, "Evt": 0, "N": 2,
        "module1_ID": 1, "module1_IDStr": "PV1", "module1_DCA": 3.75, "module1_DCV": 380.2,
        "module1_DCW": 1425, "module1_DCWH": 6100000, "module1_Tmp": 35, "module1_DCSt": 4,
        "module1_DCEvt": 0,
        "module2_ID": 2, "module2_IDStr": "PV2", "module2_DCA": 3.7, "module2_DCV": 379.9,
        "module2_DCW": 1410, "module2_DCWH": 6050000, "module2_Tmp": 36, "module2_DCSt": 4,
        "module2_DCEvt": 0,
    },
}
_DRIFT = {"103_W": 40.0, "103_PhVphA": 1.5}  # living values under `simulate` (not in tests)


def serial_number(unit: int) -> str:
    return f"SIM{unit:05d}"


def is_sunspec(device: Device) -> bool:
    return device.map == SUNSPEC


def sunspec_points(unit: int, models: Mapping[int, Mapping[str, object]] = _VALUES,
                   ) -> list[Point]:
    """The registers of the simulated inverter at `unit` (its models and their engineering
    values, by default the inverter above), as simulator points."""
    assert MARKER == (0x5375, 0x6E53)  # "SunS", the string below
    points = [_point("marker", BASE, "string", "SunS", count=2)]
    address = BASE + 2
    for model_id, values in models.items():
        definition = model_definition(model_id)
        assert definition is not None, f"pysunspec2 defines model {model_id}"
        given = {**values, "ID": model_id, "L": 0}
        if model_id == 1 and "SN" not in given:
            given["SN"] = serial_number(unit)
        _, end = _group(definition.group, given, address, f"m{model_id}_", "")
        given["L"] = end - address - 2  # the registers after ID and L
        body, _ = _group(definition.group, given, address, f"m{model_id}_", "")
        points += body
        address = end
    points += [_point("end", address, "uint16", END), _point("end_L", address + 1, "uint16", 0)]
    return points


def _group(group: GroupDef, values: Mapping[str, object], address: int, prefix: str,
           path: str) -> tuple[list[Point], int]:
    """The points of `group` from `address` on, and the address after it."""
    points: list[Point] = []
    for spec in group.points:
        name = f"{path}{spec.name}"
        value = values.get(name)
        kind = TYPES.get(spec.type)
        if kind is not None:  # pad and the like stay zeros
            type_, missing = kind
            exponent = _exponent(values, path, spec.sf)
            points.append(_point(
                f"{prefix}{name}", address, type_, missing if value is None else value,
                count=spec.size if type_ == "string" else None,
                scale=10.0**exponent if value is not None and exponent else 1.0,
                drift=_DRIFT.get(f"{prefix[1:]}{name}", 0.0),
            ))
        address += spec.size
    for sub in group.groups:
        for index in range(1, _repeats(values, sub, path) + 1):
            label = sub.name if sub.count is None else f"{sub.name}{index}"
            inner, address = _group(sub, values, address, prefix, f"{path}{label}_")
            points += inner
    return points, address


def _repeats(values: Mapping[str, object], group: GroupDef, path: str) -> int:
    if group.count is None:
        return 1
    if isinstance(group.count, str):
        return int(str(values.get(group.count, 0)))
    if group.count:
        return group.count
    # As many as fill the model: as many as are given values.
    given = {key.removeprefix(f"{path}{group.name}").partition("_")[0] for key in values
             if key.startswith(f"{path}{group.name}")}
    return sum(1 for index in given if index.isdigit())


def _exponent(values: Mapping[str, object], path: str, sf: str | int | None) -> int | None:
    """A point's scale factor: a fixed one, or the value of the sunssf point it names, in its
    own group or the nearest group around it."""
    if not isinstance(sf, str):
        return sf
    parts = path.split("_")[:-1]
    for depth in range(len(parts), -1, -1):
        found = values.get("".join(f"{p}_" for p in parts[:depth]) + sf)
        if isinstance(found, int):
            return found
    return None


def _point(name: str, address: int, type_: str, value: object, *, count: int | None = None,
           scale: float = 1.0, drift: float = 0.0) -> Point:
    data: dict[str, Any] = {"name": name, "address": address, "type": type_, "scale": scale,
                            "byte_order": "ABCD", "simulate": {"value": value, "drift": drift}}
    if count is not None:
        data["count"] = count
    return Point.model_validate(data)


def sunspec_config(*, unit: int, host: str, port: int) -> Config:
    """`simulate --sunspec`: one simulated inverter as `unit` on a Modbus TCP endpoint."""
    if not 1 <= unit <= 247:
        raise UsageError(f"--unit {unit}: a slave id is 1-247")
    return Config.model_validate({
        "version": 1,
        "links": [{"name": "sim", "type": "tcp", "host": host, "port": port}],
        "devices": [{"name": "inverter", "link": "sim", "unit": unit, "map": SUNSPEC}],
    })


def served_device(device: Device) -> Device:
    """`device` as the simulator serves it: a `map: sunspec` device gets the inverter's
    registers (and its maker and model for FC43), its own points after them."""
    if not is_sunspec(device):
        return device
    return device.model_copy(update={
        "points": [*sunspec_points(device.unit), *device.points],
        "manufacturer": device.manufacturer or MANUFACTURER,
        "model": device.model or MODEL,
    })
