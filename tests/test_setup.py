"""scripts/setup as a newcomer meets it: a Python that is too old is one clear line."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.integration  # starts processes or socket servers


def test_setup_refuses_a_python_older_than_3_11(tmp_path: Path) -> None:
    """Before touching .venv: exit 1 and one line naming the version found."""
    old = tmp_path / "python3.9"
    # Answers as an old interpreter would: the version check fails, the version is 3.9.18.
    old.write_text(
        "#!/bin/sh\n"
        'case "$*" in *version_info*) exit 1;; *python_version*) echo 3.9.18;; esac\n'
    )
    old.chmod(0o755)
    result = subprocess.run(
        [str(ROOT / "scripts" / "setup")], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHON": str(old)}, check=False,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"setup: m2m-bridge needs Python 3.11 or later; {old} is 3.9.18 "
        "(set PYTHON=/path/to/python3.11)"
    )
