"""CPU per QoS 1 message: bridge.mqtt.wire.WireClient.publish_batch vs aiomqtt 2.5.

Publishes `--messages` (100,000) per-point-sized messages (topic `m2m/bench/meter-N/point-M`,
a ~50-byte JSON payload), QoS 1, not retained, in batches of `--batch` (500) to a private
mosquitto on a free 127.0.0.1 port (tests/helpers.mosquitto), and measures this process's CPU
time (time.process_time) per message, from the first publish to the last PUBACK:

- wire:   `await client.publish_batch(batch)` (one future per batch, bulk acks);
- aiomqtt: `await asyncio.gather(*(client.publish(t, p, qos=1) for t, p in batch))`.

No subscriber. Each client connects and publishes a warm-up batch outside the timed window.
`--inflight N` sets mosquitto's max_inflight_messages (its Receive Maximum for MQTT 5 clients,
which WireClient honours; mosquitto's default, 20, when omitted) and aiomqtt's
max_inflight_messages to the same N (else to the batch size, as bridge/mqtt.py does: paho does
not cap itself by the broker's Receive Maximum).

    .venv/bin/python bench/wire.py
    .venv/bin/python bench/wire.py --inflight 1000 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for bridge and tests.helpers

Message = tuple[str, bytes, int, bool]


def make_messages(count: int) -> list[Message]:
    ts = 1764000000123
    return [
        (
            f"m2m/bench/meter-{i // 100 % 10}/point-{i % 100}",
            f'{{"value": {230 + (i % 1000) / 10:.1f}, "ts": {ts + i}, "unit": "V"}}'.encode(),
            1,
            False,
        )
        for i in range(count)
    ]


async def run_wire(port: int, messages: list[Message], batch: int, _inflight: int) -> float:
    from bridge.mqtt.wire import WireClient

    client = WireClient(host="127.0.0.1", port=port, client_id="bench-wire")
    await client.connect()
    try:
        await client.publish_batch(messages[:batch])  # warm-up
        start = time.process_time()
        for i in range(0, len(messages), batch):
            await client.publish_batch(messages[i : i + batch])
        return time.process_time() - start
    finally:
        await client.disconnect()


async def run_aiomqtt(port: int, messages: list[Message], batch: int, inflight: int) -> float:
    import aiomqtt

    client = aiomqtt.Client(
        "127.0.0.1", port, identifier="bench-aiomqtt",
        protocol=aiomqtt.ProtocolVersion.V5, max_inflight_messages=inflight or batch,
    )
    client.pending_calls_threshold = batch + 1  # no "N pending publish calls" warning per call
    async with client:

        async def send(chunk: list[Message]) -> None:
            await asyncio.gather(*(client.publish(t, p, qos=q, retain=r) for t, p, q, r in chunk))

        await send(messages[:batch])  # warm-up
        start = time.process_time()
        for i in range(0, len(messages), batch):
            await send(messages[i : i + batch])
        return time.process_time() - start


Runner = Callable[[int, list[Message], int, int], Coroutine[Any, Any, float]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=1, help="runs per client (best is shown)")
    parser.add_argument("--inflight", type=int, default=0,
                        help="mosquitto max_inflight_messages (0: its default, 20)")
    args = parser.parse_args()

    from tests.helpers import mosquitto

    messages = make_messages(args.messages)
    size = statistics.mean(len(p) for _, p, _, _ in messages)
    print(f"{args.messages} messages, QoS 1, batches of {args.batch}, payload ~{size:.0f} B; "
          f"mosquitto max_inflight_messages {args.inflight or 'default (20)'}; "
          f"Python {platform.python_version()}")
    runners: dict[str, Runner] = {"wire": run_wire, "aiomqtt": run_aiomqtt}
    results: dict[str, list[float]] = {name: [] for name in runners}
    extra = f"max_inflight_messages {args.inflight}\n" if args.inflight else ""
    with tempfile.TemporaryDirectory() as tmp, mosquitto(Path(tmp), extra) as broker:
        for _ in range(args.repeat):
            for name, runner in runners.items():  # alternate, so drift hits both alike
                cpu = asyncio.run(runner(broker.port, messages, args.batch, args.inflight))
                per = cpu / args.messages * 1e6
                results[name].append(per)
                print(f"  {name:8} {per:7.2f} µs/message CPU ({cpu:.2f} s)")
    best = {name: min(values) for name, values in results.items()}
    print(f"best: wire {best['wire']:.2f} µs/message, aiomqtt {best['aiomqtt']:.2f} µs/message,"
          f" aiomqtt/wire = {best['aiomqtt'] / best['wire']:.1f}x")


if __name__ == "__main__":
    main()
