"""Every verb that writes checks where before it works: a directory, a place that refuses files or
an existing file (without --force) is one red line and exit 2, nothing measured is lost, and
results go to ./sbr-results/ unless --out says otherwise."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from sbrbench import cli_compare, cli_run
from sbrbench.cli import main
from sbrbench.render import make_console
from sbrbench.stats import summarize_rows
from sbrbench.tracefile import SAMPLE_TRACE

SMALL = ["--set", "turns=2", "--set", "pressure=2", "--set", "convs=2"]


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _result(path: Path, policy: str, ttft: float, scenario: str = "deep-resume") -> Path:
    rows = [{"i": k, "phase": "resume", "cycle": k, "depth": 100 * k, "ttft_s": ttft + k / 100,
             "replay_tokens": k, "tokens": [1, 2, k]} for k in range(4)]
    path.write_text(json.dumps({
        "schema": "sbrbench.result/v1", "scenario": scenario, "label": policy,
        "engine": {"policy": policy}, "target": {"kind": "engine"}, "rows": rows,
        "summary": summarize_rows(rows), "partial": False}))
    return path


@pytest.fixture(name="inputs")
def inputs_fixture(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "in"
    src.mkdir()
    return {"a": _result(src / "a.json", "forecast", 1.0),
            "b": _result(src / "b.json", "tail-pin", 0.1), "dir": src}


def _verbs(inputs: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    """Each writing verb's command line (with OUT where its output path goes), and its flag."""
    a, b = str(inputs["a"]), str(inputs["b"])
    return {
        "run": (["run", "parity", "--target", "sim", "--no-progress", *SMALL, "--policy", "lru",
                 "--out", "OUT"], "--out"),
        "run-two-policies": (["run", "parity", "--target", "sim", "--no-progress", *SMALL,
                              "--policy", "lru,tail-pin", "--out", "OUT"], "--out"),
        "compare": (["compare", a, b, "--json", "OUT"], "--json"),
        "plot": (["plot", a, b, "--out", "OUT"], "--out"),
        "report": (["report", str(inputs["dir"]), "--out", "OUT"], "--out"),
        "decay": (["decay", "analyze", "--preset", "tiny", "--out", "OUT"], "--out"),
        "decay-plot": (["decay", "analyze", "--preset", "tiny", "--plot", "OUT"], "--plot"),
        "bench-kernels": (["bench", "kernels", "--out", "OUT"], "--out"),
        "bench-prefill": (["bench", "prefill", "--out", "OUT"], "--out"),
        "bench-resume": (["bench", "resume", "--device", "cpu", "--preset", "tiny", "--depth",
                          "64", "--reps", "1", "--out", "OUT"], "--out"),
        "bench-decode": (["bench", "decode", "--device", "cpu", "--preset", "tiny", "--depth",
                          "64", "--tokens", "2", "--reps", "1", "--out", "OUT"], "--out"),
        "sim": (["sim", *SIM, "--no-oracles", "--out", "OUT"], "--out"),
        "sweep": (["sweep", *SIM, "--slots", "2", "--out", "OUT"], "--out"),
        "sweep-plot": (["sweep", *SIM, "--slots", "2", "--plot", "OUT"], "--plot"),
        "sweep-summary": (["sweep", *SIM, "--slots", "2", "--summary", "OUT"], "--summary"),
        "calibrate": (["calibrate", "--points", "0:0:96", "--reps", "1", "--out", "OUT"],
                      "--out"),
        "calibrate-refit": (["calibrate", "--refit", a, "--out", "OUT"], "--out"),
    }


# a small simulation: 30 requests of the shipped trace, one policy, no yardstick
SIM = ["--trace", str(SAMPLE_TRACE), "--limit", "30", "--policy", "lru", "--optimum", "off"]

VERBS = ["run", "run-two-policies", "compare", "plot", "report", "decay", "decay-plot",
         "bench-kernels", "bench-prefill", "bench-resume", "bench-decode", "sim", "sweep",
         "sweep-plot", "sweep-summary", "calibrate", "calibrate-refit"]


