"""The command line as a whole: --version, and --help without torch or scipy."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from sbrbench import __version__
from sbrbench.cli import app


def test_version() -> None:
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"sbrbench {__version__}"


def test_help_imports_neither_torch_nor_scipy() -> None:
    code = ("import sys; from sbrbench.cli import app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"
