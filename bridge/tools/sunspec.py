"""`m2m-bridge sunspec`: find a device's SunSpec marker, walk its model chain, show every
point with its scale factor applied, and write the map (`map: FILE`) that polls them.

The walk itself is bridge.core.sunspec (what to read, how to decode) driven over a link by
bridge.transports.sunspec, the same walk the daemon makes for a `map: sunspec` device.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import yaml

from bridge.core.sunspec import BASES, Chain, SunSpecPoint, definitions_version
from bridge.errors import UsageError
from bridge.tools.oneshot import parse_url
from bridge.tools.scan import MAX_UNIT
from bridge.transports.link import Link
from bridge.transports.modbus import ModbusClient
from bridge.transports.sunspec import read_chain

MODEL_COLUMNS = ("model", "name", "address", "length", "points")
POINT_COLUMNS = ("point", "address", "type", "value", "unit")
NOT_IMPLEMENTED = "(not implemented)"


async def sunspec(url: str, *, unit: int, base: int | None, timeout: float) -> Chain:  # noqa: ASYNC109
    """Walk the chain of `unit` at `url`, from `base` or the first of 40000, 0, 50000 that
    holds the marker."""
    endpoint = parse_url(url, timeout=timeout)
    if not 1 <= unit <= MAX_UNIT:
        raise UsageError(f"--unit {unit}: must be 1-{MAX_UNIT} (0 is broadcast: nobody answers)")
    if base is not None and not 0 <= base <= 65534:
        raise UsageError(f"--base {base}: a register address, 0-65534")
    link = Link(ModbusClient(endpoint, backoff_cap=0))
    try:
        return await read_chain(link, unit, bases=BASES if base is None else (base,))
    finally:
        link.close()


def _shown(point: SunSpecPoint) -> str:
    if point.value is None:
        return NOT_IMPLEMENTED
    return json.dumps(point.value, ensure_ascii=False)


def model_rows(chain: Chain) -> list[tuple[str, ...]]:
    return [(str(m.id), m.label, str(m.address), str(m.length), str(len(m.points)))
            for m in chain.models]


def point_rows(chain: Chain) -> list[tuple[str, ...]]:
    """Every point of every model but the models' own ID and L, scale factors included."""
    return [
        (p.name, str(p.address), p.kind if p.count is None else f"string[{p.count}]",
         _shown(p), p.units or "")
        for m in chain.models for p in m.points if p.address >= m.address + 2
    ]


def chain_json(chain: Chain, *, source: str, baked: bool = False) -> dict[str, Any]:
    """The walk (models, points with their values) and the map it makes."""
    return {
        "base": chain.base,
        "manufacturer": chain.common("Mn"),
        "model": chain.common("Md"),
        "serial": chain.common("SN"),
        "models": [{"id": m.id, "name": m.name, "label": m.label, "address": m.address,
                    "length": m.length} for m in chain.models],
        "points": [
            {"name": p.name, "model": m.id, "sunspec": p.sunspec, "address": p.address,
             "type": p.kind, "value": p.value, "unit": p.units,
             "scale_factor": p.exponent}
            for m in chain.models for p in m.points if p.address >= m.address + 2
        ],
        "map": chain.device_map(source=source, baked=baked).model_dump(
            mode="json", exclude_defaults=True),
    }


def source_text(url: str, unit: int, chain: Chain) -> str:
    """Where a map came from, for its `source:`: the device, the chain and when."""
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    ids = ", ".join(str(m.id) for m in chain.models)
    return (f"SunSpec model chain of unit {unit} at {url} (base {chain.base}, models {ids}), "
            f"read {when}; model definitions: {definitions_version()}")


def write_map(path: Path, chain: Chain, *, source: str, command: str,
              baked: bool = False) -> int:
    """Write the chain's map as YAML a device uses with `map: FILE`; the number of points."""
    device_map = chain.device_map(source=source, baked=baked)
    data = device_map.model_dump(mode="python", exclude_defaults=True)
    scales = (
        "# Scale factors (SunSpec *_SF registers) were read once, then, and are baked into\n"
        "# `scale:`; if the device changes them (a firmware update), make this map again.\n"
    ) if baked else (
        "# Scale factors (SunSpec *_SF registers) are points, read at every poll with the\n"
        "# values they scale (`scale_from:`), so a device that changes them publishes right.\n"
    )
    header = (
        f"# Made by `{command}`.\n"
        f"# {source}.\n"
        f"{scales}"
        "# Points the device reported as not implemented are left out.\n"
    )
    try:
        path.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True,
                                                width=100), encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--write {path}: cannot write: {exc.strerror or exc}") from None
    return len(device_map.points)
