"""Hostile input, fuzzed with hypothesis: config text, register words, and a Modbus TCP slave
that answers with anything but the right frame.

The contracts (DESIGN.md "Failure semantics": bad input gets a clear error, never kills the
daemon, never writes to a device):
- load_config raises ConfigError and nothing else, whatever the YAML;
- decoding registers gives a value or CodecError; encoding a value gives words or CodecError;
- ModbusClient.read returns the registers asked for or raises DeviceError, TransportError or
  CodecError, in bounded time, and sends read requests only;
- the daemon polling a hostile slave keeps polling a healthy one beside it, and never writes.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bridge.config import load_config
from bridge.core.codec import BYTE_ORDERS, POINT_TYPES, BlockLayout, Field, decode, encode
from bridge.errors import CodecError, ConfigError, DeviceError, TransportError
from tests.helpers import ROOT, VOLTAGE, Broker, Daemon, MbapServer, examples, recording, until

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
READ_FCS = {1: "coil", 2: "discrete", 3: "holding", 4: "input"}
WRITE_FCS = frozenset({5, 6, 15, 16, 22, 23})

# --- config loader ---------------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["5s", "250ms", "-1s", "1e400", "256MiB", "holding", "coil", "ABCD",
                     "float32", "string", "tcp", "rtu", "serial", "${env:NOPE}", "${x:y}",
                     "${file:/nonexistent}", "${credential:../../etc/passwd}", "", "~", "0x10"]),
)
YAML_VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-3, 3)), children,
                        max_size=4),
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of configs/ (the example config and its maps) to mutate beside."""
    target = tmp_path_factory.mktemp("configs")
    shutil.copytree(ROOT / "configs", target, dirs_exist_ok=True)
    return target


def load_only_config_errors(path: Path) -> None:
    """Load `path`: a Config, or a ConfigError listing located, non-empty issues."""
    issues = []
    try:
        load_config(path, environ={})
    except ConfigError as exc:
        issues = exc.issues
        assert issues
    assert all(issue.message and "Traceback" not in issue.message for issue in issues)


