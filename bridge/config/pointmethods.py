"""What a point offers beyond its fields, shared by the `Point` model (bridge.config.devices)
and its frozen twin in the daemon (bridge.config.frozen): no pydantic here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridge.registers import BIT_TABLES, register_count

if TYPE_CHECKING:
    from bridge.registers import ByteOrder, PointType, Table


class PointMethods:
    """What `Point` offers beyond its fields (mixed into the model and its frozen twin)."""

    __slots__ = ()
    if TYPE_CHECKING:
        byte_order: ByteOrder | None
        table: Table
        type: PointType
        count: int | None

    @property
    def order(self) -> ByteOrder:
        """The byte order to decode with (set by the loader; ABCD when built by hand)."""
        return self.byte_order or "ABCD"

    @property
    def size(self) -> int:
        """Registers (or bits, on coil/discrete tables) this point spans."""
        return 1 if self.table in BIT_TABLES else register_count(self.type, self.count)
