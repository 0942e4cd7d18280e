"""`m2m-bridge simulate`: serve the configured Modbus TCP devices as slaves, with living values.

One pymodbus TCP server per distinct host:port; every device on it is a unit id of its own.
Each device keeps its four tables in plain Python arrays here, which are the truth: pymodbus's
`action` hook (its documented way to change what a request sees) copies the requested range
into pymodbus's own block before every read and copies client writes back. So `set_value`
and the tick loop stay synchronous and never reach into pymodbus internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
import socket
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import structlog
from pymodbus.constants import ExcCodes
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from bridge.config import Config, Device, Point, SerialLink
from bridge.core.codec import Field, Value, decode, encode
from bridge.core.scalefactors import exponent
from bridge.errors import BridgeError, CodecError, TransportError
from bridge.sim.identity import device_objects, identity_pdus
from bridge.sim.sunspec import served_device
from bridge.transports.links import modbus_link

log = structlog.get_logger(__name__)

_SPACE = 65536  # every Modbus address is served: the bridge coalesces reads across gaps
_BIT_FCS = {1: "coil", 5: "coil", 15: "coil", 2: "discrete"}
_INPUT_FCS = {4}
_COUNTER_WORDS = ("energy", "hours", "kwh", "count")
_COUNTER_TYPES = ("uint32", "uint64", "int64")
_INT_TYPES = ("int16", "uint16", "int32", "uint32", "int64", "uint64")
_DEFAULT_RAW = 100  # a plausible small positive reading before scale/offset
_DEFAULT_COUNTER_RAW = 1000


@dataclass
class _SimPoint:
    point: Point
    value: Value  # current engineering value
    center: float | None = None  # where a drifting point wanders around
    counter: bool = False


@dataclass
class DeviceStore:
    name: str
    unit: int
    # Compact arrays (2 bytes a register, 1 a bit): pymodbus already holds its own full blocks.
    tables: dict[str, array[int]] = field(
        default_factory=lambda: {
            "holding": array("H", bytes(2 * _SPACE)),
            "input": array("H", bytes(2 * _SPACE)),
            "coil": array("B", bytes(_SPACE)),
            "discrete": array("B", bytes(_SPACE)),
        }
    )
    written: dict[str, set[int]] = field(
        default_factory=lambda: {"holding": set(), "coil": set()}
    )
    points: dict[str, _SimPoint] = field(default_factory=dict)
    # FC43 objects by id (bridge.sim.identity): the device's or its map's manufacturer/model.
    identity: dict[int, bytes] = field(default_factory=dict)
    write_requests: int = 0  # client write requests received, so tests can prove "none"

    async def action(  # noqa: PLR0917  (pymodbus calls it positionally: SimAction)
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        current: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> None:
        """pymodbus hook, called before each request touches `current` (its block)."""
        if set_values is not None:
            self.write_requests += 1
        if function_code in _BIT_FCS:
            # Bit blocks hold 16 bits a word; `count` is in words here, `address` in bits.
            bits = self.tables[_BIT_FCS[function_code]]
            first = address // 16
            for word in range(first, first + count):
                packed = 0
                for i, bit in enumerate(bits[word * 16 : word * 16 + 16]):
                    packed |= bit << i
                current[word - start_address] = packed
            if set_values is not None:
                bits[address : address + len(set_values)] = array("B", map(int, set_values))
                self.written["coil"].update(range(address, address + len(set_values)))
            return
        table = self.tables["input" if function_code in _INPUT_FCS else "holding"]
        base = address - start_address
        if set_values is not None:
            table[address : address + len(set_values)] = array("H", map(int, set_values))
            self.written["holding"].update(range(address, address + len(set_values)))
        else:
            current[base : base + count] = table[address : address + count].tolist()

    def was_written(self, point: Point) -> bool:
        written = self.written.get(point.table)
        if not written or point.address is None:
            return False
        return any(a in written for a in range(point.address, point.address + point.size))


def _bits_block() -> list[SimData]:
    # As 16-bit words, the same 65,536 bits: pymodbus checks a bits list value by value at
    # least twice a device, and 500 devices' bools kept a simulator from serving for minutes.
    return [SimData(0, values=[0] * (_SPACE // 16), datatype=DataType.BITS)]


def _regs_block() -> list[SimData]:
    return [SimData(0, count=_SPACE, values=0, datatype=DataType.REGISTERS)]


def _store(device: Device) -> DeviceStore:
    identity = device_objects(device.name, device.manufacturer, device.model)
    return DeviceStore(device.name, device.unit, identity=identity)


def _is_counter(point: Point) -> bool:
    name = point.name.lower()
    return point.type in _COUNTER_TYPES and any(w in name for w in _COUNTER_WORDS)


def _as_a_gateway(units: set[int]) -> Callable[[bool, ModbusPDU], ModbusPDU]:
    """A unit nobody serves here is answered as a Modbus TCP gateway answers it: exception
    0B, "gateway target device failed to respond" (pymodbus' simulator says 04, "server
    device failure", which a bus scan would take for a device that is there)."""

    def trace(sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if (sending and pdu.dev_id not in units and isinstance(pdu, ExceptionResponse)
                and pdu.exception_code == ExcCodes.DEVICE_FAILURE):
            pdu.exception_code = ExcCodes.GATEWAY_NO_RESPONSE
        return pdu

    return trace


class Simulator:
    """The configured `tcp` devices as Modbus slaves on their links' host:port."""

    def __init__(self, config: Config, *, seed: int | None = None) -> None:
        self._rng = random.Random(seed)
        self._stores: dict[str, DeviceStore] = {}
        self._by_endpoint: dict[tuple[str, int], list[DeviceStore]] = {}
        self._servers: list[ModbusTcpServer] = []
        self.endpoints: list[tuple[str, int]] = []
        # rtu/ascii link -> unit -> registers; bridge.sim.serial serves them on a pty.
        self.serial_units: dict[str, dict[int, DeviceStore]] = {}
        for configured in config.devices:
            device = served_device(configured)  # `map: sunspec`: a simulated inverter
            link = modbus_link(config, device)
            if link is None:
                continue  # line instruments have no registers: bridge.sim.serial answers them
            if isinstance(link, SerialLink):
                self._add_serial(link.name, device)
                continue
            if link.type != "tcp":
                log.warning(
                    "simulate: skipping device, only tcp links are simulated",
                    device=device.name, link=link.name, link_type=link.type,
                )
                continue
            endpoint = (link.host, link.port)
            peers = self._by_endpoint.setdefault(endpoint, [])
            for peer in peers:
                if peer.unit == device.unit:
                    raise BridgeError(
                        f"devices {peer.name!r} and {device.name!r} both use unit {device.unit}"
                        f" on {endpoint[0]}:{endpoint[1]}"
                    )
            store = _store(device)
            peers.append(store)
            self._stores[device.name] = store
            self._seed_points(store, device)

    def _add_serial(self, link: str, device: Device) -> None:
        units = self.serial_units.setdefault(link, {})
        if device.unit in units:
            raise BridgeError(
                f"devices {units[device.unit].name!r} and {device.name!r} both use unit"
                f" {device.unit} on {link}"
            )
        store = _store(device)
        units[device.unit] = store
        self._stores[device.name] = store
        self._seed_points(store, device)

    def _seed_points(self, store: DeviceStore, device: Device) -> None:
        # A bit without a hint of its own reads whatever its register holds once every other
        # point is seeded (the example pump's status_word 11 sets ready, running and remote):
        # seeding it False would clear that bit in the shared word.
        bits: list[Point] = []
        # Scale factors first: a point scaled from one is stored as value / 10**factor.
        factors = {p.scale_from for p in device.points}
        for point in sorted(device.points, key=lambda p: p.name not in factors):
            if point.address is None:
                continue  # serial-line points have no register
            sim = point.simulate
            if point.bit is not None and (sim is None or sim.value is None):
                bits.append(point)
                continue
            counter = _is_counter(point)
            value: Value
            if sim is not None and sim.value is not None:
                value = sim.value
            elif point.type == "bool":
                value = False
            elif point.type == "string":
                value = f"SIM-{device.unit}"[: (point.count or 1) * 2]
            elif point.values:
                value = next(iter(point.values))
            else:
                raw = _DEFAULT_COUNTER_RAW if counter else _DEFAULT_RAW
                value = raw * point.scale + point.offset
                if point.min is not None:
                    value = max(value, point.min)
                if point.max is not None:
                    value = min(value, point.max)
            center = None
            drifts = sim is not None and sim.drift > 0
            if drifts and point.scale_from is not None:
                center = float(cast(float, value))
            elif drifts and not point.values and point.type not in ("bool", "string"):
                center = float(self._raw_number(point, value)) * point.scale + point.offset
            store.points[point.name] = _SimPoint(point, value, center, counter)
            self._put(store, point, value)
        for point in bits:
            assert point.address is not None
            assert point.bit is not None
            on = (store.tables[point.table][point.address] >> point.bit) & 1
            store.points[point.name] = _SimPoint(point, bool(on) if point.type == "bool" else on)

    async def start(self) -> None:
        try:
            for (host, port), stores in self._by_endpoint.items():
                devices = [
                    SimDevice(
                        id=s.unit,
                        simdata=(_bits_block(), _bits_block(), _regs_block(), _regs_block()),
                        action=s.action,
                    )
                    for s in stores
                ]
                server = ModbusTcpServer(
                    devices, address=(host, port),
                    custom_pdu=identity_pdus({s.unit: s.identity for s in stores}),
                    trace_pdu=_as_a_gateway({s.unit for s in stores}),
                )
                try:
                    await server.serve_forever(background=True)
                except RuntimeError:
                    # pymodbus logs the OSError and says only "could not listen": find out why.
                    names = ", ".join(s.name for s in stores)
                    raise TransportError(
                        f"cannot serve {names} on {host}:{port}: {_bind_problem(host, port)}"
                    ) from None
                self._servers.append(server)
                self.endpoints.append((host, _bound_port(server, port)))
                log.info("simulate: serving", endpoint=f"{host}:{port}",
                         units=[s.unit for s in stores])
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            await server.shutdown()  # type: ignore[no-untyped-call]  # unannotated upstream
        self.endpoints = []

    def set_value(self, device: str, point: str, value: Value) -> None:
        """Put an engineering `value` (an enum name for a `values` point) into the registers."""
        store, sim = self._lookup(device, point)
        self._put(store, sim.point, value)
        sim.value = value

    def registers(self, device: str, table: str, address: int, count: int) -> list[int]:
        """Current raw words (bits as 0/1) of `device`'s `table`, for tests."""
        store = self._stores[device]
        return store.tables[table][address : address + count].tolist()

    def write_requests(self, device: str) -> int:
        """Write requests `device` received from clients so far (FC5/6/15/16 alike)."""
        return self._stores[device].write_requests

    def tick(self) -> None:
        """Let drifting points wander and counters count; client-written points are left alone."""
        for store in self._stores.values():
            for sim in store.points.values():
                point = sim.point
                if store.was_written(point):
                    continue
                if sim.center is not None and point.simulate is not None:
                    drift = point.simulate.drift
                    current = float(cast(float, sim.value))
                    step = self._rng.uniform(-drift, drift) / 4
                    new = min(max(current + step, sim.center - drift), sim.center + drift)
                    if point.min is not None:
                        new = max(new, point.min)
                    if point.max is not None:
                        new = min(new, point.max)
                    self._put_or_skip(store, sim, new)
                elif sim.counter:
                    step = self._rng.randint(1, 5) * point.scale
                    self._put_or_skip(store, sim, float(cast(float, sim.value)) + step)

    def _put_or_skip(self, store: DeviceStore, sim: _SimPoint, value: float) -> None:
        try:
            self._put(store, sim.point, value)
        except CodecError:
            return  # out of the type's range: hold the last value rather than crash the tick
        sim.value = value

    def _lookup(self, device: str, point: str) -> tuple[DeviceStore, _SimPoint]:
        store = self._stores.get(device)
        if store is None:
            raise BridgeError(f"no simulated device {device!r}")
        sim = store.points.get(point)
        if sim is None:
            raise BridgeError(f"device {device!r} has no register point {point!r}")
        return store, sim

    @staticmethod
    def _raw_number(point: Point, value: Value) -> int | float:
        """The raw register number for an engineering value: inverse of raw*scale+offset."""
        if isinstance(value, str):
            names = {name: key for key, name in (point.values or {}).items()}
            if value not in names:
                raise CodecError(f"{point.name}: {value!r} is not one of {sorted(names)}")
            return names[value]
        if isinstance(value, bool) or point.values:
            return int(value)  # enums and flags are raw codes, never scaled
        if isinstance(value, int) and point.scale == 1 and point.offset == 0:
            return value  # exact: a float detour would round 64-bit counters
        raw = (float(value) - point.offset) / (point.scale or 1.0)
        return round(raw) if point.type in _INT_TYPES else raw

    @staticmethod
    def _factor(store: DeviceStore, name: str) -> int:
        """The exponent the factor point `name` holds now (0 if it holds none: a simulated
        device that leaves its factor "not implemented" stores its values unscaled)."""
        sim = store.points.get(name)
        if sim is None or sim.point.address is None:
            return 0
        address = sim.point.address
        word = store.tables[sim.point.table][address : address + 1].tolist()
        power = exponent(decode(Field(0, "int16", sim.point.order), word))
        return 0 if power is None else power

    def _put(self, store: DeviceStore, point: Point, value: Value) -> None:
        assert point.address is not None  # only register points are in store.points
        table = store.tables[point.table]
        address = point.address
        if point.table in ("coil", "discrete"):
            table[address] = int(bool(self._raw_number(point, value)))
        elif point.bit is not None:
            # Several points share the word: change only this bit.
            mask = 1 << point.bit
            on = bool(self._raw_number(point, value))
            table[address] = (table[address] | mask) if on else (table[address] & ~mask)
        elif point.type == "string":
            f = Field(0, "string", point.order, None, point.count)
            table[address : address + point.size] = array("H", encode(f, str(value)))
        else:
            f = Field(0, point.type, point.order)
            if point.scale_from is not None and not isinstance(value, bool | str):
                value = value / 10.0 ** self._factor(store, point.scale_from)
            raw = self._raw_number(point, value)
            words = encode(f, raw if point.type != "bool" else int(bool(raw)))
            table[address : address + len(words)] = array("H", words)


def _bind_problem(host: str, port: int) -> str:
    """Why host:port cannot be listened on, as the OS tells it."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"cannot resolve {host!r}: {exc}"
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
            sock.listen()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "the port is already in use (another simulator or Modbus server?)"
            return exc.strerror or str(exc)
    return "the address is not available"


def _bound_port(server: ModbusTcpServer, asked: int) -> int:
    """The port actually bound (differs from `asked` only when it was 0)."""
    # pymodbus types `transport` loosely; for a TCP listener it is an asyncio.Server.
    listener = cast(asyncio.Server | None, getattr(server, "transport", None))
    with contextlib.suppress(AttributeError, IndexError):
        if listener is not None and listener.sockets:
            return int(listener.sockets[0].getsockname()[1])
    return asked
