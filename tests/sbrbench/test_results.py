"""Result files: atomic rewrites, partial flag, env capture, loading errors."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.errors import UserError
from sbrbench import results
from sbrbench.results import ResultWriter, file_kind, load_json, load_result


def _row(i: int, phase: str = "build", **kw: object) -> dict:
    return {"i": i, "phase": phase, "ttft_s": 0.1 * (i + 1), "replay_tokens": i, **kw}


def test_writer_rewrites_after_every_row_and_marks_partial(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "r.json"
    w = ResultWriter(out, {"scenario": "deep-resume", "label": "x"})
    doc = json.loads(out.read_text())
    assert doc["schema"] == "sbrbench.result/v1" and doc["partial"] is True and doc["rows"] == []
    for i in range(3):
        w.append(_row(i))
        doc = json.loads(out.read_text())
        assert len(doc["rows"]) == i + 1
        assert doc["partial"] is True
        assert doc["summary"]["build"]["ttft_s"]["n"] == i + 1
    w.finish()
    doc = json.loads(out.read_text())
    assert doc["partial"] is False and "finished" in doc and "stopped" not in doc
    assert not list(out.parent.glob(".*.tmp")), "temp files must not be left behind"


def test_writer_finish_partial_keeps_rows_and_reason(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    w = ResultWriter(out, {"scenario": "round-robin"})
    w.append(_row(0, "round"))
    w.finish(partial=True, reason="interrupted")
    doc = load_result(out)
    assert doc["partial"] is True and doc["stopped"] == "interrupted" and len(doc["rows"]) == 1


def test_failed_requests_are_counted_and_make_the_file_partial(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    w = ResultWriter(out, {"scenario": "round-robin", "slo": {"ttft_s": 0.25}})
    w.append(_row(0, "round", t_s=0.0, done_s=0.5, generated_tokens=4, prompt_tokens=10))
    w.append(_row(1, "round", t_s=0.5, done_s=1.0, error="HTTP 503: busy",
                  warnings=["whole reply in one chunk"]))
    w.append(_row(2, "round", t_s=1.0, done_s=2.0, generated_tokens=4, prompt_tokens=10,
                  warnings=["whole reply in one chunk"]))
    doc = json.loads(out.read_text())  # while running: counts are there already
    assert doc["requests"] == 3 and doc["failed"] == 1 and doc["partial"] is True
    w.finish()
    doc = load_result(out)
    assert doc["partial"] is True and "stopped" not in doc and doc["failed"] == 1
    assert doc["warnings"] == {"whole reply in one chunk": 2}
    assert [r.get("error") for r in doc["rows"]] == [None, "HTTP 503: busy", None]
    tp = doc["throughput"]
    assert tp["completed"] == 2 and tp["failed"] == 1 and tp["duration_s"] == 2.0
    assert tp["slo"] == {"ttft_s": 0.25} and tp["slo_met"] == 1  # row 2: ttft 0.3 s


def test_nan_and_inf_become_null(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    w = ResultWriter(out, {"scenario": "trace"})
    w.append(_row(0, "prompt", extra=math.nan, other=(1, math.inf)))
    w.finish()
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    row = json.loads(text)["rows"][0]
    assert row["extra"] is None and row["other"] == [1, None]


def test_throttled_writes_still_flush_on_finish(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(results, "THROTTLE_BYTES", 0)
    monkeypatch.setattr(results, "THROTTLE_S", 3600.0)
    out = tmp_path / "r.json"
    w = ResultWriter(out, {"scenario": "trace"})
    w.append(_row(0))  # first append after the header write is throttled
    w.append(_row(1))
    w.finish()
    assert len(load_result(out)["rows"]) == 2


def test_atomic_write_failure_leaves_old_file(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    results.write_json_atomic(out, {"schema": "x", "v": 1})
    with pytest.raises(TypeError):
        results.write_json_atomic(out, {"schema": "x", "v": object()})
    assert json.loads(out.read_text())["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_env_capture_has_the_documented_keys() -> None:
    env = results.capture_env()
    for key in ("host", "python", "torch", "cuda", "gpu", "git_sha", "sbrbench"):
        assert key in env
    assert env["python"].count(".") == 2


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("", "empty file"),
        ("   \n", "empty file"),
        ("{bad", "not valid JSON (line 1"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_load_json_errors_are_user_errors(tmp_path: Path, text: str, msg: str) -> None:
    p = tmp_path / "f.json"
    p.write_text(text)
    with pytest.raises(UserError, match=msg.replace("(", r"\(")):
        load_json(p)


def test_load_result_checks_schema_and_rows(tmp_path: Path) -> None:
    p = tmp_path / "f.json"
    with pytest.raises(UserError, match="no such file"):
        load_result(p)
    p.write_text(json.dumps({"schema": "sbrbench.decay/v1"}))
    with pytest.raises(UserError, match="not a result file"):
        load_result(p)
    p.write_text(json.dumps({"schema": "sbrbench.result/v1", "scenario": "x", "rows": {}}))
    with pytest.raises(UserError, match="'rows' must be a list"):
        load_result(p)


def test_file_kind_and_paths() -> None:
    assert file_kind({"schema": "sbrbench.result/v1"}) == "result"
    assert file_kind({"schema": "sbrbench.decay/v1"}) == "decay"
    assert file_kind({"schema": "other"}) == "unknown"
    assert file_kind({}) == "unknown"
    assert (
        results.default_out("deep-resume", "tail-pin", "T").as_posix()
        == "sbr-results/deep-resume-tail-pin-T.json"
    )
    assert results.sibling_out(Path("a/x.json"), "lru").as_posix() == "a/x-lru.json"


# ----------------------------------------------------------------------------- output paths


def _refuses_writes(folder: Path) -> bool:
    try:
        (folder / ".probe").write_text("x")
    except OSError:
        return True
    (folder / ".probe").unlink()
    return False


@pytest.fixture(name="unwritable")
def unwritable_fixture(tmp_path: Path) -> Iterator[Path]:
    """A folder that refuses new files: a read-only one, or, for root (whom permission bits do
    not stop), sysfs."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if _refuses_writes(ro):
            yield ro
        elif Path("/sys").is_dir() and _refuses_writes(Path("/sys")):
            yield Path("/sys")
        else:
            pytest.skip("no folder here refuses a new file")
    finally:
        ro.chmod(0o700)


