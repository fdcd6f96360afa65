"""`sbrbench calibrate`: the cost model's fit on the real engine. Timed `Engine.generate` calls at
controlled points (s: the snapshot restored at, m: the KV cached to, L: the prompt length),
fitted by non-negative least squares per position or in aligned windows (the better of both by
worst relative error), refitted from a stored file without an engine, and checked against
measured engine results (see docs/SIMULATOR.md)."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from engine.errors import UserError
from sbrbench.costmodel import (
    CostModel,
    attention_work,
    display_path,
    load,
)


class CalibPoint(NamedTuple):
    """One timing point: restore at s, cached KV up to m, prompt length L (s <= m < L)."""

    s: int
    m: int
    L: int


def check_point(p: CalibPoint, chunk: int = 64, page: int = 16) -> None:
    if not (0 <= p.s <= p.m < p.L):
        raise UserError(f"calibration point {p}: need 0 <= s <= m < L")
    if p.s % chunk or p.m % page:
        raise UserError(f"calibration point {p}: s must be a multiple of {chunk}, m of {page}")
    if p.m and p.L - p.m <= page:
        raise UserError(f"calibration point {p}: L must exceed m by more than a page ({page})")


def default_points(preset_name: str) -> list[CalibPoint]:
    """Cold, replay-from-0, restore-only and restore+replay points, sized for the preset."""
    Ls: tuple[int, ...]
    if preset_name == "tiny":
        Ls = (128, 384, 768, 1280)
    elif preset_name == "small":
        Ls = (512, 2048, 4096, 8192)
    else:
        Ls = (1024, 4096, 8192, 16384, 32768)
    pts = [CalibPoint(0, 0, L) for L in Ls]
    for L in Ls[1:]:
        s = L // 2 // 64 * 64
        m = L - L // 8 // 16 * 16 - 16 if L >= 256 else L - 32
        pts += [CalibPoint(0, m, L), CalibPoint(s, s, L), CalibPoint(s // 2 // 64 * 64, m, L)]
    return pts


class Sample(NamedTuple):
    point: CalibPoint
    ttft_s: float  # fastest of the reps (least disturbed by other load)
    ttft_all: list[float]
    decode_s_per_token: float | None


def measure_point(
    engine: Any, point: CalibPoint, rng: random.Random, decode_tokens: int = 4
) -> tuple[float, float | None]:
    """Time one request at `point` on `engine` (fresh random tokens, so nothing else matches).

    Set-up requests leave a snapshot at s and KV up to m; snapshots deeper than s on that path
    are dropped so the timed request restores exactly at s.
    """
    from engine.runtime import SamplingParams

    s, m, L = point
    vocab = min(256, engine.config.vocab_size)
    eos = engine.tokenizer.eos_id
    toks = [t for t in (rng.randrange(vocab) for _ in range(L + 64)) if t != eos][:L]
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    if s > 0:
        engine.generate(toks[: s + 1], one)
    if m > s:
        engine.generate(toks[: m + 1], one)
        cm = engine.cm
        assert cm is not None
        for pos in range(s + 64, m + 1, 64):
            node = cm.radix.find(toks, pos)
            if node is not None and node.snapshot is not None:
                cm.index.drop(node.snapshot, "policy")
    res = engine.generate(toks, SamplingParams(max_tokens=decode_tokens, ignore_eos=True))
    st = res.stats
    use = st.cache
    if use.snapshot_pos != s or use.cached_tokens != m:
        raise RuntimeError(
            f"calibration point {point}: engine restored at {use.snapshot_pos} with "
            f"{use.cached_tokens} cached (KV or snapshot budget too small?)"
        )
    t = st.timing
    dec = t.decode_s / (st.generated_tokens - 1) if st.generated_tokens > 1 else None
    return t.ttft_s, dec


def fit(samples: Sequence[Sample], window: int = 0) -> tuple[dict[str, float], dict[str, Any]]:
    """Non-negative least squares of ttft on [rows, attention pairs, 1, s > 0] (rows and pairs
    per position, or of aligned windows when window > 0)."""
    import numpy as np
    from scipy.optimize import nnls

    if len(samples) < 4:
        raise UserError(f"calibration needs at least 4 points, got {len(samples)}")
    shape = CostModel(0, 0, 0, 0, window=window)
    X = np.array(
        [[*shape.work(p.s, p.L), 1.0, float(p.s > 0)] for p, *_ in samples],
        dtype=np.float64,
    )
    y = np.array([smp.ttft_s for smp in samples], dtype=np.float64)
    scale = np.abs(X).max(axis=0)
    scale[scale == 0] = 1.0
    w = 1.0 / np.maximum(y, 1e-9)  # relative error: short and long requests count alike
    coef, _ = nnls(X / scale * w[:, None], y * w)
    coef = coef / scale
    pred = X @ coef
    resid = y - pred
    ss_tot = float(((y - y.mean()) ** 2).sum())
    stats = {
        "n": len(samples),
        "r2": 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else None,
        "rmse_s": float(np.sqrt((resid**2).mean())),
        "max_rel_err": float(np.max(np.abs(resid) / np.maximum(y, 1e-12))),
        "weighting": "relative (1/ttft)",
        "window": window,
    }
    decs = [smp.decode_s_per_token for smp in samples if smp.decode_s_per_token is not None]
    names = ("a", "b", "c", "restore")
    out = {k: float(v) for k, v in zip(names, coef, strict=True)}
    out["decode"] = float(statistics.median(decs)) if decs else 0.0
    return out, stats


def best_fit(samples: Sequence[Sample],
             window: int) -> tuple[dict[str, float], dict[str, Any], int]:
    """Fit per position and, when the engine's exec window is known, per aligned window; keep
    the one with the smaller worst relative error (both fits' stats are kept)."""
    coef, stats = fit(samples)
    if window <= 0:
        return coef, stats, 0
    wcoef, wstats = fit(samples, window)
    chosen = (wcoef, wstats, window) if wstats["max_rel_err"] < stats["max_rel_err"] \
        else (coef, stats, 0)
    chosen[1]["alternatives"] = {"per_position": {k: v for k, v in stats.items()
                                                  if k != "alternatives"},
                                 f"window_{window}": {k: v for k, v in wstats.items()
                                                      if k != "alternatives"}}
    return chosen


def refit(path: str | Path, window: int | None = None) -> CostModel:
    """Refit a calibration file's stored points (meta.points) without an engine: with its own
    exec window (best of per-position and windowed, as `calibrate`), or the `window` given
    (0: per position)."""
    src = load(path)
    pts = src.meta.get("points")
    if not isinstance(pts, list) or not pts:
        raise UserError(f"{path}: no calibration points stored (meta.points)")
    try:
        samples = [Sample(CalibPoint(int(p["s"]), int(p["m"]), int(p["L"])), float(p["ttft_s"]),
                          [float(x) for x in p.get("ttft_all_s") or [p["ttft_s"]]],
                          None if p.get("decode_s_per_token") is None
                          else float(p["decode_s_per_token"]))
                   for p in pts]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: bad calibration point ({type(e).__name__}: {e})") from None
    for smp in samples:
        check_point(smp.point)
    if window is None:
        coef, stats, win = best_fit(samples, int(src.meta.get("exec_window") or 0))
    else:
        if window < 0:
            raise UserError(f"--window must be >= 0, got {window}")
        (coef, stats), win = fit(samples, window), window
    meta = {k: v for k, v in src.meta.items() if k not in ("path", "fit")}
    meta["fit"] = stats
    meta["refit_of"] = src.meta.get("path")
    return CostModel(a=coef["a"], b=coef["b"], c=coef["c"], restore=coef["restore"],
                     decode=coef["decode"], window=win, source=src.source, preset=src.preset,
                     device=src.device, dtype=src.dtype, meta=meta)


def validate(model: CostModel, paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Mean modelled vs measured TTFT per phase of engine result files (each row's restore
    position, cached tokens and prompt length are what the model is given)."""
    from sbrbench.results import load_result

    out: list[dict[str, Any]] = []
    for p in paths:
        doc = load_result(Path(p))
        by_phase: dict[str, list[tuple[float, float]]] = {}
        for r in doc.get("rows") or []:
            if r.get("ttft_s") is None or r.get("error") or r.get("snapshot_pos") is None:
                continue
            pred = model.ttft(int(r["snapshot_pos"]), int(r.get("cached_tokens") or 0),
                              int(r["prompt_tokens"]))
            by_phase.setdefault(str(r.get("phase")), []).append((float(r["ttft_s"]), pred))
        for ph, vals in by_phase.items():
            meas = statistics.fmean(v[0] for v in vals)
            pred = statistics.fmean(v[1] for v in vals)
            out.append({"file": display_path(Path(p)), "phase": ph, "n": len(vals),
                        "measured_s": meas, "predicted_s": pred,
                        "ratio": pred / meas if meas > 0 else None})
    return out


def calibrate(
    *,
    preset_name: str = "tiny",
    device: str = "cpu",
    dtype: str = "float32",
    points: Sequence[CalibPoint] | None = None,
    reps: int = 3,
    seed: int = 0,
    on_sample: Callable[[Sample], None] | None = None,
) -> CostModel:
    """Time `Engine.generate` at each point (fastest of `reps`) and fit the model."""
    from engine.cache.settings import CacheSettings
    from engine.runtime import Engine

    pts = list(points) if points is not None else default_points(preset_name)
    for p in pts:
        check_point(p)
    if reps < 1:
        raise UserError(f"--reps must be >= 1, got {reps}")
    longest = max(p.L for p in pts)
    if device == "cpu":
        import torch

        # One thread: on a shared CPU, oversubscribed intra-op threads make timings swing 10x.
        torch.set_num_threads(1)
    engine = Engine.from_preset(
        preset_name,
        device=device,
        dtype=dtype,
        seed=seed,
        cache=CacheSettings(
            policy="lru",
            snapshot_slots=8,
            snapshot_interval=0,
            kv_budget_tokens=max(8 * longest, 65536),
        ),
    )
    rng = random.Random(seed)
    measure_point(engine, CalibPoint(0, 0, min(256, longest)), rng)  # warm-up, not counted
    samples: list[Sample] = []
    t0 = time.perf_counter()
    for p in pts:
        runs = [measure_point(engine, p, rng) for _ in range(reps)]
        ttfts = [r[0] for r in runs]
        decs = [r[1] for r in runs if r[1] is not None]
        smp = Sample(p, min(ttfts), ttfts, statistics.median(decs) if decs else None)
        samples.append(smp)
        if on_sample is not None:
            on_sample(smp)
    from sbrbench.results import capture_env, now_iso

    env = capture_env()
    info = engine.describe()
    coef, stats, win = best_fit(samples, int(info.get("exec_window") or 0))
    return CostModel(
        a=coef["a"], b=coef["b"], c=coef["c"], restore=coef["restore"], decode=coef["decode"],
        window=win,
        source="fit:engine",
        preset=preset_name,
        device="cpu" if device == "cpu" else "cuda",
        dtype=dtype,
        meta={
            "created": now_iso(),
            "gpu": env.get("gpu"),
            "env": env,
            "kernels": info.get("kernels"),
            "exec_window": info.get("exec_window"),
            "reps": reps,
            "torch_threads": _torch_threads(),
            "seconds": round(time.perf_counter() - t0, 1),
            "fit": stats,
            "points": [
                {
                    "s": smp.point.s,
                    "m": smp.point.m,
                    "L": smp.point.L,
                    "replay": smp.point.m - smp.point.s,
                    "new": smp.point.L - smp.point.m,
                    "attention_work": attention_work(smp.point.s, smp.point.L),
                    "ttft_s": smp.ttft_s,
                    "ttft_all_s": smp.ttft_all,
                    "decode_s_per_token": smp.decode_s_per_token,
                }
                for smp in samples
            ],
        },
    )


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def parse_points(text: str) -> list[CalibPoint]:
    """`s:m:L,s:m:L,...` -> points."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        try:
            s, m, L = (int(x) for x in parts)
        except ValueError:
            raise UserError(f"--points: {item!r} is not s:m:L (three integers)") from None
        out.append(CalibPoint(s, m, L))
    if not out:
        raise UserError("--points: no point given")
    return out
