"""The southbound part of the config format: links, devices and their points.

Checks that one model can make on its own live here (a point's type fits its table, a response
regex compiles); what needs the whole file (links named, names unique, maps merged) is in
bridge.config.loader.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from bridge.config.fields import Duration, Name, _Model
from bridge.config.pointmethods import PointMethods
from bridge.registers import BIT_TABLES, ByteOrder, PointType, Table, register_count

_INTEGER_TYPES = frozenset({"int16", "uint16", "int32", "uint32", "int64", "uint64"})
_BIT_TYPES = frozenset({"bool", "int16", "uint16"})
_READ_ONLY_TABLES = frozenset({"input", "discrete"})


class _LinkBase(_Model):
    name: Name
    timeout: Duration = 1.0


class _Requests(_Model):
    """How reads are coalesced and paced on a Modbus link."""

    max_registers: int = Field(default=125, ge=1, le=125)
    max_gap: int = Field(default=10, ge=0)
    request_delay: Duration = 0.0


class _SerialPort(_Model):
    port: str
    baudrate: int = Field(default=9600, gt=0)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8


class TcpLink(_LinkBase, _Requests):
    """Modbus over a network socket."""

    type: Literal["tcp", "udp", "rtu-over-tcp"]
    host: str
    port: int = Field(default=502, ge=1, le=65535)


class SerialLink(_LinkBase, _SerialPort, _Requests):
    """Modbus RTU or ASCII on a serial port."""

    type: Literal["rtu", "ascii"]


class LineLink(_LinkBase, _SerialPort):
    """A serial port carrying plain ASCII lines, no Modbus."""

    type: Literal["serial"]


Link = Annotated[TcpLink | SerialLink | LineLink, Field(discriminator="type")]


class HaHints(_Model):
    """Home Assistant overrides for one point; unset keys come from its unit (README table)."""

    device_class: str | None = None
    state_class: Literal["measurement", "total", "total_increasing"] | None = None
    icon: str | None = None

    @field_validator("icon")
    @classmethod
    def _an_mdi_icon(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"mdi:[a-z0-9-]+", value):
            raise ValueError(f"{value!r} is not an icon name like 'mdi:flash'")
        return value


class SimHint(_Model):
    """Where the simulator starts this point, and how far it wanders around that value."""

    value: float | int | bool | str | None = None
    drift: float = 0


class Point(_Model, PointMethods):
    """One value on a device. Fields are ordered so each check can see what it depends on."""

    name: Name
    table: Table = "holding"
    type: PointType = Field(default="uint16", description="default: bool on coil and discrete")
    # strings: registers; one read request carries at most 125 (Modbus spec)
    count: int | None = Field(default=None, ge=1, le=125, validate_default=True)
    address: int | None = Field(default=None, ge=0, le=65535, description="0-based PDU address")
    bit: int | None = Field(default=None, ge=0, le=15)
    byte_order: ByteOrder | None = None
    unit: str | None = None
    scale: float = 1
    offset: float = 0
    precision: int | None = Field(default=None, ge=0)
    deadband: float | None = Field(default=None, ge=0)
    interval: Duration | None = Field(default=None, gt=0)
    values: dict[int, str] | None = None
    writable: bool = False
    min: float | None = None
    max: float | None = None
    # SunSpec's sunssf: value = raw * 10**(that point's raw value) * scale + offset, the
    # exponent read in the same poll (bridge.core.scalefactors). After the fields it excludes.
    scale_from: Name | None = Field(
        default=None, description="an int16 point of this device holding a power-of-ten "
        "exponent read live (SunSpec scale factor): value = raw * 10**exponent * scale + offset",
    )
    simulate: SimHint | None = None
    ha: HaHints | None = None  # used with mqtt.homeassistant

    @field_validator("name")
    @classmethod
    def _not_a_status_topic(cls, value: str) -> str:
        if value == "status":
            raise ValueError("'status' is reserved: <prefix>/<device>/status is the device status")
        return value

    @model_validator(mode="before")
    @classmethod
    def _type_from_table(cls, data: Any) -> Any:
        if isinstance(data, dict) and "type" not in data:
            return {**data, "type": "bool" if data.get("table") in BIT_TABLES else "uint16"}
        return data

    @field_validator("type")
    @classmethod
    def _bits_are_bool(cls, value: PointType, info: ValidationInfo) -> PointType:
        if info.data.get("table") in BIT_TABLES and value != "bool":
            raise ValueError(f"coil and discrete tables hold bits: type must be bool, not {value}")
        return value

    @field_validator("count")
    @classmethod
    def _count_for_strings(cls, value: int | None, info: ValidationInfo) -> int | None:
        type_ = info.data.get("type")
        if type_ == "string" and value is None:
            raise ValueError("required for type string (registers, 2 characters each)")
        if type_ not in (None, "string") and value is not None:
            raise ValueError(f"count is only for strings, not {type_}")
        return value

    @field_validator("address")
    @classmethod
    def _fits_in_table(cls, value: int | None, info: ValidationInfo) -> int | None:
        table, type_ = info.data.get("table"), info.data.get("type")
        if value is None or table is None or type_ is None or "count" not in info.data:
            return value
        span = 1 if table in BIT_TABLES else register_count(type_, info.data["count"])
        if value + span - 1 > 65535:
            raise ValueError(f"address {value} + {span} registers ends past 65535")
        return value

    @field_validator("bit")
    @classmethod
    def _bit_of_a_register(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None:
            return value
        if info.data.get("table") in BIT_TABLES:
            raise ValueError("bit is only for holding and input registers")
        if info.data.get("type") not in (None, *_BIT_TYPES):
            raise ValueError(f"bit needs type bool, int16 or uint16, not {info.data['type']}")
        return value

    @field_validator("values")
    @classmethod
    def _enum_of_integers(
        cls, value: dict[int, str] | None, info: ValidationInfo
    ) -> dict[int, str] | None:
        type_ = info.data.get("type")
        if value is not None and type_ is not None and type_ not in _INTEGER_TYPES:
            raise ValueError(f"values (an enum map) needs an integer type, not {type_}")
        return value

    @field_validator("writable")
    @classmethod
    def _table_is_writable(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("table") in _READ_ONLY_TABLES:
            raise ValueError("input registers and discrete inputs are read-only")
        if value and info.data.get("bit") is not None:
            # Writing one bit means rewriting the other 15, which is not atomic on Modbus.
            raise ValueError("a single bit of a register cannot be written")
        return value

    @field_validator("max")
    @classmethod
    def _not_below_min(cls, value: float | None, info: ValidationInfo) -> float | None:
        low = info.data.get("min")
        if value is not None and low is not None and low > value:
            raise ValueError(f"max {value:g} is below min {low:g}")
        return value

    @field_validator("scale_from")
    @classmethod
    def _a_number_read_only(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        type_ = info.data.get("type")
        if type_ in ("bool", "string") or info.data.get("bit") is not None:
            kind = type_ if type_ == "string" else "bit"
            raise ValueError(f"only numbers are scaled, not a {kind}")
        if info.data.get("values") is not None:
            raise ValueError("an enum (values) names raw codes: it is not scaled")
        if info.data.get("writable"):
            # The factor may change between the read it came from and the write: a write
            # could land 10x off. Read-only until writes can be fenced by a fresh read.
            raise ValueError("a point scaled from a live factor cannot be writable")
        if value == info.data.get("name"):
            raise ValueError("a point cannot be scaled from itself")
        return value


def scale_from_problems(points: Sequence[Point]) -> list[tuple[int, str]]:
    """(index, message) for each point whose `scale_from` cannot be read live: it must name
    another point of the same device (after its map is merged), an int16 register (SunSpec's
    sunssf), one not itself scaled from another (a factor is a raw exponent, never chained)."""
    by_name = {p.name: p for p in points}
    problems: list[tuple[int, str]] = []
    for index, point in enumerate(points):
        name = point.scale_from
        if name is None:
            continue
        source = by_name.get(name)
        if source is None:
            problems.append((index, f"no point {name!r} in this device"))
        elif source.type != "int16" or source.bit is not None:
            kind = "a bit" if source.bit is not None else source.type
            problems.append((index, f"{name!r} is {kind}: a scale factor is an int16 register "
                                    "(SunSpec sunssf)"))
        elif source.scale_from is not None:
            problems.append((index, f"{name!r} is itself scaled from {source.scale_from!r}: "
                                    "scale factors do not chain"))
    return problems


class SignatureCheck(_Model):
    """One point of a map and the range its value (scaled, in the point's unit) lies in on the
    real device: how `m2m-bridge discover` tells the device from its registers when it does
    not say what it is (no FC43)."""

    point: Name
    min: float
    max: float

    @field_validator("max")
    @classmethod
    def _not_below_min(cls, value: float, info: ValidationInfo) -> float:
        low = info.data.get("min")
        if low is not None and low > value:
            raise ValueError(f"max {value:g} is below min {low:g}")
        return value


class DeviceMap(_Model):
    """A reusable register map file: points many devices share (with their own unit ids)."""

    description: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    source: str | None = Field(
        default=None, description="where the register facts come from (manual and version)"
    )
    # Written by `m2m-bridge sunspec --write`: the SunSpec marker's address. Such a map's high
    # addresses are the device's own (SunSpec starts at 40000), never Modicon numbering.
    sunspec_base: int | None = Field(
        default=None, ge=0, le=65535,
        description="the SunSpec base address this map was read from (m2m-bridge sunspec)",
    )
    byte_order: ByteOrder | None = None
    points: list[Point] = []  # noqa: RUF012 - pydantic copies defaults
    # After `points`, so the check below sees them.
    signature: list[SignatureCheck] = Field(
        default=[], description="points and value ranges that recognise this device without "
        "FC43 (m2m-bridge discover)",
    )

    @field_validator("signature")
    @classmethod
    def _numeric_points_of_this_map(
        cls, value: list[SignatureCheck], info: ValidationInfo
    ) -> list[SignatureCheck]:
        points = {p.name: p for p in info.data.get("points", [])}
        for check in value:
            point = points.get(check.point)
            if point is None:
                raise ValueError(f"{check.point!r} is not a point of this map")
            if point.type in ("bool", "string") or point.bit is not None:  # bits are bool
                raise ValueError(f"{check.point!r} is not a number: a signature checks a "
                                 "register value against a range")
            if point.scale_from is not None:
                raise ValueError(f"{check.point!r} is scaled from {point.scale_from!r}, read "
                                 "live: a signature checks a register against a fixed range")
        return value


class Device(_Model):
    """A Modbus slave, or an instrument on a serial line link (`request`/`response`)."""

    name: Name
    link: str
    unit: int = Field(default=1, ge=0, le=247)
    interval: Duration = Field(default=5.0, gt=0)
    map: str | None = Field(
        default=None,
        description="map file, relative to this file; library:NAME; or sunspec (the device's "
        "SunSpec model chain, walked when the daemon starts)",
    )
    byte_order: ByteOrder | None = None
    report: Literal["always", "on-change"] = "always"
    heartbeat: Duration | None = 300.0
    offline_after: int = Field(default=3, ge=1)
    points: list[Point] = []  # noqa: RUF012 - pydantic copies defaults
    request: str | None = None
    response: str | None = Field(default=None, description="regex; its named groups become points")
    eol: str = "\r\n"
    description: str | None = None
    manufacturer: str | None = None
    model: str | None = None

    @field_validator("response")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value
