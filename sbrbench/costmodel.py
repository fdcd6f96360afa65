"""Cost model of a request's TTFT, fitted on the real engine: what the simulator charges instead of
running the model.

    ttft = a * (replay + new) + b * attention_work + c  (+ restore, when a snapshot is restored)

`replay + new = L - s` are the positions computed (s = restored snapshot position, L = prompt
length); `attention_work = sum_{p=s}^{L-1} (p + 1)` is the number of (query, key) pairs those
positions attend to, the quadratic part. `decode` (seconds per generated token after the first)
gives a modelled end-to-end time. `sbrbench calibrate` fits the coefficients by non-negative
least squares on `Engine.generate` timings at controlled (s, m, L) points; `analytic()` derives
them from FLOPs and bandwidth when no fit exists (see docs/SIMULATOR.md).
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from engine.errors import ConfigError, UserError

COSTMODEL_SCHEMA = "sbrbench.costmodel/v1"
_REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = _REPO_ROOT / "results"
CPU_FALLBACK = RESULTS_DIR / "sim" / "costmodel-cpu-tiny.json"

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


def attention_work(s: int, L: int) -> int:
    """(query, key) pairs computed when positions [s, L) each attend to keys 0..p."""
    if L <= s:
        return 0
    return (L * (L + 1) - s * (s + 1)) // 2


class Timing(NamedTuple):
    """A modelled TTFT split like the engine's phases (seconds)."""

    restore_s: float
    replay_s: float
    prefill_s: float
    overhead_s: float
    ttft_s: float


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

    def __post_init__(self) -> None:
        for name in ("a", "b", "c", "restore", "decode"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"cost model: '{name}' must be a finite number >= 0, got {v!r}")

    def ttft(self, s: int, m: int, L: int) -> float:
        """Modelled TTFT of a request restoring at s, cached KV up to m, prompt length L."""
        return (
            self.a * (L - s)
            + self.b * attention_work(s, L)
            + self.c
            + (self.restore if s > 0 else 0.0)
        )

    def timing(self, s: int, m: int, L: int) -> Timing:
        """`ttft` split into restore, replay [s, m), prefill [m, L) and the constant."""
        restore = self.restore if s > 0 else 0.0
        replay = self.a * (m - s) + self.b * attention_work(s, m)
        prefill = self.a * (L - m) + self.b * attention_work(m, L)
        return Timing(restore, replay, prefill, self.c, restore + replay + prefill + self.c)

    def e2e(self, ttft_s: float, generated: int) -> float:
        return ttft_s + self.decode * max(0, generated - 1)

    def coefficients(self) -> dict[str, float]:
        return {
            "a": self.a,
            "b": self.b,
            "c": self.c,
            "restore": self.restore,
            "decode": self.decode,
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
    "e2e = ttft + decode*(generated-1)"
)


def load(path: str | Path) -> CostModel:
    """A cost model JSON written by `save` / `sbrbench calibrate`; UserError when malformed."""
    from sbrbench.results import load_json

    p = Path(path)
    doc = load_json(p)
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
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{p}: bad cost model ({type(e).__name__}: {e})") from None
    cm.meta["path"] = _display_path(p)
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


def default_costmodel(
    preset_name: str = "a3b-proxy", device: str = "cuda", results_dir: Path = RESULTS_DIR
) -> CostModel:
    """The cost model the simulator uses when none is given.

    1. a GPU fit committed as `results/costmodel-<gpu>.json` or `results/<gpu>/costmodel.json`
       (what the GPU reproduction writes) for this preset;
    2. on `device` cpu: the committed CPU fit `results/sim/costmodel-cpu-<preset>.json`;
    3. the analytic H100 estimate of the preset (a3b-proxy's when the preset is unknown here).
    """
    fits = (sorted(results_dir.glob("costmodel-*.json"))
            + sorted(results_dir.glob("*/costmodel.json")) if results_dir.is_dir() else [])
    for p in fits:
        try:
            cm = load(p)
        except UserError:
            continue
        if cm.preset == preset_name and cm.device not in (None, "cpu"):
            return cm
    if device == "cpu":
        p = results_dir / "sim" / f"costmodel-cpu-{preset_name}.json"
        if p.is_file():
            return load(p)
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
        for pos in range(s + 64, m + 1, 64):
            node = cm.radix.find(toks, pos)
            if node is not None and node.snapshot is not None:
                cm.index.drop(node.snapshot, "policy")
    res = engine.generate(toks, SamplingParams(max_tokens=decode_tokens, ignore_eos=True))
    st = res.stats
    if st.snapshot_pos != s or st.cached_tokens != m:
        raise RuntimeError(
            f"calibration point {point}: engine restored at {st.snapshot_pos} with "
            f"{st.cached_tokens} cached (KV or snapshot budget too small?)"
        )
    dec = st.decode_s / (st.generated_tokens - 1) if st.generated_tokens > 1 else None
    return st.ttft_s, dec


def fit(samples: Sequence[Sample]) -> tuple[dict[str, float], dict[str, Any]]:
    """Non-negative least squares of ttft on [L - s, attention_work, 1, s > 0]."""
    import numpy as np
    from scipy.optimize import nnls

    if len(samples) < 4:
        raise UserError(f"calibration needs at least 4 points, got {len(samples)}")
    X = np.array(
        [[p.L - p.s, attention_work(p.s, p.L), 1.0, float(p.s > 0)] for p, *_ in samples],
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
    }
    decs = [smp.decode_s_per_token for smp in samples if smp.decode_s_per_token is not None]
    names = ("a", "b", "c", "restore")
    out = {k: float(v) for k, v in zip(names, coef, strict=True)}
    out["decode"] = float(statistics.median(decs)) if decs else 0.0
    return out, stats


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
    from engine.runtime import Engine, EngineCacheArgs

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
        cache=EngineCacheArgs(
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
    coef, stats = fit(samples)
    from sbrbench.results import capture_env, now_iso

    env = capture_env()
    info = engine.describe()
    return CostModel(
        **coef,
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
    """'NVIDIA H100 80GB HBM3' -> 'h100' (for results/costmodel-<gpu>.json)."""
    if not name:
        return "gpu"
    for tag in ("h200", "h100", "a100", "l40s", "l4", "b200", "gb200"):
        if tag in name.lower():
            return tag
    return "".join(c for c in name.lower() if c.isalnum())[:16] or "gpu"


def dumps(model: CostModel) -> str:
    return json.dumps(model.to_json(), indent=1)
