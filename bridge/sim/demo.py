"""`m2m-bridge demo`: simulated devices -> the bridge -> a broker, with a live view of the topics.

Everything runs in this one process: the simulator serves the config's tcp devices, the bridge
polls them as it would in the field, and a subscriber prints what reaches the broker. The
configured broker is used when one answers, else an embedded amqtt broker on loopback. A device
port already taken (another simulator on 5020) is replaced by a free one. Every few seconds the
demo sends a command to the first writable point, so the view shows `/set`, its
`/set/result` and the read-back, not only polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from bridge.config import Config, Link, MqttSettings, Point, TcpLink, load_config
from bridge.core.codec import Value
from bridge.core.messages import Topics
from bridge.core.writes import CommandRefused, check_value
from bridge.errors import BridgeError
from bridge.mqtt.session import make_client
from bridge.sim.broker import EmbeddedBroker, broker_answers, start_embedded_broker
from bridge.sim.tcp import Simulator

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "bridge.yaml"  # the checkout's
_REDRAW = 0.5  # seconds between table redraws: twice a second is live without flicker
_CLEAR = "\x1b[H\x1b[2J"
_PAYLOAD_WIDTH = 60
WRITE_EVERY = 5.0  # seconds between the demo's commands: often enough to see, rare for a setpoint


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _taken(host: str, port: int) -> bool:
    """Whether something already listens on host:port (another simulator, a real server)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _free_device_ports(config: Config) -> tuple[Config, list[str]]:
    """`config` with each simulated tcp link whose port is taken moved to a free port, and a
    line per move for the header. The demo's devices are its own: any free port will do."""
    links: list[Link] = []
    notes: list[str] = []
    for link in config.links:
        if isinstance(link, TcpLink) and link.type == "tcp" and _taken(link.host, link.port):
            port = _free_port(link.host)
            notes.append(f"{link.host}:{link.port} is taken: link {link.name} uses port {port}")
            links.append(link.model_copy(update={"port": port}))
        else:
            links.append(link)
    return config.model_copy(update={"links": links}), notes


@dataclass(frozen=True, slots=True)
class DemoWrite:
    """The command the demo sends now and then: one writable point, two values in turn."""

    device: str
    point: str
    values: tuple[Value, Value]


def _demo_write(config: Config) -> DemoWrite | None:
    """The first writable point of a simulated tcp device with two values it accepts."""
    for device in config.devices:
        link = config.link(device.link)
        if not isinstance(link, TcpLink) or link.type != "tcp":
            continue
        for point in device.points:
            values = _two_values(point)
            if values is not None:
                return DemoWrite(device.name, point.name, values)
    return None


def _two_values(point: Point) -> tuple[Value, Value] | None:
    """Two values `point` accepts as commands (its simulated start and another), or None."""
    if not point.writable or point.bit is not None or point.type == "string":
        return None
    start = point.simulate.value if point.simulate is not None else None
    candidates: tuple[Value, Value]
    if point.table == "coil" or point.type == "bool":
        candidates = (not start, bool(start))
    elif point.values:
        names = list(point.values.values())
        if len(names) < 2:
            return None
        candidates = (names[1], names[0])
    else:
        first = start if isinstance(start, int | float) else 100 * point.scale
        # Three quarters of the start, on a whole raw step so integer registers take it.
        raw = round((first * 0.75 - point.offset) / (point.scale or 1.0))
        candidates = (round(raw * point.scale + point.offset, 9), first)
    try:
        return (check_value(point, candidates[0]), check_value(point, candidates[1]))
    except CommandRefused:
        return None


class LiveView:
    """Latest payload per topic: a table redrawn in place on a terminal, else one line each."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.latest: dict[str, tuple[str, float]] = {}
        self.header = ""
        self.pinned = ""  # a topic shown first, with its /set and /set/result, whatever fits

    def update(self, topic: str, payload: bytes) -> None:
        text = payload.decode("utf-8", "replace")
        self.latest[topic] = (text, time.monotonic())
        if not self.tty:
            self.out.write(f"{topic}  {text}\n")
            self.out.flush()

    def draw(self) -> None:
        now = time.monotonic()
        width = max((len(t) for t in self.latest), default=5)
        lines = [self.header, "", f"{'topic':<{width}}  {'age':>6}  payload"]
        topics = sorted(self.latest, key=lambda t: (not self._pinned(t), t))
        # Fit the terminal: the header (how to subscribe) must stay on screen.
        size = shutil.get_terminal_size()
        used = sum(max(1, -(-len(line) // size.columns)) for line in lines)  # wrapped lines
        room = size.lines - used - 1
        shown = topics if len(topics) <= room else topics[: max(room - 1, 0)]
        for topic in shown:
            text, at = self.latest[topic]
            if len(text) > _PAYLOAD_WIDTH:
                text = text[: _PAYLOAD_WIDTH - 1] + "…"
            lines.append(f"{topic:<{width}}  {now - at:>5.1f}s  {text}")
        if len(shown) < len(topics):
            lines.append(f"… {len(topics) - len(shown)} more topics (a taller terminal shows them)")
        self.out.write(_CLEAR + "\n".join(lines) + "\n")
        self.out.flush()

    def _pinned(self, topic: str) -> bool:
        return bool(self.pinned) and (topic == self.pinned or topic.startswith(self.pinned + "/"))


async def _view(
    mqtt: MqttSettings, view: LiveView, write: DemoWrite | None, every: float
) -> None:
    """Show everything under the prefix; send the demo's command every `every` seconds."""
    viewer = mqtt.model_copy(update={"client_id": f"{mqtt.client_id}-view"})
    async with make_client(viewer) as client, asyncio.TaskGroup() as tg:
        await client.subscribe(f"{mqtt.topic_prefix}/#")
        if write is not None:
            topic = Topics(mqtt.topic_prefix).command(write.device, write.point)

            async def commands() -> None:
                for turn in itertools.count():
                    await asyncio.sleep(every)
                    value = write.values[turn % 2]
                    await client.publish(topic, json.dumps(value).encode(), qos=1)

            tg.create_task(commands())
        async for message in client.messages:
            payload = message.payload
            view.update(str(message.topic), payload if isinstance(payload, bytes) else b"")


