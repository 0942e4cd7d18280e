"""The error tree decides blame and what the poller does next; the poller only reads it."""

from __future__ import annotations

import pytest

from bridge.errors import BridgeError, BrokerError, CodecError, DeviceError, TransportError
from bridge.mqtt.wireevents import WireError
from bridge.transports.modbus_errors import BadFrame, NoResponse
from bridge.transports.writestep import ReadBackFailed


@pytest.mark.parametrize(
    ("code", "refused", "busy"),
    [(1, False, False), (2, True, False), (3, True, False), (4, False, False),
     (5, False, True), (6, False, True), (11, False, False), (None, False, False)],
)
def test_modbus_exceptions_say_refused_or_busy(
    code: int | None, refused: bool, busy: bool
) -> None:
    """02/03: not served (split and learn); 05/06: alive, ask later (no offline count)."""
    exc = DeviceError("x", code=code)
    assert (exc.refused, exc.busy) == (refused, busy)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (DeviceError("x", code=2), "exception_02"),
        (NoResponse("x"), "no_response"),
        (BadFrame("x"), "bad_frame"),
        (CodecError("x"), "bad_reply"),
        (DeviceError("x"), "bad_reply"),
        (TransportError("x"), "link"),
        (BridgeError("x"), "link"),
    ],
)
def test_each_error_names_its_failure_counter(exc: BridgeError, kind: str) -> None:
    assert exc.failure_kind() == kind


@pytest.mark.parametrize(
    ("exc", "blame", "link_down"),
    [
        (DeviceError("x", code=2), "device", False),
        (BadFrame("x"), "device", False),
        (CodecError("x"), "device", False),
        (ReadBackFailed("x"), "device", False),
        # A timeout is the transport's (the tree says so), but the link is up: other units on
        # a shared line still answer, so the poll cycle goes on.
        (NoResponse("x"), "transport", False),
        (TransportError("x"), "transport", True),
        (WireError("x"), "broker", False),
        (BrokerError("x"), "broker", False),
        (BridgeError("x"), "ours", False),
    ],
)
def test_the_tree_decides_blame_and_whether_the_link_is_down(
    exc: BridgeError, blame: str, link_down: bool
) -> None:
    assert (exc.blame, exc.link_down) == (blame, link_down)


def test_a_timeout_is_a_transport_error_not_a_device_answer() -> None:
    """The drawing in errors.py: NoResponse sits under TransportError, not DeviceError."""
    assert issubclass(NoResponse, TransportError)
    assert not issubclass(NoResponse, DeviceError)
