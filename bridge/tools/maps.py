"""`m2m-bridge maps`: the device library shipped with the package (bridge/maps/), listed and
shown, so an integrator finds the map for a meter before writing `map: library:NAME`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bridge.config import DeviceMap, library_names, library_path, load_library_map, unknown_map
from bridge.errors import UsageError


@dataclass(frozen=True, slots=True)
class LibraryEntry:
    """One library map, as `maps list` shows it."""

    name: str
    manufacturer: str
    model: str
    description: str
    points: int
    source: str

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "manufacturer": self.manufacturer, "model": self.model,
                "description": self.description, "points": self.points, "source": self.source}


def library() -> list[LibraryEntry]:
    """Every library map, by name."""
    entries = []
    for name in library_names():
        found = load_library_map(name)
        entries.append(LibraryEntry(
            name, found.manufacturer or "", found.model or "", found.description or "",
            len(found.points), found.source or "",
        ))
    return entries


def library_map(name: str) -> DeviceMap:
    """Library map `name` (`library:` in front is allowed); a UsageError naming the nearest
    names if there is none."""
    name = name.removeprefix("library:")
    if library_path(name) is None:
        raise UsageError(unknown_map(name))
    return load_library_map(name)


def map_json(name: str, device_map: DeviceMap) -> dict[str, Any]:
    """The map's data, every point's defaults spelled out (unset keys left out), under its
    library name."""
    return {"name": name, **device_map.model_dump(mode="json", exclude_none=True)}


POINT_COLUMNS = ("point", "table", "address", "type", "order", "unit", "scale", "access")


def point_rows(device_map: DeviceMap) -> list[tuple[str, ...]]:
    """One row per point: where it is, how it decodes, whether it can be written."""
    order = device_map.byte_order or "ABCD"
    rows: list[tuple[str, ...]] = []
    for point in device_map.points:
        kind = point.type if point.bit is None else f"{point.type} bit {point.bit}"
        if point.type == "string":
            kind = f"string[{point.count}]"
        scale = "" if point.scale == 1 and point.offset == 0 else f"{point.scale:g}"
        if point.offset:
            scale += f" {point.offset:+g}"
        rows.append((
            point.name, point.table, str(point.address), kind,
            "" if point.size == 1 else (point.byte_order or order), point.unit or "", scale,
            "rw" if point.writable else "r",
        ))
    return rows
