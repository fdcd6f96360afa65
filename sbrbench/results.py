"""Result files: the `sbrbench.result/v1` JSON, atomic rewrites, environment capture, loading.

This module owns the JSON boundary: everything else passes plain rows (dicts) here, and every
file another verb reads (result, decay, bench, sim) is loaded and classified here.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from engine.errors import UserError

RESULT_SCHEMA = "sbrbench.result/v1"
DECAY_SCHEMA = "sbrbench.decay/v1"
COMPARE_SCHEMA = "sbrbench.compare/v1"

# Above this size a file is rewritten at most every THROTTLE_S seconds (and always at the end):
# rewriting a 12k-row trace result after every row would be quadratic in bytes written.
THROTTLE_BYTES = 1 << 20
THROTTLE_S = 1.0

_REPO_ROOT = Path(__file__).resolve().parent.parent


def now_iso() -> str:
    """The current local time as ISO-8601 with offset, to the second."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def git_sha(root: Path = _REPO_ROOT) -> str | None:
    """HEAD of the checkout the package runs from (with `-dirty` when it has changes), or None."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha or None


def capture_env() -> dict[str, Any]:
    """Where a result was measured: host, versions, GPU name, git sha."""
    from sbrbench import __version__

    env: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": None,
        "cuda": None,
        "gpu": None,
        "git_sha": git_sha(),
        "sbrbench": __version__,
    }
    try:
        import torch
    except ImportError:
        return env
    env["torch"] = torch.__version__
    env["cuda"] = torch.version.cuda
    try:
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    except RuntimeError:  # a broken driver must not lose the run
        pass
    return env


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become None (strict JSON has neither), tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    """Write `doc` to `path` via a temp file in the same directory and os.replace (never torn)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_clean(doc), f, indent=1, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResultWriter:
    """One run's result file: rows appended, the whole file rewritten atomically as it goes.

    Every write refreshes the counts (`requests`, `failed`), the per-phase `summary`, the run's
    `throughput` (goodput under the header's `slo`, when it has one) and `warnings` (how many
    rows carry each). The file says `"partial": true` until `finish()`, and after it too when a
    request failed or the run stopped early (`stopped` says why); every row appended so far is
    kept whatever happens.
    """

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = Path(path)
        self.doc: dict[str, Any] = {"schema": RESULT_SCHEMA, **header}
        self.doc.setdefault("created", now_iso())
        self.doc["partial"] = True
        self.doc["rows"] = []
        self.doc["summary"] = {}
        self._last_write = 0.0
        self._last_size = 0
        self._write()

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.doc["rows"]

    @property
    def failed(self) -> int:
        return sum(1 for r in self.rows if r.get("error"))

    def append(self, row: dict[str, Any]) -> None:
        """Add one finished request's row and persist it."""
        self.rows.append(row)
        throttled = self._last_size > THROTTLE_BYTES
        if not throttled or time.monotonic() - self._last_write >= THROTTLE_S:
            self._write()

    def finish(
        self,
        *,
        partial: bool = False,
        reason: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Final rewrite: summary, `partial` flag (also set by any failed request), why it
        stopped early (if it did)."""
        if extra:
            self.doc.update(extra)
        self.doc["partial"] = partial or self.failed > 0
        if reason:
            self.doc["stopped"] = reason
        self.doc["finished"] = now_iso()
        self._write()

    def _write(self) -> None:
        from sbrbench.stats import run_throughput, summarize_rows

        rows = self.rows
        self.doc["requests"] = len(rows)
        self.doc["failed"] = self.failed
        self.doc["summary"] = summarize_rows(rows)
        self.doc["throughput"] = run_throughput(rows, self.doc.get("slo"))
        self.doc["warnings"] = warning_counts(rows)
        write_json_atomic(self.path, self.doc)
        self._last_write = time.monotonic()
        try:
            self._last_size = self.path.stat().st_size
        except OSError:
            self._last_size = 0


def warning_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many rows carry each warning."""
    counts: dict[str, int] = {}
    for r in rows:
        for w in r.get("warnings") or ():
            counts[str(w)] = counts.get(str(w), 0) + 1
    return counts


def load_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object from `path`; empty, unreadable or corrupt files are UserErrors."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    if not text.strip():
        raise UserError(f"{path}: empty file")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def file_kind(doc: dict[str, Any]) -> str:
    """'result', 'decay', 'bench', 'sim', 'compare' from the schema tag, or 'unknown'."""
    schema = doc.get("schema")
    if not isinstance(schema, str) or not schema.startswith("sbrbench."):
        return "unknown"
    return schema.removeprefix("sbrbench.").split("/")[0]


def load_result(path: Path) -> dict[str, Any]:
    """Load and check a `sbrbench.result/v1` file (rows must be a list of objects)."""
    doc = load_json(path)
    if doc.get("schema") != RESULT_SCHEMA:
        raise UserError(f"{path}: not a result file (schema {doc.get('schema')!r})")
    rows = doc.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{path}: 'rows' must be a list of objects")
    if not isinstance(doc.get("scenario"), str):
        raise UserError(f"{path}: missing 'scenario'")
    return doc


def policy_of(doc: dict[str, Any]) -> str:
    """The policy a result was measured under (or the target kind when it has none)."""
    if str(doc.get("schema", "")).startswith("sbrbench.decay"):  # no policy: name the model
        src = doc.get("source")
        label = src.get("name") or src.get("path") if isinstance(src, dict) else src
        return str(label or "?")
    eng = doc.get("engine") or {}
    pol = eng.get("policy") if isinstance(eng, dict) else None
    if pol:
        return str(pol)
    tgt = doc.get("target") or {}
    return str(tgt.get("kind", "?")) if isinstance(tgt, dict) else "?"


OUTPUT_DIR = Path("sbr-results")  # where results go unless --out says otherwise (cwd-relative)


def default_out(scenario: str, policy: str, stamp: str, root: Path = OUTPUT_DIR) -> Path:
    """`sbr-results/<scenario>-<policy>-<timestamp>.json`."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in policy)
    return root / f"{scenario}-{safe}-{stamp}.json"


def sibling_out(out: Path, policy: str) -> Path:
    """`x.json` -> `x-<policy>.json`, for runs of several policies from one `--out`."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in policy)
    return out.with_name(f"{out.stem}-{safe}{out.suffix or '.json'}")


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def argv() -> list[str]:
    return list(sys.argv)
