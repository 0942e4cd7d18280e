"""Real parts for tests: a mosquitto broker, the daemon as a subprocess, an MQTT recorder.

Everything binds 127.0.0.1 on a free port and is stopped by process id, so tests never touch a
broker that may already run on 1883.

Timing: a test never sleeps a fixed time and then asserts how much happened; it waits with
`until` (or `Recorder.wait_for`) for what it asserts, with a generous deadline (WAIT, 30 s), so a
loaded or slow machine only makes it slower, not red.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiomqtt

from bridge.config import Config, load_config
from bridge.core.codec import Value
from bridge.sim.tcp import Simulator

ROOT = Path(__file__).resolve().parent.parent
WAIT = 30.0  # seconds: the deadline for anything a test waits on; reached only when it fails


async def until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = WAIT,
    what: str | Callable[[], str] = "the condition",
    every: float = 0.05,
) -> None:
    """Return as soon as `predicate()` (sync or async) is true; after `timeout` seconds raise
    AssertionError naming `what` was awaited (a callable is asked then, e.g. for a log)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g}s for {_described(what)}")
        await asyncio.sleep(every)


def wait_until(
    predicate: Callable[[], bool],
    timeout: float = WAIT,
    what: str | Callable[[], str] = "the condition",
    every: float = 0.05,
) -> None:
    """`until` where there is no event loop to yield to: the same deadline, blocking."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g}s for {_described(what)}")
        time.sleep(every)


def _described(what: str | Callable[[], str]) -> str:
    return what() if callable(what) else what


def scrape(port: int) -> dict[str, float]:
    """GET /metrics on 127.0.0.1:`port`: every sample by its name with labels (blocking)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples = (line.rsplit(" ", 1) for line in text.splitlines()
               if line and not line.startswith("#"))
    return {name: float(value) for name, value in samples}


async def metrics(port: int) -> dict[str, float]:
    """`scrape(port)` off the event loop; {} while nothing serves there yet."""
    try:
        return await asyncio.to_thread(scrape, port)
    except OSError:
        return {}


def examples(n: int) -> int:
    """A property test's example count: `n` in the full suite; a third of it (at least 20)
    in the fast tier (`-m "not integration"`, which sets M2M_EXAMPLES_SCALE; see conftest),
    where the slowest property tests were most of its time."""
    scale = float(os.environ.get("M2M_EXAMPLES_SCALE", "1"))
    return n if scale >= 1 else max(20, round(n * scale))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (the kernel's pick, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def stop_process(
    process: subprocess.Popen[Any], sig: signal.Signals = signal.SIGTERM, timeout: float = 5
) -> tuple[Any, Any]:
    """Stop `process` with `sig` (SIGKILL if it still runs `timeout` s later), reap it and close
    its pipes; returns what was left in them (stdout, stderr), as `communicate()` does."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()


def wait_for_port(
    port: int, timeout: float = WAIT, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until something listens on 127.0.0.1:`port` (failing at once if `process`,
    which is to listen there, exits)."""

    def listening() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited {process.returncode} before listening")
        return False

    try:
        wait_until(listening, timeout)
    except AssertionError:
        raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:g}s") from None


