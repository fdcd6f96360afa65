"""sbrbench.costmodel: the formula, windowed work, files and the packaged defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.errors import ConfigError, UserError
from sbrbench import costmodel as cm
from sbrbench.costmodel import CostModel


@pytest.mark.parametrize(("s", "L"), [(0, 1), (0, 100), (64, 100), (128, 129), (50, 50)])
def test_attention_work_is_the_sum_of_context_lengths(s: int, L: int) -> None:
    assert cm.attention_work(s, L) == sum(p + 1 for p in range(s, L))


def test_ttft_and_its_split() -> None:
    m = CostModel(a=2e-4, b=3e-9, c=0.01, restore=0.005, decode=0.002)
    t = m.timing(128, 640, 1000)
    assert t.restore_s == 0.005
    assert t.ttft_s == pytest.approx(m.ttft(128, 640, 1000))
    assert t.ttft_s == pytest.approx(t.restore_s + t.replay_s + t.prefill_s + t.match_s)
    assert t.replay_s == pytest.approx(2e-4 * 512 + 3e-9 * cm.attention_work(128, 640))
    cold = m.timing(0, 0, 1000)
    assert cold.restore_s == 0 and cold.replay_s == 0
    assert m.e2e(1.0, 5) == pytest.approx(1.0 + 4 * 0.002)
    # replaying from a shallower snapshot costs more
    assert m.ttft(0, 640, 1000) > m.ttft(128, 640, 1000) > m.ttft(576, 640, 1000) - 0.005


def test_save_load_roundtrip_and_bad_files(tmp_path: Path) -> None:
    m = CostModel(
        a=1e-4,
        b=1e-9,
        c=0.01,
        restore=0.001,
        decode=0.003,
        source="fit:engine",
        preset="tiny",
        device="cpu",
        dtype="float32",
        meta={"fit": {"r2": 0.99}},
    )
    p = tmp_path / "cm.json"
    cm.save(m, p)
    back = cm.load(p)
    assert back.coefficients() == m.coefficients()
    assert (back.source, back.preset, back.device) == ("fit:engine", "tiny", "cpu")
    assert back.meta["fit"] == {"r2": 0.99} and back.describe()["path"]
    doc = json.loads(p.read_text())
    doc["a"] = -1
    p.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="'a' must be a finite number >= 0"):
        cm.load(p)
    p.write_text(json.dumps({"schema": "sbrbench.result/v1"}))
    with pytest.raises(UserError, match="not a cost model"):
        cm.load(p)
    p.write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        cm.load(p)


def test_analytic_a3b_proxy_is_in_a_plausible_range() -> None:
    m = cm.analytic("a3b-proxy")
    assert m.source == "analytic" and m.preset == "a3b-proxy"
    ttft_12k = m.ttft(0, 0, 12000)
    assert 0.05 < ttft_12k < 1.0  # ~3B active parameters on one H100
    assert m.b * cm.attention_work(0, 12000) < m.a * 12000  # quadratic part minor at 12k


# What the simulator charged by default before its default fits became package data: the
# packaged copies must keep these coefficients (every committed simulator figure rests on them).
H200_FIT = {"a": 2.7854539568524153e-05, "b": 2.598426083443067e-11, "c": 0.0,
            "restore": 0.01228485521670771, "decode": 0.006677629999974973, "window": 2048}
CPU_TINY_FIT = {"a": 0.000154957087952081, "b": 0.0, "c": 8.228843869422867e-05, "restore": 0.0,
                "decode": 0.003871763999995892, "window": 0}


def test_default_cost_models_are_the_packaged_fits() -> None:
    gpu = cm.default_costmodel("a3b-proxy", "cuda")
    assert gpu.coefficients() == H200_FIT and gpu.source == "fit:engine"
    assert gpu.describe()["path"] == "sbrbench/data/costmodel-h200.json"
    assert gpu.describe()["gpu"] == "NVIDIA H200"
    # the simulator models the GPU engine, also when asked on a CPU
    assert cm.default_costmodel("a3b-proxy", "cpu").coefficients() == H200_FIT
    tiny = cm.default_costmodel("tiny", "cpu")
    assert tiny.coefficients() == CPU_TINY_FIT and tiny.device == "cpu"
    assert tiny.describe()["path"] == "sbrbench/data/costmodel-cpu-tiny.json"
    assert cm.default_costmodel("tiny", "cuda").source == "analytic"
    assert cm.default_costmodel("small", "cpu").source == "analytic"
    assert cm.resolve(None, "a3b-proxy", "cuda").coefficients() == H200_FIT
    # modelled TTFT of a 24k-token resume from a snapshot at 20,480 and of a cold 24k prompt:
    # 2 and 12 windows of 2048 rows
    assert gpu.ttft(20480, 24000, 24100) == pytest.approx(0.1287748, rel=1e-6)
    assert gpu.ttft(0, 0, 24000) == pytest.approx(0.6924005, rel=1e-6)


def test_result_files_do_not_change_the_default(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Fits written where `sbrbench calibrate` puts them by default (results/ under the working
    directory) are not read: a measured fit is passed with --costmodel."""
    monkeypatch.chdir(tmp_path)
    other = dict(source="fit:engine", meta={"gpu": "NVIDIA H100 80GB HBM3"})
    cm.save(CostModel(a=1e-5, b=0, c=0.02, restore=0, preset="a3b-proxy", device="cuda",
                      **other), tmp_path / "results" / "costmodel-a100.json")
    cm.save(CostModel(a=3e-5, b=0, c=0.02, restore=0, preset="a3b-proxy", device="cuda",
                      **other), tmp_path / "results" / "h200" / "costmodel.json")
    cm.save(CostModel(a=1e-3, b=0, c=0.1, restore=0, preset="tiny", device="cpu", **other),
            tmp_path / "results" / "sim" / "costmodel-cpu-tiny.json")
    assert cm.default_costmodel("a3b-proxy", "cuda").coefficients() == H200_FIT
    assert cm.default_costmodel("tiny", "cpu").coefficients() == CPU_TINY_FIT
    given = cm.resolve(tmp_path / "results" / "costmodel-a100.json", "a3b-proxy", "cuda")
    assert given.a == 1e-5 and given.describe()["path"].endswith("costmodel-a100.json")


