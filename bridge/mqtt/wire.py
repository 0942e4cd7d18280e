"""A thin MQTT 5 client: an asyncio.Protocol over the `mqtt5` sans-IO codec.

Why it exists (DESIGN.md "Performance model"): an awaited future per publish costs far more CPU
than building the packet. Here a PUBLISH is built by `mqtt5` (Rust) and appended to one
outgoing buffer; the buffer goes to the transport in ONE `write` per loop iteration, and
acknowledgements are tracked in bulk: one future per batch, a dict from packet id to batch.

Shape:

- One `WireClient` is one connection (clean start, no session kept): `connect()`, then
  `publish_batch()` / `publish_nowait()`, `subscribe()` + `incoming()`, `disconnect()`.
  To reconnect, make a new client; nothing in flight is carried over (the caller's buffer
  keeps unacknowledged messages and requeues them).
- QoS 1 messages in flight are capped by the broker's Receive Maximum (from CONNACK).
- MQTT 5 only; QoS 0 and 1 only (QoS 2 is neither sent nor accepted).
- Errors are `WireError` (a `BrokerError`), one line, naming the OS/TLS reason or the MQTT
  reason code (`broker refused the connection: not authorized (135)`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os as _os
import socket as _socket
import ssl as _ssl
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import mqtt5
from mqtt5 import (
    ConnAckPacket,
    ConnectPacket,
    DisconnectPacket,
    PingReqPacket,
    PingRespPacket,
    PubAckPacket,
    PublishPacket,
    QoS,
    SubAckPacket,
    SubscribePacket,
    TopicFilter,
    Will,
)

from bridge.errors import BrokerError

__all__ = ["Incoming", "WindowFull", "WireClient", "WireError"]

_QOS: Final = (QoS.AT_MOST_ONCE, QoS.AT_LEAST_ONCE)
_QOS1: Final = QoS.AT_LEAST_ONCE
_MAX_PACKET_ID: Final = 65535
MAX_INCOMING: Final = 1 << 20  # bytes; announced in CONNECT, so the broker sends nothing larger
_FAILURE: Final = 0x80  # MQTT 5: reason codes >= 0x80 are failures
_QUICKACK: Final[int | None] = getattr(_socket, "TCP_QUICKACK", None)  # Linux only
_INET: Final = (_socket.AF_INET, _socket.AF_INET6)


class WireError(BrokerError):
    """The broker refused us, broke the protocol, or the connection failed or was lost.

    `reason_code` is the MQTT 5 reason code when the broker gave one (CONNACK, PUBACK,
    SUBACK, DISCONNECT), else None (socket, TLS, timeout, keepalive).
    """

    def __init__(self, message: str, *, reason_code: int | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class WindowFull(Exception):  # a signal, not a failure: await wait_window()
    """`publish_nowait` of a QoS 1 message while the broker's Receive Maximum is reached."""


@dataclass(frozen=True, slots=True)
class Incoming:
    """A PUBLISH the broker sent us (a command). QoS 1 ones were PUBACKed on receipt."""

    topic: str
    payload: bytes
    response_topic: str | None
    correlation_data: bytes | None
    retain: bool = False


class _ReasonCode(Protocol):
    """mqtt5's reason-code enums (Rust classes: `int()` and `.name`, not int subclasses)."""

    @property
    def name(self) -> str: ...
    def __int__(self) -> int: ...


def _describe(code: _ReasonCode) -> str:
    """`not authorized (135)` from an mqtt5 reason code."""
    return f"{code.name.lower().replace('_', ' ')} ({int(code)})"


