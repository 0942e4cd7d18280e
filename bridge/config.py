"""The config file (version 1, DESIGN.md "Configuration"): models, loader, located errors.

`load_config` reads the YAML (bridge.yamlsource keeps every line), substitutes secrets
(bridge.secrets), validates with the pydantic models below, then loads each device's map,
merges its points and checks what needs more than one model (links named, names unique,
addresses given). Every problem becomes a ConfigIssue and all of them are raised together in
one ConfigError.

Problems inside a map file name the map file, its own line and its own path (`points[2].type`),
so the integrator fixes the map once; problems that depend on the device using the map (a
missing address on a Modbus link) are reported in the map file too, where the point is.

After load, every device's `points` is the merged list (map points in map order, device points
of the same name replacing them in place, new ones appended), and every point's `byte_order`
is set: its own, else the device's, else the map's, else ABCD.
"""

from __future__ import annotations

import os
import platform
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from bridge.codec import BIT_TABLES, ByteOrder, PointType, Table, register_count
from bridge.errors import ConfigError, ConfigIssue
from bridge.yamlsource import Document, Loc, UnreadableFileError, read_document, type_secrets

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


_LINK: TypeAdapter[TcpLink | SerialLink | LineLink] = TypeAdapter(Link)


def load_config(
    path: str | Path, *, environ: Mapping[str, str] | None = None, check_state_dir: bool = False
) -> Config:
    """Load and check the config at `path`; raise ConfigError listing every problem found.

    `environ` (default os.environ) supplies `${env:…}`, $CREDENTIALS_DIRECTORY and
    $STATE_DIRECTORY, so tests and reloads need not touch the process environment.
    `check_state_dir` also creates the state directory and proves it writable: `validate`,
    `run` and reload want that; one-off reads on a gateway, often by another user, do not.
    """
    environ = os.environ if environ is None else environ
    try:
        main, issues = read_document(Path(path), str(path), environ)
    except UnreadableFileError as exc:
        raise ConfigError([ConfigIssue(str(path), 0, "", f"cannot read: {exc}")]) from None
    type_secrets(main, lambda data: Config.model_validate(data, context={"environ": environ}))
    config: Config | None = None
    try:
        config = Config.model_validate(main.data, context={"environ": environ})
    except ValidationError as exc:
        issues += main.validation_issues(exc)
    # Cross-checks run on whatever validated, so one bad device hides no other's problems.
    links = _valid_items(main, "links", _LINK.validate_python)
    devices = _valid_items(main, "devices", Device.model_validate)
    issues += main.duplicate_names("links") + main.duplicate_names("devices")
    issues += _unknown_links(main, {name for _, name in main.names("links")})
    maps = _Maps(Path(path).parent, environ)
    by_name = {link.name: link for _, link in links}
    merged = [_complete(main, index, device, by_name, maps) for index, device in devices]
    issues += _duplicate_points(main)
    issues += maps.issues + [issue for _, found, _ in merged for issue in found]
    state_dir = _state_dir(Path(path), config)
    if check_state_dir and config is not None:
        problem = state_dir_problem(state_dir)
        if problem is not None:
            at: Loc = ("gateway", "state_dir")
            source = ""
            if at not in main.lines:  # say where a path nobody wrote in this file came from
                source = " ($STATE_DIRECTORY)" if "STATE_DIRECTORY" in environ else " (default)"
            issues.append(main.issue(at, f"cannot use {str(state_dir)!r}{source}: {problem}"))
    if issues or config is None:
        raise ConfigError(_ordered(issues, main))
    gateway = config.gateway.model_copy(update={"state_dir": str(state_dir)})
    config = config.model_copy(
        update={"gateway": gateway, "devices": [device for device, _, _ in merged]}
    )
    config._source = str(path)
    config._warnings = _ordered([w for _, _, found in merged for w in found], main)
    config._secrets = main.secret_values.union(*(doc.secret_values for doc in maps.documents()))
    return config


