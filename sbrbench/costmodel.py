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
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

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
    return _from_doc(load_json(p), p, display_path(p))


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


def display_path(p: Path) -> str:
    """`p` relative to the checkout when it lies inside it, else as given (for tables and
    JSON)."""
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


def dumps(model: CostModel) -> str:
    return json.dumps(model.to_json(), indent=1)
