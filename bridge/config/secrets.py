"""Secret references in config values: `${env:NAME}`, `${file:/path}`, `${credential:NAME}`.

References are substituted in the parsed YAML data, before validation, so a secret can stand
in any string value (or part of one). The paths that held a reference are returned, so the
error reporter can show `<secret>` instead of echoing the value. Problems name the reference,
never what it resolved to.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

# A path into parsed YAML data, e.g. ("devices", 0, "points", 3, "type").
Loc: TypeAlias = tuple[str | int, ...]

_REFERENCE = re.compile(r"\$\{(?P<source>[A-Za-z_]+):(?P<name>[^}]*)\}")
# systemd credential names are file names in $CREDENTIALS_DIRECTORY: refuse anything that
# could walk out of it.
_CREDENTIAL_NAME = re.compile(r"[A-Za-z0-9_.@-]+")


@dataclass(frozen=True)
class Substituted:
    """Data with every reference replaced, where references were, and what could not resolve."""

    data: Any
    secret_paths: frozenset[Loc]
    problems: list[tuple[Loc, str]]
    values: frozenset[str] = frozenset()  # what the references resolved to, for redaction


def substitute(data: Any, environ: Mapping[str, str]) -> Substituted:
    """Replace every secret reference in the string values of `data` (not in keys)."""
    paths: set[Loc] = set()
    problems: list[tuple[Loc, str]] = []
    values: set[str] = set()

    def walk(value: Any, at: Loc) -> Any:
        if isinstance(value, dict):
            return {key: walk(item, (*at, key)) for key, item in value.items()}
        if isinstance(value, list):
            return [walk(item, (*at, index)) for index, item in enumerate(value)]
        if isinstance(value, str) and _REFERENCE.search(value):
            paths.add(at)

            def replace(match: re.Match[str]) -> str:
                resolved, problem = _resolve(match["source"], match["name"], environ)
                if problem:
                    problems.append((at, f"secret {match[0]} {problem}"))
                elif resolved:
                    values.add(resolved)
                return resolved

            return _REFERENCE.sub(replace, value)
        return value

    return Substituted(walk(data, ()), frozenset(paths), problems, frozenset(values))


def _resolve(source: str, name: str, environ: Mapping[str, str]) -> tuple[str, str]:
    """(value, "") or ("", why it could not be resolved)."""
    if source == "env":
        return (environ[name], "") if name in environ else ("", "is not set")
    if source == "credential":
        directory = environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            return "", "cannot be read: $CREDENTIALS_DIRECTORY is not set"
        if not _CREDENTIAL_NAME.fullmatch(name):
            return "", "is not a valid credential name"
        return _read(Path(directory) / name)
    if source == "file":
        return _read(Path(name))
    return "", "has an unknown source: use env, file or credential"


# A password, a token or a certificate path: far below this. Anything bigger is a mistake.
MAX_SECRET_BYTES = 64 * 1024


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them; never blocks.

    Opening a FIFO for reading waits for a writer and /dev/zero never ends: either would hang
    `validate`, start-up or a reload. Raises OSError with a reason a person can act on.
    """
    # O_NONBLOCK makes open() return at once even on a FIFO; fstat then refuses it.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO or a device?)")
        data = b""
        while len(data) <= limit and (chunk := os.read(fd, limit + 1 - len(data))):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {_size(limit)}")
    return data


def _size(limit: int) -> str:
    return f"{limit // 2**20} MiB" if limit >= 2**20 else f"{limit // 1024} KiB"


def _read(path: Path) -> tuple[str, str]:
    try:
        text = read_bounded(path, MAX_SECRET_BYTES).decode("utf-8")
    except OSError as exc:
        return "", f"cannot be read: {exc.strerror}"
    except UnicodeDecodeError:
        return "", "cannot be read: not UTF-8 text"
    # Files written with `echo` end in a newline that is not part of the password.
    return (text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")), ""
