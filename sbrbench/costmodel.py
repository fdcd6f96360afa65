"""Cost model of a request's TTFT, fitted on the real engine: what the simulator charges instead of
running the model.

    ttft = a * (replay + new) + b * attention_work + c  (+ restore, when a snapshot is restored)

`replay + new = L - s` are the positions computed (s = restored snapshot position, L = prompt
length); `attention_work = sum_{p=s}^{L-1} (p + 1)` is the number of (query, key) pairs those
positions attend to, the quadratic part. `decode` (seconds per generated token after the first)
gives a modelled end-to-end time. `sbrbench calibrate` fits the coefficients by non-negative
least squares on `Engine.generate` timings at controlled (s, m, L) points; `analytic()` derives
them from FLOPs and bandwidth when no fit exists (see docs/SIMULATOR.md).

With `window = E > 0` the model charges what an engine of fixed aligned windows (ours) computes:
every window of E rows touching [s, L) in full, padding included, and each window's E queries
against its keys [0, e0 + E). Then replay that falls inside the window of the new tokens costs
nothing, which is what the GPU engine shows.

The default cost models ship with the package (`sbrbench/data/`, see `PACKAGED`), so a checkout
and an installed wheel simulate alike; a measured fit is passed with `--costmodel PATH`.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from engine.errors import ConfigError, UserError
from engine.record import Timing

COSTMODEL_SCHEMA = "sbrbench.costmodel/v1"
_REPO_ROOT = Path(__file__).resolve().parent.parent

# The fits shipped in sbrbench/data/, by (preset, "gpu" | "cpu"): what the simulator charges when
# no --costmodel is given. The H200 fit is `sbrbench calibrate` on the engine's CUDA defaults
# (exec window 2048); the CPU fit is the tiny preset on one thread. Changing a default means
# replacing its file here, deliberately: no other file is read unless it is given by path.
PACKAGED: dict[tuple[str, str], str] = {
    ("a3b-proxy", "gpu"): "costmodel-h200.json",
    ("tiny", "cpu"): "costmodel-cpu-tiny.json",
}

# Analytic estimate: one H100 SXM (dense bf16 peak, HBM3 bandwidth) at stated efficiencies.
H100 = {
    "name": "H100-SXM (analytic)",
    "peak_flops": 989.4e12,
    "hbm_bytes_s": 3.35e12,
    "matmul_efficiency": 0.5,  # prefill GEMMs
    "attention_efficiency": 0.4,  # flash-attention forward
    "bandwidth_efficiency": 0.7,
    "overhead_s": 0.02,  # per request: launch, lm head, sampling, scheduling
}


def windows(s: int, L: int, window: int) -> tuple[int, int]:
    """(first, last + 1) window index of the aligned windows of `window` rows covering [s, L)."""
    if L <= s:
        return 0, 0
    return s // window, -(-L // window)


def window_rows(s: int, L: int, window: int) -> int:
    """Rows computed for [s, L) in aligned windows (padding included)."""
    k0, k1 = windows(s, L, window)
    return (k1 - k0) * window


def window_attention_work(s: int, L: int, window: int) -> int:
    """(query, key) pairs of the aligned windows covering [s, L): window k's E queries attend to
    keys [0, kE + q] for q in 0..E-1 (causal, bottom-right)."""
    k0, k1 = windows(s, L, window)
    n = k1 - k0
    sum_k = (k0 + k1 - 1) * n // 2
    return window * window * sum_k + n * window * (window + 1) // 2


def attention_work(s: int, L: int) -> int:
    """(query, key) pairs computed when positions [s, L) each attend to keys 0..p."""
    if L <= s:
        return 0
    return (L * (L + 1) - s * (s + 1)) // 2


@dataclass(slots=True)
class CostModel:
    """Coefficients of the TTFT model (seconds) and where they came from."""

    a: float  # per computed position (replay or new)
    b: float  # per (query, key) pair of attention
    c: float  # per request
    restore: float  # per snapshot restore
    decode: float = 0.0  # per generated token after the first
    source: str = "manual"  # "fit:engine" | "analytic" | "manual"
    preset: str | None = None
    device: str | None = None
    dtype: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    window: int = 0  # 0: per position; E > 0: aligned windows of E rows (module docstring)

    def __post_init__(self) -> None:
        for name in ("a", "b", "c", "restore", "decode"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"cost model: '{name}' must be a finite number >= 0, got {v!r}")
        if not isinstance(self.window, int) or self.window < 0:
            raise ConfigError(f"cost model: 'window' must be an integer >= 0, got {self.window!r}")

    def work(self, s: int, L: int) -> tuple[int, int]:
        """(rows computed, attention pairs) for positions [s, L)."""
        if self.window:
            return window_rows(s, L, self.window), window_attention_work(s, L, self.window)
        return max(L - s, 0), attention_work(s, L)

    def ttft(self, s: int, m: int, L: int) -> float:
        """Modelled TTFT of a request restoring at s, cached KV up to m, prompt length L."""
        rows, pairs = self.work(s, L)
        return self.a * rows + self.b * pairs + self.c + (self.restore if s > 0 else 0.0)

    def timing(self, s: int, m: int, L: int, generated: int = 1) -> Timing:
        """The engine's phase split, modelled: the per-request constant as match_s, restore,
        replay [s, m), prefill [m, L), decode of the `generated` tokens after the first; no
        finalize. Windowed: a window is replay when it ends at or before m (as the engine
        counts it)."""
        restore = self.restore if s > 0 else 0.0
        cut = max(min(m // self.window * self.window, L), s) if self.window else m
        r_rows, r_pairs = self.work(s, cut)
        rows, pairs = self.work(s, L)
        replay = self.a * r_rows + self.b * r_pairs
        prefill = self.a * (rows - r_rows) + self.b * (pairs - r_pairs)
        ttft = restore + replay + prefill + self.c
        decode = self.decode * max(0, generated - 1)
        return Timing(match_s=self.c, restore_s=restore, replay_s=replay, prefill_s=prefill,
                      ttft_s=ttft, decode_s=decode, finalize_s=0.0, e2e_s=ttft + decode)

    def e2e(self, ttft_s: float, generated: int) -> float:
        return ttft_s + self.decode * max(0, generated - 1)

    def coefficients(self) -> dict[str, float]:
        return {
            "a": self.a,
            "b": self.b,
            "c": self.c,
            "restore": self.restore,
            "decode": self.decode,
            "window": self.window,
        }

    def describe(self) -> dict[str, Any]:
        """The short form stored in sim results and the sim target's JSON."""
        d = {
            "source": self.source,
            "preset": self.preset,
            "device": self.device,
            "dtype": self.dtype,
            **self.coefficients(),
        }
        if "path" in self.meta:
            d["path"] = self.meta["path"]
        if "gpu" in self.meta:
            d["gpu"] = self.meta["gpu"]
        return d

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["meta"] = {k: v for k, v in self.meta.items() if k != "path"}
        return {"schema": COSTMODEL_SCHEMA, "formula": FORMULA, **d}


