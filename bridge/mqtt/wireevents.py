"""What the MQTT 5 client's protocol state says: its errors and the events it makes, and the
words it shares with the shell (a batch's acknowledgement countdown, a frame's size).

`bridge.mqtt.wireproto.WireState` turns the broker's bytes into these events, plain data that
`bridge.mqtt.wire.WireClient` (the asyncio shell) acts on: resolve a future, queue a command,
fail the connection. Nothing here does I/O or knows the codec.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from bridge.errors import BrokerError

FAILURE: Final = 0x80  # MQTT 5: reason codes >= 0x80 are failures

__all__ = [
    "FAILURE",
    "PING_RESP",
    "Batch",
    "Connected",
    "Event",
    "Failed",
    "Incoming",
    "PingResp",
    "PubAck",
    "Refused",
    "SubAck",
    "VersionRefused",
    "WindowFull",
    "WireError",
    "describe",
    "frame_size",
    "refusal",
    "suback_error",
]


class WireError(BrokerError):
    """The broker refused us, broke the protocol, or the connection failed or was lost.

    `reason_code` is the MQTT 5 reason code when the broker gave one (CONNACK, PUBACK,
    SUBACK, DISCONNECT), else None (socket, TLS, timeout, keepalive).
    """

    def __init__(self, message: str, *, reason_code: int | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class VersionRefused(WireError):
    """The broker does not speak MQTT 5: it answered our CONNECT with a 3.1.1 CONNACK whose
    return code is 1, "unacceptable protocol version" (NATS, RabbitMQ 3.x, older brokers)."""


def frame_size(buf: bytes | bytearray, off: int) -> int | None:
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


class Batch:
    """Acknowledgement bookkeeping for one batch: a countdown. The shell subclasses it and
    overrides `settled()` (its future); `error` is the batch's first refused message."""

    __slots__ = ("error", "remaining")

    def __init__(self) -> None:
        self.remaining = 1  # the guard: released once every message of the batch is sent
        self.error: WireError | None = None

    def settle_one(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.settled()

    def settled(self) -> None:
        """Every message of the batch is settled."""


class WindowFull(Exception):  # a signal, not a failure: await wait_window()
    """`publish_nowait` of a QoS 1 message while the broker's Receive Maximum is reached."""


# ---------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Incoming:
    """A PUBLISH the broker sent us (a command). QoS 1 ones were PUBACKed on receipt."""

    topic: str
    payload: bytes
    response_topic: str | None
    correlation_data: bytes | None
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Connected:
    """A successful CONNACK: window, limits and keepalive are taken from it."""


@dataclass(frozen=True, slots=True)
class Refused:
    """A CONNACK with a failure reason code."""

    error: WireError


@dataclass(frozen=True, slots=True)
class PubAck:
    """A PUBACK for a message sent by `publish` (publish_nowait)."""

    packet_id: int
    reason_code: int


@dataclass(frozen=True, slots=True)
class SubAck:
    """The SUBACK of `subscribe(...)`'s packet id; `error` names every refused topic."""

    packet_id: int
    error: WireError | None


@dataclass(frozen=True, slots=True)
class PingResp:
    """The broker answered our PINGREQ (the keepalive deadline is cleared)."""


@dataclass(frozen=True, slots=True)
class Failed:
    """The connection is unusable: malformed or oversized frame, the broker's DISCONNECT,
    a QoS 2 message, an unexpected packet. Nothing after it in the chunk was read."""

    error: WireError


Event = Connected | Refused | PubAck | SubAck | Incoming | PingResp | Failed
PING_RESP: Final = PingResp()


class _ReasonCode(Protocol):
    """mqtt5's reason-code enums (Rust classes: `int()` and `.name`, not int subclasses)."""

    @property
    def name(self) -> str: ...
    def __int__(self) -> int: ...


def describe(code: _ReasonCode) -> str:
    """`not authorized (135)` from an mqtt5 reason code."""
    return f"{code.name.lower().replace('_', ' ')} ({int(code)})"


def refusal(what: str, code: _ReasonCode, reason_str: str | None) -> WireError:
    """`<what>: not authorized (135)[: <the broker's reason string>]`, carrying the code."""
    detail = f": {reason_str}" if reason_str else ""
    return WireError(f"{what}: {describe(code)}{detail}", reason_code=int(code))


def suback_error(topics: Sequence[str], codes: Sequence[_ReasonCode]) -> WireError | None:
    """Every topic a SUBACK refused, with its reason; None when all were granted."""
    refused = [
        f"{topic}: {describe(code)}"
        for topic, code in zip(topics, codes, strict=False)
        if int(code) >= FAILURE
    ]
    if len(codes) != len(topics):
        refused.append(f"{len(codes)} reason codes for {len(topics)} topics")
    if not refused:
        return None
    failures = [int(c) for c in codes if int(c) >= FAILURE]
    return WireError(
        "broker refused the subscription: " + "; ".join(refused),
        reason_code=failures[0] if failures else None,
    )
