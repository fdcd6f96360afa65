"""GDN decay forensics: per-head decay horizons and window fidelity of the gated delta rule.

One file over 500 lines on purpose: it is one pipeline (read the decay tensors -> horizons ->
fidelity -> the report and its JSON), each step a few small functions the next one consumes.

Decay of head h at token t: alpha_t = exp(g_t), g_t = -exp(A_log) * softplus(a_t + dt_bias).

- static mode takes a_t = 0, so g is a constant per head and the horizon (tokens until the
  cumulative decay falls below eps) is H_eps = ln(1/eps) / |g|.
- activations mode records g_t per head and token from the engine over a real sequence; the
  horizon from position t counts the tokens after t until sum(g) <= ln(eps), linearly
  interpolated inside the crossing token (so a constant g gives exactly ln(1/eps)/|g|).
  Positions whose horizon runs past the end of the sequence are right-censored at their
  follow-up; per-head median and p90 are Kaplan-Meier quantiles, null when not reached.
- window fidelity: cosine(state rebuilt from only the last tau tokens starting from zero,
  true state) at the end of the sequence, with the gated delta rule in float64. Static mode
  reports the closed form for orthogonal writes of equal norm over an unbounded past:
  cos(tau) = sqrt(1 - exp(2 g tau)); over a sequence of T tokens it is
  sqrt((1 - exp(2 g tau)) / (1 - exp(2 g T))) for tau < T and 1 beyond.

Only A_log and dt_bias are read from a checkpoint (lazily, through safetensors headers), so
an 80B checkpoint is analysed in static mode without loading its weights.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from safetensors import SafetensorError, safe_open

from engine.errors import UserError
from sbrbench.results import DECAY_SCHEMA, now_iso

if TYPE_CHECKING:
    import torch

    from engine.model.gdn import GDNTrace

DEFAULT_EPS = (1e-3,)
DEFAULT_TAUS = (64, 256, 1024, 4096, 8192)
LONG_HORIZON = 8192  # the "share of heads beyond" threshold of the reference write-up
HORIZON_METHOD = {
    "static": "a_t = 0: H = ln(1/eps) / |g|, g = -exp(A_log) * softplus(dt_bias)",
    "activations": (
        "per position t: tokens after t until sum(g) <= ln(eps), interpolated inside the "
        "crossing token; positions whose horizon runs past the end are right-censored at their "
        "follow-up; per-head median/p90 are Kaplan-Meier quantiles, null when not reached "
        "(summary counts those heads as unresolved unless the sequence exceeds 8192 tokens)"
    ),
}
INDEX_FILE = "model.safetensors.index.json"

# Qwen3-Next names (model.layers.i...) and Qwen3.5 names (model.language_model.layers.i...).
_GDN_TENSOR = re.compile(
    r"^(?P<prefix>model\.language_model\.|model\.)layers\.(?P<layer>\d+)\.linear_attn\."
    r"(?P<param>A_log|dt_bias|in_proj_ba|in_proj_a|in_proj_b)(?:\.weight)?$"
)


# --------------------------------------------------------------------------- checkpoint reading


class GDNLayerParams(NamedTuple):
    """The per-head decay parameters of one GDN layer (float64, shape [value heads])."""

    layer: int
    A_log: np.ndarray
    dt_bias: np.ndarray


def tensor_locations(path: Path) -> dict[str, Path]:
    """Map every tensor name of a safetensors checkpoint to its file, reading headers only."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"not a safetensors file: {path}")
        return {name: path for name in _header_names(path)}
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{index}: not a safetensors index ({e})") from None
        locations = {name: path / file for name, file in weight_map.items()}
        missing = sorted({str(p.name) for p in locations.values() if not p.is_file()})
        if missing:
            raise UserError(f"{index} names shards that are not there: {', '.join(missing[:3])}")
        return locations
    files = sorted(path.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in path.iterdir())[:5]) or "nothing"
        raise UserError(f"no safetensors in {path} (found {found}); convert it to safetensors")
    return {name: f for f in files for name in _header_names(f)}


def _header_names(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file}: unreadable safetensors ({e})") from None


