"""Lint and types: ruff and mypy over the product and the tests, as part of the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("cmd", [
    ["ruff", "check", "engine", "sbrbench", "tests"],
    ["mypy", "engine", "sbrbench"],
], ids=["ruff", "mypy"])
def test_clean(cmd: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True, text=True,
                         timeout=280)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
