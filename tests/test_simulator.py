"""The simulator as a real Modbus TCP slave, read by a real pymodbus client; the embedded broker.

Everything listens on free loopback ports and is stopped by its fixture.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest
from pymodbus.client import AsyncModbusTcpClient

from bridge.config import Config, load_config
from bridge.core.codec import Field, decode
from bridge.errors import BridgeError, TransportError
from bridge.sim.broker import broker_answers, start_embedded_broker
from bridge.sim.tcp import Simulator
from tests.helpers import free_port, simulated, until

CONFIG = """\
version: 1
gateway: {{id: gw-test}}
mqtt: {{host: 127.0.0.1, port: {mqtt_port}}}
links:
  - {{name: plc, type: tcp, host: 127.0.0.1, port: {port}}}
devices:
  - name: plc-1
    link: plc
    unit: 1
    interval: 1s
    points:
      - {{name: power, address: 0, type: float32, byte_order: CDAB,
          simulate: {{value: 1234.5}}}}
      - {{name: temperature, address: 2, type: int16, scale: 0.1,
          simulate: {{value: 21.5, drift: 0.5}}}}
      - {{name: serial, address: 10, type: string, count: 4}}
      - {{name: state, address: 20, values: {{0: stopped, 1: running, 2: fault}},
          simulate: {{value: running}}}}
      - {{name: alarm, address: 30, type: bool, bit: 0, simulate: {{value: true}}}}
      - {{name: door, address: 30, type: bool, bit: 3, simulate: {{value: true}}}}
      - {{name: pump, table: coil, address: 5, writable: true, simulate: {{value: true}}}}
      - {{name: setpoint, address: 40, type: uint16, writable: true, simulate: {{value: 50}}}}
      - {{name: energy_kwh, address: 50, type: uint32}}
      - {{name: level, table: input, address: 3, type: uint16, simulate: {{value: 7}}}}
  - name: plc-2
    link: plc
    unit: 2
    interval: 1s
    points:
      - {{name: temperature, address: 2, type: int16, scale: 0.1, simulate: {{value: -3.2}}}}