@settings(FUZZ, max_examples=examples(150))
@given(text=st.one_of(
    st.text(max_size=300),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    YAML_VALUES.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),
    YAML_VALUES.map(lambda v: yaml.safe_dump({"version": 1, "devices": v}, allow_unicode=True)),
    st.sampled_from(["version: 1\nx: &a [*a]\n", "a: !!python/object:os.system x\n",
                     "{{{{", "- - - -", "version: 1\n<<: {a: 1}\n", "\ufeffversion: 1\n",
                     "version: 1\nversion: 1\n", "? [a]\n: 1\n", "a: !!binary AAAA\n"]),
))
def test_config_loader_on_arbitrary_text(example_dir: Path, text: str) -> None:
    path = example_dir / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    load_only_config_errors(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: 1\nx: &a [*a]\n", "alias refers to a node that contains it"),
        ("version: 1\nx: &a {k: *a}\n", "alias refers to a node that contains it"),
        ("version: 1\n" + "".join(
            f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" if i else "l0: &l0 [x]\n"
            for i in range(9)), "values (aliases repeated too often?)"),
        ("version: 1\nname: \x1f\n", "unacceptable character #x001f"),
    ],
    ids=["recursive list", "recursive mapping", "alias bomb", "control character"],
)
def test_hostile_yaml_is_a_config_error(
    example_dir: Path, text: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bridge.config.yamlsource.MAX_VALUES", 10_000)  # the bomb fails fast
    path = example_dir / "hostile.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert message in str(caught.value)


def _paths(data: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield at
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _paths(value, (*at, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from _paths(value, (*at, index))


EXAMPLE = yaml.safe_load((ROOT / "configs" / "bridge.yaml").read_text())
EXAMPLE_PATHS = [p for p in _paths(EXAMPLE) if p]


@st.composite
def mutated_example(draw: st.DrawFn) -> Any:
    data = copy.deepcopy(EXAMPLE)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(EXAMPLE_PATHS))
        parent: Any = data
        try:
            for part in path[:-1]:
                parent = parent[part]
            _ = parent[path[-1]]  # an earlier mutation may have removed it
        except (KeyError, IndexError, TypeError):
            continue
        action = draw(st.sampled_from(["replace", "delete", "duplicate", "unknown key"]))
        if action == "replace":
            parent[path[-1]] = draw(YAML_VALUES)
        elif action == "delete":
            del parent[path[-1]]
        elif action == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[path[-1]]))
        elif isinstance(parent[path[-1]], dict):
            parent[path[-1]][draw(st.text(min_size=1, max_size=6))] = draw(SCALARS)
    return data


@settings(FUZZ, max_examples=examples(150))
@given(data=mutated_example())
def test_config_loader_on_mutated_example(example_dir: Path, data: Any) -> None:
    path = example_dir / "mutated.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    load_only_config_errors(path)


# --- codec -------------------------------------------------------------------------------------

@st.composite
def fields(draw: st.DrawFn) -> Field:
    type_ = draw(st.sampled_from(POINT_TYPES))
    count = draw(st.integers(1, 6)) if type_ == "string" else None
    bit = draw(st.none() | st.integers(0, 15)) if type_ in ("bool", "int16", "uint16") else None
    return Field(0, type_, draw(st.sampled_from(BYTE_ORDERS)), bit, count)


WORDS = st.lists(
    st.one_of(st.integers(0, 0xFFFF), st.integers(-(2**20), 2**20), st.sampled_from([0xFFFF])),
    max_size=8,
)


@settings(FUZZ, max_examples=examples(400))
@given(field_=fields(), words=WORDS)
def test_decode_gives_a_value_or_codec_error(field_: Field, words: list[int]) -> None:
    try:
        value = decode(field_, words)
    except CodecError:
        return
    assert isinstance(value, bool | int | float | str)
    if field_.type == "bool":
        assert isinstance(value, bool)
    elif field_.bit is not None:
        assert value in (0, 1)


@settings(FUZZ, max_examples=examples(200))
@given(
    fields_=st.lists(fields(), min_size=1, max_size=4),
    extra=st.integers(0, 3),
    words=WORDS,
    offset_seed=st.randoms(use_true_random=False),
)
def test_block_layout_decodes_or_raises_codec_error(
    fields_: list[Field], extra: int, words: list[int], offset_seed: random.Random
) -> None:
    size = max(f.size for f in fields_) + extra
    placed = [
        Field(offset_seed.randint(0, size - f.size), f.type, f.byte_order, f.bit, f.count)
        for f in fields_
    ]
    layout = BlockLayout(size, placed)
    try:
        values = layout.decode(words)
    except CodecError:
        return
    assert len(values) == len(placed)


COMMAND_VALUES = st.one_of(
    st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)


@settings(FUZZ, max_examples=examples(400))
@given(field_=fields(), value=COMMAND_VALUES)
def test_encode_gives_words_or_codec_error(field_: Field, value: bool | int | float | str) -> None:
    """What a command payload turns into before it may reach the wire."""
    assume(field_.bit is None)  # a bit of a register is written by read-modify-write
    try:
        words = encode(field_, value)
    except CodecError:
        return
    assert len(words) == field_.size
    assert all(isinstance(w, int) and 0 <= w <= 0xFFFF for w in words)


# --- a hostile Modbus TCP slave ----------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    tid: int
    unit: int
    fc: int
    address: int
    count: int

    def good_pdu(self) -> bytes:
        if self.fc in (1, 2):
            data = bytes(random.Random(self.address).getrandbits(8) for _ in range(
                (self.count + 7) // 8))
        else:
            data = b"".join(struct.pack(">H", (self.address + i) & 0xFFFF)
                            for i in range(self.count))
        return bytes([self.fc, len(data)]) + data


def mbap(tid: int, unit: int, pdu: bytes, *, protocol: int = 0, length: int | None = None,
         ) -> bytes:
    size = len(pdu) + 1 if length is None else length
    return struct.pack(">HHHB", tid & 0xFFFF, protocol, size & 0xFFFF, unit & 0xFF) + pdu


Reply = Callable[[Request], bytes | None]  # None: close the connection


def correct(req: Request) -> bytes:
    return mbap(req.tid, req.unit, req.good_pdu())


@st.composite
def replies(draw: st.DrawFn) -> tuple[str, Reply]:
    """A named way to answer a request: right, subtly wrong, or plain hostile."""
    kind = draw(st.sampled_from([
        "correct", "wrong unit", "wrong function code", "exception", "wrong byte count",
        "wrong length", "wrong transaction", "wrong protocol", "truncated", "oversized",
        "garbage", "nothing", "close", "stale then correct", "split",
    ]))
    n = draw(st.integers(1, 255))
    blob = draw(st.binary(min_size=1, max_size=300))
    cut = draw(st.integers(1, 8))

    def answer(req: Request) -> bytes | None:
        good = req.good_pdu()
        match kind:
            case "correct" | "split":
                return correct(req)
            case "wrong unit":
                return mbap(req.tid, req.unit + n, good)
            case "wrong function code":
                return mbap(req.tid, req.unit, bytes([(req.fc + n) & 0xFF]) + good[1:])
            case "exception":
                return mbap(req.tid, req.unit, bytes([req.fc | 0x80, n]))
            case "wrong byte count":
                return mbap(req.tid, req.unit, bytes([req.fc, (good[1] + n) & 0xFF]) + good[2:])
            case "wrong length":
                return mbap(req.tid, req.unit, good, length=len(good) + 1 + n - 128)
            case "wrong transaction":
                return mbap(req.tid + n, req.unit, good)
            case "wrong protocol":
                return mbap(req.tid, req.unit, good, protocol=n)
            case "truncated":
                frame = correct(req)
                return frame[: max(1, len(frame) - cut)]
            case "oversized":
                return mbap(req.tid, req.unit, bytes([req.fc, 0xFF]) + blob * 30, length=0xFFFF)
            case "garbage":
                return blob
            case "nothing":
                return b""
            case "close":
                return None
            case "stale then correct":
                stale = Request(req.tid - 1, req.unit, req.fc, req.address + 1, req.count)
                return correct(stale) + correct(req)
        raise AssertionError(kind)

    return kind, answer


def hostile_slave(answer: Reply, *, split: bool = False) -> MbapServer:
    """A raw MBAP server on 127.0.0.1 whose answers come from `answer` (None: hang up); its
    `function_codes` are those of every request."""

    def reply(tid: int, unit: int, pdu: bytes) -> bytes | None:
        fc = pdu[0] if pdu else 0
        address, count = struct.unpack(">HH", pdu[1:5]) if len(pdu) >= 5 else (0, 0)
        return answer(Request(tid, unit, fc, address, count))

    return MbapServer(reply, split=split)


TIMEOUT = 0.15


@settings(FUZZ, max_examples=examples(80))
@given(
    reply=replies(),
    table=st.sampled_from(["holding", "input", "coil", "discrete"]),
    address=st.integers(0, 65000),
    count=st.integers(1, 125),
    unit=st.integers(0, 247),
)
@pytest.mark.integration
def test_modbus_client_read_against_a_hostile_slave(
    reply: tuple[str, Reply], table: str, address: int, count: int, unit: int
) -> None:
    kind, answer = reply
    from bridge.transports.modbus import Endpoint, ModbusClient

    async def scenario() -> None:
        slave = hostile_slave(answer, split=kind == "split")
        await slave.start()
        client = ModbusClient(Endpoint("tcp", "127.0.0.1", slave.port, TIMEOUT))
        try:
            try:
                values = await asyncio.wait_for(
                    client.read(unit, table, address, count),  # type: ignore[arg-type]
                    TIMEOUT * 20,
                )
            except (DeviceError, TransportError, CodecError):
                values = None
            if values is not None:
                assert len(values) == count
                top = 1 if table in ("coil", "discrete") else 0xFFFF
                assert all(0 <= v <= top for v in values)
            if kind in ("correct", "split"):
                assert values is not None, kind
                if table in ("holding", "input"):
                    assert values == [(address + i) & 0xFFFF for i in range(count)]
            assert set(slave.function_codes) <= set(READ_FCS), slave.function_codes
        finally:
            client.close()
            await slave.stop()

    asyncio.run(scenario())


@pytest.mark.integration
async def test_reply_with_another_read_function_code_is_refused() -> None:
    """A reply for another read function (FC4 to an FC3 request) is a bad frame, not data."""
    from bridge.transports.modbus import Endpoint, ModbusClient
    from bridge.transports.modbus_errors import BadFrame

    def input_reply(req: Request) -> bytes:
        return mbap(req.tid, req.unit, bytes([4]) + req.good_pdu()[1:])

    slave = hostile_slave(input_reply)
    await slave.start()
    client = ModbusClient(Endpoint("tcp", "127.0.0.1", slave.port, TIMEOUT))
    try:
        with pytest.raises(BadFrame, match="function code 4, expected 3"):
            await client.read(1, "holding", 0, 2)
    finally:
        client.close()
        await slave.stop()


# --- the daemon beside a hostile slave ---------------------------------------------------------

HOSTILE_CYCLE: list[Reply] = [
    lambda r: mbap(r.tid, r.unit + 1, r.good_pdu()),  # wrong unit id
    lambda r: mbap(r.tid, r.unit, bytes([r.fc + 1]) + r.good_pdu()[1:]),  # wrong function
    lambda r: mbap(r.tid, r.unit, bytes([r.fc | 0x80, 2])),  # exception 02
    lambda r: mbap(r.tid, r.unit, bytes([r.fc, 3]) + r.good_pdu()[2:]),  # wrong byte count
    lambda r: correct(r)[:-3],  # truncated
    lambda r: mbap(r.tid, r.unit, bytes([r.fc, 0xFF]) + bytes(600), length=0xFFFF),  # oversized
    lambda r: bytes(range(256)),  # garbage
    lambda r: b"",  # nothing
    lambda r: mbap(r.tid, r.unit, bytes([99, 1, 2, 3])),  # unknown function code
    lambda r: None,  # hang up
    correct,
]


@pytest.mark.integration
async def test_daemon_keeps_polling_beside_a_hostile_slave_and_never_writes(
    tmp_path: Path, broker: Broker, voltage_device: int
) -> None:
    calls = 0

    def cycle(req: Request) -> bytes | None:
        nonlocal calls
        calls += 1
        return HOSTILE_CYCLE[calls % len(HOSTILE_CYCLE)](req)

    slave = hostile_slave(cycle)
    await slave.start()
    hostile_points = [
        {"name": "a", "address": 0, "type": "float32"},
        {"name": "b", "address": 200, "type": "uint64", "byte_order": "DCBA"},
        {"name": "c", "table": "input", "address": 10, "type": "string", "count": 4},
        {"name": "d", "table": "coil", "address": 3},
        {"name": "e", "table": "discrete", "address": 9},
        # Writable, so the daemon holds a write path for it: nothing may ever use it.
        {"name": "setpoint", "address": 50, "type": "float32", "writable": True},
    ]
    config = tmp_path / "bridge.yaml"
    config.write_text(yaml.safe_dump({
        "version": 1,
        "gateway": {"id": "fuzz", "state_dir": str(tmp_path / "state")},
        "mqtt": {"host": "127.0.0.1", "port": broker.port},
        "links": [
            {"name": "good", "type": "tcp", "host": "127.0.0.1", "port": voltage_device,
             "timeout": "300ms"},
            {"name": "evil", "type": "tcp", "host": "127.0.0.1", "port": slave.port,
             "timeout": "150ms"},
        ],
        "devices": [
            {"name": "good", "link": "good", "interval": "200ms", "points": [
                {"name": "voltage", "table": "input", "address": 0, "type": "float32"}]},
            {"name": "evil", "link": "evil", "interval": "100ms", "offline_after": 2,
             "points": hostile_points},
        ],
    }, sort_keys=False))
    daemon = Daemon(config)
    try:
        async with recording(broker.port, "m2m/fuzz/#") as rec:
            daemon.start()
            topic = "m2m/fuzz/good/voltage"
            await rec.wait_for(lambda: rec.payloads(topic))
            # Every hostile reply served once (back-off included), the daemon running throughout.
            await until(lambda: daemon.running() and calls >= len(HOSTILE_CYCLE),
                        what=lambda: f"a round of the hostile cycle ({calls} requests)")
            before = len(rec.payloads(topic))
            await rec.wait_for(lambda: len(rec.payloads(topic)) >= before + 5)
            assert json.loads(rec.payloads(topic)[-1])["value"] == VOLTAGE
            assert daemon.process is not None
            assert daemon.process.poll() is None, daemon.output()
            assert rec.last("m2m/fuzz/good/status") == b"online"
    finally:
        daemon.stop()
        await slave.stop()
    assert not WRITE_FCS & set(slave.function_codes), slave.function_codes
    assert set(slave.function_codes) <= set(READ_FCS)
    log = daemon.output()
    assert "poll failed unexpectedly" not in log, log
    # Even library tracebacks (pymodbus raising inside asyncio's data_received) are JSON
    # lines, not bare text that reads as a crash in the journal.
    assert all(line.startswith("{") for line in log.splitlines()), log