def test_packaged_cost_models_are_package_data() -> None:
    """Each packaged fit is found through importlib.resources (as from an installed wheel) and
    matches its table entry; sbrbench/data/ holds no other fit; the wheel ships the sbrbench
    package directory whole (hatch's `packages`, nothing excluded), so the data goes with it."""
    import tomllib
    from importlib import resources

    data = resources.files("sbrbench") / "data"
    for (preset, kind), name in cm.PACKAGED.items():
        assert (data / name).is_file(), name
        model = cm.packaged(name)
        assert model.preset == preset and (model.device == "cpu") == (kind == "cpu"), name
        assert model.source == "fit:engine" and model.meta["points"], name
    shipped = {p.name for p in data.iterdir() if p.name.endswith(".json")}
    assert shipped == set(cm.PACKAGED.values())
    root = Path(__file__).resolve().parents[2]
    wheel = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["hatch"]["build"][
        "targets"]["wheel"]
    assert "sbrbench" in wheel["packages"]
    assert not {"only-include", "exclude", "include"} & set(wheel)


@pytest.mark.parametrize(("s", "L", "E"), [(0, 1, 64), (0, 64, 64), (0, 65, 64), (64, 200, 64),
                                           (128, 129, 128), (2048, 24000, 2048), (50, 50, 64)])
def test_windowed_work_is_what_the_windows_compute(s: int, L: int, E: int) -> None:
    """Every aligned window touching [s, L) runs all E rows; row r of window e0 attends to
    e0 + r + 1 keys (the engine's fixed aligned windows)."""
    starts = range(s // E * E, L, E) if L > s else range(0)
    assert cm.window_rows(s, L, E) == len(starts) * E
    assert cm.window_attention_work(s, L, E) == sum(e0 + r + 1 for e0 in starts for r in range(E))


def test_windowed_model_charges_whole_windows() -> None:
    m = CostModel(a=1e-5, b=1e-10, c=0.01, restore=0.0, window=2048)
    # Replay inside the window of the new tokens costs nothing more ...
    assert m.ttft(20480, 21000, 21100) == pytest.approx(m.ttft(20480, 20480, 21100))
    # ... replay across windows costs whole windows, and the split adds up.
    t = m.timing(0, 21000, 21100)
    assert t.replay_s == pytest.approx(1e-5 * 10 * 2048 + 1e-10 * cm.window_attention_work(
        0, 20480, 2048))
    assert t.ttft_s == pytest.approx(m.ttft(0, 21000, 21100))
    assert t.ttft_s == pytest.approx(t.replay_s + t.prefill_s + t.match_s)
    assert CostModel(a=1e-5, b=0, c=0, restore=0).ttft(20480, 21000, 21100) < m.ttft(
        20480, 21000, 21100)
    with pytest.raises(ConfigError):
        CostModel(a=1e-5, b=0, c=0, restore=0, window=-1)