@dataclass
class Broker:
    """A mosquitto started for one test."""

    port: int
    conf: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        # Its log goes to a file (log_dest); stderr says only why it could not start.
        self.process = subprocess.Popen(
            [exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            wait_for_port(self.port, process=self.process)
        except (RuntimeError, TimeoutError) as exc:
            _, err = stop_process(self.process)
            self.process = None
            raise RuntimeError(f"mosquitto did not start: {err.decode(errors='replace')}") from exc

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None


@contextlib.contextmanager
def mosquitto(tmp: Path, extra: str = "", port: int | None = None) -> Iterator[Broker]:
    """A broker on 127.0.0.1; it keeps sessions in `tmp` across restarts on the same port."""
    port = port or free_port()
    data = tmp / "mosquitto"
    data.mkdir(exist_ok=True)
    # Started as root, mosquitto would drop to its own user, who cannot write under pytest's
    # private tmp; `user root` keeps it as whoever started it.
    user = "user root\n" if os.geteuid() == 0 else ""
    conf = tmp / f"mosquitto-{port}.conf"
    conf.write_text(
        f"{user}listener {port} 127.0.0.1\nallow_anonymous true\n"
        f"persistence true\npersistence_location {data}/\n"
        f"persistence_file {port}.db\nlog_dest file {data}/{port}.log\n"
        f"log_type error\nlog_type warning\nlog_type notice\n{extra}"
    )
    with _running(Broker(port, conf)) as broker:
        yield broker


@dataclass
class Nats:
    """A nats-server with JetStream and an MQTT listener on 127.0.0.1; its store survives a
    restart on the same ports (sessions and retained messages live in JetStream)."""

    directory: Path
    port: int  # MQTT
    client_port: int  # NATS protocol, unused by the tests but it must not collide
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = self.directory / "nats.conf"
        conf.write_text(
            f"listen: 127.0.0.1:{self.client_port}\nserver_name: test-{self.port}\n"
            f'jetstream {{ store_dir: "{self.directory / "js"}" }}\n'
            f"mqtt {{ listen: 127.0.0.1:{self.port} }}\n"
        )
        exe = shutil.which("nats-server") or "/usr/sbin/nats-server"
        log = (self.directory / "nats.log").open("ab")
        with log:
            self.process = subprocess.Popen([exe, "-c", str(conf)], stdout=log, stderr=log)
        try:
            wait_for_port(self.port, process=self.process)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None


@contextlib.contextmanager
def nats(tmp: Path, port: int | None = None, client_port: int | None = None) -> Iterator[Nats]:
    directory = tmp / "nats"
    directory.mkdir(exist_ok=True)
    server = Nats(directory, port or free_port(), client_port or free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def _running(broker: Broker) -> Iterator[Broker]:
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@dataclass
class Recorder:
    """Every message seen on a topic filter, in arrival order."""

    messages: list[tuple[str, bytes, bool]] = field(default_factory=list)

    def payloads(self, topic: str) -> list[bytes]:
        return [p for t, p, _ in self.messages if t == topic]

    def values(self, topic: str) -> list[Any]:
        return [json.loads(p) for p in self.payloads(topic)]

    def last(self, topic: str) -> bytes | None:
        found = self.payloads(topic)
        return found[-1] if found else None

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = WAIT) -> None:
        def seen() -> str:
            return f"the condition; topics seen: {sorted({t for t, _, _ in self.messages})}"

        await until(lambda: bool(predicate()), timeout, seen)


@contextlib.asynccontextmanager
async def recording(
    port: int, topic: str, *, session: str | None = None, client: aiomqtt.Client | None = None
) -> AsyncIterator[Recorder]:
    """Record `topic`; with `session`, a persistent session the broker queues for; `client`
    replaces the plain loopback one (TLS, credentials)."""
    recorder = Recorder()
    client = client or aiomqtt.Client(
        "127.0.0.1", port, identifier=session or f"test-{os.getpid()}-{port}",
        clean_session=session is None,
    )
    async with client:
        await client.subscribe(topic, qos=1)

        async def pump() -> None:
            async for message in client.messages:
                payload = message.payload
                assert isinstance(payload, bytes)
                recorder.messages.append((str(message.topic), payload, message.retain))

        task = asyncio.create_task(pump())
        try:
            yield recorder
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def subprocess_env(state: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a daemon or CLI the tests start: ours, with $STATE_DIRECTORY at
    `state` (where a config without state_dir keeps its buffer), then `env` on top."""
    return {**os.environ, "STATE_DIRECTORY": str(state), **(env or {})}


@dataclass
class Daemon:
    """`m2m-bridge run` as a subprocess, in the config's directory; a config without state_dir
    keeps its buffer in state/ beside it ($STATE_DIRECTORY), never in the checkout."""

    config: Path
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    log_level: str | None = None  # --log-level; None: the CLI's default (info)

    def start(self, env: dict[str, str] | None = None) -> None:
        self.log = self.config.with_suffix(".log")
        level = ["--log-level", self.log_level] if self.log_level else []
        with self.log.open("wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bridge", "--log-json", *level, "run", "-c",
                 str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=self.config.parent,
                env=subprocess_env(self.config.parent / "state", env),
            )

    async def ready(self, timeout: float = WAIT) -> None:
        """Wait for the daemon's readiness line ("bridge started", logged as it tells systemd
        READY=1); fail at once, with its log, if it exits instead."""

        def started() -> bool:
            assert self.process is not None, "not started"
            if '"bridge started"' in self.output():
                return True
            assert self.process.poll() is None, (
                f"daemon exited {self.process.returncode}:\n{self.output()}"
            )
            return False

        await until(started, timeout, lambda: f"the daemon to start; its log:\n{self.output()}")

    def running(self) -> bool:
        """True while the process lives; an AssertionError with its log once it has exited."""
        assert self.process is not None, "not started"
        code = self.process.poll()
        assert code is None, f"daemon exited {code}:\n{self.output()}"
        return True

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float = WAIT) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def output(self) -> str:
        return self.log.read_text() if self.log and self.log.exists() else ""

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines (those named `event` only, if given); other lines are skipped."""
        found = []
        for line in self.output().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and event in (None, record.get("event")):
                    found.append(record)
        return found

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, signal.SIGKILL)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class Daemons:
    """The daemons one test starts (the `daemons` fixture kills those still running)."""

    def __init__(self) -> None:
        self.started: list[Daemon] = []

    def start(
        self, config: Path, env: dict[str, str] | None = None, log_level: str | None = None
    ) -> Daemon:
        daemon = Daemon(config, log_level=log_level)
        daemon.start(env)
        self.started.append(daemon)
        return daemon

    def stop(self) -> None:
        for daemon in self.started:
            daemon.stop()


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 30, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`m2m-bridge ARGS` as a user would run it (from the checkout unless `cwd`), with
    $STATE_DIRECTORY in a directory removed afterwards, so nothing lands in ./state."""
    with tempfile.TemporaryDirectory(prefix="m2m-cli-state-") as state:
        return subprocess.run(
            [sys.executable, "-m", "bridge", *args],
            capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT, check=False,
            env=subprocess_env(Path(state), env),
        )


async def cli(
    *args: str, cwd: Path | None = None, timeout: float = 30, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`run_cli` that does not block the event loop: for a CLI that talks to a server (a
    simulated device) living in the test's own loop."""
    with tempfile.TemporaryDirectory(prefix="m2m-cli-state-") as state:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", *args, cwd=cwd or ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=subprocess_env(Path(state), env),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        finally:
            if proc.returncode is None:  # timed out: not left running
                proc.kill()
                await proc.communicate()
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


def assert_usage_error(r: subprocess.CompletedProcess[str], needle: str) -> None:
    """A usage error as the CLI says them: exit 2, one line on stderr naming `needle`,
    nothing on stdout."""
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stdout == ""


@contextlib.contextmanager
def rtu_line(config: Config, directory: Path, *, baud: int = 19200, line: str = "bus"
             ) -> Iterator[str]:
    """The config's devices on its serial link `line`, served on a pty paced at `baud`: the
    URL the CLI reaches them by."""
    from bridge.sim.serial import SerialSimulator

    sim = SerialSimulator(config, Simulator(config, seed=1), baud=baud, directory=directory,
                          seed=1)
    sim.start()
    try:
        yield f"rtu://{sim.lines[line].path}?baudrate={baud}"
    finally:
        sim.stop()


VOLTAGE = 229.75  # what the `voltage_device` fixture serves


@contextlib.asynccontextmanager
async def simulated(
    config: Path | Config, values: Mapping[str, Mapping[str, Value]] | None = None,
    *, seed: int | None = None,
) -> AsyncIterator[Simulator]:
    """The devices of `config` (a file or a loaded Config) served by the simulator in this
    event loop, with `values` set ({device: {point: value}}); stopped on the way out."""
    sim = Simulator(config if isinstance(config, Config) else load_config(config), seed=seed)
    await sim.start()
    try:
        for device, points in (values or {}).items():
            for point, value in points.items():
                sim.set_value(device, point, value)
        yield sim
    finally:
        await sim.stop()


@dataclass(frozen=True)
class Hangup:
    """An `Answer` that sends `last` (if anything) and then closes the connection."""

    last: bytes = b""


# (transaction id, unit, request PDU) -> the bytes to send; None: hang up without a word.
Answer = Callable[[int, int, bytes], "bytes | Hangup | None"]


@dataclass
class MbapServer:
    """A raw Modbus TCP server on 127.0.0.1, for replies no real slave would send: `answer`
    gives each request's reply, sent in one write (byte by byte with `split`). Records every
    request PDU."""

    answer: Answer
    split: bool = False
    requests: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    @property
    def function_codes(self) -> list[int]:
        return [pdu[0] if pdu else 0 for pdu in self.requests]

    async def start(self, port: int = 0) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    tid, _, length, unit = struct.unpack(">HHHB", await reader.readexactly(7))
                    pdu = await reader.readexactly(max(0, length - 1))
                    self.requests.append(pdu)
                    out = self.answer(tid, unit, pdu)
                    data = out.last if isinstance(out, Hangup) else out or b""
                    chunks = [data[i : i + 1] for i in range(len(data))] if self.split else [data]
                    for chunk in chunks:
                        writer.write(chunk)
                        await writer.drain()
                    if not isinstance(out, bytes):  # None or Hangup
                        break
        finally:  # also when the test's loop cancels it: else its socket outlives the loop
            writer.close()


@dataclass(frozen=True)
class Pki:
    """A test CA, a server certificate for 127.0.0.1, a client certificate, and a CA that
    signed none of them (for "wrong CA" tests). Made with the openssl command line."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def make_pki(directory: Path) -> Pki:
    """Generate a Pki in `directory` (RSA 2048, valid two days)."""
    directory.mkdir(parents=True, exist_ok=True)
    openssl = shutil.which("openssl") or "openssl"

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True)

    def self_signed(name: str, cn: str) -> None:
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={cn}",
            "-keyout", f"{name}.key", "-out", f"{name}.pem")

    def signed(name: str, cn: str, ext: str) -> None:
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        (directory / f"{name}.ext").write_text(ext)
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext")

    self_signed("ca", "m2m-bridge test CA")
    self_signed("other-ca", "some other CA")
    signed("server", "127.0.0.1",
           "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    signed("client", "bridge", "extendedKeyUsage=clientAuth\n")
    for key in directory.glob("*.key"):
        key.chmod(0o600)
    return Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        other_ca=directory / "other-ca.pem",
    )


@contextlib.contextmanager
def mosquitto_tls(
    tmp: Path, pki: Pki, users: dict[str, str], acl: str, port: int | None = None
) -> Iterator[Broker]:
    """A broker with only a TLS listener on 127.0.0.1 that requires a client certificate
    signed by `pki.ca`, a password file of `users` (name: password) and the ACL text `acl`;
    anonymous clients are refused."""
    port = port or free_port()
    data = tmp / "mosquitto-tls"
    data.mkdir(exist_ok=True)
    passwords = data / "passwd"
    passwords.write_text("")
    exe = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    for user, password in users.items():
        subprocess.run([exe, "-b", str(passwords), user, password], check=True,
                       capture_output=True)
    acl_file = data / "acl"
    acl_file.write_text(acl)
    user = "user root\n" if os.geteuid() == 0 else ""
    conf = data / f"mosquitto-{port}.conf"
    conf.write_text(
        f"{user}per_listener_settings false\nallow_anonymous false\n"
        f"password_file {passwords}\nacl_file {acl_file}\n"
        f"listener {port} 127.0.0.1\ncafile {pki.ca}\ncertfile {pki.server_cert}\n"
        f"keyfile {pki.server_key}\nrequire_certificate true\n"
        f"log_dest file {data}/{port}.log\nlog_type error\nlog_type warning\n"
        f"log_type notice\nlog_type information\n"
    )
    with _running(Broker(port, conf)) as broker:
        yield broker


@dataclass
class Socat:
    """`socat` joining two ptys, reachable as tmp/<a> and tmp/<b> (stable symlinks)."""

    a: Path
    b: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        for path in (self.a, self.b):  # a killed socat leaves its links behind
            path.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            ["socat", "-d", "-d", f"pty,raw,echo=0,link={self.a}",
             f"pty,raw,echo=0,link={self.b}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        process = self.process

        def created() -> bool:
            assert process.poll() is None, "socat exited"
            return self.a.exists() and self.b.exists()

        wait_until(created, what="socat to create its ptys", every=0.01)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None
        with contextlib.suppress(AssertionError):  # socat removes its links on the way out
            wait_until(lambda: not (self.a.exists() or self.b.exists()), 5, every=0.01)
        self.a.unlink(missing_ok=True)
        self.b.unlink(missing_ok=True)

    def __enter__(self) -> Socat:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def kill(self) -> None:
        """Close the line abruptly, as an unplugged USB converter does (links stay behind)."""
        if self.process is not None:
            stop_process(self.process, signal.SIGKILL)
        self.process = None
