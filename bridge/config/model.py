"""The config file's format (version 1, DESIGN.md "Configuration") as pydantic models.

Strict: numbers and booleans are what YAML typed them as (a quoted "14" is refused, as the
JSON Schema says). Checks that one model can make on its own live here; what needs the whole
file (links named, names unique, maps merged) is in bridge.config.loader.
"""

from __future__ import annotations

import platform
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from bridge.errors import ConfigIssue
from bridge.registers import BIT_TABLES, ByteOrder, PointType, Table, register_count

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"(\d+)\s*(B|kB|KB|MB|GB|KiB|MiB|GiB|TiB)?")
_BYTES = {"B": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}  # fmt: skip
_INTEGER_TYPES = frozenset({"int16", "uint16", "int32", "uint32", "int64", "uint64"})
_BIT_TYPES = frozenset({"bool", "int16", "uint16"})
_READ_ONLY_TABLES = frozenset({"input", "discrete"})
_NAME_CHARS = "[A-Za-z0-9_-]"


def parse_duration(value: str | int | float) -> float:
    """Seconds in `250ms`, `5s`, `1m`, `1h`, `7d`, or a plain number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    match = _DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError("expected a duration such as 250ms, 5s, 1m, 1h, 7d or seconds")
    number, unit = match.groups()
    # Divide for ms rather than multiply by 0.001, so 250ms is exactly 250 / 1000.
    return float(number) / 1000 if unit == "ms" else float(number) * _SECONDS[unit or "s"]


def parse_size(value: str | int) -> int:
    """Bytes in `256MiB`, `64KiB`, `1GiB`, `10MB`, or a plain number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError("expected a size such as 256MiB, 64KiB, 1GiB or bytes")
    number, unit = match.groups()
    return int(number) * _BYTES[unit or "B"]