def _os_reason(exc: BaseException) -> str:
    """One line for a socket/TLS failure: the verify message, SSL reason or OS error."""
    if isinstance(exc, _ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message or exc.reason or exc}"
    if isinstance(exc, _ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, _socket.gaierror) and exc.strerror:
        return exc.strerror
    if isinstance(exc, OSError) and exc.errno and exc.errno > 0:
        return _os.strerror(exc.errno)  # asyncio's "Connect call failed (...)" names no cause
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _frame_size(buf: bytes | bytearray, off: int) -> int | None:
    """Total size of the MQTT frame at `off` if its fixed header is complete, else None."""
    end = len(buf)
    pos, length, shift = off + 1, 0, 0
    while pos < end and shift <= 21:
        byte = buf[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return pos - off + length
        shift += 7
    return None


class _Batch:
    """Acknowledgement bookkeeping for one publish_batch: one future, a countdown."""

    __slots__ = ("error", "future", "remaining")

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future
        self.remaining = 1  # the guard: released once every message of the batch is sent
        self.error: WireError | None = None

    def settle_one(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.settle_one_more()

    def settle_one_more(self) -> None:
        """Every message is settled: resolve the future (unless its waiter gave up)."""
        if not self.future.done():
            if self.error is None:
                self.future.set_result(None)
            else:
                self.future.set_exception(self.error)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen so asyncio does not log it when nobody awaits it."""
    if not future.cancelled():
        future.exception()


class WireClient(asyncio.Protocol):
    """An MQTT 5 client connection (see the module docstring). Not thread-safe; no threads."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        ssl: _ssl.SSLContext | None = None,
        keepalive: int = 30,
        will: tuple[str, bytes, int, bool] | None = None,
        receive_maximum_hint: int = 1000,
        connect_timeout: float = 10.0,
        on_puback: Callable[[int, int], None] | None = None,
    ) -> None:
        """`receive_maximum_hint` is the Receive Maximum we announce (incoming QoS 1 in
        flight). `on_puback(packet_id, reason_code)` is told of acknowledgements of messages
        sent with `publish_nowait` (publish_batch reports its own)."""
        if will is not None and will[2] not in (0, 1):
            raise ValueError(f"will qos must be 0 or 1, not {will[2]}")
        self.host, self.port, self.client_id = host, port, client_id
        self._username, self._password, self._ssl = username, password, ssl
        self.keepalive = keepalive
        self._will = will
        self._receive_maximum_hint = max(1, min(receive_maximum_hint, _MAX_PACKET_ID))
        self._connect_timeout = connect_timeout
        self._on_puback = on_puback

        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] | None = None
        self._connack: asyncio.Future[ConnAckPacket] | None = None
        self._connected = False
        self._disconnecting = False
        self._error: WireError | None = None

        # Outgoing: one buffer, one write per loop iteration.
        self._out = bytearray()
        self._flush_handle: asyncio.Handle | None = None
        self._last_sent = self._last_received = 0.0

        # QoS 1 in flight: packet id -> its batch (None: sent by publish_nowait).
        self._inflight: dict[int, _Batch | None] = {}
        self._subacks: dict[int, asyncio.Future[SubAckPacket]] = {}
        self._next_id = 1
        self.window = 65535  # the broker's Receive Maximum, set from CONNACK
        self.max_packet_size: int | None = None
        self._max_qos = 1
        self._retain_available = True
        self._window_waiters: list[asyncio.Future[None]] = []
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._paused = False
        self._down = False
        self._sock: _socket.socket | None = None
        self._quickack = 0

        # Incoming.
        self._inbuf = bytearray()
        self._incoming: asyncio.Queue[Incoming | None] = asyncio.Queue()

        # Keepalive.
        self._ping_deadline: float | None = None
        self._keepalive_handle: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ connection

    async def connect(self) -> None:
        """Open TCP (+TLS), send CONNECT (clean start), wait for a successful CONNACK."""
        if self._loop is not None:
            raise RuntimeError("a WireClient connects once; make a new one to reconnect")
        loop = self._loop = asyncio.get_running_loop()
        self.closed = loop.create_future()
        self.closed.add_done_callback(_retrieve)
        self._connack = loop.create_future()
        self._connack.add_done_callback(_retrieve)
        where = f"{self.host}:{self.port}"
        try:
            async with asyncio.timeout(self._connect_timeout):
                await loop.create_connection(
                    lambda: self, self.host, self.port, ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                )
                self._send(self._connect_packet())
                self._flush()
                connack = await self._connack
        except TimeoutError:
            error = WireError(
                f"cannot connect to {where}: no answer within {self._connect_timeout:g}s"
            )
            self._fail(error)
            raise error from None
        except WireError as exc:  # the connection dropped before CONNACK
            error = WireError(f"cannot connect to {where}: {exc}", reason_code=exc.reason_code)
            self._fail(error)
            raise error from None
        except (OSError, _ssl.SSLError) as exc:
            error = WireError(f"cannot connect to {where}: {_os_reason(exc)}")
            self._fail(error)
            raise error from exc  # the cause tells a certificate problem from a refusal
        except BaseException:
            self._fail(WireError("connect cancelled"))
            raise
        if int(connack.reason_code) >= _FAILURE:
            why = _describe(connack.reason_code)
            detail = f": {connack.reason_str}" if connack.reason_str else ""
            error = WireError(
                f"broker refused the connection: {why}{detail}",
                reason_code=int(connack.reason_code),
            )
            self._fail(error)
            raise error

    def _connect_packet(self) -> bytes:
        will = None
        if self._will is not None:
            topic, payload, qos, retain = self._will
            will = Will(topic, payload=payload, qos=_QOS[qos], retain=retain)
        return ConnectPacket(
            self.client_id,
            username=self._username,
            password=self._password.encode() if self._password is not None else None,
            clean_start=True,
            will=will,
            keep_alive=self.keepalive,
            receive_max=self._receive_maximum_hint,
            max_packet_size=MAX_INCOMING,
        ).write()

    async def disconnect(self) -> None:
        """Send DISCONNECT (normal: the broker drops the will) and close the connection."""
        if self._transport is None or self._disconnecting:
            return
        self._disconnecting = True
        if self._connected and not self._transport.is_closing():
            self._send(DisconnectPacket().write())
            self._flush()
        self._transport.close()
        assert self.closed is not None
        with contextlib.suppress(TimeoutError, WireError):
            async with asyncio.timeout(5):
                await asyncio.shield(self.closed)
        if self._transport is not None:
            self._transport.abort()

    def abort(self) -> None:
        """Drop the connection at once, without DISCONNECT: the broker publishes the will."""
        self._abort()

    async def wait_closed(self) -> None:
        """Return when the connection is gone: None after disconnect(), else WireError."""
        if self.closed is None:
            raise RuntimeError("not connected")
        await asyncio.shield(self.closed)

    @property
    def is_connected(self) -> bool:
        return self._connected and self._error is None and not self._disconnecting

    @property
    def in_flight(self) -> int:
        """QoS 1 messages sent and not yet acknowledged."""
        return len(self._inflight)

    # ------------------------------------------------------------------ publishing

    def publish_nowait(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        *,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
    ) -> int | None:
        """Queue one PUBLISH for this loop iteration's write; the packet id for QoS 1.

        Raises WindowFull when the broker's Receive Maximum of QoS 1 messages is in flight
        (await `wait_window()` and try again), WireError when not connected. The PUBACK is
        reported to `on_puback`; `wait_acked()` waits until nothing is in flight.
        """
        if not self.is_connected:
            raise self._error or WireError("not connected")
        if qos and len(self._inflight) >= self.window:
            raise WindowFull(f"{len(self._inflight)} QoS 1 messages in flight")
        self._check(qos, retain)
        packet_id = self._allocate() if qos else None
        data = PublishPacket(
            topic, payload, qos=_QOS[qos], retain=retain, packet_id=packet_id,
            response_topic=response_topic, correlation_data=correlation_data,
        ).write()
        self._check_size(data)
        if packet_id is not None:
            self._inflight[packet_id] = None
        self._send(data)
        return packet_id

    async def publish_batch(self, messages: Sequence[tuple[str, bytes, int, bool]]) -> None:
        """Publish (topic, payload, qos, retain) messages in order; return when every QoS 1
        one is PUBACKed (QoS 0 ones: once handed to the transport).

        Respects the broker's Receive Maximum (waits for room mid-batch). A PUBACK with a
        failure reason code, or the connection failing, raises WireError for the whole batch
        (after every message of it was settled, or at once when the connection is lost): the
        caller requeues the batch; duplicates are possible, as with any QoS 1.
        """
        if not self.is_connected:
            raise self._error or WireError("not connected")
        if self._paused:
            await self.wait_window()
        loop = self._live_loop()
        batch = _Batch(loop.create_future())
        batch.future.add_done_callback(_retrieve)  # failed by a lost connection, unawaited
        inflight = self._inflight
        window = self.window
        out = self._out
        max_size = self.max_packet_size
        allocate = self._allocate
        subacks = self._subacks
        if self._max_qos < 1 or not self._retain_available:  # a broker that limits these
            self._check_all(messages)
        if self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)
        try:
            for topic, payload, qos, retain in messages:
                if qos == 1:
                    if len(inflight) >= window:
                        await self.wait_window()
                        out = self._out
                    packet_id = self._next_id
                    if packet_id in inflight or packet_id in subacks:
                        packet_id = allocate()
                    else:
                        self._next_id = packet_id % 65535 + 1
                    data = PublishPacket(
                        topic, payload, qos=_QOS1, retain=retain, packet_id=packet_id
                    ).write()
                    if max_size is not None and len(data) > max_size:
                        self._check_size(data)  # raises, before the id is taken
                    inflight[packet_id] = batch
                    batch.remaining += 1
                else:
                    if qos:
                        self._check(qos, retain)  # raises: neither 0 nor 1
                    data = PublishPacket(topic, payload, retain=retain).write()
                    if max_size is not None and len(data) > max_size:
                        self._check_size(data)
                out += data
                if self._flush_handle is None:  # a window wait flushed the buffer
                    self._flush_handle = loop.call_soon(self._flush)
        except BaseException:
            # Messages already sent stay in flight (their acks are tracked); this batch's
            # future is nobody's any more.
            batch.future.cancel()
            raise
        batch.settle_one()  # release the guard
        if batch.future.done():
            batch.future.result()  # all QoS 0 (or every ack already in): raise if failed
            self._flush()
            return
        await batch.future

    async def wait_window(self) -> None:
        """Return when a QoS 1 message may be sent and the transport is not paused."""
        while self.is_connected and (len(self._inflight) >= self.window or self._paused):
            assert self._loop is not None
            self._flush()
            waiter = self._loop.create_future()
            self._window_waiters.append(waiter)
            await waiter
        if not self.is_connected:
            raise self._error or WireError("not connected")

    async def wait_acked(self) -> None:
        """Return when no QoS 1 message is in flight (WireError if the connection drops)."""
        while self._inflight and self.is_connected:
            assert self._loop is not None
            self._flush()
            waiter = self._loop.create_future()
            self._idle_waiters.append(waiter)
            await waiter
        if self._inflight:
            raise self._error or WireError("not connected")

    def _check(self, qos: int, retain: bool) -> None:
        if qos not in (0, 1):
            raise ValueError(f"qos must be 0 or 1, not {qos}")
        if qos > self._max_qos:
            raise WireError(f"the broker accepts at most QoS {self._max_qos}")
        if retain and not self._retain_available:
            raise WireError("the broker does not accept retained messages")

    def _live_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise WireError("not connected")
        return self._loop

    def _check_all(self, messages: Sequence[tuple[str, bytes, int, bool]]) -> None:
        for _, _, qos, retain in messages:
            self._check(qos, retain)

    def _check_size(self, data: bytes) -> None:
        if self.max_packet_size is not None and len(data) > self.max_packet_size:
            raise WireError(
                f"a message of {len(data)} bytes exceeds the broker's maximum packet size"
                f" of {self.max_packet_size}"
            )

    def _allocate(self) -> int:
        """The next packet id not in use (1..65535, wrapping)."""
        packet_id = self._next_id
        inflight, subacks = self._inflight, self._subacks
        while packet_id in inflight or packet_id in subacks:
            packet_id = packet_id % _MAX_PACKET_ID + 1
        self._next_id = packet_id % _MAX_PACKET_ID + 1
        return packet_id

    def _send(self, data: bytes) -> None:
        self._out += data
        if self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Hand the outgoing buffer to the transport: one write."""
        self._flush_handle = None
        if not self._out:
            return
        transport = self._transport
        if transport is None or transport.is_closing():
            self._out = bytearray()
            return
        # The transport may keep a reference to what it is given: hand it over, start anew.
        data, self._out = self._out, bytearray()
        transport.write(data)
        if self._loop is not None:
            self._last_sent = self._loop.time()

    # ------------------------------------------------------------------ subscribing

    async def subscribe(self, topics: Sequence[str], qos: int = 1) -> None:
        """One SUBSCRIBE for `topics`; wait for the SUBACK; any failure code → WireError."""
        if qos not in (0, 1):
            raise ValueError(f"qos must be 0 or 1, not {qos}")
        if not topics:
            return
        if not self.is_connected:
            raise self._error or WireError("not connected")
        assert self._loop is not None
        packet_id = self._allocate()
        waiter: asyncio.Future[SubAckPacket] = self._loop.create_future()
        self._subacks[packet_id] = waiter
        try:
            self._send(SubscribePacket(
                packet_id, [TopicFilter(topic, max_qos=_QOS[qos]) for topic in topics]
            ).write())
            suback = await waiter
        finally:
            self._subacks.pop(packet_id, None)
        refused = [
            f"{topic}: {_describe(code)}"
            for topic, code in zip(topics, suback.reason_codes, strict=False)
            if int(code) >= _FAILURE
        ]
        if len(suback.reason_codes) != len(topics):
            refused.append(f"{len(suback.reason_codes)} reason codes for {len(topics)} topics")
        if refused:
            codes = [int(c) for c in suback.reason_codes if int(c) >= _FAILURE]
            raise WireError(
                "broker refused the subscription: " + "; ".join(refused),
                reason_code=codes[0] if codes else None,
            )

    async def incoming(self) -> AsyncIterator[Incoming]:
        """Messages on our subscriptions, in arrival order. Ends after disconnect(); raises
        WireError when the connection is lost. One consumer at a time."""
        while True:
            item = await self._incoming.get()
            if item is None:
                self._incoming.put_nowait(None)  # let a later iterator end too
                if self._error is not None and not self._disconnecting:
                    raise self._error
                return
            yield item

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if _QUICKACK is not None and sock is not None and sock.family in _INET:
            self._sock, self._quickack = sock, _QUICKACK
        if self._loop is None:  # driven by hand (tests): adopt the running loop
            self._loop = asyncio.get_running_loop()
            self.closed = self._loop.create_future()
            self.closed.add_done_callback(_retrieve)
            self._connack = self._loop.create_future()
            self._connack.add_done_callback(_retrieve)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._error is None:
            if self._disconnecting:
                self._error = WireError("disconnected")
            elif exc is not None:
                self._error = WireError(f"connection to the broker lost: {_os_reason(exc)}")
            else:
                self._error = WireError("connection closed by the broker")
        self._shutdown()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake(self._window_waiters)

    def data_received(self, data: bytes) -> None:
        inbuf = self._inbuf
        buf: bytes | bytearray
        if inbuf:
            inbuf += data
            buf = inbuf
        else:
            buf = data
        end = len(buf)
        off = 0
        read = mqtt5.read
        if self._loop is not None:
            self._last_received = self._loop.time()
        inflight = self._inflight
        with memoryview(buf) as view:
            while off < end and self._error is None:
                try:
                    packet, size = read(view[off:])
                except IndexError:  # mqtt5: "Not enough bytes"
                    if self._incomplete(buf, off):
                        break  # wait for more bytes
                    return
                except ValueError as exc:
                    self._fail(WireError(f"malformed packet from the broker: {exc}"))
                    return
                off += size
                if type(packet) is PubAckPacket:
                    # the hot path, inlined: a successful ack of a batch's message
                    packet_id = packet.packet_id
                    if packet_id not in inflight:
                        continue  # not ours (settled when a connection was lost)
                    batch = inflight.pop(packet_id)
                    if batch is not None and int(packet.reason_code) < _FAILURE:
                        batch.remaining -= 1
                        if batch.remaining == 0:
                            batch.settle_one_more()
                    else:
                        self._on_ack(packet, batch)
                else:
                    self._on_packet(packet)
        if self._sock is not None:
            # Acknowledge at once: a broker with Nagle on (mosquitto's default) holds its
            # next PUBACKs until our TCP ACK, which Linux would delay by up to 40 ms.
            with contextlib.suppress(OSError):
                self._sock.setsockopt(_socket.IPPROTO_TCP, self._quickack, 1)
        if buf is inbuf:
            del inbuf[:off]
        elif off < end:
            inbuf += data[off:]
        if self._window_waiters and len(self._inflight) < self.window:
            self._wake(self._window_waiters)
        if self._idle_waiters and not self._inflight:
            self._wake(self._idle_waiters)

    def _incomplete(self, buf: bytes | bytearray, off: int) -> bool:
        """After mqtt5.read found too few bytes at `off`: True to wait for more, False when
        the packet is malformed or too large (the connection is failed)."""
        frame = _frame_size(buf, off)
        if frame is None:
            return True
        if frame <= len(buf) - off:  # all of it is here: its fields claim more than it holds
            self._fail(WireError("malformed packet from the broker: truncated"))
            return False
        if frame > MAX_INCOMING:
            self._fail(WireError(f"broker sent a {frame}-byte packet; we accept {MAX_INCOMING}"))
            return False
        return True

    def eof_received(self) -> bool | None:
        return None  # close the transport

    # ------------------------------------------------------------------ incoming packets

    def _on_ack(self, packet: PubAckPacket, batch: _Batch | None) -> None:
        """A PUBACK for a publish_nowait message, or one with a failure code."""
        packet_id = packet.packet_id
        code = int(packet.reason_code)
        if batch is None:
            if self._on_puback is not None:
                self._on_puback(packet_id, code)
            return
        if code >= _FAILURE and batch.error is None:
            detail = f": {packet.reason_str}" if packet.reason_str else ""
            batch.error = WireError(
                f"broker refused a message: {_describe(packet.reason_code)}{detail}",
                reason_code=code,
            )
        batch.settle_one()

    def _on_packet(self, packet: mqtt5.Packet) -> None:
        if isinstance(packet, PublishPacket):
            if packet.qos == QoS.AT_LEAST_ONCE and packet.packet_id is not None:
                self._send(PubAckPacket(packet.packet_id).write())
            elif packet.qos == QoS.EXACTLY_ONCE:
                self._fail(WireError("broker sent a QoS 2 message; we subscribe with QoS 1"))
                return
            self._incoming.put_nowait(Incoming(
                packet.topic, packet.payload, packet.response_topic, packet.correlation_data,
                packet.retain,
            ))
        elif isinstance(packet, PingRespPacket):
            self._ping_deadline = None
        elif isinstance(packet, SubAckPacket):
            waiter = self._subacks.get(packet.packet_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(packet)
        elif isinstance(packet, ConnAckPacket):
            self._on_connack(packet)
        elif isinstance(packet, DisconnectPacket):
            why = _describe(packet.reason_code)
            detail = f": {packet.reason_str}" if packet.reason_str else ""
            self._fail(WireError(
                f"broker disconnected us: {why}{detail}", reason_code=int(packet.reason_code)
            ))
        elif isinstance(packet, PingReqPacket):
            self._send(PingRespPacket().write())
        else:
            name = type(packet).__name__
            self._fail(WireError(f"unexpected {name} from the broker"))

    def _on_connack(self, packet: ConnAckPacket) -> None:
        if self._connack is None or self._connack.done():
            self._fail(WireError("unexpected CONNACK from the broker"))
            return
        if int(packet.reason_code) < _FAILURE:
            self.window = max(1, packet.receive_max)
            self.max_packet_size = packet.max_packet_size
            self._max_qos = min(1, int(packet.max_qos))
            self._retain_available = packet.retain_available
            if packet.server_keep_alive is not None:
                self.keepalive = packet.server_keep_alive
            self._connected = True
            if self._loop is not None:
                self._last_received = self._loop.time()
            self._schedule_keepalive(self.keepalive)
        self._connack.set_result(packet)

    # ------------------------------------------------------------------ keepalive

    def _schedule_keepalive(self, delay: float) -> None:
        if self.keepalive > 0 and self._loop is not None:
            self._keepalive_handle = self._loop.call_later(max(delay, 0.05), self._tick)

    def _tick(self) -> None:
        """PINGREQ after `keepalive` s idle; the connection is lost `keepalive` s later."""
        self._keepalive_handle = None
        if self._error is not None or self._loop is None:
            return
        now = self._loop.time()
        if self._ping_deadline is not None and now >= self._ping_deadline:
            self._fail(WireError(f"no PINGRESP from the broker within {self.keepalive}s"))
            return
        # Ping when nothing was sent, or nothing received, for `keepalive` s: the latter finds
        # a half-open connection while we keep sending QoS 0.
        due = min(self._last_sent, self._last_received) + self.keepalive
        if now >= due:
            self._send(PingReqPacket().write())
            self._flush()
            if self._ping_deadline is None:
                self._ping_deadline = now + self.keepalive
            due = now + self.keepalive
        if self._ping_deadline is not None:
            due = min(due, self._ping_deadline)
        self._schedule_keepalive(due - now)

    # ------------------------------------------------------------------ failure

    def _fail(self, error: WireError) -> None:
        """The connection is unusable: record why, drop it, settle everything waiting."""
        if self._error is None:
            self._error = error
        if self._transport is not None:
            self._transport.abort()  # connection_lost follows, from the loop
        self._shutdown()

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _shutdown(self) -> None:
        if self._down:
            return
        self._down = True
        error = self._error or WireError("connection closed")
        self._connected = False
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for batch in set(self._inflight.values()):
            if batch is not None and not batch.future.done():
                batch.future.set_exception(error)
        self._inflight.clear()
        for waiter in self._subacks.values():
            if not waiter.done():
                waiter.set_exception(error)
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(error)
        self._wake(self._window_waiters)
        self._wake(self._idle_waiters)
        if self.closed is not None and not self.closed.done():
            if self._disconnecting:
                self.closed.set_result(None)
            else:
                self.closed.set_exception(error)
        self._incoming.put_nowait(None)

    @staticmethod
    def _wake(waiters: list[asyncio.Future[None]]) -> None:
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        waiters.clear()