async def _redraw(view: LiveView) -> None:
    while True:
        view.draw()
        await asyncio.sleep(_REDRAW)


async def _tick(sim: Simulator) -> None:
    while True:
        await asyncio.sleep(1.0)
        sim.tick()


def _with_broker(config: Config, host: str, port: int) -> Config:
    """`config` pointed at the embedded broker: plain MQTT 3.1.1 (all amqtt speaks), anonymous."""
    mqtt = config.mqtt.model_copy(update={
        "host": host, "port": port, "protocol": "3.1.1", "tls": None,
        "username": None, "password": None,
    })
    return config.model_copy(update={"mqtt": mqtt})


async def run_demo(
    config_path: Path | None,
    *,
    duration: float | None = None,
    out: TextIO = sys.stdout,
    stop: asyncio.Event | None = None,
    write_every: float = WRITE_EVERY,
) -> int:
    """Run the demo until Ctrl-C, `stop` is set or `duration` seconds pass; 0 on a clean stop."""
    path = config_path or DEFAULT_CONFIG
    if not path.is_file():
        raise BridgeError(f"no config at {path}: pass one with -c FILE")
    config, notes = _free_device_ports(load_config(path))
    stop = stop or asyncio.Event()
    write = _demo_write(config)
    async with contextlib.AsyncExitStack() as stack:
        state = stack.enter_context(tempfile.TemporaryDirectory(prefix="m2m-demo-"))
        # A throwaway buffer: a demo must not replay yesterday's readings or litter ./state.
        gateway = config.gateway.model_copy(update={"state_dir": state})
        config = config.model_copy(update={"gateway": gateway})

        sim = Simulator(config)
        await sim.start()
        stack.push_async_callback(sim.stop)

        mqtt = config.mqtt
        if await broker_answers(mqtt.host, mqtt.port):
            which = f"configured broker {mqtt.host}:{mqtt.port}"
        else:
            broker: EmbeddedBroker = await start_embedded_broker("127.0.0.1", _free_port())
            stack.push_async_callback(broker.stop)
            config = _with_broker(config, broker.host, broker.port)
            mqtt = config.mqtt
            which = f"embedded broker 127.0.0.1:{broker.port} (none answered at the configured one)"
        view = LiveView(out)
        view.header = (
            f"m2m-bridge demo: {which}; from another terminal: "
            f"mosquitto_sub -h {mqtt.host} -p {mqtt.port} -t '{mqtt.topic_prefix}/#' -v"
        )
        if write is not None:
            view.pinned = Topics(mqtt.topic_prefix).point(write.device, write.point)
            a, b = (json.dumps(v) for v in write.values)
            notes.append(f"every {write_every:g}s the demo writes {a}, then {b}, to "
                         f"{write.device}/{write.point}: watch {view.pinned}/set and /set/result")
        view.header = "\n".join([view.header, *notes])
        out.write(view.header + "\n")
        out.flush()
        stack.enter_context(_stop_on_sigint(stop))
        await _run_until_stopped(config, sim, view, stop, duration, write, write_every)
    return 0


async def _run_until_stopped(  # noqa: PLR0917 - private, called once
    config: Config,
    sim: Simulator,
    view: LiveView,
    stop: asyncio.Event,
    duration: float | None,
    write: DemoWrite | None,
    write_every: float,
) -> None:
    from bridge.service import run_service  # noqa: PLC0415  (the service pulls in the most)

    helpers: list[asyncio.Task[Any]] = [
        asyncio.create_task(_view(config.mqtt, view, write, write_every)),
        asyncio.create_task(_tick(sim)),
    ]
    if view.tty:
        helpers.append(asyncio.create_task(_redraw(view)))
    service = asyncio.create_task(run_service(config, stop=stop))
    stopped = asyncio.create_task(stop.wait())
    try:
        async with asyncio.timeout(duration):
            await asyncio.wait([service, stopped, *helpers], return_when=asyncio.FIRST_COMPLETED)
    except (TimeoutError, asyncio.CancelledError):
        pass  # the duration is up, or Ctrl-C reached us as a cancellation: stop cleanly below
    finally:
        stop.set()  # the service flushes and publishes `offline` before returning
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(service, timeout=15)
        for task in (stopped, *helpers):
            task.cancel()
        await asyncio.gather(stopped, *helpers, return_exceptions=True)
    _raise_first_failure([service, *helpers])


def _raise_first_failure(tasks: list[asyncio.Task[Any]]) -> None:
    """A part that died on its own (not cancelled by us) ends the demo with its reason."""
    for task in tasks:
        if not task.done() or task.cancelled():
            continue
        exc = task.exception()
        if isinstance(exc, BridgeError):
            raise exc
        if exc is not None:
            raise BridgeError(f"demo stopped: {exc}") from exc


@contextlib.contextmanager
def _stop_on_sigint(stop: asyncio.Event) -> Iterator[None]:
    """Ctrl-C sets `stop` (a clean shutdown); a second Ctrl-C cancels at once (uvicorn's rule)."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()

    def on_sigint() -> None:
        if stop.is_set() and main is not None:
            main.cancel()
        stop.set()

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    except (RuntimeError, NotImplementedError, ValueError):
        yield  # not the main thread, or no signal support: cancellation still stops us
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)
