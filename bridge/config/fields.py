"""The config format's value types: durations, sizes (parsed by bridge.units), names, and the
strict base model.

Strict: numbers and booleans are what YAML typed them as (a quoted "14" is refused, as the
JSON Schema says); a duration or a size may also be written with its unit (`250ms`, `256MiB`).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from bridge.units import parse_duration, parse_size

_NAME_CHARS = "[A-Za-z0-9_-]"


Duration = Annotated[
    float, BeforeValidator(parse_duration, json_schema_input_type=str | float), Field(ge=0)
]
Size = Annotated[int, BeforeValidator(parse_size, json_schema_input_type=str | int)]
Name = Annotated[str, StringConstraints(pattern=f"^{_NAME_CHARS}+$")]


class _Model(BaseModel):
    # Validators are built at first validation, not at import (a one-off command that reads
    # no config pays nothing for them). The daemon holds its config as bridge.config.frozen
    # objects: fields travel by themselves, but a method or property it uses must live in a
    # mixin both share (bridge.config.frozen.ConfigMethods, bridge.config.pointmethods).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, defer_build=True)
