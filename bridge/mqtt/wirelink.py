"""The MQTT 5 client's asyncio side: the transport, the timers and the futures.

`WireLink` is the asyncio.Protocol under `bridge.mqtt.wire.WireClient`: it feeds the broker's
bytes to the protocol state (`bridge.mqtt.wireproto.WireState`), acts on the events that
come back (a CONNACK, SUBACK or failure settles a future, a command goes to the incoming
queue), writes what the state queued in ONE transport write per loop iteration, runs the
keepalive timer, and settles everything waiting when the connection is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os as _os
import socket as _socket
import ssl as _ssl
from collections.abc import Callable
from typing import Any, Final

from bridge.mqtt.wireevents import (
    Batch,
    Connected,
    Failed,
    Incoming,
    PubAck,
    Refused,
    SubAck,
    WireError,
)
from bridge.mqtt.wireproto import WireState

__all__ = ["FutureBatch", "WireLink", "os_reason", "retrieve"]

_QUICKACK: Final[int | None] = getattr(_socket, "TCP_QUICKACK", None)  # Linux only
_INET: Final = (_socket.AF_INET, _socket.AF_INET6)
_RECV_SIZE: Final = 1 << 16  # bytes per read (asyncio: 256 KiB); what comes is acks and commands


def os_reason(exc: BaseException) -> str:
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


def retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen so asyncio does not log it when nobody awaits it."""
    if not future.cancelled():
        future.exception()


class FutureBatch(Batch):
    """A publish_batch's countdown, resolving its one future when every message is settled."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[None]) -> None:
        super().__init__()
        self.future = future

    def settled(self) -> None:
        if not self.future.done():  # unless its waiter gave up
            if self.error is None:
                self.future.set_result(None)
            else:
                self.future.set_exception(self.error)


class WireLink(asyncio.BufferedProtocol):
    """One connection's asyncio machinery around a `WireState`. Not thread-safe.

    A BufferedProtocol: the transport reads into one buffer made once, where a plain
    Protocol gets a fresh 256 KiB bytes per read (that glibc may serve with mmap and munmap,
    costing more CPU than the packets in it); `data_received` takes the bytes either way.
    """

    def __init__(self, state: WireState, on_puback: Callable[[int, int], None] | None) -> None:
        self._state = state
        self._on_puback = on_puback
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] | None = None
        self._connack: asyncio.Future[WireError | None] | None = None  # None: accepted
        self._subacks: dict[int, asyncio.Future[WireError | None]] = {}
        self._disconnecting = False
        self._error: WireError | None = None
        self._down = False
        self._flush_handle: asyncio.Handle | None = None
        self._keepalive_handle: asyncio.TimerHandle | None = None
        self._window_waiters: list[asyncio.Future[None]] = []
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._paused = False
        self._sock: _socket.socket | None = None
        self._quickack = 0
        self._incoming: asyncio.Queue[Incoming | None] = asyncio.Queue()
        self._recv = memoryview(bytearray(_RECV_SIZE))

    def _start(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[WireError | None]:
        """Adopt `loop`: make the `closed` and CONNACK futures; the latter is returned."""
        self._loop = loop
        self.closed = loop.create_future()
        self.closed.add_done_callback(retrieve)
        connack = self._connack = loop.create_future()
        connack.add_done_callback(retrieve)
        return connack

    @property
    def is_connected(self) -> bool:
        return self._state.connected and self._error is None and not self._disconnecting

    # ------------------------------------------------------------------ writing

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Hand what the state queued to the transport: one write."""
        self._flush_handle = None
        if not self._state.out:
            return
        data = self._state.take_out()  # the transport may keep it: the state starts anew
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        if self._loop is not None:
            self._state.last_sent = self._loop.time()

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if _QUICKACK is not None and sock is not None and sock.family in _INET:
            self._sock, self._quickack = sock, _QUICKACK
        if self._loop is None:  # driven by hand (tests): adopt the running loop
            self._start(asyncio.get_running_loop())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._error is None:
            if self._disconnecting:
                self._error = WireError("disconnected")
            elif exc is not None:
                self._error = WireError(f"connection to the broker lost: {os_reason(exc)}")
            else:
                self._error = WireError("connection closed by the broker")
        self._shutdown()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake(self._window_waiters)

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._recv

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self._recv[:nbytes]))

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        state = self._state
        if self._loop is not None:
            state.last_received = self._loop.time()
        for event in state.receive(data):  # successful batch acks are settled in there
            if type(event) is Incoming:
                self._incoming.put_nowait(event)
            elif isinstance(event, PubAck):
                if self._on_puback is not None:
                    self._on_puback(event.packet_id, event.reason_code)
            elif isinstance(event, SubAck):
                waiter = self._subacks.get(event.packet_id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(event.error)
            elif isinstance(event, Connected | Refused):
                assert self._connack is not None  # made by connection_made
                if isinstance(event, Connected):
                    self._schedule_keepalive(state.keepalive)
                self._connack.set_result(event.error if isinstance(event, Refused) else None)
            elif isinstance(event, Failed):
                self._fail(event.error)
                return
        if state.out:  # acks of incoming QoS 1, answers to PINGREQ
            self._schedule_flush()
        if self._sock is not None:
            # Acknowledge at once: a broker with Nagle on (mosquitto's default) holds its
            # next PUBACKs until our TCP ACK, which Linux would delay by up to 40 ms.
            with contextlib.suppress(OSError):
                self._sock.setsockopt(_socket.IPPROTO_TCP, self._quickack, 1)
        if self._window_waiters and len(state.inflight) < state.window:
            self._wake(self._window_waiters)
        if self._idle_waiters and not state.inflight:
            self._wake(self._idle_waiters)

    # ------------------------------------------------------------------ keepalive

    def _schedule_keepalive(self, delay: float) -> None:
        if self._state.keepalive > 0 and self._loop is not None:
            self._keepalive_handle = self._loop.call_later(max(delay, 0.05), self._tick)

    def _tick(self) -> None:
        """PINGREQ after `keepalive` s idle; the connection is lost `keepalive` s later."""
        self._keepalive_handle = None
        if self._error is not None or self._loop is None:
            return
        delay = self._state.tick(self._loop.time())
        if isinstance(delay, WireError):
            self._fail(delay)
            return
        if self._state.out:  # the PINGREQ: now, not after this iteration's publishes
            self._flush()
        self._schedule_keepalive(delay)

    # ------------------------------------------------------------------ failure

    def _fail(self, error: WireError) -> None:
        """The connection is unusable: record why, drop it, settle everything waiting."""
        if self._error is None:
            self._error = error
        if self._transport is not None:
            self._transport.abort()  # connection_lost follows, from the loop
        self._shutdown()

    def _shutdown(self) -> None:
        if self._down:
            return
        self._down = True
        error = self._error or WireError("connection closed")
        for handle in (self._keepalive_handle, self._flush_handle):
            if handle is not None:
                handle.cancel()
        self._keepalive_handle = self._flush_handle = None
        for batch in self._state.drop_inflight():
            if isinstance(batch, FutureBatch) and not batch.future.done():
                batch.future.set_exception(error)
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
