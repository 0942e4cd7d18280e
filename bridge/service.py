"""Service: wires config -> links -> pollers -> buffer -> publisher, and runs their lifecycle.

Start sinks before sources and stop sources before sinks (Telegraf's rule), so nothing in flight
is dropped: the publisher starts first, pollers after; on stop the pollers are cancelled, then
the publisher drains the buffer for at most `grace` seconds, publishes `offline` and leaves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from bridge.buffer import MemoryBuffer
from bridge.config import Config, Device, SerialLink, TcpLink
from bridge.errors import BridgeError
from bridge.mqtt import Publisher
from bridge.planner import plan_device
from bridge.poller import DevicePoller
from bridge.scheduler import Link
from bridge.transports.modbus import Endpoint, ModbusClient

log = structlog.get_logger("bridge.service")

SUPPORTED_LINKS = frozenset({"tcp"})


def build_links(config: Config) -> dict[str, Link]:
    """One shared client per link that a device uses; refuse link types not built yet."""
    links: dict[str, Link] = {}
    for name in dict.fromkeys(d.link for d in config.devices):
        link = config.link(name)
        if not isinstance(link, TcpLink) or link.type not in SUPPORTED_LINKS:
            raise BridgeError(f"link {name!r}: type {link.type!r} is not supported by this build")
        endpoint = Endpoint(link.type, link.host, link.port, link.timeout)
        links[name] = Link(ModbusClient(endpoint), silence=link.request_delay)
    return links


def plan_for(config: Config, device: Device) -> tuple[int, int]:
    """(max_registers, max_gap) of the device's link."""
    link = config.link(device.link)
    if isinstance(link, TcpLink | SerialLink):
        return link.max_registers, link.max_gap
    raise BridgeError(f"device {device.name!r}: link {link.name!r} is not a Modbus link")


class Service:
    """One running bridge: its buffer, publisher, links and pollers."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.buffer = MemoryBuffer(
            max_messages=config.mqtt.buffer.max_messages, max_bytes=config.mqtt.buffer.max_bytes
        )
        self.publisher = Publisher(config.mqtt, self.buffer)
        self.links = build_links(config)
        self.pollers: list[DevicePoller] = []
        for device in config.devices:
            max_registers, max_gap = plan_for(config, device)
            plan = plan_device(
                device.points, interval=device.interval, max_registers=max_registers,
                max_gap=max_gap,
            )
            self.pollers.append(
                DevicePoller(
                    device, plan, self.links[device.link], config.mqtt,
                    emit=self.buffer.put, set_status=self.publisher.set_status,
                )
            )

    async def run(
        self,
        *,
        stop: asyncio.Event | None = None,
        ready: Callable[[], None] | None = None,
        grace: float = 10.0,
    ) -> None:
        """Run until `stop` is set (or forever), then shut down in order."""
        async with asyncio.TaskGroup() as tg:
            publishing = tg.create_task(self.publisher.run(), name="publisher")
            polling = [
                tg.create_task(p.run(), name=f"device {p.device.name}") for p in self.pollers
            ]
            log.info("bridge started", devices=len(self.pollers), links=len(self.links))
            if ready is not None:
                ready()
            try:
                await (stop.wait() if stop is not None else asyncio.Future())
            finally:
                for task in polling:
                    task.cancel()
                self.publisher.stop()
                await self._drain(publishing, grace)
                for link in self.links.values():
                    link.close()
        log.info("bridge stopped", left_in_buffer=len(self.buffer))

    async def _drain(self, publishing: asyncio.Task[None], grace: float) -> None:
        done, _ = await asyncio.wait({publishing}, timeout=grace)
        if not done:
            log.warning("stop grace expired", left_in_buffer=len(self.buffer))
            publishing.cancel()


async def run_service(
    config: Config,
    *,
    ready: Callable[[], None] | None = None,
    stop: asyncio.Event | None = None,
    grace: float = 10.0,
) -> None:
    """Run a bridge for `config` until `stop` is set or the task is cancelled."""
    await Service(config).run(stop=stop, ready=ready, grace=grace)
