"""Broker sessions: one interface over the two MQTT clients the publisher may use.

MQTT 5 runs on `bridge.mqtt.wire.WireClient` (the `mqtt5` codec under a thin asyncio
transport): a batch is one buffered write and one future, about 6 µs of CPU a message.
MQTT 3.1.1, which `mqtt5` does not speak, runs on aiomqtt: an awaited future per publish,
about 90 µs a message (DESIGN.md's performance model asks for the faster path where aiomqtt
cannot meet the targets). Everything above this module sees `Session` and `Incoming` only.
`mqtt.protocol: auto` (the default) starts with MQTT 5; the caller (bridge.mqtt.connection)
moves to 3.1.1 when a broker answers with VersionRefused. aiomqtt and paho are imported on
that path only: a daemon on an MQTT 5 broker never loads them (~1.8 MiB of RSS, bench/rss.py).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import TYPE_CHECKING, Literal, Protocol

from bridge.core.messages import Message
from bridge.errors import BrokerError
from bridge.mqtt.wire import Incoming, WindowFull, WireClient, WireError
from bridge.mqtt.wireevents import VersionRefused

if TYPE_CHECKING:
    import aiomqtt

    from bridge.config import MqttSettings

Version = Literal[5, "3.1.1"]
# A last will: (topic, payload, qos, retain). A bare topic is a retained `offline` there.
Will = tuple[str, bytes, int, bool]

# aiomqtt: messages in flight per gather. aiomqtt and paho scan their pending maps per message,
# so the cost per message grows with this (profiled: 500 cost twice what 64 does).
AIOMQTT_BATCH = 64
WIRE_BATCH = 500  # one write and one future per batch; the broker's Receive Maximum paces it
PUBLISH_TIMEOUT = 30.0  # aiomqtt's per-call timeout: a batch unacknowledged this long failed


class Session(Protocol):
    """One live broker connection, as the publisher uses it."""

    batch: int  # messages the publisher hands over at once

    async def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool,
        *, correlation_data: bytes | None = None,
    ) -> None: ...

    async def publish_batch(self, messages: Sequence[Message]) -> None: ...

    async def subscribe(self, topics: Sequence[str]) -> None: ...

    def incoming(self) -> AsyncIterator[Incoming]: ...


def first_version(settings: MqttSettings) -> Version:
    """The MQTT version to try first: 5, unless the setting pins 3.1.1."""
    return "3.1.1" if settings.protocol == "3.1.1" else 5


@asynccontextmanager
async def open_session(
    settings: MqttSettings, will: str | Will, *, version: Version | None = None
) -> AsyncIterator[Session]:
    """Connect with `will` (a topic: a retained `offline` there; or a whole Will, such as
    Sparkplug's NDEATH); disconnect cleanly on exit, which makes the broker drop the will.

    `version` overrides what `settings.protocol` asks for (an `auto` that fell back). A broker
    that does not speak MQTT 5 raises VersionRefused.
    """
    topic, payload, qos, retain = (will, b"offline", 1, True) if isinstance(will, str) else will
    if (version or first_version(settings)) == 5:
        client = WireClient(
            host=settings.host,
            port=settings.port,
            client_id=settings.client_id,
            username=settings.username,
            password=settings.password.get_secret_value() if settings.password else None,
            ssl=tls_context(settings) if settings.tls is not None else None,
            keepalive=max(1, round(settings.keepalive)),
            will=(topic, payload, qos, retain),
        )
        await client.connect()
        try:
            yield _WireSession(client)
        except BaseException:
            client.abort()  # the connection is broken or we are cancelled: no goodbye
            raise
        with suppress(WireError):
            await client.disconnect()  # a clean DISCONNECT: the broker drops the will
        return
    import aiomqtt  # noqa: PLC0415 - MQTT 3.1.1 only (see the module docstring)

    last_will = aiomqtt.Will(topic, payload, qos=qos, retain=retain)
    with _mapped_errors():
        async with make_client(settings, will=last_will, version="3.1.1") as aio:
            yield _AiomqttSession(aio)


@contextmanager
def _mapped_errors() -> Iterator[None]:
    """aiomqtt's errors as ours (httpcore's map_exceptions): nothing above sees aiomqtt."""
    import aiomqtt  # noqa: PLC0415 - MQTT 3.1.1 only (see the module docstring)
    from aiomqtt.exceptions import MqttConnectError  # noqa: PLC0415 - as aiomqtt
    from paho.mqtt.reasoncodes import ReasonCode  # noqa: PLC0415 - as aiomqtt

    try:
        yield
    except aiomqtt.MqttError as exc:
        code = None
        if isinstance(exc, MqttConnectError):
            code = exc.rc.value if isinstance(exc.rc, ReasonCode) else exc.rc
        raise WireError(str(exc), reason_code=code) from exc  # the cause keeps TLS details


class _WireSession:
    batch = WIRE_BATCH

    def __init__(self, client: WireClient) -> None:
        self.client = client

    async def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool,
        *, correlation_data: bytes | None = None,
    ) -> None:
        if correlation_data is None:
            await self.client.publish_batch([(topic, payload, qos, retain)])
            return
        while True:  # a reply: carry the correlation data; no need to await its PUBACK
            try:
                self.client.publish_nowait(
                    topic, payload, qos, retain, correlation_data=correlation_data
                )
                return
            except WindowFull:
                await self.client.wait_window()

    async def publish_batch(self, messages: Sequence[Message]) -> None:
        await self.client.publish_batch(messages)  # a Message is an Outgoing as it is

    async def subscribe(self, topics: Sequence[str]) -> None:
        if topics:
            await self.client.subscribe(topics, qos=1)

    def incoming(self) -> AsyncIterator[Incoming]:
        return self.client.incoming()


class _AiomqttSession:
    batch = AIOMQTT_BATCH

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client

    async def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool,
        *, correlation_data: bytes | None = None,
    ) -> None:
        # MQTT 3.1.1 has no properties: a reply's correlation data cannot travel.
        with _mapped_errors():
            await self.client.publish(topic, payload, qos, retain)

    async def publish_batch(self, messages: Sequence[Message]) -> None:
        with _mapped_errors():
            await asyncio.gather(
                *(self.client.publish(m.topic, m.payload, m.qos, m.retain) for m in messages)
            )

    async def subscribe(self, topics: Sequence[str]) -> None:
        with _mapped_errors():
            for topic in topics:
                await self.client.subscribe(topic, qos=1)

    async def incoming(self) -> AsyncIterator[Incoming]:
        with _mapped_errors():
            async for message in self.client.messages:
                yield _incoming(message)


def _incoming(message: aiomqtt.Message) -> Incoming:
    payload = message.payload
    if isinstance(payload, str):
        payload = payload.encode()
    elif not isinstance(payload, bytes | bytearray):
        payload = b"" if payload is None else str(payload).encode()
    return Incoming(str(message.topic), bytes(payload), None, None, message.retain)


def make_client(
    settings: MqttSettings, *, will: aiomqtt.Will | None = None, version: Version | None = None
) -> aiomqtt.Client:
    """An aiomqtt client for `settings` (also used by the demo); `auto` is MQTT 5 here."""
    import aiomqtt  # noqa: PLC0415 - MQTT 3.1.1 only (see the module docstring)
    from paho.mqtt.enums import MQTTProtocolVersion  # noqa: PLC0415 - as aiomqtt

    tls = tls_context(settings) if settings.tls is not None else None
    v5 = (version or first_version(settings)) == 5
    protocol = MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311
    password = settings.password.get_secret_value() if settings.password else None
    client = aiomqtt.Client(
        settings.host,
        settings.port,
        username=settings.username,
        password=password,
        identifier=settings.client_id,
        protocol=aiomqtt.ProtocolVersion(protocol.value),
        will=will,
        keepalive=max(1, round(settings.keepalive)),
        tls_context=tls,
        max_inflight_messages=AIOMQTT_BATCH,
        timeout=PUBLISH_TIMEOUT,
    )
    # aiomqtt warns past 10 pending publishes; we keep a batch in flight on purpose.
    client.pending_calls_threshold = 2 * AIOMQTT_BATCH
    return client


def tls_context(settings: MqttSettings) -> ssl.SSLContext:
    """The TLS context for `settings.tls`: verification always on, client cert if given.

    Files are read at every connect, so renewed certificates are picked up. A file that cannot
    be loaded raises BrokerError naming the setting and the file (never a key's contents).
    """
    assert settings.tls is not None
    tls = settings.tls
    try:
        context = ssl.create_default_context(cafile=tls.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerError(f"mqtt.tls.ca_file {tls.ca_file}: cannot load: {_reason(exc)}") from None
    if tls.cert_file:
        try:
            # A callback that gives no passphrase: never prompt on a terminal for one.
            context.load_cert_chain(tls.cert_file, tls.key_file, password=lambda: b"")
        except (OSError, ssl.SSLError) as exc:
            files = ", ".join(f for f in (tls.cert_file, tls.key_file) if f)
            raise BrokerError(
                f"mqtt.tls.cert_file/key_file {files}: cannot load: {_reason(exc)}"
            ) from None
    return context


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)


# CONNACK codes that mean "your credentials were refused": MQTT 3.1.1 return codes 4 and 5,
# MQTT 5 reason codes 0x86 (bad user name or password) and 0x87 (not authorized).
_LOGIN_REFUSED = frozenset({4, 5, 0x86, 0x87})


def describe_connect_failure(exc: BaseException) -> tuple[str, str]:
    """(log event, reason) for a failed broker connection, naming what an operator must fix.

    A wrong CA (or a broker certificate for another host) and a refused login are told apart
    from an unreachable broker: retrying will not fix them, a config change will.
    """
    seen: BaseException | None = exc
    for _ in range(5):  # the ssl error is aiomqtt's __context__ or __cause__
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError):
            why = seen.verify_message or seen.reason or str(seen)
            return (
                "broker certificate verification failed",
                f"certificate verify failed: {why} (check mqtt.tls.ca_file and mqtt.host)",
            )
        if isinstance(seen, ssl.SSLError):
            return "broker TLS handshake failed", f"{seen.reason or seen}"
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, VersionRefused):
        return (
            "broker does not speak MQTT 5",
            f"{exc}; mqtt.protocol is 5: set it to auto (or 3.1.1) for this broker",
        )
    if isinstance(exc, WireError):
        if exc.reason_code in _LOGIN_REFUSED:
            return (
                "broker refused login",
                f"{exc} (check mqtt.username and the password it is given)",
            )
        if exc.reason_code is not None:
            return "broker refused connection", str(exc)
        return "broker unreachable", str(exc)
    if isinstance(exc, BrokerError):
        return "broker settings unusable", str(exc)
    return "broker unreachable", str(exc)


