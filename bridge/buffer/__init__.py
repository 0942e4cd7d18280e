"""The buffer between polling and publishing: bounded, ordered, transactional.

Polling puts messages in and never waits; the publisher takes a batch, and either acknowledges
it (delivered: gone) or returns it (not delivered: back at the front, order kept). This is
Telegraf's transactional output buffer. Bounds are count and bytes; when full the oldest go
first and are counted, because for telemetry the newest reading is the one worth keeping.

`DiskBuffer` is that buffer, stored in SQLite so it survives restarts and power loss; it keeps
rows by id until they are acknowledged, a row being one put()'s messages (a poll's). A full disk
must never wedge it.

`store` (the SQLite queue: transactions, put/take/ack/requeue), `rows` (a put's messages packed
into one BLOB and back), `schema` (the table, and the upgrade of a one-row-per-message file),
`bounds` (count, bytes and age: which rows to drop), `disk` (WAL sizing, headroom, the reserve
file, freeing, readings it could not store), `spans` (ranges of in-flight ids take() skips).
Import from here.
"""

from bridge.buffer.store import DiskBuffer, Stored

__all__ = ["DiskBuffer", "Stored"]
