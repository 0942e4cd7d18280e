"""An embedded MQTT broker for `m2m-bridge demo`, and a probe for a broker that answers.

amqtt is an optional extra (`m2m-bridge[demo]`): gateways never run a broker of their own, so
it is imported only inside `start_embedded_broker`, and its absence is one clear error.
"""

from __future__ import annotations

import logging
from typing import Any

import aiomqtt

from bridge.errors import BridgeError

# amqtt logs every connect and packet at INFO; the demo's live view must stay readable.
_AMQTT_LOGGERS = ("amqtt", "transitions")


class EmbeddedBroker:
    """A running amqtt broker listening on `host:port`; `stop()` closes it."""

    def __init__(self, broker: Any, host: str, port: int) -> None:
        # `Any`: amqtt ships no type information, and it is an optional import.
        self._broker = broker
        self.host = host
        self.port = port
        self._stopped = False

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self._broker.shutdown()


async def start_embedded_broker(host: str, port: int) -> EmbeddedBroker:
    """Start an anonymous MQTT 3.1.1 broker on `host:port` only (plain TCP, no websockets)."""
    try:
        # Imported here on purpose: amqtt is an optional extra (see the module docstring).
        from amqtt.broker import Broker  # type: ignore[import-untyped,unused-ignore]  # noqa: PLC0415
        from amqtt.errors import (  # type: ignore[import-untyped,unused-ignore]  # noqa: PLC0415
            BrokerError as AmqttBrokerError,
        )
    except ImportError:
        raise BridgeError(
            "the embedded broker needs amqtt: pip install 'm2m-bridge[demo]'"
        ) from None
    for name in _AMQTT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # Only anonymous auth: the defaults also load $SYS and packet-logging plugins we
        # do not want; with no auth plugin at all amqtt refuses every client.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    try:
        await broker.start()
    except AmqttBrokerError as exc:
        where = f"{host}:{port}"
        raise BridgeError(f"cannot start the embedded MQTT broker on {where}: {exc}") from None
    return EmbeddedBroker(broker, host, port)


async def broker_answers(host: str, port: int, timeout: float = 1.0) -> bool:  # noqa: ASYNC109
    """Whether an MQTT broker answers at `host:port` within `timeout`.

    A broker that refuses our anonymous probe (bad credentials, not authorised) still answers:
    the bridge connects with its own configured credentials, so that counts as True.
    """
    try:
        async with aiomqtt.Client(host, port, timeout=timeout):
            return True
    except aiomqtt.MqttCodeError as exc:
        # A CONNACK with a refusal code came back: someone is there.
        return isinstance(exc, aiomqtt.exceptions.MqttConnectError)
    except (aiomqtt.MqttError, OSError, TimeoutError):
        return False