"""


def write_config(tmp_path: Path, port: int, mqtt_port: int = 1883) -> Config:
    path = tmp_path / "bridge.yaml"
    path.write_text(CONFIG.format(port=port, mqtt_port=mqtt_port))
    return load_config(path)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
async def simulator(tmp_path: Path, port: int) -> AsyncIterator[Simulator]:
    async with simulated(write_config(tmp_path, port), seed=1) as sim:
        yield sim


@pytest.fixture
async def client(simulator: Simulator, port: int) -> AsyncIterator[AsyncModbusTcpClient]:
    modbus = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
    assert await modbus.connect()
    try:
        yield modbus
    finally:
        modbus.close()


async def holding(
    client: AsyncModbusTcpClient, address: int, count: int, unit: int = 1
) -> list[int]:
    reply = await client.read_holding_registers(address, count=count, device_id=unit)
    assert not reply.isError(), reply
    return list(reply.registers)


class TestRegisterValues:
    @pytest.mark.integration
    async def test_scaled_int16_holds_the_raw_value(self, client: AsyncModbusTcpClient) -> None:
        """21.5 with scale 0.1 is served as raw 215."""
        assert await holding(client, 2, 1) == [215]

    @pytest.mark.integration
    async def test_float32_in_cdab_order_decodes(self, client: AsyncModbusTcpClient) -> None:
        """A word-swapped float reads back as its configured value."""
        words = await holding(client, 0, 2)
        assert decode(Field(0, "float32", "CDAB"), words) == pytest.approx(1234.5)

    @pytest.mark.integration
    async def test_string_defaults_to_sim_and_unit(self, client: AsyncModbusTcpClient) -> None:
        """A string point without a hint reads `SIM-<unit>`."""
        words = await holding(client, 10, 4)
        assert decode(Field(0, "string", count=4), words) == "SIM-1"

    @pytest.mark.integration
    async def test_enum_name_is_served_as_its_code(self, client: AsyncModbusTcpClient) -> None:
        """`running` in a values map is register value 1."""
        assert await holding(client, 20, 1) == [1]

    @pytest.mark.integration
    async def test_bits_share_one_register(self, client: AsyncModbusTcpClient) -> None:
        """Two bit points set in one word do not clobber each other."""
        assert await holding(client, 30, 1) == [0b1001]

    @pytest.mark.integration
    async def test_set_value_changes_one_bit_only(
        self, simulator: Simulator, client: AsyncModbusTcpClient
    ) -> None:
        """Clearing bit 0 keeps bit 3."""
        simulator.set_value("plc-1", "alarm", False)
        assert await holding(client, 30, 1) == [0b1000]

    @pytest.mark.integration
    async def test_coil_is_a_bit(self, client: AsyncModbusTcpClient) -> None:
        """A coil point reads back as a set coil, its neighbours clear."""
        reply = await client.read_coils(4, count=3, device_id=1)
        assert list(reply.bits[:3]) == [False, True, False]

    @pytest.mark.integration
    async def test_input_register(self, client: AsyncModbusTcpClient) -> None:
        """Input-table points are served by FC4."""
        reply = await client.read_input_registers(3, count=1, device_id=1)
        assert reply.registers == [7]

    @pytest.mark.integration
    async def test_read_across_unmapped_addresses_is_zero(
        self, client: AsyncModbusTcpClient
    ) -> None:
        """A coalesced read spanning holes succeeds, the holes read 0."""
        words = await holding(client, 0, 60)
        assert words[4:10] == [0] * 6
        assert await holding(client, 60000, 100) == [0] * 100

    @pytest.mark.integration
    async def test_units_on_one_port_answer_independently(
        self, client: AsyncModbusTcpClient
    ) -> None:
        """Unit 2 has its own registers: -3.2 with scale 0.1 is raw -32."""
        assert await holding(client, 2, 1, unit=1) == [215]
        (raw,) = await holding(client, 2, 1, unit=2)
        assert decode(Field(0, "int16"), [raw]) == -32

    @pytest.mark.integration
    async def test_set_value_enum_name(
        self, simulator: Simulator, client: AsyncModbusTcpClient
    ) -> None:
        """Enum names are accepted by set_value."""
        simulator.set_value("plc-1", "state", "fault")
        assert await holding(client, 20, 1) == [2]


class TestEvolution:
    @pytest.mark.integration
    async def test_drift_stays_within_its_band(self, simulator: Simulator) -> None:
        """A drifting point wanders but never leaves value ± drift."""
        seen = set()
        for _ in range(200):
            simulator.tick()
            (raw,) = simulator.registers("plc-1", "holding", 2, 1)
            seen.add(raw)
            assert 210 <= raw <= 220
        assert len(seen) > 1

    @pytest.mark.integration
    async def test_counter_increases(self, simulator: Simulator) -> None:
        """An energy counter only goes up."""
        field = Field(0, "uint32")
        before = decode(field, simulator.registers("plc-1", "holding", 50, 2))
        simulator.tick()
        after = decode(field, simulator.registers("plc-1", "holding", 50, 2))
        assert isinstance(before, int)
        assert isinstance(after, int)
        assert after > before

    @pytest.mark.integration
    async def test_client_write_is_kept_across_ticks(
        self, simulator: Simulator, client: AsyncModbusTcpClient
    ) -> None:
        """A register a client wrote is not overwritten by the simulation."""
        assert not (await client.write_register(2, 999, device_id=1)).isError()
        assert not (await client.write_register(40, 77, device_id=1)).isError()
        for _ in range(20):
            simulator.tick()
        assert await holding(client, 2, 1) == [999]
        assert await holding(client, 40, 1) == [77]

    @pytest.mark.integration
    async def test_client_coil_write_is_kept(
        self, simulator: Simulator, client: AsyncModbusTcpClient
    ) -> None:
        """FC5 changes the coil the bridge reads next."""
        assert not (await client.write_coil(5, False, device_id=1)).isError()
        simulator.tick()
        reply = await client.read_coils(5, count=1, device_id=1)
        assert reply.bits[0] is False
        assert simulator.registers("plc-1", "coil", 5, 1) == [0]


class TestStartup:
    @pytest.mark.integration
    async def test_port_in_use_is_a_clear_error(self, tmp_path: Path, port: int) -> None:
        """A taken port is a TransportError naming the address and the reason."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", port))
            taken.listen()
            sim = Simulator(write_config(tmp_path, port))
            with pytest.raises(TransportError, match=rf"127\.0\.0\.1:{port}.*already in use"):
                await sim.start()
            assert sim.endpoints == []

    @pytest.mark.integration
    async def test_endpoints_after_start(self, simulator: Simulator, port: int) -> None:
        """Both devices share one server on the link's address."""
        assert simulator.endpoints == [("127.0.0.1", port)]


