"""`sbrbench generate`: JSON output, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sbrbench.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_generate_json() -> None:
    r = _run("generate", "--prompt", "hello", "--max-tokens", "5", "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["tokens"]) == 5 and out["prompt_tokens"] == 5
    assert set(out["timings"]) >= {"ttft_s", "e2e_s"}


@pytest.mark.parametrize("args,msg", [
    (["generate", "--prompt-ids", "1,2,999"], "outside the vocabulary"),
    (["generate", "--prompt-ids", "1,x"], "comma-separated"),
    (["generate", "--preset", "huge", "--prompt", "a"], "unknown preset"),
    (["generate", "--checkpoint", "/nonexistent/ckpt", "--prompt", "a"], "not a directory"),
    (["generate"], "exactly one of"),
])
def test_generate_bad_input(args: list[str], msg: str) -> None:
    r = _run(*args)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and msg in lines[0], r.stderr
    assert "Traceback" not in r.stderr
