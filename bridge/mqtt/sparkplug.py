"""Sparkplug B 3.0 edge node on the broker: births, deaths, seq and bdSeq, commands, STATE.

The payloads are bridge.core.sparkplug's; this module decides when each goes out and keeps
the numbers that tie them together (DESIGN.md "Northbound standards"):

- `bdSeq` rises by one on every connect attempt (the will carries it), persisted in the state
  dir (`BdSeq`: one small file, replaced atomically) so a restart or a `kill -9` goes on from
  the last one; NDEATH (QoS 1, not retained) is the will, and a clean stop publishes it too.
- `seq`: one counter for the node, 0 in NBIRTH, +1 per NBIRTH/DBIRTH/DDATA/DDEATH, 255 wraps.
  Readings wait in the buffer as DDATA without seq (bridge.core.sparkplug_stored); `SeqSession`
  (bridge.mqtt.sparkplug_publish) appends it as they are written to the connection, so seq
  follows the wire order.
- Births (`births`, the publisher's connect step): NBIRTH, then a DBIRTH for every online
  device, after the primary host (if any) said `online`; again on an NCMD rebirth or a reload
  that changes the metrics, without reconnecting (same bdSeq, seq 0 again). A device going
  offline publishes DDEATH, back online DBIRTH (`SparkplugStatuses` in
  bridge.mqtt.sparkplug_publish, in place of the JSON status topics). A reading of a device
  not born (replayed after an outage, or read before its status said online) gets its DBIRTH
  first, its values Quality stale unless it is online, and
  a device that is not online dies again (DDEATH) after the batch.
- Replayed readings are re-encoded with `is_historical` (`historical`).
- Commands: NCMD rebirth; DCMD metrics parsed and checked (bridge.core.sparkplug_commands),
  written through the `/set` path (`Writes`, the command handler); refusals logged, counted.
- `spBv1.0/STATE/<primary host>`: `online: false` (newer than the last seen) makes the node
  publish NDEATH and disconnect (`leaving`); it reconnects and waits for `online: true`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import structlog

from bridge.core import sparkplug as sp
from bridge.core.codec import Value
from bridge.core.messages import Message
from bridge.core.sparkplug_commands import Refusal, Write, parse_dcmd, parse_ncmd
from bridge.core.sparkplug_stored import DeviceData, historical, known, sequenced
from bridge.core.writes import CommandRefused
from bridge.errors import BrokerError
from bridge.mqtt.delivery import Wake
from bridge.mqtt.session import Session, Will
from bridge.mqtt.wireevents import Incoming

if TYPE_CHECKING:
    from bridge.config import Config, Device

log = structlog.get_logger("bridge.mqtt.sparkplug")

BD_SEQ_FILE = "sparkplug-bdseq"
ALIASES_FILE = "sparkplug-aliases.json"
HOST_WAIT = 5.0  # seconds between looks while waiting for the primary host (a STATE wakes it)


def _now() -> int:
    return time.time_ns() // 1_000_000


class BdSeq:
    """The last bdSeq used, in a file of the state dir: `next()` is the one for a new connect.

    Written before the CONNECT that carries it (temp file, fsync, rename), so whatever kills
    the process, the next start uses a number no will has carried since the last restart.
    A file that cannot be read starts again at 0; one that cannot be written is said once and
    the node goes on counting in memory.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last: int | None = None
        self._write_failed = False

    def next(self) -> int:
        last = self._read() if self.last is None else self.last
        value = 0 if last is None else sp.next_seq(last)
        self._write(value)
        self.last = value
        return value

    def _read(self) -> int | None:
        try:
            value = int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None
        return value if 0 <= value < sp.SEQ_LIMIT else None

    def _write(self, value: int) -> None:
        error = _save(self.path, f"{value}\n")
        if error is not None and not self._write_failed:
            log.warning("sparkplug bdSeq not saved", path=str(self.path), error=error)
        self._write_failed = error is not None