def _ordered(issues: list[ConfigIssue], main: Document) -> list[ConfigIssue]:
    """The main file's issues first, then each map's, by line; a map shared by two devices
    reports a problem once."""
    return sorted(dict.fromkeys(issues), key=lambda i: (i.file != main.file, i.file, i.line))


def _state_dir(config_path: Path, config: Config | None) -> Path:
    """The state directory, a relative one taken from the config file's folder like map paths
    (the daemon's working directory is `/` under systemd)."""
    configured = Path(config.gateway.state_dir if config is not None else "./state")
    return Path(os.path.abspath(config_path.parent / configured))


def state_dir_problem(directory: Path) -> str | None:
    """Why the daemon could not keep its buffer in `directory`, or None if it can.

    Creates the directory and a file in it, as the buffer will: a read-only mount, a path
    under /proc or a missing permission shows up now, in one line, not as a traceback from
    SQLite once devices are being polled.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except (FileExistsError, NotADirectoryError):
        return "it is not a directory (or a part of its path is a file)"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    buffer = directory / "buffer.sqlite3"
    for file in (buffer, buffer.with_name("buffer.sqlite3-wal")):
        if file.exists() and not os.access(file, os.R_OK | os.W_OK):
            return f"{file.name} in it is not readable and writable"
    return None


class _Maps:
    """Map files, each read and validated once however many devices use it."""

    def __init__(self, base: Path, environ: Mapping[str, str]) -> None:
        self.base = base
        self.environ = environ
        self.issues: list[ConfigIssue] = []
        self._loaded: dict[Path, tuple[DeviceMap, Document] | str | None] = {}

    def get(self, name: str) -> tuple[DeviceMap, Document] | str | None:
        """The map at `name` (relative to the main file); why it is unreadable; or None if
        it has problems (already in `issues`)."""
        file = self.base / name
        if file not in self._loaded:
            self._loaded[file] = self._load(file)
        return self._loaded[file]

    def documents(self) -> list[Document]:
        """The map files that loaded."""
        return [loaded[1] for loaded in self._loaded.values() if isinstance(loaded, tuple)]

    def _load(self, file: Path) -> tuple[DeviceMap, Document] | str | None:
        try:
            doc, issues = read_document(file, str(file), self.environ)
        except UnreadableFileError as exc:
            return str(exc)
        except ConfigError as exc:
            self.issues += exc.issues
            return None
        self.issues += issues
        type_secrets(doc, DeviceMap.model_validate)
        try:
            device_map = DeviceMap.model_validate(doc.data)
        except ValidationError as exc:
            self.issues += doc.validation_issues(exc)
            return None
        self.issues += doc.duplicate_names("points")
        return device_map, doc


def _complete(
    main: Document,
    index: int,
    device: Device,
    links: Mapping[str, TcpLink | SerialLink | LineLink],
    maps: _Maps,
) -> tuple[Device, list[ConfigIssue], list[ConfigIssue]]:
    """Merge the device's map into it and check what needs its link; return it, its problems
    and its warnings."""
    at: Loc = ("devices", index)
    issues: list[ConfigIssue] = []
    loaded = maps.get(device.map) if device.map is not None else None
    if isinstance(loaded, str):
        shown = main.show((*at, "map"), device.map)  # `<secret>` if a secret named it
        issues.append(main.issue((*at, "map"), f"cannot read map file {shown}: {loaded}"))
    device_map, map_doc = loaded if isinstance(loaded, tuple) else (DeviceMap(), main)
    # Each point keeps the file and path it came from, so problems point at its own line.
    entries: list[tuple[Point, Document, Loc]] = [
        (p, map_doc, ("points", k)) for k, p in enumerate(device_map.points)
    ]
    position = {point.name: k for k, (point, _, _) in enumerate(entries)}
    own: set[str] = set()
    for j, point in enumerate(device.points):
        entry = (point, main, (*at, "points", j))
        if point.name in own:
            continue  # reported by _duplicate_points, from the raw data
        if point.name in position:
            entries[position[point.name]] = entry
        else:
            position[point.name] = len(entries)
            entries.append(entry)
        own.add(point.name)
    link = links.get(device.link)
    if isinstance(link, LineLink):
        if device.response is None:
            issues.append(main.issue((*at, "response"), "required for a device on a serial link"))
        else:
            issues += [
                main.issue(
                    (*at, "response"),
                    f"named group {main.show((*at, 'response'), group)} matches no point",
                )
                for group in re.compile(device.response).groupindex
                if group not in position
            ]
        issues += [
            doc.issue((*path, "writable"), "line instruments are read-only")
            for point, doc, path in entries
            if point.writable
        ]
    elif link is not None:
        if device.response is not None:
            issues.append(
                main.issue((*at, "response"), f"only for serial line links, not {link.type}")
            )
        issues += [
            doc.issue((*path, "address"), "required for points on a Modbus link")
            for point, doc, path in entries
            if point.address is None
        ]
    order = device.byte_order or device_map.byte_order or "ABCD"
    points = [
        point if point.byte_order else point.model_copy(update={"byte_order": order})
        for point, _, _ in entries
    ]
    described = {
        key: getattr(device_map, key)
        for key in ("description", "manufacturer", "model")
        if getattr(device, key) is None
    }
    warnings = [] if isinstance(link, LineLink) else [
        doc.issue((*path, "address"), message)
        for point, doc, path in entries
        if (message := _modicon_warning(point)) is not None
    ]
    return device.model_copy(update={"points": points, **described}), issues, warnings


# Modicon notation numbers holding registers from 40001 and input registers from 30001;
# the config wants the 0-based PDU address, and this is the commonest off-by-40001.
_MODICON_BASE = {"holding": 40001, "input": 30001}


def _modicon_warning(point: Point) -> str | None:
    base = _MODICON_BASE.get(point.table)
    if base is None or point.address is None or not base <= point.address < base + 9999:
        return None
    likely = point.address - base
    return (
        f"warning: Modicon numbering? {point.table} {point.address} is usually address "
        f"{likely} (0-based); if {point.address} is meant, ignore this"
    )


def _duplicate_points(doc: Document) -> list[ConfigIssue]:
    """An issue at each point of a device whose name an earlier point of it has.

    Read from the raw data, so a device that fails validation still has its names checked.
    """
    issues = []
    for index, device in enumerate(doc.items("devices")):
        points = device.get("points") if isinstance(device, dict) else None
        if not isinstance(points, list):
            continue
        first: dict[str, int] = {}
        for j, point in enumerate(points):
            name = point.get("name") if isinstance(point, dict) else None
            if not isinstance(name, str):
                continue
            at: Loc = ("devices", index, "points", j, "name")
            if name in first:
                where = doc.line(("devices", index, "points", first[name]))
                message = f"duplicate name {doc.show(at)} (first at line {where})"
                issues.append(doc.issue(at, message))
            first.setdefault(name, j)
    return issues


def _valid_items(doc: Document, key: str, validate: Any) -> list[tuple[int, Any]]:
    """(index, model) for each item of the list `key` that validates on its own."""
    result: list[tuple[int, Any]] = []
    for index, item in enumerate(doc.items(key)):
        try:
            result.append((index, validate(item)))
        except ValidationError:
            continue  # already reported by the whole-file validation
    return result


def _unknown_links(doc: Document, known: set[str]) -> list[ConfigIssue]:
    """An issue at each device's `link` that names no link, listing the links there are.

    Read from the raw data, so a device with a bad point still has its link checked.
    """
    issues = []
    shown = [doc.show(("links", index, "name")) for index, _ in doc.names("links")]
    there = f"links are: {', '.join(shown)}" if shown else "no links are defined"
    for index, item in enumerate(doc.items("devices")):
        at: Loc = ("devices", index, "link")
        link = item.get("link") if isinstance(item, dict) else None
        if isinstance(link, str) and link not in known:
            issues.append(doc.issue(at, f"unknown link {doc.show(at)} ({there})"))
    return issues
