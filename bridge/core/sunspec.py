"""SunSpec without I/O: the model definitions, the walk of a device's model chain, and the map
of every point it holds, scale factors applied.

A SunSpec device marks its register map with "SunS" (0x5375 0x6E53) at one of three base
addresses (40000, 0, 50000; bridge.tools.sunspec tries them in that order). Models follow the
marker back to back, each `ID, L, L registers of body`, until an ID of 0xFFFF. Model 1 (common)
says who made the device.

`ChainWalk` is sans-I/O, as h11 is: it says which registers it wants next (`wants()`), is fed
the words read (`feed()`), and ends with the decoded `Chain`; the commissioning command and the
daemon's start-up (`map: sunspec`) drive it over their links.

The model definitions are pysunspec2's JSON files (Apache-2.0, SunSpec Alliance), read from the
installed package as data; its blocking client is never imported.

Scale factors: a point's `sf` names a `sunssf` point of its model (an int16 power-of-ten
exponent), or is a fixed exponent. The map keeps the sunssf points as points and has each
point scaled from one say so (`scale_from: m103_W_SF`): the bridge reads the factor with the
value at every poll (bridge.core.scalefactors), so a device that changes its factors at run
time (SolarEdge does) publishes right. `baked=True` makes the older map instead: the factors
read during the walk multiplied into `scale:`, the sunssf points left out. Values a
device marks "not implemented" (0x8000, 0xFFFF, 0x80000000, NaN, an empty string, 0 on an
accumulator) read as None, and such points are left out of the map: they would never publish
anything meaningful.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

from bridge.config import DeviceMap
from bridge.core.codec import Field, PointType, Value, decode
from bridge.errors import DeviceError

BASES = (40000, 0, 50000)  # where the marker may be, in the order the spec says to look
MARKER = (0x5375, 0x6E53)  # "SunS"
END = 0xFFFF  # the model id that ends the chain
MAX_MODELS = 256  # a chain longer than this is a device answering garbage, not a map
HEADER = 2  # ID and L

# SunSpec type -> (our type, the raw value that means "not implemented"). pad, ipv6addr and
# eui48 have no value we publish: they keep their room and make no point.
TYPES: Mapping[str, tuple[PointType, int | float | str]] = {
    "int16": ("int16", -0x8000),
    "uint16": ("uint16", 0xFFFF),
    "count": ("uint16", 0xFFFF),
    "acc16": ("uint16", 0),
    "enum16": ("uint16", 0xFFFF),
    "bitfield16": ("uint16", 0xFFFF),
    "sunssf": ("int16", -0x8000),
    "int32": ("int32", -0x80000000),
    "uint32": ("uint32", 0xFFFFFFFF),
    "acc32": ("uint32", 0),
    "enum32": ("uint32", 0xFFFFFFFF),
    "bitfield32": ("uint32", 0xFFFFFFFF),
    "ipaddr": ("uint32", 0),
    "int64": ("int64", -0x8000000000000000),
    "uint64": ("uint64", 0xFFFFFFFFFFFFFFFF),
    "acc64": ("uint64", 0),
    "float32": ("float32", math.nan),
    "float64": ("float64", math.nan),
    "string": ("string", ""),
}
# SunSpec's unit names -> the ones Home Assistant and people read (bridge.core.homeassistant).
_UNITS = {"C": "°C", "Pct": "%", "Secs": "s", "VAr": "var"}


class SunSpecError(DeviceError):
    """No SunSpec marker where one was looked for, or a model chain that does not hold up."""


class NotSunSpec(SunSpecError):
    """The registers at a base address are not the "SunS" marker."""


# --- the model definitions ----------------------------------------------------------------

_Factor = tuple[int | None, str]  # a sunssf point's exponent (None: not implemented), our name


@dataclass(frozen=True, slots=True)
class PointDef:
    name: str
    type: str  # SunSpec's
    size: int  # registers
    sf: str | int | None = None  # a sunssf point's name, or a fixed exponent
    units: str | None = None
    label: str | None = None
    symbols: Mapping[int, str] = field(default_factory=dict)  # enum values


@dataclass(frozen=True, slots=True)
class GroupDef:
    """A block of points; `count` None: once; an int: that many times (0: as many as fill the
    model); a name: as many as that point of the model says."""

    name: str
    points: tuple[PointDef, ...]
    groups: tuple[GroupDef, ...] = ()
    count: int | str | None = None


@dataclass(frozen=True, slots=True)
class ModelDef:
    id: int
    name: str
    label: str
    group: GroupDef


def _point_def(data: Mapping[str, Any]) -> PointDef:
    symbols = {int(s["value"]): str(s["name"]) for s in data.get("symbols", [])}
    sf = data.get("sf")
    return PointDef(str(data["name"]), str(data["type"]), int(data["size"]),
                    sf if isinstance(sf, (str, int)) else None, data.get("units"),
                    data.get("label"), symbols)


def _group_def(data: Mapping[str, Any]) -> GroupDef:
    count = data.get("count")
    return GroupDef(
        str(data["name"]),
        tuple(_point_def(p) for p in data.get("points", [])),
        tuple(_group_def(g) for g in data.get("groups", [])),
        count if isinstance(count, (str, int)) else None,
    )


@functools.cache
def model_definition(model_id: int) -> ModelDef | None:
    """SunSpec model `model_id` as pysunspec2 defines it, or None if it has no definition
    (a vendor's own model: walked over, not mapped)."""
    resource = files("sunspec2").joinpath("models", "json", f"model_{model_id}.json")
    try:
        data = json.loads(resource.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    group = _group_def(data["group"])
    return ModelDef(model_id, group.name, str(data["group"].get("label") or group.name), group)


def definitions_version() -> str:
    """The pysunspec2 release whose definitions are used (for a map's header)."""
    from importlib.metadata import version  # noqa: PLC0415 - only when a map is written

    return f"pysunspec2 {version('pysunspec2')}"


# --- one model's points ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SunSpecPoint:
    """One point of a walked chain: where it is, how it decodes, what it read."""

    name: str  # ours: m<model>_<path>_<SunSpec name>, e.g. m103_W, m160_module2_DCA
    sunspec: str  # the SunSpec name
    kind: str  # the SunSpec type (uint16, acc32, sunssf, enum16, ...)
    address: int  # 0-based PDU address (holding)
    type: PointType
    count: int | None  # registers, strings only
    units: str | None
    label: str | None
    exponent: int | None  # the scale factor read (10**exponent), None without one
    value: Value | None  # scaled; an enum's name; None when not implemented
    symbols: Mapping[int, str] = field(default_factory=dict)
    factor: str | None = None  # our name of the sunssf point it is scaled from

    @property
    def scale(self) -> float:
        return 1.0 if self.exponent is None else 10.0**self.exponent


@dataclass(frozen=True, slots=True)
class Model:
    id: int
    name: str  # the definition's (inverter_three_phase), or "unknown"
    label: str
    address: int  # of its ID register
    length: int  # L: registers after ID and L
    points: tuple[SunSpecPoint, ...]

    @property
    def end(self) -> int:
        return self.address + HEADER + self.length


@dataclass(slots=True)
class _Layout:
    """Points laid out over a model's words as its groups are entered."""

    words: Sequence[int]  # the whole model, ID first
    address: int  # of the ID register
    prefix: str  # m103, m160 ...
    points: list[tuple[PointDef, str, int, dict[str, _Factor]]] = field(default_factory=list)
    raw: dict[str, Value | None] = field(default_factory=dict)  # by SunSpec name, for counts


def _raw(point: PointDef, words: Sequence[int], offset: int) -> Value | None:
    """The unscaled value of `point` at `offset` in `words`; None if not implemented (or not
    there: a model shorter than its definition)."""
    kind = TYPES.get(point.type)
    if kind is None or offset + point.size > len(words):
        return None
    type_, missing = kind
    count = point.size if type_ == "string" else None
    value = decode(Field(0, type_, "ABCD", None, count), words[offset : offset + point.size])
    if isinstance(value, float) and math.isnan(value):
        return None
    return None if value == missing else value


def _group_size(group: GroupDef) -> int:
    """Registers one instance of `group` spans (nested groups of fixed count included)."""
    size = sum(p.size for p in group.points)
    for sub in group.groups:
        repeat = 1 if sub.count is None else sub.count
        if not isinstance(repeat, int) or repeat == 0:
            raise SunSpecError(f"group {sub.name} repeats by a count inside a repeating group")
        size += repeat * _group_size(sub)
    return size


def _lay_out(layout: _Layout, group: GroupDef, offset: int, path: str,
             scales: dict[str, _Factor]) -> int:
    """Lay `group` out from `offset`; return the offset after it."""
    scales = dict(scales)  # a group sees its own scale factors and its parents'
    for point in group.points:
        raw = _raw(point, layout.words, offset)
        if point.type == "sunssf":
            scales[point.name] = (raw if isinstance(raw, int) else None,
                                  f"{layout.prefix}_{path}{point.name}")
        layout.raw[point.name] = raw
        layout.points.append((point, f"{path}{point.name}", offset, scales))
        offset += point.size
    for sub in group.groups:
        for index in range(1, _repeats(layout, sub, offset) + 1):
            label = sub.name if sub.count is None else f"{sub.name}{index}"
            offset = _lay_out(layout, sub, offset, f"{path}{label}_", scales)
    return offset


def _repeats(layout: _Layout, group: GroupDef, offset: int) -> int:
    if group.count is None:
        return 1
    if isinstance(group.count, str):
        count = layout.raw.get(group.count)
        return count if isinstance(count, int) else 0
    if group.count > 0:
        return group.count
    size = _group_size(group)
    return max(0, (len(layout.words) - offset) // size) if size else 0


def decode_model(address: int, words: Sequence[int], *, occurrence: int = 1) -> Model:
    """Model at `address`, from its words (ID, L and body): every point of its definition,
    scaled. A second instance of one model on a device is named m<id>_2_…, and so on."""
    model_id, length = words[0], words[1]
    definition = model_definition(model_id)
    if definition is None:
        return Model(model_id, "unknown", f"model {model_id} (no definition)", address,
                     length, ())
    prefix = f"m{model_id}" if occurrence == 1 else f"m{model_id}_{occurrence}"
    layout = _Layout(words, address, prefix)
    _lay_out(layout, definition.group, 0, "", {})
    points = [_point(layout, *placed) for placed in layout.points]
    return Model(model_id, definition.name, definition.label, address, length,
                 tuple(p for p in points if p is not None))


def _point(layout: _Layout, point: PointDef, path: str, offset: int,
           scales: Mapping[str, _Factor]) -> SunSpecPoint | None:
    kind = TYPES.get(point.type)
    if kind is None or offset + point.size > len(layout.words):
        return None  # pad, ipv6addr, eui48; or past a short model's end
    type_, _ = kind
    raw = _raw(point, layout.words, offset)
    exponent: int | None = None
    factor: str | None = None
    if isinstance(point.sf, int):
        exponent = point.sf
    elif isinstance(point.sf, str):
        exponent, factor = scales.get(point.sf, (None, None))
        if exponent is None:
            raw = None  # a scale factor that is not implemented: no number can be made
    value: Value | None = raw
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        if point.symbols and point.type.startswith("enum") and isinstance(raw, int):
            value = point.symbols.get(raw, raw)
        elif exponent is not None and exponent < 0:
            value = round(raw * 10.0**exponent, -exponent)
        elif exponent:
            value = raw * 10**exponent
    units = _UNITS.get(point.units, point.units) if point.units else None
    return SunSpecPoint(
        f"{layout.prefix}_{path}", point.name, point.type, layout.address + offset, type_,
        point.size if type_ == "string" else None, units, point.label, exponent, value,
        point.symbols, factor,
    )


# --- the chain ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Chain:
    """A walked SunSpec device: its base address and its models in chain order."""

    base: int
    models: tuple[Model, ...]

    def common(self, name: str) -> str | None:
        """A point of model 1 (common): Mn, Md, SN, Vr ..."""
        for model in self.models:
            if model.id == 1:
                for point in model.points:
                    if point.sunspec == name and isinstance(point.value, str):
                        return point.value
        return None

    def device_map(self, *, source: str, baked: bool = False) -> DeviceMap:
        """Every implemented point as a map, the sunssf points kept and each point scaled
        from one naming it (`scale_from`); with `baked`, the factors read in the walk are
        multiplied into `scale` and the sunssf points left out. Not-implemented points are
        left out either way."""
        points: list[dict[str, Any]] = []
        for model in self.models:
            for p in model.points:
                if p.value is None or p.address < model.address + HEADER:
                    continue  # not implemented; the model's own ID and L
                if baked and p.kind == "sunssf":
                    continue  # multiplied into the `scale` of the points it scales
                entry: dict[str, Any] = {"name": p.name, "address": p.address, "type": p.type}
                if p.count is not None:
                    entry["count"] = p.count
                if p.units:
                    entry["unit"] = p.units
                if p.factor is not None and not baked:
                    entry["scale_from"] = p.factor
                elif p.exponent:
                    entry["scale"] = p.scale
                    if p.exponent < 0:
                        entry["precision"] = -p.exponent
                if p.symbols and p.kind.startswith("enum"):
                    entry["values"] = dict(p.symbols)
                points.append(entry)
        ids = ", ".join(str(m.id) for m in self.models)
        return DeviceMap.model_validate({
            "description": f"SunSpec device, models {ids} from {self.base}",
            "manufacturer": self.common("Mn"),
            "model": self.common("Md"),
            "source": source,
            "sunspec_base": self.base,
            "byte_order": "ABCD",
            "points": points,
        })


class ChainWalk:
    """The reads that walk one device's chain from `base`, with no I/O of its own:

        walk = ChainWalk(40000)
        while (want := walk.wants()) is not None:
            walk.feed(read_holding(*want))
        chain = walk.chain()

    `feed` raises NotSunSpec when the marker is not there, SunSpecError when the chain does not
    hold up (a length past 65535, no end in MAX_MODELS models, a short read)."""

    def __init__(self, base: int, *, max_registers: int = 125) -> None:
        self.base = base
        self.max_registers = max_registers
        self._at = base  # the next address to read
        self._marker = True
        self._model: list[int] = []  # the model being read: ID, L, then its body
        self._models: list[Model] = []
        self._seen: dict[int, int] = {}
        self._done = False

    def wants(self) -> tuple[int, int] | None:
        """(address, count) of the next holding-register read, or None when the walk is done."""
        if self._done:
            return None
        if self._marker or not self._model:
            return self._at, HEADER
        left = HEADER + self._model[1] - len(self._model)
        return self._at, min(left, self.max_registers)

    def feed(self, words: Sequence[int]) -> None:
        want = self.wants()
        if want is None:
            raise SunSpecError("the chain was already walked")
        address, count = want
        if len(words) < count:
            raise SunSpecError(f"SunSpec read at {address}: {len(words)} of {count} registers")
        words = list(words[:count])
        self._at += count
        if self._marker:
            if tuple(words) != MARKER:
                raise NotSunSpec(f"no SunSpec marker at {self.base} "
                                 f"(found {_shown(words)}, not 'SunS')")
            self._marker = False
            return
        self._model += words
        if len(self._model) == HEADER:
            self._header(address)
        if self._model and len(self._model) == HEADER + self._model[1]:
            start = self._at - len(self._model)
            occurrence = self._seen[self._model[0]] = self._seen.get(self._model[0], 0) + 1
            self._models.append(decode_model(start, self._model, occurrence=occurrence))
            self._model = []
            if self._at + HEADER > 65536:
                raise SunSpecError("SunSpec chain broken: no end marker before register 65535")

    def _header(self, address: int) -> None:
        model_id, length = self._model
        if model_id == END:
            self._done = True
            self._model = []
        elif model_id == 0:
            raise SunSpecError(f"SunSpec chain broken at {address}: model id 0 (expected a "
                               "model or the end marker 0xFFFF)")
        elif address + HEADER + length > 65536:
            raise SunSpecError(f"SunSpec chain broken at {address}: model {model_id} of "
                               f"length {length} runs past register 65535")
        elif len(self._models) >= MAX_MODELS:
            raise SunSpecError(f"SunSpec chain broken: no end marker after {MAX_MODELS} models")

    def chain(self) -> Chain:
        if not self._done:
            raise SunSpecError("the SunSpec chain was not walked to its end")
        return Chain(self.base, tuple(self._models))


def _shown(words: Sequence[int]) -> str:
    text = b"".join(w.to_bytes(2, "big") for w in words)
    printable = text.decode("latin-1")
    return repr(printable) if printable.isprintable() else text.hex(" ")
