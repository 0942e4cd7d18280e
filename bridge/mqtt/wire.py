"""A thin MQTT 5 client: asyncio over the `mqtt5` sans-IO codec, built for CPU per message.

Why it exists (DESIGN.md "Performance model"): an awaited future per publish costs far more CPU
than building the packet. Here a PUBLISH is built by `mqtt5` (Rust) and appended to one
outgoing buffer; the buffer goes to the transport in ONE `write` per loop iteration, and
acknowledgements are tracked in bulk: one future per batch, a dict from packet id to batch.

Three layers, h11's shape: `bridge.mqtt.wireproto.WireState` is the protocol state (no I/O:
bytes in, events and bytes out; its events and errors are in `bridge.mqtt.wireevents`);
`bridge.mqtt.wirelink.WireLink` is the asyncio.Protocol that owns the transport, timers and
futures; `WireClient`, here, is the awaitable API on top.

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
import ssl as _ssl
from collections.abc import AsyncIterator, Callable, Sequence

from bridge.mqtt.wireevents import Incoming, WindowFull, WireError
from bridge.mqtt.wirelink import FutureBatch, WireLink, os_reason, retrieve
from bridge.mqtt.wireproto import Outgoing, WireState

__all__ = ["Incoming", "WindowFull", "WireClient", "WireError"]


class WireClient(WireLink):
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
        super().__init__(WireState(
            client_id, username=username, password=password, keepalive=keepalive, will=will,
            receive_maximum_hint=receive_maximum_hint,
        ), on_puback)
        self.host, self.port, self.client_id = host, port, client_id
        self._ssl = ssl
        self._connect_timeout = connect_timeout

    @property
    def window(self) -> int:
        """The broker's Receive Maximum (from CONNACK): QoS 1 messages in flight at most."""
        return self._state.window

    @property
    def max_packet_size(self) -> int | None:
        return self._state.max_packet_size

    @property
    def keepalive(self) -> int:
        """Seconds; the broker's Server Keep Alive when it sent one."""
        return self._state.keepalive

    # ------------------------------------------------------------------ connection

    async def connect(self) -> None:
        """Open TCP (+TLS), send CONNECT (clean start), wait for a successful CONNACK."""
        if self._loop is not None:
            raise RuntimeError("a WireClient connects once; make a new one to reconnect")
        loop = asyncio.get_running_loop()
        connack = self._start(loop)
        where = f"{self.host}:{self.port}"
        try:
            async with asyncio.timeout(self._connect_timeout):
                await loop.create_connection(
                    lambda: self, self.host, self.port, ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                )
                self._state.connect()
                self._flush()
                refusal = await connack
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
            error = WireError(f"cannot connect to {where}: {os_reason(exc)}")
            self._fail(error)
            raise error from exc  # the cause tells a certificate problem from a refusal
        except BaseException:
            self._fail(WireError("connect cancelled"))
            raise
        if refusal is not None:
            self._fail(refusal)
            raise refusal

    async def disconnect(self) -> None:
        """Send DISCONNECT (normal: the broker drops the will) and close the connection."""
        if self._transport is None or self._disconnecting:
            return
        self._disconnecting = True
        if self._state.connected and not self._transport.is_closing():
            self._state.disconnect()
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
        if self._transport is not None:
            self._transport.abort()

    async def wait_closed(self) -> None:
        """Return when the connection is gone: None after disconnect(), else WireError."""
        if self.closed is None:
            raise RuntimeError("not connected")
        await asyncio.shield(self.closed)

    @property
    def in_flight(self) -> int:
        """QoS 1 messages sent and not yet acknowledged."""
        return len(self._state.inflight)

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
        packet_id = self._state.publish(
            topic, payload, qos, retain,
            response_topic=response_topic, correlation_data=correlation_data,
        )
        self._schedule_flush()
        return packet_id

    async def publish_batch(self, messages: Sequence[Outgoing]) -> None:
        """Publish (topic, payload, qos, retain, ...) messages in order; return when every QoS 1
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
        loop = self._loop
        if loop is None:
            raise WireError("not connected")
        batch = FutureBatch(loop.create_future())
        batch.future.add_done_callback(retrieve)  # failed by a lost connection, unawaited
        publish_many, count = self._state.publish_many, len(messages)
        try:
            sent = 0
            while True:
                if self._flush_handle is None:  # a window wait flushed the buffer
                    self._flush_handle = loop.call_soon(self._flush)
                sent = publish_many(messages, sent, batch)
                if sent == count:
                    break
                await self.wait_window()  # the broker's Receive Maximum is reached
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
        state = self._state
        while self.is_connected and (len(state.inflight) >= state.window or self._paused):
            assert self._loop is not None
            self._flush()
            waiter = self._loop.create_future()
            self._window_waiters.append(waiter)
            await waiter
        if not self.is_connected:
            raise self._error or WireError("not connected")

    async def wait_acked(self) -> None:
        """Return when no QoS 1 message is in flight (WireError if the connection drops)."""
        while self._state.inflight and self.is_connected:
            assert self._loop is not None
            self._flush()
            waiter = self._loop.create_future()
            self._idle_waiters.append(waiter)
            await waiter
        if self._state.inflight:
            raise self._error or WireError("not connected")

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
        packet_id = self._state.subscribe(topics, qos)
        waiter: asyncio.Future[WireError | None] = self._loop.create_future()
        self._subacks[packet_id] = waiter
        self._schedule_flush()
        try:
            refused = await waiter
        finally:
            self._subacks.pop(packet_id, None)
            self._state.subscribed(packet_id)
        if refused is not None:
            raise refused

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