FORMULA = (
    "ttft = a*(replay+new) + b*sum_{p=s}^{L-1}(p+1) + c + restore*[s>0]; "
    "e2e = ttft + decode*(generated-1); with window E > 0, rows and pairs are those of the "
    "aligned E-row windows covering [s, L)"
)


def load(path: str | Path) -> CostModel:
    """A cost model JSON written by `save` / `sbrbench calibrate`; UserError when malformed."""
    from sbrbench.results import load_json

    p = Path(path)
    return _from_doc(load_json(p), p, _display_path(p))


def packaged(name: str) -> CostModel:
    """A cost model shipped in sbrbench/data/ (a name of `PACKAGED`)."""
    res = resources.files("sbrbench") / "data" / name
    doc = json.loads(res.read_text(encoding="utf-8"))
    return _from_doc(doc, Path(name), f"sbrbench/data/{name}")


def _from_doc(doc: dict[str, Any], p: Path, shown: str) -> CostModel:
    if doc.get("schema") != COSTMODEL_SCHEMA:
        raise UserError(f"{p}: not a cost model file (schema {doc.get('schema')!r})")
    try:
        cm = CostModel(
            a=float(doc["a"]),
            b=float(doc["b"]),
            c=float(doc["c"]),
            restore=float(doc["restore"]),
            decode=float(doc.get("decode", 0.0)),
            source=str(doc.get("source", "manual")),
            preset=doc.get("preset"),
            device=doc.get("device"),
            dtype=doc.get("dtype"),
            meta=dict(doc.get("meta") or {}),
            window=int(doc.get("window", 0)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{p}: bad cost model ({type(e).__name__}: {e})") from None
    cm.meta["path"] = shown
    return cm


def save(model: CostModel, path: str | Path) -> None:
    from sbrbench.results import write_json_atomic

    write_json_atomic(Path(path), model.to_json())


def _display_path(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(_REPO_ROOT))
    except ValueError:
        return str(p)


def analytic(
    preset_name: str = "a3b-proxy", dtype_bytes: int = 2, gpu: dict[str, Any] | None = None
) -> CostModel:
    """Coefficients from the preset's FLOPs and bytes on one GPU (default: H100, see `H100`).

    a = (dense + GDN FLOPs per token) / (peak x matmul efficiency); b = attention FLOPs per
    (query, key) pair / (peak x attention efficiency); restore = one snapshot read + written at
    HBM bandwidth; decode = weight bytes read per token at HBM bandwidth; c = fixed overhead.
    """
    from engine.config import preset

    g = dict(H100 if gpu is None else gpu)
    cfg = preset(preset_name)
    flops_token = cfg.flops_per_token() + cfg.gdn_flops_per_token()
    pair_flops = cfg.attn_flops(0)  # one query attending to one key, all attention layers
    weight_bytes = flops_token / 2 * dtype_bytes
    bw = g["hbm_bytes_s"] * g["bandwidth_efficiency"]
    return CostModel(
        a=flops_token / (g["peak_flops"] * g["matmul_efficiency"]),
        b=pair_flops / (g["peak_flops"] * g["attention_efficiency"]),
        c=g["overhead_s"],
        restore=2 * cfg.snapshot_bytes(dtype_bytes) / bw,
        decode=weight_bytes / bw + g["overhead_s"] / 4,
        source="analytic",
        preset=preset_name,
        device="cuda",
        dtype={2: "bfloat16", 4: "float32"}.get(dtype_bytes, str(dtype_bytes)),
        meta={
            "gpu": g["name"],
            "assumptions": g,
            "flops_per_token": flops_token,
            "attn_flops_per_pair": pair_flops,
        },
    )


def default_costmodel(preset_name: str = "a3b-proxy", device: str = "cuda") -> CostModel:
    """The cost model the simulator uses when none is given.

    1. the packaged GPU fit of this preset (`PACKAGED`), whatever `device` says: the simulator
       models the GPU engine;
    2. on `device` cpu: the packaged CPU fit of this preset;
    3. the analytic H100 estimate of the preset (a3b-proxy's when the preset is unknown here).
    """
    gpu = PACKAGED.get((preset_name, "gpu"))
    if gpu is not None:
        return packaged(gpu)
    cpu = PACKAGED.get((preset_name, "cpu"))
    if device == "cpu" and cpu is not None:
        return packaged(cpu)
    try:
        return analytic(preset_name)
    except ConfigError:
        return analytic("a3b-proxy")


def resolve(path: str | Path | None, preset_name: str, device: str) -> CostModel:
    """`--costmodel PATH` when given, else `default_costmodel`."""
    return load(path) if path else default_costmodel(preset_name, device)


# ----------------------------------------------------------------------------- calibration


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
            out.append({"file": _display_path(Path(p)), "phase": ph, "n": len(vals),
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


def gpu_slug(name: str | None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100' (for calibrate's default file name)."""
    if not name:
        return "gpu"
    for tag in ("h200", "h100", "a100", "l40s", "l4", "b200", "gb200"):
        if tag in name.lower():
            return tag
    return "".join(c for c in name.lower() if c.isalnum())[:16] or "gpu"


def dumps(model: CostModel) -> str:
    return json.dumps(model.to_json(), indent=1)
