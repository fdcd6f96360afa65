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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    with replacing(Path(path)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(_clean(doc), f, indent=1, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, as write_json_atomic does."""
    with replacing(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temp file beside `path` for the block to fill; it replaces `path` when the block ends
    (a reader never sees a torn file) and is removed if the block fails. A place that refuses
    the write is a UserError naming `path`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise UserError(f"{path}: cannot write there ({e.strerror or e})") from None
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: cannot write there ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


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


def latency_basis(doc: dict[str, Any]) -> str:
    """'modelled' when a result's latencies come from the simulator's cost model (`--target
    sim`), else 'measured'."""
    tgt = doc.get("target")
    if isinstance(tgt, dict) and (tgt.get("ttft") == "modelled" or tgt.get("kind") == "sim"):
        return "modelled"
    return "measured"


# ----------------------------------------------------------------------------- output paths

OUTPUT_DIR = Path("sbr-results")  # where results go unless --out says otherwise (cwd-relative)

# The --force help of every verb that writes: one behaviour for all of them.
FORCE_HELP = "overwrite an existing output file (without it an existing file is never replaced)"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def default_out(scenario: str, policy: str, stamp: str, root: Path = OUTPUT_DIR) -> Path:
    """`sbr-results/<scenario>-<policy>-<timestamp>.json`."""
    return root / f"{scenario}-{_safe(policy)}-{stamp}.json"


def sibling_out(out: Path, policy: str) -> Path:
    """`x.json` -> `x-<policy>.json`, for runs of several policies from one `--out`."""
    return out.with_name(f"{out.stem}-{_safe(policy)}{out.suffix or '.json'}")


def _is_dir_name(text: str) -> bool:
    return text.endswith(("/", os.sep)) or Path(text).expanduser().is_dir()


def run_outputs(out: str | Path | None, names: list[str], scenario: str, stamp: str, *,
                force: bool = False) -> list[Path]:
    """The result file of each policy run of one `sbrbench run`, all checked before the first
    request: `--out x.json` for one policy, `x-<policy>.json` for several, else the defaults
    (`sbr-results/<scenario>-<policy>-<time>.json`)."""
    defaults = [default_out(scenario, n, stamp) for n in names]
    if out is None or len(names) == 1:
        return [output_path(out, d, force=force) for d in defaults]
    if _is_dir_name(str(out)):
        raise UserError(f"--out {out}: is a directory; give a file name (each policy writes "
                        f"NAME-<policy>.json beside it)")
    return [output_path(sibling_out(Path(out), n), d, force=force)
            for n, d in zip(names, defaults, strict=True)]


def output_path(
    out: str | Path | None,
    default: Path,
    *,
    force: bool = False,
    flag: str = "--out",
    rewritable: Callable[[Path], bool] | None = None,
) -> Path:
    """Where a verb will write, checked before it does any work: `out` as given, else `default`
    (a default name already taken gets a fresh `-2`, `-3`... suffix: defaults never replace a
    file). One-line UserErrors, naming `flag`: `out` is a directory (or ends in a slash), is
    not a regular file, exists without `force` (unless `rewritable(path)` says the verb made it
    and may refresh it), or lies where no file can be created (a parent that is a file, a
    read-only or missing place). Creates nothing but a probe file, removed at once."""
    if out is None:
        path = _fresh(default)
        _check_place(path, f"{path} (the default; {flag} FILE writes elsewhere)")
        return path
    text = str(out)
    path = Path(text).expanduser()
    if _is_dir_name(text):
        raise UserError(f"{flag} {text}: is a directory; give a file name "
                        f"(e.g. {path / default.name})")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise UserError(f"{flag} {text}: exists and is not a regular file")
        if not force and not (rewritable is not None and rewritable(path)):
            raise UserError(f"{flag} {text}: the file exists; pass --force to overwrite it, "
                            "or give another name")
    _check_place(path, f"{flag} {text}")
    return path


def _fresh(path: Path) -> Path:
    """`path`, or the first of `stem-2.ext`, `stem-3.ext`... that does not exist."""
    k = 2
    fresh = path
    while fresh.exists() or fresh.is_symlink():
        fresh = path.with_name(f"{path.stem}-{k}{path.suffix}")
        k += 1
    return fresh


def _check_place(path: Path, what: str) -> None:
    """The nearest existing folder above `path` must be a folder that accepts a new file
    (probed by creating one: permission bits say nothing to root or on a read-only mount);
    errors start with `what`."""
    folder = path.absolute().parent
    here = folder
    while not (here.exists() or here.is_symlink()) and here != here.parent:
        here = here.parent
    if not here.is_dir():
        raise UserError(f"{what}: {here} is not a directory" if here == folder else
                        f"{what}: cannot create the folder {folder} ({here} is not a directory)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sbrbench-probe-", dir=here)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{what}: cannot write in {here} ({e.strerror or e})") from None


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def argv() -> list[str]:
    return list(sys.argv)