class TestEmbeddedBroker:
    @pytest.mark.integration
    async def test_publish_and_subscribe_through_it(self) -> None:
        """A message published through the embedded broker reaches a subscriber."""
        port = free_port()
        assert not await broker_answers("127.0.0.1", port, timeout=0.5)
        broker = await start_embedded_broker("127.0.0.1", port)
        try:
            assert await broker_answers("127.0.0.1", port)
            async with aiomqtt.Client("127.0.0.1", port) as sub, aiomqtt.Client(
                "127.0.0.1", port
            ) as pub:
                await sub.subscribe("m2m/test/#")
                await pub.publish("m2m/test/x", b"42", qos=1)
                async with asyncio.timeout(5):
                    message = await anext(aiter(sub.messages))
            assert str(message.topic) == "m2m/test/x"
            assert message.payload == b"42"
        finally:
            await broker.stop()



class TestDemo:
    @pytest.mark.integration
    async def test_readings_reach_the_live_view(self, tmp_path: Path, port: int) -> None:
        """With no broker at the configured address, the demo embeds one and shows readings."""
        from bridge.sim.demo import run_demo

        write_config(tmp_path, port, mqtt_port=free_port())
        out = io.StringIO()
        assert await run_demo(tmp_path / "bridge.yaml", duration=4, out=out) == 0
        first, *lines = out.getvalue().splitlines()
        assert "embedded broker" in first
        assert "mosquitto_sub -h 127.0.0.1" in first
        assert "-t 'm2m/gw-test/#'" in first
        temperature = [line for line in lines if line.startswith("m2m/gw-test/plc-1/temperature ")]
        assert temperature, out.getvalue()
        payload = json.loads(temperature[0].split("  ", 1)[1])
        assert abs(payload["value"] - 21.5) <= 0.5  # it drifts by at most 0.5

    async def test_missing_config_is_an_error(self, tmp_path: Path) -> None:
        """A config path that does not exist is a one-line BridgeError."""
        from bridge.sim.demo import run_demo

        with pytest.raises(BridgeError, match="no config at"):
            await run_demo(tmp_path / "nope.yaml", duration=1, out=io.StringIO())

    def test_terminal_view_is_a_table_redrawn_in_place(self) -> None:
        """On a terminal, messages update a table that each draw repaints from the top."""
        from bridge.sim.demo import LiveView

        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        out = Terminal()
        view = LiveView(out)
        view.update("m2m/gw/plc-1/temperature", b'{"value": 21.5}')
        view.update("m2m/gw/plc-1/temperature", b'{"value": 21.6}')
        assert out.getvalue() == ""  # nothing until the next redraw
        view.draw()
        screen = out.getvalue()
        assert screen.startswith("\x1b[H\x1b[2J")
        rows = [line for line in screen.splitlines() if line.startswith("m2m/gw/plc-1/temperature")]
        assert len(rows) == 1
        assert rows[0].endswith('{"value": 21.6}')


PUMP_MAP = Path(__file__).resolve().parent.parent / "configs" / "maps" / "pump-drive.yaml"


