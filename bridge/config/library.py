"""The device library: register maps of real devices shipped in the package (`bridge/maps/`).

A device names one with `map: library:NAME`. The files are read by path, like any map file, so
a problem in one is located `file:line: path: message` in that file; each names the source of
its register facts (`source:`, and bridge/maps/NOTICE).
"""

from __future__ import annotations

from pathlib import Path

PREFIX = "library:"
# `map: sunspec` names no file: the device's points are its SunSpec model chain, walked when
# the daemon starts (bridge.sunspec_maps). The simulator serves such a device as a SunSpec
# inverter (bridge.sim.sunspec).
SUNSPEC = "sunspec"


def library_dir() -> Path:
    """Where the packaged maps are. setuptools installs package data as plain files (wheel,
    editable and checkout alike), so the Traversable is a filesystem path."""
    # Imported here: the daemon imports this module for SUNSPEC only, and importlib.resources
    # brings tempfile and shutil (0.7 MiB of RSS, bench/rss.py).
    from importlib.resources import files  # noqa: PLC0415 - see above

    return Path(str(files("bridge") / "maps"))


def library_names() -> list[str]:
    """Every map in the library, by name (its file name without `.yaml`), sorted."""
    return sorted(path.stem for path in library_dir().glob("*.yaml"))


def library_path(name: str) -> Path | None:
    """The file of library map `name`, or None if there is none (names are looked up, never
    joined blindly, so `library:../x` cannot reach outside the library)."""
    return library_dir() / f"{name}.yaml" if name in library_names() else None


def unknown_map(name: str) -> str:
    """A one-line message for a name the library lacks, with the nearest names if any."""
    import difflib  # noqa: PLC0415 - a mistake's path only (see library_dir)

    names = library_names()
    # "sdm630" is in "eastron-sdm630" but only 60 % similar to it: containment first.
    near = [n for n in names if name.lower() in n] or difflib.get_close_matches(
        name.lower(), names, n=3, cutoff=0.5
    )
    hint = (
        f"did you mean {' or '.join(near[:3])}?" if near
        else f"'m2m-bridge maps list' shows the {len(names)} maps"
    )
    return f"unknown library map {name!r} ({hint})"
