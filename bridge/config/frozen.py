"""The config as the daemon runs it: the models' values in plain frozen objects, no pydantic.

The daemon gets its config from the loader's child (bridge.config.apart), already validated.
Unpickling pydantic models would import pydantic (~9 MiB resident of the 35 DESIGN.md allows
at 10 x 100) to build nothing with it. So the child sends each model as its class name, its
field names and its values, and this module makes a `Frozen` object of a class of that name:
the same attributes, the same equality and hash, `model_copy(update=...)`, and the models'
own methods (`ConfigMethods`, `PointMethods`, shared with the pydantic classes). The daemon's
code is typed against the models and reads only attributes, so both run it alike; a class
check goes by a link's `type`, never by `isinstance` on a model class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from bridge.config.pointmethods import PointMethods

if TYPE_CHECKING:
    from typing_extensions import TypeIs

    from bridge.config.devices import Device, LineLink, Link, SerialLink
    from bridge.errors import ConfigIssue


def is_serial(link: Link) -> TypeIs[SerialLink]:
    """Whether `link` is Modbus RTU or ASCII on a serial port (the model or its twin)."""
    return link.type in ("rtu", "ascii")


def is_line(link: Link) -> TypeIs[LineLink]:
    """Whether `link` is a serial port of plain ASCII lines (the model or its twin)."""
    return link.type == "serial"


class ConfigMethods:
    """What `Config` offers beyond its fields (mixed into the model and its frozen twin)."""

    __slots__ = ()
    if TYPE_CHECKING:
        links: list[Link]
        devices: list[Device]
        _source: str
        _warnings: list[ConfigIssue]
        _secrets: frozenset[str]

    @property
    def source(self) -> str:
        """The path of the main config file, as given to load_config."""
        return self._source

    @property
    def secrets(self) -> frozenset[str]:
        """Every value a secret reference resolved to: logs and errors redact these."""
        return self._secrets

    @property
    def warnings(self) -> list[ConfigIssue]:
        """Legal but suspicious settings (a Modicon-style address), located like errors."""
        return self._warnings

    def link(self, name: str) -> Link:
        """The link called `name` (KeyError if there is none)."""
        for link in self.links:
            if link.name == name:
                return link
        raise KeyError(name)

    def device(self, name: str) -> Device:
        """The device called `name` (KeyError if there is none)."""
        for device in self.devices:
            if device.name == name:
                return device
        raise KeyError(name)


_METHODS: dict[str, type] = {"Config": ConfigMethods, "Point": PointMethods}


class Frozen:
    """A model's values, read-only. Equal to another of its class with equal values; hashed
    like a frozen pydantic model (its public fields' values)."""

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]]  # every value, private ones (`_source`) included
    _public: ClassVar[tuple[str, ...]]

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: {name} cannot be set")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self._fields)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, f) for f in self._public))

    def __repr__(self) -> str:
        values = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._public)
        return f"{type(self).__name__}({values})"

    def __reduce__(self) -> tuple[Any, ...]:
        return make, (type(self).__name__, self._fields, self._values())

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, f) for f in self._fields)

    def model_copy(self, *, update: Mapping[str, object] | None = None) -> Any:
        """A copy with `update`'s values (not checked, as pydantic's `model_copy`)."""
        values = dict(zip(self._fields, self._values(), strict=True)) | dict(update or {})
        return make(type(self).__name__, self._fields, tuple(values[f] for f in self._fields))


_CLASSES: dict[tuple[str, tuple[str, ...]], type[Frozen]] = {}


def make(name: str, fields: tuple[str, ...], values: tuple[object, ...]) -> Any:
    """The frozen object of model class `name` with these field values (what unpickling the
    child's config calls, bridge.config.apart). One class per name and fields."""
    cls = _CLASSES.get((name, fields))
    if cls is None:
        cls = _CLASSES[name, fields] = _define(name, fields)
    obj = object.__new__(cls)
    for field, value in zip(fields, values, strict=True):
        object.__setattr__(obj, field, value)
    return obj


def _define(name: str, fields: tuple[str, ...]) -> type[Frozen]:
    bases = (_METHODS[name], Frozen) if name in _METHODS else (Frozen,)
    namespace = {
        "__slots__": fields,
        "__module__": __name__,
        "_fields": fields,
        "_public": tuple(f for f in fields if not f.startswith("_")),
    }
    return type(name, bases, namespace)


class Secret:
    """A secret value (pydantic's SecretStr in the model): shown masked, read on purpose."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __reduce__(self) -> tuple[Any, ...]:
        return Secret, (self._value,)
