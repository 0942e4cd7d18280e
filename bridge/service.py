"""Service: wires config -> links -> pollers -> buffer -> publisher, and runs their lifecycle.

Start sinks before sources and stop sources before sinks (Telegraf's rule), so nothing in flight
is dropped: the publisher starts first, pollers after; on stop the pollers are cancelled, then
the publisher flushes the live readings for most of `grace` seconds, publishes every device's
`offline`, then the gateway's, and leaves.

`map: sunspec` devices (bridge.sunspec_maps) run with the map of their SunSpec chain: the
service keeps the config as loaded and runs it with their maps merged in. A device's first map
(from its cache, at start-up) is in place before anything polls; a walk that finds a new or
changed map applies the config again through `reload`'s difference, like a SIGHUP would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from bridge.buffer import DiskBuffer
from bridge.config.frozen import is_serial
from bridge.core.bustime import bus_load
from bridge.core.outbox import Outbox
from bridge.core.planner import PollGroup, plan_device
from bridge.errors import BridgeError
from bridge.instrument import InstrumentPoller
from bridge.mqtt.commands import CommandHandler
from bridge.mqtt.discovery import Announcer
from bridge.mqtt.publisher import Publisher
from bridge.mqtt.wireevents import Incoming
from bridge.poller import DevicePoller
from bridge.sunspec_maps import SunSpecMaps, is_sunspec
from bridge.transports.line import LinePort
from bridge.transports.links import build_links, line_link, plan_for

if TYPE_CHECKING:
    from bridge.config import Config, Device, LineLink
    from bridge.core.sparkplug import NodeMetrics
    from bridge.core.sparkplug_stored import DeviceData
    from bridge.mqtt.sparkplug import AliasBook, EdgeNode

log = structlog.get_logger("bridge.service")

# Seconds of the stop's grace kept for the statuses after the readings' flush (at most half).
STATUS_RESERVE = 2.0


def warn_overloaded_links(config: Config, plans: dict[str, tuple[PollGroup, ...]]) -> None:
    """One warning per serial link whose configured polls need more bus time than it has.

    The line still works, the polls just come slower than configured; saying so at startup
    beats an integrator wondering why a 1 s interval yields a reading every 1.4 s.
    """
    by_link: dict[str, list[tuple[PollGroup, ...]]] = {}
    for device in config.devices:
        if device.name in plans:
            by_link.setdefault(device.link, []).append(plans[device.name])
    for name, link_plans in by_link.items():
        link = config.link(name)
        if not is_serial(link):
            continue
        load = bus_load(link, link_plans)
        if load > 1.0:
            log.warning(
                f"link {name} needs {load * 100:.0f}% of its bus time at {link.baudrate} baud",
                link=name, load_percent=round(load * 100), baudrate=link.baudrate,
            )


class Service:
    """One running bridge: its buffer, publisher, links and pollers; reloadable by difference."""

    def __init__(self, config: Config) -> None:
        # The config as loaded; `self.config` is it as it runs, SunSpec maps merged in.
        self.loaded = config
        self.sunspec = SunSpecMaps()
        self.sunspec.read_caches(config)
        config = self.sunspec.effective(config)
        self.config = config
        bounds = config.mqtt.buffer
        self.buffer = DiskBuffer(
            Path(config.gateway.state_dir) / "buffer.sqlite3",
            max_messages=bounds.max_messages, max_bytes=bounds.max_bytes, max_age=bounds.max_age,
        )
        # Discovery documents go through whichever publisher is current (a reload may
        # restart it); so do command replies and statuses.
        self.announcer = Announcer(
            config, lambda *message: self.publisher.send(*message)  # noqa: PLW0108 - late-bound
        )
        self.node: EdgeNode | None = None  # with format: sparkplug
        # Sparkplug aliases, kept in the state dir across reloads and restarts (one numbering
        # for the node, the outboxes and DCMD).
        self.aliases: AliasBook | None = None
        self.metrics = self._number(config)
        self.publisher = self._make_publisher(config)
        self.links = build_links(self.loaded)  # a SunSpec device not mapped yet is walked on it
        self.line_ports: dict[LineLink, LinePort] = {}  # by definition: a changed link reopens
        self.pollers = {d.name: self._make_poller(config, d) for d in config.devices}
        self._hand_out_aliases()
        warn_overloaded_links(config, {name: p.plan for name, p in self.pollers.items()})
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._walks: dict[str, asyncio.Task[None]] = {}  # SunSpec devices being mapped
        self._group: asyncio.TaskGroup | None = None
        self._publishing: asyncio.Task[None] | None = None

    def _make_publisher(self, config: Config) -> Publisher:
        commands = self._make_commands(config)
        self.node = None
        if config.mqtt.format == "sparkplug":
            # Imported only here: a JSON daemon holds no protobuf (~2.3 MiB RSS, bench/rss.py).
            from bridge.mqtt.sparkplug import EdgeNode  # noqa: PLC0415 - see above

            # DCMD writes go through the current command handler (the `/set` path).
            self.node = EdgeNode(config, data=self._device_data, writes=lambda: self.commands,
                                 metrics=self.metrics)
        publisher = Publisher(
            config.mqtt, self.buffer,
            subscriptions=[*commands.topics(), *self.announcer.subscriptions,
                           *(self.node.subscriptions if self.node else [])],
            on_message=self._on_message, node=self.node,
        )
        publisher.on_connect.append(self.announcer.on_connect)  # after statuses, before data
        return publisher

    def _on_message(self, message: Incoming) -> None:
        # Looked up per message: a reload swaps the command handler under a running publisher.
        if self.node is not None and self.node.on_message(message):
            return
        if not self.announcer.on_message(message):
            self.commands.on_message(message)

    def _device_data(self, device: str) -> DeviceData | None:
        """With format: sparkplug, the running poller's last values (for a DBIRTH)."""
        poller = self.pollers.get(device)
        return poller.status.outbox.sparkplug if poller is not None else None

    def _number(self, config: Config) -> NodeMetrics | None:
        """With format: sparkplug, the config's metrics with their aliases (saved first)."""
        if config.mqtt.format != "sparkplug":
            return None
        if self.aliases is None:
            from bridge.mqtt.sparkplug import ALIASES_FILE, AliasBook  # noqa: PLC0415 - as EdgeNode's

            self.aliases = AliasBook(Path(config.gateway.state_dir) / ALIASES_FILE)
        return self.aliases.metrics(config.devices)

    def _hand_out_aliases(self) -> None:
        """With format: sparkplug, every poller's outbox encodes with the node's aliases."""
        if self.metrics is None:
            return
        for name, poller in self.pollers.items():
            poller.status.outbox.use_metrics(self.metrics.device(name))

    def _make_commands(self, config: Config) -> CommandHandler:
        # Commands reach links and the current publisher through the service (as _set_status).
        self.commands = CommandHandler(
            config, lambda name: self.links[name],
            lambda *reply: self.publisher.respond(*reply),  # noqa: PLW0108 - late-bound
            emit=self.buffer.put, outboxes=self._outbox, metrics=self.metrics,
        )
        return self.commands

    def _outbox(self, device: str) -> Outbox | None:
        # The running poller's, looked up per command: a reload may have restarted it.
        poller = self.pollers.get(device)
        return poller.outbox if isinstance(poller, DevicePoller) else None

    def _swap_commands(self, new: Config) -> None:
        """Check commands against `new` from now on: a point made writable or read-only, or a
        lowered max, applies at once (the subscription, `<prefix>/+/+/set`, stays the same)."""
        self._make_commands(new)

    def _make_poller(self, config: Config, device: Device) -> DevicePoller | InstrumentPoller:
        line = line_link(config, device)
        if line is not None:
            port = self.line_ports.setdefault(line, LinePort(line))
            return InstrumentPoller(
                device, port, config.mqtt, emit=self.buffer.put, set_status=self._set_status
            )
        max_registers, max_gap = plan_for(config, device)
        plan = plan_device(
            device.points, interval=device.interval, max_registers=max_registers, max_gap=max_gap
        )
        return DevicePoller(
            device, plan, self.links[device.link], config.mqtt,
            emit=self.buffer.put, set_status=self._set_status,
        )

    def _set_status(self, device: str, online: bool) -> None:
        # Through the service, so pollers keep reporting to whichever publisher is current.
        self.publisher.set_status(device, online)

    async def run(
        self,
        *,
        stop: asyncio.Event | None = None,
        ready: Callable[[], None] | None = None,
        grace: float = 10.0,
    ) -> None:
        """Run until `stop` is set (or forever), then shut down in order."""
        async with asyncio.TaskGroup() as tg:
            self._group = tg
            self._publishing = tg.create_task(self.publisher.run(), name="publisher")
            for name in self.pollers:
                self._start(name)
            self._walk_sunspec()
            unmapped = sorted(set(self._walks) - set(self.pollers))
            log.info("bridge started", devices=len(self.pollers), links=len(self.links),
                     **({"sunspec_unmapped": unmapped} if unmapped else {}))
            if ready is not None:
                ready()
            try:
                await (stop.wait() if stop is not None else asyncio.Future())
            finally:
                for task in [*self._tasks.values(), *self._walks.values()]:
                    task.cancel()
                await self.commands.drain(min(grace, 5.0))  # writes in flight get their result
                # Retained statuses describe now: a stopped bridge polls nothing, so no device
                # may stay `online` under an `offline` gateway. The publisher says them after
                # the live readings (flushed for most of the grace, leaving time for these)
                # and before the gateway's `offline`.
                self.publisher.stop(offline=list(self.pollers),
                                    flush=max(grace - STATUS_RESERVE, grace / 2))
                await self._drain(self._publishing, grace)
                for link in self.links.values():
                    link.close()
        left = len(self.buffer)
        self.buffer.close()
        log.info("bridge stopped", left_in_buffer=left)

    def _start(self, name: str) -> None:
        assert self._group is not None
        poller = self.pollers[name]
        self._tasks[name] = self._group.create_task(poller.run(), name=f"device {name}")

    def _stop(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
        self.pollers.pop(name, None)

    def _walk_sunspec(self) -> None:
        """(Re)start the walk of every `map: sunspec` device: at start and at every reload,
        since scale factors may change with a firmware update."""
        for task in self._walks.values():
            task.cancel()
        self._walks = {}
        if self._group is None:
            return
        for device in self.loaded.devices:
            if is_sunspec(device):
                walk = self.sunspec.resolve(
                    self.loaded, device, self.links[device.link],
                    apply=self._remap, set_status=self._set_status,
                )
                self._walks[device.name] = self._group.create_task(
                    walk, name=f"sunspec {device.name}")

    def _remap(self) -> list[str]:
        """Run the loaded config again with the SunSpec maps as they are now."""
        try:
            return self._apply(self.sunspec.effective(self.loaded))
        except BridgeError as exc:  # as a reload refused: what runs stays
            log.error("sunspec map not applied; the running config stays", error=str(exc))
            return []

    def reload(self, new: Config) -> list[str]:
        """Apply `new` by difference and return what changed, for the log.

        Devices whose definition and link are unchanged keep polling without a gap; changed
        devices restart; links are rebuilt only when their own settings changed. A change to
        `mqtt` or `gateway` restarts the publisher (the buffer and device statuses carry over).
        SunSpec devices keep their maps while their unit and link stay, and are walked again.
        """
        self.loaded = new
        self.sunspec.update(new)
        changes = self._apply(self.sunspec.effective(new))
        self._walk_sunspec()
        return changes

    def _apply(self, new: Config) -> list[str]:
        """`reload`'s difference: `new` is the config to run (SunSpec maps merged in); the
        links are those of `self.loaded`, whose SunSpec devices may not be mapped yet."""
        old = self.config
        changes: list[str] = []
        used = {d.link for d in self.loaded.devices}
        kept_links = {
            name: link for name, link in self.links.items()
            if name in used and _link_def(old, name) == _link_def(new, name)
        }
        fresh = build_links(self.loaded.model_copy(update={
            "devices": [d for d in self.loaded.devices if d.link not in kept_links]
        }))
        for name, link in self.links.items():
            if name not in kept_links:
                link.close()
                changes.append(f"link {name} {'restarted' if name in fresh else 'removed'}")
        self.links = {**fresh, **kept_links}
        old_devices = {d.name: d for d in old.devices}
        for device in new.devices:
            before = old_devices.pop(device.name, None)
            same_link = _link_def(old, device.link) == _link_def(new, device.link)
            if before == device and same_link and device.name in self.pollers:
                continue
            self._stop(device.name)
            self.pollers[device.name] = self._make_poller(new, device)
            if self._group is not None:
                self._start(device.name)
            changes.append(f"device {device.name} {'restarted' if before else 'added'}")
        for name in old_devices:
            self._stop(name)
            self.publisher.set_status(name, False)
            changes.append(f"device {name} removed")
        if new.mqtt.buffer != old.mqtt.buffer:
            bounds = new.mqtt.buffer
            self.buffer.max_messages = bounds.max_messages
            self.buffer.max_bytes = bounds.max_bytes
            self.buffer.max_age = bounds.max_age
            changes.append("buffer bounds applied")
        for key in ("gateway.state_dir", "metrics"):
            if _setting(old, key) != _setting(new, key):
                changes.append(f"{key} changed: takes effect at the next start")
        self.announcer.update(new)  # before a publisher restart: it subscribes for HA's status
        self.metrics = self._number(new)
        self._hand_out_aliases()
        if new.mqtt != old.mqtt or new.gateway != old.gateway:
            self._restart_publisher(new)
            changes.append("mqtt publisher restarted")
        else:
            self._swap_commands(new)
            if self.node is not None:
                self.node.update(new, self.metrics)  # births again if the metrics changed
        self.config = new
        return changes

    def _restart_publisher(self, new: Config) -> None:
        old = self.publisher
        self.publisher = self._make_publisher(new)
        self.publisher.adopt_statuses(old)
        if self._publishing is not None and self._group is not None:
            self._publishing.cancel()  # its batch in flight goes back to the buffer
            self._publishing = self._group.create_task(self.publisher.run(), name="publisher")

    async def _drain(self, publishing: asyncio.Task[None] | None, grace: float) -> None:
        if publishing is None:
            return
        done, _ = await asyncio.wait({publishing}, timeout=grace)
        if not done:
            log.warning("stop grace expired", left_in_buffer=len(self.buffer))
            publishing.cancel()


def _setting(config: Config, dotted: str) -> object:
    value: object = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _link_def(config: Config, name: str) -> object:
    try:
        return config.link(name)
    except KeyError:
        return None


async def run_service(
    config: Config,
    *,
    ready: Callable[[], None] | None = None,
    stop: asyncio.Event | None = None,
    grace: float = 10.0,
) -> None:
    """Run a bridge for `config` until `stop` is set or the task is cancelled."""
    await Service(config).run(stop=stop, ready=ready, grace=grace)