Duration = Annotated[
    float, BeforeValidator(parse_duration, json_schema_input_type=str | float), Field(ge=0)
]
Size = Annotated[int, BeforeValidator(parse_size, json_schema_input_type=str | int)]
Name = Annotated[str, StringConstraints(pattern=f"^{_NAME_CHARS}+$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Gateway(_Model):
    """This gateway: its id (topic segment) and where durable state lives."""

    id: Name = Field(
        default_factory=lambda: re.sub(f"[^{_NAME_CHARS[1:]}", "-", platform.node()) or "gateway"
    )
    state_dir: str = Field(
        default="./state",
        description="default: $STATE_DIRECTORY, else ./state; relative to the config file",
    )

    @model_validator(mode="before")
    @classmethod
    def _state_dir_from_systemd(cls, data: Any, info: ValidationInfo) -> Any:
        environ = (info.context or {}).get("environ", {})
        if isinstance(data, dict) and "state_dir" not in data and "STATE_DIRECTORY" in environ:
            return {**data, "state_dir": environ["STATE_DIRECTORY"]}
        return data


class Tls(_Model):
    """TLS to the broker; verification is always on. `tls: {}` uses the system CAs."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class BufferSettings(_Model):
    """Bounds of the on-disk buffer; the oldest readings are dropped first."""

    max_messages: int = Field(default=1_000_000, ge=1)
    max_bytes: Size = 256 * 2**20
    max_age: Duration = 7 * 86400.0
    # Backlog replay after an outage, messages a second: fast enough to catch up, slow enough
    # that a gateway back from a day offline does not flood a shared cloud broker.
    replay_rate: int = Field(default=1000, ge=1)


class MetricsSettings(_Model):
    """Prometheus text exposition; keep it on loopback unless a scraper must reach it."""

    host: str = "127.0.0.1"
    port: int = Field(default=9108, ge=1, le=65535)


class MqttSettings(_Model):
    """The broker and how readings are published to it."""

    host: str = "localhost"
    port: int = Field(default=1883, ge=1, le=65535, description="default 1883, 8883 with tls")
    # Both defaults derive from gateway.id; Config fills them in before validation.
    client_id: str = Field(default="", description="default: m2m-bridge-<gateway.id>")
    username: str | None = None
    password: SecretStr | None = None
    tls: Tls | None = None
    protocol: Literal[5, "3.1.1"] = 5
    keepalive: Duration = 30.0
    topic_prefix: str = Field(default="", description="default: m2m/<gateway.id>")
    qos: Literal[0, 1] = 1
    retain: bool = False
    format: Literal["json", "value"] = "json"
    messages: Literal["per-point", "per-device"] = "per-point"
    buffer: BufferSettings = BufferSettings()

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "port" not in data:
            data["port"] = 8883 if data.get("tls") is not None else 1883
        if data.get("protocol") == "5":  # a ${env:…} substitution is always a string
            data["protocol"] = 5
        return data


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


class SimHint(_Model):
    """Where the simulator starts this point, and how far it wanders around that value."""

    value: float | int | bool | str | None = None
    drift: float = 0


class Point(_Model):
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
    simulate: SimHint | None = None

    @field_validator("name")
    @classmethod
    def _not_a_status_topic(cls, value: str) -> str:
        if value == "status":
            raise ValueError("'status' is reserved: <prefix>/<device>/status is the device status")
        return value

    @property
    def order(self) -> ByteOrder:
        """The byte order to decode with (set by the loader; ABCD when built by hand)."""
        return self.byte_order or "ABCD"

    @property
    def size(self) -> int:
        """Registers (or bits, on coil/discrete tables) this point spans."""
        return 1 if self.table in BIT_TABLES else register_count(self.type, self.count)

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


class DeviceMap(_Model):
    """A reusable register map file: points many devices share (with their own unit ids)."""

    description: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    byte_order: ByteOrder | None = None
    points: list[Point] = []


class Device(_Model):
    """A Modbus slave, or an instrument on a serial line link (`request`/`response`)."""

    name: Name
    link: str
    unit: int = Field(default=1, ge=0, le=247)
    interval: Duration = Field(default=5.0, gt=0)
    map: str | None = Field(default=None, description="map file, relative to this file")
    byte_order: ByteOrder | None = None
    report: Literal["always", "on-change"] = "always"
    heartbeat: Duration | None = 300.0
    offline_after: int = Field(default=3, ge=1)
    points: list[Point] = []
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


class Config(_Model):
    """The whole configuration file."""

    version: Literal[1]
    gateway: Gateway = Gateway()
    mqtt: MqttSettings = MqttSettings()
    links: list[Link] = []
    devices: list[Device] = []
    metrics: MetricsSettings | None = None  # off unless configured
    _source: str = PrivateAttr("")
    _warnings: list[ConfigIssue] = PrivateAttr(default_factory=list)
    _secrets: frozenset[str] = PrivateAttr(frozenset())

    @property
    def source(self) -> str:
        """The path of the main config file, as given to load_config."""
        return self._source

    @property
    def secrets(self) -> frozenset[str]:
        """Every value a secret reference resolved to: logs and errors redact these."""
        return self._secrets

    @property
    def warnings(self) -> list[ConfigIssue]:
        """Legal but suspicious settings (a Modicon-style address), located like errors."""
        return self._warnings

    def link(self, name: str) -> Link:
        """The link called `name` (KeyError if there is none)."""
        for link in self.links:
            if link.name == name:
                return link
        raise KeyError(name)

    def device(self, name: str) -> Device:
        """The device called `name` (KeyError if there is none)."""
        for device in self.devices:
            if device.name == name:
                return device
        raise KeyError(name)

    @model_validator(mode="before")
    @classmethod
    def _defaults_from_gateway_id(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        gateway = data.get("gateway", {})
        mqtt = data.get("mqtt", {})
        if not isinstance(gateway, dict) or not isinstance(mqtt, dict):
            return data
        gateway_id = gateway.get("id", Gateway().id)
        mqtt = {"client_id": f"m2m-bridge-{gateway_id}", "topic_prefix": f"m2m/{gateway_id}"} | mqtt
        return {**data, "gateway": gateway, "mqtt": mqtt}


def config_json_schema() -> dict[str, Any]:
    """JSON Schema of the config file (what `m2m-bridge schema` prints for editors)."""
    return Config.model_json_schema()


