"""The floor: the least CPU per value an asyncio program spends on the pipeline bench's workload
on this machine, so a target ratio can be checked against what is possible at all.

The same workload as `bench/pipeline.py` (10 units x 100 uint16 holding registers polled every
second over one Modbus TCP connection to the simulator, a local mosquitto), done by the
smallest asyncio loop that still does the work: Modbus frames built and parsed with `struct`
by hand (no pymodbus), values decoded with one `struct.unpack`, a JSON payload per poll (or per
value), MQTT 5 packets from `mqtt5` written straight to the socket; no buffer, no config, no
logging, no error handling. What it costs is the kernel's share (loopback sends, which run the
receiver's TCP stack too, epoll, timers) plus the least Python per poll. No real bridge gets
below it; a target under it cannot be met on this machine by any design.

    .venv/bin/python bench/floor.py                  # every mode, 20 s windows, 3 runs
    .venv/bin/python bench/floor.py --mode per-device --seconds 30 --repeat 5

Modes: `modbus` (polls only), `per-device` (a QoS 1 message per poll, its PUBACK awaited),
`per-point-qos0`, `per-point-qos1` (QoS 1 messages kept in flight up to the broker's Receive
Maximum, which is mosquitto's max_inflight_messages: 20 by default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import mqtt5

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import pipeline  # noqa: E402  (bench/pipeline.py: the simulator and its config)

MODES = ("modbus", "per-device", "per-point-qos0", "per-point-qos1")
INTERVAL = 1.0


class ModbusLink(asyncio.Protocol):
    """One Modbus TCP connection, one request at a time (as on a real gateway)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[bytes] | None = None
        self.buf = b""
        self.tid = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= 6:
            size = 6 + struct.unpack_from(">H", self.buf, 4)[0]
            if len(self.buf) >= size and self.waiter is not None and not self.waiter.done():
                frame, self.buf = self.buf[:size], self.buf[size:]
                self.waiter.set_result(frame)

    async def read(self, unit: int, address: int, count: int) -> tuple[int, ...]:
        assert self.transport is not None
        self.tid = (self.tid + 1) & 0xFFFF
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(struct.pack(">HHHBBHH", self.tid, 0, 6, unit, 3, address, count))
        frame = await asyncio.wait_for(self.waiter, 1.0)
        return struct.unpack_from(f">{count}H", frame, 9)


