"""sbrbench.bench, bench_kernels, bench_engine and `sbrbench bench`: the FLOP and byte counts,
the speed-up table, kernel families of a profile, the CLI's argument handling, the resume
bench's smoke run and floor (CPU), and graph timing of our kernel (GPU)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from engine.config import preset
from engine.errors import UserError
from sbrbench import bench, bench_engine, bench_kernels
from sbrbench.cli import app


def test_bench_counts_and_names() -> None:
    # 180 kFLOP per token and value head at K = V = 128, C = 64
    assert bench_kernels.gdn_flops(1, 1, 128, 128) == 2 * 64 * (3 * 128 + 2 * 128) + 6 * 128 * 128
    nbytes = bench_kernels.gdn_bytes
    assert nbytes(64, 16, 32, 128, 128, 4, 1) > nbytes(64, 16, 32, 128, 128, 4, 0)
    assert bench.gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert bench.gpu_slug("NVIDIA H200") == "h200"
    cfg = preset("tiny")
    whole = bench.model_flops(cfg, 0, 256)
    assert whole == pytest.approx(bench.model_flops(cfg, 0, 128) + bench.model_flops(cfg, 128, 256))


def test_bench_cli_needs_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = CliRunner().invoke(app, ["bench", "kernels", "--T", "4096"])
    assert isinstance(res.exception, UserError) and "CUDA" in str(res.exception)
    res = CliRunner().invoke(app, ["bench", "prefill", "--lengths", "4096,x"])
    assert isinstance(res.exception, UserError) and "--lengths" in str(res.exception)


def test_bench_kernels_cli_parses_profile_at(monkeypatch: pytest.MonkeyPatch) -> None:
    """--profile-at reaches run_kernels as a list (and a bad value is a one-line error)."""
    seen: dict[str, object] = {}

    def fake_run(ts, out, **kw):  # type: ignore[no-untyped-def]
        seen.update(kw, ts=ts)
        return out, []

    monkeypatch.setattr(bench_kernels, "run_kernels", fake_run)
    res = CliRunner().invoke(app, ["bench", "kernels", "--T", "4096", "--profile-at", "4096",
                                   "--graphs"])
    assert res.exit_code == 0, res.output
    assert seen["profile_at"] == [4096] and seen["graphs"] is True and seen["ts"] == [4096]
    res = CliRunner().invoke(app, ["bench", "kernels", "--profile-at", "x"])
    assert res.exit_code != 0 and "--profile-at" in str(res.exception) + res.output


def test_bench_speedups_by_capture() -> None:
    def row(impl: str, ms: float, h: int = 16, **kw: object) -> dict[str, object]:
        return {"kernel": "gdn_chunk_fwd", "impl": impl, "T": 8192, "H": h, "ms": ms, **kw}

    rows = [row("sbrbench", 2.0, capture=True),
            row("sbrbench", 1.6, capture=f"every {bench_kernels.ENGINE_INTERVAL}"),
            row("sbrbench", 1.5, capture=False),
            row("fla", 1.8), row("fla", 1.0, h=32)]
    (sp,) = bench_kernels.speedups(rows)
    assert sp["ours_ms"] == 2.0 and sp["fla_over_ours"] == 0.9
    assert sp["fla_over_ours_engine_capture"] == round(1.8 / 1.6, 3)
    assert sp["fla_over_ours_no_capture"] == 1.2


def test_bench_speedups_skip_other_kernels() -> None:
    rows = [{"kernel": "recurrent_step", "impl": "sbrbench", "HV": 32, "ms": 0.01},
            {"kernel": "gdn_chunk_fwd", "impl": "sbrbench", "T": 64, "H": 1, "ms": 1.0,
             "capture": True},
            {"kernel": "gdn_chunk_fwd", "impl": "fla", "T": 64, "H": 1, "ms": 2.0}]
    assert [r["fla_over_ours"] for r in bench_kernels.speedups(rows)] == [2.0]


def test_bench_speedups_graph_column_and_eager_headline() -> None:
    """Graph-replay rows give their own column and never replace the eager headline."""
    def row(impl: str, ms: float, launch: str = "eager", **kw: object) -> dict[str, object]:
        return {"kernel": "gdn_chunk_fwd", "impl": impl, "T": 16384, "H": 16, "ms": ms,
                "launch": launch, **kw}

    rows = [row("sbrbench", 1.2, capture=True), row("fla", 1.0),
            row("sbrbench", 1.0, "graph", capture=True), row("fla", 0.9, "graph")]
    (sp,) = bench_kernels.speedups(rows)
    assert sp["ours_ms"] == 1.2 and sp["fla_ms"] == 1.0
    assert sp["fla_over_ours_graph"] == 0.9


def test_graph_ms_is_none_off_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    assert bench.graph_ms(lambda: None) is None


def test_bench_kernel_families() -> None:
    ev = [("sm90_xmma_gemm_bf16", 30.0, 100), ("flash_fwd_kernel", 20.0, 12),
          ("_state_kernel", 5.0, 36), ("_rmsnorm_kernel", 1.0, 96),
          ("elementwise_kernel<add>", 4.0, 96), ("elementwise_kernel<copy>", 6.0, 200)]
    fam = bench.kernel_families(ev, {"gdn_triton": ["_state_kernel"],
                                     "glue_triton": ["_rmsnorm_kernel"]}, top=1)
    assert fam["gemm"] == 30.0 and fam["attention"] == 20.0
    assert fam["gdn_triton"] == 5.0 and fam["glue_triton"] == 1.0
    assert fam["other"] == 10.0 and fam["total"] == 66.0
    assert fam["other_top"] == {"elementwise_kernel<copy>": [6.0, 200]}
    # kernel names cut to the same prefix are added up, not overwritten
    long = "x" * 200
    fam = bench.kernel_families([(long + "a", 2.0, 3), (long + "b", 0.5, 1)], {}, top=4)
    assert fam["other_top"] == {long[:160]: [2.5, 4]}


@pytest.mark.gpu
def test_bench_graph_ms_captures_our_kernel() -> None:
    from functools import partial

    import engine.kernels.triton_gdn as tg

    q, k, v, g, beta, s0 = bench_kernels.gdn_inputs(1024, 16, 32, 128, 128, seed=29)
    ms = bench.graph_ms(partial(tg.gdn_chunk_fwd, q, k, v, g, beta, s0, 0, 1024, True,
                                tg.launch_for(128, 128)))
    assert ms is not None and ms > 0


def test_bench_resume_smoke_on_cpu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`bench resume` on the CPU (tiny preset): one row per resumed turn, the prompt's windows
    (they cover the replay and the new tokens) timed, and the floor of the needed tokens no
    more than that of the rows the windows compute."""
    import json

    out = tmp_path / "resume.json"
    res = CliRunner().invoke(app, ["bench", "resume", "--preset", "tiny", "--depth", "200",
                                   "--new", "20", "--reps", "2", "--dtype", "float32",
                                   "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["bench"] == "resume" and doc["engine"]["device"] == "cpu"
    rows = doc["rows"]
    assert [r["turn"] for r in rows] == [0, 1]
    for r in rows:
        assert r["windows_gpu_ms"] is None  # no GPU time on the CPU
        wins = r["per_window"]
        assert r["windows"] == len(wins) >= 1
        assert r["replay_tokens"] + r["new_tokens"] > 0
        assert wins[0]["e0"] + wins[0]["lo"] == r["snapshot_pos"]
        assert wins[-1]["e0"] + wins[-1]["hi"] == r["prompt_tokens"]
        assert all(w["host_ms"] > 0 for w in wins)
        assert 0 < r["floor_ms_measured"] <= r["floor_windows_ms_measured"]
        assert r["ttft_over_floor_datasheet"] > 0
    assert rows[1]["prompt_tokens"] == rows[0]["prompt_tokens"] + 1 + 20


def test_bench_resume_rejects_bad_flags() -> None:
    res = CliRunner().invoke(app, ["bench", "resume", "--device", "tpu"])
    assert isinstance(res.exception, UserError) and "--device" in str(res.exception)
    res = CliRunner().invoke(app, ["bench", "resume", "--device", "cpu", "--window", "100"])
    assert isinstance(res.exception, UserError) and "--window" in str(res.exception)


def test_pass_floor_is_the_larger_of_compute_and_memory() -> None:
    cfg = preset("tiny")
    f = bench_engine.pass_floor(cfg, 0, 64, 1e6, 4, tflops=1.0, gbps=1.0)
    assert f.flops == bench.model_flops(cfg, 0, 64)
    assert f.ms == pytest.approx(max(f.flops / 1e9, f.nbytes / 1e6))
    assert f.nbytes > 1e6  # the weights plus KV and state


def test_bench_decode_smoke_on_cpu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`bench decode` on the CPU (tiny preset): one row per request, TPOT over the requested
    tokens, and the roofline share as floor / TPOT at each ceiling."""
    import json

    out = tmp_path / "decode.json"
    res = CliRunner().invoke(app, ["bench", "decode", "--preset", "tiny", "--depth", "100",
                                   "--tokens", "6", "--reps", "2", "--dtype", "float32",
                                   "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["bench"] == "decode" and doc["engine"]["device"] == "cpu"
    assert [r["rep"] for r in doc["rows"]] == [0, 1]
    for r in doc["rows"]:
        assert r["output_tokens"] == 6 and r["tpot_ms"] > 0
        for name in ("measured", "datasheet"):
            assert r[f"roofline_share_{name}"] == pytest.approx(
                r[f"floor_ms_{name}"] / r["tpot_ms"], rel=1e-2, abs=1e-4)
    res = CliRunner().invoke(app, ["bench", "decode", "--device", "cpu", "--tokens", "1"])
    assert res.exit_code == 2 and "--tokens" in res.output


def test_decode_bytes_count_active_weights_kv_and_state() -> None:
    """A decode step's floor reads the active weights (the routed top-k experts only, the
    untied input embedding as one row), the KV before it and the state in and out."""
    for name in ("tiny", "tiny-moe"):
        cfg = preset(name)
        embed = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
        want = ((cfg.active_param_count() - embed) * 2 + cfg.kv_bytes_per_token(2) * 11
                + 2 * cfg.snapshot_bytes(2))
        assert bench_engine.decode_bytes(cfg, 10, 2) == want
    moe = preset("tiny-moe")
    assert moe.active_param_count() < moe.param_count()
    assert bench_engine.decode_bytes(moe, 10, 2) < moe.param_count() * 2