class TestBitSeeding:
    """Bit points without a hint of their own keep what their register was seeded with."""

    @pytest.mark.integration
    async def test_the_example_pump_serves_its_status_word(
        self, tmp_path: Path, port: int
    ) -> None:
        """status_word 11 (ready, running, remote): its bit points do not clear it."""
        path = tmp_path / "pump.yaml"
        path.write_text(
            "version: 1\nlinks:\n"
            f"  - {{name: plc, type: tcp, host: 127.0.0.1, port: {port}}}\n"
            f"devices:\n  - {{name: pump-1, link: plc, unit: 3, map: {PUMP_MAP}}}\n"
        )
        sim = Simulator(load_config(path), seed=1)
        await sim.start()
        modbus = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
        try:
            assert await modbus.connect()
            assert await holding(modbus, 0, 1, unit=3) == [11]
        finally:
            modbus.close()
            await sim.stop()

    async def test_a_bit_listed_before_its_word_and_a_hinted_bit(self, tmp_path: Path) -> None:
        """Bits before or after their word keep the word's bits; a bit's own hint still sets
        that bit."""
        path = tmp_path / "bits.yaml"
        path.write_text(
            "version: 1\nlinks:\n  - {name: plc, type: tcp, host: 127.0.0.1, port: 1}\n"
            "devices:\n  - name: d\n    link: plc\n    points:\n"
            "      - {name: early, address: 0, type: bool, bit: 1}\n"
            "      - {name: word, address: 0, type: uint16, simulate: {value: 7}}\n"
            "      - {name: b, address: 0, type: bool, bit: 2, simulate: {value: false}}\n"
            "      - {name: a, address: 0, type: bool, bit: 0}\n"
            "      - {name: c, address: 0, type: bool, bit: 4, simulate: {value: true}}\n"
            "      - {name: lone, address: 1, type: bool, bit: 5}\n"
        )
        sim = Simulator(load_config(path))
        assert sim.registers("d", "holding", 0, 2) == [0b10011, 0]


class TestDemoWrites:
    """The demo moves off a taken device port and shows a command, its result and read-back."""

    @pytest.mark.integration
    async def test_taken_port_and_a_periodic_write(self, tmp_path: Path, port: int) -> None:
        from bridge.sim.demo import run_demo

        write_config(tmp_path, port, mqtt_port=free_port())
        out = io.StringIO()
        stop = asyncio.Event()
        with socket.socket() as taken:  # as another simulator on 5020 would
            taken.bind(("127.0.0.1", port))
            taken.listen()
            demo = asyncio.create_task(
                run_demo(tmp_path / "bridge.yaml", out=out, stop=stop, write_every=1.0))
            try:
                def shown() -> bool:
                    assert not demo.done(), (demo, out.getvalue())
                    return ('/set/result  {"ok":true' in out.getvalue()
                            and "plc-1/temperature " in out.getvalue())

                await until(shown, 60, lambda: f"a write and a reading in:\n{out.getvalue()}",
                            every=0.1)
            finally:
                stop.set()
                assert await asyncio.wait_for(demo, 30) == 0
        header = out.getvalue().splitlines()[:3]
        assert f"127.0.0.1:{port} is taken: link plc uses port" in header[1]
        assert "the demo writes false, then true, to plc-1/pump" in header[2]
        lines = out.getvalue().splitlines()
        assert "m2m/gw-test/plc-1/pump/set  false" in lines or \
            "m2m/gw-test/plc-1/pump/set  true" in lines

    def test_the_written_point_is_pinned_at_the_top_of_a_short_terminal(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Whatever else there is, the demo's point and its command rows stay on screen."""
        from bridge.sim.demo import LiveView

        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        monkeypatch.setenv("LINES", "8")
        monkeypatch.setenv("COLUMNS", "200")
        view = LiveView(Terminal())
        view.header = "demo"
        view.pinned = "m2m/gw/pump-1/speed_setpoint"
        for n in range(20):
            view.update(f"m2m/gw/meter-1/p{n:02d}", b"1")
        view.update("m2m/gw/pump-1/speed_setpoint", b'{"value":900}')
        view.update("m2m/gw/pump-1/speed_setpoint/set", b"900")
        view.update("m2m/gw/pump-1/speed_setpoint/set/result", b'{"ok":true,"value":900}')
        view.draw()
        assert isinstance(view.out, io.StringIO)
        rows = view.out.getvalue().splitlines()[3:6]
        assert [row.split()[0] for row in rows] == [
            "m2m/gw/pump-1/speed_setpoint", "m2m/gw/pump-1/speed_setpoint/set",
            "m2m/gw/pump-1/speed_setpoint/set/result",
        ]
