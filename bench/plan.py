"""Read requests per poll cycle against one request per point, for every configs/*.yaml.

A poll cycle is one poll of each of a device's poll groups (points with their own `interval`
form groups of their own), as `m2m-bridge plan` counts it; the planner is bridge.core.planner's.

    .venv/bin/python bench/plan.py                  # every configs/*.yaml
    .venv/bin/python bench/plan.py my/site.yaml     # or the files given
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from bridge.config import Config, SerialLink, TcpLink, load_config
from bridge.core.planner import plan_device, registers_spanned
from bridge.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Row:
    device: str
    link: str
    points: int
    requests: int
    spanned: int


def rows(config: Config) -> tuple[list[Row], list[str]]:
    """Planned Modbus devices, and the names of line-instrument devices (nothing to plan)."""
    planned: list[Row] = []
    lines: list[str] = []
    for device in config.devices:
        link = config.link(device.link)
        if not isinstance(link, TcpLink | SerialLink):
            lines.append(device.name)
            continue
        groups = plan_device(device.points, interval=device.interval,
                             max_registers=link.max_registers, max_gap=link.max_gap)
        planned.append(Row(
            device=device.name,
            link=f"{link.name} ({link.type})",
            points=sum(1 for p in device.points if p.address is not None),
            requests=sum(len(g.requests) for g in groups),
            spanned=registers_spanned(groups),
        ))
    return planned, lines


def report(path: Path, planned: list[Row], lines: list[str]) -> None:
    header = ("device", "link", "points", "requests/cycle", "registers spanned")
    total = Row("total", "", sum(r.points for r in planned), sum(r.requests for r in planned),
                sum(r.spanned for r in planned))
    table = [header] + [
        (r.device, r.link, str(r.points), str(r.requests), str(r.spanned))
        for r in [*planned, total]
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print(path)
    for row in table:
        cells = [c.ljust(w) if i < 2 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  " + "  ".join(cells).rstrip())
    if lines:
        print(f"  line instruments (one request per poll, not planned): {', '.join(lines)}")
    ratio = f"{total.points / total.requests:.1f} points per request" if total.requests else "-"
    print(f"  total: {total.requests} requests per cycle instead of {total.points} "
          f"(one per point), {ratio}, {total.spanned} registers spanned")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("configs", nargs="*", type=Path,
                        help="config files (default: configs/*.yaml of this repository)")
    args = parser.parse_args(argv)
    paths: list[Path] = args.configs or sorted((ROOT / "configs").glob("*.yaml"))
    if not paths:
        print("no configs found", file=sys.stderr)
        return 1
    failed = 0
    for index, path in enumerate(paths):
        if index:
            print()
        try:
            config = load_config(path)
        except ConfigError as exc:
            print(f"{path}: not loaded\n{exc}", file=sys.stderr)
            failed += 1
            continue
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        report(shown, *rows(config))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
