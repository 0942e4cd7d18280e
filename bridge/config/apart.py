"""The daemon's config load, in a child process.

Reading a config builds the YAML document with its line numbers and validates it more than
once (the whole file, then each device for located cross-checks): at 500 devices x 30 points
that peak is ~12 MiB, and after it is freed the allocator keeps most of it (pymalloc returns
an arena only once it is empty). A daemon runs for years with that in its RSS, and a reload
adds its own peak. Here a child reads and checks the file and hands back the result pickled:
the daemon only unpickles what it runs (points equal across devices arrive as one object,
bridge.config.loader.share_points), and the peak dies with the child.

`run` loads at start-up with it and the reload does the same, off the event loop (as before,
in a thread: bridge.daemon). One-off commands load in process: they exit soon anyway.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bridge.errors import ConfigError, ConfigIssue

if TYPE_CHECKING:
    from bridge.config.model import Config

# The directory holding the `bridge` package: the child imports this same code, whatever the
# parent's working directory or way of starting.
_ROOT = str(Path(__file__).resolve().parent.parent.parent)


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
        out.write(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