def test_output_path_refuses_directories_and_impossible_places(tmp_path: Path,
                                                               unwritable: Path) -> None:
    default = tmp_path / "d.json"
    (tmp_path / "f.txt").write_text("x")
    cases = [
        (str(tmp_path), "is a directory"),
        (f"{tmp_path / 'new'}/", "is a directory"),
        (str(tmp_path / "f.txt" / "x.json"), "is not a directory"),
        (str(unwritable / "x.json"), f"cannot write in {unwritable}"),
        (str(unwritable / "a" / "b" / "x.json"), f"cannot write in {unwritable}"),
    ]
    for out, msg in cases:
        with pytest.raises(UserError, match=msg) as e:
            results.output_path(out, default, flag="--out")
        assert str(e.value).startswith(f"--out {out}") and "\n" not in str(e.value)
    assert not (tmp_path / "new").exists()  # a check creates nothing


def test_output_path_keeps_an_existing_file_unless_forced(tmp_path: Path) -> None:
    old = tmp_path / "old.json"
    old.write_text("measured")
    with pytest.raises(UserError, match="the file exists; pass --force"):
        results.output_path(old, tmp_path / "d.json")
    assert results.output_path(old, tmp_path / "d.json", force=True) == old
    assert results.output_path(old, tmp_path / "d.json", rewritable=lambda p: True) == old
    assert old.read_text() == "measured"
    with pytest.raises(UserError, match="not a regular file"):
        results.output_path("/dev/null", tmp_path / "d.json", force=True)
    new = tmp_path / "a" / "b" / "new.json"
    assert results.output_path(str(new), tmp_path / "d.json") == new and not new.parent.exists()


def test_default_outputs_never_replace_a_file(tmp_path: Path) -> None:
    default = tmp_path / "r.json"
    assert results.output_path(None, default) == default
    default.write_text("1")
    (tmp_path / "r-2.json").write_text("2")
    assert results.output_path(None, default) == tmp_path / "r-3.json"


def test_run_outputs_checks_every_policy_before_the_first(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    paths = results.run_outputs(out, ["lru", "tail-pin"], "parity", "T")
    assert paths == [tmp_path / "x-lru.json", tmp_path / "x-tail-pin.json"]
    (tmp_path / "x-tail-pin.json").write_text("kept")
    with pytest.raises(UserError, match="x-tail-pin.json: the file exists"):
        results.run_outputs(out, ["lru", "tail-pin"], "parity", "T")
    with pytest.raises(UserError, match="is a directory"):
        results.run_outputs(f"{tmp_path}/", ["lru", "tail-pin"], "parity", "T")
    assert results.run_outputs(None, ["lru"], "parity", "T")[0].as_posix() == \
        "sbr-results/parity-lru-T.json"


def test_a_write_the_place_refuses_is_a_user_error(tmp_path: Path, unwritable: Path) -> None:
    with pytest.raises(UserError, match="cannot write there"):
        results.write_json_atomic(unwritable / "x.json", {"v": 1})
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(UserError, match="cannot write there"):
        results.write_text_atomic(tmp_path / "f.txt" / "x.md", "text")


def test_a_default_place_that_refuses_files_says_how_to_write_elsewhere(unwritable: Path) -> None:
    with pytest.raises(UserError, match=r"\(the default; --out FILE writes elsewhere\): cannot "
                                        r"write in"):
        results.output_path(None, unwritable / "sbr-results" / "d.json")