class AliasBook:
    """Every alias the node has given, in a file of the state dir (JSON: `next` and
    `aliases`, metric key → alias): `metrics(devices)` numbers a config's metrics keeping
    the aliases given before (bridge.core.sparkplug.NodeMetrics), saved before any reading
    is encoded with a new one.

    A file that cannot be read starts again from config order (said once: readings buffered
    before it may then name other metrics); one that cannot be written is said once and the
    node goes on with the aliases in memory.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        # Between reloads the aliases given are kept as the JSON saved, not as a dict: 15,000
        # metric keys (500 devices x 30 points) are ~1.3 MiB as a dict, ~0.4 as text, and
        # are only needed again by the next reload.
        self._known_json: str | None = None  # None: not read yet
        self.next_alias = sp.FIRST_ALIAS
        self._write_failed = False

    @property
    def known(self) -> dict[str, int]:
        """Every alias given (metric key → alias), as last saved; {} before the file is read."""
        return {} if self._known_json is None else dict(json.loads(self._known_json))

    def metrics(self, devices: Sequence[Device]) -> sp.NodeMetrics:
        if self._known_json is None:
            known, self.next_alias = self._read()
        else:
            known = self.known
        metrics = sp.NodeMetrics(devices, known, self.next_alias)
        keys = metrics.keys
        if metrics.next_alias != self.next_alias or not keys.items() <= known.items():
            # Kept for metrics no longer configured too: one put back later gets its own again.
            known = {**known, **keys}
            self.next_alias = metrics.next_alias
            doc = {"next": self.next_alias, "aliases": known}
            error = _save(self.path, json.dumps(doc, indent=0, sort_keys=True) + "\n")
            if error is not None and not self._write_failed:
                log.warning("sparkplug aliases not saved", path=str(self.path), error=error)
            self._write_failed = error is not None
        # Kept in memory whether or not it was saved: a file that cannot be written (or is
        # removed meanwhile) does not move an alias on the next reload.
        self._known_json = json.dumps(known, separators=(",", ":"))
        return metrics

    def _read(self) -> tuple[dict[str, int], int]:
        try:
            doc = json.loads(self.path.read_text())
            known = {str(k): int(v) for k, v in doc["aliases"].items()}
            return known, int(doc["next"])
        except FileNotFoundError:
            return {}, sp.FIRST_ALIAS
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("sparkplug aliases unreadable, numbering from 1 again",
                        path=str(self.path), error=str(exc))
            return {}, sp.FIRST_ALIAS


def _save(path: Path, text: str) -> str | None:
    """Replace `path` with `text` atomically and durably (temp file, fsync, rename); why not."""
    temp = path.with_name(f".{path.name}.tmp")
    try:
        with open(temp, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except OSError as exc:
        return str(exc)
    return None


class Writes(Protocol):
    """Where DCMD writes go (bridge.mqtt.commands.CommandHandler: the `/set` path)."""

    def write(self, source: str, device: str, point: str, value: Value) -> None: ...

    def refuse(self, source: str, metric: str, reason: str) -> None: ...


class EdgeNode:
    """One edge node's state across its connections (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        *,
        data: Callable[[str], DeviceData | None],
        writes: Callable[[], Writes],
        metrics: sp.NodeMetrics | None = None,
    ) -> None:
        """`metrics`: the config's, numbered by the service's AliasBook (else config order)."""
        settings = config.mqtt.sparkplug
        assert settings is not None  # format: sparkplug (the loader checks the block is there)
        self.group, self.node, self.host = (
            settings.group_id, settings.edge_node_id, settings.primary_host_id
        )
        self.data = data  # a device's last values and DDATA encoding (the running poller's)
        self.writes = writes  # looked up per command: a reload swaps the command handler
        self.metrics = metrics or sp.NodeMetrics(config.devices)
        # Readings acquired by then may hold metrics a reload took away (sequence drops them).
        self.changed_at = 0
        self.bd_seq_file = BdSeq(Path(config.gateway.state_dir) / BD_SEQ_FILE)
        self.bd_seq = 0
        self.seq = 0  # of the last node message sent
        self.node_born = False
        self.born: set[str] = set()  # devices whose DBIRTH is the latest word on them
        self.rebirth = False  # births asked for again (NCMD, a reload)
        self.host_online = self.host is None
        self.host_ts = -1
        self.leaving = False  # the primary host went offline: NDEATH, disconnect
        self.wake = Wake()  # the publisher's (attach)
        self.ndeath_topic = sp.topic(self.group, "NDEATH", self.node)
        self.nbirth_topic = sp.topic(self.group, "NBIRTH", self.node)
        self.ncmd_topic, dcmd = sp.command_filters(self.group, self.node)
        self.dcmd_prefix = dcmd.removesuffix("+")
        self.ddata_prefix = sp.topic(self.group, "DDATA", self.node, "x").removesuffix("x")
        self.state_topic = sp.state_topic(self.host) if self.host is not None else None

    @property
    def subscriptions(self) -> list[str]:
        return [self.ncmd_topic, self.dcmd_prefix + "+",
                *([self.state_topic] if self.state_topic else [])]

    def attach(self, wake: Wake) -> None:
        self.wake = wake

    def update(self, config: Config, metrics: sp.NodeMetrics | None = None) -> None:
        """A reload: new metrics; if any alias, name or datatype changed, births again."""
        metrics = metrics or sp.NodeMetrics(config.devices)
        if metrics.table != self.metrics.table:
            self.metrics = metrics
            self.changed_at = _now()
            self.rebirth = True
            self.wake.set()

    # --- outgoing ---------------------------------------------------------------------------

    def will(self) -> Will:
        """The NDEATH for a new connect attempt, with the next bdSeq (saved first)."""
        self.bd_seq = self.bd_seq_file.next()
        return self.ndeath_topic, sp.ndeath(bd_seq=self.bd_seq, ts=_now()), 1, False

    def _next(self) -> int:
        self.seq = sp.next_seq(self.seq)
        return self.seq

    async def births(self, session: Session, statuses: Mapping[str, bool]) -> None:
        """NBIRTH (seq 0), then DBIRTH of every online device; first wait for the primary
        host, if there is one (returns without births if stopped meanwhile)."""
        self.node_born, self.rebirth = False, False
        self.born.clear()
        if not self.host_online:
            log.info("sparkplug: waiting for the primary host", host=self.host)
        while not self.host_online and not self.wake.stopping:
            await self.wake.sleep(HOST_WAIT)
        if not self.host_online or self.leaving:
            return
        self.seq = 0
        await session.publish(self.nbirth_topic, sp.nbirth(bd_seq=self.bd_seq, seq=0, ts=_now()),
                               0, False)
        self.node_born = True
        for device in self.metrics.devices:
            if statuses.get(device):
                await self.device_birth(session, device)

    def dbirth(self, device: str, quality: sp.Quality) -> Message | None:
        """`device`'s DBIRTH with the next seq and its last values, or None if it has no
        metrics (removed by a reload); the device counts as born from now on."""
        metrics, data = self.metrics.device(device), self.data(device)
        if metrics is None:
            return None
        last = data.samples(quality) if data is not None else {}
        payload = sp.dbirth(metrics, last, seq=self._next(), ts=_now())
        self.born.add(device)
        return Message(sp.topic(self.group, "DBIRTH", self.node, device), payload, 0, False,
                       _now())

    async def device_birth(self, session: Session, device: str) -> None:
        message = self.dbirth(device, sp.Quality.GOOD)
        if message is not None:
            await session.publish(message.topic, message.payload, 0, False)

    def ddeath(self, device: str) -> Message:
        self.born.discard(device)
        return Message(sp.topic(self.group, "DDEATH", self.node, device),
                       sp.ddeath(seq=self._next(), ts=_now()), 0, False, _now())

    async def death(self, session: Session) -> None:
        """NDEATH now (a clean stop or the primary host gone): QoS 1, the will's bdSeq."""
        self.node_born = False
        self.born.clear()
        await session.publish(self.ndeath_topic, sp.ndeath(bd_seq=self.bd_seq, ts=_now()), 1,
                              False)

    def sequence(self, messages: Sequence[Message], online: Mapping[str, bool]) -> list[Message]:
        """Buffered DDATA as it goes on the wire: each with the next seq, a device not born
        given its DBIRTH first (and its DDEATH after, unless it is online)."""
        if not self.node_born:
            raise BrokerError("sparkplug: no NBIRTH on this connection yet")
        prefix, out, dying = self.ddata_prefix, [], []
        for message in messages:
            topic = message.topic
            if not topic.startswith(prefix):
                out.append(message)  # not ours (readings stored before format: sparkplug)
                continue
            device = topic[len(prefix):]
            if device not in self.born:
                up = online.get(device) is True
                birth = self.dbirth(device, sp.Quality.GOOD if up else sp.Quality.STALE)
                if birth is None:
                    log.warning("sparkplug: reading of a device no longer configured dropped",
                                device=device)
                    continue
                out.append(birth)
                if not up:
                    dying.append(device)
            payload = message.payload
            if message.ts <= self.changed_at:
                metrics = self.metrics.device(device)
                still = known(payload, metrics.by_alias) if metrics is not None else None
                if still is None:
                    continue
                payload = still
            out.append(Message(topic, sequenced(payload, self._next()), 0, False, message.ts))
        out += [self.ddeath(device) for device in dying]
        return out

    def historical(self, messages: list[Message]) -> list[Message]:
        """Replayed readings: DDATA re-encoded with is_historical, keeping only the metrics
        the device still has (its DBIRTH names no other alias); others as they are."""
        out = []
        prefix = self.ddata_prefix
        for m in messages:
            if not m.topic.startswith(prefix):
                out.append(m)
                continue
            device = self.metrics.device(m.topic[len(prefix):])
            payload = historical(m.payload, device.by_alias if device is not None else None)
            if payload is not None:
                out.append(Message(m.topic, payload, m.qos, False, m.ts))
        return out

    # --- incoming ---------------------------------------------------------------------------

    def on_message(self, message: Incoming) -> bool:
        """Whether `message` was the node's (NCMD, DCMD, STATE), handled here."""
        topic = message.topic
        if topic == self.state_topic:
            self._state(message.payload)
        elif topic == self.ncmd_topic:
            self._ncmd(topic, message.payload)
        elif topic.startswith(self.dcmd_prefix):
            self._dcmd(topic, topic[len(self.dcmd_prefix):], message.payload)
        else:
            return False
        return True

    def _ncmd(self, topic: str, payload: bytes) -> None:
        try:
            command = parse_ncmd(payload)
        except CommandRefused as exc:
            self.writes().refuse(topic, "?", exc.reason)
            return
        for refusal in command.refused:
            self.writes().refuse(topic, refusal.metric, refusal.reason)
        if command.rebirth:
            log.info("sparkplug: rebirth asked for (NCMD)")
            self.rebirth = True
            self.wake.set()

    def _dcmd(self, topic: str, device: str, payload: bytes) -> None:
        writes = self.writes()
        metrics = self.metrics.device(device)
        if metrics is None:
            writes.refuse(topic, "?", f"unknown device {device!r}")
            return
        try:
            found: list[Write | Refusal] = parse_dcmd(metrics, payload)
        except CommandRefused as exc:
            writes.refuse(topic, "?", exc.reason)
            return
        for item in found:
            if isinstance(item, Refusal):
                log.warning("sparkplug command refused", topic=topic, metric=item.metric,
                            reason=item.reason)
                writes.refuse(topic, item.metric, item.reason)
            else:
                writes.write(topic, device, item.point.name, item.value)

    def _state(self, payload: bytes) -> None:
        parsed = _parse_state(payload)
        if parsed is None:
            log.warning("sparkplug: STATE of the primary host is not understood",
                        host=self.host, payload=payload[:100].decode("utf-8", "replace"))
            return
        online, ts = parsed
        if ts < self.host_ts:
            return  # an older STATE than the last (tck-id-host-topic-phid-... timestamps)
        self.host_ts = ts
        if online and not self.host_online:
            log.info("sparkplug: primary host online", host=self.host)
        elif not online and self.host_online:
            log.warning("sparkplug: primary host offline: NDEATH and disconnect",
                        host=self.host)
            self.leaving = self.node_born or self.leaving
        self.host_online = online
        self.wake.set()


def _parse_state(payload: bytes) -> tuple[bool, int] | None:
    """(online, timestamp) of a Sparkplug 3.0 STATE payload, or None if it is none."""
    try:
        state = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(state, dict):
        return None
    online, ts = state.get("online"), state.get("timestamp", 0)
    if not isinstance(online, bool) or not isinstance(ts, int):
        return None
    return online, ts
