"""The bridge's exceptions: one small tree, each branch saying whose fault it is.

    BridgeError                                                      blame
    ├── ConfigError        the YAML (or a secret it names) is wrong;    ours (the config's)
    │                      carries every issue found
    ├── CodecError         a value does not fit a point's type, or      device
    │   │                  a reply's registers are short
    │   └── BadValue           (core.normalize) scale/offset cannot
    │                          make a number of a reading
    ├── DeviceError        the device answered, but not with data:      device
    │   │                  `refused` (02/03: not served), `busy`
    │   │                  (05/06: ask later), `code`
    │   ├── BadFrame           (transports.modbus_errors) bytes came
    │   │                      back, but no valid reply
    │   └── SunSpecError       (core.sunspec) no "SunS" marker, or a
    │                          model chain that does not hold up
    ├── TransportError     the link failed: refused, closed, nothing    transport
    │   │                  came back; `link_down`: the rest of a poll
    │   │                  cycle would fail the same way
    │   └── NoResponse         (transports.modbus_errors) nothing came
    │                          back in time: the link is up (not
    │                          `link_down`), one unit on it is silent
    ├── BrokerError        the MQTT broker refused us or went away      broker
    │   └── WireError          (mqtt.wireevents) our MQTT 5 client's
    │                          one-line failures
    ├── CommandRefused     (core.writes) checked and not written        ours (the command's)
    ├── ReadBackFailed     (transports.writestep) written, but the      device
    │                      read-back failed
    └── UsageError         the command line asks for something          ours (the operator's)
                           impossible (exit 2)

The subclasses live beside the code that raises them; this drawing is the whole tree.
What happens next is decided here and read by the poller, never from a transport's constants:
- `failure_kind()` names the per-device failure counter (metrics label `kind`);
- `busy` (05/06): retried at the next poll with back-off, the device stays `online`;
- `refused` (02/03): the poller splits the read and learns what is not served;
- `link_down`: the poller ends the cycle (the other reads would fail the same way);
- everything else: retried at the next poll with back-off, counted towards `offline`.
Nothing is retried within a poll, and writes are never retried (DESIGN.md).

Foreign exceptions (pymodbus, paho/aiomqtt, OSError) are turned into these at the edge modules,
so nothing above the transports ever catches a library's exception type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

Blame = Literal["ours", "device", "transport", "broker"]


class BridgeError(Exception):
    """Base of every error the bridge raises on purpose."""

    blame: ClassVar[Blame] = "ours"

    @property
    def link_down(self) -> bool:
        """Whether the link itself failed, so the rest of a poll cycle would fail the same way."""
        return False

    @property
    def busy(self) -> bool:
        """Whether the device is alive and asked to be asked later (DeviceError 05/06)."""
        return False

    def failure_kind(self) -> str:
        """The per-device failure counter this error counts under (metrics label `kind`)."""
        return "link"


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file, located for a human: `file:line: path: message`."""

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(BridgeError):
    """The configuration is invalid; `issues` lists every problem, not just the first."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))


class CodecError(BridgeError, ValueError):
    """A value cannot be encoded for, or decoded from, a point's registers."""

    blame: ClassVar[Blame] = "device"  # raised on replies; a command's value is checked first

    def failure_kind(self) -> str:
        return "bad_reply"


# Modbus exception codes that mean "not served here" and "alive, ask me later".
REFUSED_CODES = frozenset({2, 3})
BUSY_CODES = frozenset({5, 6})


class DeviceError(BridgeError):
    """The device answered with a Modbus exception or an unusable reply."""

    blame: ClassVar[Blame] = "device"

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code

    @property
    def refused(self) -> bool:
        """Exception 02/03: the device does not serve (part of) the range asked for."""
        return self.code in REFUSED_CODES

    @property
    def busy(self) -> bool:
        """Exception 05/06: the device is alive and asks to be asked later."""
        return self.code in BUSY_CODES

    def failure_kind(self) -> str:
        return f"exception_{self.code:02d}" if self.code is not None else "bad_reply"


class TransportError(BridgeError):
    """The link to the device failed (connect refused, timeout, connection lost)."""

    blame: ClassVar[Blame] = "transport"

    @property
    def link_down(self) -> bool:
        return True


class BrokerError(BridgeError):
    """The MQTT broker could not be reached or refused the connection."""

    blame: ClassVar[Blame] = "broker"


class UsageError(BridgeError):
    """A CLI argument is wrong: a bad URL, a type that does not exist, a count out of range."""