class MqttLink(asyncio.Protocol):
    """An MQTT 5 session: QoS 1 publishes tracked by packet id, at most Receive Maximum out."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.connack: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.inflight: set[int] = set()
        self.room = asyncio.Event()
        self.next_id = 0
        self.receive_max = 65535

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(mqtt5.ConnectPacket(client_id=f"floor-{os.getpid()}").write())

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.buf:
            try:
                packet, size = mqtt5.read(bytes(self.buf))
            except IndexError:
                return
            del self.buf[:size]
            if isinstance(packet, mqtt5.PubAckPacket):
                self.inflight.discard(packet.packet_id)
                if len(self.inflight) < self.receive_max:
                    self.room.set()
            elif isinstance(packet, mqtt5.ConnAckPacket) and not self.connack.done():
                self.receive_max = packet.receive_max
                self.connack.set_result(packet.receive_max)

    async def publish(self, messages: list[tuple[str, bytes]], qos: int) -> None:
        """Write every message, as many per write as the window allows; QoS 1: await PUBACKs."""
        assert self.transport is not None
        pending = messages
        while pending:
            room = self.receive_max - len(self.inflight) if qos else len(pending)
            if room <= 0:
                self.room.clear()
                await self.room.wait()
                continue
            chunk, pending = pending[:room], pending[room:]
            out = bytearray()
            for topic, payload in chunk:
                if qos:
                    self.next_id = self.next_id % 65535 + 1
                    self.inflight.add(self.next_id)
                    out += mqtt5.PublishPacket(topic, payload, qos=mqtt5.QoS.AT_LEAST_ONCE,
                                               packet_id=self.next_id).write()
                else:
                    out += mqtt5.PublishPacket(topic, payload).write()
            self.transport.write(out)
        while qos and self.inflight:
            self.room.clear()
            await self.room.wait()


async def run(mode: str, broker: int, device: int, *, units: int, registers: int,
              warmup: float, seconds: float | None) -> tuple[int, float]:
    """(values delivered, CPU seconds) over the window after `warmup` seconds; forever if
    `seconds` is None (bench/peers.py measures it from outside). Topics and payloads are the
    daemon's (`m2m/bench/<device>[/<point>]`), so bench/pipeline.py's subscriber counts them."""
    loop = asyncio.get_running_loop()
    _, modbus = await loop.create_connection(ModbusLink, "127.0.0.1", device)
    mqtt: MqttLink | None = None
    if mode != "modbus":
        _, mqtt = await loop.create_connection(MqttLink, "127.0.0.1", broker)
        await mqtt.connack
    names = [f"r{a:03d}" for a in range(registers)]
    devices = [f"{pipeline.PREFIX}/unit-{unit:02d}" for unit in range(1, units + 1)]
    values = cpu0 = 0.0
    start = loop.time()
    tick = 0
    while True:
        now = loop.time() - start
        if seconds is not None and now >= warmup + seconds:
            break
        if not cpu0 and now >= warmup:
            cpu0, values = time.process_time(), 0
        for unit, topic in enumerate(devices, start=1):
            raw = await modbus.read(unit, 0, registers)
            ts = time.time_ns() // 1_000_000
            if mqtt is None:
                pass
            elif mode == "per-device":
                payload = json.dumps({"ts": ts, "values": dict(zip(names, raw, strict=True))})
                await mqtt.publish([(topic, payload.encode())], qos=1)
            else:
                batch = [(f"{topic}/{name}", json.dumps({"ts": ts, "value": value}).encode())
                         for name, value in zip(names, raw, strict=True)]
                await mqtt.publish(batch, qos=1 if mode == "per-point-qos1" else 0)
            values += len(raw)
        tick += 1
        await asyncio.sleep(max(0.0, start + tick * INTERVAL - loop.time()))
    return int(values), time.process_time() - cpu0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mode", default="all", help=f"all, or modes joined by commas, of "
                                                      f"{', '.join(MODES)}")
    parser.add_argument("--seconds", type=float, default=20.0, help="window per run (20)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before it (3)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode (3)")
    parser.add_argument("--units", type=int, default=10, help="devices (10)")
    parser.add_argument("--registers", type=int, default=100, help="registers a device (100)")
    parser.add_argument("--serve", nargs=2, type=int, metavar=("BROKER", "DEVICE"),
                        help="run --mode (one) against these ports until killed, measuring "
                             "nothing (bench/peers.py measures it beside the others)")
    args = parser.parse_args(argv)
    modes = list(MODES) if args.mode == "all" else args.mode.split(",")
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--mode: {args.mode!r} is not all or modes of {', '.join(MODES)}")
    if not 1 <= args.registers <= 125 or not 1 <= args.units <= 247:
        parser.error("--registers must be 1..125 (one read), --units 1..247")
    if args.serve:
        if len(modes) != 1:
            parser.error("--serve runs one --mode")
        asyncio.run(run(modes[0], *args.serve, units=args.units, registers=args.registers,
                        warmup=0.0, seconds=None))
        return 0

    from tests.helpers import free_port, mosquitto

    print(f"floor: {args.units} units x {args.registers} uint16 registers, {INTERVAL:g} s polls, "
          f"hand-built Modbus frames, mqtt5 packets, local mosquitto (its defaults); "
          f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'run':>3}  {'mode':<15}  {'values':>7}  {'µs/value':>8}")
    found: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="m2m-floor-") as tmp_name:
        tmp = Path(tmp_name)
        with mosquitto(tmp, "") as broker:
            device = free_port()
            config = pipeline.write_config(tmp / "sim.yaml", broker=broker.port, device=device,
                                           mode="per-device", units=args.units,
                                           registers=args.registers)
            with pipeline.simulated_device(config, device):
                for run_no in range(1, args.repeat + 1):
                    for mode in modes:  # alternating, so a change in load hits each alike
                        values, cpu = asyncio.run(run(
                            mode, broker.port, device, units=args.units,
                            registers=args.registers, warmup=args.warmup, seconds=args.seconds))
                        us = cpu / values * 1e6 if values else float("nan")
                        found[mode].append(us)
                        print(f"{run_no:>3}  {mode:<15}  {values:>7}  {us:>8.2f}", flush=True)
    print()
    print("median µs of CPU per value (this process only; the daemon's figures in "
          "bench/pipeline.py are of its process alone too)")
    for mode in modes:
        print(f"  {mode:<15} {statistics.median(found[mode]):6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
