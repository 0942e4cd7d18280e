"""The row format: one put()'s messages (a poll's) packed into one BLOB, and back.

One row per poll rather than one per message: much of SQLite's cost is per row (a B-tree
cell, a statement step, a Python tuple each way), and a 100-point poll stored as one row pays it
once (bench/buffer.py: a live per-point message 3-5x cheaper). The encoding is our own and
trivially safe to read from an untrusted file (no pickle, no eval): fixed-size little-endian
headers, then the bytes they count. Version 1:

    version: u8 = 1 | count: u32 | count x (topic_len: u32, payload_len: u32, ts: i64,
    flags: u8) | the topics and payloads, in message order (topic 0, payload 0, topic 1, ...)

`flags` holds qos in bits 0-1 and retain in bit 2. `ts` is epoch ms, signed as SQLite's
INTEGER. A row that does not decode to exactly its bytes raises `CorruptRow`; the store skips it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from functools import lru_cache

from bridge.core.messages import Message

VERSION = 1
_HEAD = struct.Struct("<BI")
_ITEM = struct.Struct("<IIqB")
_RETAIN = 4
_FLAGS = _RETAIN | 3


class CorruptRow(ValueError):
    """A row's BLOB is not one this version wrote (damaged, truncated, or another format)."""


@lru_cache(maxsize=64)
def _headers(count: int) -> struct.Struct:
    """One Struct for a whole row's headers: one pack/unpack call, not one per message."""
    return struct.Struct("<" + "IIqB" * count)


def pack(messages: Sequence[Message]) -> tuple[bytes, int]:
    """(the row's BLOB, its size as the bounds count it: UTF-8 topic + payload bytes)."""
    fields: list[int] = []
    body: list[bytes] = []
    size = 0
    for m in messages:
        topic = m.topic.encode()
        payload = m.payload
        fields += (len(topic), len(payload), m.ts, m.qos | (_RETAIN if m.retain else 0))
        body += (topic, payload)
        size += len(topic) + len(payload)
    heads = _headers(len(messages)).pack(*fields)
    return b"".join((_HEAD.pack(VERSION, len(messages)), heads, *body)), size


def sizes(messages: Sequence[Message]) -> list[int]:
    """Each message's size as the bounds count it."""
    return [(len(m.topic) if m.topic.isascii() else len(m.topic.encode())) + len(m.payload)
            for m in messages]


def unpack(blob: bytes, count: int) -> tuple[Message, ...]:
    """The `count` messages packed in `blob`; CorruptRow if it is not exactly that."""
    try:
        version, n = _HEAD.unpack_from(blob, 0)
    except (struct.error, TypeError):
        raise CorruptRow("too short for a row header") from None
    if version != VERSION:
        raise CorruptRow(f"row format {version}, this version reads {VERSION}")
    start = _HEAD.size + n * _ITEM.size
    if n != count or n < 1 or start > len(blob):
        raise CorruptRow(f"{n} messages in the row, {count} in its count column")
    fields = iter(_headers(n).unpack_from(blob, _HEAD.size))
    out: list[Message] = []
    pos = start
    try:
        for topic_len, payload_len, ts, flags in zip(fields, fields, fields, fields, strict=True):
            if flags > _FLAGS or flags & 3 == 3:
                raise CorruptRow(f"flags {flags:#x} are no qos and retain")
            end = pos + topic_len
            tail = end + payload_len
            out.append(Message(blob[pos:end].decode(), blob[end:tail], flags & 3,
                               bool(flags & _RETAIN), ts))
            pos = tail
    except UnicodeDecodeError:
        raise CorruptRow("a topic is not UTF-8") from None
    if pos != len(blob):
        raise CorruptRow(f"the headers count {pos} bytes, the row has {len(blob)}")
    return tuple(out)
