"""The daemon's config load, in a child process.

Reading a config builds the YAML document with its line numbers and validates it more than
once (the whole file, then each device for located cross-checks): at 500 devices x 30 points
that peak is ~12 MiB, and after it is freed the allocator keeps most of it (pymalloc returns
an arena only once it is empty). A daemon runs for years with that in its RSS, and a reload
adds its own peak. Here a child reads and checks the file and hands back the result pickled:
the daemon only unpickles what it runs (points equal across devices arrive as one object,
bridge.config.loader.share_points), and the peak dies with the child. The models arrive as
bridge.config.frozen objects: the daemon never imports pydantic (~9 MiB resident).

`run` loads at start-up with it and the reload does the same, off the event loop (as before,
in a thread: bridge.daemon). One-off commands load in process: they exit soon anyway.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bridge.config import frozen
from bridge.errors import ConfigError, ConfigIssue

if TYPE_CHECKING:
    from bridge.config.model import Config

# The directory holding the `bridge` package: the child imports this same code, whatever the
# parent's working directory or way of starting.
_ROOT = str(Path(__file__).resolve().parent.parent.parent)

T = TypeVar("T")


def load_config_apart(path: str | Path, *, check_state_dir: bool = False) -> Config:
    """load_config(path) run in a child process (same environment); raises ConfigError as
    it does, or one naming why the child failed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, env.get("PYTHONPATH")]))
    args = [sys.executable, "-m", "bridge.config.apart", str(path)]
    if check_state_dir:
        args.append("--check-state-dir")
    try:
        child = subprocess.run(args, env=env, capture_output=True, check=False)
    except OSError as exc:
        raise _failed(path, f"cannot start the config loader ({exc.strerror or exc})") from None
    if child.returncode != 0:
        lines = child.stderr.decode(errors="replace").strip().splitlines()
        why = lines[-1] if lines else f"exit status {child.returncode}"
        raise _failed(path, f"the config loader failed: {why}")
    kind, result = pickle.loads(child.stdout)  # our own child, over a pipe: trusted
    if kind == "issues":
        raise ConfigError(result)
    return result  # type: ignore[no-any-return]


def _failed(path: str | Path, message: str) -> ConfigError:
    return ConfigError([ConfigIssue(str(path), 0, "", message)])


def _main(argv: list[str]) -> int:
    """The child: load, then write ("config", Config) or ("issues", [ConfigIssue]) pickled
    to the stdout it was given. Anything else it prints goes to stderr."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print or log line must not corrupt the pickle
    from bridge.config.loader import load_config  # noqa: PLC0415 - after the redirect

    try:
        result: tuple[str, object] = (
            "config", load_config(argv[0], check_state_dir="--check-state-dir" in argv[1:]))
    except ConfigError as exc:
        result = ("issues", exc.issues)
    with out:
        out.write(frozen_pickle(result))
    return 0


def frozen_pickle(obj: object) -> bytes:
    """`obj` pickled with every pydantic model in it as a bridge.config.frozen object: what
    unpickles it needs no pydantic."""
    buffer = io.BytesIO()
    _FrozenPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def freeze(obj: T) -> T:
    """`obj` with its models frozen, in process (a SunSpec map merged into the running config
    is then like the rest of it)."""
    return pickle.loads(frozen_pickle(obj))  # type: ignore[no-any-return]


class _FrozenPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, *, protocol: int) -> None:
        super().__init__(file, protocol=protocol)
        # One tuple of field names per class: pickled once, then referenced from the memo.
        self._fields: dict[type, tuple[str, ...]] = {}

    def reducer_override(self, obj: object) -> Any:
        from pydantic import BaseModel, SecretStr  # noqa: PLC0415 - loaded by now, here only

        if isinstance(obj, BaseModel):
            cls = type(obj)
            fields = self._fields.get(cls)
            if fields is None:
                fields = self._fields[cls] = (*cls.model_fields, *cls.__private_attributes__)
            return frozen.make, (cls.__name__, fields, tuple(getattr(obj, f) for f in fields))
        if isinstance(obj, SecretStr):
            return frozen.Secret, (obj.get_secret_value(),)
        return NotImplemented


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