@pytest.fixture(name="unwritable")
def unwritable_fixture(tmp_path: Path) -> Iterator[Path]:
    """A folder that refuses new files (read-only; sysfs for root)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)

    def refuses(folder: Path) -> bool:
        try:
            (folder / ".probe").write_text("x")
        except OSError:
            return True
        (folder / ".probe").unlink()
        return False

    try:
        if refuses(ro):
            yield ro
        elif Path("/sys").is_dir() and refuses(Path("/sys")):
            yield Path("/sys")
        else:
            pytest.skip("no folder here refuses a new file")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("place", ["directory", "slash", "under-a-file", "unwritable"])
def test_a_bad_output_place_is_one_red_line_before_any_work(
        verb: str, place: str, tmp_path: Path, inputs: dict[str, Path], unwritable: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.txt").write_text("x")
    out = {"directory": str(tmp_path), "slash": f"{tmp_path}/new/",
           "under-a-file": str(tmp_path / "f.txt" / "x.json"),
           "unwritable": str(unwritable / "x.json")}[place]
    args, flag = _verbs(inputs)[verb]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = _main([out if x == "OUT" else x for x in args], capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    where = out.rstrip("/") if verb != "run-two-policies" else str(Path(out).parent)
    assert err.startswith(f"error: {flag} {where}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing ran, nothing written


@pytest.mark.parametrize("verb", VERBS)
def test_an_existing_file_is_kept_without_force(
        verb: str, tmp_path: Path, inputs: dict[str, Path], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "old.json"
    args, flag = _verbs(inputs)[verb]
    kept = tmp_path / "old-tail-pin.json" if verb == "run-two-policies" else out
    kept.write_text("a 177-row result")
    code, _, err = _main([str(out) if x == "OUT" else x for x in args], capsys)
    assert code == 2 and "the file exists; pass --force to overwrite it" in err, err
    assert len(err.strip().splitlines()) == 1
    assert kept.read_text() == "a 177-row result"
    assert not (tmp_path / "sbr-results").exists()


def test_force_overwrites(tmp_path: Path, inputs: dict[str, Path],
                          capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_run, "console", make_console(width=200))
    for verb in ("run", "compare", "plot"):
        out = tmp_path / f"{verb}.out"
        out.write_text("old")
        args, _ = _verbs(inputs)[verb]
        code, _, err = _main([str(out) if x == "OUT" else x for x in args] + ["--force"], capsys)
        assert code == 0, err
        assert out.read_bytes() != b"old"


def test_results_default_to_sbr_results(tmp_path: Path, inputs: dict[str, Path],
                                        capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_run, "console", make_console(width=200))
    monkeypatch.setattr(cli_compare, "console", make_console(width=200))
    for args in (["run", "parity", "--target", "sim", "--no-progress", "--policy", "lru",
                  *SMALL],
                 ["plot", str(inputs["a"])],
                 ["decay", "analyze", "--preset", "tiny"],
                 ["sim", *SIM, "--no-oracles"]):
        code, _, err = _main(args, capsys)
        assert code == 0, err
    made = sorted(p.name.split("-")[0] for p in (tmp_path / "sbr-results").iterdir())
    assert made == ["decay", "parity", "plot", "sim"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "sbr-results"]


def test_report_never_replaces_a_file_it_did_not_write(
        tmp_path: Path, inputs: dict[str, Path], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    root = inputs["dir"]
    readme = root / "README.md"
    readme.write_text("# Reference results\n\nWritten by hand.\n")
    code, _, err = _main(["report", str(root)], capsys)
    assert code == 2 and "exists and was not written by sbrbench report" in err
    assert readme.read_text().startswith("# Reference results")
    index = tmp_path / "index.md"
    for _ in range(2):  # report refreshes an index of its own
        code, out, err = _main(["report", str(root), "--out", str(index)], capsys)
        assert code == 0 and "indexed 2 files" in out, err
    assert index.read_text().startswith("# Results index")
    code, _, err = _main(["report", str(root), "--out", str(readme)], capsys)
    assert code == 2 and "pass --force" in err
    code, _, err = _main(["report", str(root), "--force"], capsys)
    assert code == 0 and readme.read_text().startswith("# Results index")
    monkeypatch.chdir(tmp_path)  # default ROOT: ./sbr-results, where results go
    code, _, err = _main(["report"], capsys)
    assert code == 2 and "sbr-results: not a directory" in err
