"""The bridge's exceptions: one small tree, each branch saying whose fault it is.

    BridgeError
    ├── ConfigError        the YAML (or a secret it names) is wrong; carries every issue found
    ├── CodecError         a value does not fit a point's type (encode) or registers are short
    │   └── BadValue           (core.normalize) a reading scale/offset cannot make a number of
    ├── DeviceError        the device answered, but not with data (Modbus exception, bad frame)
    │   │                  `refused` (02/03: not served), `busy` (05/06: ask later), `code`
    │   ├── NoResponse         (transports.modbus) nothing came back within the timeout
    │   └── BadFrame           (transports.modbus) bytes came back, but no valid reply
    ├── TransportError     the link failed: refused, timed out, closed; always retryable
    ├── BrokerError        the MQTT broker refused us or went away
    │   └── WireError          (mqtt.wireevents) our MQTT 5 client's one-line failures
    ├── CommandRefused     (core.writes) a command checked and not written, with the reason
    ├── ReadBackFailed     (transports.writestep) written, but the read-back failed
    └── UsageError         the command line asks for something impossible (exit 2)

The subclasses live beside the code that raises them; this drawing is the whole tree.
`failure_kind()` names each for the per-device failure counters and metrics; the poller decides
from `refused` and `busy`, never from a transport's constants.

Foreign exceptions (pymodbus, paho/aiomqtt, OSError) are turned into these at the edge modules,
so nothing above the transports ever catches a library's exception type.
"""

from __future__ import annotations

from dataclasses import dataclass


class BridgeError(Exception):
    """Base of every error the bridge raises on purpose."""

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

    def failure_kind(self) -> str:
        return "bad_reply"


# Modbus exception codes that mean "not served here" and "alive, ask me later".
REFUSED_CODES = frozenset({2, 3})
BUSY_CODES = frozenset({5, 6})


class DeviceError(BridgeError):
    """The device answered with a Modbus exception or an unusable reply."""

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
        return f"exception_{self.code:02d}" if self.code is not None else "no_response"


class TransportError(BridgeError):
    """The link to the device failed (connect refused, timeout, connection lost)."""


class BrokerError(BridgeError):
    """The MQTT broker could not be reached or refused the connection."""


class UsageError(BridgeError):
    """A CLI argument is wrong: a bad URL, a type that does not exist, a count out of range."""

