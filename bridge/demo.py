"""`m2m-bridge demo`: simulated devices -> the bridge -> a broker, with a live view of the topics.

Everything runs in this one process: the simulator serves the config's tcp devices, the bridge
polls them as it would in the field, and a subscriber prints what reaches the broker. The
configured broker is used when one answers, else an embedded amqtt broker on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from bridge.broker import EmbeddedBroker, broker_answers, start_embedded_broker
from bridge.config import Config, MqttSettings, load_config
from bridge.errors import BridgeError
from bridge.session import make_client
from bridge.simulator import Simulator

DEFAULT_CONFIG = Path(__file__).parent.parent / "configs" / "bridge.yaml"
_REDRAW = 0.5  # seconds between table redraws: twice a second is live without flicker
_CLEAR = "\x1b[H\x1b[2J"
_PAYLOAD_WIDTH = 60


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveView:
    """Latest payload per topic: a table redrawn in place on a terminal, else one line each."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.latest: dict[str, tuple[str, float]] = {}
        self.header = ""

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
        topics = sorted(self.latest)
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


async def _subscribe(mqtt: MqttSettings, view: LiveView) -> None:
    viewer = mqtt.model_copy(update={"client_id": f"{mqtt.client_id}-view"})
    async with make_client(viewer) as client:
        await client.subscribe(f"{mqtt.topic_prefix}/#")
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
    config_path: Path | None, *, duration: float | None = None, out: TextIO = sys.stdout
) -> int:
    """Run the demo until Ctrl-C (or `duration` seconds); 0 on a clean stop."""
    path = config_path or DEFAULT_CONFIG
    if not path.is_file():
        raise BridgeError(f"no config at {path}: pass one with -c FILE")
    config = load_config(path)
    stop = asyncio.Event()
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
        out.write(view.header + "\n")
        out.flush()
        stack.enter_context(_stop_on_sigint(stop))
        await _run_until_stopped(config, sim, view, stop, duration)
    return 0


async def _run_until_stopped(
    config: Config, sim: Simulator, view: LiveView, stop: asyncio.Event, duration: float | None
) -> None:
    from bridge.service import run_service  # noqa: PLC0415  (the service pulls in the most)

    helpers: list[asyncio.Task[Any]] = [
        asyncio.create_task(_subscribe(config.mqtt, view)),
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