def read_tensors(locations: dict[str, Path], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read only the named tensors, opening each shard that holds one of them once."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(locations[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for file, wanted in by_file.items():
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in wanted:
                    out[name] = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{file}: unreadable safetensors ({e})") from None
    return out


def config_gdn_layers(checkpoint: Path) -> list[int] | None:
    """GDN layer indices from config.json (`layer_types` or `full_attention_interval`), if any."""
    file = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "config.json"
    if not file.is_file():
        return None
    try:
        cfg = json.loads(file.read_text())
    except ValueError as e:
        raise UserError(f"{file}: not JSON ({e})") from None
    text = cfg.get("text_config") or cfg  # Qwen3.5 nests the language model's config
    if isinstance(text.get("layer_types"), list):
        return [i for i, t in enumerate(text["layer_types"]) if t == "linear_attention"]
    interval, n = text.get("full_attention_interval"), text.get("num_hidden_layers")
    if isinstance(interval, int) and isinstance(n, int) and interval > 0:
        return [i for i in range(n) if (i + 1) % interval != 0]
    return None


def gdn_tensor_names(names: Iterable[str]) -> dict[int, dict[str, str]]:
    """Group GDN tensor names by layer: {layer: {"A_log": name, "dt_bias": name, ...}}."""
    layers: dict[int, dict[str, str]] = {}
    for name in names:
        m = _GDN_TENSOR.match(name)
        if m:
            layers.setdefault(int(m["layer"]), {})[m["param"]] = name
    return layers


def read_gdn_params(checkpoint: Path, *, need_projections: bool = False) -> list[GDNLayerParams]:
    """A_log and dt_bias of every GDN layer of a checkpoint, and nothing else from disk.

    need_projections checks (by name only) that the a/b input projections the activations
    mode needs are there too.
    """
    checkpoint = Path(checkpoint)
    locations = tensor_locations(checkpoint)
    by_layer = gdn_tensor_names(locations)
    expected = config_gdn_layers(checkpoint)
    if not by_layer and not expected:
        raise UserError(f"{checkpoint}: no GDN layers (no *.layers.N.linear_attn.A_log tensors)")
    layers = sorted(set(by_layer) | set(expected or []))
    wanted = ["A_log", "dt_bias"]
    missing = [
        f"layers.{i}.linear_attn.{p}"
        for i in layers
        for p in wanted
        if p not in by_layer.get(i, {})
    ]
    if need_projections:
        missing += [
            f"layers.{i}.linear_attn.in_proj_ba"
            for i in layers
            if "in_proj_ba" not in by_layer.get(i, {})
            and not {"in_proj_a", "in_proj_b"} <= by_layer.get(i, {}).keys()
        ]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise UserError(f"{checkpoint}: missing tensors {', '.join(missing[:3])}{more}")
    tensors = read_tensors(locations, [by_layer[i][p] for i in layers for p in wanted])
    return [
        _layer_params(i, tensors[by_layer[i]["A_log"]], tensors[by_layer[i]["dt_bias"]], checkpoint)
        for i in layers
    ]


def gdn_params_from_state(state: dict[str, torch.Tensor]) -> list[GDNLayerParams]:
    """A_log and dt_bias per GDN layer from an in-memory state dict with HF names."""
    by_layer = {
        i: p for i, p in gdn_tensor_names(state).items() if {"A_log", "dt_bias"} <= p.keys()
    }
    return [
        _layer_params(i, state[p["A_log"]], state[p["dt_bias"]], "model")
        for i, p in sorted(by_layer.items())
    ]


def _layer_params(
    layer: int, a_log: torch.Tensor, dt_bias: torch.Tensor, where: Any
) -> GDNLayerParams:
    import torch
    a = a_log.detach().to("cpu", torch.float64).reshape(-1).numpy()
    d = dt_bias.detach().to("cpu", torch.float64).reshape(-1).numpy()
    if a.shape != d.shape:
        raise UserError(
            f"{where}: layer {layer} has A_log of {a.size} heads but dt_bias of {d.size}"
        )
    return GDNLayerParams(layer, a, d)


# --------------------------------------------------------------------------- decay and horizons


def static_log_decay(a_log: np.ndarray, dt_bias: np.ndarray) -> np.ndarray:
    """Per-token log decay with a_t = 0: g = -exp(A_log) * softplus(dt_bias)."""
    return -np.exp(a_log) * np.logaddexp(0.0, dt_bias)


def static_horizon(g: np.ndarray | float, eps: float) -> np.ndarray:
    """H_eps = ln(1/eps) / |g| tokens (inf where g == 0)."""
    g = np.asarray(g, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(g < 0, math.log(1 / eps) / np.abs(g), math.inf)


class PositionHorizons(NamedTuple):
    """Horizon from each position of one head: the time, and whether it was reached (else
    it is the censoring time: the follow-up left before the end of the sequence)."""

    times: np.ndarray
    observed: np.ndarray


def position_horizons(g: np.ndarray, eps: float) -> PositionHorizons:
    """Tokens after each position until the cumulative decay falls below eps.

    The write at position t decays by the tokens t+1, t+2, ...; D is the running sum of -g, so
    the decay after n tokens is exp(-(D[t+1+n] - D[t+1])). The crossing is interpolated
    linearly inside the token that crosses ln(1/eps).
    """
    g = np.asarray(g, dtype=np.float64)
    T = g.shape[0]
    d = np.concatenate([[0.0], np.cumsum(-g)])  # d[i] = decay (in -log) of tokens [0, i)
    base = d[1:]  # d[t + 1], for t = 0..T-1
    target = base + math.log(1 / eps)
    m = np.searchsorted(d, target, side="left")  # first index with d[m] >= target
    observed = m <= T
    mc = np.minimum(m, T)
    t = np.arange(T)
    prev = d[np.maximum(mc - 1, 0)]
    step = d[mc] - prev
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(step > 0, (target - prev) / step, 1.0)
    times = np.where(observed, mc - t - 2 + frac, T - 1 - t).astype(np.float64)
    return PositionHorizons(times, observed)


def km_quantile(times: np.ndarray, observed: np.ndarray, q: float) -> float:
    """Kaplan-Meier q-quantile of right-censored times; inf when the survival curve never
    falls to 1 - q (the quantile lies beyond the longest follow-up)."""
    order = np.lexsort((~observed, times))  # by time, events before censorings at ties
    t, e = times[order], observed[order]
    at_risk = len(t) - np.arange(len(t))
    survival = np.cumprod(np.where(e, 1.0 - 1.0 / at_risk, 1.0))
    hit = np.flatnonzero(e & (survival <= 1.0 - q + 1e-12))
    return float(t[hit[0]]) if hit.size else math.inf


class ActivationHorizon(NamedTuple):
    median: float  # inf: not reached within the sequence
    p90: float
    censored_share: float


def activation_horizon(g: np.ndarray, eps: float) -> ActivationHorizon:
    """Per-head median and p90 over positions of the horizon (Kaplan-Meier, censored)."""
    ph = position_horizons(g, eps)
    return ActivationHorizon(
        km_quantile(ph.times, ph.observed, 0.5),
        km_quantile(ph.times, ph.observed, 0.9),
        float(1.0 - ph.observed.mean()),
    )


# --------------------------------------------------------------------------- window fidelity


def gated_delta_final_states(
    k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, starts: Sequence[int]
) -> torch.Tensor:
    """Final states [len(starts), H, K, V] of the gated delta rule, run from a zero state at
    each start position to the end (float64, on the inputs' device).

    k [T, H, K] (l2-normalised), v [T, H, V], g [T, H] (log decay), beta [T, H]. Per token:
    S = exp(g_t) S;  S += k_t (beta_t (v_t - S^T k_t))^T. Equal starts share one run.
    """
    import torch
    k, v, g, beta = (x.detach().to(torch.float64) for x in (k, v, g, beta))
    T, H, K = k.shape
    clamped = [min(max(0, int(s)), T) for s in starts]
    unique = sorted(set(clamped))
    S = torch.zeros(len(unique), H, K, v.shape[-1], dtype=torch.float64, device=k.device)
    alpha = g.exp()[:, :, None, None]
    active = 0
    for t in range(unique[0] if unique else T, T):
        while active < len(unique) and unique[active] <= t:
            active += 1
        s = S[:active]  # the runs already started: a prefix, since starts are sorted
        s.mul_(alpha[t])
        kv = (k[t][:, None, :] @ s).squeeze(-2)  # S^T k per run and head: [n, H, V]
        delta = (v[t] - kv).mul_(beta[t][:, None])
        s.add_(k[t][:, :, None] * delta[:, :, None, :])
    return S[[unique.index(c) for c in clamped]]


def state_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine between states over their last two dims ([..., K, V] -> [...]); nan if zero."""
    a, b = a.flatten(-2), b.flatten(-2)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def window_fidelity(
    k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, taus: Sequence[int]
) -> np.ndarray:
    """cos(state from only the last tau tokens, true state) per tau and head: [len(taus), H]."""
    T = k.shape[0]
    states = gated_delta_final_states(k, v, g, beta, [0, *(max(0, T - tau) for tau in taus)])
    return state_cosine(states[1:], states[0][None]).cpu().numpy()


def predicted_window_cos(g: np.ndarray | float, tau: int, seq_len: int | None = None) -> np.ndarray:
    """Window fidelity of a constant-decay head with orthogonal, equal-norm writes.

    The state is sum_j a^j w_j over the j tokens back (a = exp(g), w_j orthogonal, |w_j| = 1),
    so cos(tau) = |window| / |state| = sqrt((1 - a^(2 tau)) / (1 - a^(2 T))), with T = inf
    (denominator 1) when seq_len is None, and 1 for tau >= T.
    """
    g = np.asarray(g, dtype=np.float64)
    num = -np.expm1(2 * g * tau)
    if seq_len is None:
        return np.sqrt(num)
    if tau >= seq_len:
        return np.ones_like(g)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(g < 0, num / -np.expm1(2 * g * seq_len), tau / seq_len)
    return np.sqrt(ratio)


# --------------------------------------------------------------------------- inputs

TRACE_BLOCK = 512  # tokens per Mooncake hash id


def corpus_tokens(path: Path, encode: Callable[[str], list[int]], max_tokens: int) -> list[int]:
    """The first max_tokens tokens of a text file."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"cannot read corpus {path}: {e.strerror or e}") from None
    ids = list(encode(text))[:max_tokens]
    if len(ids) < 2:
        raise UserError(f"corpus {path} has fewer than 2 tokens")
    return ids


def trace_tokens(path: Path, request: int, max_tokens: int) -> list[int]:
    """Tokens for one request of a Mooncake trace (JSONL with `hash_ids` of 512-token blocks).

    The trace has no text: each block becomes 512 pseudo-random byte tokens (0..255) seeded by
    its hash id, so blocks shared between requests stay identical.
    """
    try:
        with open(path, encoding="utf-8") as f:
            line = next((ln for i, ln in enumerate(f) if i == request), None)
    except OSError as e:
        raise UserError(f"cannot read trace {path}: {e.strerror or e}") from None
    if line is None:
        raise UserError(f"trace {path} has no request {request}")
    try:
        rec = json.loads(line)
        n = min(int(rec["input_length"]), max_tokens)
        hash_ids = [int(h) for h in rec["hash_ids"]]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"trace {path} line {request + 1}: not a Mooncake record ({e})") from None
    ids: list[int] = []
    for h in hash_ids:
        if len(ids) >= n:
            break
        ids += np.random.default_rng(h).integers(0, 256, TRACE_BLOCK).tolist()
    if len(ids) < 2:
        raise UserError(f"trace {path} request {request} has fewer than 2 tokens")
    return ids[:n]


# --------------------------------------------------------------------------- report


class Horizon(NamedTuple):
    """One head's horizon at one eps: static, and (activations) median/p90 over positions."""

    static: float
    median: float | None = None
    p90: float | None = None
    censored_share: float | None = None

    def headline(self) -> float:
        return self.static if self.median is None else self.median


@dataclass(slots=True)
class HeadDecay:
    layer: int
    head: int
    A_log: float
    dt_bias: float
    g_static: float
    horizons: dict[float, Horizon]  # eps -> horizon
    window_cos: dict[int, float] = field(default_factory=dict)  # tau -> cosine
    g_mean: float | None = None  # activations: mean g_t over the sequence


@dataclass(slots=True)
class DecayReport:
    source: str  # checkpoint path or "preset:NAME"
    mode: str  # static | activations
    eps: list[float]
    taus: list[int]
    heads: list[HeadDecay]
    window_model: str  # how window fidelity was obtained
    seq_len: int | None = None  # activations: tokens analysed
    input: dict[str, Any] = field(default_factory=dict)  # corpus / trace description

    @property
    def primary_eps(self) -> float:
        return self.eps[0]

    def headline_horizons(self, eps: float) -> np.ndarray:
        """Per head: static horizon (static mode) or median over positions (activations)."""
        return np.array([h.horizons[eps].headline() for h in self.heads], dtype=np.float64)


def validate_eps(values: Iterable[float]) -> list[float]:
    out = list(values)
    if not out or any(not (0.0 < e < 1.0) or not math.isfinite(e) for e in out):
        raise UserError(f"eps must lie strictly between 0 and 1, got {out}")
    return list(dict.fromkeys(out))


def validate_taus(values: Iterable[int]) -> list[int]:
    out = sorted(set(values))
    if not out or out[0] < 1:
        raise UserError(f"taus must be positive token counts, got {out}")
    return out


def analyze_static(
    source: str, params: list[GDNLayerParams], eps: Sequence[float], taus: Sequence[int]
) -> DecayReport:
    """Static horizons per head and the closed-form window fidelity for constant decay."""
    eps, taus = validate_eps(eps), validate_taus(taus)
    heads = []
    for p in params:
        g = static_log_decay(p.A_log, p.dt_bias)
        by_eps = {e: static_horizon(g, e) for e in eps}
        for h in range(g.size):
            heads.append(
                HeadDecay(
                    layer=p.layer,
                    head=h,
                    A_log=float(p.A_log[h]),
                    dt_bias=float(p.dt_bias[h]),
                    g_static=float(g[h]),
                    horizons={e: Horizon(float(by_eps[e][h])) for e in eps},
                    window_cos={t: float(predicted_window_cos(g[h], t)) for t in taus},
                )
            )
    return DecayReport(source, "static", eps, taus, heads, "closed-form: sqrt(1 - exp(2 g tau))")


def analyze_activations(
    source: str,
    params: list[GDNLayerParams],
    traces: list[GDNTrace],
    eps: Sequence[float],
    taus: Sequence[int],
    input_desc: dict[str, Any] | None = None,
) -> DecayReport:
    """Horizons over positions from recorded g_t, and window fidelity of the recorded
    k/v/g/beta rerun in float64, per GDN layer and head."""
    import torch
    eps, taus = validate_eps(eps), validate_taus(taus)
    by_layer = {p.layer: p for p in params}
    missing = [tr.layer for tr in traces if tr.layer not in by_layer]
    if missing:
        raise UserError(f"no A_log/dt_bias for GDN layers {missing}")
    if not traces:
        raise UserError(f"{source}: no GDN layers to trace")
    seq_len = traces[0].g.shape[0]
    # All GDN layers share head shapes: one float64 pass over the sequence serves them all.
    k, v, g, beta = (
        torch.cat([getattr(tr, f) for tr in traces], dim=1) for f in ("k", "v", "g", "beta")
    )
    cos_all = window_fidelity(k, v, g, beta, taus)
    heads = []
    offset = 0
    for tr in traces:
        p = by_layer[tr.layer]
        g_all = tr.g.detach().to("cpu", torch.float64).numpy()  # [T, HV]
        cos = cos_all[:, offset : offset + g_all.shape[1]]
        offset += g_all.shape[1]
        g_static = static_log_decay(p.A_log, p.dt_bias)
        for h in range(g_all.shape[1]):
            horizons = {}
            for e in eps:
                ah = activation_horizon(g_all[:, h], e)
                horizons[e] = Horizon(
                    float(static_horizon(g_static[h], e)), ah.median, ah.p90, ah.censored_share
                )
            heads.append(
                HeadDecay(
                    layer=tr.layer,
                    head=h,
                    A_log=float(p.A_log[h]),
                    dt_bias=float(p.dt_bias[h]),
                    g_static=float(g_static[h]),
                    horizons=horizons,
                    window_cos={t: float(cos[i, h]) for i, t in enumerate(taus)},
                    g_mean=float(g_all[:, h].mean()),
                )
            )
    return DecayReport(
        source,
        "activations",
        eps,
        taus,
        heads,
        "measured: gated delta rule (float64) on the recorded k, v, g, beta",
        seq_len=seq_len,
        input=input_desc or {},
    )


def quantile_or_none(x: np.ndarray, q: float) -> float | None:
    """Quantile over heads; None when it falls on an unresolved (infinite) horizon."""
    if x.size == 0:
        return None
    with np.errstate(invalid="ignore"):
        v = float(np.quantile(x, q))
    return v if math.isfinite(v) else None


def tail_fit(horizons: np.ndarray) -> dict[str, Any] | None:
    """Lognormal vs Pareto fit (MLE, loc fixed at 0) of the finite horizons, with the KS
    statistic of each against its fit; best = the smaller KS statistic. The KS p-values are
    optimistic because the parameters were fitted on the same sample."""
    from scipy import stats
    x = horizons[np.isfinite(horizons) & (horizons > 0)]
    if x.size < 3 or np.unique(x).size < 3:
        return None
    s, _, scale = stats.lognorm.fit(x, floc=0)
    ks_ln = stats.kstest(x, "lognorm", args=(s, 0, scale))
    b, _, pscale = stats.pareto.fit(x, floc=0)
    ks_p = stats.kstest(x, "pareto", args=(b, 0, pscale))
    ks = {"lognormal": float(ks_ln.statistic), "pareto": float(ks_p.statistic)}
    fits = {
        "lognormal": {
            "params": {"mu": math.log(scale), "sigma": s},  # scipy lognorm(s=sigma, scale=e^mu)
            "ks": ks["lognormal"],
            "ks_pvalue": float(ks_ln.pvalue),
        },
        "pareto": {
            "params": {"alpha": b, "x_min": pscale},  # scipy pareto(b=alpha, scale=x_min)
            "ks": ks["pareto"],
            "ks_pvalue": float(ks_p.pvalue),
        },
    }
    best = min(ks, key=ks.__getitem__)
    return {**fits, "best": best, "n": int(x.size)}


def summarize(report: DecayReport, eps: float) -> dict[str, Any]:
    """Distribution of the headline horizon over heads at one eps.

    In activations mode a head whose median is not reached within the sequence is unresolved:
    it counts as over LONG_HORIZON only when the sequence itself is that long; otherwise it is
    counted in share_unresolved instead.
    """
    h = report.headline_horizons(eps)
    unresolved = ~np.isfinite(h)
    censor_floor = math.inf if report.mode == "static" else (report.seq_len or 0)
    known_over = (h > LONG_HORIZON) & (~unresolved | (censor_floor > LONG_HORIZON))
    n = max(h.size, 1)
    return {
        "eps": eps,
        "basis": "static" if report.mode == "static" else "activations median over positions",
        "n_heads": int(h.size),
        "median_horizon_tokens": quantile_or_none(h, 0.5),
        "p90_horizon_tokens": quantile_or_none(h, 0.9),
        f"share_over_{LONG_HORIZON}": float(known_over.sum() / n),
        "share_unresolved": float((unresolved & ~known_over).sum() / n),
        "tail_fit": tail_fit(h),
    }


def window_summary(report: DecayReport) -> dict[str, dict[str, float | None]]:
    """Per tau over heads: mean and 10th percentile of the cosine (nan heads left out)."""
    out: dict[str, dict[str, float | None]] = {}
    for tau in report.taus:
        c = np.array([h.window_cos[tau] for h in report.heads], dtype=np.float64)
        c = c[np.isfinite(c)]
        out[str(tau)] = {
            "mean_cos": float(c.mean()) if c.size else None,
            "p10_cos": float(np.quantile(c, 0.1)) if c.size else None,
            "min_cos": float(c.min()) if c.size else None,
        }
    return out


def ranking_tau(report: DecayReport) -> int:
    """The tau that ranks the slowest heads: the largest one, or in activations mode the
    largest one shorter than the sequence (a window covering it is exact for every head)."""
    shorter = [t for t in report.taus if report.seq_len and t < report.seq_len]
    return shorter[-1] if shorter else report.taus[-1]


def slowest_heads(report: DecayReport, n: int = 10) -> list[HeadDecay]:
    """The n heads with the lowest cosine at the ranking tau (ties: longest horizon first)."""
    tau = ranking_tau(report)

    def key(h: HeadDecay) -> tuple[float, float]:
        cos = h.window_cos[tau]
        return (cos if math.isfinite(cos) else math.inf, -h.horizons[report.primary_eps].headline())

    return sorted(report.heads, key=key)[:n]


def eps_key(eps: float) -> str:
    return f"{eps:g}"


def _head_json(h: HeadDecay, primary: float, activations: bool) -> dict[str, Any]:
    top = h.horizons[primary]
    row: dict[str, Any] = {
        "layer": h.layer,
        "head": h.head,
        "A_log": h.A_log,
        "dt_bias": h.dt_bias,
        "g_static": h.g_static,
        "horizon_tokens": top.static,
    }
    if activations:
        row |= {
            "horizon_median": top.median,
            "horizon_p90": top.p90,
            "censored_share": top.censored_share,
            "g_mean": h.g_mean,
        }
    row["window_cos"] = {str(t): c for t, c in h.window_cos.items()}
    if len(h.horizons) > 1:
        row["by_eps"] = {
            eps_key(e): {k: v for k, v in hz._asdict().items() if v is not None}
            for e, hz in h.horizons.items()
        }
    return row


def report_to_json(
    report: DecayReport, *, argv: Sequence[str], env: dict[str, Any], top: int = 10
) -> dict[str, Any]:
    """The `sbrbench.decay/v1` document."""
    activations = report.mode == "activations"
    primary = report.primary_eps
    by_eps = {eps_key(e): summarize(report, e) for e in report.eps}
    tau = ranking_tau(report)
    return {
        "schema": DECAY_SCHEMA,
        "created": now_iso(),
        "argv": list(argv),
        "env": env,
        "source": report.source,
        "mode": report.mode,
        "eps": report.eps,
        "taus": report.taus,
        "seq_len": report.seq_len,
        "input": report.input,
        "horizon_method": HORIZON_METHOD[report.mode],
        "summary": by_eps[eps_key(primary)],
        "by_eps": by_eps,
        "window": window_summary(report),
        "window_model": report.window_model,
        "slowest_heads": [
            {
                "layer": h.layer,
                "head": h.head,
                "tau": tau,
                "cos": h.window_cos[tau],
                "horizon_tokens": h.horizons[primary].headline(),
            }
            for h in slowest_heads(report, top)
        ],
        "heads": [_head_json(h, primary, activations) for h in report.heads],
    }


class HistBin(NamedTuple):
    lo: float
    hi: float
    heads: int


def log2_histogram(horizons: np.ndarray) -> tuple[list[HistBin], int]:
    """Counts of finite horizons in power-of-two bins, and the number of unresolved ones."""
    finite = horizons[np.isfinite(horizons) & (horizons > 0)]
    unresolved = int((~np.isfinite(horizons)).sum())
    if finite.size == 0:
        return [], unresolved
    lo = math.floor(math.log2(finite.min()))
    hi = max(math.ceil(math.log2(finite.max())), lo + 1)
    edges = 2.0 ** np.arange(lo, hi + 1)
    counts, _ = np.histogram(finite, edges)
    return [
        HistBin(float(edges[i]), float(edges[i + 1]), int(c)) for i, c in enumerate(counts)
    ], unresolved
